#!/usr/bin/env python3
"""Benchmark kubelab's userspace relay against haproxy, side by side.

Everything runs inside one network namespace made for the run (its own
loopback; nothing leaves it), and kubelab and the peer are measured
alternately (ABAB...) so slow phases of this shared machine hit both:

* bulk TCP: iperf3 -> relay -> iperf3 -s, MB/s, kubelab vs haproxy
  (``option splice-auto``, ``tune.bufsize 262144``, ``tune.pipesize
  262144``, one thread like our one event loop);
* relay CPU per GB: the relay process's user+system CPU during the bulk
  runs, divided by the bytes moved, kubelab vs haproxy (lower is better);
* short connections/s: ``wrk -H 'Connection: close'`` -> relay -> an
  haproxy HTTP responder, kubelab vs haproxy relaying;
* UDP round trips/s: dnsperf (20 queries in flight) -> relay -> dnsmasq,
  vs dnsperf -> dnsmasq directly; and the relay's CPU per round trip beside
  dnsmasq's CPU per answer.

Usage (root): ``python3 bench/userspace_bench.py [--runs 5] [--seconds 5]
[--loop uvloop|asyncio] [--out DIR]``.  Prints a Markdown table and writes
results.json / results.md into ``--out``.  The relay under test is
``python3 bench/userspace_bench.py --serve-relay ...`` (kubelab's driver:
listener, load balancer, splice relay) on the chosen loop.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubelab.bench.progress import Progress  # noqa: E402
from kubelab.bench.report import Figure, Results  # noqa: E402
from kubelab.bench.stats import paired_ratios, summarize  # noqa: E402

# Ports inside the benchmark's own namespace (its loopback only).
IPERF_PORT = 5201
HTTP_PORT = 8080
DNS_PORT = 5353
HAPROXY_TCP = 7001  # haproxy relaying to iperf3
HAPROXY_HTTP = 7002  # haproxy relaying to the HTTP responder
HAPROXY_BACKEND_HTTP = HTTP_PORT
KUBELAB_TCP = 7101
KUBELAB_HTTP = 7102
KUBELAB_UDP = 7103


# --------------------------------------------------------------------------
# The relay under test (runs as a child process)
# --------------------------------------------------------------------------


def serve_relay(specs: list[str], loop_name: str, pipe_size: int) -> None:
    """Run kubelab's userspace driver: PROTO:LISTEN_PORT:BACKEND_IP:BACKEND_PORT ..."""
    from kubelab.model import ServicePortName
    from kubelab.modes.userspace.driver import DriverOptions, Relay
    from kubelab.modes.userspace.loadbalancer import LoadBalancerRR

    async def main() -> None:
        lb = LoadBalancerRR()
        relay = Relay(asyncio.get_running_loop(), lb, DriverOptions(max_connections=3000, udp_max_sessions=4096, udp_idle_timeout=30, pipe_size=pipe_size), logging.getLogger("bench"))
        for i, spec in enumerate(specs):
            proto, lport, bip, bport = spec.split(":")
            name = ServicePortName("bench", f"svc{i}", "", proto)
            lb.new_service(name)
            lb.set_endpoints(name, [f"{bip}:{bport}"])
            if proto == "TCP":
                relay.open_tcp(name, "127.0.0.1", int(lport))
            else:
                relay.open_udp(name, "127.0.0.1", int(lport))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        relay.close()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# --------------------------------------------------------------------------
# The lab: one namespace, backends, haproxy, kubelab
# --------------------------------------------------------------------------


class Lab:
    """A network namespace with loopback up, and the processes started in it."""

    def __init__(self, workdir: Path):
        self.ns = f"kl-us-bench-{os.getpid()}"
        self.dir = workdir
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Lab:
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.sh(["ip", "link", "set", "lo", "up"], check=True)
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def sh(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, **kw)

    def start(self, argv: list[str], ready: str | None = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(argv), stdout=subprocess.PIPE if ready else subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, **kw)
        self.procs.append(p)
        if ready:
            line = p.stdout.readline()
            if ready not in line:
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        return p

    def wait_port(self, port: int, proto: str = "tcp") -> None:
        flag = "-t" if proto == "tcp" else "-u"
        for _ in range(100):
            out = self.sh(["ss", "-Hln", flag, f"sport = :{port}"]).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {proto} port {port} in {self.ns}")


HAPROXY_CFG = """\
global
  maxconn 6000
  nbthread 1
  tune.bufsize 262144
  tune.pipesize 262144
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  maxconn 6000
frontend bulk
  mode tcp
  option splice-auto
  bind 127.0.0.1:{haproxy_tcp}
  default_backend iperf
backend iperf
  mode tcp
  server s1 127.0.0.1:{iperf}
frontend short
  mode tcp
  option splice-auto
  bind 127.0.0.1:{haproxy_http}
  default_backend web
backend web
  mode tcp
  server s1 127.0.0.1:{http}
"""

