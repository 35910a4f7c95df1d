"""Change tracking for Services and EndpointSlices, as kube-proxy does it.

This is kube-proxy's ``pkg/proxy`` core in Python:

* :func:`service_to_service_map` -- one Service object becomes one
  :class:`~kubelab.model.ServicePort` per port (``newBaseServiceInfo`` in
  upstream ``serviceport.go``).
* :class:`ServiceChangeTracker` -- per Service, the port map *before* the first
  pending change and *after* the last one; an entry whose two sides are equal
  is dropped (``servicechangetracker.go``).
* :class:`EndpointSliceCache` -- several EndpointSlices of one Service merged
  into one list of :class:`~kubelab.model.Endpoint` per ServicePortName,
  deduplicated by ``ip:port`` (``endpointslicecache.go``).
* :class:`EndpointsChangeTracker` -- pending slice changes plus the
  ``endpoints.kubernetes.io/last-change-trigger-time`` of each, for the
  network-programming-latency metric (``endpointschangetracker.go``).
* :class:`ServicePortMap` / :class:`EndpointsMap` -- the current state, updated
  from a tracker by ``update(tracker)``, which returns what changed
  (:class:`UpdateServiceMapResult` / :class:`UpdateEndpointsMapResult`,
  including the stale-UDP facts conntrack cleanup needs), and read by the
  controller as immutable snapshots.

Upstream: https://github.com/kubernetes/kubernetes/tree/master/pkg/proxy
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from kubelab.model import (
    LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME,
    Endpoint,
    EndpointSlice,
    Service,
    ServicePort,
    ServicePortName,
)

log = logging.getLogger("kubelab.proxy.changes")

# Annotations kube-proxy reads (k8s.io/api/core/v1 well_known_annotations.go).
ANNOTATION_TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_AWARE_HINTS = "service.kubernetes.io/topology-aware-hints"  # deprecated spelling
ANNOTATION_LAST_CHANGE_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

# Service annotations that are bookkeeping of other tools, never dataplane
# input: leaving them out of ServicePort keeps `kubectl apply` of an unchanged
# spec a no-op change.
_IGNORED_ANNOTATION_PREFIXES = ("kubectl.kubernetes.io/", "deployment.kubernetes.io/")

# kube-proxy handles only IP address types (supportedEndpointSliceAddressTypes).
_SUPPORTED_ADDRESS_TYPES = {4: "IPv4", 6: "IPv6"}


def _family(ip: str) -> int | None:
    """The IP version of an address or CIDR, or None when it is neither."""
    try:
        if "/" in ip:
            return ipaddress.ip_network(ip.strip(), strict=False).version
        return ipaddress.ip_address(ip.strip()).version
    except ValueError:
        pass
    # kube-proxy parses "sloppily" (leading zeros allowed, TestBadIPs): retry normalised.
    addr, sep, plen = ip.strip().partition("/")
    try:
        if sep:
            return ipaddress.ip_network(f"{_normalize_ip(addr)}/{int(plen)}", strict=False).version
        return ipaddress.ip_address(_normalize_ip(addr)).version
    except ValueError:
        return None


def _canonical_ipv4(ip: str) -> bool:
    """True for dotted-quad text that is already canonical (the common case, checked cheaply)."""
    parts = ip.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        if not p.isdigit() or (len(p) > 1 and p[0] == "0") or len(p) > 3 or int(p) > 255:
            return False
    return True


def _normalize_ip(ip: str) -> str:
    """The canonical text of an IP (kube-proxy: ParseIPSloppy(ip).String())."""
    # ipaddress parsing dominated applying 50k endpoints; most IPs are canonical already.
    if _canonical_ipv4(ip):
        return ip
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        # IPv4 with leading zeros ("010.0.0.1") is what "sloppy" parsing is
        # for: Go's legacy parser reads each octet as decimal.
        parts = ip.split(".")
        if len(parts) == 4 and all(p.isdigit() for p in parts):
            return ".".join(str(int(p)) for p in parts)
        return ip


def is_proxied(obj: Service | EndpointSlice) -> bool:
    """False for objects kube-proxy's informers never see.

    kube-proxy lists Services and EndpointSlices with the label selector
    ``!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless``
    (cmd/kube-proxy/app/server.go): such objects belong to another proxy, or
    are a headless service's slices.
    """
    labels = obj.meta.labels
    return LABEL_SERVICE_PROXY_NAME not in labels and LABEL_HEADLESS not in labels


def should_skip_service(svc: Service) -> bool:
    """kube-proxy's ShouldSkipService: no cluster IP (headless, unset) or ExternalName."""
    if svc.cluster_ip in ("", "None"):
        return True
    return svc.type == "ExternalName"


