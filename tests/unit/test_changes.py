"""Change trackers, EndpointSliceCache and the service / endpoints maps.

Addresses: 172.30.0.0/16 and fd00:30::/64 (cluster IPs), 10.244.0.0/16 and
fd00:244::/64 (endpoints), 192.0.2.0/24 and 203.0.113.0/24 (external / LB IPs).
Data only: no traffic.
"""

from __future__ import annotations

import dataclasses

import pytest

from kubelab.model import (
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    LoadBalancerIngress,
    ObjectMeta,
    Origin,
    Service,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from kubelab.proxy.changes import (
    EndpointsChangeTracker,
    EndpointsMap,
    ServiceChangeTracker,
    ServicePortMap,
    parse_trigger_time,
    service_to_service_map,
)


def make_svc(name="web", ns="default", **kw) -> Service:
    labels = kw.pop("labels", {})
    annotations = kw.pop("annotations", {})
    kw.setdefault("cluster_ips", ("172.30.0.10",))
    kw.setdefault("ports", (ServicePortSpec(port=80, name="http", target_port=8080),))
    return Service(meta=ObjectMeta(name=name, namespace=ns, labels=labels, annotations=annotations), **kw)


def make_slice(name="web-abc", service="web", ns="default", endpoints=(), ports=None, **kw) -> EndpointSlice:
    annotations = kw.pop("annotations", {})
    labels = {"kubernetes.io/service-name": service, **kw.pop("labels", {})}
    if ports is None:
        ports = (EndpointPort(port=8080, name="http"),)
    return EndpointSlice(
        meta=ObjectMeta(name=name, namespace=ns, labels=labels, annotations=annotations),
        service_name=service,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
        **kw,
    )


def sep(ip, node=None, ready=None, serving=None, terminating=None, zones=(), nodes=(), zone=None) -> SliceEndpoint:
    return SliceEndpoint(
        addresses=(ip,),
        conditions=EndpointConditions(ready=ready, serving=serving, terminating=terminating),
        node_name=node,
        zone=zone,
        hints_for_zones=tuple(zones),
        hints_for_nodes=tuple(nodes),
    )


HTTP = ServicePortName("default", "web", "http", "TCP")


# ---------------------------------------------------------------- service_to_service_map


SKIPPED = [
    ("headless", make_svc(cluster_ips=("None",))),
    ("no-cluster-ip", make_svc(cluster_ips=())),
    ("external-name", make_svc(type="ExternalName", cluster_ips=(), external_name="example.com")),
    ("proxy-name-label", make_svc(labels={"service.kubernetes.io/service-proxy-name": "other"})),
    ("headless-label", make_svc(labels={"service.kubernetes.io/headless": ""})),
    ("ipv6-only-for-v4-tracker", make_svc(cluster_ips=("fd00:30::10",))),
]


@pytest.mark.parametrize("svc", [s for _, s in SKIPPED], ids=[i for i, _ in SKIPPED])
def test_skipped_services_have_no_ports(svc):
    assert service_to_service_map(svc) == {}


def test_none_is_empty():
    assert service_to_service_map(None) == {}


FIELDS = [
    # (id, service kwargs, field, expected)
    ("cluster-ip", {}, "cluster_ip", "172.30.0.10"),
    ("port", {}, "port", 80),
    ("target-port", {}, "target_port", 8080),
    ("node-port", {"type": "NodePort", "ports": (ServicePortSpec(80, name="http", node_port=30080),)}, "node_port", 30080),
    ("affinity-none-no-sticky", {}, "sticky_max_age_seconds", 0),
    ("affinity-clientip", {"session_affinity": "ClientIP", "session_affinity_timeout": 600}, "sticky_max_age_seconds", 600),
    ("affinity-clientip-default", {"session_affinity": "ClientIP"}, "sticky_max_age_seconds", 10800),
    ("external-ips-family-filtered", {"external_ips": ("192.0.2.1", "2001:db8::1")}, "external_ips", ("192.0.2.1",)),
    (
        "lb-vips-skip-proxy-mode",
        {
            "type": "LoadBalancer",
            "load_balancer_ingress": (
                LoadBalancerIngress(ip="203.0.113.1"),
                LoadBalancerIngress(ip="203.0.113.2", ip_mode="VIP"),
                LoadBalancerIngress(ip="203.0.113.3", ip_mode="Proxy"),
                LoadBalancerIngress(hostname="lb.example.com"),
            ),
        },
        "load_balancer_vips",
        ("203.0.113.1", "203.0.113.2"),
    ),
    (
        "source-ranges-trimmed",
        {"type": "LoadBalancer", "load_balancer_source_ranges": (" 192.0.2.0/24 ", "2001:db8::/64")},
        "load_balancer_source_ranges",
        ("192.0.2.0/24",),
    ),
    ("etp-local-nodeport", {"type": "NodePort", "external_traffic_policy": "Local"}, "external_policy_local", True),
    ("etp-local-clusterip-ignored", {"external_traffic_policy": "Local"}, "external_policy_local", False),
    (
        "etp-local-clusterip-with-external-ips",
        {"external_traffic_policy": "Local", "external_ips": ("192.0.2.1",)},
        "external_policy_local",
        True,
    ),
    ("itp-local", {"internal_traffic_policy": "Local"}, "internal_policy_local", True),
    (
        "hcnp-lb-local",
        {"type": "LoadBalancer", "external_traffic_policy": "Local", "health_check_node_port": 32000},
        "health_check_node_port",
        32000,
    ),
    (
        "hcnp-ignored-for-cluster-policy",
        {"type": "LoadBalancer", "health_check_node_port": 32000},
        "health_check_node_port",
        0,
    ),
    (
        "hcnp-ignored-for-nodeport",
        {"type": "NodePort", "external_traffic_policy": "Local", "health_check_node_port": 32000},
        "health_check_node_port",
        0,
    ),
    ("traffic-distribution", {"traffic_distribution": "PreferClose"}, "traffic_distribution", "PreferClose"),
    ("topology-mode", {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}}, "hints_annotation", "Auto"),
    (
        "topology-aware-hints-old-annotation",
        {"annotations": {"service.kubernetes.io/topology-aware-hints": "auto"}},
        "hints_annotation",
        "auto",
    ),
    (
        "annotations-without-kubectl",
        {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "x.io/y": "z"}},
        "annotations",
        {"x.io/y": "z"},
    ),
]


