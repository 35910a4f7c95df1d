"""Unit tests of the userspace mode's pure parts: load balancer, relay flows,
UDP session table, rule rendering, options and the proxier's --dry-run text.

Addresses: 10.96.0.0/16 (cluster IPs), 10.244.0.0/16 (endpoints),
192.0.2.0/24 (external / load-balancer IPs, TEST-NET-1), 10.0.0.1 (node).
Nothing is sent anywhere: no sockets, no iptables.
"""

from __future__ import annotations

import io
import logging
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.userspace.loadbalancer import LoadBalancerRR, NoEndpointsError
from kubelab.modes.userspace.proxier import UserspaceConfigError, UserspaceOptions, UserspaceProxier, desired_ports
from kubelab.modes.userspace.relay import ENDPOINT_DIAL_TIMEOUTS, Flow, SessionTable, dial_timeouts
from kubelab.modes.userspace.rules import JUMPS, Listener, Portal, PortalTables, add_jumps, cleanup_text, portals_of, render_rules
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.provider import ModeDeps, SyncState

SVC = ServicePortName("default", "web", "http", "TCP")
EPS = ["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def no_shuffle(xs: list) -> None:
    xs.sort()


def make_lb(clock: Clock | None = None, **kw) -> LoadBalancerRR:
    return LoadBalancerRR(clock=clock or Clock(), shuffle=no_shuffle, **kw)


# -- load balancer ---------------------------------------------------------------


def test_round_robin_cycles_through_every_endpoint():
    lb = make_lb()
    lb.new_service(SVC)
    lb.set_endpoints(SVC, EPS)
    picks = [lb.next_endpoint(SVC, "10.0.0.9") for _ in range(6)]
    assert picks == EPS + EPS


def test_no_endpoints_raises_with_the_service_name():
    lb = make_lb()
    lb.new_service(SVC)
    with pytest.raises(NoEndpointsError, match="default/web:http"):
        lb.next_endpoint(SVC, "10.0.0.9")


@pytest.mark.parametrize(
    "ttl,advance,same",
    [(10, 5, True), (10, 10, False), (0, 10799, True), (0, 10800, False)],
    ids=["within-ttl", "ttl-expired", "default-ttl-within", "default-ttl-expired"],
)
def test_client_ip_affinity_holds_until_the_timeout(ttl, advance, same):
    clock = Clock()
    lb = make_lb(clock)
    lb.new_service(SVC, "ClientIP", ttl)
    lb.set_endpoints(SVC, EPS)
    first = lb.next_endpoint(SVC, "10.0.0.9")
    other = lb.next_endpoint(SVC, "10.0.0.8")
    assert other != first
    clock.now += advance
    again = lb.next_endpoint(SVC, "10.0.0.9")
    assert (again == first) is same


def test_affinity_reset_moves_the_client_on():
    lb = make_lb()
    lb.new_service(SVC, "ClientIP", 100)
    lb.set_endpoints(SVC, EPS)
    first = lb.next_endpoint(SVC, "10.0.0.9")
    second = lb.next_endpoint(SVC, "10.0.0.9", reset_affinity=True, exclude={first})
    assert second != first
    assert lb.affinity_of(SVC, "10.0.0.9") == second


def test_unchanged_endpoint_set_keeps_position_and_changed_set_drops_stale_affinity():
    lb = make_lb()
    lb.new_service(SVC, "ClientIP", 100)
    lb.set_endpoints(SVC, EPS)
    stuck = lb.next_endpoint(SVC, "10.0.0.9")
    assert lb.set_endpoints(SVC, list(reversed(EPS))) is False
    assert lb.affinity_of(SVC, "10.0.0.9") == stuck
    assert lb.set_endpoints(SVC, [e for e in EPS if e != stuck]) is True
    assert lb.affinity_of(SVC, "10.0.0.9") is None
    assert lb.next_endpoint(SVC, "10.0.0.9") != stuck


def test_quarantined_endpoint_is_tried_last_and_comes_back():
    clock = Clock()
    lb = make_lb(clock, quarantine_seconds=5)
    lb.new_service(SVC)
    lb.set_endpoints(SVC, EPS)
    lb.report_dial_failure(SVC, EPS[0])
    picks = {lb.next_endpoint(SVC, "c") for _ in range(10)}
    assert picks == set(EPS[1:])
    clock.now += 5
    picks = [lb.next_endpoint(SVC, "c") for _ in range(3)]
    assert sorted(picks) == sorted(EPS)


def test_all_quarantined_still_serves():
    lb = make_lb()
    lb.new_service(SVC)
    lb.set_endpoints(SVC, EPS[:1])
    lb.report_dial_failure(SVC, EPS[0])
    assert lb.next_endpoint(SVC, "c") == EPS[0]


def test_stale_sticky_sessions_are_cleaned():
    clock = Clock()
    lb = make_lb(clock)
    lb.new_service(SVC, "ClientIP", 10)
    lb.set_endpoints(SVC, EPS)
    lb.next_endpoint(SVC, "a")
    clock.now += 11
    lb.next_endpoint(SVC, "b")
    assert lb.cleanup_stale_sticky_sessions() == 1
    assert lb.affinity_of(SVC, "a") is None and lb.affinity_of(SVC, "b") is not None


# -- relay flow ------------------------------------------------------------------


def test_flow_half_close_sequence():
    f = Flow(100)
    assert f.want_read and not f.want_write
    f.read(60)
    assert f.want_write and f.want_read
    f.read(40)
    assert not f.want_read  # pipe full: backpressure on the source
    f.wrote(100)
    f.read(0)
    assert f.should_shutdown and not f.want_read
    f.shut()
    assert f.done and f.bytes == 100


def test_flow_fin_waits_for_the_pipe_to_drain():
    f = Flow(100)
    f.read(10)
    f.read(0)
    assert not f.should_shutdown
    with pytest.raises(ValueError, match="before the source finished"):
        f.shut()
    f.wrote(10)
    assert f.should_shutdown


@pytest.mark.parametrize(
    "ops,error",
    [([("read", 101)], "free"), ([("wrote", 1)], "holding 0"), ([("read", 0), ("read", 5)], "after end of file")],
    ids=["overfill", "write-empty", "read-after-eof"],
)
def test_flow_rejects_impossible_reports(ops, error):
    f = Flow(100)
    with pytest.raises(ValueError, match=error):
        for op, n in ops:
            getattr(f, op)(n)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 300)), max_size=60))
