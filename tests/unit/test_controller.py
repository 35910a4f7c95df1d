"""ProxyController: initial-sync gating, full/partial syncs, failure and back-off, dry-run.

Uses a recording Dataplane that models kernel state (the last state it was
told to program, kept on failure) and a fake clock: no timing assertions.
Addresses: 172.30.0.0/16 (cluster IPs), 10.244.0.0/16 (endpoints); data only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging

import pytest

from kubelab.model import (
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    Node,
    NodeInfo,
    ObjectMeta,
    Service,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.controller import ProxyController
from kubelab.proxy.health import ProxierHealthServer
from kubelab.proxy.metrics import ProxyMetrics
from kubelab.proxy.provider import Dataplane, ModeDeps, SyncState
from kubelab.proxy.runner import FakeClock, settle


def arun(fn):
    """Run an async test in a fresh event loop (keeps the signature, so fixtures work)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        return asyncio.run(fn(*a, **kw))

    return wrapper


class RecordingDataplane(Dataplane):
    """Models a mode: ``programmed`` is what the kernel holds; a failing sync leaves it alone."""

    name = "recording"

    def __init__(self):
        self.states: list[SyncState] = []
        self.programmed: SyncState | None = None
        self.fail_next = 0
        self.started = self.stopped = False

    async def sync_proxy_rules(self, state):
        self.states.append(state)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("iptables-restore: line 3 failed")
        self.programmed = state

    def render(self, state):
        return "\n".join(f"{n} -> {p.cluster_ip}:{p.port}" for n, p in sorted(state.service_map.items()))

    def cleanup(self):
        pass

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True


def svc(name="web", ip="172.30.0.10", port=80, proto="TCP", pname="http"):
    return Service(meta=ObjectMeta(name=name), cluster_ips=(ip,), ports=(ServicePortSpec(port, proto, pname),))


def eps(name="web", *ips, port=8080, proto="TCP", pname="http", slice_name=None, node=None, ready=True):
    return EndpointSlice(
        meta=ObjectMeta(name=slice_name or f"{name}-1", labels={"kubernetes.io/service-name": name}),
        service_name=name,
        endpoints=tuple(
            SliceEndpoint(addresses=(ip,), node_name=node, conditions=EndpointConditions(ready=ready)) for ip in ips
        ),
        ports=(EndpointPort(port, proto, pname),),
    )


WEB = ServicePortName("default", "web", "http", "TCP")


class Harness:
    def __init__(self, *, dry_run=False, watch=False, min_sync=1.0, sync=30.0, health=False):
        self.clock = FakeClock(start=0.0)
        self.wall = [1_700_000_000.0]
        self.dp = RecordingDataplane()
        self.out = io.StringIO()
        self.metrics = ProxyMetrics()
        self.health = ProxierHealthServer("127.0.0.1:0", 2 * sync, clock=lambda: self.wall[0]) if health else None
        self.logger = logging.getLogger("test.controller")
        deps = ModeDeps(
            config=ProxyConfig(min_sync_period=min_sync, sync_period=sync),
            node=NodeInfo(name="node-1"),
            logger=self.logger,
            metrics=self.metrics,
            dry_run=dry_run,
            out=self.out,
        )
        self.ctl = ProxyController(
            deps, self.dp, clock=self.clock, wall_clock=lambda: self.wall[0], watch=watch, health=self.health
        )
        self.task: asyncio.Task | None = None

    async def start(self):
        self.task = asyncio.create_task(self.ctl.run())
        await settle()

    async def advance(self, seconds):
        self.wall[0] += seconds
        await self.clock.advance(seconds)

    async def stop(self):
        if self.task and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _initial(h: Harness):
    await h.start()
    h.ctl.on_service_add(svc())
    h.ctl.on_endpoint_slice_add(eps("web", "10.244.1.1", "10.244.1.2", node="node-1"))
    h.ctl.on_services_synced()
    h.ctl.on_endpoint_slices_synced()
    await settle()


@arun
async def test_nothing_programmed_before_both_initial_syncs():
    h = Harness()
    await h.start()
    try:
        h.ctl.on_service_add(svc())
        h.ctl.on_services_synced()
        await h.advance(60)  # even the periodic sync does nothing yet
        assert h.dp.states == []
        h.ctl.on_endpoint_slice_add(eps("web", "10.244.1.1"))
        h.ctl.on_endpoint_slices_synced()
        await settle()
        (state,) = h.dp.states
        assert state.full_sync and set(state.service_map) == {WEB}
        assert [str(e) for e in state.endpoints_map[WEB]] == ["10.244.1.1:8080"]
        assert h.dp.started
    finally:
        await h.stop()


