"""Helpers for tests of the API source: object builders, a recording Provider, a running source.

Addresses used by the builders: Service cluster IPs in 10.96.0.0/16,
endpoints and pods in 10.244.0.0/16, nodes in 192.0.2.0/24 (TEST-NET-1).
No traffic is ever sent to them: they only travel inside API objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from kubelab.model import object_key
from kubelab.proxy.provider import Provider


def service(name: str, ip: str = "10.96.0.10", ns: str = "default", labels: dict | None = None,
            port: int = 80, **spec: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip] if ip != "None" else ["None"],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}], **spec}}


def endpoint_slice(name: str, service_name: str, ips: list[str], ns: str = "default", labels: dict | None = None,
                   port: int = 8080) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                    **(labels or {})}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": "node-a"} for ip in ips],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}


def endpoints(name: str, ips: list[str], ns: str = "default", port: int = 8080) -> dict:
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}]}


def pod(name: str, ip: str, ns: str = "default", node: str = "node-a") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                                                       "ports": [{"containerPort": 8080, "name": "http"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def node(name: str, ip: str = "192.0.2.1", zone: str = "zone-a") -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


class Recorder(Provider):
    """A Provider that remembers every call and keeps the resulting state per object."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.state: dict[tuple[str, str, str], Any] = {}

    def _rec(self, method: str, *objs: Any) -> None:
        self.calls.append((method, *[object_key(o)[1:] if o is not None else None for o in objs]))
        if method.endswith("_add"):
            assert object_key(objs[0]) not in self.state, f"{method} of an object already there: {object_key(objs[0])}"
            self.state[object_key(objs[0])] = objs[0]
        elif method.endswith("_update"):
            assert self.state.get(object_key(objs[0])) == objs[0], f"{method}: old is not what was delivered before"
            self.state[object_key(objs[1])] = objs[1]
        elif method.endswith("_delete"):
            assert self.state.get(object_key(objs[0])) == objs[0], f"{method}: not the last delivered version"
            del self.state[object_key(objs[0])]

    def names(self, method: str) -> list[str]:
        return [c[1][1] for c in self.calls if c[0] == method]

    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c[0] == method)

    def of_kind(self, kind: str) -> dict[tuple[str, str], Any]:
        return {(k[1], k[2]): v for k, v in self.state.items() if k[0] == kind}

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *objs: self._rec(name, *objs)
        return super().__getattribute__(name)

    # Provider's abstract methods (calls go through __getattribute__ above).
    def on_service_add(self, service): ...  # noqa: E704
    def on_service_update(self, old, new): ...  # noqa: E704
    def on_service_delete(self, service): ...  # noqa: E704
    def on_services_synced(self): ...  # noqa: E704
    def on_endpoint_slice_add(self, slice_): ...  # noqa: E704
    def on_endpoint_slice_update(self, old, new): ...  # noqa: E704
    def on_endpoint_slice_delete(self, slice_): ...  # noqa: E704
    def on_endpoint_slices_synced(self): ...  # noqa: E704


def write_kubeconfig(path: Path, server: str, *, user: dict | None = None, ca: str | None = None,
                     extra_contexts: list[tuple[str, str, dict]] = (), current: str = "test") -> Path:
    """A kubeconfig for ``server`` (context "test"), plus more (name, server, user) contexts."""
    cluster: dict[str, Any] = {"server": server}
    if ca:
        cluster["certificate-authority"] = ca
    cfg: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": current, "preferences": {},
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "test", "user": user or {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    for name, srv, usr in extra_contexts:
        c = {"server": srv, **({"certificate-authority": ca} if ca else {})}
        cfg["clusters"].append({"name": name, "cluster": c})
        cfg["users"].append({"name": name, "user": usr})
        cfg["contexts"].append({"name": name, "context": {"cluster": name, "user": name}})
    path.write_text(yaml.safe_dump(cfg))
    return path


FAST = dict(backoff_initial=0.01, backoff_max=0.05, request_timeout=10.0)


@contextlib.asynccontextmanager
async def running(source: Any) -> AsyncIterator[Any]:
    """Run ``source.run()`` for the body; cancel it and surface its crash, if any, afterwards."""
    task = asyncio.ensure_future(source.run())
    try:
        yield source
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_source(api: Any, tmp_path: Path, purpose: str = "proxy", handlers: list | None = None,
                logger: logging.Logger | None = None, **config: Any) -> tuple[Any, Recorder]:
    """A KubeSource on ``api`` through a kubeconfig file, with a Recorder and fast back-off."""
    from kubelab.proxy.sources import kube

    kc = write_kubeconfig(tmp_path / f"kubeconfig-{len(list(tmp_path.iterdir()))}", api.url)
    rec = Recorder()
    make = kube.KubeSourceConfig.for_dns if purpose == "dns" else kube.KubeSourceConfig.for_proxy
    cfg = make(kubeconfig=str(kc), **{**FAST, **config})
    src = kube.KubeSource(cfg, handlers if handlers is not None else [rec], logger or logging.getLogger("test.kube"))
    return src, rec
