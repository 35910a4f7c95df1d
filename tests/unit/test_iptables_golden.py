"""Golden tests: kubelab's iptables-restore text against kube-proxy's expected output.

Inputs are those of kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go:
TestOverallIPTablesRules, TestSyncProxyRulesRepeated, TestBadIPs,
TestSyncProxyRulesLargeClusterMode, TestDropInvalidRule, TestMasqueradeRule),
restated as kubelab model objects; outputs are compared after the same
normalisation kube-proxy's assertIPTablesRulesEqual applies (sortIPTablesRules).
The proxier runs against an in-memory model of the tables (FakeIPTables).

Addresses (kube-proxy's test conventions): pods 10.0.0.0/8 (endpoints
10.180.0.0/16, 10.0.x.y), cluster IPs 172.30.0.0/16, node 192.168.0.2,
external IPs 192.168.99.0/24, LB IPs 1.2.3.4 and 5.6.7.8, clients
203.0.113.0/24 (source range 203.0.113.0/25).  No packets are sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import textwrap
from dataclasses import replace

import pytest

from kubelab.model import NodeInfo
from kubelab.modes.iptables import chains as C
from kubelab.modes.iptables.proxier import IPTablesProxier, SyncError
from kubelab.modes.iptables.testing import FakeIPTables, StateBuilder, ep, make_service, make_slice
from kubelab.modes.iptables.tracer import FakeTables, check_rule_jumps, parse_dump, sort_rules
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.metrics import ProxyMetrics
from kubelab.proxy.provider import ModeDeps

NODE = NodeInfo(name="test-hostname", ips=("192.168.0.2",))


class FakeSysctl:
    def __init__(self, values=None):
        self.values = dict(values or {})

    def get(self, name):
        return self.values.get(name, 0)

    def set(self, name, value):
        self.values[name] = value

    def ensure(self, name, value):
        changed = self.values.get(name) != value
        self.values[name] = value
        return changed


class FakeConntrack:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("clear_"):
            return lambda *a: self.calls.append((name, *a)) or 0
        raise AttributeError(name)


def fake_proxier(nfacct=True, **config):
    """kube-proxy's NewFakeProxier: pod CIDR 10.0.0.0/8, mark 0x4000, localhost NodePorts, nfacct counters."""
    ipt = FakeIPTables()
    metrics = ProxyMetrics()
    cfg = ProxyConfig(cluster_cidr=("10.0.0.0/8",), **config)
    deps = ModeDeps(
        config=cfg,
        node=NODE,
        logger=logging.getLogger("test"),
        metrics=metrics,
        extra={"iptables": ipt, "sysctl": FakeSysctl(), "conntrack": FakeConntrack(), "keep_last_text": True},
    )
    p = IPTablesProxier(deps)
    counters = frozenset({C.NFACCT_CT_STATE_INVALID_DROPPED, C.NFACCT_LOCALHOST_NODEPORT_ACCEPTED}) if nfacct else frozenset()
    p.render_config = replace(p.render_config, masquerade_mark="0x4000", nfacct_counters=counters, random_fully=False)
    return p, ipt, metrics


def sync(p, state):
    asyncio.run(p.sync_proxy_rules(state))
    return p.stats.last_text


def assert_rules_equal(expected: str, result: str, consistent: bool = True) -> None:
    expected = textwrap.dedent(expected).lstrip("\n")
    got = sort_rules(result)
    assert got == expected, "rules differ:\n" + got
    if consistent:
        assert check_rule_jumps(expected) == []