@arun
async def test_partial_then_periodic_full():
    h = Harness()
    try:
        await _initial(h)
        assert h.dp.states[-1].full_sync
        # Within min-sync-period: coalesced, not synced yet.
        await h.advance(1.0)
        h.ctl.on_service_add(svc("db", "172.30.0.20", 5432, pname="pg"))
        h.ctl.on_endpoint_slice_update(eps("web", "10.244.1.1"), eps("web", "10.244.1.1", "10.244.1.3"))
        await settle()
        state = h.dp.states[-1]
        assert not state.full_sync
        assert state.updated_services == {"default/db", "default/web"}
        assert [str(e) for e in state.endpoints_map[WEB]] == ["10.244.1.1:8080", "10.244.1.3:8080"]
        # A sync-period later the periodic sync is full.
        await h.advance(30.0)
        assert h.dp.states[-1].full_sync and h.dp.states[-1].updated_services == frozenset()
    finally:
        await h.stop()


@arun
async def test_noop_event_does_not_sync():
    h = Harness()
    try:
        await _initial(h)
        n = len(h.dp.states)
        h.ctl.on_service_update(svc(), svc())
        await h.advance(5)
        assert len(h.dp.states) == n
    finally:
        await h.stop()


@arun
async def test_failure_keeps_state_retries_full_with_backoff_and_carries_changes(caplog):
    h = Harness(min_sync=1.0, sync=30.0)
    try:
        await _initial(h)
        good = h.dp.programmed
        await h.advance(2)
        h.dp.fail_next = 2
        udp = svc("dns", "172.30.0.53", 53, "UDP", "dns")
        h.ctl.on_service_add(udp)
        with caplog.at_level(logging.ERROR, logger="test.controller"):
            await settle()
        assert h.dp.programmed is good  # the failed sync changed nothing
        assert "iptables-restore: line 3 failed" in caplog.text and "retrying as a full sync in 1.0s" in caplog.text
        # Retries after 1 s, then 2 s (back-off); each retry is full.
        await h.advance(1.0)
        assert len(h.dp.states) == 3 and h.dp.states[-1].full_sync
        assert "retrying as a full sync in 2.0s" in caplog.text
        await h.advance(1.9)
        assert len(h.dp.states) == 3
        await h.advance(0.1)
        last = h.dp.states[-1]
        assert h.dp.programmed is last and last.full_sync
        assert "default/dns" in last.updated_services  # carried over the failures
        assert h.metrics.value("kubeproxy_sync_proxy_rules_failures_total") == 2
        # Next change is partial again and no longer lists the old change.
        await h.advance(2)
        h.ctl.on_service_delete(udp)
        await settle()
        assert not h.dp.states[-1].full_sync
        assert h.dp.states[-1].deleted_udp_cluster_ips == {"172.30.0.53"}
    finally:
        await h.stop()


@arun
async def test_metrics_and_health_follow_syncs():
    h = Harness(health=True)
    try:
        await h.start()
        h.ctl.on_services_synced()
        h.ctl.on_endpoint_slices_synced()
        await settle()
        m = h.metrics
        assert m.value("kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
        assert m.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
        assert m.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") == h.wall[0]
        await h.advance(2)
        # A change with a trigger time 0.5 s ago feeds the latency histogram.
        s = eps("web", "10.244.1.1")
        s = dataclasses.replace(
            s,
            meta=dataclasses.replace(
                s.meta, annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2023-11-14T22:13:21.5Z"}
            ),
        )
        h.dp.fail_next = 1
        h.ctl.on_endpoint_slice_add(s)
        assert h.health.oldest_pending_queued == h.wall[0]
        await settle()
        assert h.health.oldest_pending_queued  # failed: still pending
        assert m.value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") == h.wall[0]
        await h.advance(1.0)  # retry succeeds
        assert h.health.oldest_pending_queued == 0 and h.health.is_healthy()
        assert m.value("kubeproxy_network_programming_duration_seconds_count") == 1
        assert m.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
        assert m.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    finally:
        await h.stop()


@arun
async def test_health_turns_unhealthy_when_sync_stalls():
    h = Harness(health=True, sync=10.0)
    try:
        await _initial(h)
        h.dp.fail_next = 100
        await h.advance(2)
        h.ctl.on_service_add(svc("db", "172.30.0.20"))
        await settle()
        await h.advance(19.0)
        assert h.health.is_healthy()
        await h.advance(1.0)  # 2 x sync-period since the change was queued
        assert not h.health.is_healthy()
    finally:
        await h.stop()


@arun
async def test_labels_filter_like_kube_proxy_informers():
    h = Harness()
    try:
        await _initial(h)
        await h.advance(2)
        other = dataclasses.replace(
            svc(), meta=ObjectMeta(name="web", labels={"service.kubernetes.io/service-proxy-name": "other"})
        )
        h.ctl.on_service_update(svc(), other)
        await settle()
        assert h.dp.states[-1].service_map == {}
        assert "default/web" not in h.dp.states[-1].services
    finally:
        await h.stop()


@pytest.mark.parametrize("label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"])
@arun
async def test_labelled_slices_and_services_come_and_go_like_informer_events(label):
    """kube-proxy's informers list with !service-proxy-name,!headless: gaining the label is a delete, losing it an add."""
    h = Harness()
    try:
        await _initial(h)
        await h.advance(2)
        good = eps("web", "10.244.1.1", "10.244.1.2", node="node-1")
        labelled = dataclasses.replace(good, meta=dataclasses.replace(good.meta, labels={**good.meta.labels, label: "x"}))
        h.ctl.on_endpoint_slice_update(good, labelled)
        await settle()
        assert h.dp.states[-1].endpoints_map.get(WEB, ()) == ()
        await h.advance(2)
        h.ctl.on_endpoint_slice_update(labelled, good)
        await settle()
        assert len(h.dp.states[-1].endpoints_map[WEB]) == 2
        # A labelled Service added later is never proxied; dropping the label makes it appear.
        await h.advance(2)
        other = svc("db", "172.30.0.20", 5432, pname="pg")
        other_labelled = dataclasses.replace(other, meta=ObjectMeta(name="db", labels={label: "x"}))
        n = len(h.dp.states)
        h.ctl.on_service_add(other_labelled)
        await h.advance(2)
        assert len(h.dp.states) == n  # nothing to sync: the informer would not have seen it
        h.ctl.on_service_update(other_labelled, other)
        await settle()
        assert ServicePortName("default", "db", "pg", "TCP") in h.dp.states[-1].service_map
    finally:
        await h.stop()