@pytest.mark.parametrize("kw,field,expected", [f[1:] for f in FIELDS], ids=[f[0] for f in FIELDS])
def test_service_port_fields(kw, field, expected):
    (info,) = service_to_service_map(make_svc(**kw)).values()
    assert getattr(info, field) == expected


def test_one_entry_per_port_named_and_protocol():
    svc = make_svc(ports=(ServicePortSpec(53, "UDP", "dns"), ServicePortSpec(53, "TCP", "dns-tcp"), ServicePortSpec(9153)))
    assert sorted(service_to_service_map(svc)) == sorted(
        [
            ServicePortName("default", "web", "dns", "UDP"),
            ServicePortName("default", "web", "dns-tcp", "TCP"),
            ServicePortName("default", "web", "", "TCP"),
        ]
    )


def test_ipv6_tracker_uses_ipv6_cluster_ip():
    svc = make_svc(cluster_ips=("172.30.0.10", "fd00:30::10"), external_ips=("192.0.2.1", "2001:db8::1"))
    (info,) = service_to_service_map(svc, ip_family=6).values()
    assert (info.cluster_ip, info.external_ips) == ("fd00:30::10", ("2001:db8::1",))


# ---------------------------------------------------------------- ServiceChangeTracker


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self, n=1):
        self.value += n

    def set(self, v):
        self.value = v


class FakeMetrics:
    """Models the four change metrics the trackers touch."""

    def __init__(self):
        self.service_changes_total = Counter()
        self.service_changes_pending = Counter()
        self.endpoint_changes_total = Counter()
        self.endpoint_changes_pending = Counter()