def test_flow_invariants(steps):
    f = Flow(256)
    sent = 0
    for kind, n in steps:
        if kind == "r" and f.want_read:
            n = min(n, f.room)
            f.read(n)
            sent += n
        elif kind == "w" and f.want_write:
            f.wrote(min(n, f.pending))
        if f.should_shutdown:
            f.shut()
        assert 0 <= f.pending <= f.capacity
        assert f.bytes + f.pending == sent
        assert not (f.done and f.pending)


def test_dial_timeouts_follow_kube_proxy():
    assert ENDPOINT_DIAL_TIMEOUTS == (0.25, 0.5, 1.0, 2.0)
    assert dial_timeouts(2) == (0.25, 0.5)
    assert dial_timeouts(6) == (0.25, 0.5, 1.0, 2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="at least 1"):
        dial_timeouts(0)


# -- UDP session table --------------------------------------------------------------


def test_session_table_idle_timeout_and_bound():
    clock = Clock()
    t: SessionTable[str, int] = SessionTable(2, 5.0, clock)
    assert t.add("a", 1) == []
    clock.now += 1
    t.add("b", 2)
    clock.now += 1
    assert t.get("a") == 1  # a is now the most recently used
    assert t.add("c", 3) == [("b", 2)]  # the least recently used makes room
    clock.now += 4.5
    t.touch("c")
    clock.now += 1
    assert t.expire() == [("a", 1)]
    assert "c" in t and len(t) == 1


def test_session_table_remove_if():
    t: SessionTable[str, str] = SessionTable(10, 5.0, Clock())
    for k, ep in [("a", "x"), ("b", "y"), ("c", "x")]:
        t.add(k, ep)
    assert sorted(t.remove_if(lambda ep: ep == "x")) == [("a", "x"), ("c", "x")]
    assert len(t) == 1


