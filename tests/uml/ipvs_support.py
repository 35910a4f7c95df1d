"""Helpers the IPVS UML tests run *inside* UML (through ``UMLKernel.call``/``python``).

:class:`Driver` owns one :class:`IPVSProxier` in the agent process (the
UML root namespace is the node) and syncs it with states built on the host
by :func:`state`.  Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.provider import ModeDeps, SyncState

NODE = "node-a"


def svc(
    name: str,
    cluster_ip: str,
    port: int = 80,
    endpoints: list[tuple[str, int]] | tuple = (),
    *,
    protocol: str = "TCP",
    namespace: str = "default",
    port_name: str = "",
    local: bool = True,
    **fields,
) -> tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]]:
    """One service port and its endpoints (all on this node unless ``local`` is False)."""
    spn = ServicePortName(namespace, name, port_name, protocol)
    sp = ServicePort(cluster_ip=cluster_ip, port=port, protocol=protocol, **fields)
    eps = tuple(e if isinstance(e, Endpoint) else Endpoint(e[0], e[1], is_local=local, node_name=NODE) for e in endpoints)
    return spn, sp, eps


def state(*services, full: bool = True, updated: tuple[str, ...] = (), node_ips: tuple[str, ...] = ()) -> SyncState:
    return SyncState(
        service_map={s[0]: s[1] for s in services},
        endpoints_map={s[0]: s[2] for s in services},
        node=NodeInfo(name=NODE, ips=node_ips),
        full_sync=full,
        updated_services=frozenset(updated),
    )


class Driver:
    """One IPVS proxier inside UML, driven by the host."""

    def __init__(self, **config) -> None:
        from kubelab.modes.ipvs.proxier import IPVSProxier
        from kubelab.proxy.metrics import ProxyMetrics

        import time

        node_ips = tuple(config.pop("node_ips", ()))
        self.clock_offset = 0.0  # advance() moves the proxier's clock (graceful-termination deadlines)
        extra = {
            "iptables_backend": "legacy",
            "graceful_check_interval": 0.2,
            "clock": lambda: time.monotonic() + self.clock_offset,
            **config.pop("extra", {}),
        }
        cfg = replace(ProxyConfig(proxy_mode="ipvs"), **config)
        self.metrics = ProxyMetrics()
        self.proxier = IPVSProxier(
            ModeDeps(config=cfg, node=NodeInfo(NODE, node_ips), logger=logging.getLogger("kl-ipvs-test"), metrics=self.metrics, extra=extra)
        )

    def sync(self, st: SyncState) -> dict:
        asyncio.run(self.proxier.sync_proxy_rules(st))
        return {"timings": self.proxier.stats.timings, "ops": self.proxier.stats.last_ops, "draining": len(self.proxier.draining)}

    def graceful(self) -> int:
        self.proxier.process_graceful_termination()
        return len(self.proxier.draining)

    def advance(self, seconds: float) -> None:
        """Move the proxier's clock forward (as if ``seconds`` had passed)."""
        self.clock_offset += seconds

    def render(self, st: SyncState) -> str:
        """What ``--dry-run`` prints for ``st``."""
        return self.proxier.render(st)

    def metric(self, name: str, labels: dict | None = None) -> float | None:
        """One sample of the proxier's metrics registry, e.g. ``kubeproxy_sync_proxy_rules_ipvs_virtual_servers``."""
        return self.metrics.value(name, labels)

    def cleanup(self) -> None:
        self.proxier.cleanup()
        self.proxier.close()