RESPONDER_CFG = """\
global
  maxconn 6000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  maxconn 6000
frontend web
  bind 127.0.0.1:{http}
  http-request return status 200 content-type text/plain string "hello from the backend"
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(p: subprocess.Popen) -> int:
    """The real program's pid under ``ip netns exec`` (which execs it: same pid)."""
    return p.pid


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def iperf(lab: Lab, port: int, seconds: float, pid: int) -> tuple[float, float]:
    """(MB/s, relay CPU seconds per GB) of one iperf3 run through ``port``."""
    c0 = cpu_seconds(pid)
    r = lab.sh(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-l", "128K"], timeout=seconds + 30)
    c1 = cpu_seconds(pid)
    import json

    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]["sum_received"]
    mbps = end["bytes"] / end["seconds"] / 1e6
    return mbps, (c1 - c0) / (end["bytes"] / 1e9)


def wrk(lab: Lab, port: int, seconds: float, pid: int) -> tuple[float, float]:
    """(requests/s, relay CPU ms per 1000 connections) of ``wrk -H 'Connection: close'``."""
    c0 = cpu_seconds(pid)
    r = lab.sh(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"],
        timeout=seconds + 30,
    )
    c1 = cpu_seconds(pid)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    total = re.search(r"(\d+) requests in", r.stdout)
    if not m or not total:
        raise RuntimeError(f"wrk: {r.stdout}{r.stderr}")
    errs = re.search(r"Socket errors: (.*)", r.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} bad responses through port {port}")
    if errs and "connect 0, read 0, write 0, timeout 0" not in errs.group(1):
        print(f"  wrk socket errors via {port}: {errs.group(1)}", file=sys.stderr)
    return float(m.group(1)), (c1 - c0) * 1e6 / max(1, int(total.group(1)))