@pytest.mark.parametrize("size,timeout", [(0, 1.0), (1, 0.0)], ids=["size", "timeout"])
def test_session_table_rejects_bad_settings(size, timeout):
    with pytest.raises(ValueError):
        SessionTable(size, timeout, Clock())


# -- rules ---------------------------------------------------------------------------

WEB = ServicePort(
    cluster_ip="10.96.0.10", port=80, node_port=30080, external_ips=("192.0.2.10",), load_balancer_vips=("192.0.2.20",)
)


def test_portals_in_kube_proxy_order():
    assert portals_of(WEB) == [
        Portal("cluster", "10.96.0.10", 80),
        Portal("external", "192.0.2.10", 80),
        Portal("loadbalancer", "192.0.2.20", 80),
        Portal("nodeport", "", 30080),
    ]


def test_render_rules_layout():
    text = render_rules([(Listener(SVC, "TCP", 40001), portals_of(WEB))], "0.0.0.0", "10.0.0.1")
    assert text == (
        "*nat\n"
        ":KUBE-PORTALS-CONTAINER - [0:0]\n"
        ":KUBE-PORTALS-HOST - [0:0]\n"
        ":KUBE-NODEPORT-CONTAINER - [0:0]\n"
        ":KUBE-NODEPORT-HOST - [0:0]\n"
        '-A KUBE-PORTALS-CONTAINER -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 10.96.0.10/32 -j REDIRECT --to-ports 40001\n'
        '-A KUBE-PORTALS-CONTAINER -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 192.0.2.10/32 -j REDIRECT --to-ports 40001\n'
        '-A KUBE-PORTALS-CONTAINER -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 192.0.2.20/32 -j REDIRECT --to-ports 40001\n'
        '-A KUBE-PORTALS-HOST -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 10.96.0.10/32 -j DNAT --to-destination 10.0.0.1:40001\n'
        '-A KUBE-PORTALS-HOST -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 192.0.2.10/32 -j DNAT --to-destination 10.0.0.1:40001\n'
        '-A KUBE-PORTALS-HOST -m comment --comment "default/web:http" -p tcp -m tcp --dport 80 -d 192.0.2.20/32 -j DNAT --to-destination 10.0.0.1:40001\n'
        '-A KUBE-NODEPORT-CONTAINER -m comment --comment "default/web:http" -p tcp -m tcp --dport 30080 -j REDIRECT --to-ports 40001\n'
        '-A KUBE-NODEPORT-HOST -m comment --comment "default/web:http" -p tcp -m tcp --dport 30080 -j DNAT --to-destination 10.0.0.1:40001\n'
        "COMMIT\n"
        "*filter\n"
        ":KUBE-NODEPORT-NON-LOCAL - [0:0]\n"
        '-A KUBE-NODEPORT-NON-LOCAL -m comment --comment "default/web:http" -p tcp -m tcp --dport 40001 -m state --state NEW -j ACCEPT\n'
        "COMMIT\n"
    )


@pytest.mark.parametrize(
    "listen_ip,nodeport_ips,expect",
    [
        ("10.0.0.5", (), ["-j DNAT --to-destination 10.0.0.5:40001"]),
        ("0.0.0.0", ("10.0.0.1", "10.0.1.1"), ["--dport 30080 -d 10.0.0.1/32", "--dport 30080 -d 10.0.1.1/32"]),
    ],
    ids=["specific-bind-address-dnats", "nodeport-addresses"],
)
def test_render_rules_variants(listen_ip, nodeport_ips, expect):
    text = render_rules([(Listener(SVC, "UDP", 40001), portals_of(WEB))], listen_ip, "10.0.0.1", nodeport_ips)
    for e in expect:
        assert e in text
    assert "-p udp -m udp" in text
    if listen_ip != "0.0.0.0":
        assert "REDIRECT" not in text


def test_missing_jumps_are_added_in_the_same_transaction():
    text = add_jumps(render_rules([], "0.0.0.0", "10.0.0.1"), JUMPS)
    nat, filt = text.split("*filter")
    assert '-I PREROUTING 1 -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" -j KUBE-PORTALS-CONTAINER' in nat
    assert "-A OUTPUT -m addrtype --dst-type LOCAL -m comment" in nat
    assert "-I INPUT 1" in filt
    assert nat.index("-I PREROUTING") < nat.index("COMMIT")


