#!/usr/bin/env python3
"""dnsperf against kubelab dns and dnsmasq side by side on loopback, plus kubelab's memory at scale.

    python3 bench/dns_bench.py [--services 2000] [--rounds 10] [--seconds 3] [--pin] [--peers dnsmasq,unbound] [--workers 1,2] [--memory]

Every server answers the same cluster names (A records of N services):
kubelab as shipped (``kubelab dns --source`` on a folder of Service
manifests), dnsmasq from a hosts file (--addn-hosts) with the same names and
IPs (upstream-less, --local for the zone), unbound from local-data lines in
a static local-zone (one thread).  Each round runs every server once, the
order reversed every other round (ABBA...) so slow phases of the shared
machine hit all; each round reports
queries/s, latency percentiles computed from dnsperf -v per-query
latencies, and the server's CPU time per answered query (utime+stime from
/proc, the least noisy figure on a shared box).  Ratios are taken per pair,
then the median.  ``--pin`` runs both servers on CPU 1 and dnsperf on CPU 0
(taskset), so each server gets the same single core and never competes
with the load generator.  ``--workers 1,2`` runs one kubelab per value of
``kubelab dns --workers`` side by side (CPU time summed over its processes).  ``--memory`` loads 10,000 services and 50,000 pods into a kubelab
dns process and reports its RSS against CoreDNS's published formula
((pods + services)/1000 + 54 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY = textwrap.dedent(
    """
    import gc, logging, sys, resource
    from kubelab.dns.answer import Settings
    from kubelab.dns.server import ClusterDNS, DNSConfig
    from kubelab.dns.testing import synthetic_cluster
    from kubelab.model import EndpointSlice, Pod, Service
    mode = sys.argv[3]
    d = ClusterDNS(DNSConfig(settings=Settings(pods=mode)), logging.getLogger("bench"))
    for obj in synthetic_cluster(int(sys.argv[1]), int(sys.argv[2])):
        if isinstance(obj, Service):
            d.on_service_add(obj)
        elif isinstance(obj, EndpointSlice):
            d.on_endpoint_slice_add(obj)
        else:
            d.on_pod_add(obj)
    d.on_services_synced(); d.on_endpoint_slices_synced()
    gc.collect()
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096
    print(rss)
    """
)


def port_free() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answer(port: int, name: str, proc: subprocess.Popen, who: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{who} exited with status {proc.returncode} before answering")
        r = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=1", name], capture_output=True, text=True)
        if r.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{who}: no answer for {name} on port {port}")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads) and its live child processes (kubelab --workers), in clock ticks."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12])
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for k in kids:
        try:
            ticks += cpu_ticks(int(k))
        except OSError:  # exited in between
            pass
    return ticks


def dnsperf(port: int, qfile: Path, seconds: float, *, pid: int = 0, cpus: str = "") -> dict:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile), "-l", str(seconds), "-c", "4", "-q", "200", "-v"]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    t0 = cpu_ticks(pid) if pid else 0
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    ticks = cpu_ticks(pid) - t0 if pid else 0
    lat = []
    qps = 0.0
    lost = 0
    done = 0
    for line in r.stdout.splitlines():
        if line.startswith("> "):
            try:
                lat.append(float(line.rsplit(None, 1)[1]))
            except ValueError:
                pass
        elif "Queries per second:" in line:
            qps = float(line.split(":")[1])
        elif "Queries lost:" in line:
            lost = int(line.split(":")[1].split()[0])
        elif "Queries completed:" in line:
            done = int(line.split(":")[1].split()[0])
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1e3 if lat else float("nan")  # noqa: E731
    us_per_q = ticks / os.sysconf("SC_CLK_TCK") / done * 1e6 if done else float("nan")
    return {"qps": qps, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "lost": lost, "cpu_us_per_query": us_per_q}


def warm(port: int, tmp: Path, names: list[tuple[str, str]], *, cpus: str = "") -> None:
    """Warm one server: each name asked once, then 2 s of the query mix; timed rounds then see the steady state.

    kubelab builds each wire answer on first sight (the slow path) and the
    peers fill their caches; a fresh kubelab dns under full load can also
    spend its first second at a tenth of its rate.  Both stay out of the
    timed rounds (``kubelab bench``'s dns suite warms the same way).
    """
    each = tmp / "each-once"
    if not each.exists():
        each.write_text("".join(f"{nm} A\n" for nm, _ in names))
    subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(each), "-n", "1", "-q", "20"],
                   capture_output=True, timeout=300, check=True)
    dnsperf(port, tmp / "queries", 2, cpus=cpus)


def rss_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


SERVICE_DOC = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: 80}}]
"""


def start_servers(args, tmp: Path, names: list[tuple[str, str]], pin_server: list[str]) -> dict:
    """{who: (Popen, port)} for kubelab (the real CLI on a --source folder) and the peers."""
    servers = {}
    (tmp / "manifests").mkdir()
    (tmp / "manifests" / "services.yaml").write_text(
        "---\n".join(SERVICE_DOC.format(name=nm.split(".")[0], ns=nm.split(".")[1], ip=ip) for nm, ip in names)
    )
    for w in args.workers:
        kport = port_free()
        who = "kubelab" if w == 1 else f"kubelab-w{w}"
        servers[who] = (
            subprocess.Popen(
                [*pin_server, sys.executable, "-m", "kubelab", "dns", "--source", str(tmp / "manifests"), "--listen", f"127.0.0.1:{kport}",
                 "--upstream", f"127.0.0.1:{port_free()}", "--metrics-bind-address", "", "--health-bind-address", "", "--workers", str(w)],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"{who}.log", "w"), cwd=ROOT,
            ),
            kport,
        )
    if "dnsmasq" in args.peers:
        mport = port_free()
        servers["dnsmasq"] = (
            subprocess.Popen(
                [*pin_server, "dnsmasq", "-k", "-C", "/dev/null", f"--port={mport}", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
                 "--no-hosts", f"--addn-hosts={tmp / 'hosts'}", "--local=/cluster.local/", "--cache-size=10000", "--pid-file=", "--user=",
                 "--log-facility=/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ),
            mport,
        )
    if "unbound" in args.peers:
        uport = port_free()
        conf = tmp / "unbound.conf"
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{uport}\n  port: {uport}\n  num-threads: 1\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n"
            "  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n"
            "  local-zone: \"cluster.local.\" static\n"
            + "".join(f'  local-data: "{nm}. 5 IN A {ip}"\n' for nm, ip in names)
            + "remote-control:\n  control-enable: no\n"
        )
        servers["unbound"] = (
            subprocess.Popen([*pin_server, "unbound", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=open(tmp / "unbound.log", "w")),
            uport,
        )
    return servers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=10, help="rounds; each runs every server once, order reversed every other round (default 10)")
    ap.add_argument("--seconds", type=float, default=3, help="length of one dnsperf run (default 3)")
    ap.add_argument("--pin", action="store_true", help="servers on CPU 1, dnsperf on CPU 0 (taskset)")
    ap.add_argument("--peers", default="dnsmasq,unbound", help="comma-separated peers among dnsmasq,unbound (default: both)")
    ap.add_argument("--workers", default="1", help="comma-separated kubelab --workers values to run side by side, e.g. 1,2 (default 1)")
    ap.add_argument("--memory", action="store_true", help="also measure RSS at 10,000 services / 50,000 pods")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    args.peers = [p for p in args.peers.split(",") if p]
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        ap.error(f"--workers: {args.workers!r} is not a comma-separated list of numbers")
    if not args.workers or any(not 1 <= w <= 64 for w in args.workers):
        ap.error("--workers: give 1-64 per kubelab instance, e.g. 1,2")
    for p in args.peers:
        if p not in ("dnsmasq", "unbound"):
            ap.error(f"--peers: unknown peer {p!r} (use dnsmasq and/or unbound)")
        if not shutil.which(p):
            ap.error(f"--peers: {p} is not installed (apt-get install {p if p != 'dnsmasq' else 'dnsmasq-base'})")

    n = args.services
    tmp = Path(tempfile.mkdtemp(prefix="kl-dns-bench-"))
    names = [(f"svc{i}.ns{i % 50}.svc.cluster.local", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(n)]
    (tmp / "hosts").write_text("".join(f"{ip} {name}\n" for name, ip in names))
    rnd = random.Random(1)
    (tmp / "queries").write_text("".join(f"{rnd.choice(names)[0]} A\n" for _ in range(100000)))

    pin_server = ["taskset", "-c", "1"] if args.pin else []
    pin_client = "0" if args.pin else ""
    servers = start_servers(args, tmp, names, pin_server)
    who_all = list(servers)
    results: dict = {w: [] for w in who_all}
    try:
        for who, (proc, port) in servers.items():
            wait_answer(port, names[0][0], proc, who)
        for who, (_, port) in servers.items():
            warm(port, tmp, names, cpus=pin_client)
        for i in range(args.rounds):
            for who in who_all if i % 2 == 0 else who_all[::-1]:
                proc, port = servers[who]
                r = dnsperf(port, tmp / "queries", args.seconds, pid=proc.pid, cpus=pin_client)
                results[who].append(r)
                print(
                    f"round {i + 1} {who:8s} {r['qps']:9.0f} q/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                    f"cpu {r['cpu_us_per_query']:.1f} us/query  lost {r['lost']}",
                    flush=True,
                )
        if "kubelab" in servers:
            results["kubelab_rss_mb"] = rss_of(servers["kubelab"][0].pid) / 1e6
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    med = statistics.median
    print()
    pin = "servers pinned to CPU 1, dnsperf to CPU 0" if args.pin else "unpinned"
    print(f"services: {n}; {args.rounds} rounds (order reversed every other) x {args.seconds:g} s; dnsperf -c 4 -q 200 on loopback; {os.cpu_count()} cores, {pin}")
    for who in who_all:
        q = [r["qps"] for r in results[who]]
        p = [r["p99_ms"] for r in results[who]]
        c = [r["cpu_us_per_query"] for r in results[who]]
        print(
            f"{who:8s} q/s median {med(q):.0f} (min {min(q):.0f}, max {max(q):.0f}); p99 median {med(p):.3f} ms (min {min(p):.3f}, max {max(p):.3f}); "
            f"cpu/query median {med(c):.1f} us (min {min(c):.1f}, max {max(c):.1f})"
        )
    kubelabs = [w for w in who_all if w.startswith("kubelab")]
    for mine, peer in ((k, p) for k in kubelabs for p in args.peers):
        pairs = list(zip(results[mine], results[peer], strict=True))
        ratios = [k["qps"] / d["qps"] for k, d in pairs]
        p99r = [k["p99_ms"] / d["p99_ms"] for k, d in pairs]
        cpur = [k["cpu_us_per_query"] / d["cpu_us_per_query"] for k, d in pairs]
        print(f"{mine}/{peer}: q/s ratio median {med(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) (>= 1.0 is the target); "
              f"p99 ratio median {med(p99r):.2f} (min {min(p99r):.2f}, max {max(p99r):.2f}) (<= 1.0 is no worse); "
              f"cpu/query ratio median {med(cpur):.2f} (min {min(cpur):.2f}, max {max(cpur):.2f}) (<= 1.0 is cheaper)")
        tag = peer if mine == "kubelab" else f"{peer}_{mine}"
        results[f"qps_ratio_{tag}"] = ratios
        results[f"p99_ratio_{tag}"] = p99r
        results[f"cpu_ratio_{tag}"] = cpur

    if args.memory:
        (tmp / "memory.py").write_text(MEMORY)
        for mode in ("disabled", "verified"):
            out = subprocess.run([sys.executable, str(tmp / "memory.py"), "10000", "50000", mode], capture_output=True, text=True, cwd=ROOT, check=True)
            rss = int(out.stdout.strip()) / 1e6
            budget = (50000 + 10000) / 1000 + 54
            print(f"memory (--pods {mode}): 10,000 services + 50,000 pods: RSS {rss:.0f} MB; CoreDNS formula {budget:.0f} MB; ratio {rss / budget:.2f}")
            results[f"rss_mb_{mode}"] = rss
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
