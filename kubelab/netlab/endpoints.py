"""The lab's endpoints controller: EndpointSlices from Pods and Service selectors.

Pure functions, following kube-controller-manager's EndpointSlice controller
(kubernetes ``pkg/controller/endpointslice`` and
``staging/src/k8s.io/endpointslice/utils.go``):

* only Services with a selector get slices (ExternalName ones do not);
* a pod is an endpoint when it matches the selector in the Service's
  namespace, is not terminal (Succeeded / Failed) and has an IP -- terminating
  pods stay, with their conditions saying so (``ShouldPodBeInEndpoints`` with
  includeTerminating);
* conditions (``podToEndpoint``): ``serving`` = pod Ready, ``terminating`` =
  has a deletionTimestamp, ``ready`` = publishNotReadyAddresses or
  (serving and not terminating);
* ``hostname`` only when the pod's hostname is set and its subdomain is the
  Service's name (``ShouldSetHostname``); ``nodeName``; ``zone`` from the
  node's topology.kubernetes.io/zone label; ``targetRef`` to the pod;
* ports: one per Service port, a named targetPort resolved against the
  pod's container ports of the same protocol (``FindPort``); a pod whose
  named port does not resolve is left out of that port, so pods are grouped
  into slices by their resolved port list; at most 100 endpoints a slice;
* a Service with a selector but no endpoints gets one empty placeholder slice.

Slice names are ``<service>-<5 hex>`` derived from the port list and chunk,
so the same input always gives the same names (the real controller uses
generateName; nothing depends on the suffix).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from kubelab.model import (
    LABEL_HEADLESS,
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    Node,
    ObjectMeta,
    ObjectReference,
    Pod,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)

MAX_ENDPOINTS_PER_SLICE = 100  # kube-controller-manager's --max-endpoints-per-slice default
MANAGED_BY = "endpointslice-controller.k8s.io"


def find_port(pod: Pod, port: ServicePortSpec) -> int | None:
    """The pod port a Service port targets (kubernetes ``podutil.FindPort``); None if unresolved."""
    target = port.target_port
    if isinstance(target, str) and not target.isdigit():
        for cp in pod.ports:
            if cp.name == target and cp.protocol == port.protocol:
                return cp.port
        return None
    number = int(target) if target else port.port
    return number


def selects(service: Service, pod: Pod) -> bool:
    """Does the Service's selector match the pod (same namespace, every label equal)?"""
    if service.selector is None or pod.namespace != service.namespace:
        return False
    return all(pod.meta.labels.get(k) == v for k, v in service.selector.items())


def should_be_endpoint(pod: Pod) -> bool:
    """kubernetes ``ShouldPodBeInEndpoints(pod, includeTerminating=true)``."""
    if pod.phase in ("Succeeded", "Failed"):
        return False
    return bool(pod.pod_ips)


def pod_to_endpoint(pod: Pod, service: Service, nodes: Mapping[str, Node]) -> SliceEndpoint:
    """kubernetes ``podToEndpoint``: one endpoint for one pod."""
    serving = bool(pod.ready)
    terminating = pod.meta.deletion_timestamp is not None
    ready = service.publish_not_ready_addresses or (serving and not terminating)
    node = nodes.get(pod.node_name)
    zone = node.zone if node is not None and node.zone else None
    hostname = pod.hostname if pod.hostname and pod.subdomain == service.name else None
    return SliceEndpoint(
        addresses=(pod.pod_ip,),
        conditions=EndpointConditions(ready=ready, serving=serving, terminating=terminating),
        hostname=hostname,
        node_name=pod.node_name or None,
        zone=zone,
        target_ref=ObjectReference("Pod", pod.namespace, pod.name, pod.meta.uid),
    )


def endpoint_ports(pod: Pod, service: Service) -> tuple[EndpointPort, ...]:
    """The resolved ports of one pod for one Service (unresolvable named ports left out)."""
    out = []
    for sp in service.ports:
        number = find_port(pod, sp)
        if number is None:
            continue
        out.append(EndpointPort(port=number, protocol=sp.protocol, name=sp.name, app_protocol=sp.app_protocol))
    return tuple(out)


