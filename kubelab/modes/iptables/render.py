"""Pure renderer: a SyncState in, kube-proxy's iptables-restore text out.

This is ``syncProxyRules`` of kube-proxy's iptables proxier
(``pkg/proxy/iptables/proxier.go``) without the side effects: the same chains,
the same rules in the same order, the same comments.  It touches no kernel
and keeps no state between calls except what the caller hands back in
(:class:`ServiceFragment` caches for partial syncs).

Shape of a sync, as in kube-proxy:

* ``*filter``: KUBE-SERVICES / KUBE-EXTERNAL-SERVICES / KUBE-FORWARD /
  KUBE-NODEPORTS / KUBE-PROXY-FIREWALL (+ kubelet's KUBE-FIREWALL when
  localhost NodePorts are on), always rewritten in full;
* ``*nat``: KUBE-SERVICES / KUBE-NODEPORTS / KUBE-POSTROUTING /
  KUBE-MARK-MASQ always rewritten in full, then the per-service
  KUBE-SVC/SVL/EXT/FW/SEP chains -- on a partial sync only for the services
  that changed -- and ``-X`` for stale per-service chains.

The per-service part is computed by :func:`render_service` into a
:class:`ServiceFragment`, so the proxier can keep fragments of unchanged
services between syncs (a partial sync then only renders what changed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.iptables import chains as C

# A categorizer: kube-proxy's CategorizeEndpoints, returning
# (cluster_endpoints, local_endpoints, all_reachable_endpoints, has_any_endpoints).
Categorize = Callable[[Sequence[Endpoint], ServicePort, NodeInfo], object]


@dataclass(frozen=True)
class LocalDetector:
    """kube-proxy's LocalTrafficDetector: match arguments for "from a local pod" and its negation.

    ``ClusterCIDR`` / ``NodeCIDR`` detect by source CIDR (``-s``); ``BridgeInterface``
    and ``InterfaceNamePrefix`` by input interface (``-i``).  An empty detector
    (no arguments) is kube-proxy's no-op detector: ``implemented`` is False.
    """

    if_local: tuple[str, ...] = ()
    if_not_local: tuple[str, ...] = ()

    @property
    def implemented(self) -> bool:
        return bool(self.if_local)

    @classmethod
    def by_cidr(cls, cidr: str) -> LocalDetector:
        net = str(ipaddress.ip_network(cidr.strip(), strict=False))
        return cls(("-s", net), ("!", "-s", net))

    @classmethod
    def by_interface(cls, name: str) -> LocalDetector:
        return cls(("-i", name), ("!", "-i", name))

    @classmethod
    def by_interface_prefix(cls, prefix: str) -> LocalDetector:
        return cls(("-i", prefix + "+"), ("!", "-i", prefix + "+"))


@dataclass(frozen=True)
class RenderConfig:
    """Everything besides the service/endpoint maps that shapes the rules (fixed per proxier)."""

    ip_family: int = 4
    masquerade_all: bool = False
    masquerade_mark: str = "0x004000"  # "%#08x" % (1 << --iptables-masquerade-bit), as kube-proxy formats it
    local_detector: LocalDetector = field(default_factory=LocalDetector)
    # route_localnet NodePorts on 127.0.0.0/8 (IPv4 only), kube-proxy's --iptables-localhost-nodeports
    # after it was turned off for --nodeport-addresses that exclude loopback.
    localhost_nodeports: bool = True
    # --nodeport-addresses: match every local address (None / 0.0.0.0/0), or only these node IPs.
    nodeport_match_all: bool = True
    nodeport_ips: tuple[str, ...] = ()
    node_ip: str = ""  # the node's primary IP (LoadBalancerSourceRanges "allow from node")
    random_fully: bool = False  # iptables supports MASQUERADE --random-fully
    conntrack_tcp_liberal: bool = False  # nf_conntrack_tcp_be_liberal set: no INVALID drop rule
    nfacct_counters: frozenset[str] = frozenset()  # counters that exist (kube-proxy's nfAcctCounters)


@dataclass
class ServiceFragment:
    """The rules one service port contributes to a sync (what a partial sync may reuse).

    ``filter_rules`` and ``nat_top_rules`` go to top-level chains and are written
    on every sync; ``nat_chains``/``nat_chain_rules`` are the service's own
    chains, written only when the service changed (or on a full sync).
    """

    filter_rules: list[str]
    nat_top_rules: list[str]
    nat_chains: list[str]  # chain names (KUBE-SVC-..., KUBE-SEP-...)
    nat_chain_rules: list[str]
    no_local_internal: bool = False
    no_local_external: bool = False
    endpoints: int = 0  # len(endpoints_map[name]), for large-cluster mode
    large: bool = False  # rendered in large-cluster mode (no per-endpoint comments)


@dataclass
class RenderResult:
    """Output of one render: the restore text plus what kube-proxy's metrics and cleanup need."""

    text: str
    filter_rules: int  # rules in *filter (metric sync_proxy_rules_iptables_total{table="filter"})
    nat_rules_written: int  # -A lines written in *nat this sync (iptables_last_sync{table="nat"})
    nat_rules_total: int  # rules in *nat after this sync (iptables_total{table="nat"})
    active_nat_chains: set[str]
    deleted_chains: list[str]
    total_endpoints: int
    large_cluster_mode: bool
    no_local_internal: int
    no_local_external: int
    fragments: dict[ServicePortName, ServiceFragment]


