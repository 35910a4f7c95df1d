"""The two interfaces between sources, the shared controller and the modes.

* :class:`Provider` -- what a *source* feeds: kube-proxy's ServiceHandler,
  EndpointSliceHandler and NodeHandler.  ``kubelab.proxy.controller.ProxyController``
  is the provider every mode shares; the DNS responder is another.
* :class:`Dataplane` -- what a *mode* implements.  The controller keeps the
  change trackers and the bounded-frequency runner, and on each sync hands the
  mode one immutable :class:`SyncState`.  Modes never see events.

Modes live in the explicit table ``kubelab.modes.MODES``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from kubelab.model import Endpoint, EndpointSlice, Node, NodeInfo, Pod, Service, ServicePort, ServicePortName
from kubelab.proxy.config import ProxyConfig


class Provider(abc.ABC):
    """Receives object events from a source (files, API watch, the lab)."""

    @abc.abstractmethod
    def on_service_add(self, service: Service) -> None: ...

    @abc.abstractmethod
    def on_service_update(self, old: Service, new: Service) -> None: ...

    @abc.abstractmethod
    def on_service_delete(self, service: Service) -> None: ...

    @abc.abstractmethod
    def on_services_synced(self) -> None: ...

    @abc.abstractmethod
    def on_endpoint_slice_add(self, slice_: EndpointSlice) -> None: ...

    @abc.abstractmethod
    def on_endpoint_slice_update(self, old: EndpointSlice, new: EndpointSlice) -> None: ...

    @abc.abstractmethod
    def on_endpoint_slice_delete(self, slice_: EndpointSlice) -> None: ...

    @abc.abstractmethod
    def on_endpoint_slices_synced(self) -> None: ...

    # Pods and Nodes matter to DNS (pod records) and topology (node zone); a
    # provider that does not care keeps these no-ops.
    def on_pod_add(self, pod: Pod) -> None:  # noqa: B027 - optional hook
        pass

    def on_pod_update(self, old: Pod, new: Pod) -> None:  # noqa: B027
        pass

    def on_pod_delete(self, pod: Pod) -> None:  # noqa: B027
        pass

    def on_pods_synced(self) -> None:  # noqa: B027
        pass

    def on_node_add(self, node: Node) -> None:  # noqa: B027
        pass

    def on_node_update(self, old: Node, new: Node) -> None:  # noqa: B027
        pass

    def on_node_delete(self, node: Node) -> None:  # noqa: B027
        pass

    def on_nodes_synced(self) -> None:  # noqa: B027
        pass


@dataclass(frozen=True)
class SyncState:
    """Everything a mode needs for one sync, immutable.

    ``service_map`` and ``endpoints_map`` are the full current state.  The
    ``updated_services`` / ``deleted_*`` fields describe what changed since
    the previous *successful* sync, for partial syncs and conntrack cleanup.
    When ``full_sync`` is true the mode must rewrite everything it owns
    (first sync, after any failure, and every :attr:`Dataplane.full_sync_period`).
    """

    service_map: Mapping[ServicePortName, ServicePort]
    endpoints_map: Mapping[ServicePortName, tuple[Endpoint, ...]]
    node: NodeInfo
    full_sync: bool = True
    updated_services: frozenset[str] = frozenset()  # "ns/name" of services or endpoints that changed
    deleted_udp_cluster_ips: frozenset[str] = frozenset()
    deleted_udp_endpoints: tuple[tuple[ServicePortName, Endpoint], ...] = ()
    newly_active_udp_services: frozenset[ServicePortName] = frozenset()
    services: Mapping[str, Service] = field(default_factory=dict)  # "ns/name" -> Service object


@dataclass
class ModeDeps:
    """What a mode is built from (passed in, never global)."""

    config: ProxyConfig
    node: NodeInfo
    logger: logging.Logger
    metrics: Any = None  # kubelab.proxy.metrics.ProxyMetrics
    dry_run: bool = False
    out: IO[str] | None = None  # where --dry-run prints
    # Runs an argv list and returns (returncode, stdout, stderr); tests replace it.
    run: Callable[..., tuple[int, str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Dataplane(abc.ABC):
    """One proxy mode: turns a :class:`SyncState` into kernel state."""

    name: str = ""
    # Seconds between regular full syncs (``SyncState.full_sync`` without a
    # change that needs one); None: every ``--sync-period``, as kube-proxy's
    # IPVS proxier, which rebuilds everything on every sync.  A mode with
    # cheap partial syncs sets its own (the iptables proxier: kube-proxy's
    # one-hour FullSyncPeriod, none at all in large-cluster mode).
    full_sync_period: float | None = None

    @abc.abstractmethod
    async def sync_proxy_rules(self, state: SyncState) -> None:
        """Make the kernel match ``state``.

        Raise on failure: the controller keeps the previous state in force,
        counts the failure, and retries later as a full sync.
        """

    @abc.abstractmethod
    def render(self, state: SyncState) -> str:
        """What a sync would program, as text (``--dry-run``); touches nothing."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Remove everything this mode ever created (``--cleanup``), and nothing else."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start long-lived servers (health check node ports, userspace listeners)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop what :meth:`start` and syncs started; leave kernel state in place."""
