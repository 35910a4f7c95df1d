"""Interim manifest parsing for labs, used only while ``kubelab.proxy.objects`` is not in the tree.

The foundation-objects room owns parsing and validation
(``kubelab.proxy.objects.parse_object``); the lab calls it whenever it is
importable.  This module lets lab builds work before that lands: it reads
the fields the lab needs from Service / Pod / EndpointSlice dicts, with
errors in the same "file:line: Kind ns/name: field: problem" shape.  Delete
it once objects.py exists.
"""

from __future__ import annotations

from kubelab.model import (
    ContainerPort,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    ObjectMeta,
    ObjectReference,
    Origin,
    Pod,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)


class ObjectError(ValueError):
    pass


def _meta(raw: dict, origin: Origin) -> ObjectMeta:
    m = raw.get("metadata") or {}
    return ObjectMeta(
        name=str(m.get("name", "")),
        namespace=str(m.get("namespace", "default")),
        uid=str(m.get("uid", "")),
        labels={str(k): str(v) for k, v in (m.get("labels") or {}).items()},
        annotations={str(k): str(v) for k, v in (m.get("annotations") or {}).items()},
        deletion_timestamp=m.get("deletionTimestamp"),
        origin=origin,
    )


def parse_object(raw: dict, origin: Origin):
    kind = raw.get("kind")
    meta = _meta(raw, origin)
    where = f"{origin}: {kind} {meta.namespace}/{meta.name}"
    spec = raw.get("spec") or {}
    try:
        if kind == "Service":
            ports = []
            for i, p in enumerate(spec.get("ports") or []):
                if not isinstance(p, dict) or not isinstance(p.get("port"), int):
                    raise ObjectError(f"{where}: spec.ports[{i}].port: required integer")
                proto = p.get("protocol", "TCP")
                if proto not in ("TCP", "UDP", "SCTP"):
                    raise ObjectError(f"{where}: spec.ports[{i}].protocol: {proto!r} is not TCP, UDP or SCTP")
                ports.append(ServicePortSpec(p["port"], proto, str(p.get("name", "")), p.get("targetPort", 0) or 0, int(p.get("nodePort", 0) or 0)))
            cips = tuple(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
            lb = ()
            return Service(
                meta=meta, type=spec.get("type", "ClusterIP"), cluster_ips=cips, ports=tuple(ports),
                selector=spec.get("selector"), external_ips=tuple(spec.get("externalIPs") or ()),
                external_name=spec.get("externalName", ""), session_affinity=spec.get("sessionAffinity", "None"),
                external_traffic_policy=spec.get("externalTrafficPolicy", "Cluster"),
                internal_traffic_policy=spec.get("internalTrafficPolicy", "Cluster"),
                publish_not_ready_addresses=bool(spec.get("publishNotReadyAddresses", False)),
                load_balancer_ingress=lb,
            )
        if kind == "Pod":
            status = raw.get("status") or {}
            containers = tuple(c for c in (spec.get("containers") or []) if isinstance(c, dict))
            ports = []
            for c in containers:
                for i, p in enumerate(c.get("ports") or []):
                    if not isinstance(p.get("containerPort"), int):
                        raise ObjectError(f"{where}: spec.containers[].ports[{i}].containerPort: required integer")
                    ports.append(ContainerPort(p["containerPort"], p.get("protocol", "TCP"), str(p.get("name", ""))))
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            return Pod(
                meta=meta, node_name=spec.get("nodeName", ""), hostname=spec.get("hostname", ""),
                subdomain=spec.get("subdomain", ""), host_network=bool(spec.get("hostNetwork", False)),
                pod_ips=tuple(x["ip"] for x in status.get("podIPs") or []) or ((status["podIP"],) if status.get("podIP") else ()),
                host_ip=status.get("hostIP", ""), phase=status.get("phase", "Running"), ready=ready,
                ports=tuple(ports), termination_grace_period=int(spec.get("terminationGracePeriodSeconds", 30)),
                containers=containers,
            )
        if kind == "EndpointSlice":
            eps = []
            for e in raw.get("endpoints") or []:
                c = e.get("conditions") or {}
                tr = e.get("targetRef")
                eps.append(SliceEndpoint(
                    tuple(e.get("addresses") or ()), EndpointConditions(c.get("ready"), c.get("serving"), c.get("terminating")),
                    e.get("hostname"), e.get("nodeName"), e.get("zone"),
                    target_ref=ObjectReference(tr.get("kind", ""), tr.get("namespace", ""), tr.get("name", ""), tr.get("uid", "")) if tr else None,
                ))
            ports = tuple(EndpointPort(p.get("port"), p.get("protocol", "TCP"), p.get("name", "")) for p in raw.get("ports") or [])
            return EndpointSlice(meta=meta, service_name=meta.labels.get("kubernetes.io/service-name", ""),
                                 address_type=raw.get("addressType", "IPv4"), endpoints=tuple(eps), ports=ports)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        if isinstance(exc, ObjectError):
            raise
        raise ObjectError(f"{where}: malformed: {exc}") from None
    raise ObjectError(f"{where}: kind {kind!r} not supported")
