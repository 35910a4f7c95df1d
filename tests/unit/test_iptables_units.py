"""Unit tests of the iptables mode's pieces: chain hashing, restore-text parsing and
normalisation, the fake tables' restore semantics, the adapter's error reporting,
conntrack cleanup decisions and flag handling.

Addresses: documentation/test ranges only (172.30.0.0/16, 10.0.0.0/8,
192.168.0.0/24); nothing touches a kernel.
"""

from __future__ import annotations

import pytest

from kubelab.model import Endpoint, ServicePort, ServicePortName
from kubelab.modes.iptables import chains as C
from kubelab.modes.iptables.kernel import IPTables, RestoreError, detect_backend, extract_lines
from kubelab.modes.iptables.proxier import NodePortAddresses, local_detector_for
from kubelab.modes.iptables.tracer import FakeTables, ParseError, RestoreError as FakeRestoreError, check_rule_jumps, parse_dump
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.kernel.conntrack import Conntrack, clean_stale_entries


@pytest.mark.parametrize(
    "name,proto,chain",
    [("ns1/svc1:p80", "tcp", "KUBE-SVC-XPGD46QRK7WJZT7O"), ("ns2/svc2:p80", "tcp", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
     ("ns4/svc4:p80", "tcp", "KUBE-SVC-4SW47YFZTEDKD3PK")],
    ids=["svc1", "svc2", "svc4"],
)
def test_service_chain_hash_matches_kube_proxy(name, proto, chain):
    assert C.service_chain_names(name, proto)[0] == chain


def test_endpoint_chain_hash_matches_kube_proxy():
    assert C.endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"


@pytest.mark.parametrize("text", ["", "a", "ns1/svc1:p80tcp", "ns/" + "x" * 300, "ünïcode/ß:p1udp"], ids=lambda t: f"len{len(t)}")
def test_chain_hash_is_base32_of_sha256(text):
    """The table-driven base32 equals the reference encoding (16 chars = the first 80 bits)."""
    import base64
    import hashlib

    assert C._hash16(text) == base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


# (restore text applied to tables holding KUBE-SERVICES: [rule a, nodeports jump], expected rules or error)
NOFLUSH_CASES = [
    pytest.param("-I KUBE-SERVICES 1 -d 1.1.1.1 -j RETURN", ["-d 1.1.1.1", "-d 9.9.9.9", "KUBE-NODEPORTS"], None, id="insert-top"),
    pytest.param("-I KUBE-SERVICES 2 -d 1.1.1.1 -j RETURN", ["-d 9.9.9.9", "-d 1.1.1.1", "KUBE-NODEPORTS"], None, id="insert-at"),
    pytest.param("-A KUBE-SERVICES -d 1.1.1.1 -j RETURN", ["-d 9.9.9.9", "KUBE-NODEPORTS", "-d 1.1.1.1"], None, id="append-undeclared"),
    pytest.param("-D KUBE-SERVICES -d 9.9.9.9 -j RETURN", ["KUBE-NODEPORTS"], None, id="delete-exact"),
    pytest.param("-D KUBE-SERVICES -d 8.8.8.8 -j RETURN", None, "no rule", id="delete-missing-fails"),
    pytest.param(":KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 1.1.1.1 -j RETURN", ["-d 1.1.1.1"], None, id="declare-flushes"),
    pytest.param("-A KUBE-NOPE -j RETURN", None, "no chain", id="unknown-chain-fails"),
]


@pytest.mark.parametrize("lines,want,error", NOFLUSH_CASES)
def test_fake_tables_noflush_semantics(lines, want, error):
    t = FakeTables()
    t.restore("*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 9.9.9.9 -j RETURN\n"
              "-A KUBE-SERVICES -j KUBE-NODEPORTS\nCOMMIT\n")
    before = t.save("nat")
    text = f"*nat\n{lines}\nCOMMIT\n"
    if error:
        with pytest.raises((FakeRestoreError, ParseError), match=error):
            t.restore(text)
        assert t.save("nat") == before, "a failed restore changes nothing"
        return
    t.restore(text)
    rules = [r.raw for r in t.dump.chain("nat", "KUBE-SERVICES").rules]
    assert len(rules) == len(want) and all(w in r for w, r in zip(want, rules)), rules


@pytest.mark.parametrize(
    "text,error",
    [
        ("*nat\n:A - [0:0]\n-A B -j ACCEPT\nCOMMIT\n", "undeclared chain"),
        ("*nat\n:A - [0:0]\n", "no COMMIT"),
        (":A - [0:0]\nCOMMIT\n", "expected a table"),
        ("*nat\n:A - [0:0]\n-A A -j ACCEPT\n-X A\nCOMMIT\n", "after adding rules"),
    ],
    ids=["undeclared", "no-commit", "no-table", "delete-after-rules"],
)
def test_parse_errors(text, error):
    with pytest.raises(ParseError, match=error):
        parse_dump(text)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n", "used but not created"),
        ("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n", "without rules"),
        ("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SVC-X -j ACCEPT\nCOMMIT\n", "created but not used"),
        ("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j ACCEPT\nCOMMIT\n", None),
    ],
    ids=["missing", "empty", "unused", "valid"],
)
def test_check_rule_jumps(text, problem):
    problems = check_rule_jumps(text)
    assert (problem is None and problems == []) or any(problem in p for p in problems)