def externally_accessible(svc: Service) -> bool:
    """pkg/api/v1/service ExternallyAccessible: NodePort, LoadBalancer, or ClusterIP with externalIPs."""
    return svc.type in ("LoadBalancer", "NodePort") or (svc.type == "ClusterIP" and bool(svc.external_ips))


def external_policy_local(svc: Service) -> bool:
    """externalTrafficPolicy Local counts only for externally accessible services."""
    return externally_accessible(svc) and svc.external_traffic_policy == "Local"


def needs_health_check(svc: Service) -> bool:
    """A LoadBalancer with externalTrafficPolicy Local gets a healthCheckNodePort."""
    return svc.type == "LoadBalancer" and external_policy_local(svc)


def cluster_ip_for_family(svc: Service, ip_family: int) -> str:
    """The service's cluster IP of one family, "" when it has none (GetClusterIPByFamily)."""
    for ip in svc.cluster_ips:
        if _family(ip) == ip_family:
            return _normalize_ip(ip)
    return ""


def service_to_service_map(svc: Service | None, ip_family: int = 4) -> dict[ServicePortName, ServicePort]:
    """One Service as ``{ServicePortName: ServicePort}`` for one IP family.

    Empty for a missing Service, one kube-proxy skips (headless,
    ExternalName, no cluster IP of this family) or one labelled for another
    proxy.  Mirrors upstream ``serviceToServiceMap`` + ``newBaseServiceInfo``.
    """
    if svc is None or not is_proxied(svc) or should_skip_service(svc):
        return {}
    cluster_ip = cluster_ip_for_family(svc, ip_family)
    if not cluster_ip:
        return {}

    sticky = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    external_ips = tuple(_normalize_ip(ip) for ip in svc.external_ips if _family(ip) == ip_family)
    # LoadBalancerSourceRanges validation lets whitespace through; upstream trims it.
    source_ranges = tuple(r.strip() for r in svc.load_balancer_source_ranges if _family(r) == ip_family)
    # Only VIP-style ingress is programmed: ipMode Proxy means the load
    # balancer itself delivers to the node (KEP-1860).
    lb_vips = tuple(
        _normalize_ip(ing.ip)
        for ing in svc.load_balancer_ingress
        if ing.ip and ing.ip_mode != "Proxy" and _family(ing.ip) == ip_family
    )
    health_check_node_port = 0
    if needs_health_check(svc):
        if svc.health_check_node_port:
            health_check_node_port = svc.health_check_node_port
        else:
            log.error("service %s/%s has no healthCheckNodePort", svc.namespace, svc.name)
    annotations = svc.meta.annotations
    hints_annotation = annotations.get(ANNOTATION_TOPOLOGY_MODE) or annotations.get(ANNOTATION_TOPOLOGY_AWARE_HINTS, "")
    kept_annotations = {k: v for k, v in annotations.items() if not k.startswith(_IGNORED_ANNOTATION_PREFIXES)}

    result: dict[ServicePortName, ServicePort] = {}
    for spec in svc.ports:
        name = ServicePortName(svc.namespace, svc.name, spec.name, spec.protocol)
        result[name] = ServicePort(
            cluster_ip=cluster_ip,
            port=spec.port,
            protocol=spec.protocol,
            node_port=spec.node_port,
            target_port=spec.target_port,
            session_affinity=svc.session_affinity,
            sticky_max_age_seconds=sticky,
            external_ips=external_ips,
            load_balancer_vips=lb_vips,
            load_balancer_source_ranges=source_ranges,
            health_check_node_port=health_check_node_port,
            external_policy_local=external_policy_local(svc),
            internal_policy_local=svc.internal_traffic_policy == "Local",
            traffic_distribution=svc.traffic_distribution,
            hints_annotation=hints_annotation,
            annotations=kept_annotations,
        )
    return result


