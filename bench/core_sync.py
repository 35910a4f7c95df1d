#!/usr/bin/env python3
"""What the shared sync loop costs per sync, and what incremental change tracking saves.

For N services with E endpoints each (one EndpointSlice per service), measures
in one process, side by side:

* initial: every object through the change trackers into the maps (the first
  sync's bookkeeping, before a mode does anything);
* one change, incremental: one EndpointSlice edited, then a whole controller
  sync with a dataplane that does nothing (trackers -> maps -> SyncState);
* one change, peer: the same edit handled by rebuilding both maps from every
  object (what a proxy without change tracking does each sync).

The ratio incremental / rebuild is the figure; each is a median over --runs.

    python3 bench/core_sync.py --services 10000 --endpoints 5 --runs 7
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import time

from kubelab.model import (
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    NodeInfo,
    ObjectMeta,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)
from kubelab.proxy.changes import EndpointsChangeTracker, EndpointsMap, ServiceChangeTracker, ServicePortMap
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.controller import ProxyController
from kubelab.proxy.provider import Dataplane, ModeDeps


class NullDataplane(Dataplane):
    """Programs nothing: isolates the controller's own cost."""

    async def sync_proxy_rules(self, state):
        pass

    def render(self, state):
        return ""

    def cleanup(self):
        pass


def objects(n: int, e: int) -> tuple[list[Service], list[EndpointSlice]]:
    services, slices = [], []
    for i in range(n):
        name = f"svc-{i}"
        services.append(
            Service(
                meta=ObjectMeta(name=name),
                cluster_ips=(f"172.30.{i // 250}.{i % 250 + 1}",),
                ports=(ServicePortSpec(80, "TCP", "http", 8080),),
            )
        )
        slices.append(
            EndpointSlice(
                meta=ObjectMeta(name=f"{name}-1", labels={"kubernetes.io/service-name": name}),
                service_name=name,
                endpoints=tuple(
                    SliceEndpoint(
                        addresses=(f"10.{(i * e + j) // 65536 % 256}.{(i * e + j) // 256 % 256}.{(i * e + j) % 256}",),
                        conditions=EndpointConditions(ready=True),
                        node_name=f"node-{j % 3}",
                    )
                    for j in range(e)
                ),
                ports=(EndpointPort(8080, "TCP", "http"),),
            )
        )
    return services, slices


def rebuild(services, slices) -> tuple[ServicePortMap, EndpointsMap]:
    st, et = ServiceChangeTracker(), EndpointsChangeTracker("node-0")
    for s in services:
        st.update(None, s)
    for s in slices:
        et.endpoint_slice_update(s)
    sm, em = ServicePortMap(), EndpointsMap()
    sm.update(st)
    em.update(et)
    return sm, em


async def controller_run(services, slices, runs: int) -> tuple[float, list[float]]:
    deps = ModeDeps(
        config=ProxyConfig(min_sync_period=0.0, sync_period=3600.0),
        node=NodeInfo(name="node-0"),
        logger=logging.getLogger("bench"),
    )
    ctl = ProxyController(deps, NullDataplane())
    t = time.perf_counter()
    for s in services:
        ctl.on_service_add(s)
    for s in slices:
        ctl.on_endpoint_slice_add(s)
    ctl.services_synced = ctl.endpoint_slices_synced = True
    await ctl.sync_proxy_rules()
    initial = time.perf_counter() - t
    per_change = []
    victim = slices[len(slices) // 2]
    for r in range(runs):
        edited = dataclasses.replace(victim, endpoints=victim.endpoints[:-1] if r % 2 == 0 else victim.endpoints)
        t = time.perf_counter()
        ctl.on_endpoint_slice_update(victim, edited)
        await ctl.sync_proxy_rules()
        per_change.append(time.perf_counter() - t)
        victim = edited
    return initial, per_change


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    services, slices = objects(args.services, args.endpoints)
    initial, incremental = asyncio.run(controller_run(services, slices, args.runs))
    peer = []
    for _ in range(args.runs):
        t = time.perf_counter()
        rebuild(services, slices)
        peer.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(incremental, peer)]
    med = statistics.median
    print(f"{args.services} services x {args.endpoints} endpoints, {args.runs} runs")
    print(f"initial sync bookkeeping: {initial:.2f} s")
    print(f"one change, incremental sync: {med(incremental) * 1000:.1f} ms ({min(incremental) * 1000:.1f}-{max(incremental) * 1000:.1f})")
    print(f"one change, rebuild peer:     {med(peer) * 1000:.1f} ms ({min(peer) * 1000:.1f}-{max(peer) * 1000:.1f})")
    print(f"ratio incremental/rebuild: {med(ratios):.4f} ({min(ratios):.4f}-{max(ratios):.4f})")


if __name__ == "__main__":
    main()