def test_fake_tables_restore_is_atomic_and_refuses_referenced_delete():
    t = FakeTables()
    t.restore("*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-A KUBE-B -j ACCEPT\nCOMMIT\n")
    with pytest.raises(FakeRestoreError, match="still referenced"):
        t.restore("*nat\n:KUBE-B - [0:0]\n-X KUBE-B\nCOMMIT\n")
    assert [r.raw for r in t.dump.chain("nat", "KUBE-B").rules] == ["-A KUBE-B -j ACCEPT"]  # nothing applied
    t.restore("*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-X KUBE-B\nCOMMIT\n")
    assert "KUBE-B" not in t.chains("nat") and t.dump.chain("nat", "KUBE-A").rules == []


def test_restore_error_names_the_failing_line():
    calls = []

    def run(argv, input=None, timeout=None):
        calls.append((argv, input))
        return 1, "", "iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"\nError occurred at line: 3\n"

    ipt = IPTables(run, "nft")
    with pytest.raises(RestoreError) as e:
        ipt.restore_all("*nat\n:A - [0:0]\n-A A --bogus\nCOMMIT\n")
    assert e.value.line == 3
    argv, text = calls[0]
    assert argv[0] == "iptables-nft-restore" and "--noflush" in argv and "--counters" in argv and "-w" in argv
    assert ">     3: -A A --bogus" in extract_lines(text, 3)


@pytest.mark.parametrize(
    "saves,want",
    [
        ({"iptables-nft-save": ":KUBE-KUBELET-CANARY - [0:0]\n"}, "nft"),
        ({"iptables-legacy-save": ":KUBE-IPTABLES-HINT - [0:0]\n"}, "legacy"),
        ({"iptables-legacy-save": "-A INPUT -j ACCEPT\n-A INPUT -j DROP\n", "iptables-nft-save": "-A INPUT -j ACCEPT\n"}, "legacy"),
        ({"iptables-legacy-save": "-A INPUT -j ACCEPT\n", "iptables-nft-save": "-A INPUT -j ACCEPT\n"}, "nft"),
        ({}, "nft"),
    ],
    ids=["kubelet-hint-nft", "kubelet-hint-legacy", "legacy-has-more", "tie-prefers-nft", "empty"],
)
def test_detect_backend(saves, want):
    calls = []

    def run(argv, input=None, timeout=None):
        calls.append(argv)
        return 0, saves.get(argv[0], ""), ""

    assert detect_backend(run) == want
    # As the iptables-wrapper: nft's mangle is read alone, legacy's never (reading
    # it with -t mangle would create the table in the kernel).
    assert ["iptables-nft-save", "-t", "mangle"] in calls
    assert not any(a[0].endswith("legacy-save") and "-t" in a for a in calls)


@pytest.mark.parametrize(
    "saves",
    [
        {("ip6tables-nft-save", "-t", "mangle"): ":KUBE-IPTABLES-HINT - [0:0]\n",
         ("iptables-legacy-save",): "-A INPUT -j ACCEPT\n" * 3},
        {("iptables-legacy-save",): "-A INPUT -m comment --comment KUBE-KUBELET-CANARY -j ACCEPT\n",
         ("iptables-nft-save",): "-A INPUT -j ACCEPT\n-A INPUT -j DROP\n"},
    ],
    ids=["hint-only-in-ip6tables", "rule-naming-the-hint-is-no-hint"],
)
def test_detect_backend_hint_chains(saves):
    def run(argv, input=None, timeout=None):
        return 0, saves.get(tuple(argv), ""), ""

    assert detect_backend(run) == "nft"


def test_conntrack_cleanup_cases():
    calls = []

    def run(argv, input=None, timeout=None):
        calls.append(argv)
        return 1, "", "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"

    udp = ServicePortName("ns", "dns", "dns", "UDP")
    svc = ServicePort(cluster_ip="172.30.0.10", port=53, protocol="UDP", node_port=30053, external_ips=("192.168.99.1",))
    clean_stale_entries(
        Conntrack(run), {udp: svc}, {"172.30.0.99"}, [(udp, Endpoint("10.0.0.5", 5353))], {udp},
    )
    assert ["conntrack", "-D", "--orig-dst", "172.30.0.99", "-p", "udp"] in calls
    assert ["conntrack", "-D", "--orig-dst", "172.30.0.10", "--dst-nat", "10.0.0.5", "-p", "udp"] in calls
    assert ["conntrack", "-D", "--orig-dst", "192.168.99.1", "--dst-nat", "10.0.0.5", "-p", "udp"] in calls
    assert ["conntrack", "-D", "-p", "udp", "--dport", "30053", "--dst-nat", "10.0.0.5"] in calls
    assert ["conntrack", "-D", "-p", "udp", "--dport", "30053"] in calls  # newly active: flush REJECTed attempts