@arun
async def test_node_zone_change_forces_full_sync():
    h = Harness()
    try:
        await _initial(h)
        await h.advance(2)
        node = Node(meta=ObjectMeta(name="node-1", namespace="", labels={"topology.kubernetes.io/zone": "zone-b"}))
        h.ctl.on_node_add(Node(meta=ObjectMeta(name="node-2", namespace="", labels={"topology.kubernetes.io/zone": "x"})))
        await settle()
        n = len(h.dp.states)
        h.ctl.on_node_add(node)
        await settle()
        assert len(h.dp.states) == n + 1
        st = h.dp.states[-1]
        assert st.full_sync and st.node.zone == "zone-b" and st.node.name == "node-1"
    finally:
        await h.stop()


@arun
async def test_dry_run_renders_once_and_returns():
    h = Harness(dry_run=True)
    task = asyncio.create_task(h.ctl.run())
    h.task = task
    await settle()
    h.ctl.on_service_add(svc())
    h.ctl.on_services_synced()
    h.ctl.on_endpoint_slices_synced()
    await asyncio.wait_for(task, timeout=30)
    assert h.dp.states == [] and not h.dp.started  # never touched the "kernel"
    assert h.out.getvalue() == "default/web:http -> 172.30.0.10:80\n"


@arun
async def test_dry_run_watch_renders_every_sync():
    h = Harness(dry_run=True, watch=True)
    try:
        await h.start()
        h.ctl.on_services_synced()
        h.ctl.on_endpoint_slices_synced()
        await settle()
        await h.advance(2)
        h.ctl.on_service_add(svc())
        await settle()
        assert h.out.getvalue() == (
            "# kubelab proxy --dry-run: sync 1 (full), 0 service ports\n"
            "# kubelab proxy --dry-run: sync 2 (partial), 1 service ports\n"
            "default/web:http -> 172.30.0.10:80\n"
        )
        assert not h.task.done()
    finally:
        await h.stop()


def test_sync_log_line(caplog):
    async def go():
        h = Harness()
        with caplog.at_level(logging.INFO, logger="test.controller"):
            await _initial(h)
        await h.stop()

    asyncio.run(go())
    assert any(
        r.getMessage().startswith("synced 1 services, 2 endpoints in ") and r.getMessage().endswith("ms (full)")
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "failures,expected", [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (20, 30.0)], ids=lambda v: str(v)
)
def test_back_off_schedule(failures, expected):
    h = Harness(min_sync=1.0, sync=30.0)
    h.ctl.consecutive_failures = failures
    assert h.ctl._back_off() == expected


@arun
async def test_dataplane_full_sync_period_replaces_sync_period():
    """A mode with cheap partial syncs (iptables: kube-proxy's one-hour FullSyncPeriod) gets partial periodic syncs."""
    h = Harness()
    h.dp.full_sync_period = 3600.0
    try:
        await _initial(h)
        assert h.dp.states[-1].full_sync
        n = len(h.dp.states)
        await h.advance(60.0)
        periodic = h.dp.states[n:]
        assert periodic and not any(s.full_sync for s in periodic)  # every --sync-period, partial
        n = len(h.dp.states)
        await h.advance(3600.0)
        assert [s.full_sync for s in h.dp.states[n:]].count(True) == 1  # once an hour, full
    finally:
        await h.stop()
