"""How long a large lab takes to come up and go down (issue 3's target: 3 nodes,
300 pods, 1000 Services up < 60 s, down < 20 s on 2 cores).

    python3 bench/netlab_scale.py [--nodes 3 --pods 300 --services 1000 --mode none --runs 3]
    python3 bench/netlab_scale.py --mode none,iptables --runs 3   # paired, alternating

Each pod runs the built-in servers on two ports (TCP 8080, UDP 9001); Services
select groups of 3 pods.  Prints median and spread of `Lab.up` and `Lab.down`
wall time, plus a check that a pod on the last node answers.  Needs root.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time

from kubelab.netlab.lab import Lab
from kubelab.netlab.spec import LabSpec


def manifests(pods: int, services: int) -> list[dict]:
    docs = []
    for i in range(pods):
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p{i}", "labels": {"group": f"g{i // 3}"}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"name": "udp", "containerPort": 9001, "protocol": "UDP"}]}]},
        })
    groups = max(1, pods // 3)
    for i in range(services):
        docs.append({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}"},
            "spec": {"selector": {"group": f"g{i % groups}"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        })
    return docs


def one_run(args, mode: str, docs: list[dict], name: str) -> tuple[float, float, float]:
    """Bring one lab up (and, with a proxy mode, wait for every proxy's first sync), check it serves, tear it down.

    Returns (up, daemon ready, down) wall-clock seconds; "daemon ready" is
    when `Lab.up` returned (topology, pods, endpoints, manifests written,
    proxies started), "up" adds the proxies' first sync.
    """
    t0 = time.monotonic()
    spec = LabSpec.from_dict({"nodes": args.nodes, "proxyMode": mode}, docs, name=name)
    lab = Lab.up(spec)
    try:
        ready = time.monotonic() - t0
        if mode != "none":
            lab.wait_synced(timeout=600)
        up = time.monotonic() - t0
        last = f"p{args.pods - 1}"
        r = lab.exec("client", ["curl", "-s", "--max-time", "5", f"http://{lab.pod_ip(last)}:8080/"])
        assert r.stdout.startswith(f"pod={last} "), r
        if mode != "none":
            # Through the proxy too: the last Service's cluster IP, from a pod.
            ip = lab.service_ip(f"default/s{args.services - 1}")
            r = lab.exec("p0", ["curl", "-s", "--max-time", "5", f"http://{ip}/"])
            assert r.stdout.startswith("pod=p"), r
    finally:
        t1 = time.monotonic()
        lab.down()
    return up, ready, time.monotonic() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pods", type=int, default=300)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--mode", default="none",
                    help="proxyMode of the lab (none: topology + workloads + endpoints only); "
                         "several, comma-separated (none,iptables), alternate within each run so they share the load")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    # A background job of a non-interactive shell ignores SIGINT, and SIGTERM
    # would end Python without its finally blocks: both exit cleanly (the lab goes down).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    docs = manifests(args.pods, args.services)
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for run in range(args.runs):
        for mode in modes:
            up, ready, down = one_run(args, mode, docs, f"bench-scale-{run}")
            results[mode].append((up, ready, down))
            extra = f" (daemon ready {ready:.2f}s, then the proxies' first sync)" if mode != "none" else ""
            print(f"run {run + 1} mode {mode}: up {up:.2f}s{extra} down {down:.2f}s", flush=True)

    def fmt(xs):
        return f"median {statistics.median(xs):.2f}s (min {min(xs):.2f}, max {max(xs):.2f})"

    for mode, rs in results.items():
        print(f"{args.nodes} nodes, {args.pods} pods, {args.services} services, mode {mode}, {args.runs} runs")
        print(f"  up:   {fmt([r[0] for r in rs])}")
        if mode != "none":
            print(f"  daemon ready: {fmt([r[1] for r in rs])}")
        print(f"  down: {fmt([r[2] for r in rs])}")
    if len(modes) > 1:
        base = modes[0]
        for mode in modes[1:]:
            ratios = [a[0] / b[0] for a, b in zip(results[mode], results[base])]
            print(f"up time {mode} / {base}, paired per run: median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
