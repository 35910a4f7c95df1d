"""The sync loop every proxy mode shares: events in, one SyncState per sync out.

:class:`ProxyController` is the :class:`~kubelab.proxy.provider.Provider`
sources feed.  It keeps kube-proxy's change trackers and maps
(:mod:`kubelab.proxy.changes`) and a :class:`~kubelab.proxy.runner.BoundedFrequencyRunner`;
each sync applies the pending changes, builds one immutable
:class:`~kubelab.proxy.provider.SyncState` and awaits
``dataplane.sync_proxy_rules(state)``.

Rules, as kube-proxy's proxiers (pkg/proxy/iptables/proxier.go):

* nothing is programmed until both Services and EndpointSlices have had
  their initial sync (``on_*_synced``), so a restart never flushes rules for
  endpoints that simply have not been listed yet;
* a sync is a *full* sync the first time, once per ``--sync-period``, and
  after any failure; otherwise the mode may touch only ``updated_services``;
* a failed sync keeps the previous kernel state (the mode's job: it applies
  atomically), is logged with its error, counted, and retried with
  exponential back-off from ``--min-sync-period`` up to ``--sync-period``;
  what changed since the last *successful* sync is carried over, so stale
  UDP conntrack entries are still flushed once it succeeds.

``--dry-run``: instead of programming, ``dataplane.render(state)`` is written
to ``deps.out`` once after the initial sync (then :meth:`run` returns), or on
every sync with ``watch=True``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from kubelab.model import EndpointSlice, Node, Service, ServicePortName
from kubelab.proxy.changes import (
    EndpointsChangeTracker,
    EndpointsMap,
    ServiceChangeTracker,
    ServicePortMap,
    is_proxied,
)
from kubelab.proxy.provider import Dataplane, ModeDeps, Provider, SyncState
from kubelab.proxy.runner import BoundedFrequencyRunner, Clock

# kube-proxy's default burst for the sync runner (burstSyncs in proxier.go).
BURST_SYNCS = 2


@dataclasses.dataclass
class _Carry:
    """Changes applied to the maps but not yet programmed successfully."""

    updated_services: set[str] = dataclasses.field(default_factory=set)
    deleted_udp_cluster_ips: set[str] = dataclasses.field(default_factory=set)
    deleted_udp_endpoints: list = dataclasses.field(default_factory=list)
    newly_active_udp_services: set[ServicePortName] = dataclasses.field(default_factory=set)
    trigger_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)


class ProxyController(Provider):
    """Change trackers + bounded-frequency runner in front of one :class:`Dataplane`.

    ``health`` (a :class:`~kubelab.proxy.health.ProxierHealthServer`) is told
    about queued and completed syncs; ``clock`` drives the runner
    (monotonic), ``wall_clock`` timestamps metrics and latency.
    """

    def __init__(
        self,
        deps: ModeDeps,
        dataplane: Dataplane,
        *,
        health: Any = None,
        watch: bool = False,
        ip_family: int = 4,
        clock: Clock | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.deps = deps
        self.dataplane = dataplane
        self.config = deps.config
        self.node = deps.node
        self.log = deps.logger
        self.metrics = deps.metrics
        self.health = health
        self.dry_run = deps.dry_run
        self.watch = watch
        self.wall_clock = wall_clock
        prefer_same_node = self.config.feature_gates.get("PreferSameTrafficDistribution", True)
        self.service_changes = ServiceChangeTracker(ip_family, metrics=self.metrics)
        self.endpoints_changes = EndpointsChangeTracker(
            self.node.name, ip_family, metrics=self.metrics, prefer_same_node=prefer_same_node, clock=wall_clock
        )
        self.service_map = ServicePortMap()
        self.endpoints_map = EndpointsMap()
        self.services: dict[str, Service] = {}
        self._services_view: Mapping[str, Service] | None = None  # immutable copy, rebuilt after changes
        self.services_synced = False
        self.endpoint_slices_synced = False
        self.need_full_sync = True
        self.last_full_sync = float("-inf")
        self.consecutive_failures = 0
        self.syncs = 0  # successful syncs (or renders in dry-run)
        self.last_state: SyncState | None = None
        self._carry = _Carry()
        self._done: asyncio.Event | None = None
        self.runner = BoundedFrequencyRunner(
            "sync-runner",
            self.sync_proxy_rules,
            self.config.min_sync_period,
            max(self.config.sync_period, self.config.min_sync_period),
            BURST_SYNCS,
            clock=clock,
        )

    # ------------------------------------------------------------ Provider

    def is_initialized(self) -> bool:
        return self.services_synced and self.endpoint_slices_synced

    def _queue(self) -> None:
        if self.health is not None:
            self.health.queued_update()
        if self.metrics is not None:
            self.metrics.sync_proxy_rules_last_queued_timestamp.set(self.wall_clock())
        self.runner.run()

    def on_service_add(self, service: Service) -> None:
        self.on_service_update(None, service)  # type: ignore[arg-type]

    def on_service_update(self, old: Service | None, new: Service | None) -> None:
        # kube-proxy's informers filter by label: an object that gains the
        # service-proxy-name label is, to them, deleted (and vice versa).
        old = old if old is not None and is_proxied(old) else None
        new = new if new is not None and is_proxied(new) else None
        if old is None and new is None:
            return
        key = f"{(new or old).namespace}/{(new or old).name}"  # type: ignore[union-attr]
        if new is None:
            self.services.pop(key, None)
        else:
            self.services[key] = new
        self._services_view = None
        if self.service_changes.update(old, new) and self.is_initialized():
            self._queue()

    def on_service_delete(self, service: Service) -> None:
        self.on_service_update(service, None)

    def on_services_synced(self) -> None:
        self.services_synced = True
        if self.is_initialized():
            self._queue()

    def on_endpoint_slice_add(self, slice_: EndpointSlice) -> None:
        self._slice(slice_, remove=False)

    def on_endpoint_slice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        if not is_proxied(new):
            self._slice(old, remove=True)
        else:
            self._slice(new, remove=False)

    def on_endpoint_slice_delete(self, slice_: EndpointSlice) -> None:
        self._slice(slice_, remove=True)

    def _slice(self, slice_: EndpointSlice, remove: bool) -> None:
        if not remove and not is_proxied(slice_):
            return
        if self.endpoints_changes.endpoint_slice_update(slice_, remove) and self.is_initialized():
            self._queue()

    def on_endpoint_slices_synced(self) -> None:
        self.endpoint_slices_synced = True
        if self.is_initialized():
            self._queue()

    def on_node_add(self, node: Node) -> None:
        self.on_node_update(None, node)  # type: ignore[arg-type]

    def on_node_update(self, old: Node | None, new: Node) -> None:
        if new.name != self.node.name:
            return
        if self.health is not None:
            self.health.sync_node(new)
        labels = dict(new.meta.labels)
        if labels == self.node.labels and new.zone == self.node.zone:
            return
        self.log.info("node %s topology labels changed: zone %r", new.name, new.zone)
        self.node = dataclasses.replace(self.node, zone=new.zone, labels=labels)
        # Topology decides endpoints for every service: resync all of it.
        self.need_full_sync = True
        if self.is_initialized():
            self._queue()

    def on_node_delete(self, node: Node) -> None:
        if node.name == self.node.name and self.health is not None:
            self.health.node_eligible = False

    # ------------------------------------------------------------ syncing

    def _back_off(self) -> float:
        base = max(self.config.min_sync_period, 0.1)
        return min(base * 2 ** (self.consecutive_failures - 1), max(self.config.sync_period, base))

    def build_state(self) -> SyncState:
        """Apply pending changes to the maps and return the state to program."""
        svc_result = self.service_map.update(self.service_changes)
        ep_result = self.endpoints_map.update(self.endpoints_changes)
        c = self._carry
        c.updated_services |= svc_result.updated_services | ep_result.updated_services
        c.deleted_udp_cluster_ips |= svc_result.deleted_udp_cluster_ips
        c.deleted_udp_endpoints.extend(ep_result.deleted_udp_endpoints)
        c.newly_active_udp_services |= ep_result.newly_active_udp_services
        for key, times in ep_result.last_change_trigger_times.items():
            c.trigger_times.setdefault(key, []).extend(times)
        now = self.wall_clock()
        period = self.dataplane.full_sync_period
        if period is None:
            period = self.config.sync_period
        full = self.need_full_sync or now - self.last_full_sync >= period
        return SyncState(
            service_map=self.service_map.snapshot(),
            endpoints_map=self.endpoints_map.snapshot(),
            node=self.node,
            full_sync=full,
            updated_services=frozenset(c.updated_services),
            deleted_udp_cluster_ips=frozenset(c.deleted_udp_cluster_ips),
            deleted_udp_endpoints=tuple(c.deleted_udp_endpoints),
            newly_active_udp_services=frozenset(c.newly_active_udp_services),
            services=self._services(),
        )

    def _services(self) -> Mapping[str, Service]:
        if self._services_view is None:
            self._services_view = MappingProxyType(dict(self.services))
        return self._services_view

    async def sync_proxy_rules(self) -> None:
        """One sync: the runner's function.  Never raises (failures schedule a retry)."""
        if not self.is_initialized():
            self.log.debug("not syncing: waiting for the initial services and endpoint slices")
            return
        started = time.perf_counter()
        state = self.build_state()
        self.last_state = state
        kind = "full" if state.full_sync else "partial"
        try:
            if self.dry_run:
                self._render(state)
            else:
                await self.dataplane.sync_proxy_rules(state)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the mode failed: keep serving, retry as a full sync
            self.consecutive_failures += 1
            self.need_full_sync = True
            delay = self._back_off()
            if self.metrics is not None:
                self.metrics.sync_proxy_rules_failures_total.inc()
            self.log.error(
                "sync failed (%s sync of %d service ports): %s: %s; previous rules stay in force, retrying as a full sync in %.1fs",
                kind,
                len(state.service_map),
                type(e).__name__,
                e,
                delay,
            )
            self.runner.retry_after(delay)
            return
        self._succeeded(state, started, kind)

    def _succeeded(self, state: SyncState, started: float, kind: str) -> None:
        elapsed = time.perf_counter() - started
        now = self.wall_clock()
        if state.full_sync:
            self.last_full_sync = now
        self.need_full_sync = False
        self.consecutive_failures = 0
        self.syncs += 1
        trigger_times = self._carry.trigger_times
        self._carry = _Carry()
        if self.metrics is not None:
            self.metrics.sync_proxy_rules_duration.observe(elapsed)
            (self.metrics.sync_full_proxy_rules_duration if state.full_sync else self.metrics.sync_partial_proxy_rules_duration).observe(elapsed)
            self.metrics.sync_proxy_rules_last_timestamp.set(now)
            for times in trigger_times.values():
                for t in times:
                    self.metrics.network_programming_duration.observe(max(0.0, now - t))
        if self.health is not None:
            self.health.updated()
        # Counts kept incrementally by the maps: a partial sync stays O(change).
        services = self.service_map.service_count()
        endpoints = self.endpoints_map.endpoint_count()
        self.log.info("synced %d services, %d endpoints in %.0f ms (%s)", services, endpoints, elapsed * 1000, kind)
        if self._done is not None and self.dry_run and not self.watch:
            self._done.set()

    def _render(self, state: SyncState) -> None:
        out = self.deps.out or sys.stdout
        text = self.dataplane.render(state)
        if self.watch:
            # A '#' line is a comment to iptables-restore and nft -f alike, so
            # the stream stays valid input while showing where each sync starts.
            kind = "full" if state.full_sync else "partial"
            out.write(f"# kubelab proxy --dry-run: sync {self.syncs + 1} ({kind}), {len(state.service_map)} service ports\n")
        out.write(text if text.endswith("\n") or not text else text + "\n")
        out.flush()

    async def run(self) -> None:
        """Run the sync loop until cancelled (or, for a one-shot dry run, until rendered once)."""
        self._done = asyncio.Event()
        if not self.dry_run:
            await self.dataplane.start()
        loop_task = asyncio.ensure_future(self.runner.loop())
        try:
            if self.dry_run and not self.watch:
                done_task = asyncio.ensure_future(self._done.wait())
                finished, _ = await asyncio.wait({loop_task, done_task}, return_when=asyncio.FIRST_COMPLETED)
                done_task.cancel()
                if loop_task in finished:
                    loop_task.result()
            else:
                await loop_task
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            if not self.dry_run:
                await self.dataplane.stop()
