"""The cluster as DNS sees it: compact records built from model objects.

:class:`ClusterIndex` keeps, per Service, per EndpointSlice and (when asked)
per Pod, only what answers need -- names, IPs, ports, hostnames -- so that
10,000 Services and 50,000 Pods fit well under CoreDNS's memory formula.
It mirrors the informer indexes CoreDNS's kubernetes plugin keeps
(coredns/coredns plugin/kubernetes/controller.go: service by name, service
by cluster IP, endpoints by service, endpoints by IP, pods by IP) and
answers nothing itself: :mod:`kubelab.dns.answer` does.

Objects are received through :class:`kubelab.proxy.provider.Provider`
events; every change bumps :attr:`ClusterIndex.generation` so prebuilt wire
answers can be dropped.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from kubelab.model import EndpointSlice, Pod, Service

# Namespaces every cluster has.  The model has no Namespace kind, so a
# namespace "exists" (CoreDNS: filteredNamespaceExists) when it is one of
# these or holds at least one Service, EndpointSlice or Pod we were told about.
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True, slots=True)
class PortRec:
    """One port: name ("" when unnamed), protocol (lowercase), number (-1 = none)."""

    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class ServiceRec:
    """What DNS needs of one Service."""

    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]  # real IPs only ("None" dropped)
    headless: bool
    external_name: str
    ports: tuple[PortRec, ...]


@dataclass(frozen=True, slots=True)
class AddressRec:
    """One ready endpoint address (CoreDNS keeps only ready ones, object/endpoint.go)."""

    ip: str
    hostname: str
    target_name: str  # targetRef name, for endpoint_pod_names; "" when longer than 63


@dataclass(frozen=True, slots=True)
class SliceRec:
    """One EndpointSlice, reduced to ready addresses and ports."""

    namespace: str
    service: str
    name: str
    addresses: tuple[AddressRec, ...]
    ports: tuple[PortRec, ...]


def service_rec(svc: Service) -> ServiceRec:
    ips = tuple(ip for ip in svc.cluster_ips if ip and ip != "None")
    return ServiceRec(
        namespace=svc.namespace.lower(),
        name=svc.name.lower(),
        type=svc.type,
        cluster_ips=ips,
        headless=svc.headless,
        external_name=svc.external_name,
        ports=tuple(PortRec(p.name.lower(), p.protocol.lower(), p.port) for p in svc.ports),
    )


def slice_rec(sl: EndpointSlice) -> SliceRec:
    addrs: list[AddressRec] = []
    if sl.address_type in ("IPv4", "IPv6"):
        for ep in sl.endpoints:
            # endpointsliceReady: nil counts as ready; terminating is not looked at.
            if ep.conditions.ready is False:
                continue
            target = ""
            if ep.target_ref is not None and len(ep.target_ref.name) < 64:
                target = ep.target_ref.name.lower()
            for a in ep.addresses:
                addrs.append(AddressRec(a, (ep.hostname or "").lower(), target))
    if sl.ports:
        ports = tuple(PortRec(p.name.lower(), p.protocol.lower(), p.port if p.port is not None else -1) for p in sl.ports)
    else:
        ports = (PortRec("", "", -1),)
    return SliceRec(sl.namespace.lower(), sl.service_name.lower(), sl.name, tuple(addrs), ports)


class ClusterIndex:
    """Services, endpoint slices and pods by the keys DNS looks them up with."""

    def __init__(self, *, keep_pods: bool = False) -> None:
        self.keep_pods = keep_pods
        self.services: dict[tuple[str, str], ServiceRec] = {}
        self.slices: dict[tuple[str, str], dict[str, SliceRec]] = {}  # (ns, service) -> slice name -> rec
        self.service_by_ip: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.slices_by_ip: dict[str, set[tuple[str, str, str]]] = defaultdict(set)  # ip -> (ns, svc, slice)
        self.pod_ip: dict[tuple[str, str], str] = {}  # (ns, name) -> pod IP ("" when not kept)
        self.pods_by_ip: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self._ns_refs: dict[str, int] = defaultdict(int)
        self.generation = 0
        self.modified = int(time.time())
        self.services_synced = False
        self.endpoints_synced = False
        self.pods_synced = False

    # -- state ---------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once both Services and EndpointSlices had their initial sync."""
        return self.services_synced and self.endpoints_synced

    def _changed(self) -> None:
        self.generation += 1
        self.modified = int(time.time())

    def namespace_exists(self, ns: str) -> bool:
        return ns in BUILTIN_NAMESPACES or self._ns_refs.get(ns, 0) > 0

    def _ref(self, ns: str, delta: int) -> None:
        n = self._ns_refs[ns] + delta
        if n <= 0:
            self._ns_refs.pop(ns, None)
        else:
            self._ns_refs[ns] = n

    # -- services ------------------------------------------------------------

    def set_service(self, svc: Service) -> None:
        rec = service_rec(svc)
        key = (rec.namespace, rec.name)
        old = self.services.get(key)
        if old == rec:
            return
        if old is not None:
            self._unindex_service(old)
        else:
            self._ref(rec.namespace, 1)
        self.services[key] = rec
        for ip in rec.cluster_ips:
            self.service_by_ip[ip].append(key)
        self._changed()

    def delete_service(self, svc: Service) -> None:
        key = (svc.namespace.lower(), svc.name.lower())
        old = self.services.pop(key, None)
        if old is None:
            return
        self._unindex_service(old)
        self._ref(old.namespace, -1)
        self._changed()

    def _unindex_service(self, rec: ServiceRec) -> None:
        key = (rec.namespace, rec.name)
        for ip in rec.cluster_ips:
            lst = self.service_by_ip.get(ip)
            if lst and key in lst:
                lst.remove(key)
                if not lst:
                    del self.service_by_ip[ip]

    # -- endpoint slices -----------------------------------------------------

    def set_slice(self, sl: EndpointSlice) -> None:
        rec = slice_rec(sl)
        group = self.slices.setdefault((rec.namespace, rec.service), {})
        old = group.get(rec.name)
        if old == rec:
            return
        if old is not None:
            self._unindex_slice(old)
        else:
            self._ref(rec.namespace, 1)
        group[rec.name] = rec
        for a in rec.addresses:
            self.slices_by_ip[a.ip].add((rec.namespace, rec.service, rec.name))
        self._changed()

    def delete_slice(self, sl: EndpointSlice) -> None:
        key = (sl.namespace.lower(), sl.service_name.lower())
        group = self.slices.get(key)
        old = group.pop(sl.name, None) if group else None
        if old is None:
            return
        if not group:
            del self.slices[key]
        self._unindex_slice(old)
        self._ref(old.namespace, -1)
        self._changed()

    def _unindex_slice(self, rec: SliceRec) -> None:
        ref = (rec.namespace, rec.service, rec.name)
        for a in rec.addresses:
            s = self.slices_by_ip.get(a.ip)
            if s is not None:
                s.discard(ref)
                if not s:
                    del self.slices_by_ip[a.ip]

    def service_slices(self, ns: str, svc: str) -> list[SliceRec]:
        """The slices of one service, in a stable order (by slice name)."""
        group = self.slices.get((ns, svc))
        if not group:
            return []
        return [group[k] for k in sorted(group)]

    # -- pods ----------------------------------------------------------------

    def set_pod(self, pod: Pod) -> None:
        key = (pod.namespace.lower(), pod.name)
        # CoreDNS drops pods being deleted (object/pod.go ToPod: errPodTerminating).
        ip = pod.pod_ip if (self.keep_pods and not pod.meta.deletion_timestamp) else ""
        old = self.pod_ip.get(key)
        if old == ip:
            return
        if old is None:
            self._ref(key[0], 1)
        elif old:
            self._unindex_pod(key, old)
        self.pod_ip[key] = ip
        if ip:
            self.pods_by_ip[ip].append(key)
        self._changed()

    def delete_pod(self, pod: Pod) -> None:
        key = (pod.namespace.lower(), pod.name)
        old = self.pod_ip.pop(key, None)
        if old is None:
            return
        if old:
            self._unindex_pod(key, old)
        self._ref(key[0], -1)
        self._changed()

    def _unindex_pod(self, key: tuple[str, str], ip: str) -> None:
        lst = self.pods_by_ip.get(ip)
        if lst and key in lst:
            lst.remove(key)
            if not lst:
                del self.pods_by_ip[ip]

    def pod_namespace_for_ip(self, ip: str) -> str | None:
        """Namespace of the (first) pod with this IP, for autopath; None when unknown."""
        lst = self.pods_by_ip.get(ip)
        return lst[0][0] if lst else None
