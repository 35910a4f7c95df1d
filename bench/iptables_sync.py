#!/usr/bin/env python3
"""Benchmark: kubelab's iptables mode vs iptables-restore alone, in a throwaway network namespace.

For N services x E endpoints (default 10,000 x 5) and each backend (nft, legacy):

* full sync: IPTablesProxier.sync_proxy_rules on a fresh namespace (jump
  rules + iptables-save + render + one restore), against iptables-restore
  alone loading the very same text into another fresh namespace -- ratio;
* partial sync after one service's endpoints change (median of --repeat);
* resident memory (RSS) of this process after the full sync.

Run as root:  python3 bench/iptables_sync.py [--services 10000] [--endpoints 5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kubelab.model import NodeInfo  # noqa: E402
from kubelab.modes.iptables.proxier import IPTablesProxier  # noqa: E402
from kubelab.modes.iptables.testing import StateBuilder, make_service, make_slice  # noqa: E402
from kubelab.proxy.config import ProxyConfig  # noqa: E402
from kubelab.proxy.kernel.exec import Runner  # noqa: E402
from kubelab.proxy.provider import ModeDeps  # noqa: E402


def netns(name: str) -> str:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(n: int, e: int) -> StateBuilder:
    b = StateBuilder(NodeInfo(name="bench-node", ips=("192.168.0.2",)))
    objs = []
    for i in range(n):
        ip = f"172.30.{i // 250}.{i % 250 + 1}"
        objs.append(make_service(f"ns{i % 100}", f"svc{i}", ip, [("http", 80, "TCP")]))
        objs.append(make_slice(f"ns{i % 100}", f"svc{i}", [f"10.{(i * e + j) // 65536 % 256}.{(i * e + j) // 256 % 256}.{(i * e + j) % 256}" for j in range(e)], [("http", 8080, "TCP")]))
    b.add(*objs)
    return b


def run_backend(backend: str, n: int, e: int, repeat: int) -> dict:
    tag = f"kl-ipt-bench-{os.getpid()}"
    a, c = netns(f"{tag}-a"), netns(f"{tag}-c")
    try:
        b = build(n, e)
        state = b.state(full_sync=True)
        deps = ModeDeps(config=ProxyConfig(cluster_cidr=("10.0.0.0/8",)), node=state.node,
                        logger=logging.getLogger("bench"), run=Runner(a), extra={"iptables_backend": backend})
        p = IPTablesProxier(deps)
        t0 = time.perf_counter()
        asyncio.run(p.sync_proxy_rules(state))
        full = time.perf_counter() - t0
        timings = dict(p.stats.timings)
        text = p.stats.last_text
        rss = rss_mb()
        # iptables-restore alone, same text, fresh namespace.
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", c, f"iptables-{backend}-restore", "-w", "5", "--noflush", "--counters"],
                       input=text, text=True, check=True)
        alone = time.perf_counter() - t0
        partial = []
        for r in range(repeat):
            i = r % n
            b.add(make_slice(f"ns{i % 100}", f"svc{i}", [f"10.200.{r}.{j}" for j in range(e)], [("http", 8080, "TCP")]))
            st = b.state()
            t0 = time.perf_counter()
            asyncio.run(p.sync_proxy_rules(st))
            partial.append(time.perf_counter() - t0)
        return {"backend": backend, "full": full, "alone": alone, "ratio": full / alone, "timings": timings,
                "partial_median": statistics.median(partial), "partial_all": partial, "rss_mb": rss,
                "lines": text.count("\n")}
    finally:
        for ns in (a, c):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", action="append", choices=["nft", "legacy"])
    args = ap.parse_args()
    for backend in args.backend or ["nft", "legacy"]:
        r = run_backend(backend, args.services, args.endpoints, args.repeat)
        t = r["timings"]
        print(f"{backend}: {args.services}x{args.endpoints} ({r['lines']} lines) full sync {r['full']:.2f}s "
              f"(jumps {t['jumps']:.2f} save {t['save']:.2f} render {t['render']:.2f} restore {t['restore']:.2f}) "
              f"vs iptables-restore alone {r['alone']:.2f}s -> ratio {r['ratio']:.2f}; "
              f"partial sync median {r['partial_median'] * 1000:.0f} ms "
              f"({', '.join(f'{x * 1000:.0f}' for x in r['partial_all'])}); max RSS {r['rss_mb']:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
