"""Which endpoints a node uses for a service port: kube-proxy's CategorizeEndpoints.

Upstream: kubernetes ``pkg/proxy/topology.go``.  Every mode calls
:func:`categorize_endpoints` once per service port per sync.

"Usable" means Ready endpoints; when none are Ready, serving-and-terminating
ones are used instead (KEP-1669, graceful termination), independently for the
Cluster and the Local traffic policy.

Topology: current kube-proxy does not read ``trafficDistribution`` or the
``service.kubernetes.io/topology-mode`` annotation itself.  The EndpointSlice
controller turns them into per-endpoint hints (PreferClose / PreferSameZone
and topology-mode Auto -> ``hints.forZones``; PreferSameNode ->
``hints.forNodes`` too), and kube-proxy obeys hints only when *every* ready
endpoint carries one and at least one is for this node (or its zone);
otherwise all endpoints are used.  That guard keeps a half-rolled-out hint set
from funnelling all traffic into a few endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kubelab.model import Endpoint, NodeInfo, ServicePort

log = logging.getLogger("kubelab.proxy.topology")

PREFER_SAME_ZONE = "PreferSameZone"
PREFER_SAME_NODE = "PreferSameNode"


@dataclass(frozen=True)
class CategorizedEndpoints:
    """The result of :func:`categorize_endpoints`.

    * ``cluster_endpoints`` -- usable endpoints for Cluster traffic policy
      (topology applied); ``None`` when the port never uses Cluster policy.
    * ``local_endpoints`` -- usable endpoints on this node for Local policy;
      ``None`` when the port never uses Local policy.
    * ``all_reachable_endpoints`` -- the union of the two.
    * ``has_any_endpoints`` -- some usable endpoint exists anywhere in the
      cluster (true even when none is reachable from this node: the modes
      then drop, rather than reject, traffic for Local policy).
    """

    cluster_endpoints: tuple[Endpoint, ...] | None = None
    local_endpoints: tuple[Endpoint, ...] | None = None
    all_reachable_endpoints: tuple[Endpoint, ...] = ()
    has_any_endpoints: bool = False


def _usable_fallback(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def topology_mode_from_hints(
    svc_port: ServicePort,
    endpoints: Sequence[Endpoint],
    node_name: str,
    zone: str,
    prefer_same_node: bool = True,
) -> str:
    """"" (no topology), ``PreferSameZone`` or ``PreferSameNode``, from the endpoints' hints."""
    has_ready = False
    has_for_node = False
    all_node_hints = True
    has_for_zone = False
    all_zone_hints = True
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            has_for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone in ep.zone_hints:
            has_for_zone = True
    if not has_ready:
        return ""
    if prefer_same_node and all_node_hints:
        if has_for_node:
            return PREFER_SAME_NODE
        log.debug("ignoring same-node hints for %s: none for node %r", svc_port.cluster_ip, node_name)
    if all_zone_hints:
        if has_for_zone:
            return PREFER_SAME_ZONE
        if not zone:
            log.debug("ignoring same-zone hints for %s: node has no topology.kubernetes.io/zone label", svc_port.cluster_ip)
        else:
            log.debug("ignoring same-zone hints for %s: none for zone %r", svc_port.cluster_ip, zone)
    return ""


def _available_for_topology(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == "":
        return True
    if mode == PREFER_SAME_NODE:
        return node_name in ep.node_hints
    if mode == PREFER_SAME_ZONE:
        return zone in ep.zone_hints
    return False


def categorize_endpoints(
    endpoints: Sequence[Endpoint] | None,
    svc_port: ServicePort,
    node: NodeInfo,
    *,
    prefer_same_node: bool = True,
) -> CategorizedEndpoints:
    """Split a service port's endpoints as kube-proxy's CategorizeEndpoints does.

    ``node`` gives this node's name and zone; ``prefer_same_node`` is the
    PreferSameTrafficDistribution feature gate (node hints are ignored
    without it).  Order within each list follows ``endpoints``.
    """
    if not endpoints:
        return CategorizedEndpoints()
    node_name = node.name
    zone = node.zone or node.labels.get("topology.kubernetes.io/zone", "")

    cluster: list[Endpoint] | None = None
    local: list[Endpoint] | None = None
    has_any = False
    topology_mode = ""
    use_serving_terminating = False

    if svc_port.uses_cluster_endpoints:
        topology_mode = topology_mode_from_hints(svc_port, endpoints, node_name, zone, prefer_same_node)
        cluster = [ep for ep in endpoints if ep.ready and _available_for_topology(ep, topology_mode, node_name, zone)]
        # No ready endpoint anywhere (a topology mode is only chosen when some
        # ready endpoint matches it): fall back to serving+terminating ones.
        if not cluster:
            cluster = [ep for ep in endpoints if _usable_fallback(ep)]
        if cluster:
            has_any = True

    if not svc_port.uses_local_endpoints:
        cl = tuple(cluster or ())
        return CategorizedEndpoints(cl, None, cl, has_any)

    has_local_ready = False
    has_local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            if ep.is_local:
                has_local_ready = True
        elif _usable_fallback(ep):
            has_any = True
            if ep.is_local:
                has_local_serving_terminating = True

    if has_local_ready:
        local = [ep for ep in endpoints if ep.is_local and ep.ready]
    elif has_local_serving_terminating:
        use_serving_terminating = True
        local = [ep for ep in endpoints if ep.is_local and _usable_fallback(ep)]
    else:
        local = []

    if not svc_port.uses_cluster_endpoints:
        lo = tuple(local)
        return CategorizedEndpoints(None, lo, lo, has_any)

    assert cluster is not None
    if topology_mode == "" and not use_serving_terminating:
        # cluster holds every ready endpoint and local only ready ones, so
        # cluster is already the union.
        return CategorizedEndpoints(tuple(cluster), tuple(local), tuple(cluster), has_any)

    # cluster may lack local endpoints that topology filtered out or that are
    # terminating; merge, keeping the order of the input list.
    wanted = {str(ep) for ep in cluster} | {str(ep) for ep in local}
    merged: dict[str, Endpoint] = {}
    for ep in endpoints:
        key = str(ep)
        if key in wanted and key not in merged:
            merged[key] = ep
    return CategorizedEndpoints(tuple(cluster), tuple(local), tuple(merged.values()), has_any)