def test_service_add_update_delete_results():
    m = FakeMetrics()
    tracker, smap = ServiceChangeTracker(metrics=m), ServicePortMap()
    svc = make_svc()
    assert tracker.update(None, svc)
    assert m.service_changes_pending.value == 1
    result = smap.update(tracker)
    assert result.updated_services == {"default/web"}
    assert set(smap) == {HTTP}
    assert m.service_changes_pending.value == 0

    # Updating a port's name deletes the old ServicePortName, adds the new.
    svc2 = dataclasses.replace(svc, ports=(ServicePortSpec(80, name="web"),))
    tracker.update(svc, svc2)
    smap.update(tracker)
    assert set(smap) == {ServicePortName("default", "web", "web", "TCP")}

    tracker.update(svc2, None)
    result = smap.update(tracker)
    assert len(smap) == 0 and result.updated_services == {"default/web"}
    assert m.service_changes_total.value == 3


def test_noop_changes_are_dropped():
    tracker = ServiceChangeTracker()
    svc = make_svc()
    smap = ServicePortMap()
    tracker.update(None, svc)
    smap.update(tracker)
    # Same spec from another file line / resourceVersion-less re-read: no change.
    moved = dataclasses.replace(svc, meta=dataclasses.replace(svc.meta, origin=Origin("other.yaml", 9)))
    assert not tracker.update(svc, moved)
    # Changed then changed back before the sync: nets out.
    changed = dataclasses.replace(svc, cluster_ips=("172.30.0.11",))
    assert tracker.update(svc, changed)
    assert not tracker.update(changed, svc)
    assert tracker.pending() == 0
    # Add then delete before any sync: nothing at all.
    other = make_svc(name="db")
    tracker.update(None, other)
    tracker.update(other, None)
    assert smap.update(tracker).updated_services == frozenset()


def test_first_previous_kept_across_updates():
    tracker, smap = ServiceChangeTracker(), ServicePortMap()
    a = make_svc(ports=(ServicePortSpec(53, "UDP", "dns"),))
    tracker.update(None, a)
    smap.update(tracker)
    b = make_svc(ports=(ServicePortSpec(5353, "UDP", "dns"),))
    c = make_svc(ports=(ServicePortSpec(80, "TCP", "http"),))
    tracker.update(a, b)
    tracker.update(b, c)
    result = smap.update(tracker)
    assert set(smap) == {HTTP}
    # The UDP port went away: its cluster IP needs a conntrack flush.
    assert result.deleted_udp_cluster_ips == {"172.30.0.10"}


def test_udp_port_updated_not_reported_deleted():
    tracker, smap = ServiceChangeTracker(), ServicePortMap()
    a = make_svc(ports=(ServicePortSpec(53, "UDP", "dns"),))
    tracker.update(None, a)
    smap.update(tracker)
    tracker.update(a, dataclasses.replace(a, ports=(ServicePortSpec(54, "UDP", "dns"),)))
    assert smap.update(tracker).deleted_udp_cluster_ips == frozenset()


def test_gaining_proxy_name_label_deletes():
    tracker, smap = ServiceChangeTracker(), ServicePortMap()
    a = make_svc()
    tracker.update(None, a)
    smap.update(tracker)
    b = make_svc(labels={"service.kubernetes.io/service-proxy-name": "cilium"})
    tracker.update(a, b)
    smap.update(tracker)
    assert len(smap) == 0


def test_snapshot_is_immutable_and_detached():
    tracker, smap = ServiceChangeTracker(), ServicePortMap()
    tracker.update(None, make_svc())
    smap.update(tracker)
    snap = smap.snapshot()
    with pytest.raises(TypeError):
        snap[HTTP] = None  # type: ignore[index]
    tracker.update(make_svc(), None)
    smap.update(tracker)
    assert HTTP in snap and HTTP not in smap