def test_cleanup_text_deletes_jumps_before_chains():
    text = cleanup_text(JUMPS[:1])
    assert text.index("-D PREROUTING") < text.index("-X KUBE-PORTALS-CONTAINER")
    assert "-X KUBE-NODEPORT-NON-LOCAL" in text


class FakeIPTables:
    """Models what iptables holds: the jumps in built-in chains; records restore input."""

    BUILTIN = ("PREROUTING", "OUTPUT", "INPUT")

    def __init__(self, fail_restore: bool = False):
        self.jumps: set[tuple[str, str, tuple[str, ...]]] = set()
        self.restored: list[str] = []
        self.fail_restore = fail_restore

    def __call__(self, argv, input=None):
        if argv[0] == "iptables":
            _, _w, _t, table, op, chain, *spec = argv
            assert op == "-C"
            return (0 if (table, chain, tuple(spec)) in self.jumps else 1), "", ""
        if argv[0] == "iptables-restore":
            if self.fail_restore:
                return 2, "", "iptables-restore: line 3 failed"
            self.restored.append(input)
            table = ""
            for line in input.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                words = shlex.split(line)
                if words and words[0] in ("-I", "-A", "-D") and words[1] in self.BUILTIN:
                    spec = words[3:] if words[0] == "-I" else words[2:]
                    key = (table, words[1], tuple(spec))
                    if words[0] == "-D":
                        self.jumps.remove(key)
                    else:
                        self.jumps.add(key)
            return 0, "", ""
        if argv[0] == "ip":
            return 0, "2: eth0    inet 10.0.0.1/24 brd 10.0.0.255 scope global eth0\n", ""
        raise AssertionError(argv)


def test_portal_tables_adds_jumps_once_and_cleanup_removes_them():
    fake = FakeIPTables()
    tables = PortalTables("iptables", run=fake)
    tables.apply(render_rules([], "0.0.0.0", "10.0.0.1"))
    assert fake.restored[0].count("-I ") == 3 and fake.restored[0].count("-A ") == 2
    assert len(fake.jumps) == 5
    tables.apply(render_rules([], "0.0.0.0", "10.0.0.1"))
    assert "-I " not in fake.restored[1] and len(fake.jumps) == 5
    tables.cleanup()
    assert fake.jumps == set()
    assert fake.restored[2].count("-D ") == 5


def test_portal_tables_reports_restore_errors():
    with pytest.raises(RuntimeError, match="line 3 failed"):
        PortalTables("iptables", run=FakeIPTables(fail_restore=True)).apply("*nat\nCOMMIT\n")


# -- options and proxier ----------------------------------------------------------------


def deps(**cfg) -> ModeDeps:
    return ModeDeps(
        config=ProxyConfig(proxy_mode="userspace", **cfg),
        node=NodeInfo("node-a", ips=("10.0.0.1",)),
        logger=logging.getLogger("test"),
        run=FakeIPTables(),
        out=io.StringIO(),
    )


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"bind_address": "127.0.0.1"}, "cannot listen on loopback"),
        ({"bind_address": "not-an-ip"}, "is not an IP address"),
        ({"bind_address": "::"}, "IPv4 only"),
        ({"udp_idle_timeout": 0}, "--udp-timeout must be positive"),
        ({"userspace_max_connections": 0}, "--userspace-max-connections must be at least 1"),
        ({"userspace_connect_retries": 0}, "connect retries"),
    ],
    ids=["loopback", "garbage", "ipv6", "udp-timeout", "max-connections", "retries"],
)
def test_bad_options_say_what_to_fix(cfg, message):
    with pytest.raises(UserspaceConfigError, match=message):
        UserspaceOptions.from_deps(deps(**cfg))


