"""The IPVS mode's pure parts: renderer, text forms, ipset entries, netlink encoding.

Addresses (no packets are sent): services 10.96.0.0/24, pods 10.244.0.0/24,
node 192.168.50.1, external/LB IPs 203.0.113.0/24, source ranges
198.51.100.0/24 and 192.168.0.0/16.
"""

from __future__ import annotations

import pytest

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.ipvs import kernel as K
from kubelab.modes.ipvs import render as R

NODE = NodeInfo("node-a", ("192.168.50.1",))
CFG = R.RenderConfig(
    nodeport_ips=("192.168.50.1",),
    node_addresses=frozenset({"192.168.50.1", "203.0.113.99"}),
    node_ip="192.168.50.1",
    local_detector_if_not_local=("!", "-s", "10.244.0.0/16"),
)


def one(name="web", eps=(("10.244.0.11", 8080, True), ("10.244.0.12", 8080, False)), **fields):
    spn = ServicePortName("default", name, "", fields.get("protocol", "TCP"))
    fields.setdefault("cluster_ip", "10.96.0.10")
    fields.setdefault("port", 80)
    sp = ServicePort(**fields)
    return spn, sp, tuple(Endpoint(ip, port, is_local=local, node_name="node-a" if local else "node-b") for ip, port, local in eps)


def render(*services, config=CFG):
    return R.render({s[0]: s[1] for s in services}, {s[0]: s[2] for s in services}, NODE, config)


CASES = [
    pytest.param(
        {},
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
        ],
        {R.KUBE_CLUSTER_IP: {"10.96.0.10,tcp:80"}, R.KUBE_LOOP_BACK: {"10.244.0.11,tcp:8080,10.244.0.11"}},
        {"10.96.0.10"},
        id="cluster-ip",
    ),
    pytest.param(
        {"node_port": 30080, "external_policy_local": True},
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
            "-A -t 192.168.50.1:30080 -s rr",
            "-a -t 192.168.50.1:30080 -r 10.244.0.11:8080 -m -w 1",
        ],
        {R.KUBE_NODE_PORT_TCP: {"30080"}, R.KUBE_NODE_PORT_LOCAL_TCP: {"30080"}},
        {"10.96.0.10"},
        id="nodeport-local",
    ),
    pytest.param(
        {"protocol": "UDP", "port": 53, "session_affinity": "ClientIP", "sticky_max_age_seconds": 600},
        [
            "-A -u 10.96.0.10:53 -s rr -p 600",
            "-a -u 10.96.0.10:53 -r 10.244.0.11:8080 -m -w 1",
            "-a -u 10.96.0.10:53 -r 10.244.0.12:8080 -m -w 1",
        ],
        {R.KUBE_CLUSTER_IP: {"10.96.0.10,udp:53"}},
        {"10.96.0.10"},
        id="udp-affinity",
    ),
    pytest.param(
        {"external_ips": ("203.0.113.5", "203.0.113.99")},
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
            "-A -t 203.0.113.5:80 -s rr",
            "-a -t 203.0.113.5:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 203.0.113.5:80 -r 10.244.0.12:8080 -m -w 1",
            "-A -t 203.0.113.99:80 -s rr",
            "-a -t 203.0.113.99:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 203.0.113.99:80 -r 10.244.0.12:8080 -m -w 1",
        ],
        {R.KUBE_EXTERNAL_IP: {"203.0.113.5,tcp:80", "203.0.113.99,tcp:80"}},
        # 203.0.113.99 is already a node address: never bound to the dummy.
        {"10.96.0.10", "203.0.113.5"},
        id="external-ips",
    ),
    pytest.param(
        {"annotations": {R.ANNOTATION_SCHEDULER: "sh"}},
        [
            "-A -t 10.96.0.10:80 -s sh -b sh-fallback",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
        ],
        {},
        {"10.96.0.10"},
        id="sh-annotation",
    ),
    pytest.param(
        {"annotations": {R.ANNOTATION_SCHEDULER_KUBE_ROUTER: "mh"}},
        [
            "-A -t 10.96.0.10:80 -s mh -b mh-port",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
        ],
        {},
        {"10.96.0.10"},
        id="mh-kube-router-annotation",
    ),
    pytest.param(
        {"annotations": {R.ANNOTATION_SCHEDULER: "sh"}, "session_affinity": "ClientIP", "sticky_max_age_seconds": 1800},
        [
            # ipvsadm -Sn prints persistence before the scheduler flags.
            "-A -t 10.96.0.10:80 -s sh -p 1800 -b sh-fallback",
            "-a -t 10.96.0.10:80 -r 10.244.0.11:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.0.12:8080 -m -w 1",
        ],
        {},
        {"10.96.0.10"},
        id="sh-persistent",
    ),
]