def _ns_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


@dataclass
class _Change:
    """Accumulated change of one object: state before the first change, after the last."""

    previous: dict
    current: dict


class ServiceChangeTracker:
    """Uncommitted Service changes, keyed by "namespace/name".

    ``metrics`` (a :class:`kubelab.proxy.metrics.ProxyMetrics`, optional)
    receives kubeproxy_sync_proxy_rules_service_changes_{total,pending}.
    """

    def __init__(self, ip_family: int = 4, metrics: Any = None) -> None:
        self.ip_family = ip_family
        self.metrics = metrics
        self._items: dict[str, _Change] = {}

    def update(self, previous: Service | None, current: Service | None) -> bool:
        """Record one add (None, svc), update (old, new) or delete (svc, None).

        Returns True when any change is pending (caused by this update or not),
        like upstream ``ServiceChangeTracker.Update``.
        """
        if previous is None and current is None:
            return False
        svc = current if current is not None else previous
        assert svc is not None
        key = _ns_name(svc.namespace, svc.name)
        if self.metrics is not None:
            self.metrics.service_changes_total.inc()
        change = self._items.get(key)
        if change is None:
            change = _Change(service_to_service_map(previous, self.ip_family), {})
            self._items[key] = change
        change.current = service_to_service_map(current, self.ip_family)
        if change.previous == change.current:
            del self._items[key]
        if self.metrics is not None:
            self.metrics.service_changes_pending.set(len(self._items))
        return bool(self._items)

    def pending(self) -> int:
        """How many services have uncommitted changes."""
        return len(self._items)

    def _checkout(self) -> dict[str, _Change]:
        items, self._items = self._items, {}
        if self.metrics is not None:
            self.metrics.service_changes_pending.set(0)
        return items


@dataclass(frozen=True)
class UpdateServiceMapResult:
    """What :meth:`ServicePortMap.update` changed."""

    updated_services: frozenset[str] = frozenset()  # "ns/name" added, updated or deleted
    # Cluster IPs of UDP service ports that went away: conntrack entries
    # towards them must be flushed (kube-proxy's UDPStaleClusterIP).
    deleted_udp_cluster_ips: frozenset[str] = frozenset()


class ServicePortMap(Mapping[ServicePortName, ServicePort]):
    """The current ``{ServicePortName: ServicePort}`` of every proxied service."""

    def __init__(self, initial: Mapping[ServicePortName, ServicePort] | None = None) -> None:
        self._map: dict[ServicePortName, ServicePort] = dict(initial or {})
        # Kept incrementally so a partial sync of 10k services costs O(change).
        self._ports_per_service: dict[str, int] = {}
        for name in self._map:
            self._ports_per_service[name.namespaced_name] = self._ports_per_service.get(name.namespaced_name, 0) + 1
        self._snapshot: Mapping[ServicePortName, ServicePort] | None = None

    def __getitem__(self, key: ServicePortName) -> ServicePort:
        return self._map[key]

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"ServicePortMap({self._map!r})"

    def update(self, tracker: ServiceChangeTracker) -> UpdateServiceMapResult:
        """Apply and clear the tracker's pending changes; say what changed."""
        updated: set[str] = set()
        stale_udp: set[str] = set()
        for key, change in tracker._checkout().items():
            updated.add(key)
            self._snapshot = None
            for name in change.current:
                if name not in self._map:
                    self._ports_per_service[key] = self._ports_per_service.get(key, 0) + 1
            self._map.update(change.current)
            # Ports present in both are updates, not deletions.
            for name, info in change.previous.items():
                if name in change.current:
                    continue
                old = self._map.pop(name, None)
                if old is not None:
                    left = self._ports_per_service.get(key, 1) - 1
                    if left:
                        self._ports_per_service[key] = left
                    else:
                        self._ports_per_service.pop(key, None)
                    if old.protocol == "UDP":
                        stale_udp.add(old.cluster_ip)
        return UpdateServiceMapResult(frozenset(updated), frozenset(stale_udp))

    def snapshot(self) -> Mapping[ServicePortName, ServicePort]:
        """An immutable copy for one sync (the same object while nothing changed)."""
        if self._snapshot is None:
            self._snapshot = MappingProxyType(dict(self._map))
        return self._snapshot

    def service_count(self) -> int:
        """How many services ("ns/name") have at least one port."""
        return len(self._ports_per_service)

    def health_check_node_ports(self) -> dict[str, int]:
        """``{"ns/name": healthCheckNodePort}`` for services that have one."""
        return {n.namespaced_name: p.health_check_node_port for n, p in self._map.items() if p.health_check_node_port}

    def service_names(self) -> set[str]:
        return set(self._ports_per_service)


