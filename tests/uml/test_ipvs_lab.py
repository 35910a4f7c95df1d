"""The ipvs proxy mode in a real two-node lab inside UML, judged by curl in lab pods and the external client.

One lab for the whole module (``kernel: uml``, ``proxyMode: ipvs``): the
lab daemon runs ``kubelab proxy --proxy-mode ipvs`` in each node namespace,
pods are network namespaces on a bridge per node, the external client sits
on the underlay.  This module boots its own UML kernel through the lab (it
does not use the shared ``uml`` fixture).

Addresses, all inside the UML kernel's namespaces: pod CIDR 10.244.0.0/16
(node1 10.244.0.0/24, node2 10.244.1.0/24), service CIDR 10.96.0.0/12
(allocated by the lab), underlay 172.18.0.0/24 (node1 .10, node2 .11,
external client .254), LoadBalancer ingress IPs 192.168.100.10-.12 (the
external client routes everything off the underlay via node1), a source
range nobody is in: 10.99.0.0/16.  Node ports 30000-32767 (lab-allocated),
healthCheckNodePort 32100.
"""

from __future__ import annotations

import json
import re

import pytest

from kubelab.netlab.lab import Lab
from kubelab.netlab.spec import LabSpec
from kubelab.netlab.testing import leftovers, unique_lab_name

LB_OPEN, LB_CLOSED, LB_LOCAL = "192.168.100.10", "192.168.100.11", "192.168.100.12"
HEALTH_PORT = 32100
WEB_PODS = ("web-1", "web-2", "web-3", "web-4")  # the lab places them node1, node2, node1, node2


def _lb_service(name: str, ip: str, selector: str, **spec) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "selector": {"app": selector},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec},
        "status": {"loadBalancer": {"ingress": [{"ip": ip}]}},
    }


MANIFESTS = [
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
     "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
              "template": {"metadata": {"labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]}}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    _lb_service("lb-open", LB_OPEN, "web", loadBalancerSourceRanges=["172.18.0.254/32"]),
    _lb_service("lb-closed", LB_CLOSED, "web", loadBalancerSourceRanges=["10.99.0.0/16"]),
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", "labels": {"app": "solo"}},
     "spec": {"nodeName": "node1", "containers": [{"name": "solo", "ports": [{"containerPort": 8080}]}]}},
    _lb_service("local", LB_LOCAL, "solo", externalTrafficPolicy="Local", healthCheckNodePort=HEALTH_PORT),
]

ANSWER = re.compile(r"^pod=(?P<pod>\S+) client=(?P<ip>[0-9.]+):\d+")


@pytest.fixture(scope="module")
def lab():
    spec = LabSpec.from_dict({"nodes": ["node1", "node2"], "proxyMode": "ipvs", "kernel": "uml"}, MANIFESTS,
                             name=unique_lab_name("ipvs"))
    lab = Lab.up(spec)
    try:
        lab.wait_synced(timeout=240)
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name) == []


def curl(lab, src: str, url: str, timeout: float = 5) -> tuple[str, str]:
    """(pod that answered, client address it saw); fails the test if the request did not succeed."""
    r = lab.exec(src, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 30)
    m = ANSWER.match(r.stdout)
    assert r.returncode == 0 and m, f"{src} -> {url}: rc={r.returncode} {r.stdout!r} {r.stderr!r}"
    return m["pod"], m["ip"]


def test_pods_are_spread_over_both_nodes(lab):
    nodes = {p: lab.status()["pods"][f"default/{p}"]["node"] for p in WEB_PODS}
    assert sorted(set(nodes.values())) == ["node1", "node2"], nodes


@pytest.mark.parametrize("src", ["web-1", "web-2", "external"], ids=["pod-on-node1", "pod-on-node2", "external-client"])
def test_clusterip_round_robin_exact(lab, src):
    """2 rounds of 4 connections: every pod exactly twice, in the same order both rounds (rr)."""
    url = f"http://{lab.service_ip('default/web')}/"
    seen = [curl(lab, src, url)[0] for _ in range(8)]
    assert sorted(seen) == sorted(WEB_PODS * 2), seen
    assert seen[:4] == seen[4:], seen


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_nodeport_from_external_client(lab, node):
    port = lab.node_port("default/web", port=80)
    url = f"http://{lab.node_ip(node)}:{port}/"
    seen = [curl(lab, "external", url) for _ in range(4)]
    assert sorted(p for p, _ in seen) == sorted(WEB_PODS), seen
    # externalTrafficPolicy Cluster: masqueraded, so no pod sees the external client's address.
    assert lab.client_ip not in {ip for _, ip in seen}, seen


