"""Labs for real: namespaces, veths, bridges, routes, workloads, endpoints, teardown.

Addresses (all inside the labs' own namespaces): pod CIDR 10.244.0.0/16
(10.244.0.0/24 node1, 10.244.1.0/24 node2), service CIDR 10.96.0.0/12,
underlay 172.18.0.0/24 (gateway .1, nodes .10/.11, client .254).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubelab.netlab.lab import Lab, LabError
from kubelab.netlab.spec import LabSpec, LabSpecError

from kubelab.netlab.testing import leftovers, unique_lab_name

ROOT = Path(__file__).resolve().parents[2]
BASIC = ROOT / "examples" / "labs" / "basic.yaml"

TWO_NODES = {"nodes": ["node1", "node2"], "proxyMode": "none"}


def deployment(name, replicas, ports, **template_meta):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, **template_meta},
                "spec": {"containers": [{"name": name, "ports": ports}]},
            },
        },
    }


SERVER_PORTS = [
    {"name": "http", "containerPort": 8080},
    {"name": "echo", "containerPort": 9000},
    {"name": "udp", "containerPort": 9001, "protocol": "UDP"},
    {"name": "stream", "containerPort": 9002},
]

HOSTNET_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "hostweb"},
    "spec": {"nodeName": "node2", "hostNetwork": True, "containers": [{"name": "w", "ports": [{"containerPort": 8080}]}]},
}


@pytest.fixture(scope="module")
def two_node_lab():
    """One two-node lab for the reachability table (module scope: built once)."""
    spec = LabSpec.from_dict(TWO_NODES, [deployment("srv", 4, SERVER_PORTS), HOSTNET_POD], name=unique_lab_name())
    lab = Lab.up(spec)
    try:
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name) == []


def _on(lab, node):
    return [k.split("/")[1] for k, p in sorted(lab.state()["pods"].items()) if p["node"] == node and not p["hostNetwork"]]


def test_pods_are_spread_with_ips_from_their_node_cidr(two_node_lab):
    lab = two_node_lab
    assert _on(lab, "node1") == ["srv-1", "srv-3"] and _on(lab, "node2") == ["srv-2", "srv-4"]
    assert lab.pod_ip("srv-1").startswith("10.244.0.") and lab.pod_ip("srv-2").startswith("10.244.1.")
    assert lab.pod_ip("hostweb") == lab.node_ip("node2") == "172.18.0.11"
    routes = lab.exec("srv-1", ["ip", "route"], check=True).stdout
    assert "default via 10.244.0.1 dev eth0" in routes
    node_routes = lab.exec("node1", ["ip", "route"], check=True).stdout
    assert "10.244.1.0/24 via 172.18.0.11 dev eth0" in node_routes
    sysctl = lab.exec("node1", ["sysctl", "-n", "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"], check=True)
    assert sysctl.stdout.split() == ["1", "1"]


# (client target, server pod or node, how, expect in output) -- clients are real tools.
REACH = [
    pytest.param("srv-1", "srv-2", "curl", id="pod-to-pod-across-nodes-http"),
    pytest.param("srv-1", "srv-3", "curl", id="pod-to-pod-same-node-http"),
    pytest.param("srv-2", "srv-1", "nc-tcp", id="pod-to-pod-across-nodes-tcp-echo"),
    pytest.param("srv-4", "srv-1", "nc-udp", id="pod-to-pod-across-nodes-udp-echo"),
    pytest.param("srv-3", "srv-4", "stream", id="pod-to-pod-long-lived-stream"),
    pytest.param("external", "hostweb", "curl", id="external-client-to-node-ip"),
    pytest.param("srv-1", "hostweb", "curl", id="pod-to-host-network-pod"),
    pytest.param("node2", "srv-1", "curl", id="node-to-pod-on-other-node"),
]


@pytest.mark.parametrize("src,dst,how", REACH)
def test_reachability(two_node_lab, src, dst, how):
    lab = two_node_lab
    ip = lab.pod_ip(dst)
    if how == "curl":
        r = lab.exec(src, ["curl", "-sS", "--max-time", "5", f"http://{ip}:8080/"], timeout=15)
        first = r.stdout
    elif how == "nc-tcp":
        r = lab.exec(src, ["sh", "-c", f"printf 'hello\\n' | nc -N -w 5 {ip} 9000"], timeout=15)
        assert r.stdout.splitlines()[1:] == ["hello"], r
        first = r.stdout
    elif how == "nc-udp":
        r = lab.exec(src, ["sh", "-c", f"printf 'ping\\n' | nc -u -w 2 {ip} 9001"], timeout=15)
        assert "ping" in r.stdout, r
        first = r.stdout
    else:  # stream: a few timed lines over one connection, then we hang up
        r = lab.exec(src, ["sh", "-c", f"nc -w 5 {ip} 9002 | head -n 4"], timeout=15)
        lines = r.stdout.splitlines()
        assert lines[1:] == [f"seq={i} pod={dst}" for i in (1, 2, 3)], r
        first = r.stdout
    assert r.returncode == 0, r
    # The server names itself and the source address it saw: no NAT between pods.
    src_ip = lab.address(src)
    assert src != "external" or src_ip == lab.client_ip
    assert first.startswith(f"pod={dst} client={src_ip}:"), first


def test_pod_readiness_and_terminating_endpoints(make_lab):
    dep = deployment("web", 3, [{"name": "http", "containerPort": 8080}])
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    unready = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "slow", "labels": {"app": "web"}, "annotations": {"kubelab.dev/ready": "false"}},
               "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]}}
    lab = make_lab(LabSpec.from_dict({"nodes": 2}, [dep, svc, unready], name=unique_lab_name()))

    def conditions():
        doc = json.loads((lab.manifests_dir / "endpointslices.json").read_text())
        out = {}
        for s in doc["items"]:
            if s["metadata"]["labels"]["kubernetes.io/service-name"] == "web":
                for ep in s["endpoints"]:
                    c = ep["conditions"]
                    out[ep["targetRef"]["name"]] = (c["ready"], c["serving"], c["terminating"])
        return out

    assert conditions() == {"web-1": (True, True, False), "web-2": (True, True, False),
                            "web-3": (True, True, False), "slow": (False, False, False)}
    # A pod on web-2's node talks to it, so that node's bridge and that pod
    # hold neighbour entries for web-2's IP (checked again once the IP is reused).
    node2 = lab.state()["pods"]["default/web-2"]["node"]
    old_ip = lab.pod_ip("web-2")
    peer = next(k for k, p in sorted(lab.state()["pods"].items()) if p["node"] == node2 and k != "default/web-2")
    for src in (peer, node2):
        r = lab.exec(src, ["curl", "-sS", "--max-time", "5", f"http://{old_ip}:8080/"])
        assert r.stdout.startswith("pod=web-2 "), r
    lab.delete("pod/web-2", grace=2)
    assert conditions()["web-2"] == (False, True, True)
    # Terminating pods still serve during their grace period.
    r = lab.exec("client", ["curl", "-sS", "--max-time", "5", f"http://{lab.pod_ip('web-1')}:8080/"])
    assert r.stdout.startswith("pod=web-1 "), r
    deadline = time.monotonic() + 30
    while "web-2" in conditions() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "web-2" not in conditions()
    assert "default/web-2" not in lab.state()["pods"]
    assert f"kl-{lab.name}.p.default.web-2" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout.split()
    # A new pod gets the freed IP; the node and the pod that knew the old one
    # reach the new one right away (not after their stale neighbour entries expire).
    lab.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reuse"},
                "spec": {"nodeName": node2, "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]}}])
    assert lab.pod_ip("reuse") == old_ip
    for src in (peer, node2):
        r = lab.exec(src, ["curl", "-sS", "--max-time", "5", f"http://{old_ip}:8080/"], timeout=15)
        assert r.stdout.startswith("pod=reuse "), (src, r)
    # One apply far over asyncio's 64 KiB line limit: 400 Services in one request.
    bulk = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"bulk-{i}", "namespace": "bulk",
             "labels": {"purpose": "a-request-larger-than-64KiB"}},
             "spec": {"selector": {"app": f"bulk-{i}"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
            for i in range(400)]
    assert len(json.dumps(bulk)) > 100_000
    result = lab.apply(bulk)
    assert len(result["services"]) == 400 and "bulk/bulk-399" in lab.state()["services"]
    # Scale via apply: a 4th replica appears with an IP and a server.
    lab.apply([deployment("web", 4, [{"name": "http", "containerPort": 8080}])])
    ip = lab.pod_ip("web-4")
    r = lab.exec("slow", ["curl", "-sS", "--max-time", "5", f"http://{ip}:8080/"])
    assert r.stdout.startswith("pod=web-4 "), r
    # Bad apply: rejected whole, nothing changed.
    before = lab.state()["pods"]
    with pytest.raises(LabSpecError, match="is not a lab node"):
        lab.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"nodeName": "node9"}}])
    assert lab.state()["pods"] == before


def test_failed_up_leaves_nothing(lab_name):
    # Two host-network pods on one node want the same port: the second
    # listener fails half-way through bringing the lab up.
    clash = [dict(HOSTNET_POD, metadata={"name": n}) for n in ("a", "b")]
    for pod in clash:
        pod["spec"] = dict(HOSTNET_POD["spec"], nodeName="node1")
    spec = LabSpec.from_dict(TWO_NODES, clash, name=lab_name)
    with pytest.raises(LabError, match="cannot listen on TCP 172.18.0.10:8080"):
        Lab.up(spec)
    assert leftovers(lab_name) == []


def test_bad_file_creates_nothing(tmp_path, lab_name):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"lab: {{name: {lab_name}, podCIDR: 10.96.0.0/16}}\n")
    r = subprocess.run([sys.executable, "-m", "kubelab", "lab", "up", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "overlaps podCIDR" in r.stderr and "nothing was changed" in r.stderr
    assert leftovers(lab_name) == []


def test_cli_up_exec_status_down(lab_name):
    kl = [sys.executable, "-m", "kubelab", "lab"]
    try:
        r = subprocess.run(kl + ["up", str(BASIC), "--name", lab_name, "--proxy-mode", "none"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "default/web-1" in r.stdout and "172.18.0.10" in r.stdout
        state = json.loads(subprocess.run(kl + ["status", lab_name, "--json"], capture_output=True, text=True, timeout=30).stdout)
        ip = state["pods"]["default/web-1"]["ip"]
        r = subprocess.run(kl + ["exec", lab_name, "external", "--", "curl", "-sS", "--max-time", "5", f"http://{ip}:8080/"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.startswith("pod=web-1 client=172.18.0.254:"), r
        # kubelet-style resolv.conf, read by glibc tools in the pod.
        r = subprocess.run(kl + ["exec", lab_name, "web-1", "--", "cat", "/etc/resolv.conf"], capture_output=True, text=True, timeout=30)
        assert r.stdout.splitlines() == ["search default.svc.cluster.local svc.cluster.local cluster.local",
                                         "nameserver 10.96.0.10", "options ndots:5"]
        r = subprocess.run(kl + ["delete", lab_name, "pod/web-3", "--now"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "pod/web-3 deleted" in r.stdout, r
        r = subprocess.run(kl + ["exec", lab_name, "nosuchpod", "--", "true"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "no pod, node, 'external' or 'underlay' named 'nosuchpod'" in r.stderr
    finally:
        r = subprocess.run(kl + ["down", lab_name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert leftovers(lab_name) == []


def test_dns_pod_answers_through_kubelet_resolv_conf_setup(make_lab):
    """`kubelab dns` runs as a pod behind kube-dns and answers for the lab's Services."""
    lab = make_lab(BASIC, proxyMode="none")
    dns_ip = lab.pod_ip("kube-system/kubelab-dns-1")
    deadline = time.monotonic() + 30
    while True:
        r = lab.exec("web-1", ["dig", "+short", "+time=1", "+tries=1", f"@{dns_ip}", "web.default.svc.cluster.local"])
        if r.returncode == 0 and r.stdout.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.stdout.strip() == lab.service_ip("default/web"), (r, (lab.logs_dir / "pod-kube-system.kubelab-dns-1.log").read_text()[-2000:])