def kube_chains(tables: FakeTables) -> str:
    """Our chains in a model of the kernel's tables, normalised as kube-proxy's tests do (sortIPTablesRules)."""
    lines = []
    for name in ("filter", "nat"):
        t = tables.dump.table(name)
        chains = [c for c in t.chains if c.name.startswith("KUBE-") and c.name != C.KUBE_PROXY_CANARY and c.name != C.KUBE_FIREWALL]
        lines += [f"*{name}", *(f":{c.name} - [0:0]" for c in chains)]
        for c in chains:
            raws = [r.raw for r in c.rules]
            if c.name in TOP_LEVEL:
                # Each rule of a top-level chain matches its own service address/port, so
                # their order carries no meaning (partial syncs append or insert at the top);
                # only the nodeports jump must stay last, which sorting keeps.
                raws.sort(key=lambda r: ("must be the last rule" in r, r))
            lines += raws
        lines.append("COMMIT")
    return sort_rules("\n".join(lines) + "\n")


TOP_LEVEL = {C.KUBE_SERVICES, C.KUBE_NODEPORTS, C.KUBE_EXTERNAL_SERVICES, C.KUBE_PROXY_FIREWALL}


def kube_rule_count(tables: FakeTables, table: str) -> int:
    t = tables.dump.table(table)
    return sum(len(c.rules) for c in t.chains if c.name.startswith("KUBE-") and c.name != C.KUBE_PROXY_CANARY)


def count_rules(text: str, table: str) -> int:
    t = parse_dump(text).table(table)
    return sum(len(c.rules) for c in t.chains)


OVERALL_EXPECTED = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"""


def overall_objects():
    return (
        make_service("ns1", "svc1", "172.30.0.41"),
        make_service(
            "ns2", "svc2", "172.30.0.42", [("p80", 80, "TCP", 3001)], type="LoadBalancer", etp="Local",
            lb_ips=["1.2.3.4"], external_ips=["192.168.99.22"], health_check_node_port=30000,
        ),
        make_service("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP", 3003)], type="NodePort"),
        make_service("ns4", "svc4", "172.30.0.44", [("p80", 80, "TCP", 0, 80)], type="NodePort", external_ips=["192.168.99.33"]),
        make_service(
            "ns5", "svc5", "172.30.0.45", [("p80", 80, "TCP", 3002)], type="LoadBalancer", lb_ips=["5.6.7.8"],
            health_check_node_port=30000, source_ranges=[" 203.0.113.0/25"], affinity_timeout=10800,
        ),
        make_service("ns6", "svc6", "172.30.0.46", [("p80", 80, "TCP", 0, 80)]),
        make_slice("ns1", "svc1", ["10.180.0.1"]),
        # No NodeName: non-local, so the Local-policy service has no local endpoints.
        make_slice("ns2", "svc2", ["10.180.0.2"]),
        make_slice("ns3", "svc3", ["10.180.0.3"]),
        make_slice("ns4", "svc4", ["10.180.0.4", ep("10.180.0.5", "test-hostname")]),
        make_slice("ns5", "svc5", ["10.180.0.3"]),
    )


def test_overall_iptables_rules():
    p, ipt, metrics = fake_proxier()
    text = sync(p, StateBuilder(NODE).add(*overall_objects()).state(full_sync=True))
    assert_rules_equal(OVERALL_EXPECTED, text)
    assert metrics.value("kubeproxy_sync_proxy_rules_iptables_total", {"table": "nat"}) == count_rules(text, "nat")
    assert metrics.value("kubeproxy_sync_proxy_rules_iptables_total", {"table": "filter"}) == count_rules(text, "filter")


def test_render_for_dry_run_matches_sync():
    p, _, _ = fake_proxier()
    state = StateBuilder(NODE).add(*overall_objects()).state(full_sync=True)
    assert_rules_equal(OVERALL_EXPECTED, p.render(state))


FILTER_COMMON = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
{extra}-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
"""
NAT_FIXED = """\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
"""
SVC1_TOP = '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n'
SVC2_TOP = '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 -j KUBE-SVC-2VJB64SDSIJUP5T6\n'
SVC3_TOP = '-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK\n'
SVC4_TOP = '-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK\n'
NODEPORTS_TAIL = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n'