def dnsperf(lab: Lab, port: int, seconds: float, inflight: int, datafile: Path, pid: int) -> tuple[float, float]:
    """(queries/s, CPU µs per completed query of process ``pid``) of one dnsperf run to ``port``."""
    c0 = cpu_seconds(pid)
    r = lab.sh(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-l", str(seconds), "-q", str(inflight), "-c", "1", "-t", "2"],
        timeout=seconds + 30,
    )
    c1 = cpu_seconds(pid)
    m = re.search(r"Queries per second:\s+([\d.]+)", r.stdout)
    lost = re.search(r"Queries lost:\s+(\d+)", r.stdout)
    done = re.search(r"Queries completed:\s+(\d+)", r.stdout)
    if not m or not done:
        raise RuntimeError(f"dnsperf: {r.stdout}{r.stderr}")
    if lost and int(lost.group(1)) > 0:
        print(f"  dnsperf lost {lost.group(1)} queries via port {port}", file=sys.stderr)
    return float(m.group(1)), (c1 - c0) * 1e6 / max(1, int(done.group(1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="alternating pairs per figure (default 5)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each run (default 5)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of the relay")
    ap.add_argument("--out", default="", help="folder for results.json / results.md")
    ap.add_argument("--only", default="", help="comma list of: bulk,short,udp")
    ap.add_argument("--pipe-size", type=int, default=256 * 1024, help="kubelab's splice pipe size in bytes (default 256 KiB)")
    ap.add_argument("--serve-relay", nargs="+", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_relay:
        serve_relay(args.serve_relay, args.loop, args.pipe_size)
        return 0
    if os.geteuid() != 0:
        print("userspace_bench: needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else {"bulk", "short", "udp"}
    results = Results(command=shlex.join(["python3", "bench/userspace_bench.py", *sys.argv[1:]]))
    work = Path(tempfile.mkdtemp(prefix="kl-us-bench-"))
    atexit.register(shutil.rmtree, work, True)  # config files only; results go to --out
    ports = dict(haproxy_tcp=HAPROXY_TCP, haproxy_http=HAPROXY_HTTP, iperf=IPERF_PORT, http=HTTP_PORT)
    (work / "haproxy.cfg").write_text(HAPROXY_CFG.format(**ports))
    (work / "responder.cfg").write_text(RESPONDER_CFG.format(**ports))
    (work / "queries.txt").write_text("svc.bench.test A\n")
    steps = args.runs * (2 * ("bulk" in only) + 2 * ("short" in only) + 2 * ("udp" in only))
    prog = Progress(steps)
    with Lab(work) as lab:
        lab.start(["iperf3", "-s", "-p", str(IPERF_PORT)])
        lab.start(["haproxy", "-db", "-f", str(work / "responder.cfg")])
        server = lab.start(["dnsmasq", "-k", "-C", "/dev/null", "-p", str(DNS_PORT), "--listen-address=127.0.0.1", "--bind-interfaces",
                   "--no-resolv", "--address=/bench.test/10.1.2.3", "--cache-size=0", "--log-facility=/dev/null", "--dns-forward-max=10000"])
        peer = lab.start(["haproxy", "-db", "-f", str(work / "haproxy.cfg")])
        ours = lab.start(
            [sys.executable, str(Path(__file__).resolve()), "--loop", args.loop, "--pipe-size", str(args.pipe_size), "--serve-relay",
             f"TCP:{KUBELAB_TCP}:127.0.0.1:{IPERF_PORT}", f"TCP:{KUBELAB_HTTP}:127.0.0.1:{HTTP_PORT}",
             f"UDP:{KUBELAB_UDP}:127.0.0.1:{DNS_PORT}"],
            ready="ready",
        )
        for port in (IPERF_PORT, HTTP_PORT, HAPROXY_TCP, HAPROXY_HTTP, KUBELAB_TCP, KUBELAB_HTTP):
            lab.wait_port(port)
        lab.wait_port(DNS_PORT, "udp")
        subject = f"kubelab userspace ({args.loop})"

        if "bulk" in only:
            ours_mb, peer_mb, ours_cpu, peer_cpu = [], [], [], []
            for i in range(args.runs):
                prog.step(f"bulk TCP via kubelab, run {i + 1}")
                mb, cpu = iperf(lab, KUBELAB_TCP, args.seconds, child_pid(ours))
                ours_mb.append(mb)
                ours_cpu.append(cpu)
                prog.step(f"bulk TCP via haproxy, run {i + 1}")
                mb, cpu = iperf(lab, HAPROXY_TCP, args.seconds, child_pid(peer))
                peer_mb.append(mb)
                peer_cpu.append(cpu)
            results.figures.append(Figure("userspace", "bulk TCP throughput", subject, "MB/s", summarize(ours_mb), "haproxy",
                                          summarize(peer_mb), paired_ratios(ours_mb, peer_mb), ">= 1.0"))
            results.figures.append(Figure("userspace", "relay CPU per GB", subject, "CPU s/GB", summarize(ours_cpu), "haproxy",
                                          summarize(peer_cpu), paired_ratios(ours_cpu, peer_cpu), "<= 1.0", higher_is_better=False))
        if "short" in only:
            ours_rps, peer_rps, ours_cpu, peer_cpu = [], [], [], []
            for i in range(args.runs):
                prog.step(f"short connections via kubelab, run {i + 1}")
                rps, cpu = wrk(lab, KUBELAB_HTTP, args.seconds, child_pid(ours))
                ours_rps.append(rps)
                ours_cpu.append(cpu)
                prog.step(f"short connections via haproxy, run {i + 1}")
                rps, cpu = wrk(lab, HAPROXY_HTTP, args.seconds, child_pid(peer))
                peer_rps.append(rps)
                peer_cpu.append(cpu)
            results.figures.append(Figure("userspace", "short connections/s (wrk, Connection: close)", subject, "conn/s",
                                          summarize(ours_rps), "haproxy", summarize(peer_rps), paired_ratios(ours_rps, peer_rps), ">= 0.7"))
            results.figures.append(Figure("userspace", "relay CPU per connection", subject, "CPU µs/conn",
                                          summarize(ours_cpu), "haproxy", summarize(peer_cpu), paired_ratios(ours_cpu, peer_cpu),
                                          higher_is_better=False))
        if "udp" in only:
            # dnsperf with one query in flight paces itself (~1 ms per query
            # here, direct or not), which measures dnsperf, not the relay.
            for inflight in (20,):
                ours_q, direct_q, ours_cpu, server_cpu = [], [], [], []
                for i in range(args.runs):
                    prog.step(f"UDP round trips ({inflight} in flight) via kubelab, run {i + 1}")
                    q, cpu = dnsperf(lab, KUBELAB_UDP, args.seconds, inflight, work / "queries.txt", child_pid(ours))
                    ours_q.append(q)
                    ours_cpu.append(cpu)
                    prog.step(f"UDP round trips ({inflight} in flight) direct, run {i + 1}")
                    q, cpu = dnsperf(lab, DNS_PORT, args.seconds, inflight, work / "queries.txt", child_pid(server))
                    direct_q.append(q)
                    server_cpu.append(cpu)
                results.figures.append(Figure("userspace", f"UDP round trips/s, {inflight} in flight (dnsperf -> dnsmasq)", subject, "q/s",
                                              summarize(ours_q), "direct", summarize(direct_q), paired_ratios(ours_q, direct_q), ">= 0.5"))
                # What one relayed round trip costs the relay, beside what
                # answering it costs the server (dnsmasq, in the direct
                # runs): CPU time, so less swayed by the box's load than q/s.
                results.figures.append(Figure("userspace", "relay CPU per UDP round trip", subject, "CPU µs/query",
                                              summarize(ours_cpu), "dnsmasq answering", summarize(server_cpu),
                                              paired_ratios(ours_cpu, server_cpu), higher_is_better=False))
        prog.finish()
    results.notes.append("one network namespace, loopback only; haproxy 1 thread (like kubelab's one event loop), "
                         "option splice-auto, tune.bufsize/pipesize 262144; wrk -t1 -c32; dnsperf -c1")
    md = results.markdown()
    print(md)
    if args.out:
        results.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