def test_health_check_node_ports():
    tracker, smap = ServiceChangeTracker(), ServicePortMap()
    tracker.update(None, make_svc(type="LoadBalancer", external_traffic_policy="Local", health_check_node_port=32000))
    tracker.update(None, make_svc(name="db"))
    smap.update(tracker)
    assert smap.health_check_node_ports() == {"default/web": 32000}


# ---------------------------------------------------------------- endpoints


def apply(tracker, emap, *slices, remove=False):
    for s in slices:
        tracker.endpoint_slice_update(s, remove)
    return emap.update(tracker)


def test_endpoint_conditions_and_locality():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s = make_slice(
        endpoints=[
            sep("10.244.1.5", node="node-1", zone="zone-a", zones=["zone-a"], nodes=["node-1"]),
            sep("10.244.2.5", node="node-2", ready=False, serving=True, terminating=True),
            sep("10.244.3.5", ready=False, serving=None),
        ]
    )
    apply(tracker, emap, s)
    a, b, c = emap[HTTP]
    assert (str(a), a.is_local, a.ready, a.zone, a.zone_hints, a.node_hints) == (
        "10.244.1.5:8080", True, True, "zone-a", {"zone-a"}, {"node-1"}
    )
    assert (b.is_local, b.ready, b.serving, b.terminating) == (False, False, True, True)
    # kube-proxy reads a missing serving condition as true, even when not ready.
    assert (c.ready, c.serving, c.terminating, c.node_name) == (False, True, False, "")


def test_node_hints_dropped_without_feature_gate():
    tracker, emap = EndpointsChangeTracker("node-1", prefer_same_node=False), EndpointsMap()
    apply(tracker, emap, make_slice(endpoints=[sep("10.244.1.5", nodes=["node-1"])]))
    assert emap[HTTP][0].node_hints == frozenset()


def test_slices_merge_sorted_and_deduped():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s1 = make_slice("web-1", endpoints=[sep("10.244.1.10"), sep("10.244.1.2")])
    s2 = make_slice("web-2", endpoints=[sep("10.244.1.3"), sep("10.244.1.2", ready=False, terminating=True)])
    apply(tracker, emap, s1, s2)
    # Sorted as kube-proxy sorts: by the "ip:port" string.
    assert [str(e) for e in emap[HTTP]] == ["10.244.1.10:8080", "10.244.1.2:8080", "10.244.1.3:8080"]
    # The duplicate resolves to the non-terminating copy whichever slice it is in.
    assert next(e for e in emap[HTTP] if e.ip == "10.244.1.2").ready


def test_dedupe_prefers_non_terminating_regardless_of_order():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s1 = make_slice("a", endpoints=[sep("10.244.1.2", ready=False, terminating=True, serving=True)])
    s2 = make_slice("b", endpoints=[sep("10.244.1.2")])
    apply(tracker, emap, s2, s1)
    (e,) = emap[HTTP]
    assert e.ready and not e.terminating


def test_endpoint_moving_between_slices_does_not_flap():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s1 = make_slice("web-1", endpoints=[sep("10.244.1.1"), sep("10.244.1.2")])
    s2 = make_slice("web-2", endpoints=[sep("10.244.1.3")])
    apply(tracker, emap, s1, s2)
    # 10.244.1.2 moves from web-1 to web-2: the new web-2 arrives first.
    s2b = make_slice("web-2", endpoints=[sep("10.244.1.2"), sep("10.244.1.3")])
    apply(tracker, emap, s2b)
    assert len(emap[HTTP]) == 3
    s1b = make_slice("web-1", endpoints=[sep("10.244.1.1")])
    result = apply(tracker, emap, s1b)
    assert len(emap[HTTP]) == 3
    assert result.updated_services == frozenset()  # nothing net changed