def expected(chains: str, top: str, rules: str, deletes: str = "", filter_extra: str = "") -> str:
    return FILTER_COMMON.format(extra=filter_extra).lstrip("\n") + chains + top + NODEPORTS_TAIL + NAT_FIXED + rules + deletes + "COMMIT\n"


def test_sync_proxy_rules_repeated():
    """kube-proxy's TestSyncProxyRulesRepeated: what each sync leaves in the kernel, metrics, and failure recovery.

    The full sync's text is kube-proxy's, exactly.  kube-proxy's partial syncs
    rewrite the top-level chains in full; ours only add and delete the rules
    that changed.  So after every partial sync the test applies kube-proxy's
    expected restore text to a second model of the tables (``kp``) and checks
    that ours hold the same rules, and that our text declared no top-level chain.
    """
    p, ipt, metrics = fake_proxier()
    kp = FakeTables()

    def partial_matches(exp, text):
        kp.restore(textwrap.dedent(exp).lstrip("\n"))
        assert not re.search(r"^:KUBE-(SERVICES|NODEPORTS|EXTERNAL-SERVICES|POSTROUTING|MARK-MASQ|FORWARD)\b", text, re.M), text
        assert kube_chains(ipt.tables) == kube_chains(kp), "kernel state differs from kube-proxy's:\n" + text
        # The metric counts what the kernel holds.
        assert nat_total() == kube_rule_count(ipt.tables, "nat")
    b = StateBuilder(NODE)
    svc2 = make_service("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")])
    b.add(
        make_service("ns1", "svc1", "172.30.0.41"),
        svc2,
        make_slice("ns1", "svc1", ["10.0.1.1"]),
        make_slice("ns2", "svc2", ["10.0.2.1"], [("p8080", 8080, "TCP")]),
    )
    nat_total = lambda: metrics.value("kubeproxy_sync_proxy_rules_iptables_total", {"table": "nat"})  # noqa: E731
    nat_last = lambda: metrics.value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat"})  # noqa: E731

    text = sync(p, b.state(full_sync=True))
    exp0 = expected(
        ":KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]\n:KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]\n"
        ":KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n",
        SVC1_TOP + SVC2_TOP,
        "-A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80\n"
        "-A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -s 10.0.2.1 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -m tcp -p tcp -j DNAT --to-destination 10.0.2.1:8080\n"
        '-A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 -> 10.0.2.1:8080" -j KUBE-SEP-UHEGFW77JX3KXTOV\n'
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO\n',
    )
    assert_rules_equal(exp0, text)
    kp.restore(textwrap.dedent(exp0).lstrip("\n"))
    total = count_rules(exp0, "nat")
    assert nat_last() == total and nat_total() == total

    # Add a service and its endpoints: only its SVC/SEP chains are written.
    eps3 = make_slice("ns3", "svc3", ["10.0.3.1"])
    b.add(make_service("ns3", "svc3", "172.30.0.43"), eps3)
    text = sync(p, b.state())
    exp = expected(
        ":KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]\n",
        SVC1_TOP + SVC2_TOP + SVC3_TOP,
        "-A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -s 10.0.3.1 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.1:80\n"
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.1:80" -j KUBE-SEP-BSWRHOQ77KEXZLNL\n',
    )
    partial_matches(exp, text)
    # Written: svc3's SVC and SEP rules plus its one KUBE-SERVICES rule (inserted, not the whole chain).
    assert nat_last() == 5
    assert "-I KUBE-SERVICES 1 " + SVC3_TOP[len("-A KUBE-SERVICES "):].rstrip("\n") in text.splitlines()
    total += 5
    assert nat_total() == total

    # Delete a service: its chains are flushed and deleted; nothing else rewritten.
    b.delete(svc2)
    text = sync(p, b.state())
    exp = expected(
        ":KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]\n:KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]\n",
        SVC1_TOP + SVC3_TOP,
        "",
        "-X KUBE-SEP-UHEGFW77JX3KXTOV\n-X KUBE-SVC-2VJB64SDSIJUP5T6\n",
    )
    partial_matches(exp, text)
    total -= 5
    assert nat_total() == total

    # A service without endpoints: only a REJECT rule in filter.
    svc4 = make_service("ns4", "svc4", "172.30.0.44")
    b.add(svc4)
    text = sync(p, b.state())
    reject = '-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j REJECT\n'
    exp = expected("", SVC1_TOP + SVC3_TOP, "", filter_extra=reject)
    partial_matches(exp, text)
    assert nat_total() == total

    b.add(make_slice("ns4", "svc4", ["10.0.4.1"]))
    text = sync(p, b.state())
    exp = expected(
        ":KUBE-SEP-AYCN5HPXMIRJNJXU - [0:0]\n:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]\n",
        SVC1_TOP + SVC3_TOP + SVC4_TOP,
        "-A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -s 10.0.4.1 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.4.1:80\n"
        '-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.0.4.1:80" -j KUBE-SEP-AYCN5HPXMIRJNJXU\n',
    )
    partial_matches(exp, text)
    total += 5
    assert nat_total() == total

    # Change an endpoint: svc3's chains are rewritten, the old SEP deleted.
    eps3b = make_slice("ns3", "svc3", ["10.0.3.2"])
    b.add(eps3b)
    text = sync(p, b.state())
    exp = expected(
        ":KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]\n:KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]\n",
        SVC1_TOP + SVC3_TOP + SVC4_TOP,
        "-A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80\n"
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -j KUBE-SEP-DKCFIS26GWF2WLWC\n',
        "-X KUBE-SEP-BSWRHOQ77KEXZLNL\n",
    )
    partial_matches(exp, text)
    assert nat_total() == total

    # Add an endpoint: probabilities appear.
    b.add(make_slice("ns3", "svc3", ["10.0.3.2", "10.0.3.3"]))
    text = sync(p, b.state())
    exp = expected(
        ":KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]\n:KUBE-SEP-JVVZVJ7BSEPPRNBS - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]\n",
        SVC1_TOP + SVC3_TOP + SVC4_TOP,
        "-A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80\n"
        "-A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -s 10.0.3.3 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.3:80\n"
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-DKCFIS26GWF2WLWC\n'
        '-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.3:80" -j KUBE-SEP-JVVZVJ7BSEPPRNBS\n',
    )
    partial_matches(exp, text)
    total += 3
    assert nat_total() == total

    # No changes: no service chains are written.
    text = sync(p, b.state())
    partial_matches(expected("", SVC1_TOP + SVC3_TOP + SVC4_TOP, ""), text)
    assert text == "", "nothing changed: nothing to restore"

    # A partial restore that would leave a dangling jump fails; the next sync is full and repairs.
    ipt.tables.append("nat", "KUBE-SVC-X27LE4BHSL4DOUIK", "-j KUBE-SEP-AYCN5HPXMIRJNJXU")
    b.delete(svc4)
    with pytest.raises(SyncError):
        sync(p, b.state())
    assert "KUBE-SEP-AYCN5HPXMIRJNJXU" in ipt.chains("nat")
    assert metrics.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert metrics.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
    text = sync(p, b.state())  # the controller would also say full_sync=True; the proxier forces it anyway
    assert "-X KUBE-SEP-AYCN5HPXMIRJNJXU" in text and "-X KUBE-SVC-4SW47YFZTEDKD3PK" in text
    assert "KUBE-SEP-AYCN5HPXMIRJNJXU" not in ipt.chains("nat")
    total -= 5
    assert nat_total() == total