@pytest.mark.parametrize(
    "argv,max_connections,udp_timeout",
    [([], 10000, 0.25), (["--userspace-max-connections", "50", "--udp-timeout", "2s"], 50, 2.0)],
    ids=["defaults", "flags"],
)
def test_kubelab_proxy_flags_reach_the_relay_options(argv, max_connections, udp_timeout):
    import argparse

    from kubelab.proxy import cli as proxy_cli

    parser = argparse.ArgumentParser()
    proxy_cli.add_arguments(parser)
    config = proxy_cli.build_config(parser.parse_args(["--proxy-mode", "userspace", *argv]))
    d = deps()
    d.config = config
    options = UserspaceOptions.from_deps(d).driver
    assert (options.max_connections, options.udp_idle_timeout) == (max_connections, udp_timeout)


def test_host_ip_skips_loopback_and_link_local():
    d = deps()
    d.node = NodeInfo("vm", ips=("127.0.0.1", "169.254.1.1", "fd00::2", "192.0.2.2"))
    assert UserspaceOptions.from_deps(d).host_ip == "192.0.2.2"


def state() -> SyncState:
    dns = ServicePortName("kube-system", "dns", "dns", "UDP")
    sctp = ServicePortName("default", "sctp", "", "SCTP")
    v6 = ServicePortName("default", "v6", "", "TCP")
    return SyncState(
        service_map={
            SVC: ServicePort("10.96.0.10", 80, node_port=30080, session_affinity="ClientIP", sticky_max_age_seconds=60),
            dns: ServicePort("10.96.0.53", 53, protocol="UDP"),
            sctp: ServicePort("10.96.0.30", 9, protocol="SCTP"),
            v6: ServicePort("fd00::1", 80),
        },
        endpoints_map={
            SVC: (Endpoint("10.244.1.1", 8080), Endpoint("10.244.1.2", 8080, ready=False, serving=False)),
            dns: (Endpoint("10.244.2.1", 5353),),
        },
        node=NodeInfo("node-a", ips=("10.0.0.1",)),
    )


def test_desired_ports_skip_what_userspace_cannot_relay():
    desired, skipped = desired_ports(state())
    assert sorted(str(n) for n in desired) == ["default/web:http", "kube-system/dns:dns"]
    assert desired[SVC].endpoints == ("10.244.1.1:8080",)  # the not-ready one is left out
    assert any("SCTP" in s for s in skipped) and any("IPv6" in s for s in skipped)


def test_render_for_dry_run_lists_listeners_and_rules():
    text = UserspaceProxier(deps()).render(state())
    assert "# listener default/web:http TCP 0.0.0.0:<random port> -> 10.244.1.1:8080, ClientIP affinity 60s" in text
    assert "# listener kube-system/dns:dns UDP" in text
    assert "# skipped default/sctp" in text
    assert '-A KUBE-PORTALS-CONTAINER -m comment --comment "kube-system/dns:dns" -p udp -m udp --dport 53 -d 10.96.0.53/32 -j REDIRECT --to-ports 0' in text
    assert "-A KUBE-NODEPORT-HOST" in text and "--dport 30080" in text


def test_failed_restore_keeps_listeners_and_says_why_then_recovers():
    """A sync whose iptables-restore fails raises (the controller retries) and keeps serving.

    Opens real listeners on 0.0.0.0 (random ports); sends nothing.
    """
    import asyncio

    async def body():
        d = deps()
        d.extra = {"iptables": "iptables"}
        fake = FakeIPTables(fail_restore=True)
        d.run = fake
        proxier = UserspaceProxier(d)
        await proxier.start()
        try:
            with pytest.raises(RuntimeError, match="iptables-restore --noflush failed .*line 3 failed"):
                await proxier.sync_proxy_rules(state())
            assert sorted(str(n) for n in proxier.ports) == ["default/web:http", "kube-system/dns:dns"]
            port = proxier.ports[SVC].port
            fake.fail_restore = False
            await proxier.sync_proxy_rules(state())
            assert proxier.ports[SVC].port == port  # the same listener, connections kept
            assert f"--to-ports {port}" in fake.restored[-1]
            # An unchanged partial sync writes nothing.
            n = len(fake.restored)
            await proxier.sync_proxy_rules(SyncState(**{**state().__dict__, "full_sync": False}))
            assert len(fake.restored) == n
        finally:
            await proxier.stop()

    asyncio.run(body())
