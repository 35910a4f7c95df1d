"""Pure renderer of the IPVS mode: service and endpoint maps in, desired kernel state out.

This is the decision half of kube-proxy's IPVS ``syncProxyRules``
(``pkg/proxy/ipvs/proxier.go``) without side effects:

* one virtual server per ClusterIP, externalIP, LoadBalancer VIP and NodePort
  (per node IP) of every service port, with NAT real servers for the
  endpoints ``categorize_endpoints`` picks (Local policies use node-local
  endpoints, falling back to the cluster ones for pod traffic, as upstream
  since https://github.com/kubernetes/kubernetes/pull/97081);
* ClusterIPs, externalIPs and LB VIPs that are not already node addresses
  are bound to ``kube-ipvs0``;
* kube-proxy's ipsets and their members, and the small iptables ruleset
  (``writeIptablesRules``) that matches them.

Scheduler: ``--ipvs-scheduler`` for every virtual server, overridden per
Service by the annotation ``ipvs.kubelab.dev/scheduler`` (kube-proxy has no
per-Service scheduler; kube-router's ``kube-router.io/service.scheduler`` is
honoured too, so manifests written for it work).  ``mh`` gets kube-proxy's
source-hash flag (mh-port); ``sh`` gets sh-fallback (kubelab's addition, see
:func:`render_service_port`); sessionAffinity ClientIP makes the virtual
server persistent with the affinity timeout.

The proxier keeps one :class:`Fragment` per service port between syncs, so
a partial sync renders only the services that changed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.ipvs.kernel import (
    BITMAP_PORT,
    FLAG_PERSISTENT,
    FLAG_SCHED1,
    FLAG_SCHED2,
    HASH_IP,
    HASH_IP_PORT,
    HASH_IP_PORT_IP,
    HASH_IP_PORT_NET,
    RealServer,
    SetSpec,
    VirtualServer,
)

log = logging.getLogger("kubelab.ipvs.render")

ANNOTATION_SCHEDULER = "ipvs.kubelab.dev/scheduler"
ANNOTATION_SCHEDULER_KUBE_ROUTER = "kube-router.io/service.scheduler"
#: Every scheduler the Linux kernel ships (net/netfilter/ipvs/ip_vs_*.c).
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
DEFAULT_SCHEDULER = "rr"

# -- chains (kube-proxy's names) ------------------------------------------
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
)

# (table, from, to, comment) -- kube-proxy's iptablesJumpChain for the IPVS mode.
JUMP_CHAINS = (
    ("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    ("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    ("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    ("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

# -- ipsets (pkg/proxy/ipvs/ipset.go) ---------------------------------------
KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_EXTERNAL_IP = "KUBE-EXTERNAL-IP"
KUBE_EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
KUBE_LOAD_BALANCER_SET = "KUBE-LOAD-BALANCER"
KUBE_LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
KUBE_LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
KUBE_LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
KUBE_LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
KUBE_NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
KUBE_NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
KUBE_NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
KUBE_HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
KUBE_IPVS_IPS = "KUBE-IPVS-IPS"

IPSETS: tuple[SetSpec, ...] = (
    SetSpec(KUBE_LOOP_BACK, HASH_IP_PORT_IP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    SetSpec(KUBE_CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"),
    SetSpec(KUBE_EXTERNAL_IP, HASH_IP_PORT, "Kubernetes service external ip + port for masquerade and filter purpose"),
    SetSpec(KUBE_EXTERNAL_IP_LOCAL, HASH_IP_PORT, "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    SetSpec(KUBE_LOAD_BALANCER_SET, HASH_IP_PORT, "Kubernetes service lb portal"),
    SetSpec(KUBE_LOAD_BALANCER_FW, HASH_IP_PORT, "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    SetSpec(KUBE_LOAD_BALANCER_LOCAL, HASH_IP_PORT, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    SetSpec(KUBE_LOAD_BALANCER_SOURCE_IP, HASH_IP_PORT_IP, "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    SetSpec(KUBE_LOAD_BALANCER_SOURCE_CIDR, HASH_IP_PORT_NET, "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    SetSpec(KUBE_NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    SetSpec(KUBE_NODE_PORT_LOCAL_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    SetSpec(KUBE_NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    SetSpec(KUBE_NODE_PORT_LOCAL_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    SetSpec(KUBE_NODE_PORT_SCTP, HASH_IP_PORT, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    SetSpec(
        KUBE_NODE_PORT_LOCAL_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    SetSpec(KUBE_HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    SetSpec(KUBE_IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
IPSET_BY_NAME: dict[str, SetSpec] = {s.name: s for s in IPSETS}

# (set, table, from chain, to, match, protocol) -- kube-proxy's ipsetWithIptablesChain, in its order.
IPSET_RULES = (
    (KUBE_LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (KUBE_LOAD_BALANCER_SET, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (KUBE_LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (KUBE_NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (KUBE_NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (KUBE_NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (KUBE_NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (KUBE_NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (KUBE_NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (KUBE_LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (KUBE_LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (KUBE_LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)

Categorize = Callable[[Sequence[Endpoint], ServicePort, NodeInfo], object]


def default_categorize() -> Categorize:
    from kubelab.proxy.topology import categorize_endpoints

    return categorize_endpoints


@dataclass(frozen=True)
class RenderConfig:
    """What shapes the desired state besides the maps (fixed per proxier, node IPs refreshed on full syncs)."""

    scheduler: str = DEFAULT_SCHEDULER
    masquerade_all: bool = False
    masquerade_mark: str = "0x004000"  # "%#08x" % (1 << --iptables-masquerade-bit), as kube-proxy formats it
    local_detector_if_not_local: tuple[str, ...] = ()  # e.g. ("!", "-s", "10.244.0.0/16"); () = no detector
    nodeport_ips: tuple[str, ...] = ()  # addresses NodePort virtual servers listen on
    node_addresses: frozenset[str] = frozenset()  # every local address except kube-ipvs0's
    node_ip: str = ""  # primary node IP (LoadBalancerSourceRanges "allow from node")
    random_fully: bool = False
    ip_family: int = 4


@dataclass(frozen=True)
class DesiredService:
    """One virtual server we want, its real servers, and whether its address goes on kube-ipvs0."""

    vs: VirtualServer
    real_servers: tuple[RealServer, ...]
    bind: bool
    service: ServicePortName


@dataclass
class Fragment:
    """Everything one service port contributes to a sync."""

    services: dict[tuple[str, str, int], DesiredService] = field(default_factory=dict)
    set_entries: dict[str, set[str]] = field(default_factory=dict)
    bind: set[str] = field(default_factory=set)
    lb_no_node_access: list[tuple[str, str, int]] = field(default_factory=list)
    no_local_internal: bool = False
    no_local_external: bool = False
    errors: list[str] = field(default_factory=list)

    def add_entry(self, set_name: str, entry: str) -> None:
        self.set_entries.setdefault(set_name, set()).add(entry)


@dataclass
class Desired:
    """The union of all fragments: what the kernel should hold after a full sync."""

    services: dict[tuple[str, str, int], DesiredService]
    set_entries: dict[str, set[str]]
    bind: set[str]
    lb_no_node_access: list[tuple[str, str, int]]
    iptables: str
    no_local_internal: int
    no_local_external: int
    errors: list[str]


def scheduler_for(svc: ServicePort, default: str, name: ServicePortName | None = None) -> tuple[str, str]:
    """(scheduler, error): the annotation's scheduler when valid, else ``default`` and why."""
    for key in (ANNOTATION_SCHEDULER, ANNOTATION_SCHEDULER_KUBE_ROUTER):
        value = (svc.annotations or {}).get(key)
        if value is None:
            continue
        value = value.strip()
        if value in SCHEDULERS:
            return value, ""
        who = f"service {name.namespaced_name}: " if name is not None else ""
        return default, (
            f"{who}annotation {key}={value!r} is not an IPVS scheduler; "
            f"use one of {', '.join(SCHEDULERS)} (falling back to {default})"
        )
    return default, ""


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _valid_ip(ip: str, family: int) -> str | None:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    return str(addr) if addr.version == family else None