@pytest.mark.parametrize(("fields", "ipvsadm", "sets", "bind"), CASES)
def test_render_service(fields, ipvsadm, sets, bind):
    desired = render(one(**fields))
    assert R.ipvsadm_save(desired.services).splitlines() == ipvsadm
    for name, entries in sets.items():
        assert desired.set_entries[name] == entries, name
    assert desired.bind == bind
    assert desired.set_entries[R.KUBE_IPVS_IPS] == bind
    assert desired.errors == []


def test_load_balancer_source_ranges():
    desired = render(
        one(load_balancer_vips=("203.0.113.20",), load_balancer_source_ranges=("198.51.100.0/24", "192.168.0.0/16"))
    )
    e = desired.set_entries
    assert e[R.KUBE_LOAD_BALANCER_SET] == {"203.0.113.20,tcp:80"}
    assert e[R.KUBE_LOAD_BALANCER_FW] == {"203.0.113.20,tcp:80"}
    assert e[R.KUBE_LOAD_BALANCER_SOURCE_CIDR] == {"203.0.113.20,tcp:80,198.51.100.0/24", "203.0.113.20,tcp:80,192.168.0.0/16"}
    # 192.168.0.0/16 holds the node IP: the node may reach the LB, no OUT-FILTER drop.
    assert e[R.KUBE_LOAD_BALANCER_SOURCE_IP] == {"203.0.113.20,tcp:80,203.0.113.20"}
    assert desired.lb_no_node_access == []
    only = render(one(load_balancer_vips=("203.0.113.20",), load_balancer_source_ranges=("198.51.100.0/24",)))
    assert only.lb_no_node_access == [("203.0.113.20", "tcp", 80)]
    assert "-A KUBE-IPVS-OUT-FILTER -s 203.0.113.20 -m ipvs --vaddr 203.0.113.20 --vproto tcp --vport 80 -j DROP" in only.iptables


@pytest.mark.parametrize(
    ("value", "expect", "error"),
    [("lc", "lc", ""), (" wlc ", "wlc", ""), ("nope", "rr", "is not an IPVS scheduler")],
    ids=["valid", "spaces", "invalid"],
)
def test_scheduler_annotation(value, expect, error):
    sched, err = R.scheduler_for(ServicePort("10.96.0.1", 80, annotations={R.ANNOTATION_SCHEDULER: value}), "rr")
    assert sched == expect
    assert (error in err) if error else err == ""
    if error:
        assert R.ANNOTATION_SCHEDULER in err and "lblcr" in err  # names the annotation and the choices


def test_local_internal_policy_without_local_endpoints_falls_back_and_counts():
    desired = render(one(eps=(("10.244.0.12", 8080, False),), internal_policy_local=True))
    # No local endpoint: the cluster IP keeps no real servers (internal Local uses no cluster endpoints).
    assert desired.services[("10.96.0.10", "TCP", 80)].real_servers == ()
    assert desired.no_local_internal == 1