@pytest.mark.parametrize(
    "kw,if_local",
    [
        ({"cluster_cidr": ("10.244.0.0/16",)}, ("-s", "10.244.0.0/16")),
        ({}, ()),
        ({"detect_local_mode": "BridgeInterface", "bridge_interface": "cni0"}, ("-i", "cni0")),
        ({"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "veth"}, ("-i", "veth+")),
    ],
    ids=["cluster-cidr", "none", "bridge", "prefix"],
)
def test_local_detector(kw, if_local):
    from kubelab.model import NodeInfo

    assert local_detector_for(ProxyConfig(**kw), NodeInfo("n")).if_local == if_local


def test_bad_flags_say_how_to_fix():
    from kubelab.model import NodeInfo

    with pytest.raises(ValueError, match="--cluster-cidr: 'nope' is not a CIDR"):
        local_detector_for(ProxyConfig(cluster_cidr=("nope",)), NodeInfo("n"))
    with pytest.raises(ValueError, match="--pod-bridge-interface"):
        local_detector_for(ProxyConfig(detect_local_mode="BridgeInterface"), NodeInfo("n"))
    with pytest.raises(ValueError, match="--nodeport-addresses"):
        NodePortAddresses.parse(("10.0.0.0/33",))


@pytest.mark.parametrize(
    "values,match_all,loopback",
    [((), True, True), (("0.0.0.0/0",), True, True), (("192.168.0.0/24",), False, False),
     (("127.0.0.0/8", "192.168.0.0/24"), False, True), (("primary",), False, False)],
    ids=["unset", "zero-cidr", "cidr", "with-loopback", "primary"],
)
def test_nodeport_addresses(values, match_all, loopback):
    npa = NodePortAddresses.parse(values)
    assert (npa.match_all, npa.contains_ipv4_loopback()) == (match_all, loopback)


def test_whole_table_cache_adds_list_line_and_moves_builtin_rules_to_a_second_nat_batch():
    """nft full syncs: "-S" first in nat (one table dump instead of a quadratic chain list), the
    built-in-chain rules in a second nat batch; failing lines map back to the text as given,
    however the text was cut into chunks."""
    import random

    from kubelab.modes.iptables.kernel import WHOLE_TABLE_CACHE, WholeTableCache

    text = ("*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\n"
            "-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
            "-A KUBE-SERVICES -j ACCEPT\n-I PREROUTING -j KUBE-SERVICES\nCOMMIT\n*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
    lines = text.splitlines(keepends=True)
    rng = random.Random(4)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(lines)), rng.randint(0, len(lines) - 1)))
        w = WholeTableCache(["".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)])])
        out = "".join(w)
        assert out == ("*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n*nat\n" + WHOLE_TABLE_CACHE + "\n:KUBE-SERVICES - [0:0]\n"
                       "-A KUBE-SERVICES -j RETURN\n-A KUBE-SERVICES -j ACCEPT\nCOMMIT\n*nat\n"
                       "-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
                       "-I PREROUTING -j KUBE-SERVICES\nCOMMIT\n*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
        given = text.splitlines()
        for n, line in enumerate(out.splitlines(), 1):
            back = w.input_line(n)
            if back is None:
                assert line in (WHOLE_TABLE_CACHE, "*nat", "COMMIT")
            else:
                assert given[back - 1] == line, (n, back)


def test_ports_of_indexes_a_snapshot_once_and_scans_other_mappings():
    """Partial syncs find a changed service's ports through an index kept per service-map snapshot
    (endpoint-only changes reuse it); a new snapshot is indexed afresh and a plain dict, which its
    owner may change in place, is scanned every time."""
    from types import MappingProxyType

    from kubelab.modes.iptables.render import RenderConfig, Renderer

    r = Renderer(RenderConfig())
    a80, a53 = ServicePortName("ns", "a", "http", "TCP"), ServicePortName("ns", "a", "dns", "UDP")
    b80 = ServicePortName("ns", "b", "http", "TCP")
    port = ServicePort(cluster_ip="172.30.0.1", port=80)
    snap = MappingProxyType({a80: port, b80: port})
    assert r.ports_of(snap, {("ns", "a")}) == [a80]
    index = r._ports_index
    assert r.ports_of(snap, {("ns", "b"), ("ns", "gone")}) == [b80]
    assert r._ports_index is index, "the same snapshot is not indexed again"
    grown = MappingProxyType({a80: port, a53: port, b80: port})
    assert sorted(r.ports_of(grown, {("ns", "a")}), key=str) == [a53, a80]
    plain = {a80: port}
    assert r.ports_of(plain, {("ns", "a")}) == [a80]
    plain[a53] = port
    assert r.ports_of(plain, {("ns", "a")}) == [a80, a53]