def test_bad_ips_are_normalised():
    """kube-proxy's TestBadIPs: leading zeros and whitespace are rewritten to canonical addresses."""
    p, _, _ = fake_proxier()
    b = StateBuilder(NODE).add(
        make_service(
            "ns1", "svc1", "172.30.0.041", [("p80", 80, "TCP", 3001)], type="LoadBalancer", lb_ips=["1.2.3.004"],
            external_ips=["192.168.099.022"], source_ranges=["203.0.113.000/025"],
        ),
        make_slice("ns1", "svc1", ["10.180.00.001"]),
    )
    text = sync(p, b.state(full_sync=True))
    for want in (
        "-d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        "-d 192.168.99.22 --dport 80 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        "-d 1.2.3.4 --dport 80 -j KUBE-FW-XPGD46QRK7WJZT7O",
        "-s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        "-j DNAT --to-destination 10.180.0.1:80",
        '"ns1/svc1:p80 traffic not accepted by KUBE-FW-XPGD46QRK7WJZT7O" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP',
    ):
        assert want in text
    assert check_rule_jumps(text) == []


def _count_seps(text: str, match: str):
    first, n, comments = "", 0, 0
    for line in text.splitlines():
        if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line:
            n += 1
            comments += "--comment" in line
            if match in line:
                first = line
    return first, n, comments


