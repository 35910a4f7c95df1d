"""How long a large lab takes to come up and go down (issue 3's target: 3 nodes,
300 pods, 1000 Services up < 60 s, down < 20 s on 2 cores).

    python3 bench/netlab_scale.py [--nodes 3 --pods 300 --services 1000 --mode none --runs 3]

Each pod runs the built-in servers on two ports (TCP 8080, UDP 9001); Services
select groups of 3 pods.  Prints median and spread of `Lab.up` and `Lab.down`
wall time, plus a check that a pod on the last node answers.  Needs root.
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pods", type=int, default=300)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--mode", default="none", help="proxyMode of the lab (none: topology + workloads + endpoints only)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ups, downs = [], []
    docs = manifests(args.pods, args.services)
    for run in range(args.runs):
        t0 = time.monotonic()
        spec = LabSpec.from_dict({"nodes": args.nodes, "proxyMode": args.mode}, docs, name=f"bench-scale-{run}")
        lab = Lab.up(spec)
        try:
            topo = time.monotonic() - t0
            if args.mode != "none":
                lab.wait_synced(timeout=600)
            ups.append(time.monotonic() - t0)
            last = f"p{args.pods - 1}"
            r = lab.exec("client", ["curl", "-s", "--max-time", "5", f"http://{lab.pod_ip(last)}:8080/"])
            assert r.stdout.startswith(f"pod={last} "), r
            if args.mode != "none":
                # Through the proxy too: the last Service's cluster IP from a pod.
                ip = lab.service_ip(f"default/s{args.services - 1}")
                r = lab.exec("p0", ["curl", "-s", "--max-time", "5", f"http://{ip}/"])
                assert r.stdout.startswith("pod=p"), r
        finally:
            t1 = time.monotonic()
            lab.down()
        downs.append(time.monotonic() - t1)
        extra = f" (daemon ready {topo:.2f}s, then proxies synced)" if args.mode != "none" else ""
        print(f"run {run + 1}: up {ups[-1]:.2f}s{extra} down {downs[-1]:.2f}s", flush=True)

    def fmt(xs):
        return f"median {statistics.median(xs):.2f}s (min {min(xs):.2f}, max {max(xs):.2f})"

    print(f"{args.nodes} nodes, {args.pods} pods, {args.services} services, mode {args.mode}, {args.runs} runs")
    print(f"up:   {fmt(ups)}")
    print(f"down: {fmt(downs)}")


if __name__ == "__main__":
    main()
