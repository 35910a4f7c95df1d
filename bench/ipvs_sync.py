#!/usr/bin/env python3
"""IPVS mode sync benchmarks inside one UML boot (the host kernel has no IPVS).

Figures, each the median of ``--rounds`` runs with min-max:

* ``ipvsadm -R``: restoring the 1,000 services x 2 endpoints (the peer),
  from the same ``ipvsadm -Sn`` text our dry run prints, into an empty table.
* ``full sync (cold)``: a new IPVSProxier's first sync of the same state on a
  clean kernel: sysctls, kube-ipvs0, ipsets, iptables, 1,000 addresses,
  3,000 IPVS objects.  Compared with ``ipvsadm -R`` as a ratio (target <= 1.0).
* ``full resync``: the same proxier's next full sync with nothing to change
  (what every --sync-period costs).
* ``partial sync``: one service among 1,000 gets a new endpoint set
  (target < 50 ms).

Run: ``python3 bench/ipvs_sync.py [--services 1000] [--rounds 5]`` (root).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(n: int, version: int = 0):
    """n services x 2 endpoints; ``version`` changes service 0's endpoints."""
    from tests.uml.ipvs_support import state, svc

    services = []
    for i in range(n):
        eps = [(f"10.244.{j}.{i % 250 + 1}", 8080) for j in range(2)]
        if i == 0 and version:
            eps = [(f"10.245.{version % 250}.{j + 1}", 8080) for j in range(2)]
        services.append(svc(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}", 80, eps))
    return services


def inside(n: int, rounds: int) -> dict:
    """Runs inside UML (via UMLKernel.call)."""
    import logging

    from kubelab.modes.ipvs import render as R
    from tests.uml.ipvs_support import Driver, state

    logging.getLogger("kl-ipvs-test").setLevel(logging.ERROR)
    services = build(n)
    full = state(*services)
    desired = R.render(full.service_map, full.endpoints_map, full.node, R.RenderConfig())
    restore_text = R.ipvsadm_save(desired.services)

    def clean():
        subprocess.run(["ipvsadm", "-C"], check=True)

    res: dict[str, list[float]] = {"ipvsadm_restore": [], "full_cold": [], "full_resync": [], "partial": []}
    for _ in range(rounds):
        clean()
        t = time.perf_counter()
        subprocess.run(["ipvsadm", "-R"], input=restore_text, text=True, check=True)
        res["ipvsadm_restore"].append(time.perf_counter() - t)
        clean()

        d = Driver(cluster_cidr=("10.244.0.0/16",))
        t = time.perf_counter()
        out = d.sync(full)
        res["full_cold"].append(time.perf_counter() - t)
        for phase, secs in out["timings"].items():
            res.setdefault(f"cold_{phase}", []).append(secs)
        count = subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True).stdout.count("\n")
        assert count == 3 * n, f"expected {3 * n} ipvsadm lines, got {count}"
        t = time.perf_counter()
        d.sync(full)
        res["full_resync"].append(time.perf_counter() - t)
        for v in range(1, 5):
            st = state(*build(n, v), full=False, updated=("default/s0",))
            t = time.perf_counter()
            d.sync(st)
            res["partial"].append(time.perf_counter() - t)
        assert "10.245.4.1:8080" in subprocess.run(["ipvsadm", "-Ln", "-t", "10.96.0.1:80"], capture_output=True, text=True).stdout
        d.cleanup()
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    from kubelab.netlab.uml import UMLKernel

    with UMLKernel(mem="1024M") as uml:
        res = uml.call("bench.ipvs_sync:inside", args.services, args.rounds, timeout=3600)

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:8.1f} ms  (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f}, n={len(xs)})"

    peer = statistics.median(res["ipvsadm_restore"])
    print(f"{args.services} services x 2 endpoints, inside UML 6.1 (python {sys.version.split()[0]})")
    print(f"ipvsadm -R (peer)        {fmt(res['ipvsadm_restore'])}")
    print(f"full sync, cold          {fmt(res['full_cold'])}   ratio vs ipvsadm -R {statistics.median(res['full_cold']) / peer:.2f}")
    print(f"full resync, no changes  {fmt(res['full_resync'])}   ratio vs ipvsadm -R {statistics.median(res['full_resync']) / peer:.2f}")
    print(f"partial sync, 1 service  {fmt(res['partial'])}")
    pairs = [c / p for c, p in zip(res["full_cold"], res["ipvsadm_restore"])]
    print(f"cold/peer, paired per round: median {statistics.median(pairs):.2f} (min {min(pairs):.2f}, max {max(pairs):.2f})")
    for key in sorted(k for k in res if k.startswith("cold_")):
        print(f"  {key:22s} {fmt(res[key])}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