def _slice_labels(service: Service) -> dict[str, str]:
    labels = {k: v for k, v in service.meta.labels.items() if k not in (LABEL_SERVICE_NAME, LABEL_MANAGED_BY)}
    labels[LABEL_SERVICE_NAME] = service.name
    labels[LABEL_MANAGED_BY] = MANAGED_BY
    if service.headless:
        labels[LABEL_HEADLESS] = ""
    return labels


def _slice_name(service: Service, ports: tuple[EndpointPort, ...], chunk: int) -> str:
    key = repr((sorted((p.name, p.protocol, p.port) for p in ports), chunk)).encode()
    suffix = hashlib.sha256(key).hexdigest()[:5]
    # Object names are at most 253 characters; keep room for the suffix.
    return f"{service.name[:240]}-{suffix}"


def service_endpoint_slices(service: Service, pods: Iterable[Pod], nodes: Mapping[str, Node]) -> list[EndpointSlice]:
    """The EndpointSlices the controller keeps for one Service."""
    if service.selector is None or service.type == "ExternalName":
        return []
    groups: dict[tuple[EndpointPort, ...], list[SliceEndpoint]] = {}
    for pod in sorted(pods, key=lambda p: p.name):
        if not selects(service, pod) or not should_be_endpoint(pod):
            continue
        groups.setdefault(endpoint_ports(pod, service), []).append(pod_to_endpoint(pod, service, nodes))
    labels = _slice_labels(service)
    slices: list[EndpointSlice] = []

    def make(ports: tuple[EndpointPort, ...], endpoints: list[SliceEndpoint], chunk: int) -> EndpointSlice:
        meta = ObjectMeta(name=_slice_name(service, ports, chunk), namespace=service.namespace, labels=dict(labels))
        return EndpointSlice(meta=meta, service_name=service.name, endpoints=tuple(endpoints), ports=ports)

    for ports in sorted(groups, key=lambda ps: [(p.name, p.protocol, p.port or 0) for p in ps]):
        eps = groups[ports]
        for chunk, start in enumerate(range(0, len(eps), MAX_ENDPOINTS_PER_SLICE)):
            slices.append(make(ports, eps[start : start + MAX_ENDPOINTS_PER_SLICE], chunk))
    if not slices:
        slices.append(make((), [], 0))  # the controller's placeholder slice
    return slices


def endpoint_slices(services: Iterable[Service], pods: Iterable[Pod], nodes: Iterable[Node]) -> list[EndpointSlice]:
    """Every Service's slices, in Service order."""
    pods = list(pods)
    by_ns: dict[str, list[Pod]] = {}
    for pod in pods:
        by_ns.setdefault(pod.namespace, []).append(pod)
    node_map = {n.name: n for n in nodes}
    out: list[EndpointSlice] = []
    for svc in services:
        out.extend(service_endpoint_slices(svc, by_ns.get(svc.namespace, []), node_map))
    return out


def slice_to_manifest(slice_: EndpointSlice, service_uid: str = "") -> dict:
    """An EndpointSlice as the discovery.k8s.io/v1 manifest ``kubectl get -o yaml`` would print."""
    meta: dict = {"name": slice_.name, "namespace": slice_.namespace, "labels": dict(slice_.meta.labels)}
    if service_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": slice_.service_name,
                "uid": service_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    endpoints = []
    for ep in slice_.endpoints:
        item: dict = {
            "addresses": list(ep.addresses),
            "conditions": {
                "ready": ep.conditions.ready,
                "serving": ep.conditions.serving,
                "terminating": ep.conditions.terminating,
            },
        }
        if ep.hostname is not None:
            item["hostname"] = ep.hostname
        if ep.node_name is not None:
            item["nodeName"] = ep.node_name
        if ep.zone is not None:
            item["zone"] = ep.zone
        if ep.target_ref is not None:
            item["targetRef"] = {
                "kind": ep.target_ref.kind,
                "namespace": ep.target_ref.namespace,
                "name": ep.target_ref.name,
                "uid": ep.target_ref.uid,
            }
        endpoints.append(item)
    ports = []
    for p in slice_.ports:
        port: dict = {"name": p.name, "protocol": p.protocol, "port": p.port}
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        ports.append(port)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": slice_.address_type,
        "endpoints": endpoints,
        "ports": ports,
    }