def render_service_port(
    name: ServicePortName,
    svc: ServicePort,
    endpoints: Sequence[Endpoint],
    node: NodeInfo,
    config: RenderConfig,
    categorize: Categorize | None = None,
) -> Fragment:
    """The virtual servers, set entries and bindings of one service port."""
    frag = Fragment()
    fam = config.ip_family
    cluster_ip = _valid_ip(svc.cluster_ip, fam)
    if cluster_ip is None:
        if svc.cluster_ip and _family(svc.cluster_ip) == fam:
            frag.errors.append(f"service {name}: cluster IP {svc.cluster_ip!r} is not an IP address; skipped")
        return frag
    proto = svc.protocol.upper()
    lproto = proto.lower()
    scheduler, err = scheduler_for(svc, config.scheduler, name)
    if err:
        frag.errors.append(err)
    flags, timeout = 0, 0
    if svc.session_affinity_client_ip:
        flags |= FLAG_PERSISTENT
        timeout = int(svc.sticky_max_age_seconds)
    if scheduler == "mh":
        # kube-proxy's FlagSourceHash (IP_VS_SVC_F_SCHED2 = mh-port) for the Maglev scheduler.
        flags |= FLAG_SCHED2
    if scheduler == "sh":
        # kubelab addition: sh-fallback.  While a removed backend drains (weight 0) the
        # kernel's sh table still maps its clients to it; without the fallback their new
        # connections fail, with it only they move and every other client stays put.
        flags |= FLAG_SCHED1

    cat = (categorize or default_categorize())(endpoints, svc, node)
    cluster_eps = tuple(cat.cluster_endpoints or ())  # type: ignore[attr-defined]
    local_eps = tuple(cat.local_endpoints or ())  # type: ignore[attr-defined]
    has_any = bool(cat.has_any_endpoints)  # type: ignore[attr-defined]

    def pick(only_local: bool) -> tuple[RealServer, ...]:
        if only_local:
            if local_eps:
                eps = local_eps
            else:
                # Pods on this node still reach the service through cluster endpoints;
                # external traffic gets answers from pod IPs and is discarded (upstream #97081).
                eps = cluster_eps
                if has_any and svc.internal_policy_local:
                    frag.no_local_internal = True
                if has_any and svc.external_policy_local:
                    frag.no_local_external = True
        else:
            eps = cluster_eps
        seen: dict[tuple[str, int], RealServer] = {}
        for ep in eps:
            ip = _valid_ip(ep.ip, fam)
            if ip is None or not ep.port:
                continue
            seen.setdefault((ip, ep.port), RealServer(ip, ep.port, 1))
        return tuple(sorted(seen.values()))

    def add_vs(address: str, port: int, only_local: bool, bind: bool) -> None:
        vs = VirtualServer(address, proto, port, scheduler, flags, timeout)
        frag.services[vs.key] = DesiredService(vs, pick(only_local), bind, name)
        if bind:
            frag.bind.add(address)

    # Hairpin: a local endpoint reaching itself through the service is masqueraded.
    for ep in endpoints:
        ip = _valid_ip(ep.ip, fam)
        if ep.is_local and ip and ep.port:
            frag.add_entry(KUBE_LOOP_BACK, f"{ip},{lproto}:{ep.port},{ip}")

    frag.add_entry(KUBE_CLUSTER_IP, f"{cluster_ip},{lproto}:{svc.port}")
    add_vs(cluster_ip, svc.port, svc.internal_policy_local, True)

    for raw in svc.external_ips:
        ip = _valid_ip(raw, fam)
        if ip is None:
            continue
        entry = f"{ip},{lproto}:{svc.port}"
        frag.add_entry(KUBE_EXTERNAL_IP_LOCAL if svc.external_policy_local else KUBE_EXTERNAL_IP, entry)
        # An address that already lives on another interface must not be bound to the dummy.
        add_vs(ip, svc.port, svc.external_policy_local, ip not in config.node_addresses)

    for raw in svc.load_balancer_vips:
        ip = _valid_ip(raw, fam)
        if ip is None:
            continue
        entry = f"{ip},{lproto}:{svc.port}"
        frag.add_entry(KUBE_LOAD_BALANCER_SET, entry)
        if svc.external_policy_local:
            frag.add_entry(KUBE_LOAD_BALANCER_LOCAL, entry)
        if svc.load_balancer_source_ranges:
            frag.add_entry(KUBE_LOAD_BALANCER_FW, entry)
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                try:
                    net = ipaddress.ip_network(cidr.strip(), strict=False)
                except ValueError:
                    frag.errors.append(f"service {name}: loadBalancerSourceRanges entry {cidr!r} is not a CIDR; skipped")
                    continue
                if net.version != fam:
                    continue
                frag.add_entry(KUBE_LOAD_BALANCER_SOURCE_CIDR, f"{entry},{net}")
                if config.node_ip and _family(config.node_ip) == fam and ipaddress.ip_address(config.node_ip) in net:
                    allow_from_node = True
            if allow_from_node:
                frag.add_entry(KUBE_LOAD_BALANCER_SOURCE_IP, f"{entry},{ip}")
            else:
                frag.lb_no_node_access.append((ip, lproto, svc.port))
        add_vs(ip, svc.port, svc.external_policy_local, ip not in config.node_addresses)

    if svc.node_port and config.nodeport_ips:
        local = svc.external_policy_local
        if proto == "SCTP":
            for nip in config.nodeport_ips:
                frag.add_entry(KUBE_NODE_PORT_SCTP, f"{nip},sctp:{svc.node_port}")
                if local:
                    frag.add_entry(KUBE_NODE_PORT_LOCAL_SCTP, f"{nip},sctp:{svc.node_port}")
        else:
            frag.add_entry(KUBE_NODE_PORT_TCP if proto == "TCP" else KUBE_NODE_PORT_UDP, str(svc.node_port))
            if local:
                frag.add_entry(KUBE_NODE_PORT_LOCAL_TCP if proto == "TCP" else KUBE_NODE_PORT_LOCAL_UDP, str(svc.node_port))
        for nip in config.nodeport_ips:
            add_vs(nip, svc.node_port, local, False)

    if svc.health_check_node_port:
        frag.add_entry(KUBE_HEALTH_CHECK_NODE_PORT, str(svc.health_check_node_port))
    return frag


