"""kubelab's data model: frozen dataclasses shared by every room.

Two layers, as in kube-proxy:

* Object layer -- what the API (or a manifest) says: :class:`Service`,
  :class:`EndpointSlice`, :class:`Pod`, :class:`Node`.  Produced by
  ``kubelab.proxy.objects`` (parse + validate) and carried by sources as
  add/update/delete events.  DNS and the lab read these directly.
* Proxy layer -- what a dataplane needs: :class:`ServicePortName`,
  :class:`ServicePort` (kube-proxy's ``BaseServicePortInfo``) and
  :class:`Endpoint` (kube-proxy's ``BaseEndpointInfo``), gathered into the
  ``ServicePortMap`` and ``EndpointsMap`` of ``kubelab.proxy.changes``.

Everything is immutable so snapshots can be shared between the sync loop,
renderers and servers without copying.  Mapping fields (labels, selectors)
are plain dicts inside frozen dataclasses: equality works (that is how no-op
changes are detected), hashing such an object is not supported.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[str, ...] = ("TCP", "UDP", "SCTP")

SERVICE_TYPES: tuple[str, ...] = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")

# Labels kube-proxy's informers filter on (pkg/proxy/apis/well_known_labels.go).
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"
LABEL_HOSTNAME = "kubernetes.io/hostname"

DEFAULT_CLIENT_IP_TIMEOUT = 10800  # core/v1 DefaultClientIPServiceAffinitySeconds


# --------------------------------------------------------------------------
# Object layer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where an object came from: a file and line, or an API server watch."""

    source: str = ""  # file path, or "api" for a watch
    line: int | None = None  # 1-based line of the document start, when known

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return self.source


@dataclass(frozen=True)
class ObjectMeta:
    """The parts of metav1.ObjectMeta kubelab uses."""

    name: str
    namespace: str = "default"
    uid: str = ""
    resource_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    deletion_timestamp: str | None = None
    # Not part of equality: the same object read from another line is no change.
    origin: Origin = field(default_factory=Origin, compare=False)


@dataclass(frozen=True)
class ServicePortSpec:
    """One entry of ``Service.spec.ports``."""

    port: int
    protocol: str = "TCP"
    name: str = ""
    target_port: int | str = 0  # number, or a named container port; 0 = same as port
    node_port: int = 0  # 0 = none
    app_protocol: str | None = None


@dataclass(frozen=True)
class LoadBalancerIngress:
    """One entry of ``Service.status.loadBalancer.ingress``."""

    ip: str = ""
    hostname: str = ""
    ip_mode: str | None = None  # "VIP" | "Proxy" | None (= VIP)


@dataclass(frozen=True)
class Service:
    """A core/v1 Service, validated."""

    meta: ObjectMeta
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()  # () for ExternalName; ("None",) for headless
    ip_families: tuple[str, ...] = ()
    ports: tuple[ServicePortSpec, ...] = ()
    selector: dict[str, str] | None = None
    external_ips: tuple[str, ...] = ()
    external_name: str = ""
    session_affinity: str = "None"  # "None" | "ClientIP"
    session_affinity_timeout: int = DEFAULT_CLIENT_IP_TIMEOUT
    external_traffic_policy: str = "Cluster"  # "Cluster" | "Local"
    internal_traffic_policy: str = "Cluster"  # "Cluster" | "Local"
    health_check_node_port: int = 0
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    publish_not_ready_addresses: bool = False
    traffic_distribution: str | None = None  # "PreferClose" | "PreferSameZone" | "PreferSameNode"
    allocate_load_balancer_node_ports: bool = True

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def cluster_ip(self) -> str:
        """The primary cluster IP ("" for ExternalName, "None" for headless)."""
        return self.cluster_ips[0] if self.cluster_ips else ""

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


@dataclass(frozen=True)
class EndpointConditions:
    """discovery.k8s.io/v1 EndpointConditions; None means "unknown"."""

    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None

    @property
    def is_ready(self) -> bool:
        # Per the API: nil ready is interpreted as true (unknown state), but
        # terminating endpoints are never ready.
        return self.ready is not False and self.terminating is not True

    @property
    def is_serving(self) -> bool:
        return self.serving if self.serving is not None else self.is_ready

    @property
    def is_terminating(self) -> bool:
        return self.terminating is True


@dataclass(frozen=True)
class ObjectReference:
    """A targetRef: which object an endpoint is."""

    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


@dataclass(frozen=True)
class SliceEndpoint:
    """One entry of ``EndpointSlice.endpoints``."""

    addresses: tuple[str, ...]
    conditions: EndpointConditions = field(default_factory=EndpointConditions)
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    hints_for_zones: tuple[str, ...] = ()
    hints_for_nodes: tuple[str, ...] = ()
    target_ref: ObjectReference | None = None


@dataclass(frozen=True)
class EndpointPort:
    """One entry of ``EndpointSlice.ports``; name "" matches an unnamed service port."""

    port: int | None
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str | None = None


