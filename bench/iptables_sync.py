#!/usr/bin/env python3
"""Benchmark: kubelab's iptables mode vs ``iptables-restore`` alone, in throwaway network namespaces.

For N services x E endpoints (default 10,000 x 5) and each backend (nft, legacy),
``--pairs`` pairs of runs, alternating which goes first (ABAB, BAAB, ...):

* A -- kubelab: a fresh process builds the objects into a SyncState (as the
  controller would), then ``IPTablesProxier.sync_proxy_rules`` does a full
  sync into a fresh namespace (jump rules + iptables-save + render + one
  restore + housekeeping).  Timed: the sync call.  Then ``--repeat`` partial
  syncs, each after one service's endpoints changed; then its resident
  memory (VmRSS now, VmHWM peak).
* B -- ``iptables-<backend>-restore -w 5 --noflush --counters`` alone loading
  the very text A rendered, into another fresh namespace entered as A's
  runner enters it (setns).  Timed: the command.  (A's restore input also
  carries the jump rules and canary chains, which B's lacks.  On nft both
  carry the whole-table-cache "-S" line, see kubelab/modes/iptables/kernel.py,
  with its output to /dev/null.)

Reported per backend: medians over the pairs with their spread (min-max),
the per-pair ratio A/B (target <= 1.25) of wall time and of CPU time (user +
system of the process and its children: far less sensitive to a shared,
loaded machine than wall time), the partial-sync median and
spread over all repeats (target < 50 ms on nft), wall and CPU, next to kubelab's own CPU
(the sync minus its restore process), its render time and the floor -- one
``iptables-restore`` adding a single rule in the same namespace, which no
partial sync can beat, and the same commit with a rule that has no target,
which nf_tables commits without re-validating the table -- and RSS (target < 150 MB).

Run as root:
    python3 bench/iptables_sync.py [--services 10000] [--endpoints 5] [--pairs 2] [--repeat 7] [--backend nft|legacy]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def netns(name: str) -> str:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def drop_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def build(n: int, e: int):
    from kubelab.model import NodeInfo
    from kubelab.modes.iptables.testing import StateBuilder, make_service, make_slice

    b = StateBuilder(NodeInfo(name="bench-node", ips=("192.168.0.2",)))
    objs = []
    for i in range(n):
        ip = f"172.30.{i // 250}.{i % 250 + 1}"
        objs.append(make_service(f"ns{i % 100}", f"svc{i}", ip, [("http", 80, "TCP")]))
        objs.append(make_slice(
            f"ns{i % 100}", f"svc{i}",
            [f"10.{(i * e + j) // 65536 % 256}.{(i * e + j) // 256 % 256}.{(i * e + j) % 256}" for j in range(e)],
            [("http", 8080, "TCP")],
        ))
    b.add(*objs)
    return b


def child(backend: str, n: int, e: int, repeat: int, ns: str, text_out: str) -> dict:
    """Run A in this (fresh) process: full sync, partial syncs, memory; write the full-sync text."""
    import asyncio
    import logging

    from kubelab.modes.iptables.proxier import IPTablesProxier
    from kubelab.modes.iptables.testing import make_slice
    from kubelab.proxy.config import ProxyConfig
    from kubelab.proxy.kernel.exec import Runner
    from kubelab.proxy.provider import ModeDeps

    b = build(n, e)
    state = b.state(full_sync=True)
    rss_objects = proc_status_mb("VmRSS")
    deps = ModeDeps(config=ProxyConfig(cluster_cidr=("10.0.0.0/8",)), node=state.node,
                    logger=logging.getLogger("bench"), run=Runner(ns, timeout=7200), extra={"iptables_backend": backend})
    p = IPTablesProxier(deps)
    c0 = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    asyncio.run(p.sync_proxy_rules(state))
    full = time.perf_counter() - t0
    full_cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    timings = dict(p.stats.timings)
    partial, partial_cpu, partial_self, partial_timings = [], [], [], []
    for r in range(repeat):
        i = (r * 7919) % n
        b.add(make_slice(f"ns{i % 100}", f"svc{i}", [f"10.200.{r}.{j}" for j in range(e)], [("http", 8080, "TCP")]))
        st = b.state()
        s0 = cpu_seconds(resource.RUSAGE_SELF)
        c0 = s0 + cpu_seconds(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        asyncio.run(p.sync_proxy_rules(st))
        partial.append(time.perf_counter() - t0)
        partial_cpu.append(cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
        partial_self.append(cpu_seconds(resource.RUSAGE_SELF) - s0)
        partial_timings.append(dict(p.stats.timings))
    rss, hwm = proc_status_mb("VmRSS"), proc_status_mb("VmHWM")
    # The floor under any partial sync at this size: a restore adding one rule to a
    # scratch chain (then removing it), entered the same way.  On the nft backend the
    # kernel re-validates every rule reachable from the base chains on each commit.
    # Below it, the same commit with a rule that has no target: nf_tables validates a
    # table only after a rule with a verdict, match or target was added, so this is a
    # commit's cost without that validation (what is left is its walk over all chains).
    run = Runner(ns)
    floor, floor_cpu, noval_cpu = [], [], []
    for _ in range(5):
        c0 = cpu_seconds(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        run([f"iptables-{backend}-restore", "--noflush"], input="*nat\n:KL-BENCH-FLOOR - [0:0]\n-A KL-BENCH-FLOOR -j RETURN\nCOMMIT\n")
        floor.append(time.perf_counter() - t0)
        floor_cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
        run([f"iptables-{backend}-restore", "--noflush"], input="*nat\n:KL-BENCH-FLOOR - [0:0]\n-X KL-BENCH-FLOOR\nCOMMIT\n")
        c0 = cpu_seconds(resource.RUSAGE_CHILDREN)
        run([f"iptables-{backend}-restore", "--noflush"], input="*nat\n:KL-BENCH-FLOOR - [0:0]\n-A KL-BENCH-FLOOR -s 192.0.2.1\nCOMMIT\n")
        noval_cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
        run([f"iptables-{backend}-restore", "--noflush"], input="*nat\n:KL-BENCH-FLOOR - [0:0]\n-X KL-BENCH-FLOOR\nCOMMIT\n")
    # The text B loads: what this full sync wrote (a fresh namespace has no stale chains to delete).
    text = p.render(state)
    with open(text_out, "w") as f:
        f.write(text)
    return {"full": full, "full_cpu": full_cpu, "timings": timings, "partial": partial, "partial_cpu": partial_cpu,
            "partial_timings": partial_timings, "partial_self_cpu": partial_self, "floor": floor, "floor_cpu": floor_cpu,
            "noval_cpu": noval_cpu,
            "rss_mb": rss, "hwm_mb": hwm, "rss_objects_mb": rss_objects, "lines": text.count("\n"),
            "chains": text.count("\n:")}


def run_a(backend: str, n: int, e: int, repeat: int, tag: str, text_out: str) -> dict:
    ns = netns(f"{tag}-a")
    try:
        argv = [sys.executable, __file__, "--child", backend, str(n), str(e), str(repeat), ns, text_out]
        for attempt in (1, 2):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode == 0:
                return json.loads(r.stdout.strip().splitlines()[-1])
            # A shared box: e.g. another program held the (legacy) xtables lock past -w 5.
            print(f"  kubelab run failed (attempt {attempt}):\n{r.stderr.strip()[-2000:]}", file=sys.stderr, flush=True)
            drop_netns(ns)
            netns(ns)
        raise SystemExit("kubelab run failed twice; see above")
    finally:
        drop_netns(ns)


def run_b(backend: str, tag: str, text_path: str) -> tuple[float, float]:
    from kubelab.modes.iptables.kernel import WholeTableCache
    from kubelab.proxy.kernel.exec import _InNetns

    ns = netns(f"{tag}-b")
    try:
        with open(text_path) as f:
            text = f.read()
        if backend == "nft":
            # The very input A's restore read: with the whole-table cache line (kernel.py).
            text = "".join(WholeTableCache([text]))
        with tempfile.TemporaryFile("w+") as f:
            f.write(text)
            f.seek(0)
            del text
            # Entered the way A's Runner enters its namespace (setns, no `ip netns exec`).
            with _InNetns(ns):
                c0 = cpu_seconds(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run([f"iptables-{backend}-restore", "-w", "5", "--noflush", "--counters"], stdin=f,
                               stdout=subprocess.DEVNULL, check=True)
                return time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    finally:
        drop_netns(ns)


def spread(xs: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs) * scale)} ({fmt.format(min(xs) * scale)}-{fmt.format(max(xs) * scale)})"


def bench_backend(backend: str, n: int, e: int, pairs: int, repeat: int) -> dict:
    tag = f"kl-ipt-bench-{os.getpid()}"
    a_runs, b_runs, ratios, b_cpu, cpu_ratios = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "restore.txt")
        for k in range(pairs):
            if k % 2 == 0:
                a = run_a(backend, n, e, repeat, tag, text)
                b = run_b(backend, tag, text)
            else:
                # B first needs the text: the previous pair's (the input is deterministic).
                b = run_b(backend, tag, text)
                a = run_a(backend, n, e, repeat, tag, text)
            b, bc = b
            a_runs.append(a)
            b_runs.append(b)
            b_cpu.append(bc)
            ratios.append(a["full"] / b)
            cpu_ratios.append(a["full_cpu"] / bc)
            print(f"  {backend} pair {k + 1}: kubelab {a['full']:.2f}s "
                  f"({', '.join(f'{key} {v:.2f}' for key, v in a['timings'].items())}) vs restore alone {b:.2f}s "
                  f"-> {a['full'] / b:.2f}; CPU {a['full_cpu']:.2f}s vs {bc:.2f}s -> {a['full_cpu'] / bc:.2f}; partial {', '.join(f'{x * 1000:.0f}' for x in a['partial'])} ms "
                  f"(render {', '.join(str(round(t['render'] * 1000)) for t in a['partial_timings'])}; one-rule restore "
                  f"{', '.join(f'{x * 1000:.0f}' for x in a['floor'])} ms); "
                  f"RSS {a['rss_mb']:.0f} MB (peak {a['hwm_mb']:.0f}, objects alone {a['rss_objects_mb']:.0f})",
                  file=sys.stderr, flush=True)
    partial = [x for a in a_runs for x in a["partial"]]
    return {
        "backend": backend, "services": n, "endpoints": e, "pairs": pairs,
        "lines": a_runs[0]["lines"], "chains": a_runs[0]["chains"],
        "full": [a["full"] for a in a_runs], "alone": b_runs, "ratio": ratios,
        "full_cpu": [a["full_cpu"] for a in a_runs], "alone_cpu": b_cpu, "cpu_ratio": cpu_ratios,
        "render": [a["timings"]["render"] for a in a_runs],
        "partial": partial,
        "partial_cpu": [x for a in a_runs for x in a["partial_cpu"]],
        "partial_self_cpu": [x for a in a_runs for x in a["partial_self_cpu"]],
        "noval_cpu": [x for a in a_runs for x in a["noval_cpu"]],
        "floor_cpu": [x for a in a_runs for x in a["floor_cpu"]],
        "partial_render": [t["render"] for a in a_runs for t in a["partial_timings"]],
        "floor": [x for a in a_runs for x in a["floor"]],
        "rss_mb": [a["rss_mb"] for a in a_runs], "hwm_mb": [a["hwm_mb"] for a in a_runs],
        "rss_objects_mb": [a["rss_objects_mb"] for a in a_runs],
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, n, e, repeat, ns, out = sys.argv[2:8]
        print(json.dumps(child(backend, int(n), int(e), int(repeat), ns, out)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=2, help="A/B pairs per backend, alternating order (default 2)")
    ap.add_argument("--repeat", type=int, default=7, help="partial syncs after each full sync (default 7)")
    ap.add_argument("--backend", action="append", choices=["nft", "legacy"])
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    ap.add_argument("--partial-only", action="store_true",
                    help="one kubelab run per backend for the partial-sync and memory figures (no restore-alone run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark creates network namespaces", file=sys.stderr)
        return 2
    results = []
    for backend in args.backend or ["nft", "legacy"]:
        if args.partial_only:
            with tempfile.TemporaryDirectory() as tmp:
                a = run_a(backend, args.services, args.endpoints, args.repeat, f"kl-ipt-bench-{os.getpid()}",
                          os.path.join(tmp, "restore.txt"))
            renders = [t["render"] for t in a["partial_timings"]]
            print(f"{backend}: {args.services}x{args.endpoints} ({a['chains']} chains) partial sync "
                  f"{spread(a['partial'], 1000, '{:.1f}')} ms, CPU {spread(a['partial_cpu'], 1000, '{:.1f}')} ms "
                  f"(n={len(a['partial'])}; kubelab's own CPU {spread(a['partial_self_cpu'], 1000, '{:.1f}')} ms, its render "
                  f"{spread(renders, 1000, '{:.1f}')} ms; a one-rule restore alone "
                  f"{spread(a['floor'], 1000, '{:.1f}')} ms, CPU {spread(a['floor_cpu'], 1000, '{:.1f}')} ms; the same "
                  f"without kernel validation (no target) CPU {spread(a['noval_cpu'], 1000, '{:.1f}')} ms); "
                  f"RSS {a['rss_mb']:.0f} MB, peak {a['hwm_mb']:.0f} MB (objects alone {a['rss_objects_mb']:.0f} MB)",
                  flush=True)
            results.append({"backend": backend, "partial_only": True, **a})
            continue
        r = bench_backend(backend, args.services, args.endpoints, args.pairs, args.repeat)
        results.append(r)
        print(f"{backend}: {args.services}x{args.endpoints} ({r['lines']} lines, {r['chains']} chains), "
              f"median (min-max) of {args.pairs} ABAB pairs: kubelab full sync {spread(r['full'])} s "
              f"[render {spread(r['render'])} s] vs iptables-restore alone {spread(r['alone'])} s -> "
              f"ratio {spread(r['ratio'])}; CPU seconds {spread(r['full_cpu'])} vs {spread(r['alone_cpu'])} -> "
              f"ratio {spread(r['cpu_ratio'])}; partial sync {spread(r['partial'], 1000, '{:.1f}')} ms, CPU "
              f"{spread(r['partial_cpu'], 1000, '{:.1f}')} ms (n={len(r['partial'])}; kubelab's own CPU "
              f"{spread(r['partial_self_cpu'], 1000, '{:.1f}')} ms, its render "
              f"{spread(r['partial_render'], 1000, '{:.1f}')} ms; a one-rule restore alone "
              f"{spread(r['floor'], 1000, '{:.1f}')} ms, CPU {spread(r['floor_cpu'], 1000, '{:.1f}')} ms; without kernel "
              f"validation CPU {spread(r['noval_cpu'], 1000, '{:.1f}')} ms); RSS {spread(r['rss_mb'], fmt='{:.0f}')} MB, "
              f"peak {spread(r['hwm_mb'], fmt='{:.0f}')} MB (objects alone {spread(r['rss_objects_mb'], fmt='{:.0f}')} MB)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
