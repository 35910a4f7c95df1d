"""Pure renderer: a SyncState in, kube-proxy's iptables-restore text out.

This is ``syncProxyRules`` of kube-proxy's iptables proxier
(``pkg/proxy/iptables/proxier.go``) without the side effects: the same chains,
the same rules in the same order, the same comments.  It touches no kernel
and keeps no state between calls except what the caller hands back in
(the previous :class:`RenderResult` and its :class:`ServiceFragment` per
service port).

* :meth:`Renderer.render_full` -- kube-proxy's full output, exactly
  (``--dry-run`` and the golden tests): ``*filter`` (KUBE-SERVICES,
  KUBE-EXTERNAL-SERVICES, KUBE-FORWARD, KUBE-NODEPORTS, KUBE-PROXY-FIREWALL,
  kubelet's KUBE-FIREWALL with localhost NodePorts) then ``*nat``
  (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ, the
  per-service KUBE-SVC/SVL/EXT/FW/SEP chains, ``-X`` of stale chains).
* :meth:`Renderer.stream_full` -- the same rules as chunks in an order that
  can be piped to iptables-restore while rendering.
* :meth:`Renderer.render_partial` -- only what changed since the previous
  result: the changed services' chains, ``-D``/``-I``/``-A`` of their
  top-level rules, ``-X`` of chains they dropped.

The per-service part is computed by :meth:`Renderer.render_service`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

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


@dataclass(slots=True)
class ServiceFragment:
    """The rules one service port contributes to a sync (what a partial sync may reuse).

    ``filter_rules`` and ``nat_top_rules`` are rules in the shared top-level
    chains (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES, ...); a
    partial sync adds or deletes exactly the ones that changed.  The
    service's own chains are kept as two ready-made blocks of restore text
    (declarations and rules), not as per-rule objects: one string per
    service instead of ~25 keeps a 10k-service cache small and the full-sync
    join fast.
    """

    filter_rules: tuple[str, ...]
    nat_top_rules: tuple[str, ...]
    chain_decls: str  # ":KUBE-SVC-... - [0:0]" lines joined with "\n" ("" when none)
    chain_rules: str  # "-A KUBE-SVC-... ..." lines joined with "\n" ("" when none)
    chain_rule_count: int = 0
    no_local_internal: bool = False
    no_local_external: bool = False
    endpoints: int = 0  # len(endpoints_map[name]) (all families, as kube-proxy counts), for large-cluster mode
    large: bool = False  # rendered in large-cluster mode (no per-endpoint comments)

    @property
    def nat_chains(self) -> list[str]:
        """Names of the service's own nat chains (KUBE-SVC-..., KUBE-SEP-...)."""
        return [line[1:].split(" ", 1)[0] for line in self.chain_decls.split("\n")] if self.chain_decls else []

    @property
    def nat_chain_rules(self) -> list[str]:
        return self.chain_rules.split("\n") if self.chain_rules else []


@dataclass
class RenderResult:
    """Output of one render: the restore text plus what kube-proxy's metrics and cleanup need."""

    text: str
    filter_rules: int  # rules in *filter after this sync (metric sync_proxy_rules_iptables_total{table="filter"})
    nat_rules_written: int  # -A/-I lines written in *nat this sync (iptables_last_sync{table="nat"})
    nat_rules_total: int  # rules in *nat after this sync (iptables_total{table="nat"})
    deleted_chains: list[str]
    total_endpoints: int
    large_cluster_mode: bool
    no_local_internal: int
    no_local_external: int
    fragments: dict[ServicePortName, ServiceFragment]
    full_sync: bool = True
    services_written: int = 0  # service ports whose own chains were (re)written
    _index: dict[tuple[str, str], list[ServicePortName]] | None = field(default=None, repr=False, compare=False)

    def by_service(self, services: Iterable[tuple[str, str]]) -> list[ServicePortName]:
        """The ports with fragments of these (namespace, name) services (an index built on first use)."""
        if self._index is None:
            index: dict[tuple[str, str], list[ServicePortName]] = {}
            for name in self.fragments:
                index.setdefault((name.namespace, name.name), []).append(name)
            self._index = index
        out: list[ServicePortName] = []
        for key in services:
            out.extend(self._index.get(key, ()))
        return out

    @property
    def active_nat_chains(self) -> set[str]:
        """Every per-service nat chain the rules now use (computed on demand: 60k names at 10k services)."""
        out: set[str] = set()
        for frag in self.fragments.values():
            out.update(frag.nat_chains)
        return out