@dataclass(frozen=True)
class EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice (core/v1 Endpoints are converted to these)."""

    meta: ObjectMeta
    service_name: str  # the kubernetes.io/service-name label
    address_type: str = "IPv4"  # "IPv4" | "IPv6" | "FQDN"
    endpoints: tuple[SliceEndpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name


@dataclass(frozen=True)
class ContainerPort:
    """A container port of a Pod, which a Service's named targetPort resolves to."""

    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True)
class Pod:
    """A core/v1 Pod: what DNS, the endpoints controller and the lab need."""

    meta: ObjectMeta
    node_name: str = ""
    hostname: str = ""
    subdomain: str = ""
    host_network: bool = False
    pod_ips: tuple[str, ...] = ()
    host_ip: str = ""
    phase: str = "Running"
    ready: bool = True
    ports: tuple[ContainerPort, ...] = ()
    termination_grace_period: int = 30
    # The lab's workload shorthand (``spec.containers[0].command`` / a
    # ``kubelab.dev/workload`` annotation); ignored by the proxy.
    containers: tuple[dict, ...] = ()

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def pod_ip(self) -> str:
        return self.pod_ips[0] if self.pod_ips else ""


@dataclass(frozen=True)
class NodeAddress:
    type: str  # InternalIP | ExternalIP | Hostname | InternalDNS | ExternalDNS
    address: str


@dataclass(frozen=True)
class Taint:
    """One ``spec.taints`` entry of a Node (kube-proxy's /healthz fails on ToBeDeletedByClusterAutoscaler)."""

    key: str
    value: str = ""
    effect: str = ""  # NoSchedule | PreferNoSchedule | NoExecute


@dataclass(frozen=True)
class Node:
    """A core/v1 Node."""

    meta: ObjectMeta
    addresses: tuple[NodeAddress, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    taints: tuple[Taint, ...] = ()

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def zone(self) -> str:
        return self.meta.labels.get(LABEL_TOPOLOGY_ZONE, "")


KubeObject = Service | EndpointSlice | Pod | Node


def object_kind(obj: KubeObject) -> str:
    """The Kubernetes kind of a model object ("Service", "EndpointSlice", ...)."""
    return type(obj).__name__


def object_key(obj: KubeObject) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity sources and trackers key on."""
    ns = "" if isinstance(obj, Node) else obj.meta.namespace
    return (object_kind(obj), ns, obj.meta.name)


# --------------------------------------------------------------------------
# Proxy layer
# --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ServicePortName:
    """Identifies one port of one Service (kube-proxy's ServicePortName)."""

    namespace: str
    name: str
    port: str  # the port's name, "" when unnamed
    protocol: str = "TCP"

    @property
    def namespaced_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        # Same text kube-proxy hashes into chain names: "ns/name" or "ns/name:port".
        if self.port:
            return f"{self.namespace}/{self.name}:{self.port}"
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    """One service port as a dataplane sees it (kube-proxy's BaseServicePortInfo)."""

    cluster_ip: str
    port: int
    protocol: str = "TCP"
    node_port: int = 0
    target_port: int | str = 0
    session_affinity: str = "None"
    sticky_max_age_seconds: int = 0  # set only when session_affinity == "ClientIP"
    external_ips: tuple[str, ...] = ()
    load_balancer_vips: tuple[str, ...] = ()  # ingress IPs whose ipMode is not Proxy
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    traffic_distribution: str | None = None
    hints_annotation: str = ""  # service.kubernetes.io/topology-mode (or the old aware-hints)
    # kube-proxy's per-service IPVS scheduler annotation, see modes.ipvs.
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def externally_accessible(self) -> bool:
        """kube-proxy's ExternallyAccessible: has a NodePort, externalIP or LB VIP."""
        return bool(self.node_port or self.external_ips or self.load_balancer_vips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """Some traffic uses all endpoints: internal traffic under policy Cluster, or any external
        traffic -- even with external policy Local, pod -> external-IP traffic short-circuits to
        all endpoints (kube-proxy's UsesClusterEndpoints)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        """Some traffic class (internal or external with policy Local) uses node-local endpoints."""
        return self.internal_policy_local or (self.externally_accessible and self.external_policy_local)

    @property
    def session_affinity_client_ip(self) -> bool:
        return self.session_affinity == "ClientIP"


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of one service port (kube-proxy's BaseEndpointInfo)."""

    ip: str
    port: int
    is_local: bool = False
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    node_name: str = ""
    zone: str = ""
    hostname: str = ""

    def __str__(self) -> str:
        # "ip:port", IPv6 bracketed: the string kube-proxy hashes into KUBE-SEP names.
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    @property
    def ip_family(self) -> int:
        return ipaddress.ip_address(self.ip).version


@dataclass(frozen=True)
class NodeInfo:
    """What a proxier knows of the node it runs on."""

    name: str
    ips: tuple[str, ...] = ()  # addresses NodePorts listen on (after --nodeport-addresses)
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