def test_ports_by_name_and_protocol():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s = make_slice(
        endpoints=[sep("10.244.1.1")],
        ports=[EndpointPort(53, "UDP", "dns"), EndpointPort(53, "TCP", "dns-tcp"), EndpointPort(None, "TCP", "bad")],
    )
    apply(tracker, emap, s)
    assert set(emap) == {ServicePortName("default", "web", "dns", "UDP"), ServicePortName("default", "web", "dns-tcp", "TCP")}


IGNORED_SLICES = [
    ("fqdn", make_slice(address_type="FQDN", endpoints=[sep("example.com")])),
    ("ipv6-in-v4-tracker", make_slice(address_type="IPv6", endpoints=[sep("fd00:244::1")])),
    ("no-service-name", make_slice(service="", endpoints=[sep("10.244.1.1")])),
]


@pytest.mark.parametrize("slice_", [s for _, s in IGNORED_SLICES], ids=[i for i, _ in IGNORED_SLICES])
def test_ignored_slices(slice_):
    tracker = EndpointsChangeTracker("node-1")
    assert tracker.endpoint_slice_update(slice_) is False
    assert tracker.pending() == 0


def test_ipv6_tracker():
    tracker, emap = EndpointsChangeTracker("node-1", ip_family=6), EndpointsMap()
    apply(tracker, emap, make_slice(address_type="IPv6", endpoints=[sep("fd00:244::0001")]))
    assert str(emap[HTTP][0]) == "[fd00:244::1]:8080"


def test_no_op_slice_update_and_delete_of_unknown():
    m = FakeMetrics()
    tracker, emap = EndpointsChangeTracker("node-1", metrics=m), EndpointsMap()
    s = make_slice(endpoints=[sep("10.244.1.1")])
    assert tracker.endpoint_slice_update(s)
    emap.update(tracker)
    assert not tracker.endpoint_slice_update(s)  # same as applied
    assert not tracker.endpoint_slice_update(make_slice("ghost"), True)  # never seen
    assert m.endpoint_changes_total.value == 3 and m.endpoint_changes_pending.value == 0


def test_slice_delete_removes_service_ports():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s = make_slice(endpoints=[sep("10.244.1.1")])
    apply(tracker, emap, s)
    result = apply(tracker, emap, s, remove=True)
    assert len(emap) == 0 and result.updated_services == {"default/web"}


UDP_DNS = ServicePortName("kube-system", "dns", "dns", "UDP")


def _dns_slice(*eps):
    return make_slice("dns-1", "dns", "kube-system", endpoints=eps, ports=[EndpointPort(53, "UDP", "dns")])


STALE = [
    # (id, before endpoints, after endpoints, deleted udp eps, newly active)
    ("endpoint-removed", [sep("10.244.1.1"), sep("10.244.1.2")], [sep("10.244.1.1")], {"10.244.1.2:53"}, False),
    ("went-not-ready", [sep("10.244.1.1")], [sep("10.244.1.1", ready=False)], {"10.244.1.1:53"}, False),
    ("unready-removed-no-stale", [sep("10.244.1.1"), sep("10.244.1.2", ready=False)], [sep("10.244.1.1")], set(), False),
    ("zero-to-one-ready", [sep("10.244.1.1", ready=False)], [sep("10.244.1.1")], set(), True),
    ("first-endpoint", [], [sep("10.244.1.1")], set(), True),
    ("unchanged-ready", [sep("10.244.1.1")], [sep("10.244.1.1"), sep("10.244.1.2")], set(), False),
]


@pytest.mark.parametrize("before,after,deleted,newly", [s[1:] for s in STALE], ids=[s[0] for s in STALE])
def test_stale_udp_detection(before, after, deleted, newly):
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    if before:
        apply(tracker, emap, _dns_slice(*before))
    result = apply(tracker, emap, _dns_slice(*after))
    assert {str(ep) for name, ep in result.deleted_udp_endpoints if name == UDP_DNS} == deleted
    assert (UDP_DNS in result.newly_active_udp_services) is newly


def test_tcp_never_reported_stale():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    apply(tracker, emap, make_slice(endpoints=[sep("10.244.1.1")]))
    result = apply(tracker, emap, make_slice(endpoints=[]))
    assert result.deleted_udp_endpoints == () and result.newly_active_udp_services == frozenset()


