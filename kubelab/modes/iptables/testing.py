"""Helpers to build SyncStates from model objects, for tests and benchmarks.

:class:`StateBuilder` runs Services and EndpointSlices through the same
change trackers and maps the controller uses (``kubelab.proxy.changes``), so
a test states its inputs the way kube-proxy's tests do (Service and
EndpointSlice objects) and gets the ``SyncState`` -- with the partial-sync
bookkeeping -- that the controller would hand the mode.

``make_service`` / ``make_slice`` are short constructors for the model
objects, with kube-proxy's test conventions as defaults.
"""

from __future__ import annotations

from collections.abc import Iterable

from kubelab.model import (
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    LoadBalancerIngress,
    NodeInfo,
    ObjectMeta,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)
from kubelab.proxy.changes import EndpointsChangeTracker, EndpointsMap, ServiceChangeTracker, ServicePortMap
from kubelab.proxy.provider import SyncState

TEST_HOSTNAME = "test-hostname"


def make_service(
    namespace: str,
    name: str,
    cluster_ip: str,
    ports: Iterable[tuple] = (("p80", 80, "TCP"),),
    *,
    type: str = "ClusterIP",
    external_ips: Iterable[str] = (),
    lb_ips: Iterable[str | tuple[str, str]] = (),
    source_ranges: Iterable[str] = (),
    etp: str = "Cluster",
    itp: str = "Cluster",
    health_check_node_port: int = 0,
    affinity_timeout: int | None = None,
    annotations: dict[str, str] | None = None,
    traffic_distribution: str | None = None,
) -> Service:
    """A Service; ``ports`` entries are (name, port, protocol[, node_port[, target_port]])."""
    specs = []
    for p in ports:
        pname, port, proto = p[0], p[1], p[2]
        node_port = p[3] if len(p) > 3 else 0
        target = p[4] if len(p) > 4 else 0
        specs.append(ServicePortSpec(port=port, protocol=proto, name=pname, node_port=node_port, target_port=target))
    ingress = []
    for item in lb_ips:
        if isinstance(item, tuple):
            ingress.append(LoadBalancerIngress(ip=item[0], ip_mode=item[1]))
        else:
            ingress.append(LoadBalancerIngress(ip=item))
    return Service(
        meta=ObjectMeta(name=name, namespace=namespace, annotations=dict(annotations or {})),
        type=type,
        cluster_ips=(cluster_ip,),
        ports=tuple(specs),
        external_ips=tuple(external_ips),
        load_balancer_ingress=tuple(ingress),
        load_balancer_source_ranges=tuple(source_ranges),
        external_traffic_policy=etp,
        internal_traffic_policy=itp,
        health_check_node_port=health_check_node_port,
        session_affinity="ClientIP" if affinity_timeout is not None else "None",
        session_affinity_timeout=affinity_timeout if affinity_timeout is not None else 10800,
        traffic_distribution=traffic_distribution,
    )


def ep(
    ip: str,
    node: str | None = None,
    *,
    ready: bool | None = None,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone_hints: Iterable[str] = (),
    node_hints: Iterable[str] = (),
    zone: str | None = None,
) -> SliceEndpoint:
    """One EndpointSlice endpoint (conditions None = unset, as in the API)."""
    return SliceEndpoint(
        addresses=(ip,),
        conditions=EndpointConditions(ready=ready, serving=serving, terminating=terminating),
        node_name=node,
        zone=zone,
        hints_for_zones=tuple(zone_hints),
        hints_for_nodes=tuple(node_hints),
    )


def make_slice(
    namespace: str,
    service: str,
    endpoints: Iterable[SliceEndpoint | str],
    ports: Iterable[tuple] = (("p80", 80, "TCP"),),
    *,
    num: int = 1,
    address_type: str = "IPv4",
) -> EndpointSlice:
    """An EndpointSlice ``<service>-<num>``; plain strings are endpoints with unset conditions."""
    eps = tuple(e if isinstance(e, SliceEndpoint) else ep(e) for e in endpoints)
    return EndpointSlice(
        meta=ObjectMeta(name=f"{service}-{num}", namespace=namespace, labels={"kubernetes.io/service-name": service}),
        service_name=service,
        address_type=address_type,
        endpoints=eps,
        ports=tuple(EndpointPort(port=p[1], protocol=p[2], name=p[0]) for p in ports),
    )