# --------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------


def endpoints_sort_key(ep: Endpoint) -> str:
    """kube-proxy sorts endpoints by their "ip:port" string (byEndpoint)."""
    return str(ep)


class EndpointSliceCache:
    """EndpointSlices grouped by service, with applied and pending versions.

    Keeping slices (not merged endpoints) per service matters because an
    endpoint can move from one slice to another: it must not vanish when the
    first slice's update arrives before the second's.
    """

    def __init__(self, node_name: str, ip_family: int = 4, prefer_same_node: bool = True) -> None:
        self.node_name = node_name
        self.ip_family = ip_family
        # Feature gate PreferSameTrafficDistribution: without it node hints are ignored.
        self.prefer_same_node = prefer_same_node
        # service "ns/name" -> slice name -> slice (applied), or (slice, remove) pending
        self._applied: dict[str, dict[str, EndpointSlice]] = {}
        self._pending: dict[str, dict[str, tuple[EndpointSlice, bool]]] = {}

    def update_pending(self, slice_: EndpointSlice, remove: bool) -> bool:
        """Record a slice add/update (remove=False) or delete; True if that changes anything."""
        service_key = _ns_name(slice_.namespace, slice_.service_name)
        pending = self._pending.get(service_key, {})
        applied = self._applied.get(service_key, {})
        name = slice_.name
        if name in pending:
            changed = pending[name] != (slice_, remove)
        elif name in applied:
            changed = remove or applied[name] != slice_
        else:
            changed = not remove
        if changed:
            self._pending.setdefault(service_key, {})[name] = (slice_, remove)
        return changed

    def checkout_changes(self) -> dict[str, tuple[dict, dict]]:
        """Apply pending slices; ``{"ns/name": (previous_map, current_map)}`` per changed service."""
        changes: dict[str, tuple[dict, dict]] = {}
        for service_key, pending in self._pending.items():
            if not pending:
                continue
            applied = self._applied.setdefault(service_key, {})
            previous = self.endpoints_map_for(service_key, applied) if applied else {}
            for name, (slice_, remove) in pending.items():
                if remove:
                    applied.pop(name, None)
                else:
                    applied[name] = slice_
            if not applied:
                del self._applied[service_key]
            current = self.endpoints_map_for(service_key, applied)
            # An update reverted before the sync nets out to nothing.
            if current != previous:
                changes[service_key] = (previous, current)
        self._pending = {}
        return changes

    def endpoints_map_for(
        self, service_key: str, slices: Mapping[str, EndpointSlice]
    ) -> dict[ServicePortName, tuple[Endpoint, ...]]:
        """Merge one service's slices into sorted endpoint lists per ServicePortName."""
        namespace, _, service_name = service_key.partition("/")
        by_port: dict[ServicePortName, dict[str, Endpoint]] = {}
        # Sorted by slice name so an endpoint present in two slices resolves
        # the same way every time (Go's map order is random; ours need not be).
        for _, slice_ in sorted(slices.items()):
            for port in slice_.ports:
                if not port.port:
                    log.error(
                        "ignoring EndpointSlice %s/%s port %r: no port number", namespace, slice_.name, port.name
                    )
                    continue
                name = ServicePortName(namespace, service_name, port.name, port.protocol)
                self._add_endpoints(by_port.setdefault(name, {}), port.port, slice_)
        return {
            name: tuple(sorted(eps.values(), key=endpoints_sort_key)) for name, eps in by_port.items() if eps
        }

    def _add_endpoints(self, out: dict[str, Endpoint], port: int, slice_: EndpointSlice) -> None:
        for sep in slice_.endpoints:
            if not sep.addresses:
                continue
            c = sep.conditions
            # kube-proxy reads the conditions literally: nil ready/serving mean
            # true, nil terminating means false (endpointslicecache.go).
            ready = c.ready is None or c.ready
            serving = c.serving is None or c.serving
            terminating = c.terminating is True
            node_hints: frozenset[str] = frozenset()
            if self.prefer_same_node:
                node_hints = frozenset(sep.hints_for_nodes)
            ep = Endpoint(
                ip=_normalize_ip(sep.addresses[0]),
                port=port,
                is_local=bool(self.node_name) and sep.node_name == self.node_name,
                ready=bool(ready),
                serving=bool(serving),
                terminating=terminating,
                zone_hints=frozenset(sep.hints_for_zones),
                node_hints=node_hints,
                node_name=sep.node_name or "",
                zone=sep.zone or "",
                hostname=sep.hostname or "",
            )
            # The same ip:port in two slices: an endpoint moving between
            # slices, or a pod IP reused while the old pod terminates.  Prefer
            # the non-terminating one, as upstream does.
            key = str(ep)
            if key not in out or not terminating:
                out[key] = ep