def test_large_cluster_mode():
    """kube-proxy's TestSyncProxyRulesLargeClusterMode: >1000 endpoints drop per-endpoint comments."""
    p, ipt, _ = fake_proxier(masquerade_all=True, sync_period=30.0)
    half = C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD // 2 - 1
    b = StateBuilder(NODE).add(
        make_service("ns1", "svc1", "172.30.0.41"),
        make_service("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")]),
        make_service("ns3", "svc3", "172.30.0.43", [("p8081", 8081, "TCP")]),
        make_slice("ns1", "svc1", [f"10.0.{i % 256}.{i // 256}" for i in range(half)]),
        make_slice("ns2", "svc2", [f"10.1.{i % 256}.{i // 256}" for i in range(half)], [("p8080", 8080, "TCP")]),
    )
    text = sync(p, b.state(full_sync=True))
    first, n, comments = _count_seps(text, "10.0.0.0:80")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert n == comments == 2 * half

    b.add(make_slice("ns3", "svc3", ["203.0.113.4", "203.0.113.8", "203.0.113.12"], [("p8081", 8081, "TCP")]))
    text = sync(p, b.state())
    first, n, comments = _count_seps(text, "203.0.113.4")
    assert first == "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
    assert (n, comments) == (3, 0)

    text = sync(p, b.state(full_sync=True))
    first, n, comments = _count_seps(text, "10.0.0.0:80")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert (n, comments) == (2 * half + 3, 0)

    svc4 = make_service("ns4", "svc4", "172.30.0.44", [("p8082", 8082, "TCP")])
    b.add(svc4, make_slice("ns4", "svc4", ["10.4.0.1"], [("p8082", 8082, "TCP")]))
    text = sync(p, b.state())
    first, n, _ = _count_seps(text, "10.4.0.1")
    assert first == "-A KUBE-SEP-SU5STNODRYEWJAUF -m tcp -p tcp -j DNAT --to-destination 10.4.0.1:8082"
    assert n == 1

    # Deleting a service: the partial sync knows its chains from what it wrote and deletes
    # them at once (kube-proxy learns stale chains from iptables-save, which it runs only
    # once per sync-period in large-cluster mode, so it deletes them later).
    import time

    b.delete(svc4)
    text = sync(p, b.state())
    assert "-X KUBE-SVC-EBDQOQU5SJFXRIL3" in text and "-X KUBE-SEP-SU5STNODRYEWJAUF" in text
    assert _count_seps(text, "10.4.0.1")[:2] == ("", 0)
    # Chains nobody tracked (left by an earlier run) are found by full syncs through
    # iptables-save -- in large-cluster mode at most once per sync-period, as upstream.
    ipt.ensure_chain("nat", "KUBE-SEP-LEFTOVERLEFTOVER")
    p.stats.last_cleanup = time.monotonic()
    text = sync(p, b.state(full_sync=True))
    assert "-X " not in text
    p.stats.last_cleanup = time.monotonic() - 31
    text = sync(p, b.state(full_sync=True))
    assert "-X KUBE-SEP-LEFTOVERLEFTOVER" in text.splitlines()