def _q(text: str) -> str:
    """Quote a comment the way kube-proxy writes it (it quotes any comment with a space)."""
    return f'"{text}"'


def _family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def normalize_ip(ip: str) -> str | None:
    """An IP as iptables should see it, or None if unusable (kube-proxy's ParseIPSloppy + String())."""
    # Fast path: an already canonical IPv4 address round-trips through inet_pton
    # (which refuses leading zeros); ipaddress costs ~10x more per call.
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)) == ip:
            return ip
    except (OSError, ValueError, TypeError):
        pass
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
    strings, per-endpoint chain names, the last service map snapshot's ports
    by service), like kube-proxy's precomputed probabilities.
    """

    def __init__(self, config: RenderConfig, categorize: Categorize | None = None) -> None:
        self.config = config
        self._categorize = categorize or default_categorize()
        self._probabilities: list[str] = ["<bad value>"]
        # (service map, its ports by (namespace, name)): partial syncs look up the
        # changed services' ports here instead of scanning 10k names each sync.
        self._ports_index: tuple[Mapping[ServicePortName, ServicePort],
                                 dict[tuple[str, str], list[ServicePortName]]] | None = None

    # -- helpers -----------------------------------------------------------------

    def probability(self, n: int) -> str:
        probs = self._probabilities
        while len(probs) <= n:
            probs.append(C.compute_probability(len(probs)))
        return probs[n]

    def ports_of(self, service_map: Mapping[ServicePortName, ServicePort],
                 services: Iterable[tuple[str, str]]) -> list[ServicePortName]:
        """The ports in ``service_map`` of these (namespace, name) services.

        A snapshot (``MappingProxyType``, as the change trackers hand out: the
        same object while no Service changed, a new one after) is indexed once
        and the index kept until another snapshot comes: endpoint-only changes
        -- most partial syncs -- then cost O(changed), not a pass over 10k
        names (~4 ms).  Any other mapping (which its owner might mutate in
        place) is scanned each time.
        """
        wanted = set(services)
        if not isinstance(service_map, MappingProxyType):
            return [n for n in service_map if (n.namespace, n.name) in wanted]
        if self._ports_index is None or self._ports_index[0] is not service_map:
            index: dict[tuple[str, str], list[ServicePortName]] = {}
            for n in service_map:
                index.setdefault((n.namespace, n.name), []).append(n)
            self._ports_index = (service_map, index)
        index = self._ports_index[1]
        return [n for key in wanted for n in index.get(key, ())]

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
        raw_endpoints = len(endpoints)
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
            filter_rules=tuple(filt),
            nat_top_rules=tuple(top),
            chain_decls="\n".join([f":{c} - [0:0]" for c in chains]),
            chain_rules="\n".join(rules),
            chain_rule_count=len(rules),
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            endpoints=raw_endpoints,
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

    def _fixed_rules(self) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
        """The rules that do not depend on services: (filter chains, filter head, filter tail, nat head, nodeports tail)."""
        cfg = self.config
        filter_chains = [C.KUBE_SERVICES, C.KUBE_EXTERNAL_SERVICES, C.KUBE_FORWARD, C.KUBE_NODEPORTS, C.KUBE_PROXY_FIREWALL]
        filter_head: list[str] = []
        filter_tail: list[str] = []
        nat_head: list[str] = []
        mark = cfg.masquerade_mark
        nat_head.append(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
        # Clear the mark so a packet re-traversing the stack is not masqueraded twice.
        nat_head.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
        masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        if cfg.random_fully:
            masq += " --random-fully"
        nat_head.append(masq)
        nat_head.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")

        if cfg.ip_family == 4 and cfg.localhost_nodeports:
            # route_localnet opens a hole (https://issue.k8s.io/90259) that this rule
            # closes; kubelet writes an identical copy.
            filter_chains.append(C.KUBE_FIREWALL)
            filter_head.append(
                '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
                "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )

        # Tail-call to the nodeports chain; must come after all service rules.
        tail: list[str] = []
        nodeports_comment = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        if cfg.nodeport_match_all:
            dest = "-m addrtype --dst-type LOCAL"
            if cfg.ip_family == 6:
                dest += " ! -d ::1/128"
            elif not cfg.localhost_nodeports:
                dest += " ! -d 127.0.0.0/8"
            tail.append(f"-A KUBE-SERVICES -m comment --comment {nodeports_comment} {dest} -j KUBE-NODEPORTS")
        else:
            for ip in cfg.nodeport_ips:
                addr = ipaddress.ip_address(ip)
                if addr.version != cfg.ip_family:
                    continue
                if addr.is_loopback and (cfg.ip_family == 6 or not cfg.localhost_nodeports):
                    continue
                tail.append(f"-A KUBE-SERVICES -m comment --comment {nodeports_comment} -d {ip} -j KUBE-NODEPORTS")

        # Drop INVALID packets: they would otherwise reset connections
        # (https://github.com/kubernetes/kubernetes/issues/74839, #117924).
        if not cfg.conntrack_tcp_liberal:
            rule = "-A KUBE-FORWARD -m conntrack --ctstate INVALID"
            if C.NFACCT_CT_STATE_INVALID_DROPPED in cfg.nfacct_counters:
                rule += f" -m nfacct --nfacct-name {C.NFACCT_CT_STATE_INVALID_DROPPED}"
            filter_tail.append(rule + " -j DROP")
        # Forward what was marked for masquerade even if FORWARD's policy is DROP.
        filter_tail.append(
            f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
        )
        filter_tail.append(
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )
        return filter_chains, filter_head, filter_tail, nat_head, tail

    @staticmethod
    def total_endpoints(
        service_map: Mapping[ServicePortName, ServicePort], endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]]
    ) -> int:
        """kube-proxy's endpoint count for large-cluster mode (endpoints of services that exist)."""
        total = 0
        get = endpoints_map.get
        for name in service_map:
            eps = get(name)
            if eps:
                total += len(eps)
        return total

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
        previous_result: RenderResult | None = None,
    ) -> RenderResult:
        """Render one sync.

        A full sync (``full_sync``, or no ``previous`` fragments) writes kube-proxy's
        complete output: every top-level chain and every service's chains.
        ``existing_nat_chains`` (from iptables-save) lets stale per-service
        chains be flushed and deleted (``-X``); None skips that (kube-proxy skips
        it in large-cluster mode between cleanups).

        A partial sync (see :meth:`render_partial`) writes only what changed
        for the services whose "ns/name" is in ``updated_services``.
        """
        if not full_sync and previous is not None and previous_result is not None:
            return self.render_partial(service_map, endpoints_map, node, updated_services, previous, previous_result)
        return self.render_full(service_map, endpoints_map, node, existing_nat_chains)

    def render_full(
        self,
        service_map: Mapping[ServicePortName, ServicePort],
        endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]],
        node: NodeInfo,
        existing_nat_chains: Iterable[str] | None = None,
        extra: Mapping[str, Sequence[str]] | None = None,
    ) -> RenderResult:
        """kube-proxy's full ``syncProxyRules`` output, exactly.

        ``extra`` adds lines per table -- ``:CHAIN`` declarations go right after
        the table line, other lines before its COMMIT; a "mangle" entry becomes
        a table of its own -- so the proxier's jump rules and canaries join
        the text without a second copy of it (17 MB at 10k services).
        """
        extra = extra or {}

        def decls_of(table: str) -> list[str]:
            return [x for x in extra.get(table, ()) if x.startswith(":")]

        def rules_of(table: str) -> list[str]:
            return [x for x in extra.get(table, ()) if not x.startswith(":")]

        total_endpoints = self.total_endpoints(service_map, endpoints_map)
        large = total_endpoints > C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
        filter_chains, filter_head, filter_tail, nat_head, nodeports_tail = self._fixed_rules()

        fragments: dict[ServicePortName, ServiceFragment] = {}
        filter_rules: list[str] = []
        top_rules: list[str] = []
        decls: list[str] = []
        chain_rules: list[str] = []
        chain_rule_count = 0
        no_local_internal = no_local_external = 0
        empty: tuple[Endpoint, ...] = ()
        get = endpoints_map.get
        render_service = self.render_service
        # (namespace, name) -> ports: what partial syncs look changed services up by.
        index: dict[tuple[str, str], list[ServicePortName]] = {}
        index_get = index.setdefault

        # kube-proxy ranges over a Go map; sorting gives a stable text (and its tests sort too).
        for name in sorted(service_map, key=_name_key):
            frag = render_service(name, service_map[name], get(name, empty), node, large)
            if frag is None:
                continue
            fragments[name] = frag
            index_get((name.namespace, name.name), []).append(name)
            if frag.filter_rules:
                filter_rules.extend(frag.filter_rules)
            top_rules.extend(frag.nat_top_rules)
            if frag.chain_decls:
                decls.append(frag.chain_decls)
                chain_rules.append(frag.chain_rules)
                chain_rule_count += frag.chain_rule_count
            no_local_internal += frag.no_local_internal
            no_local_external += frag.no_local_external

        deleted: list[str] = []
        if existing_nat_chains is not None:
            active: set[str] = set()
            for frag in fragments.values():
                active.update(frag.nat_chains)
            deleted = sorted(c for c in set(existing_nat_chains) - active if C.is_service_chain_name(c))

        parts: list[str] = []
        if extra.get("mangle"):
            parts += ["*mangle", *decls_of("mangle"), *rules_of("mangle"), "COMMIT"]
        parts.append("*filter")
        parts.extend(decls_of("filter"))
        parts.extend(f":{c} - [0:0]" for c in filter_chains)
        parts.extend(filter_head)
        parts.extend(filter_rules)
        parts.extend(filter_tail)
        parts.extend(rules_of("filter"))
        parts.append("COMMIT")
        parts.append("*nat")
        parts.extend(decls_of("nat"))
        parts.extend(f":{c} - [0:0]" for c in (C.KUBE_SERVICES, C.KUBE_NODEPORTS, C.KUBE_POSTROUTING, C.KUBE_MARK_MASQ))
        parts.extend(decls)
        # A chain line flushes a stale chain; then it can be deleted.
        parts.extend(f":{c} - [0:0]" for c in deleted)
        parts.extend(nat_head)
        parts.extend(top_rules)
        parts.extend(chain_rules)
        parts.extend(nodeports_tail)
        parts.extend(f"-X {c}" for c in deleted)
        parts.extend(rules_of("nat"))
        parts.append("COMMIT")
        parts.append("")
        text = "\n".join(parts)
        del parts, decls, chain_rules

        nat_written = len(nat_head) + len(top_rules) + chain_rule_count + len(nodeports_tail)
        return RenderResult(
            text=text,
            filter_rules=len(filter_head) + len(filter_rules) + len(filter_tail),
            nat_rules_written=nat_written,
            nat_rules_total=nat_written,
            deleted_chains=deleted,
            total_endpoints=total_endpoints,
            large_cluster_mode=large,
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            fragments=fragments,
            full_sync=True,
            services_written=len(fragments),
            _index=index,
        )

    def stream_full(
        self,
        service_map: Mapping[ServicePortName, ServicePort],
        endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]],
        node: NodeInfo,
        existing_nat_chains: Iterable[str] | None = None,
        extra: Mapping[str, Sequence[str]] | None = None,
        batch: int = 250,
    ) -> FullStream:
        """A full sync as chunks of restore text, produced while iptables-restore reads them.

        The same rules as :meth:`render_full`, in an order that needs no
        look-ahead, so the proxier can pipe each chunk to the restore process
        as soon as it is rendered (rendering and the restore's parsing overlap
        on two cores, and the 17 MB text never exists in one piece):

        * ``*nat`` first: fixed rules, then per service (in kube-proxy's sorted
          order) its chain declarations, its chain rules and its
          KUBE-SERVICES / KUBE-NODEPORTS rules, then the nodeports jump (last
          in KUBE-SERVICES, as it must be) and the stale chains (declared --
          which flushes them -- and deleted); restore accepts chain lines
          anywhere in a table.
        * then ``*filter`` (whose per-service rules are collected meanwhile)
          and ``*mangle``.

        Each table still commits atomically.  The nat table commits before
        filter (kube-proxy writes filter first); both orders leave a moment
        where one table is new and the other old, and iptables-restore's
        atomicity is per table either way.  ``.result`` (fragments, counts) is
        set once the iterator is exhausted; its ``text`` is empty.
        """
        return FullStream(self, service_map, endpoints_map, node, existing_nat_chains, extra or {}, batch)

    def render_partial(
        self,
        service_map: Mapping[ServicePortName, ServicePort],
        endpoints_map: Mapping[ServicePortName, Sequence[Endpoint]],
        node: NodeInfo,
        updated_services: Iterable[str],
        previous: Mapping[ServicePortName, ServiceFragment],
        previous_result: RenderResult,
    ) -> RenderResult:
        """Only what changed since ``previous``, as ``--noflush`` restore text.

        Unlike kube-proxy (which rewrites KUBE-SERVICES, KUBE-NODEPORTS, ... in
        full on every sync), the top-level chains are not declared, so
        iptables-restore leaves them as they are; the rules of changed services
        are deleted (``-D`` with the exact text written before) and added.
        New KUBE-SERVICES rules are inserted at the top (``-I KUBE-SERVICES 1``)
        so the KUBE-NODEPORTS jump stays the last rule, as it must; the order
        of the other rules does not matter (each matches its own
        address/port/protocol) and the next full sync restores kube-proxy's.
        Other top-level rules are appended.  The changed services' own chains
        are rewritten in full, and chains they no longer use are flushed and
        deleted: stale chains are known from the fragments, no iptables-save.

        If a rule to delete is missing (someone edited the tables) the restore
        fails as a whole and the proxier retries with a full sync.  The result's
        ``fragments`` is a new dict (``previous`` is not modified).
        """
        # Everything here is O(changed services) (see ports_of; a pass over the names
        # would hash 10k ServicePortNames, dataclass __hash__, ~30 ms).
        updated = set(updated_services)
        if not updated:
            return replace(previous_result, text="", nat_rules_written=0, deleted_chains=[], full_sync=False,
                           services_written=0)
        pairs = {tuple(u.split("/", 1)) for u in updated}
        changed = self.ports_of(service_map, pairs)
        # Ports that went away (their service was updated or deleted): from the fragments.
        seen = set(changed)
        changed += [n for n in previous_result.by_service(pairs) if n not in seen]
        # The large-cluster count, kept up to date from the changed services only.
        total_endpoints = previous_result.total_endpoints
        for name in changed:
            old = previous.get(name)
            total_endpoints += len(endpoints_map.get(name, ())) - (old.endpoints if old else 0)
        # Crossing the large-cluster threshold changes only the services written now,
        # as upstream; the next full sync brings the rest along.
        large = total_endpoints > C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
        fragments = dict(previous)
        empty: tuple[Endpoint, ...] = ()

        filter_del: list[str] = []
        filter_add: list[str] = []
        top_del: list[str] = []
        services_add: list[str] = []
        other_add: list[str] = []
        decls: list[str] = []
        chain_rules: list[str] = []
        deleted: list[str] = []
        d_filter = d_nat = d_local_int = d_local_ext = 0
        written = 0

        for name in sorted(changed, key=_name_key):
            old = previous.get(name)
            new = None
            if name in service_map:
                new = self.render_service(name, service_map[name], endpoints_map.get(name, empty), node, large)
            if new is None:
                fragments.pop(name, None)
            else:
                fragments[name] = new
                written += 1
            old_filter = old.filter_rules if old else ()
            new_filter = new.filter_rules if new else ()
            old_top = old.nat_top_rules if old else ()
            new_top = new.nat_top_rules if new else ()
            filter_del.extend(r for r in old_filter if r not in new_filter)
            filter_add.extend(r for r in new_filter if r not in old_filter)
            top_del.extend(r for r in old_top if r not in new_top)
            for r in new_top:
                if r not in old_top:
                    (services_add if r.startswith("-A KUBE-SERVICES ") else other_add).append(r)
            new_chains = new.nat_chains if new else []
            if new is not None and new.chain_decls:
                decls.append(new.chain_decls)
                chain_rules.append(new.chain_rules)
            if old is not None:
                keep = set(new_chains)
                deleted.extend(c for c in old.nat_chains if c not in keep)
            d_filter += len(new_filter) - len(old_filter)
            d_nat += (len(new_top) + (new.chain_rule_count if new else 0)) - (
                len(old_top) + (old.chain_rule_count if old else 0)
            )
            d_local_int += (new.no_local_internal if new else 0) - (old.no_local_internal if old else 0)
            d_local_ext += (new.no_local_external if new else 0) - (old.no_local_external if old else 0)

        parts: list[str] = []
        if filter_del or filter_add:
            parts.append("*filter")
            parts.extend("-D" + r[2:] for r in filter_del)
            parts.extend(filter_add)
            parts.append("COMMIT")
        nat_written = 0
        if decls or deleted or top_del or services_add or other_add:
            parts.append("*nat")
            parts.extend(decls)
            parts.extend(f":{c} - [0:0]" for c in deleted)
            parts.extend("-D" + r[2:] for r in top_del)
            # Inserted one by one at position 1: go backwards to keep their relative order.
            parts.extend("-I KUBE-SERVICES 1" + r[len("-A KUBE-SERVICES"):] for r in reversed(services_add))
            parts.extend(other_add)
            parts.extend(chain_rules)
            parts.extend(f"-X {c}" for c in deleted)
            parts.append("COMMIT")
            nat_written = len(services_add) + len(other_add) + sum(r.count("\n") + 1 for r in chain_rules if r)
        if parts:
            parts.append("")
        index = None
        if previous_result._index is not None:
            index = dict(previous_result._index)
            for key in pairs:
                index.pop(key, None)
            for name in changed:
                if name in fragments:
                    index.setdefault((name.namespace, name.name), []).append(name)
        return RenderResult(
            text="\n".join(parts),
            filter_rules=previous_result.filter_rules + d_filter,
            nat_rules_written=nat_written,
            nat_rules_total=previous_result.nat_rules_total + d_nat,
            deleted_chains=deleted,
            total_endpoints=total_endpoints,
            large_cluster_mode=large,
            no_local_internal=previous_result.no_local_internal + d_local_int,
            no_local_external=previous_result.no_local_external + d_local_ext,
            fragments=fragments,
            full_sync=False,
            services_written=written,
            _index=index,
        )