@pytest.mark.parametrize(
    ("config", "rule"),
    [
        (CFG, "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"),
        (R.RenderConfig(masquerade_all=True), "--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
        (R.RenderConfig(), "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),
    ],
    ids=["detector", "masquerade-all", "no-detector"],
)
def test_iptables_cluster_ip_masquerade(config, rule):
    assert rule in render(one(), config=config).iptables


def test_iptables_text_shape():
    text = render(one(node_port=30080)).iptables
    lines = text.splitlines()
    assert lines[0] == "*nat" and "COMMIT" in lines and "*filter" in lines
    assert "-A KUBE-POSTROUTING -m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in lines
    assert "-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in lines
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000" in lines
    assert lines.index("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT") < lines.index(
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT"
    )
    # Empty sets get no rules (kube-proxy skips them).
    assert "KUBE-LOAD-BALANCER-FW" not in text


def test_with_jumps_goes_after_chain_declarations():
    text = R.with_jumps("*nat\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n*filter\n:B - [0:0]\nCOMMIT\n", [("nat", "-I OUTPUT 1 -j A")])
    assert text.splitlines() == ["*nat", ":A - [0:0]", "-I OUTPUT 1 -j A", "-A A -j RETURN", "COMMIT", "*filter", ":B - [0:0]", "COMMIT"]


def test_dry_run_text_sections():
    text = R.dry_run_text(render(one()))
    for header in ("# IPVS virtual servers (ipvsadm -Sn)", "# addresses on kube-ipvs0", "# ipsets (ipset save)", "# iptables-restore --noflush"):
        assert header in text
    assert "10.96.0.10/32" in text
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in text
    assert "create KUBE-NODE-PORT-TCP bitmap:port comment range 0-65535" in text


@pytest.mark.parametrize(
    ("set_type", "entry", "parts"),
    [
        (K.HASH_IP_PORT, "10.96.0.1,tcp:80", {"ip": "10.96.0.1", "proto": "tcp", "port": 80}),
        (K.HASH_IP_PORT_IP, "10.244.0.2,udp:53,10.244.0.2", {"ip": "10.244.0.2", "proto": "udp", "port": 53, "ip2": "10.244.0.2"}),
        (K.HASH_IP_PORT_NET, "1.2.3.4,tcp:80,192.168.1.7/16", {"ip": "1.2.3.4", "proto": "tcp", "port": 80, "ip2": "192.168.0.0", "cidr2": 16}),
        (K.BITMAP_PORT, "30080", {"port": 30080}),
        (K.HASH_IP, "10.96.0.1", {"ip": "10.96.0.1"}),
    ],
    ids=["ip-port", "ip-port-ip", "ip-port-net", "bitmap-port", "ip"],
)
def test_parse_entry(set_type, entry, parts):
    assert K.parse_entry(set_type, entry) == parts


@pytest.mark.parametrize("entry", ["10.96.0.1,tcp", "10.96.0.1,xyz:80", "nope,tcp:80", "10.96.0.1,tcp:99999"], ids=["no-port", "proto", "ip", "port"])
def test_parse_entry_errors_name_the_entry(entry):
    with pytest.raises(ValueError, match="invalid hash:ip,port entry"):
        K.parse_entry(K.HASH_IP_PORT, entry)


def test_ipvs_messages_decode_with_pyroute2():
    """Our struct encoding, read back by pyroute2's independent IPVS message decoder."""
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    vs = K.VirtualServer("10.96.0.10", "UDP", 53, "sh", K.FLAG_PERSISTENT | K.FLAG_SCHED1, 300)
    rs = K.RealServer("10.244.0.11", 5353, weight=3)
    from kubelab.modes.ipvs import netlink as nl

    body = K._genl(K.CMD_NEW_DEST, nl.nested(K.A_SERVICE, K._svc_full_attrs(vs)) + nl.nested(K.A_DEST, K._dest_attrs(rs)))
    msg = ipvsmsg(nl.NetlinkSocket.message(28, 1, 7, body))
    msg.decode()
    svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    dest = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert svc.get_attr("IPVS_SVC_ATTR_ADDR") == "10.96.0.10"
    assert svc.get_attr("IPVS_SVC_ATTR_PORT") == 53
    assert svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") == 17
    assert svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "sh"
    assert svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") == 300
    assert svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] == K.FLAG_PERSISTENT | K.FLAG_SCHED1
    assert svc.get_attr("IPVS_SVC_ATTR_NETMASK") == "255.255.255.255"
    assert dest.get_attr("IPVS_DEST_ATTR_PORT") == 5353
    assert dest.get_attr("IPVS_DEST_ATTR_WEIGHT") == 3
    assert dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == 0  # NAT, not pyroute2's default 3


def test_bad_scheduler_flag_is_a_clear_error():
    import logging

    from kubelab.modes.ipvs.proxier import IPVSProxier
    from kubelab.proxy.config import ProxyConfig
    from kubelab.proxy.provider import ModeDeps

    with pytest.raises(ValueError, match="--ipvs-scheduler='fast' is not an IPVS scheduler: choose one of rr"):
        IPVSProxier(ModeDeps(ProxyConfig(proxy_mode="ipvs", ipvs_scheduler="fast"), NODE, logging.getLogger("t")))


def test_render_touches_no_kernel():
    """--dry-run works on the host, which has no IPVS: render() must not open netlink sockets."""
    import logging

    from kubelab.modes.ipvs.proxier import IPVSProxier
    from kubelab.proxy.config import ProxyConfig
    from kubelab.proxy.provider import ModeDeps, SyncState

    p = IPVSProxier(ModeDeps(ProxyConfig(proxy_mode="ipvs"), NODE, logging.getLogger("t")))
    spn, sp, eps = one()
    text = p.render(SyncState({spn: sp}, {spn: eps}, NODE))
    assert "-A -t 10.96.0.10:80 -s rr" in text
    assert p._ipvs is None and p._addrs is None and p._ipsets is None


@pytest.mark.parametrize(
    "set_name,data",
    [
        ("KUBE-CLUSTER-IP", {"IPSET_ATTR_CADT_FLAGS": 16, "IPSET_ATTR_HASHSIZE": 1024, "IPSET_ATTR_MAXELEM": 65536}),
        ("KUBE-NODE-PORT-TCP", {"IPSET_ATTR_CADT_FLAGS": 16, "IPSET_ATTR_PORT_FROM": 0, "IPSET_ATTR_PORT_TO": 65535}),
    ],
    ids=["hash", "bitmap"],
)
def test_ipset_create_messages_decode_with_pyroute2(set_name, data):
    """IPSET_CMD_CREATE as we encode it, read back by pyroute2's ipset decoder: what `ipset create ... comment` sends."""
    from pyroute2.netlink.nfnetlink.ipset import ipset_msg

    from kubelab.modes.ipvs import netlink as nl
    from kubelab.modes.ipvs import render as R

    spec = R.IPSET_BY_NAME[set_name]
    msg = ipset_msg(nl.NetlinkSocket.message((K.NFNL_SUBSYS_IPSET << 8) | K.IPSET_CMD_CREATE, 1, 1, K.IPSets.create_body(spec, 3)))
    msg.decode()
    assert msg.get_attr("IPSET_ATTR_SETNAME") == set_name
    assert msg.get_attr("IPSET_ATTR_TYPENAME") == spec.set_type
    assert msg.get_attr("IPSET_ATTR_REVISION") == 3
    assert msg.get_attr("IPSET_ATTR_FAMILY") == K.NFPROTO_IPV4
    got = msg.get_attr("IPSET_ATTR_DATA")
    assert {name: got.get_attr(name) for name in data} == data
    assert len(got["attrs"]) == len(data)