@pytest.mark.parametrize("pod", ["web-1", "web-2"], ids=["node1", "node2"])
def test_hairpin_pod_reaches_itself_through_its_service(lab, pod):
    """rr visits every endpoint once per 4 connections, so one of them lands on the caller itself.

    That one is masqueraded (KUBE-LOOP-BACK) to the node's bridge address:
    a reply from the pod to its own address would never leave it.  The
    bridge port must be in hairpin mode, since the reply goes back out
    the port it came in on.
    """
    url = f"http://{lab.service_ip('default/web')}/"
    seen = [curl(lab, pod, url) for _ in range(4)]
    assert sorted(p for p, _ in seen) == sorted(WEB_PODS), seen
    own = [ip for p, ip in seen if p == pod]
    bridge_ip = re.sub(r"\.\d+$", ".1", lab.pod_ip(pod))
    assert own == [bridge_ip], seen
    assert all(ip == lab.pod_ip(pod) for p, ip in seen if p != pod), seen


def _drops(lab) -> int:
    out = lab.exec("node1", ["iptables-legacy", "-t", "filter", "-nvxL", "KUBE-SOURCE-RANGES-FIREWALL"], check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if " DROP " in f" {line} ")


def test_load_balancer_source_ranges(lab):
    before = _drops(lab)
    # In range: served, by every endpoint.
    seen = [curl(lab, "external", f"http://{LB_OPEN}/")[0] for _ in range(4)]
    assert sorted(seen) == sorted(WEB_PODS), seen
    # Out of range: the virtual server exists, the firewall drops the client's packets.
    vs = lab.exec("node1", ["ipvsadm", "-Ln", "-t", f"{LB_CLOSED}:80"], check=True).stdout
    assert vs.count("Masq") == 4, vs
    r = lab.exec("external", ["curl", "-sS", "--max-time", "3", f"http://{LB_CLOSED}/"], timeout=30)
    assert r.returncode != 0, f"a client outside loadBalancerSourceRanges got an answer: {r.stdout!r}"
    after = _drops(lab)
    assert after > before, (before, after, lab.exec("node1", ["iptables-legacy-save"]).stdout)
    # The same Service stays reachable on its ClusterIP.
    assert curl(lab, "web-1", f"http://{lab.service_ip('default/lb-closed')}/")[0] in WEB_PODS


def test_external_traffic_policy_local_keeps_client_ip(lab):
    pod, ip = curl(lab, "external", f"http://{LB_LOCAL}/")
    assert (pod, ip) == ("solo", lab.client_ip)


@pytest.mark.parametrize("node,code,count", [("node1", 200, 1), ("node2", 503, 0)], ids=["with-local-endpoint", "without"])
def test_health_check_node_port(lab, node, code, count):
    r = lab.exec("external", ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", f"http://{lab.node_ip(node)}:{HEALTH_PORT}/"],
                 timeout=30)
    assert r.returncode == 0, r
    body, _, status = r.stdout.rpartition("\n")
    assert int(status) == code, r.stdout
    doc = json.loads(body)
    assert doc["service"] == {"namespace": "default", "name": "local"}, doc
    assert doc["localEndpoints"] == count, doc


def test_proxies_programmed_ipvs_on_both_nodes(lab):
    """Every node has the same virtual servers for the ClusterIP (and the NodePort on its own addresses)."""
    cip = lab.service_ip("default/web")
    port = lab.node_port("default/web", port=80)
    for i, node in enumerate(("node1", "node2")):
        text = lab.exec(node, ["ipvsadm", "-Sn"], check=True).stdout
        assert f"-A -t {cip}:80 -s rr" in text, text
        assert f"-A -t {lab.node_ip(node)}:{port} -s rr" in text, text
        assert text.count(f"-a -t {cip}:80 -r ") == 4, text