def parse_trigger_time(value: str) -> float | None:
    """An RFC 3339 (nano) timestamp as epoch seconds, or None when unparsable."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Python's fromisoformat takes at most microseconds: trim nanoseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{digits[:6] or '0'}{rest}"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()


class EndpointsChangeTracker:
    """Uncommitted EndpointSlice changes plus their change-trigger times.

    ``node_name`` marks endpoints on this node ``is_local``; ``clock`` is the
    wall clock (trigger times before the tracker started are ignored, as
    upstream does, so a restart does not report hours of "latency").
    """

    def __init__(
        self,
        node_name: str,
        ip_family: int = 4,
        metrics: Any = None,
        prefer_same_node: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ip_family = ip_family
        self.metrics = metrics
        self.cache = EndpointSliceCache(node_name, ip_family, prefer_same_node)
        self._trigger_times: dict[str, list[float]] = {}
        self._start_time = clock()
        self._pending_count = 0

    @property
    def node_name(self) -> str:
        return self.cache.node_name

    def endpoint_slice_update(self, slice_: EndpointSlice, remove: bool = False) -> bool:
        """Record a slice add/update or (remove=True) delete.

        Returns True when *this* update changed something, like upstream
        ``EndpointSliceUpdate`` (unlike :meth:`ServiceChangeTracker.update`).
        """
        if slice_.address_type != _SUPPORTED_ADDRESS_TYPES.get(self.ip_family):
            return False
        if not slice_.service_name or not slice_.namespace or not slice_.name:
            log.info("ignoring EndpointSlice %s/%s: no kubernetes.io/service-name label", slice_.namespace, slice_.name)
            return False
        if self.metrics is not None:
            self.metrics.endpoint_changes_total.inc()
        changed = self.cache.update_pending(slice_, remove)
        if changed:
            self._pending_count += 1
            if self.metrics is not None:
                self.metrics.endpoint_changes_pending.inc()
            key = _ns_name(slice_.namespace, slice_.service_name)
            if remove:
                # A deletion's annotation dates from the last update, which
                # is not what the latency metric measures.
                self._trigger_times.pop(key, None)
            else:
                t = parse_trigger_time(slice_.meta.annotations.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME, ""))
                if t is not None and t > self._start_time:
                    self._trigger_times.setdefault(key, []).append(t)
        return changed

    def pending(self) -> int:
        """How many slice changes are pending (kube-proxy's endpoint_changes_pending)."""
        return self._pending_count

    def _checkout(self) -> tuple[dict[str, tuple[dict, dict]], dict[str, list[float]]]:
        self._pending_count = 0
        if self.metrics is not None:
            self.metrics.endpoint_changes_pending.set(0)
        times, self._trigger_times = self._trigger_times, {}
        return self.cache.checkout_changes(), times


@dataclass(frozen=True)
class UpdateEndpointsMapResult:
    """What :meth:`EndpointsMap.update` changed."""

    updated_services: frozenset[str] = frozenset()
    # Ready UDP endpoints that are gone or changed: flush their conntrack entries.
    deleted_udp_endpoints: tuple[tuple[ServicePortName, Endpoint], ...] = ()
    # UDP service ports that went from 0 to >0 ready endpoints: conntrack may
    # hold entries that black-holed traffic to the cluster IP meanwhile.
    newly_active_udp_services: frozenset[ServicePortName] = frozenset()
    last_change_trigger_times: dict[str, list[float]] = field(default_factory=dict)


def _num_ready(eps: tuple[Endpoint, ...] | None) -> int:
    return sum(1 for ep in eps or () if ep.ready)


class EndpointsMap(Mapping[ServicePortName, tuple[Endpoint, ...]]):
    """The current ``{ServicePortName: (Endpoint, ...)}``, endpoints sorted by "ip:port"."""

    def __init__(self, initial: Mapping[ServicePortName, tuple[Endpoint, ...]] | None = None) -> None:
        self._map: dict[ServicePortName, tuple[Endpoint, ...]] = dict(initial or {})
        self._count = sum(len(v) for v in self._map.values())  # kept incrementally
        self._snapshot: Mapping[ServicePortName, tuple[Endpoint, ...]] | None = None

    def __getitem__(self, key: ServicePortName) -> tuple[Endpoint, ...]:
        return self._map[key]

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"EndpointsMap({self._map!r})"

    def update(self, tracker: EndpointsChangeTracker) -> UpdateEndpointsMapResult:
        """Apply and clear the tracker's pending changes; say what changed."""
        changes, times = tracker._checkout()
        updated: set[str] = set()
        deleted_udp: list[tuple[ServicePortName, Endpoint]] = []
        newly_active: set[ServicePortName] = set()
        for key in sorted(changes):
            previous, current = changes[key]
            updated.add(key)
            self._snapshot = None
            for name in previous:
                self._count -= len(self._map.pop(name, ()))
            for name, eps in current.items():
                self._count += len(eps) - len(self._map.get(name, ()))
            self._map.update(current)
            _detect_stale_udp(previous, current, deleted_udp, newly_active)
        return UpdateEndpointsMapResult(frozenset(updated), tuple(deleted_udp), frozenset(newly_active), times)

    def snapshot(self) -> Mapping[ServicePortName, tuple[Endpoint, ...]]:
        """An immutable copy for one sync (the same object while nothing changed)."""
        if self._snapshot is None:
            self._snapshot = MappingProxyType(dict(self._map))
        return self._snapshot

    def local_ready_endpoints(self) -> dict[str, int]:
        """``{"ns/name": number of distinct local ready endpoint IPs}`` (health check node ports)."""
        ips: dict[str, set[str]] = {}
        for name, eps in self._map.items():
            for ep in eps:
                # Terminating endpoints may still serve, but a node with only
                # those must fail the health check so the LB drains it.
                if ep.ready and ep.is_local:
                    ips.setdefault(name.namespaced_name, set()).add(ep.ip)
        return {k: len(v) for k, v in ips.items()}

    def endpoint_count(self) -> int:
        """Endpoints over all service ports (an endpoint serving two ports counts twice)."""
        return self._count


def _detect_stale_udp(
    previous: Mapping[ServicePortName, tuple[Endpoint, ...]],
    current: Mapping[ServicePortName, tuple[Endpoint, ...]],
    deleted_udp: list[tuple[ServicePortName, Endpoint]],
    newly_active: set[ServicePortName],
) -> None:
    """kube-proxy's detectStaleConntrackEntries for one service's change."""
    for name, eps in previous.items():
        if name.protocol != "UDP":
            continue
        now = set(current.get(name, ()))
        for ep in eps:
            # A not-ready endpoint got no traffic, so it has no entries; an
            # endpoint that changed in any way (e.g. went not-ready) does.
            if ep.ready and ep not in now:
                deleted_udp.append((name, ep))
    for name, eps in current.items():
        if name.protocol == "UDP" and _num_ready(eps) > 0 and _num_ready(previous.get(name)) == 0:
            newly_active.add(name)