def _q(text: str) -> str:
    """Quote a comment the way kube-proxy writes it (it quotes any comment with a space)."""
    return f'"{text}"'


def _family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def normalize_ip(ip: str) -> str | None:
    """An IP as iptables should see it, or None if unusable (kube-proxy's ParseIPSloppy + String())."""
    text = ip.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if "." in text and ":" not in text:
        parts = text.split(".")
        if len(parts) == 4 and all(p.isdigit() for p in parts):
            try:
                return str(ipaddress.ip_address(".".join(str(int(p)) for p in parts)))
            except ValueError:
                return None
    return None


def normalize_cidr(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CIDR as kube-proxy would print it (whitespace and leading zeros tolerated), or None."""
    text = cidr.strip()
    addr, sep, plen = text.partition("/")
    ip = normalize_ip(addr)
    if ip is None:
        return None
    try:
        return ipaddress.ip_network(f"{ip}/{int(plen)}" if sep else ip, strict=False)
    except ValueError:
        return None


def _ips(values: Iterable[str], family: int) -> list[str]:
    out = []
    for v in values:
        ip = normalize_ip(v)
        if ip is not None and _family_of(ip) == family:
            out.append(ip)
    return out


class Renderer:
    """Renders service fragments and whole syncs for one :class:`RenderConfig`.

    Holds only caches that depend on nothing but its inputs (probability
    strings, per-endpoint chain names), like kube-proxy's precomputed
    probabilities.
    """

    def __init__(self, config: RenderConfig, categorize: Categorize | None = None) -> None:
        self.config = config
        self._categorize = categorize or default_categorize()
        self._probabilities: list[str] = ["<bad value>"]

    # -- helpers -----------------------------------------------------------------

    def probability(self, n: int) -> str:
        probs = self._probabilities
        while len(probs) <= n:
            probs.append(C.compute_probability(len(probs)))
        return probs[n]

    # -- one service port --------------------------------------------------------

    def render_service(
        self,
        name: ServicePortName,
        svc: ServicePort,
        endpoints: Sequence[Endpoint],
        node: NodeInfo,
        large: bool,
    ) -> ServiceFragment | None:
        """The rules of one service port, in kube-proxy's order; None if not this family's."""
        cfg = self.config
        family = cfg.ip_family
        cluster_ip = normalize_ip(svc.cluster_ip) if svc.cluster_ip else None
        if cluster_ip is None or _family_of(cluster_ip) != family:
            return None
        if any(_family_of(ep.ip) != family for ep in endpoints):
            endpoints = [ep for ep in endpoints if _family_of(ep.ip) == family]

        protocol = svc.protocol.lower()
        spn = str(name)
        svc_chain, svl_chain, fw_chain, ext_chain = C.service_chain_names(spn, protocol)
        port = str(svc.port)
        proto_args = f"-m {protocol} -p {protocol}"

        cat = self._categorize(endpoints, svc, node)
        if hasattr(cat, "cluster_endpoints"):
            cluster_eps, local_eps = cat.cluster_endpoints or (), cat.local_endpoints or ()
            reachable_eps, has_endpoints = cat.all_reachable_endpoints, cat.has_any_endpoints
        else:
            cluster_eps, local_eps, reachable_eps, has_endpoints = cat

        uses_cluster_chain = bool(cluster_eps) and svc.uses_cluster_endpoints
        uses_local_chain = bool(local_eps) and svc.uses_local_endpoints

        internal_chain = svc_chain
        has_internal = has_endpoints
        if svc.internal_policy_local:
            internal_chain = svl_chain
            if not local_eps:
                has_internal = False

        external_policy_chain = svc_chain
        has_external = has_endpoints
        if svc.external_policy_local:
            external_policy_chain = svl_chain
            if not local_eps:
                has_external = False

        externally_accessible = svc.externally_accessible
        uses_ext_chain = has_endpoints and externally_accessible
        external_ips = _ips(svc.external_ips, family)
        lb_vips = _ips(svc.load_balancer_vips, family)
        source_ranges = []
        for r in svc.load_balancer_source_ranges:
            net = normalize_cidr(r)
            if net is not None and net.version == family:
                source_ranges.append(net)
        uses_fw_chain = has_endpoints and bool(lb_vips) and bool(source_ranges)
        lb_chain = fw_chain if uses_fw_chain else ext_chain

        no_local_internal = no_local_external = False
        internal_target = internal_comment = external_target = external_comment = ""
        if not has_endpoints:
            internal_target = external_target = "REJECT"
            internal_comment = external_comment = _q(f"{spn} has no endpoints")
        else:
            if not has_internal:
                internal_target = "DROP"
                internal_comment = _q(f"{spn} has no local endpoints")
                no_local_internal = True
            if not has_external:
                external_target = "DROP"
                external_comment = _q(f"{spn} has no local endpoints")
                no_local_external = True

        filt: list[str] = []
        top: list[str] = []

        # Capture the clusterIP.
        cluster_match = f"-m comment --comment {_q(spn + ' cluster IP')} {proto_args} -d {cluster_ip} --dport {port}"
        if has_internal:
            top.append(f"-A KUBE-SERVICES {cluster_match} -j {internal_chain}")
        else:
            filt.append(
                f"-A KUBE-SERVICES -m comment --comment {internal_comment} {proto_args} "
                f"-d {cluster_ip} --dport {port} -j {internal_target}"
            )

        # Capture externalIPs.
        for eip in external_ips:
            if has_endpoints:
                top.append(
                    f"-A KUBE-SERVICES -m comment --comment {_q(spn + ' external IP')} {proto_args} "
                    f"-d {eip} --dport {port} -j {ext_chain}"
                )
            if not has_external:
                filt.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {external_comment} {proto_args} "
                    f"-d {eip} --dport {port} -j {external_target}"
                )

        # Capture load-balancer ingress.
        for lbip in lb_vips:
            if has_endpoints:
                top.append(
                    f"-A KUBE-SERVICES -m comment --comment {_q(spn + ' loadbalancer IP')} {proto_args} "
                    f"-d {lbip} --dport {port} -j {lb_chain}"
                )
            if uses_fw_chain:
                filt.append(
                    f"-A KUBE-PROXY-FIREWALL -m comment --comment {_q(f'{spn} traffic not accepted by {fw_chain}')} "
                    f"{proto_args} -d {lbip} --dport {port} -j DROP"
                )
        if not has_external:
            for lbip in lb_vips:
                filt.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {external_comment} {proto_args} "
                    f"-d {lbip} --dport {port} -j {external_target}"
                )

        # Capture nodeports.
        if svc.node_port:
            node_port = str(svc.node_port)
            if has_endpoints:
                if (
                    cfg.localhost_nodeports
                    and family == 4
                    and C.NFACCT_LOCALHOST_NODEPORT_ACCEPTED in cfg.nfacct_counters
                ):
                    top.append(
                        f"-A KUBE-NODEPORTS -m comment --comment {spn} {proto_args} -d 127.0.0.0/8 "
                        f"--dport {node_port} -m nfacct --nfacct-name {C.NFACCT_LOCALHOST_NODEPORT_ACCEPTED} "
                        f"-j {ext_chain}"
                    )
                top.append(f"-A KUBE-NODEPORTS -m comment --comment {spn} {proto_args} --dport {node_port} -j {ext_chain}")
            if not has_external:
                filt.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {external_comment} -m addrtype --dst-type LOCAL "
                    f"{proto_args} --dport {node_port} -j {external_target}"
                )

        # Capture healthCheckNodePorts: accepted whether or not there are local endpoints.
        if svc.health_check_node_port:
            filt.append(
                f"-A KUBE-NODEPORTS -m comment --comment {_q(spn + ' health check node port')} -m tcp -p tcp "
                f"--dport {svc.health_check_node_port} -j ACCEPT"
            )

        chains: list[str] = []
        rules: list[str] = []

        # Internal traffic handling.
        if has_internal:
            if cfg.masquerade_all:
                rules.append(f"-A {internal_chain} {cluster_match} -j KUBE-MARK-MASQ")
            elif cfg.local_detector.implemented:
                # Masquerade off-cluster traffic to a service VIP (a static route for
                # the service range to any node "just works").
                rules.append(
                    f"-A {internal_chain} {cluster_match} {' '.join(cfg.local_detector.if_not_local)} -j KUBE-MARK-MASQ"
                )

        # External traffic handling: everything external goes through KUBE-EXT.
        if uses_ext_chain:
            chains.append(ext_chain)
            if not svc.external_policy_local:
                # Non-local endpoints may be on another node: masquerade.
                rules.append(
                    f"-A {ext_chain} -m comment --comment {_q(f'masquerade traffic for {spn} external destinations')} "
                    f"-j KUBE-MARK-MASQ"
                )
            else:
                if cfg.local_detector.implemented:
                    # Pod -> external IP traffic short-circuits to all endpoints, as if
                    # it had gone out to the load balancer and come back.
                    rules.append(
                        f"-A {ext_chain} -m comment --comment {_q(f'pod traffic for {spn} external destinations')} "
                        f"{' '.join(cfg.local_detector.if_local)} -j {svc_chain}"
                    )
                # Host-originated traffic still needs masquerade (its source is a local IP).
                rules.append(
                    f"-A {ext_chain} -m comment --comment {_q(f'masquerade LOCAL traffic for {spn} external destinations')} "
                    f"-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                )
                rules.append(
                    f"-A {ext_chain} -m comment --comment {_q(f'route LOCAL traffic for {spn} external destinations')} "
                    f"-m addrtype --src-type LOCAL -j {svc_chain}"
                )
            if has_external:
                rules.append(f"-A {ext_chain} -j {external_policy_chain}")

        # Firewall chain for loadBalancerSourceRanges.
        if uses_fw_chain:
            chains.append(fw_chain)
            fw_head = f"-A {fw_chain} -m comment --comment {_q(spn + ' loadbalancer IP')}"
            allow_from_node = False
            node_ip = ipaddress.ip_address(cfg.node_ip) if cfg.node_ip else None
            for net in source_ranges:
                rules.append(f"{fw_head} -s {net} -j {ext_chain}")
                if node_ip is not None and node_ip.version == net.version and node_ip in net:
                    allow_from_node = True
            # A VIP bound locally makes node -> VIP traffic loop back with the VIP as source.
            if allow_from_node:
                for lbip in lb_vips:
                    rules.append(f"{fw_head} -s {lbip} -j {ext_chain}")
            # What reaches the end was not DNATed and gets dropped by KUBE-PROXY-FIREWALL.
            rules.append(
                f"-A {fw_chain} -m comment --comment {_q(f'other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL')}"
            )

        sep_names: dict[str, str] = {}

        def sep_chain(ep: Endpoint) -> str:
            key = str(ep)
            chain = sep_names.get(key)
            if chain is None:
                chain = C.endpoint_chain_name(spn, protocol, key)
                sep_names[key] = chain
            return chain

        if uses_cluster_chain:
            chains.append(svc_chain)
            self._service_to_endpoint_rules(rules, spn, svc, svc_chain, cluster_eps, sep_chain, large)
        if uses_local_chain:
            chains.append(svl_chain)
            self._service_to_endpoint_rules(rules, spn, svc, svl_chain, local_eps, sep_chain, large)

        # Per-endpoint chains.
        affinity = svc.session_affinity_client_ip
        comment = "" if large else f" -m comment --comment {spn}"
        for ep in reachable_eps:
            chain = sep_chain(ep)
            chains.append(chain)
            head = f"-A {chain}{comment}"
            # Hairpin: traffic looping back to its originator gets SNAT.
            rules.append(f"{head} -s {ep.ip} -j KUBE-MARK-MASQ")
            recent = f" -m recent --name {chain} --set" if affinity else ""
            rules.append(f"{head}{recent} {proto_args} -j DNAT --to-destination {ep}")

        return ServiceFragment(
            filter_rules=filt,
            nat_top_rules=top,
            nat_chains=chains,
            nat_chain_rules=rules,
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            endpoints=len(endpoints),
            large=large,
        )

    def _service_to_endpoint_rules(
        self,
        rules: list[str],
        spn: str,
        svc: ServicePort,
        svc_chain: str,
        endpoints: Sequence[Endpoint],
        sep_chain: Callable[[Endpoint], str],
        large: bool,
    ) -> None:
        # kube-proxy's writeServiceToEndpointRules.
        if svc.session_affinity_client_ip:
            seconds = svc.sticky_max_age_seconds
            for ep in endpoints:
                chain = sep_chain(ep)
                comment = "" if large else f" -m comment --comment {_q(f'{spn} -> {ep}')}"
                rules.append(
                    f"-A {svc_chain}{comment} -m recent --name {chain} --rcheck --seconds {seconds} --reap -j {chain}"
                )
        n = len(endpoints)
        for i, ep in enumerate(endpoints):
            comment = "" if large else f" -m comment --comment {_q(f'{spn} -> {ep}')}"
            if i < n - 1:
                rules.append(
                    f"-A {svc_chain}{comment} -m statistic --mode random --probability {self.probability(n - i)} "
                    f"-j {sep_chain(ep)}"
                )
            else:
                rules.append(f"-A {svc_chain}{comment} -j {sep_chain(ep)}")

    # -- a whole sync ----------------------------------------------------------

    def render(
        self,
        service_map: Mapping[ServicePortName, ServicePort],
        endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]],
        node: NodeInfo,
        *,
        full_sync: bool = True,
        updated_services: Iterable[str] = (),
        previous: Mapping[ServicePortName, ServiceFragment] | None = None,
        existing_nat_chains: Iterable[str] | None = None,
    ) -> RenderResult:
        """Render one sync.

        ``full_sync`` writes every service's chains; otherwise only those whose
        "ns/name" is in ``updated_services`` (or that have no fragment in
        ``previous``) are rendered and written, the others' top-level rules are
        taken from ``previous``.  ``existing_nat_chains`` (from iptables-save)
        lets stale per-service chains be flushed and deleted (``-X``); None skips
        that (kube-proxy skips it in large-cluster mode between cleanups).
        """
        cfg = self.config
        updated = set(updated_services)
        previous = previous or {}

        total_endpoints = 0
        for name in service_map:
            eps = endpoints_map.get(name)
            if eps:
                total_endpoints += len(eps)
        large = total_endpoints > C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD

        filter_chains = [C.KUBE_SERVICES, C.KUBE_EXTERNAL_SERVICES, C.KUBE_FORWARD, C.KUBE_NODEPORTS, C.KUBE_PROXY_FIREWALL]
        nat_chain_names = [C.KUBE_SERVICES, C.KUBE_NODEPORTS, C.KUBE_POSTROUTING, C.KUBE_MARK_MASQ]
        filter_rules: list[str] = []
        nat_rules: list[str] = []

        mark = cfg.masquerade_mark
        nat_rules.append(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
        # Clear the mark so a packet re-traversing the stack is not masqueraded twice.
        nat_rules.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
        masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        if cfg.random_fully:
            masq += " --random-fully"
        nat_rules.append(masq)
        nat_rules.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")

        if cfg.ip_family == 4 and cfg.localhost_nodeports:
            # route_localnet opens a hole (https://issue.k8s.io/90259) that this rule
            # closes; kubelet writes an identical copy.
            filter_chains.append(C.KUBE_FIREWALL)
            filter_rules.append(
                '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
                "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )

        fragments: dict[ServicePortName, ServiceFragment] = {}
        active: set[str] = set()
        chain_lines: list[str] = []
        chain_rules: list[str] = []
        skipped_rules = 0
        no_local_internal = no_local_external = 0
        empty: tuple[Endpoint, ...] = ()

        for name in sorted(service_map):
            svc = service_map[name]
            write_chains = full_sync or name.namespaced_name in updated
            frag = None if write_chains else previous.get(name)
            if frag is None:
                frag = self.render_service(name, svc, endpoints_map.get(name, empty), node, large)
                if frag is None:
                    continue
                write_chains = True
            fragments[name] = frag
            filter_rules.extend(frag.filter_rules)
            nat_rules.extend(frag.nat_top_rules)
            active.update(frag.nat_chains)
            if write_chains:
                chain_lines.extend(frag.nat_chains)
                chain_rules.extend(frag.nat_chain_rules)
            else:
                skipped_rules += len(frag.nat_chain_rules)
            no_local_internal += frag.no_local_internal
            no_local_external += frag.no_local_external

        nat_chain_names.extend(chain_lines)
        nat_rules.extend(chain_rules)

        deleted: list[str] = []
        if existing_nat_chains is not None:
            for chain in sorted(set(existing_nat_chains) - active):
                if C.is_service_chain_name(chain):
                    # A chain line flushes it; then it can be deleted.
                    nat_chain_names.append(chain)
                    deleted.append(chain)

        # Tail-call to the nodeports chain; must come after all service rules.
        nodeports_comment = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        if cfg.nodeport_match_all:
            dest = "-m addrtype --dst-type LOCAL"
            if cfg.ip_family == 6:
                dest += " ! -d ::1/128"
            elif not cfg.localhost_nodeports:
                dest += " ! -d 127.0.0.0/8"
            nat_rules.append(f"-A KUBE-SERVICES -m comment --comment {nodeports_comment} {dest} -j KUBE-NODEPORTS")
        else:
            for ip in cfg.nodeport_ips:
                addr = ipaddress.ip_address(ip)
                if addr.version != cfg.ip_family:
                    continue
                if addr.is_loopback and (cfg.ip_family == 6 or not cfg.localhost_nodeports):
                    continue
                nat_rules.append(f"-A KUBE-SERVICES -m comment --comment {nodeports_comment} -d {ip} -j KUBE-NODEPORTS")

        # Drop INVALID packets: they would otherwise reset connections
        # (https://github.com/kubernetes/kubernetes/issues/74839, #117924).
        if not cfg.conntrack_tcp_liberal:
            rule = "-A KUBE-FORWARD -m conntrack --ctstate INVALID"
            if C.NFACCT_CT_STATE_INVALID_DROPPED in cfg.nfacct_counters:
                rule += f" -m nfacct --nfacct-name {C.NFACCT_CT_STATE_INVALID_DROPPED}"
            filter_rules.append(rule + " -j DROP")
        # Forward what was marked for masquerade even if FORWARD's policy is DROP.
        filter_rules.append(
            f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
        )
        filter_rules.append(
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )

        parts = ["*filter"]
        parts.extend(f":{c} - [0:0]" for c in filter_chains)
        parts.extend(filter_rules)
        parts.append("COMMIT")
        parts.append("*nat")
        parts.extend(f":{c} - [0:0]" for c in nat_chain_names)
        parts.extend(nat_rules)
        parts.extend(f"-X {c}" for c in deleted)
        parts.append("COMMIT")
        parts.append("")
        text = "\n".join(parts)

        return RenderResult(
            text=text,
            filter_rules=len(filter_rules),
            nat_rules_written=len(nat_rules),
            nat_rules_total=len(nat_rules) + skipped_rules,
            active_nat_chains=active,
            deleted_chains=deleted,
            total_endpoints=total_endpoints,
            large_cluster_mode=large,
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            fragments=fragments,
        )


def default_categorize() -> Categorize:
    """kube-proxy's CategorizeEndpoints (kubelab.proxy.topology)."""
    from kubelab.proxy.topology import categorize_endpoints

    return categorize_endpoints
