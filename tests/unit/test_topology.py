"""categorize_endpoints, table-driven, modelled on kube-proxy's topology_test.go.

Addresses: 10.1.2.0/24 and 10.0.0.0/24 (endpoint IPs; data only, no traffic).
"""

from __future__ import annotations

import pytest

from kubelab.model import Endpoint, NodeInfo, ServicePort
from kubelab.proxy.topology import categorize_endpoints, topology_mode_from_hints


def ep(addr: str, *, zones=(), nodes=(), ready=True, serving=None, terminating=False, local=False) -> Endpoint:
    ip, _, port = addr.partition(":")
    return Endpoint(
        ip=ip,
        port=int(port),
        is_local=local,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
    )


def svc(**kw) -> ServicePort:
    return ServicePort(cluster_ip="172.30.0.1", port=80, **kw)


NODE_A = NodeInfo(name="node-1", zone="zone-a")
ALL = None  # marker: all_reachable equals the only non-None list

CASES = [
    # (id, service, node, endpoints, cluster, local, all, has_any)
    (
        "zone hints for our zone filter cluster endpoints",
        svc(),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"]), ep("10.1.2.4:80", zones=["zone-b"]),
         ep("10.1.2.5:80", zones=["zone-c"]), ep("10.1.2.6:80", zones=["zone-a"])],
        {"10.1.2.3:80", "10.1.2.6:80"}, None, ALL, True,
    ),
    (
        "one endpoint without a hint disables topology",
        svc(),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"]), ep("10.1.2.4:80", zones=["zone-b"]),
         ep("10.1.2.5:80"), ep("10.1.2.6:80", zones=["zone-a"])],
        {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"}, None, ALL, True,
    ),
    (
        "node without zone label ignores hints",
        svc(),
        NodeInfo(name="node-1"),
        [ep("10.1.2.3:80", zones=["zone-a"])],
        {"10.1.2.3:80"}, None, ALL, True,
    ),
    (
        "node zone label from labels dict",
        svc(),
        NodeInfo(name="node-1", labels={"topology.kubernetes.io/zone": "zone-b"}),
        [ep("10.1.2.3:80", zones=["zone-a"]), ep("10.1.2.4:80", zones=["zone-b"])],
        {"10.1.2.4:80"}, None, ALL, True,
    ),
    (
        "no hint for our zone: no filtering",
        svc(),
        NodeInfo(name="node-1", zone="zone-b"),
        [ep("10.1.2.3:80", zones=["zone-a"])],
        {"10.1.2.3:80"}, None, ALL, True,
    ),
    (
        "unready endpoint in our zone is dropped",
        svc(),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"]), ep("10.1.2.4:80", zones=["zone-b"]),
         ep("10.1.2.6:80", zones=["zone-a"], ready=False)],
        {"10.1.2.3:80"}, None, ALL, True,
    ),
    (
        "only unready endpoints hinted for our zone: no filtering",
        svc(),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"], ready=False), ep("10.1.2.4:80", zones=["zone-b"]),
         ep("10.1.2.5:80", zones=["zone-c"]), ep("10.1.2.6:80", zones=["zone-a"], ready=False)],
        {"10.1.2.4:80", "10.1.2.5:80"}, None, ALL, True,
    ),
    (
        "multiple zone hints per endpoint",
        svc(),
        NodeInfo(name="node-1", zone="zone-c"),
        [ep("10.1.2.3:80", zones=["zone-a", "zone-b", "zone-c"]), ep("10.1.2.4:80", zones=["zone-b", "zone-c"]),
         ep("10.1.2.5:80", zones=["zone-b", "zone-d"]), ep("10.1.2.6:80", zones=["zone-c"])],
        {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, None, ALL, True,
    ),
    (
        "PreferSameNode: node hints win over zone hints",
        svc(traffic_distribution="PreferSameNode"),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"], nodes=["node-1"]), ep("10.1.2.4:80", zones=["zone-a"], nodes=["node-2"]),
         ep("10.1.2.5:80", zones=["zone-b"], nodes=["node-3"])],
        {"10.1.2.3:80"}, None, ALL, True,
    ),
    (
        "PreferSameNode: no hint for this node falls back to zone",
        svc(traffic_distribution="PreferSameNode"),
        NodeInfo(name="node-9", zone="zone-a"),
        [ep("10.1.2.3:80", zones=["zone-a"], nodes=["node-1"]), ep("10.1.2.4:80", zones=["zone-a"], nodes=["node-2"]),
         ep("10.1.2.5:80", zones=["zone-b"], nodes=["node-3"])],
        {"10.1.2.3:80", "10.1.2.4:80"}, None, ALL, True,
    ),
    (
        "externalTrafficPolicy Local: topology ignored for local endpoints",
        svc(external_policy_local=True, node_port=30080),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"], local=True), ep("10.1.2.4:80", zones=["zone-b"], local=True),
         ep("10.1.2.5:80", zones=["zone-c"]), ep("10.1.2.6:80", zones=["zone-a"])],
        {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
        {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, True,
    ),
    (
        "internalTrafficPolicy Local with a NodePort uses both",
        svc(internal_policy_local=True, node_port=30080),
        NODE_A,
        [ep("10.1.2.3:80", zones=["zone-a"], local=True), ep("10.1.2.4:80", zones=["zone-b"], local=True),
         ep("10.1.2.5:80", zones=["zone-c"]), ep("10.1.2.6:80", zones=["zone-a"])],
        {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
        {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, True,
    ),
    (
        "externalTrafficPolicy Local on a ClusterIP-only port is ignored",
        svc(external_policy_local=True),
        NODE_A,
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        {"10.0.0.0:80", "10.0.0.1:80"}, None, ALL, True,
    ),
    (
        "internalTrafficPolicy Local, no endpoints",
        svc(internal_policy_local=True),
        NODE_A,
        [],
        None, None, set(), False,
    ),
    (
        "internalTrafficPolicy Local, all endpoints remote",
        svc(internal_policy_local=True),
        NODE_A,
        [ep("10.0.0.0:80"), ep("10.0.0.1:80")],
        None, set(), set(), True,
    ),
    (
        "internalTrafficPolicy Local, all endpoints local",
        svc(internal_policy_local=True),
        NODE_A,
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80", local=True)],
        None, {"10.0.0.0:80", "10.0.0.1:80"}, ALL, True,
    ),
    (
        "internalTrafficPolicy Local, some local",
        svc(internal_policy_local=True),
        NODE_A,
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        None, {"10.0.0.0:80"}, ALL, True,
    ),
    (
        "Cluster policy: only ready endpoints",
        svc(),
        NODE_A,
        [ep("10.0.0.0:80"), ep("10.0.0.1:80", ready=False, serving=False)],
        {"10.0.0.0:80"}, None, ALL, True,
    ),
    (
        "Cluster policy: no ready endpoints, fall back to serving+terminating",
        svc(),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=True),
         ep("10.0.0.1:80", ready=False, serving=False, terminating=True),
         ep("10.0.0.2:80", ready=False, serving=False)],
        {"10.0.0.0:80"}, None, ALL, True,
    ),
    (
        "Cluster policy: a ready endpoint means no terminating fallback",
        svc(),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=True), ep("10.0.0.1:80")],
        {"10.0.0.1:80"}, None, ALL, True,
    ),
    (
        "Cluster policy: nothing usable",
        svc(),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=False, terminating=True), ep("10.0.0.1:80", ready=False, serving=False)],
        set(), None, ALL, False,
    ),
    (
        "externalTrafficPolicy Local: local terminating fallback, remote ready",
        svc(external_policy_local=True, node_port=30080),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=True, local=True),
         ep("10.0.0.1:80", ready=False, serving=False, terminating=True, local=True),
         ep("10.0.0.2:80"), ep("10.0.0.3:80", ready=False, serving=False)],
        {"10.0.0.2:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.2:80"}, True,
    ),
    (
        "externalTrafficPolicy Local: only remote terminating endpoints",
        svc(external_policy_local=True, node_port=30080),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=True),
         ep("10.0.0.1:80", ready=False, serving=False, terminating=True, local=True)],
        {"10.0.0.0:80"}, set(), {"10.0.0.0:80"}, True,
    ),
    (
        "internalTrafficPolicy Local: only remote serving+terminating still counts as some",
        svc(internal_policy_local=True),
        NODE_A,
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=True)],
        None, set(), set(), True,
    ),
    (
        "conflicting topology and localness merge all_reachable",
        svc(external_policy_local=True, node_port=30080),
        NODE_A,
        [ep("10.0.0.0:80", zones=["zone-a"], local=True), ep("10.0.0.1:80", zones=["zone-b"], local=True),
         ep("10.0.0.2:80", zones=["zone-a"]), ep("10.0.0.3:80", zones=["zone-b"])],
        {"10.0.0.0:80", "10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.1:80"},
        {"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"}, True,
    ),
]