@pytest.mark.parametrize(
    "liberal,nfacct,rule",
    [
        (False, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"),
        (False, True, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n"),
        (True, False, ""),
    ],
    ids=["drop-invalid", "drop-invalid-nfacct", "tcp-be-liberal"],
)
def test_drop_invalid_rule(liberal, nfacct, rule):
    p, _, _ = fake_proxier(nfacct=nfacct)
    p.sysctl.values["net/netfilter/nf_conntrack_tcp_be_liberal"] = int(liberal)
    text = sync(p, StateBuilder(NODE).state(full_sync=True))
    chain = parse_dump(text).chain("filter", "KUBE-FORWARD")
    assert "".join(r.raw + "\n" for r in chain.rules) == rule + (
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT\n'
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n'
    )


@pytest.mark.parametrize("random_fully", [False, True], ids=["plain", "random-fully"])
def test_masquerade_rule(random_fully):
    p, ipt, _ = fake_proxier()
    ipt.random_fully = random_fully
    text = sync(p, StateBuilder(NODE).state(full_sync=True))
    chain = parse_dump(text).chain("nat", "KUBE-POSTROUTING")
    assert [r.raw for r in chain.rules] == [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + (" --random-fully" if random_fully else ""),
    ]


def test_masquerade_mark_follows_masquerade_bit():
    from kubelab.modes.iptables.proxier import masquerade_mark

    assert masquerade_mark(14) == "0x004000"  # Go's "%#08x", what kube-proxy really writes
    assert masquerade_mark(0) == "0x000001"
    with pytest.raises(ValueError, match="masquerade-bit"):
        masquerade_mark(32)


@pytest.mark.parametrize(
    "n,want",
    [(1, "1.0000000000"), (2, "0.5000000000"), (10, "0.1000000000"), (100, "0.0100000000"), (1000, "0.0010000000"),
     (10000, "0.0001000000"), (100000, "0.0000100000"), (100001, "0.0000099999")],
    ids=lambda v: str(v),
)
def test_compute_probability(n, want):
    assert C.compute_probability(n) == want


def test_probabilities_strictly_increase():
    prev = 0.0
    for i in range(100000, 1, -1):
        cur = float(C.compute_probability(i))
        assert cur > prev
        prev = cur


def _random_objects(rnd, i):
    """Service i in one of several shapes, and its slice (maybe empty, maybe local)."""
    ns, name, cip = f"ns{i % 3}", f"svc{i}", f"172.30.1.{i + 1}"
    shape = rnd.choice(["cluster", "nodeport", "lb-ranges", "local", "affinity", "external-ip", "itp-local"])
    ports = [("p80", 80, "TCP", 30000 + i if shape in ("nodeport", "local", "lb-ranges") else 0)]
    if rnd.random() < 0.3:
        ports.append(("dns", 53, "UDP", 0))
    kw = {
        "nodeport": {"type": "NodePort"},
        "lb-ranges": {"type": "LoadBalancer", "lb_ips": [f"5.6.7.{i}"], "source_ranges": ["203.0.113.0/25", "192.168.0.0/24"]},
        "local": {"type": "LoadBalancer", "etp": "Local", "lb_ips": [f"1.2.3.{i}"], "health_check_node_port": 32000 + i},
        "affinity": {"affinity_timeout": rnd.choice([10, 10800])},
        "external-ip": {"external_ips": [f"192.168.99.{i}"]},
        "itp-local": {"itp": "Local"},
        "cluster": {},
    }[shape]
    svc = make_service(ns, name, cip, ports, **kw)
    eps = [ep(f"10.180.{i}.{j}", rnd.choice(["test-hostname", "other", None])) for j in range(rnd.randint(0, 4))]
    return svc, make_slice(ns, name, eps, [(p[0], 8000 + p[1], p[2]) for p in ports])


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed-{s}")
def test_partial_syncs_leave_what_a_full_sync_writes(seed):
    """Random adds, changes and deletes: after every partial sync our chains equal a fresh full sync's."""
    import random

    rnd = random.Random(seed)
    p, ipt, metrics = fake_proxier()
    b = StateBuilder(NODE)
    live: dict[int, tuple] = {}
    for i in range(8):
        live[i] = _random_objects(rnd, i)
        b.add(*live[i])
    sync(p, b.state(full_sync=True))
    for step in range(25):
        action = rnd.choice(["add", "change", "endpoints", "delete", "delete-slice", "nothing"])
        i = rnd.randrange(14)
        if action == "add" or (action in ("change", "endpoints") and i not in live):
            live[i] = _random_objects(rnd, i)
            b.add(*live[i])
        elif action == "change":
            svc, _ = _random_objects(rnd, i)
            live[i] = (svc, live[i][1])
            b.add(svc)
        elif action == "endpoints":
            _, sl = _random_objects(rnd, i)
            live[i] = (live[i][0], sl)
            b.add(sl)
        elif action == "delete" and i in live:
            b.delete(*live.pop(i))
        elif action == "delete-slice" and i in live:
            b.delete(live[i][1])
        state = b.state()
        text = sync(p, state)
        assert not state.full_sync and p.stats.full_syncs == 1, "every sync after the first must be partial"
        fresh, fipt, _ = fake_proxier()
        sync(fresh, replace(state, full_sync=True))
        assert kube_chains(ipt.tables) == kube_chains(fipt.tables), f"step {step} ({action} svc{i}):\n{text}"
        # The rule-count metrics (kept up to date without recounting) match what the kernel holds.
        for table in ("nat", "filter"):
            assert metrics.value("kubeproxy_sync_proxy_rules_iptables_total", {"table": table}) == kube_rule_count(ipt.tables, table)
        # The KUBE-NODEPORTS jump stays the last rule of KUBE-SERVICES whatever was inserted.
        assert ipt.tables.dump.chain("nat", "KUBE-SERVICES").rules[-1].jump == "KUBE-NODEPORTS"


@pytest.mark.parametrize("existing", [None, {"KUBE-SEP-STALESTALESTALE", "KUBE-SVC-XPGD46QRK7WJZT7O"}], ids=["fresh", "stale-chain"])
def test_streamed_full_sync_equals_kube_proxy_text(existing):
    """The piped full sync (nat first, per-service blocks) holds the very rules of kube-proxy's text."""
    p, _, _ = fake_proxier()
    state = StateBuilder(NODE).add(*overall_objects()).state(full_sync=True)
    r = p.renderer
    exact = r.render_full(state.service_map, state.endpoints_map, state.node, existing).text
    stream = r.stream_full(state.service_map, state.endpoints_map, state.node, existing, batch=3)
    streamed = "".join(stream)
    assert sorted(exact.splitlines()) == sorted(streamed.splitlines())
    a, b = FakeTables(), FakeTables()
    for tables in (a, b):
        if existing:
            tables.restore("*nat\n" + "".join(f":{c} - [0:0]\n" for c in sorted(existing)) + "COMMIT\n")
    a.restore(exact)
    b.restore(streamed)
    assert kube_chains(a) == kube_chains(b)
    assert b.dump.chain("nat", "KUBE-SERVICES").rules[-1].jump == "KUBE-NODEPORTS"
    assert stream.result is not None and stream.result.nat_rules_total == count_rules(exact, "nat")
    assert stream.result.deleted_chains == (["KUBE-SEP-STALESTALESTALE"] if existing else [])


@pytest.mark.parametrize(
    "itp,etp,nodes,want_internal,want_external",
    [
        ("Local", "Cluster", ["test-hostname", "node1", "node2"], 0, 0),
        ("Cluster", "Local", ["test-hostname", "node1", "node2"], 0, 0),
        ("Local", "Local", ["test-hostname", "node1", "node2"], 0, 0),
        ("Local", "Cluster", ["node0", "node1", "node2"], 1, 0),
        ("Cluster", "Local", ["node0", "node1", "node2"], 0, 1),
        ("Local", "Local", ["node0", "node1", "node2"], 1, 1),
        ("Local", "Local", [], 0, 0),
    ],
    ids=["itp-local-eps", "etp-local-eps", "both-local-eps", "itp-no-local", "etp-no-local", "both-no-local",
         "no-endpoints-at-all"],
)
def test_no_endpoints_metric(itp, etp, nodes, want_internal, want_external):
    """kube-proxy's TestNoEndpointsMetric: sync_proxy_rules_no_local_endpoints_total{traffic_policy}."""
    p, _, metrics = fake_proxier()
    svc = make_service("ns1", "svc1", "172.30.1.1", [("", 80, "TCP", 123 if etp == "Local" else 0)],
                       type="NodePort" if etp == "Local" else "ClusterIP", etp=etp, itp=itp)
    eps = [ep(f"10.0.1.{i + 1}", n, ready=True) for i, n in enumerate(nodes)]
    sync(p, StateBuilder(NODE).add(svc, make_slice("ns1", "svc1", eps, [("", 80, "TCP")])).state(full_sync=True))
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert metrics.value(name, {"traffic_policy": "internal"}) == want_internal
    assert metrics.value(name, {"traffic_policy": "external"}) == want_external


@pytest.mark.parametrize(
    "lb_ip,ip_mode,programmed",
    [("1.2.3.4", "Proxy", False), ("1.2.3.5", "VIP", True), ("1.2.3.6", None, True)],
    ids=["proxy", "vip", "unset"],
)
def test_load_balancer_ingress_ip_mode_proxy(lb_ip, ip_mode, programmed):
    """kube-proxy's TestLoadBalancerIngressRouteTypeProxy (LoadBalancerIPMode GA): ipMode Proxy LB IPs get no rules."""
    p, ipt, _ = fake_proxier()
    svc = make_service("ns1", "svc1", "10.20.30.41", [("p80", 80, "TCP", 3001)], type="LoadBalancer",
                       lb_ips=[(lb_ip, ip_mode)])
    sync(p, StateBuilder(NODE).add(svc, make_slice("ns1", "svc1", ["10.180.0.1"])).state(full_sync=True))
    rules = [r.raw for r in ipt.tables.dump.chain("nat", C.KUBE_SERVICES).rules]
    assert any(f"-d {lb_ip} " in r for r in rules) == programmed
    # Its NodePort and cluster IP are programmed either way.
    assert any("-d 10.20.30.41 " in r for r in rules)
    assert any("--dport 3001 " in r for r in ipt.tables.dump.chain("nat", C.KUBE_NODEPORTS).rules for r in [r.raw])


def test_regular_full_syncs_once_an_hour_and_never_in_large_cluster_mode():
    """kube-proxy's doFullSync: needFullSync, or FullSyncPeriod (1 h) passed and not largeClusterMode."""
    import math

    from kubelab.modes.iptables.proxier import FULL_SYNC_PERIOD

    assert FULL_SYNC_PERIOD == 3600.0
    p, _, _ = fake_proxier(sync_period=30.0)
    assert p.full_sync_period == FULL_SYNC_PERIOD  # not --sync-period: the periodic sync is partial
    b = StateBuilder(NODE).add(make_service("ns1", "svc1", "172.30.0.41"), make_slice("ns1", "svc1", ["10.0.0.1"]))
    sync(p, b.state(full_sync=True))
    assert p.full_sync_period == FULL_SYNC_PERIOD
    # A periodic sync with nothing changed writes nothing.
    assert sync(p, b.state()) == ""
    many = C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD + 1
    b.add(make_slice("ns1", "svc1", [f"10.1.{i % 256}.{i // 256}" for i in range(many)]))
    sync(p, b.state())
    assert p.full_sync_period == math.inf