class StateBuilder:
    """Change trackers + maps, producing SyncStates as the controller does."""

    def __init__(self, node: NodeInfo | None = None, ip_family: int = 4) -> None:
        self.node = node or NodeInfo(name=TEST_HOSTNAME)
        self.ip_family = ip_family
        self.services = ServiceChangeTracker(ip_family)
        self.endpoints = EndpointsChangeTracker(self.node.name, ip_family)
        self.service_map = ServicePortMap()
        self.endpoints_map = EndpointsMap()
        self._objects: dict[tuple[str, str, str], object] = {}

    def add(self, *objects: Service | EndpointSlice) -> StateBuilder:
        """Add or replace objects (keyed by kind/namespace/name)."""
        for obj in objects:
            key = (type(obj).__name__, obj.namespace, obj.name)
            old = self._objects.get(key)
            self._objects[key] = obj
            if isinstance(obj, Service):
                self.services.update(old, obj)  # type: ignore[arg-type]
            else:
                self.endpoints.endpoint_slice_update(obj)
        return self

    def delete(self, *objects: Service | EndpointSlice) -> StateBuilder:
        for obj in objects:
            key = (type(obj).__name__, obj.namespace, obj.name)
            old = self._objects.pop(key, None)
            if isinstance(obj, Service):
                self.services.update(old or obj, None)  # type: ignore[arg-type]
            else:
                self.endpoints.endpoint_slice_update(old or obj, remove=True)  # type: ignore[arg-type]
        return self

    def state(self, full_sync: bool = False) -> SyncState:
        """Apply pending changes; return the SyncState of this sync."""
        s = self.service_map.update(self.services)
        e = self.endpoints_map.update(self.endpoints)
        return SyncState(
            service_map=self.service_map.snapshot(),
            endpoints_map=self.endpoints_map.snapshot(),
            node=self.node,
            full_sync=full_sync,
            updated_services=frozenset(s.updated_services | e.updated_services),
            deleted_udp_cluster_ips=frozenset(s.deleted_udp_cluster_ips),
            deleted_udp_endpoints=tuple(e.deleted_udp_endpoints),
            newly_active_udp_services=frozenset(e.newly_active_udp_services),
            services={f"{k[1]}/{k[2]}": o for k, o in self._objects.items() if k[0] == "Service"},  # type: ignore[misc]
        )


class FakeIPTables:
    """An in-memory :class:`~kubelab.modes.iptables.kernel.IPTables` over :class:`FakeTables`.

    Models state (what restores and single commands leave behind) and
    refuses what iptables-restore refuses (dangling jumps, deleting a
    referenced chain), so proxier unit tests see real failure modes.
    ``fail_next_restore`` injects one failure (e.g. "lock held").
    """

    def __init__(self, backend: str = "fake", random_fully: bool = False) -> None:
        from kubelab.modes.iptables.tracer import FakeTables

        self.backend = backend
        self.ip_family = 4
        self.tables = FakeTables()
        self.random_fully = random_fully
        self.restores: list[str] = []
        self.fail_next_restore: str | None = None

    def restore_all(self, text: str) -> None:
        from kubelab.modes.iptables.kernel import RestoreError
        from kubelab.modes.iptables.tracer import ParseError
        from kubelab.modes.iptables.tracer import RestoreError as FakeRestoreError

        self.restores.append(text)
        if self.fail_next_restore is not None:
            msg, self.fail_next_restore = self.fail_next_restore, None
            raise RestoreError(f"iptables-restore: {msg}")
        try:
            self.tables.restore(text)
        except (FakeRestoreError, ParseError) as e:
            raise RestoreError(f"iptables-restore: {e}", getattr(e, "line", None) or None) from e

    def restore_stream(self, chunks) -> None:
        self.restore_all("".join(chunks))

    def save(self, table: str) -> str:
        return self.tables.save(table)

    def chains(self, table: str) -> set[str]:
        return set(self.tables.chains(table))

    def chain_exists(self, table: str, chain: str) -> bool:
        return chain in self.tables.chains(table)

    def ensure_chain(self, table: str, chain: str) -> bool:
        if self.chain_exists(table, chain):
            return False
        self._add_chain(table, chain)
        return True

    def _add_chain(self, table: str, chain: str) -> None:
        from kubelab.modes.iptables.tracer import Chain, Table

        t = self.tables.dump.table(table)
        if t is None:
            t = Table(table)
            self.tables.dump.tables.append(t)
        t.chains.append(Chain(chain))

    def _rule(self, chain: str, args) -> str:
        import shlex

        return f"-A {chain} " + " ".join(shlex.quote(a) if " " in a else a for a in args)

    def ensure_rule(self, prepend: bool, table: str, chain: str, args) -> bool:
        from kubelab.modes.iptables.tracer import parse_rule

        c = self.tables.dump.chain(table, chain)
        raw = self._rule(chain, args).replace("'", '"')
        if any(r.raw == raw for r in c.rules):
            return False
        rule = parse_rule(raw)
        if prepend:
            c.rules.insert(0, rule)
        else:
            c.rules.append(rule)
        return True

    def delete_rule(self, table: str, chain: str, args) -> bool:
        c = self.tables.dump.chain(table, chain)
        raw = self._rule(chain, args).replace("'", '"')
        for i, r in enumerate(c.rules if c else []):
            if r.raw == raw:
                del c.rules[i]
                return True
        return False

    def delete_chain(self, table: str, chain: str) -> bool:
        t = self.tables.dump.table(table)
        if t is None or t.get(chain) is None:
            return False
        t.chains = [c for c in t.chains if c.name != chain]
        return True

    def has_random_fully(self) -> bool:
        return self.random_fully

    def flush_all(self) -> None:
        """What `iptables -F; iptables -X` by an admin does: our chains and canaries vanish."""
        from kubelab.modes.iptables.tracer import FakeTables

        self.tables = FakeTables()