def combine(fragments: Iterable[Fragment]) -> tuple[dict, dict[str, set[str]], set[str], list, int, int, list[str]]:
    services: dict[tuple[str, str, int], DesiredService] = {}
    entries: dict[str, set[str]] = {s.name: set() for s in IPSETS}
    bind: set[str] = set()
    no_access: list[tuple[str, str, int]] = []
    internal = external = 0
    errors: list[str] = []
    for f in fragments:
        services.update(f.services)
        for k, v in f.set_entries.items():
            entries[k] |= v
        bind |= f.bind
        no_access += f.lb_no_node_access
        internal += f.no_local_internal
        external += f.no_local_external
        errors += f.errors
    entries[KUBE_IPVS_IPS] = set(bind)
    return services, entries, bind, no_access, internal, external, errors


def render_iptables(nonempty: Mapping[str, bool], lb_no_node_access: Sequence[tuple[str, str, int]], config: RenderConfig) -> str:
    """kube-proxy's IPVS-mode iptables-restore input (createAndLinkKubeChain + writeIptablesRules)."""
    nat: list[str] = ["*nat", *(f":{c} - [0:0]" for c in NAT_CHAINS)]
    flt: list[str] = ["*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS)]
    mark = config.masquerade_mark
    comment = {s.name: f'"{s.comment}"' for s in IPSETS}

    lo = "::1/128" if config.ip_family == 6 else "127.0.0.0/8"
    nat.append(f"-A {KUBE_SERVICES} -s {lo} -j RETURN")
    for set_name, table, src, dst, match, proto in IPSET_RULES:
        if not nonempty.get(set_name):
            continue
        rule = f"-A {src}" + (f" -p {proto}" if proto else "")
        rule += f" -m comment --comment {comment[set_name]} -m set --match-set {set_name} {match} -j {dst}"
        (flt if table == "filter" else nat).append(rule)

    if nonempty.get(KUBE_CLUSTER_IP):
        base = f"-A {KUBE_SERVICES} -m comment --comment {comment[KUBE_CLUSTER_IP]} -m set --match-set {KUBE_CLUSTER_IP}"
        if config.masquerade_all:
            nat.append(f"{base} dst,dst -j {KUBE_MARK_MASQ}")
        elif config.local_detector_if_not_local:
            nat.append(f"{base} dst,dst {' '.join(config.local_detector_if_not_local)} -j {KUBE_MARK_MASQ}")
        else:
            # No way to tell pod traffic apart: masquerade node-originated traffic whose
            # source is a VIP (the dummy interface makes the VIP the chosen source).
            nat.append(f"{base} src,dst -j {KUBE_MARK_MASQ}")

    def external_ip_rules(base: str) -> None:
        nat.append(f"{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        nat.append(f"{base} -m addrtype --dst-type LOCAL -j ACCEPT")

    if nonempty.get(KUBE_EXTERNAL_IP):
        base = f"-A {KUBE_SERVICES} -m comment --comment {comment[KUBE_EXTERNAL_IP]} -m set --match-set {KUBE_EXTERNAL_IP} dst,dst"
        nat.append(f"{base} -j {KUBE_MARK_MASQ}")
        external_ip_rules(base)
    if nonempty.get(KUBE_EXTERNAL_IP_LOCAL):
        external_ip_rules(
            f"-A {KUBE_SERVICES} -m comment --comment {comment[KUBE_EXTERNAL_IP_LOCAL]} "
            f"-m set --match-set {KUBE_EXTERNAL_IP_LOCAL} dst,dst"
        )

    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}")
    flt.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    for ip, proto, port in lb_no_node_access:
        flt.append(f"-A {KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {proto} --vport {port} -j DROP")
    # Accept what IPVS will take, in case other rules would drop it.
    for set_name in (KUBE_CLUSTER_IP, KUBE_LOAD_BALANCER_SET):
        if nonempty.get(set_name):
            nat.append(f"-A {KUBE_SERVICES} -m set --match-set {set_name} dst,dst -j ACCEPT")

    flt.append(f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT')
    flt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    flt.append(
        f"-A {KUBE_NODE_PORT} -m comment --comment {comment[KUBE_HEALTH_CHECK_NODE_PORT]} "
        f"-m set --match-set {KUBE_HEALTH_CHECK_NODE_PORT} dst -j ACCEPT"
    )
    # Only service ports are reachable through a VIP, never other host ports (issue 72236).
    for set_name in (KUBE_LOAD_BALANCER_SET, KUBE_CLUSTER_IP, KUBE_EXTERNAL_IP, KUBE_EXTERNAL_IP_LOCAL):
        flt.append(f"-A {KUBE_IPVS_FILTER} -m set --match-set {set_name} dst,dst -j RETURN")
    flt.append(f"-A {KUBE_IPVS_FILTER} -m set --match-set {KUBE_HEALTH_CHECK_NODE_PORT} dst -j RETURN")
    flt.append(f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {KUBE_IPVS_IPS} dst -j REJECT")

    nat.append(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
    # Clear the mark so a packet that goes through the stack again is not masqueraded twice.
    nat.append(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
    masq = f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    nat.append(masq + (" --random-fully" if config.random_fully else ""))
    nat.append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")
    nat.append("COMMIT")
    flt.append("COMMIT")
    return "\n".join(nat + flt) + "\n"


def with_jumps(text: str, jumps: Sequence[tuple[str, str]]) -> str:
    """``text`` with (table, "-I ...") lines added after each table's chain declarations."""
    if not jumps:
        return text
    out: list[str] = []
    table = ""
    pending: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            pending = [j for t, j in jumps if t == table]
        elif pending and not line.startswith(":"):
            out += pending
            pending = []
        out.append(line)
    return "\n".join(out) + "\n"


def render(
    service_map: Mapping[ServicePortName, ServicePort],
    endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]],
    node: NodeInfo,
    config: RenderConfig,
    categorize: Categorize | None = None,
) -> Desired:
    """The whole desired state of a full sync."""
    frags = [
        render_service_port(name, svc, endpoints_map.get(name, ()), node, config, categorize)
        for name, svc in sorted(service_map.items())
    ]
    return desired_from(frags, config)


def desired_from(fragments: Iterable[Fragment], config: RenderConfig) -> Desired:
    services, entries, bind, no_access, internal, external, errors = combine(fragments)
    text = render_iptables({k: bool(v) for k, v in entries.items()}, no_access, config)
    return Desired(services, entries, bind, no_access, text, internal, external, errors)


# -- text forms ---------------------------------------------------------------

_PROTO_OPT = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def ipvsadm_save(services: Iterable[DesiredService] | Mapping[object, DesiredService]) -> str:
    """Virtual and real servers as ``ipvsadm -Sn`` prints them (``ipvsadm -R`` reads this back)."""
    items = services.values() if isinstance(services, Mapping) else services
    lines = []
    for d in sorted(items, key=lambda d: (d.vs.protocol, ipaddress.ip_address(d.vs.address).packed, d.vs.port)):
        vs = d.vs
        opt = f"{_PROTO_OPT[vs.protocol]} {_hostport(vs.address, vs.port)}"
        line = f"-A {opt} -s {vs.scheduler}"
        # ipvsadm's order: persistence, then scheduler flags (checked against `ipvsadm -Sn` in UML).
        if vs.flags & FLAG_PERSISTENT:
            line += f" -p {vs.timeout}"
        extra = [n for bit, n in ((FLAG_SCHED1, "fallback"), (FLAG_SCHED2, "port")) if vs.flags & bit]
        if extra:
            prefix = "mh" if vs.scheduler == "mh" else "sh"
            line += " -b " + ",".join(f"{prefix}-{n}" for n in extra)
        lines.append(line)
        for rs in d.real_servers:
            lines.append(f"-a {opt} -r {_hostport(rs.address, rs.port)} -m -w {rs.weight}")
    return "\n".join(lines) + ("\n" if lines else "")


def ipset_save(entries: Mapping[str, Iterable[str]]) -> str:
    """Set members in ``ipset save`` form (create lines without kernel-chosen details)."""
    out = []
    for spec in IPSETS:
        out.append("create " + " ".join(spec.create_argv()[2:-1]))
        for e in sorted(entries.get(spec.name, ())):
            out.append(f"add {spec.name} {e}")
    return "\n".join(out) + "\n"


def dry_run_text(desired: Desired, device: str = "kube-ipvs0") -> str:
    """What ``--dry-run`` prints: IPVS (ipvsadm -Sn), addresses, ipsets, iptables-restore input."""
    parts = [
        "# IPVS virtual servers (ipvsadm -Sn)",
        ipvsadm_save(desired.services).rstrip("\n"),
        f"# addresses on {device}",
        *(f"{a}/{128 if ':' in a else 32}" for a in sorted(desired.bind, key=lambda a: ipaddress.ip_address(a).packed)),
        "# ipsets (ipset save)",
        ipset_save(desired.set_entries).rstrip("\n"),
        "# iptables-restore --noflush",
        desired.iptables.rstrip("\n"),
    ]
    if desired.errors:
        parts += ["# problems", *(f"# {e}" for e in desired.errors)]
    return "\n".join(p for p in parts if p != "") + "\n"


def count_entries(fragments: Iterable[Fragment]) -> dict[str, Counter]:
    """Per set, how many fragments contribute each entry (for partial syncs)."""
    out: dict[str, Counter] = {s.name: Counter() for s in IPSETS}
    for f in fragments:
        for k, v in f.set_entries.items():
            out[k].update(v)
    return out