class FullStream:
    """Iterator over the chunks of a streamed full sync (see :meth:`Renderer.stream_full`)."""

    def __init__(self, renderer: Renderer, service_map, endpoints_map, node, existing, extra, batch) -> None:
        self.renderer = renderer
        self.service_map = service_map
        self.endpoints_map = endpoints_map
        self.node = node
        self.existing = existing
        self.extra = extra
        self.batch = batch
        self.result: RenderResult | None = None
        self.seconds = 0.0  # time spent rendering (between handing out chunks)

    def __iter__(self):
        clock = time.perf_counter
        t0 = clock()
        for chunk in self._chunks():
            self.seconds += clock() - t0
            yield chunk
            t0 = clock()
        self.seconds += clock() - t0

    def _chunks(self):
        r = self.renderer
        service_map, endpoints_map, node, extra = self.service_map, self.endpoints_map, self.node, self.extra
        total_endpoints = r.total_endpoints(service_map, endpoints_map)
        large = total_endpoints > C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
        filter_chains, filter_head, filter_tail, nat_head, nodeports_tail = r._fixed_rules()

        def decls_of(table: str) -> list[str]:
            return [x for x in extra.get(table, ()) if x.startswith(":")]

        def rules_of(table: str) -> list[str]:
            return [x for x in extra.get(table, ()) if not x.startswith(":")]

        head = ["*nat", *decls_of("nat")]
        head.extend(f":{c} - [0:0]" for c in (C.KUBE_SERVICES, C.KUBE_NODEPORTS, C.KUBE_POSTROUTING, C.KUBE_MARK_MASQ))
        head.extend(nat_head)
        yield "\n".join(head) + "\n"

        fragments: dict[ServicePortName, ServiceFragment] = {}
        index: dict[tuple[str, str], list[ServicePortName]] = {}
        filter_rules: list[str] = []
        n_top = chain_rule_count = 0
        no_local_internal = no_local_external = 0
        empty: tuple[Endpoint, ...] = ()
        get = endpoints_map.get
        render_service = r.render_service
        out: list[str] = []
        for name in sorted(service_map, key=_name_key):
            frag = render_service(name, service_map[name], get(name, empty), node, large)
            if frag is None:
                continue
            fragments[name] = frag
            index.setdefault((name.namespace, name.name), []).append(name)
            if frag.filter_rules:
                filter_rules.extend(frag.filter_rules)
            if frag.chain_decls:
                out.append(frag.chain_decls)
                if frag.chain_rules:
                    out.append(frag.chain_rules)
                chain_rule_count += frag.chain_rule_count
            out.extend(frag.nat_top_rules)
            n_top += len(frag.nat_top_rules)
            no_local_internal += frag.no_local_internal
            no_local_external += frag.no_local_external
            if len(out) >= self.batch:
                yield "\n".join(out) + "\n"
                out = []

        deleted: list[str] = []
        if self.existing is not None:
            active: set[str] = set()
            for frag in fragments.values():
                active.update(frag.nat_chains)
            deleted = sorted(c for c in set(self.existing) - active if C.is_service_chain_name(c))
        out.extend(nodeports_tail)
        out.extend(f":{c} - [0:0]" for c in deleted)
        out.extend(f"-X {c}" for c in deleted)
        out.extend(rules_of("nat"))
        out.append("COMMIT")
        out.append("*filter")
        out.extend(decls_of("filter"))
        out.extend(f":{c} - [0:0]" for c in filter_chains)
        out.extend(filter_head)
        out.extend(filter_rules)
        out.extend(filter_tail)
        out.extend(rules_of("filter"))
        out.append("COMMIT")
        if extra.get("mangle"):
            out += ["*mangle", *decls_of("mangle"), *rules_of("mangle"), "COMMIT"]
        yield "\n".join(out) + "\n"

        nat_written = len(nat_head) + n_top + chain_rule_count + len(nodeports_tail)
        self.result = RenderResult(
            text="",
            filter_rules=len(filter_head) + len(filter_rules) + len(filter_tail),
            nat_rules_written=nat_written,
            nat_rules_total=nat_written,
            deleted_chains=deleted,
            total_endpoints=total_endpoints,
            large_cluster_mode=large,
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            fragments=fragments,
            full_sync=True,
            services_written=len(fragments),
            _index=index,
        )


def _name_key(name: ServicePortName) -> tuple[str, str, str, str]:
    # Sorting on a plain tuple is several times faster than the dataclass's __lt__.
    return (name.namespace, name.name, name.port, name.protocol)


def default_categorize() -> Categorize:
    """kube-proxy's CategorizeEndpoints (kubelab.proxy.topology)."""
    from kubelab.proxy.topology import categorize_endpoints

    return categorize_endpoints