def _strs(eps) -> set[str] | None:
    return None if eps is None else {str(e) for e in eps}


@pytest.mark.parametrize(
    "service,node,endpoints,cluster,local,all_,has_any", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_categorize_endpoints(service, node, endpoints, cluster, local, all_, has_any):
    got = categorize_endpoints(endpoints, service, node)
    assert _strs(got.cluster_endpoints) == cluster
    assert _strs(got.local_endpoints) == local
    if all_ is ALL:
        all_ = cluster if local is None else local
    assert _strs(got.all_reachable_endpoints) == all_
    assert got.has_any_endpoints is has_any


def test_node_hints_ignored_without_feature_gate():
    eps = [ep("10.1.2.3:80", zones=["zone-a"], nodes=["node-1"]), ep("10.1.2.4:80", zones=["zone-a"], nodes=["node-2"])]
    on = categorize_endpoints(eps, svc(), NODE_A)
    off = categorize_endpoints(eps, svc(), NODE_A, prefer_same_node=False)
    assert _strs(on.cluster_endpoints) == {"10.1.2.3:80"}
    assert _strs(off.cluster_endpoints) == {"10.1.2.3:80", "10.1.2.4:80"}


@pytest.mark.parametrize(
    "endpoints,zone,mode",
    [
        ([ep("10.0.0.1:80", zones=["a"])], "a", "PreferSameZone"),
        ([ep("10.0.0.1:80", zones=["a"], nodes=["node-1"])], "a", "PreferSameNode"),
        ([ep("10.0.0.1:80", zones=["a"]), ep("10.0.0.2:80", ready=False)], "a", "PreferSameZone"),
        ([ep("10.0.0.1:80", zones=["a"], ready=False)], "a", ""),
        ([ep("10.0.0.1:80", zones=["b"])], "a", ""),
        ([ep("10.0.0.1:80", zones=["a"]), ep("10.0.0.2:80")], "a", ""),
    ],
    ids=["zone", "node", "unready-unhinted-ignored", "no-ready", "other-zone", "one-unhinted"],
)
def test_topology_mode_from_hints(endpoints, zone, mode):
    assert topology_mode_from_hints(svc(), endpoints, "node-1", zone) == mode


def test_order_follows_input():
    eps = [ep("10.0.0.9:80", local=True, zones=["zone-b"]), ep("10.0.0.1:80", zones=["zone-a"]),
           ep("10.0.0.5:80", zones=["zone-a"])]
    got = categorize_endpoints(eps, svc(external_policy_local=True, node_port=30080), NODE_A)
    assert [str(e) for e in got.all_reachable_endpoints] == ["10.0.0.9:80", "10.0.0.1:80", "10.0.0.5:80"]