def test_trigger_times():
    clock = iter([1_700_000_000.0]).__next__
    tracker, emap = EndpointsChangeTracker("node-1", clock=clock), EndpointsMap()
    ann = {"endpoints.kubernetes.io/last-change-trigger-time": "2023-11-14T22:13:21.5Z"}  # after start
    old = {"endpoints.kubernetes.io/last-change-trigger-time": "2020-01-01T00:00:00Z"}  # before start
    tracker.endpoint_slice_update(make_slice("a", endpoints=[sep("10.244.1.1")], annotations=ann))
    tracker.endpoint_slice_update(make_slice("b", service="db", endpoints=[sep("10.244.1.2")], annotations=old))
    result = emap.update(tracker)
    assert result.last_change_trigger_times == {"default/web": [pytest.approx(1700000001.5)]}
    assert emap.update(tracker).last_change_trigger_times == {}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20.123456789Z", 1700000000.123456),
        ("2023-11-14T23:13:20+01:00", 1700000000.0),
        ("yesterday", None),
        ("2023-11-14T22:13:20", None),
        ("", None),
    ],
    ids=["utc", "nanos", "offset", "garbage", "no-zone", "empty"],
)
def test_parse_trigger_time(text, expected):
    got = parse_trigger_time(text)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_local_ready_endpoints_counts_ips():
    tracker, emap = EndpointsChangeTracker("node-1"), EndpointsMap()
    s = make_slice(
        endpoints=[sep("10.244.1.1", node="node-1"), sep("10.244.1.2", node="node-1", ready=False, terminating=True),
                   sep("10.244.2.1", node="node-2")],
        ports=[EndpointPort(80, "TCP", "http"), EndpointPort(443, "TCP", "https")],
    )
    apply(tracker, emap, s)
    assert emap.local_ready_endpoints() == {"default/web": 1}
    assert emap.endpoint_count() == 6


@pytest.mark.parametrize("seed", range(6))
def test_incremental_counts_and_snapshots_match_recomputation(seed):
    """Random add/update/delete sequences: the maps' incremental bookkeeping equals a recount."""
    import random

    rng = random.Random(seed)
    st, et = ServiceChangeTracker(), EndpointsChangeTracker("node-1")
    smap, emap = ServicePortMap(), EndpointsMap()
    svcs: dict[str, object] = {}
    slices: dict[str, object] = {}
    for step in range(200):
        name = f"s{rng.randrange(8)}"
        nports = rng.randrange(0, 3)
        ports = tuple(ServicePortSpec(80 + i, rng.choice(["TCP", "UDP"]), f"p{i}") for i in range(nports))
        if rng.random() < 0.5:
            new = make_svc(name, ports=ports) if rng.random() < 0.8 else None
            st.update(svcs.get(name), new)
            if new is None:
                svcs.pop(name, None)
            else:
                svcs[name] = new
        else:
            sname = f"{name}-{rng.randrange(2)}"
            new = make_slice(sname, name, endpoints=[sep(f"10.244.{rng.randrange(3)}.{i}") for i in range(rng.randrange(4))],
                             ports=[EndpointPort(8080 + i, "TCP", f"p{i}") for i in range(nports)])
            if rng.random() < 0.2 and sname in slices:
                et.endpoint_slice_update(slices.pop(sname), True)
            else:
                et.endpoint_slice_update(new)
                slices[sname] = new
        if step % rng.choice([1, 3, 7]) == 0:
            before = smap.snapshot()
            smap.update(st)
            emap.update(et)
            assert smap.service_count() == len({n.namespaced_name for n in smap})
            assert emap.endpoint_count() == sum(len(v) for v in emap.values())
            assert dict(smap.snapshot()) == dict(smap) and dict(emap.snapshot()) == dict(emap)
            assert smap.snapshot() is smap.snapshot()  # cached while unchanged
            assert before is not None
