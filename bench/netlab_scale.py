"""How long a large lab takes to come up and go down (issue 3's target: 3 nodes,
300 pods, 1000 Services up < 60 s, down < 20 s on 2 cores).

    python3 bench/netlab_scale.py [--nodes 3 --pods 300 --services 1000 --mode none --runs 3]
    python3 bench/netlab_scale.py --mode none,iptables --runs 3   # paired, alternating
    python3 bench/netlab_scale.py --mode peer-ip,none --runs 3    # against the peer: ip(8) in a shell script

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


def peer_script(nodes: int, pods: int, lab: str) -> tuple[str, str]:
    """The peer: the same namespaces, veths, bridges, addresses and routes made the usual way, an ip(8)
    command each, as a shell script (no workloads, endpoints or manifests).  Returns (up, down) scripts."""
    u = f"kl-{lab}.u"
    up = [f"ip netns add {u}", f"ip -n {u} link set lo up", f"ip -n {u} link add ul0 type bridge",
          f"ip -n {u} addr add 172.18.0.1/24 dev ul0", f"ip -n {u} link set ul0 up"]
    names = [u]
    for i in range(nodes):
        n = f"kl-{lab}.n.node{i + 1}"
        names.append(n)
        up += [f"ip netns add {n}", f"ip -n {n} link set lo up",
               f"ip -n {u} link add n{i} type veth peer name eth0 netns {n}",
               f"ip -n {u} link set n{i} master ul0 up", f"ip -n {n} addr add 172.18.0.{10 + i}/24 dev eth0",
               f"ip -n {n} link set eth0 up", f"ip -n {n} route add default via 172.18.0.1",
               f"ip -n {n} link add cbr0 type bridge", f"ip -n {n} addr add 10.244.{i}.1/24 dev cbr0",
               f"ip -n {n} link set cbr0 up", f"ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1",
               f"ip -n {u} route add 10.244.{i}.0/24 via 172.18.0.{10 + i}"]
    for j in range(pods):
        i = j % nodes
        n, p = f"kl-{lab}.n.node{i + 1}", f"kl-{lab}.p.default.p{j}"
        names.append(p)
        up += [f"ip netns add {p}", f"ip -n {p} link set lo up",
               f"ip -n {n} link add vp{j} type veth peer name eth0 netns {p}",
               f"ip -n {n} link set vp{j} master cbr0 up", f"ip -n {p} addr add 10.244.{i}.{2 + j // nodes}/24 dev eth0",
               f"ip -n {p} link set eth0 up", f"ip -n {p} route add default via 10.244.{i}.1"]
    down = [f"ip netns del {name}" for name in reversed(names)]
    return "set -e\n" + "\n".join(up) + "\n", "\n".join(down) + "\n"


def peer_run(args, name: str) -> tuple[float, float, float]:
    """Time the peer script up and down (the last pod reaching its node checks it)."""
    import subprocess

    from kubelab.netlab import topology

    up, down = peer_script(args.nodes, args.pods, name)
    t0 = time.monotonic()
    try:
        subprocess.run(["sh"], input=up, text=True, check=True)
        t_up = time.monotonic() - t0
        last = args.pods - 1
        # Nothing listens there: "connection refused" (curl exit 7) is the node answering.
        r = subprocess.run(["ip", "netns", "exec", f"kl-{name}.p.default.p{last}", "curl", "-s", "--max-time", "5",
                            f"http://10.244.{last % args.nodes}.1:9/"], capture_output=True)
        assert r.returncode == 7, r
        t1 = time.monotonic()
        subprocess.run(["sh"], input=down, text=True, check=True)
        return t_up, t_up, time.monotonic() - t1
    finally:
        topology.teardown(name)  # whatever a failed run left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pods", type=int, default=300)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--mode", default="none",
                    help="proxyMode of the lab (none: topology + workloads + endpoints only); "
                         "several, comma-separated (none,iptables), alternate within each run so they share the load; "
                         "peer-ip: the same topology made by a shell script of ip(8) commands (the peer)")
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
            if mode == "peer-ip":
                up, ready, down = peer_run(args, f"bench-peer-{run}")
            else:
                up, ready, down = one_run(args, mode, docs, f"bench-scale-{run}")
            results[mode].append((up, ready, down))
            extra = f" (daemon ready {ready:.2f}s, then the proxies' first sync)" if mode not in ("none", "peer-ip") else ""
            print(f"run {run + 1} mode {mode}: up {up:.2f}s{extra} down {down:.2f}s", flush=True)

    def fmt(xs):
        return f"median {statistics.median(xs):.2f}s (min {min(xs):.2f}, max {max(xs):.2f})"

    for mode, rs in results.items():
        print(f"{args.nodes} nodes, {args.pods} pods, {args.services} services, mode {mode}, {args.runs} runs")
        print(f"  up:   {fmt([r[0] for r in rs])}")
        if mode not in ("none", "peer-ip"):
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
