"""Parse and validate Kubernetes manifests into :mod:`kubelab.model` objects.

This is kubelab's stand-in for the API server's decoding, defaulting and
validation of the kinds a service proxy and a cluster DNS need:

* core/v1 ``Service``, ``Endpoints`` (converted to ``EndpointSlice``\\ s, as the
  EndpointSlice mirroring controller does), ``Pod`` and ``Node``;
* discovery.k8s.io/v1 ``EndpointSlice``.

Input is YAML or JSON, one or many documents, including ``kind: List`` and
the typed lists (``ServiceList`` ...) exactly as ``kubectl get -o yaml`` or
the REST API print them.  Unknown fields (``managedFields``, most of
``status``) are ignored; unknown *kinds* (Deployment, ConfigMap, a lab spec)
are skipped without an error so a folder can hold other things too, but a
known kind at an unknown version of its group (``discovery.k8s.io/v1beta1``)
is reported.

Defaults are the API server's (``pkg/apis/core/v1/defaults.go``): protocol
TCP, targetPort = port, sessionAffinity None with a 10800 s ClientIP timeout,
traffic policies Cluster, type ClusterIP, LoadBalancer ingress ipMode VIP.
Validation follows ``ValidateService`` / ``ValidateEndpoints`` in
``pkg/apis/core/validation/validation.go`` and ``ValidateEndpointSlice`` in
``pkg/apis/discovery/validation/validation.go``, and words its messages the
same way (``spec.ports[1].nodePort: Invalid value: 70000: must be between 1
and 65535, inclusive``).  Cluster IPs are *not* allocated: a Service without
``clusterIP`` has no cluster IP (kube-proxy skips such a Service).

An invalid object yields exactly one :class:`ObjectError` naming the file and
line of its document, ``Kind namespace/name``, every offending field path and
what is wrong with it; a file that cannot be read or parsed yields one error
for the whole file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kubelab.model import (
    DEFAULT_CLIENT_IP_TIMEOUT,
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    PROTOCOLS,
    SERVICE_TYPES,
    ContainerPort,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    KubeObject,
    LoadBalancerIngress,
    Node,
    NodeAddress,
    ObjectMeta,
    ObjectReference,
    Origin,
    Pod,
    Service,
    ServicePortSpec,
    SliceEndpoint,
    Taint,
)

__all__ = [
    "FieldError",
    "LoadResult",
    "MIRRORING_MANAGED_BY",
    "ObjectError",
    "find_manifest_files",
    "manifest_paths",
    "is_manifest_file",
    "load_file",
    "load_path",
    "merge_results",
    "parse_documents",
    "parse_object",
    "parse_objects",
    "source_key",
]

# The managed-by label value on EndpointSlices kubelab mirrors from core/v1
# Endpoints.  Upstream's mirroring controller writes
# "endpointslicemirroring-controller.k8s.io"; ours names kubelab so a slice can
# always be traced back to the Endpoints it came from (see source_key()).
MIRRORING_MANAGED_BY = "endpointslicemirroring.kubelab.dev"
# Endpoints carrying this label are not mirrored (upstream: LabelSkipMirror).
LABEL_SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"
# Upstream mirrors at most this many endpoints per Endpoints subset.
MAX_MIRRORED_ENDPOINTS = 1000
ANNOTATION_LB_SOURCE_RANGES = "service.beta.kubernetes.io/load-balancer-source-ranges"
ANNOTATION_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ANNOTATION_LAST_CHANGE_TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

# One field of an object path: a struct field ("spec"), a list index (3), or
# a map key (Key("app")), printed as Go's field.Path prints them.


@dataclass(frozen=True)
class Key:
    """A map key in a field path, printed ``[key]`` (``metadata.labels[app]``)."""

    key: str


PathPart = str | int | Key
FieldPath = tuple[PathPart, ...]


def format_path(path: FieldPath) -> str:
    """``("spec", "ports", 1, "nodePort")`` -> ``spec.ports[1].nodePort``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, Key):
            out += f"[{part.key}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with one field, worded like apimachinery's field.Error."""

    path: str  # "spec.ports[1].nodePort"
    detail: str  # "Invalid value: 70000: must be between 1 and 65535, inclusive"
    line: int | None = None  # 1-based line of the field itself, when known

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail


class ObjectError(Exception):
    """Why an object (or a whole file) was not loaded.

    ``str()`` is one line: ``file:line: Kind namespace/name: field: what``
    (several field errors are joined with ``; ``).  ``file_level`` is true for
    an unreadable file or broken YAML/JSON: then nothing from that file was
    loaded and ``kind``/``name`` are empty.
    """

    def __init__(
        self,
        origin: Origin,
        causes: Sequence[FieldError] | str,
        *,
        kind: str = "",
        namespace: str = "",
        name: str = "",
        file_level: bool = False,
    ) -> None:
        if isinstance(causes, str):
            causes = (FieldError("", causes),)
        self.origin = origin
        self.causes: tuple[FieldError, ...] = tuple(causes)
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.file_level = file_level
        super().__init__(str(self))

    @property
    def field(self) -> str:
        """The first offending field path ("" for file-level errors)."""
        return self.causes[0].path if self.causes else ""

    @property
    def key(self) -> tuple[str, str, str] | None:
        """(manifest kind, namespace, name) of the rejected object, if it has a name.

        Comparable with :func:`source_key` of loaded objects, so a source can
        keep the last good version of exactly this object.
        """
        if self.file_level or not self.kind or not self.name:
            return None
        return (self.kind, self.namespace, self.name)

    @property
    def subject(self) -> str:
        """``Service default/web`` / ``Node n1`` / "" for file-level errors."""
        if not self.kind:
            return ""
        name = self.name or "<no name>"
        if self.kind == "Node":
            return f"Node {name}"
        return f"{self.kind} {self.namespace or 'default'}/{name}"

    def __str__(self) -> str:
        parts = []
        for c in self.causes:
            text = str(c)
            if c.line is not None and c.line != self.origin.line:
                text += f" (line {c.line})"
            parts.append(text)
        head = f"{self.origin}: "
        if self.subject:
            head += f"{self.subject}: "
        return head + "; ".join(parts)

    def __reduce__(self):  # picklable despite the keyword-only constructor
        return (_rebuild_error, (self.origin, self.causes, self.kind, self.namespace, self.name, self.file_level))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectError) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _rebuild_error(origin, causes, kind, namespace, name, file_level):
    return ObjectError(origin, causes, kind=kind, namespace=namespace, name=name, file_level=file_level)


@dataclass
class LoadResult:
    """What a load produced: valid objects, and one error per rejected object/file."""

    objects: list[KubeObject] = field(default_factory=list)
    errors: list[ObjectError] = field(default_factory=list)

    @property
    def file_errors(self) -> list[ObjectError]:
        return [e for e in self.errors if e.file_level]

    def extend(self, other: LoadResult) -> None:
        self.objects.extend(other.objects)
        self.errors.extend(other.errors)


def source_key(obj: KubeObject) -> tuple[str, str, str]:
    """(kind, namespace, name) of the *manifest* object ``obj`` came from.

    Equal to :func:`kubelab.model.object_key` except for EndpointSlices
    mirrored from core/v1 Endpoints, which map back to ``("Endpoints", ns,
    service name)``.  Matches :attr:`ObjectError.key`.
    """
    if isinstance(obj, Node):
        return ("Node", "", obj.meta.name)
    if isinstance(obj, EndpointSlice) and obj.meta.labels.get(LABEL_MANAGED_BY) == MIRRORING_MANAGED_BY:
        return ("Endpoints", obj.meta.namespace, obj.service_name)
    return (type(obj).__name__, obj.meta.namespace, obj.meta.name)


# ---------------------------------------------------------------------------
# Name and value checks (apimachinery/pkg/util/validation)
# ---------------------------------------------------------------------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_PORT_NAME = re.compile(r"[-a-z0-9]+\Z")


def dns1123_label_errors(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _DNS1123_LABEL.match(value):
        errs.append(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
            "and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')"
        )
    return errs


def dns1123_subdomain_errors(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append("must be no more than 253 characters")
    if not value or not all(_DNS1123_LABEL.match(p) for p in value.split(".")):
        errs.append(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
            "and must start and end with an alphanumeric character (e.g. 'example.com')"
        )
    return errs


def dns1035_label_errors(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _DNS1035_LABEL.match(value):
        errs.append(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
            "alphabetic character, and end with an alphanumeric character (e.g. 'my-name', or 'abc-123')"
        )
    return errs


def port_name_errors(value: str) -> list[str]:
    """IsValidPortName: an IANA_SVC_NAME (RFC 6335), used for named container/target ports."""
    errs = []
    if len(value) > 15:
        errs.append("must be no more than 15 characters")
    if not _PORT_NAME.match(value):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if "--" in value:
        errs.append("must not contain consecutive hyphens")
    if not re.search(r"[a-z]", value):
        errs.append("must contain at least one letter (a-z)")
    if value.startswith("-") or value.endswith("-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def qualified_name_errors(value: str) -> list[str]:
    """IsQualifiedName: ``[prefix/]name`` as label keys and appProtocol use."""
    prefix, _, name = value.rpartition("/")
    errs = []
    if "/" in value and not prefix:
        errs.append("prefix part must be non-empty")
    elif prefix:
        errs += [f"prefix part {m}" for m in dns1123_subdomain_errors(prefix)]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63 or not _QUALIFIED_NAME.match(name):
        errs.append(
            "name part must consist of at most 63 alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc')"
        )
    return errs


def label_value_errors(value: str) -> list[str]:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return [
            "a valid label must be an empty string or consist of at most 63 alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        ]
    return []


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address in the strict form the API accepts (no zone, no leading zeros), or None."""
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CIDR as Go's net.ParseCIDR accepts it (host bits may be set), or None."""
    if not isinstance(value, str) or "/" not in value or "%" in value:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def special_ip_errors(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[str]:
    """ValidateNonSpecialIP: addresses that can never be a service or endpoint IP."""
    if ip.is_unspecified:
        return ["may not be unspecified (0.0.0.0, ::)"]
    if ip.is_loopback:
        return ["may not be in the loopback range (127.0.0.0/8, ::1/128)"]
    if ip.is_link_local:
        return ["may not be in the link-local range (169.254.0.0/16, fe80::/10)"]
    if _is_link_local_multicast(ip):
        return ["may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"]
    return []


_LL_MCAST4 = ipaddress.ip_network("224.0.0.0/24")


def _is_link_local_multicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Go's net.IP.IsLinkLocalMulticast: 224.0.0.0/24, or IPv6 multicast with
    # link-local scope (ffx2::/16, which upstream's message calls ff02::/10).
    if ip.version == 4:
        return ip in _LL_MCAST4
    b = ip.packed
    return b[0] == 0xFF and b[1] & 0x0F == 0x02


def _show(value: object) -> str:
    """A value the way field.Invalid prints it: strings quoted, numbers bare."""
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, default=str)


# ---------------------------------------------------------------------------
# The per-object validation context
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: raised to stop parsing one object once its errors are recorded."""


class _Ctx:
    """Collects field errors for one object, with line numbers from the YAML node tree."""

    def __init__(self, origin: Origin, node: yaml.Node | None) -> None:
        self.origin = origin
        self.node = node
        self.errors: list[FieldError] = []

    # -- line lookup -----------------------------------------------------
    def line_of(self, path: FieldPath) -> int | None:
        """Line of the deepest node along ``path`` that exists in the document."""
        node = self.node
        if node is None:
            return None
        best = node.start_mark.line + 1
        for part in path:
            nxt = None
            if isinstance(node, yaml.MappingNode) and isinstance(part, (str, Key)):
                want = part.key if isinstance(part, Key) else part
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == want:
                        nxt = v
                        best = k.start_mark.line + 1
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    nxt = node.value[part]
                    best = nxt.start_mark.line + 1
            if nxt is None:
                break
            node = nxt
        return best

    # -- error constructors (apimachinery field.* wording) ---------------
    def add(self, path: FieldPath, detail: str) -> None:
        self.errors.append(FieldError(format_path(path), detail, self.line_of(path)))

    def invalid(self, path: FieldPath, value: object, msg: str) -> None:
        self.add(path, f"Invalid value: {_show(value)}: {msg}")

    def required(self, path: FieldPath, msg: str = "") -> None:
        self.add(path, "Required value" + (f": {msg}" if msg else ""))

    def forbidden(self, path: FieldPath, msg: str) -> None:
        self.add(path, f"Forbidden: {msg}")

    def duplicate(self, path: FieldPath, value: object) -> None:
        self.add(path, f"Duplicate value: {_show(value)}")

    def not_supported(self, path: FieldPath, value: object, supported: Iterable[str]) -> None:
        sup = ", ".join(json.dumps(s) for s in supported)
        self.add(path, f"Unsupported value: {_show(value)}: supported values: {sup}")

    def too_many(self, path: FieldPath, n: int, limit: int) -> None:
        self.add(path, f"Too many: {n}: must have at most {limit} items")

    # -- typed getters ---------------------------------------------------
    # A field of the wrong JSON type is reported the way the API server's
    # decoder would reject it, and read as absent so parsing can go on and
    # report everything else wrong with the object in the same error.

    def mapping(self, d: dict, key: str, path: FieldPath) -> dict:
        v = d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.invalid(path, v, "must be an object (a mapping)")
            return {}
        return v

    def items(self, d: dict, key: str, path: FieldPath) -> list:
        v = d.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.invalid(path, v, "must be a list")
            return []
        return v

    def item_mapping(self, v: object, path: FieldPath) -> dict | None:
        if isinstance(v, dict):
            return v
        self.invalid(path, v, "must be an object (a mapping)")
        return None

    def string(self, d: dict, key: str, path: FieldPath, default: str = "") -> str:
        v = d.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            self.invalid(path, v, "must be a string (quote it in YAML)")
            return default
        return v

    def optional_string(self, d: dict, key: str, path: FieldPath) -> str | None:
        if d.get(key) is None:
            return None
        return self.string(d, key, path)

    def integer(self, d: dict, key: str, path: FieldPath, default: int = 0) -> int:
        v = d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)  # JSON numbers may arrive as 80.0
            self.invalid(path, v, "must be an integer")
            return default
        return v

    def boolean(self, d: dict, key: str, path: FieldPath, default: bool | None = False) -> bool | None:
        v = d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.invalid(path, v, "must be true or false")
            return default
        return v

    def string_map(self, d: dict, key: str, path: FieldPath, *, labels: bool) -> dict[str, str]:
        raw = self.mapping(d, key, path)
        out: dict[str, str] = {}
        for k, v in raw.items():
            kp = (*path, Key(str(k)))
            if not isinstance(k, str):
                self.invalid(kp, k, "keys must be strings")
                continue
            if v is None:
                v = ""
            if not isinstance(v, str):
                self.invalid(kp, v, "must be a string (quote it in YAML)")
                continue
            if labels:
                for m in qualified_name_errors(k):
                    self.invalid(kp, k, m)
                for m in label_value_errors(v):
                    self.invalid(kp, v, m)
            out[k] = v
        return out

    def string_list(self, d: dict, key: str, path: FieldPath) -> list[str]:
        out = []
        for i, v in enumerate(self.items(d, key, path)):
            if not isinstance(v, str):
                self.invalid((*path, i), v, "must be a string")
                continue
            out.append(v)
        return out

    # -- common checks ---------------------------------------------------
    def port_number(self, path: FieldPath, value: int) -> None:
        if not 1 <= value <= 65535:
            self.invalid(path, value, "must be between 1 and 65535, inclusive")

    def protocol(self, d: dict, path: FieldPath) -> str:
        proto = self.string(d, "protocol", path, "TCP") or "TCP"
        if proto not in PROTOCOLS:
            self.not_supported(path, proto, PROTOCOLS)
        return proto

    def names(self, path: FieldPath, value: str, checker) -> None:
        for m in checker(value):
            self.invalid(path, value, m)

    def ip(self, path: FieldPath, value: object, *, special_ok: bool = False, family: int | None = None):
        """Validate an IP field; returns the parsed address or None."""
        if not isinstance(value, str):
            self.invalid(path, value, "must be a valid IP address")
            return None
        ip = parse_ip(value)
        if ip is None:
            if family is not None:
                self.invalid(path, value, f"must be a valid IPv{family} address")
            else:
                self.invalid(path, value, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")
            return None
        if family is not None and ip.version != family:
            self.invalid(path, value, f"must be a valid IPv{family} address (this is an IPv{ip.version} address)")
            return None
        if not special_ok:
            for m in special_ip_errors(ip):
                self.invalid(path, value, m)
        return ip


# ---------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------

# kind -> (API group, supported apiVersions).  A kind of the same name in
# another group (a Knative "Service") is somebody else's object and ignored.
_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Service": ("", ("v1",)),
    "Endpoints": ("", ("v1",)),
    "Pod": ("", ("v1",)),
    "Node": ("", ("v1",)),
    "EndpointSlice": ("discovery.k8s.io", ("discovery.k8s.io/v1",)),
}
_CLUSTER_SCOPED = {"Node"}


def _group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def _meta(ctx: _Ctx, d: dict, kind: str) -> ObjectMeta:
    md = ctx.mapping(d, "metadata", ("metadata",))
    name = ctx.string(md, "name", ("metadata", "name"))
    if not name:
        ctx.required(("metadata", "name"), "name or generateName is required" if not md.get("generateName") else
                     "generateName is not supported in manifests kubelab reads; give the object a name")
    else:
        checker = {
            "Service": dns1035_label_errors,
        }.get(kind, dns1123_subdomain_errors)
        ctx.names(("metadata", "name"), name, checker)
    if kind in _CLUSTER_SCOPED:
        namespace = ""
    else:
        namespace = ctx.string(md, "namespace", ("metadata", "namespace"), "default") or "default"
        ctx.names(("metadata", "namespace"), namespace, dns1123_label_errors)
    labels = ctx.string_map(md, "labels", ("metadata", "labels"), labels=True)
    annotations = ctx.string_map(md, "annotations", ("metadata", "annotations"), labels=False)
    ts = md.get("deletionTimestamp")
    return ObjectMeta(
        name=name,
        namespace=namespace,
        uid=ctx.string(md, "uid", ("metadata", "uid")),
        resource_version=ctx.string(md, "resourceVersion", ("metadata", "resourceVersion")),
        labels=labels,
        annotations=annotations,
        deletion_timestamp=None if ts is None else str(ts),
        origin=ctx.origin,
    )


# -- Service -----------------------------------------------------------------

_ETP = ("Cluster", "Local")
_ITP = ("Cluster", "Local")
_AFFINITY = ("ClientIP", "None")
_IP_FAMILIES = ("IPv4", "IPv6")
_IP_FAMILY_POLICIES = ("PreferDualStack", "RequireDualStack", "SingleStack")
_TRAFFIC_DISTRIBUTION = ("PreferClose", "PreferSameNode", "PreferSameZone")
_IP_MODES = ("Proxy", "VIP")
MAX_CLIENT_IP_TIMEOUT = 86400  # core.MaxClientIPServiceAffinitySeconds


def _parse_service(ctx: _Ctx, d: dict) -> Service:
    meta = _meta(ctx, d, "Service")
    spec = ctx.mapping(d, "spec", ("spec",))
    S = ("spec",)

    svc_type = ctx.string(spec, "type", (*S, "type"), "ClusterIP") or "ClusterIP"
    if svc_type not in SERVICE_TYPES:
        ctx.not_supported((*S, "type"), svc_type, SERVICE_TYPES)

    # --- cluster IPs -----------------------------------------------------
    cluster_ip = ctx.string(spec, "clusterIP", (*S, "clusterIP"))
    cluster_ips = ctx.string_list(spec, "clusterIPs", (*S, "clusterIPs"))
    if cluster_ip and not cluster_ips:
        cluster_ips = [cluster_ip]
    elif cluster_ips and not cluster_ip:
        cluster_ip = cluster_ips[0]
    elif cluster_ips and cluster_ips[0] != cluster_ip:
        ctx.invalid((*S, "clusterIPs", 0), cluster_ips[0], "must match `clusterIP` (the first cluster IP is the primary one)")
    headless = cluster_ip == "None"
    ip_versions: list[int] = []
    if svc_type == "ExternalName":
        if cluster_ip:
            ctx.forbidden((*S, "clusterIP"), "may not be set for ExternalName services (remove it)")
        cluster_ips = []
    elif headless:
        if len(cluster_ips) > 1:
            ctx.invalid((*S, "clusterIPs"), cluster_ips, "must be a single value ['None'] for a headless service")
        if svc_type in ("NodePort", "LoadBalancer"):
            ctx.invalid((*S, "clusterIP"), "None", f"may not be set to 'None' for {svc_type} services")
    else:
        if len(cluster_ips) > 2:
            ctx.invalid((*S, "clusterIPs"), cluster_ips, "may only hold up to 2 values (one per IP family)")
        for i, value in enumerate(cluster_ips):
            p = (*S, "clusterIP") if i == 0 and "clusterIPs" not in spec else (*S, "clusterIPs", i)
            if value == "None":
                ctx.invalid(p, value, "'None' must be the only cluster IP (a headless service)")
                continue
            ip = parse_ip(value)
            if ip is None:
                ctx.invalid(p, value, "must be empty, 'None', or a valid IP address")
            else:
                ip_versions.append(ip.version)
        if len(ip_versions) == 2 and ip_versions[0] == ip_versions[1]:
            ctx.invalid((*S, "clusterIPs", 1), cluster_ips[1], "may specify no more than one IP for each IP family")

    # --- IP families ------------------------------------------------------
    ip_families = ctx.string_list(spec, "ipFamilies", (*S, "ipFamilies"))
    for i, fam in enumerate(ip_families):
        if fam not in _IP_FAMILIES:
            ctx.not_supported((*S, "ipFamilies", i), fam, _IP_FAMILIES)
        elif fam in ip_families[:i]:
            ctx.duplicate((*S, "ipFamilies", i), fam)
        elif i < len(ip_versions) and fam != f"IPv{ip_versions[i]}":
            ctx.invalid((*S, "ipFamilies", i), fam, f"does not match the IP family of `clusterIPs[{i}]`")
    if len(ip_families) > 2:
        ctx.invalid((*S, "ipFamilies"), ip_families, "may only hold up to 2 values")
    if not ip_families and ip_versions:
        ip_families = [f"IPv{v}" for v in ip_versions]  # the API server fills them from the IPs
    if svc_type == "ExternalName":
        ip_families = []
    policy = ctx.string(spec, "ipFamilyPolicy", (*S, "ipFamilyPolicy"))
    if policy and policy not in _IP_FAMILY_POLICIES:
        ctx.not_supported((*S, "ipFamilyPolicy"), policy, _IP_FAMILY_POLICIES)

    # --- ExternalName -----------------------------------------------------
    external_name = ctx.string(spec, "externalName", (*S, "externalName"))
    if svc_type == "ExternalName":
        if not external_name:
            ctx.required((*S, "externalName"), "an ExternalName service needs the DNS name it aliases")
        else:
            # The API server accepts a trailing dot (an absolute name).
            ctx.names((*S, "externalName"), external_name.removesuffix("."), dns1123_subdomain_errors)
    else:
        external_name = ""

    # --- ports ------------------------------------------------------------
    raw_ports = ctx.items(spec, "ports", (*S, "ports"))
    if not raw_ports and not headless and svc_type != "ExternalName":
        ctx.required((*S, "ports"), "a service needs at least one port (only headless and ExternalName services may have none)")
    ports: list[ServicePortSpec] = []
    names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    seen_node_ports: set[tuple[int, str]] = set()
    for i, rp in enumerate(raw_ports):
        P = (*S, "ports", i)
        rp = ctx.item_mapping(rp, P)
        if rp is None:
            continue
        name = ctx.string(rp, "name", (*P, "name"))
        if len(raw_ports) > 1 and not name:
            ctx.required((*P, "name"), "every port of a multi-port service needs a name")
        elif name:
            ctx.names((*P, "name"), name, dns1123_label_errors)
            if name in names:
                ctx.duplicate((*P, "name"), name)
            names.add(name)
        port = ctx.integer(rp, "port", (*P, "port"))
        if "port" not in rp:
            ctx.required((*P, "port"))
        else:
            ctx.port_number((*P, "port"), port)
        proto = ctx.protocol(rp, (*P, "protocol"))
        if (port, proto) in seen_ports:
            ctx.duplicate(P, f"{port}/{proto}")
        seen_ports.add((port, proto))
        tp_raw = rp.get("targetPort")
        target: int | str = port
        if tp_raw is None or tp_raw == 0 or tp_raw == "":
            target = port  # defaulted to port, as SetDefaults_Service does
        elif isinstance(tp_raw, bool) or not isinstance(tp_raw, (int, str)):
            ctx.invalid((*P, "targetPort"), tp_raw, "must be a port number or a port name")
        elif isinstance(tp_raw, int):
            ctx.port_number((*P, "targetPort"), tp_raw)
            target = tp_raw
        else:
            ctx.names((*P, "targetPort"), tp_raw, port_name_errors)
            target = tp_raw
        node_port = ctx.integer(rp, "nodePort", (*P, "nodePort"))
        if node_port:
            if svc_type in ("ClusterIP", "ExternalName"):
                ctx.forbidden((*P, "nodePort"), f"may not be used when `type` is '{svc_type}' (use type NodePort or LoadBalancer)")
            ctx.port_number((*P, "nodePort"), node_port)
            if (node_port, proto) in seen_node_ports:
                ctx.duplicate((*P, "nodePort"), node_port)
            seen_node_ports.add((node_port, proto))
        app_protocol = ctx.optional_string(rp, "appProtocol", (*P, "appProtocol"))
        if app_protocol:
            ctx.names((*P, "appProtocol"), app_protocol, qualified_name_errors)
        ports.append(ServicePortSpec(
            port=port, protocol=proto, name=name, target_port=target,
            node_port=node_port if svc_type not in ("ClusterIP", "ExternalName") else 0,
            app_protocol=app_protocol,
        ))

    # --- selector ---------------------------------------------------------
    selector = None
    if spec.get("selector") is not None:
        selector = ctx.string_map(spec, "selector", (*S, "selector"), labels=True)

    # --- session affinity -------------------------------------------------
    affinity = ctx.string(spec, "sessionAffinity", (*S, "sessionAffinity"), "None") or "None"
    timeout = DEFAULT_CLIENT_IP_TIMEOUT
    if affinity not in _AFFINITY:
        ctx.not_supported((*S, "sessionAffinity"), affinity, _AFFINITY)
    sac = ctx.mapping(spec, "sessionAffinityConfig", (*S, "sessionAffinityConfig"))
    if affinity == "ClientIP":
        cip = ctx.mapping(sac, "clientIP", (*S, "sessionAffinityConfig", "clientIP"))
        tpath = (*S, "sessionAffinityConfig", "clientIP", "timeoutSeconds")
        timeout = ctx.integer(cip, "timeoutSeconds", tpath, DEFAULT_CLIENT_IP_TIMEOUT)
        if not 0 < timeout <= MAX_CLIENT_IP_TIMEOUT:
            ctx.invalid(tpath, timeout, f"must be greater than 0 and at most {MAX_CLIENT_IP_TIMEOUT}")
    elif spec.get("sessionAffinityConfig") is not None and affinity == "None":
        ctx.forbidden((*S, "sessionAffinityConfig"), "must not be set when session affinity is None")

    # --- external IPs -----------------------------------------------------
    external_ips = ctx.string_list(spec, "externalIPs", (*S, "externalIPs"))
    for i, value in enumerate(external_ips):
        ctx.ip((*S, "externalIPs", i), value)
    if svc_type == "ExternalName":
        external_ips = []

    # --- traffic policies -------------------------------------------------
    # apiservice.ExternallyAccessible: reachable from outside the cluster.
    externally_accessible = svc_type in ("NodePort", "LoadBalancer") or (svc_type == "ClusterIP" and bool(external_ips))
    etp = ctx.string(spec, "externalTrafficPolicy", (*S, "externalTrafficPolicy"))
    if etp and not externally_accessible:
        ctx.invalid((*S, "externalTrafficPolicy"), etp,
                    "may only be set for externally-accessible services (type NodePort or LoadBalancer, or with externalIPs)")
    elif etp and etp not in _ETP:
        ctx.not_supported((*S, "externalTrafficPolicy"), etp, _ETP)
    etp = etp or "Cluster"
    itp = ctx.string(spec, "internalTrafficPolicy", (*S, "internalTrafficPolicy"))
    if itp and itp not in _ITP:
        ctx.not_supported((*S, "internalTrafficPolicy"), itp, _ITP)
    itp = itp or "Cluster"

    hcnp = ctx.integer(spec, "healthCheckNodePort", (*S, "healthCheckNodePort"))
    if hcnp:
        if not (svc_type == "LoadBalancer" and etp == "Local"):
            ctx.invalid((*S, "healthCheckNodePort"), hcnp,
                        "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'")
        else:
            ctx.port_number((*S, "healthCheckNodePort"), hcnp)

    # --- load balancer ----------------------------------------------------
    ranges = ctx.string_list(spec, "loadBalancerSourceRanges", (*S, "loadBalancerSourceRanges"))
    ranges_path: FieldPath = (*S, "loadBalancerSourceRanges")
    if not ranges and meta.annotations.get(ANNOTATION_LB_SOURCE_RANGES, "").strip():
        # apiservice.GetLoadBalancerSourceRanges: the annotation is the old way to say it.
        ranges_path = ("metadata", "annotations", Key(ANNOTATION_LB_SOURCE_RANGES))
        ranges = [r for r in meta.annotations[ANNOTATION_LB_SOURCE_RANGES].split(",") if r.strip()]
    ranges = [r.strip() for r in ranges]
    if ranges and svc_type != "LoadBalancer":
        ctx.forbidden(ranges_path, "may only be used when `type` is 'LoadBalancer'")
    for i, r in enumerate(ranges):
        if parse_cidr(r) is None:
            p = (*ranges_path, i) if ranges_path[0] == "spec" else ranges_path
            ctx.invalid(p, r, "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24")

    lb_ip = ctx.string(spec, "loadBalancerIP", (*S, "loadBalancerIP"))
    if lb_ip:
        ctx.ip((*S, "loadBalancerIP"), lb_ip)
    alloc = ctx.boolean(spec, "allocateLoadBalancerNodePorts", (*S, "allocateLoadBalancerNodePorts"), None)
    if alloc is not None and svc_type != "LoadBalancer":
        ctx.forbidden((*S, "allocateLoadBalancerNodePorts"), "may only be used when `type` is 'LoadBalancer'")
    td = ctx.optional_string(spec, "trafficDistribution", (*S, "trafficDistribution"))
    if td is not None and td not in _TRAFFIC_DISTRIBUTION:
        ctx.not_supported((*S, "trafficDistribution"), td, _TRAFFIC_DISTRIBUTION)

    status = ctx.mapping(d, "status", ("status",))
    lb = ctx.mapping(status, "loadBalancer", ("status", "loadBalancer"))
    ingress: list[LoadBalancerIngress] = []
    for i, ri in enumerate(ctx.items(lb, "ingress", ("status", "loadBalancer", "ingress"))):
        P = ("status", "loadBalancer", "ingress", i)
        ri = ctx.item_mapping(ri, P)
        if ri is None:
            continue
        ip = ctx.string(ri, "ip", (*P, "ip"))
        hostname = ctx.string(ri, "hostname", (*P, "hostname"))
        ip_mode = ctx.optional_string(ri, "ipMode", (*P, "ipMode"))
        if ip:
            ctx.ip((*P, "ip"), ip, special_ok=True)
        if hostname:
            ctx.names((*P, "hostname"), hostname, dns1123_subdomain_errors)
            if parse_ip(hostname) is not None:
                ctx.invalid((*P, "hostname"), hostname, "must be a DNS name, not an IP address")
        if ip_mode is not None:
            if not ip:
                ctx.forbidden((*P, "ipMode"), "may not be specified when `ip` is not set")
            elif ip_mode not in _IP_MODES:
                ctx.not_supported((*P, "ipMode"), ip_mode, _IP_MODES)
        elif ip:
            ip_mode = "VIP"  # defaulted by the API server
        ingress.append(LoadBalancerIngress(ip=ip, hostname=hostname, ip_mode=ip_mode))

    pnra = ctx.boolean(spec, "publishNotReadyAddresses", (*S, "publishNotReadyAddresses"), False)

    return Service(
        meta=meta,
        type=svc_type,
        cluster_ips=tuple(cluster_ips),
        ip_families=tuple(ip_families),
        ports=tuple(ports),
        selector=selector,
        external_ips=tuple(external_ips),
        external_name=external_name,
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        external_traffic_policy=etp,
        internal_traffic_policy=itp,
        health_check_node_port=hcnp if svc_type == "LoadBalancer" else 0,
        load_balancer_ingress=tuple(ingress),
        load_balancer_source_ranges=tuple(ranges) if svc_type == "LoadBalancer" else (),
        publish_not_ready_addresses=bool(pnra),
        traffic_distribution=td,
        allocate_load_balancer_node_ports=True if alloc is None else alloc,
    )


# -- EndpointSlice -----------------------------------------------------------

_ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")
MAX_SLICE_ENDPOINTS = 1000
MAX_ENDPOINT_ADDRESSES = 100
MAX_SLICE_PORTS = 20000


def _target_ref(ctx: _Ctx, d: dict, path: FieldPath) -> ObjectReference | None:
    if d.get("targetRef") is None:
        return None
    tr = ctx.mapping(d, "targetRef", path)
    return ObjectReference(
        kind=ctx.string(tr, "kind", (*path, "kind")),
        namespace=ctx.string(tr, "namespace", (*path, "namespace")),
        name=ctx.string(tr, "name", (*path, "name")),
        uid=ctx.string(tr, "uid", (*path, "uid")),
    )


def _parse_endpoint_slice(ctx: _Ctx, d: dict) -> EndpointSlice:
    meta = _meta(ctx, d, "EndpointSlice")
    service_name = meta.labels.get(LABEL_SERVICE_NAME, "")
    if not service_name:
        ctx.required(("metadata", "labels", Key(LABEL_SERVICE_NAME)),
                     "kube-proxy ignores an EndpointSlice without this label; set it to the name of the Service")
    addr_type = ctx.string(d, "addressType", ("addressType",))
    family = {"IPv4": 4, "IPv6": 6}.get(addr_type)
    if not addr_type:
        ctx.required(("addressType",), "one of IPv4, IPv6, FQDN")
    elif addr_type not in _ADDRESS_TYPES:
        ctx.not_supported(("addressType",), addr_type, _ADDRESS_TYPES)

    raw_eps = ctx.items(d, "endpoints", ("endpoints",))
    if len(raw_eps) > MAX_SLICE_ENDPOINTS:
        ctx.too_many(("endpoints",), len(raw_eps), MAX_SLICE_ENDPOINTS)
    endpoints = []
    for i, re_ in enumerate(raw_eps):
        P = ("endpoints", i)
        re_ = ctx.item_mapping(re_, P)
        if re_ is None:
            continue
        addrs = ctx.string_list(re_, "addresses", (*P, "addresses"))
        if not addrs:
            ctx.required((*P, "addresses"), "must contain at least 1 address")
        elif len(addrs) > MAX_ENDPOINT_ADDRESSES:
            ctx.too_many((*P, "addresses"), len(addrs), MAX_ENDPOINT_ADDRESSES)
        for j, a in enumerate(addrs):
            if family is not None:
                ctx.ip((*P, "addresses", j), a, family=family)
            elif addr_type == "FQDN":
                name = a.removesuffix(".")
                if name.count(".") < 1:
                    ctx.invalid((*P, "addresses", j), a, "should be a domain with at least two segments separated by dots")
                else:
                    ctx.names((*P, "addresses", j), name, dns1123_subdomain_errors)
        cond = ctx.mapping(re_, "conditions", (*P, "conditions"))
        conditions = EndpointConditions(
            ready=ctx.boolean(cond, "ready", (*P, "conditions", "ready"), None),
            serving=ctx.boolean(cond, "serving", (*P, "conditions", "serving"), None),
            terminating=ctx.boolean(cond, "terminating", (*P, "conditions", "terminating"), None),
        )
        hostname = ctx.optional_string(re_, "hostname", (*P, "hostname"))
        if hostname is not None:
            ctx.names((*P, "hostname"), hostname, dns1123_label_errors)
        node_name = ctx.optional_string(re_, "nodeName", (*P, "nodeName"))
        if node_name is not None:
            ctx.names((*P, "nodeName"), node_name, dns1123_subdomain_errors)
        zone = ctx.optional_string(re_, "zone", (*P, "zone"))
        hints = ctx.mapping(re_, "hints", (*P, "hints"))
        zones, nodes = [], []
        for hk, out in (("forZones", zones), ("forNodes", nodes)):
            for k, h in enumerate(ctx.items(hints, hk, (*P, "hints", hk))):
                hp = (*P, "hints", hk, k)
                h = ctx.item_mapping(h, hp)
                if h is None:
                    continue
                hname = ctx.string(h, "name", (*hp, "name"))
                if not hname:
                    ctx.required((*hp, "name"))
                else:
                    out.append(hname)
        endpoints.append(SliceEndpoint(
            addresses=tuple(addrs),
            conditions=conditions,
            hostname=hostname,
            node_name=node_name,
            zone=zone,
            hints_for_zones=tuple(zones),
            hints_for_nodes=tuple(nodes),
            target_ref=_target_ref(ctx, re_, (*P, "targetRef")),
        ))

    raw_ports = ctx.items(d, "ports", ("ports",))
    if len(raw_ports) > MAX_SLICE_PORTS:
        ctx.too_many(("ports",), len(raw_ports), MAX_SLICE_PORTS)
    ports = []
    names: set[str] = set()
    for i, rp in enumerate(raw_ports):
        P = ("ports", i)
        rp = ctx.item_mapping(rp, P)
        if rp is None:
            continue
        name = ctx.string(rp, "name", (*P, "name"))
        if name:
            ctx.names((*P, "name"), name, dns1123_label_errors)
        if name in names:
            ctx.duplicate((*P, "name"), name)
        names.add(name)
        port: int | None = None
        if rp.get("port") is not None:
            port = ctx.integer(rp, "port", (*P, "port"))
            ctx.port_number((*P, "port"), port)
        proto = ctx.protocol(rp, (*P, "protocol"))
        app_protocol = ctx.optional_string(rp, "appProtocol", (*P, "appProtocol"))
        if app_protocol:
            ctx.names((*P, "appProtocol"), app_protocol, qualified_name_errors)
        ports.append(EndpointPort(port=port, protocol=proto, name=name, app_protocol=app_protocol))

    return EndpointSlice(
        meta=meta,
        service_name=service_name,
        address_type=addr_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
    )


# -- core/v1 Endpoints -> EndpointSlices --------------------------------------


def _parse_endpoints(ctx: _Ctx, d: dict) -> list[EndpointSlice]:
    """Validate core/v1 Endpoints and mirror them into EndpointSlices.

    As upstream's EndpointSlice mirroring controller
    (pkg/controller/endpointslicemirroring): one slice per subset and IP
    family, ``addresses`` ready, ``notReadyAddresses`` not ready, serving the
    same as ready, hostname / nodeName / targetRef carried over, the
    Endpoints' labels and annotations copied (minus the last-applied and
    last-change-trigger-time annotations), labelled with the service name and
    our managed-by value.  Slices are named ``<name>-<i>`` in subset order.
    """
    meta = _meta(ctx, d, "Endpoints")
    subsets = []
    for i, rs in enumerate(ctx.items(d, "subsets", ("subsets",))):
        P = ("subsets", i)
        rs = ctx.item_mapping(rs, P)
        if rs is None:
            continue
        addresses: list[tuple[str, bool, dict, FieldPath]] = []
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for j, ra in enumerate(ctx.items(rs, key, (*P, key))):
                AP = (*P, key, j)
                ra = ctx.item_mapping(ra, AP)
                if ra is None:
                    continue
                ip_s = ctx.string(ra, "ip", (*AP, "ip"))
                if not ip_s:
                    ctx.required((*AP, "ip"))
                else:
                    ctx.ip((*AP, "ip"), ip_s)
                hostname = ctx.string(ra, "hostname", (*AP, "hostname"))
                if hostname:
                    ctx.names((*AP, "hostname"), hostname, dns1123_label_errors)
                node_name = ctx.optional_string(ra, "nodeName", (*AP, "nodeName"))
                if node_name:
                    ctx.names((*AP, "nodeName"), node_name, dns1123_subdomain_errors)
                addresses.append((ip_s, ready, ra, AP))
        if not addresses:
            ctx.required(P, "must specify `addresses` or `notReadyAddresses`")
        raw_ports = ctx.items(rs, "ports", (*P, "ports"))
        ports = []
        names: set[str] = set()
        for k, rp in enumerate(raw_ports):
            PP = (*P, "ports", k)
            rp = ctx.item_mapping(rp, PP)
            if rp is None:
                continue
            name = ctx.string(rp, "name", (*PP, "name"))
            if len(raw_ports) > 1 and not name:
                ctx.required((*PP, "name"), "every port of a multi-port subset needs a name")
            elif name:
                ctx.names((*PP, "name"), name, dns1123_label_errors)
                if name in names:
                    ctx.duplicate((*PP, "name"), name)
                names.add(name)
            port = ctx.integer(rp, "port", (*PP, "port"))
            ctx.port_number((*PP, "port"), port)
            proto = ctx.protocol(rp, (*PP, "protocol"))
            app_protocol = ctx.optional_string(rp, "appProtocol", (*PP, "appProtocol"))
            ports.append(EndpointPort(port=port, protocol=proto, name=name, app_protocol=app_protocol))
        subsets.append((addresses, ports))
    if ctx.errors:
        raise _Invalid()
    if meta.labels.get(LABEL_SKIP_MIRROR) == "true":
        return []

    labels = dict(meta.labels)
    labels[LABEL_SERVICE_NAME] = meta.name
    labels[LABEL_MANAGED_BY] = MIRRORING_MANAGED_BY
    annotations = {k: v for k, v in meta.annotations.items()
                   if k not in (ANNOTATION_LAST_APPLIED, ANNOTATION_LAST_CHANGE_TRIGGER)}
    slices = []
    for addresses, ports in subsets:
        by_family: dict[int, list[SliceEndpoint]] = {}
        for ip_s, ready, ra, AP in addresses:
            ip = parse_ip(ip_s)
            assert ip is not None  # validated above
            eps = by_family.setdefault(ip.version, [])
            if len(eps) >= MAX_MIRRORED_ENDPOINTS:
                continue  # upstream mirrors at most 1000 endpoints per subset
            eps.append(SliceEndpoint(
                addresses=(str(ip),),
                conditions=EndpointConditions(ready=ready, serving=ready),
                hostname=ctx.string(ra, "hostname", (*AP, "hostname")) or None,
                node_name=ctx.optional_string(ra, "nodeName", (*AP, "nodeName")),
                target_ref=_target_ref(ctx, ra, (*AP, "targetRef")),
            ))
        for version in sorted(by_family):
            slices.append(EndpointSlice(
                meta=ObjectMeta(
                    name=f"{meta.name}-{len(slices)}",
                    namespace=meta.namespace,
                    labels=dict(labels),
                    annotations=dict(annotations),
                    deletion_timestamp=meta.deletion_timestamp,
                    origin=meta.origin,
                ),
                service_name=meta.name,
                address_type=f"IPv{version}",
                endpoints=tuple(by_family[version]),
                ports=tuple(ports),
            ))
    return slices


# -- Pod ---------------------------------------------------------------------


def _parse_pod(ctx: _Ctx, d: dict) -> Pod:
    meta = _meta(ctx, d, "Pod")
    spec = ctx.mapping(d, "spec", ("spec",))
    S = ("spec",)
    hostname = ctx.string(spec, "hostname", (*S, "hostname"))
    if hostname:
        ctx.names((*S, "hostname"), hostname, dns1123_label_errors)
    subdomain = ctx.string(spec, "subdomain", (*S, "subdomain"))
    if subdomain:
        ctx.names((*S, "subdomain"), subdomain, dns1123_label_errors)
    node_name = ctx.string(spec, "nodeName", (*S, "nodeName"))
    if node_name:
        ctx.names((*S, "nodeName"), node_name, dns1123_subdomain_errors)
    host_network = bool(ctx.boolean(spec, "hostNetwork", (*S, "hostNetwork"), False))
    grace = ctx.integer(spec, "terminationGracePeriodSeconds", (*S, "terminationGracePeriodSeconds"), 30)
    if grace < 0:
        ctx.invalid((*S, "terminationGracePeriodSeconds"), grace, "must be greater than or equal to 0")

    containers: list[dict] = []
    ports: list[ContainerPort] = []
    port_names: set[str] = set()
    for i, rc in enumerate(ctx.items(spec, "containers", (*S, "containers"))):
        C = (*S, "containers", i)
        rc = ctx.item_mapping(rc, C)
        if rc is None:
            continue
        containers.append(rc)
        for j, rp in enumerate(ctx.items(rc, "ports", (*C, "ports"))):
            P = (*C, "ports", j)
            rp = ctx.item_mapping(rp, P)
            if rp is None:
                continue
            cport = ctx.integer(rp, "containerPort", (*P, "containerPort"))
            if "containerPort" not in rp:
                ctx.required((*P, "containerPort"))
            else:
                ctx.port_number((*P, "containerPort"), cport)
            name = ctx.string(rp, "name", (*P, "name"))
            if name:
                ctx.names((*P, "name"), name, port_name_errors)
                if name in port_names:
                    ctx.duplicate((*P, "name"), name)
                port_names.add(name)
            proto = ctx.protocol(rp, (*P, "protocol"))
            ports.append(ContainerPort(port=cport, protocol=proto, name=name))

    status = ctx.mapping(d, "status", ("status",))
    pod_ips = []
    for i, rip in enumerate(ctx.items(status, "podIPs", ("status", "podIPs"))):
        P = ("status", "podIPs", i)
        rip = ctx.item_mapping(rip, P)
        if rip is None:
            continue
        v = ctx.string(rip, "ip", (*P, "ip"))
        if ctx.ip((*P, "ip"), v, special_ok=host_network) is not None:
            pod_ips.append(v)
    pod_ip = ctx.string(status, "podIP", ("status", "podIP"))
    if pod_ip:
        if ctx.ip(("status", "podIP"), pod_ip, special_ok=host_network) is not None:
            if not pod_ips:
                pod_ips = [pod_ip]
            elif pod_ips[0] != pod_ip:
                ctx.invalid(("status", "podIP"), pod_ip, "must be the same as `podIPs[0].ip`")
    host_ip = ctx.string(status, "hostIP", ("status", "hostIP"))
    if host_ip:
        ctx.ip(("status", "hostIP"), host_ip, special_ok=True)

    # A manifest without status describes a pod the lab will run: the model's
    # defaults (Running, ready) apply.  With a status, Ready comes from the
    # Ready condition, as the endpoints controller reads it (podutil.IsPodReady).
    phase = ctx.string(status, "phase", ("status", "phase")) or "Running"
    ready = True
    if "status" in d:
        ready = phase == "Running"
        for i, rc in enumerate(ctx.items(status, "conditions", ("status", "conditions"))):
            rc = ctx.item_mapping(rc, ("status", "conditions", i))
            if rc is not None and rc.get("type") == "Ready":
                ready = rc.get("status") == "True"
    return Pod(
        meta=meta,
        node_name=node_name,
        hostname=hostname,
        subdomain=subdomain,
        host_network=host_network,
        pod_ips=tuple(pod_ips),
        host_ip=host_ip,
        phase=phase,
        ready=ready,
        ports=tuple(ports),
        termination_grace_period=grace,
        containers=tuple(containers),
    )


# -- Node --------------------------------------------------------------------

_NODE_ADDRESS_TYPES = ("ExternalDNS", "ExternalIP", "Hostname", "InternalDNS", "InternalIP")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _parse_node(ctx: _Ctx, d: dict) -> Node:
    meta = _meta(ctx, d, "Node")
    spec = ctx.mapping(d, "spec", ("spec",))
    cidrs = ctx.string_list(spec, "podCIDRs", ("spec", "podCIDRs"))
    cidr = ctx.string(spec, "podCIDR", ("spec", "podCIDR"))
    if cidr and not cidrs:
        cidrs = [cidr]
    elif cidr and cidrs and cidrs[0] != cidr:
        ctx.invalid(("spec", "podCIDRs", 0), cidrs[0], "must match `podCIDR`")
    for i, c in enumerate(cidrs):
        if parse_cidr(c) is None:
            ctx.invalid(("spec", "podCIDRs", i), c, "must be a valid CIDR (e.g. 10.244.1.0/24)")
    status = ctx.mapping(d, "status", ("status",))
    addresses = []
    for i, ra in enumerate(ctx.items(status, "addresses", ("status", "addresses"))):
        P = ("status", "addresses", i)
        ra = ctx.item_mapping(ra, P)
        if ra is None:
            continue
        typ = ctx.string(ra, "type", (*P, "type"))
        addr = ctx.string(ra, "address", (*P, "address"))
        if typ not in _NODE_ADDRESS_TYPES:
            ctx.not_supported((*P, "type"), typ, _NODE_ADDRESS_TYPES)
        if not addr:
            ctx.required((*P, "address"))
        elif typ in ("InternalIP", "ExternalIP"):
            ctx.ip((*P, "address"), addr, special_ok=True)
        addresses.append(NodeAddress(type=typ, address=addr))
    taints = []
    for i, rt in enumerate(ctx.items(spec, "taints", ("spec", "taints"))):
        P = ("spec", "taints", i)
        rt = ctx.item_mapping(rt, P)
        if rt is None:
            continue
        key = ctx.string(rt, "key", (*P, "key"))
        value = ctx.string(rt, "value", (*P, "value"))
        effect = ctx.string(rt, "effect", (*P, "effect"))
        if not key:
            ctx.required((*P, "key"))
        else:
            ctx.names((*P, "key"), key, qualified_name_errors)
        if value:
            ctx.names((*P, "value"), value, label_value_errors)
        if effect not in _TAINT_EFFECTS:
            ctx.not_supported((*P, "effect"), effect, _TAINT_EFFECTS)
        taints.append(Taint(key=key, value=value, effect=effect))
    return Node(meta=meta, addresses=tuple(addresses), pod_cidrs=tuple(cidrs), taints=tuple(taints))


_PARSERS = {
    "Service": _parse_service,
    "EndpointSlice": _parse_endpoint_slice,
    "Endpoints": _parse_endpoints,
    "Pod": _parse_pod,
    "Node": _parse_node,
}


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _identity(d: dict, kind: str) -> tuple[str, str]:
    md = d.get("metadata")
    if not isinstance(md, dict):
        return ("" if kind in _CLUSTER_SCOPED else "default", "")
    name = md.get("name")
    ns = md.get("namespace") or "default"
    return ("" if kind in _CLUSTER_SCOPED else str(ns), name if isinstance(name, str) else "")


def _parse_known(d: dict, origin: Origin, node: yaml.Node | None) -> list[KubeObject]:
    """Parse one object of a known kind; raises ObjectError."""
    kind = d["kind"]
    ns, name = _identity(d, kind)
    ctx = _Ctx(origin, node)
    api_version = d.get("apiVersion")
    supported = _KINDS[kind][1]
    if api_version not in supported:
        ctx.not_supported(("apiVersion",), api_version, supported)
        raise ObjectError(origin, ctx.errors, kind=kind, namespace=ns, name=name)
    try:
        result = _PARSERS[kind](ctx, d)
    except _Invalid:
        result = None
    if ctx.errors:
        raise ObjectError(origin, ctx.errors, kind=kind, namespace=ns, name=name)
    return result if isinstance(result, list) else [result]


def _kind_of(d: dict) -> str | None:
    """The kubelab kind of a manifest object, or None if it is not ours to read."""
    kind, api_version = d.get("kind"), d.get("apiVersion")
    if not isinstance(kind, str) or kind not in _KINDS:
        return None
    group = _KINDS[kind][0]
    if isinstance(api_version, str) and _group_of(api_version) != group:
        return None  # same kind name, another API group (a Knative Service, say)
    return kind


def parse_object(d: dict, origin: Origin | None = None) -> KubeObject:
    """Parse and validate one manifest object (a dict as YAML/JSON loads it).

    Returns the model object; raises :class:`ObjectError` when it is invalid
    or not a kind kubelab reads.  core/v1 ``Endpoints`` with one subset and
    family come back as their one ``EndpointSlice``; use
    :func:`parse_objects` for the general case (it returns a list).
    """
    objs = parse_objects(d, origin)
    if len(objs) != 1:
        ns, name = _identity(d, str(d.get("kind", "")))
        raise ObjectError(origin or Origin(), f"{d.get('kind')} {ns}/{name} maps to {len(objs)} objects; use parse_objects()",
                          kind=str(d.get("kind", "")), namespace=ns, name=name)
    return objs[0]


def parse_objects(d: dict, origin: Origin | None = None, node: yaml.Node | None = None) -> list[KubeObject]:
    """Parse one manifest object into model objects (Endpoints may give 0..n slices)."""
    origin = origin or Origin()
    if not isinstance(d, dict):
        raise ObjectError(origin, f"expected a Kubernetes object (a mapping with apiVersion and kind), got {type(d).__name__}")
    kind = _kind_of(d)
    if kind is None:
        raise ObjectError(origin, f"{d.get('apiVersion')}/{d.get('kind')} is not a kind kubelab reads "
                                  f"(it reads {', '.join(sorted(_KINDS))})")
    return _parse_known(d, origin, node)


def _iter_list_items(d: dict, node: yaml.Node | None) -> Iterator[tuple[object, yaml.Node | None]]:
    items = d.get("items") or []
    item_nodes: list = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "items" and isinstance(v, yaml.SequenceNode):
                item_nodes = v.value
    for i, item in enumerate(items if isinstance(items, list) else []):
        yield item, (item_nodes[i] if i < len(item_nodes) else None)


def _collect(d: object, origin: Origin, node: yaml.Node | None, result: LoadResult) -> None:
    """Add the objects of one document (or List item) to ``result``."""
    if d is None:
        return  # an empty document ("---" at the end of a file)
    if not isinstance(d, dict):
        result.errors.append(ObjectError(origin, "document is not a Kubernetes object (a mapping with apiVersion and kind)"))
        return
    kind = d.get("kind")
    if kind is None and "apiVersion" not in d:
        return  # not a Kubernetes object at all (a lab spec, say): not ours
    if not isinstance(kind, str) or not kind:
        result.errors.append(ObjectError(origin, "kind: Required value: every Kubernetes object needs a kind"))
        return
    if kind.endswith("List") and isinstance(d.get("items"), list):
        # "List" (kubectl get -o yaml) has typed items; "ServiceList" & co. (the
        # REST API) may omit apiVersion/kind on items: they inherit the element kind.
        elem_kind = kind[: -len("List")]
        api_version = d.get("apiVersion")
        for item, item_node in _iter_list_items(d, node):
            item_origin = Origin(origin.source, item_node.start_mark.line + 1) if item_node is not None else origin
            if isinstance(item, dict) and elem_kind and "kind" not in item:
                item = {"kind": elem_kind, "apiVersion": api_version, **item}
            _collect(item, item_origin, item_node, result)
        return
    if _kind_of(d) is None:
        return  # a kind we do not read (Deployment, ConfigMap, a Knative Service ...)
    try:
        result.objects.extend(_parse_known(d, origin, node))
    except ObjectError as e:
        result.errors.append(e)


def _yaml_documents(text: str) -> Iterator[tuple[object, yaml.Node | None]]:
    """(data, node) per YAML document; node marks give line numbers."""
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node) if node is not None else None
            yield data, node
    finally:
        loader.dispose()


def _json_documents(text: str) -> list[object]:
    """Concatenated JSON values (for JSON YAML cannot read, e.g. tab-indented)."""
    dec = json.JSONDecoder()
    out, i, n = [], 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return out
        value, i = dec.raw_decode(text, i)
        out.append(value)


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """"at column 1: while parsing a flow mapping (from line 3): did not find expected ',' or '}'"."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    cmark = getattr(e, "context_mark", None)
    text = f"at column {mark.column + 1}: " if mark is not None else ""
    if context:
        text += context
        if cmark is not None and (mark is None or cmark.line != mark.line):
            text += f" (from line {cmark.line + 1})"
        text += ": "
    return text + problem


_KEEP_NOTE = "a watching source keeps this file's objects as they were until it parses again"


def parse_documents(text: str, source: str = "<string>") -> LoadResult:
    """Parse a YAML or JSON stream (many documents, Lists) into a LoadResult.

    Broken YAML/JSON gives one file-level error and no objects.  The same
    (kind, namespace, name) twice in one stream: the first wins, the second
    is an error.
    """
    result = LoadResult()
    try:
        docs = list(_yaml_documents(text))
    except yaml.YAMLError as e:
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            try:
                docs = [(d, None) for d in _json_documents(text)]
            except ValueError as je:
                result.errors.append(ObjectError(Origin(source, je.lineno), f"cannot parse JSON at column {je.colno}: "
                                                 f"{je.msg}; {_KEEP_NOTE}", file_level=True))
                return result
        else:
            mark = getattr(e, "problem_mark", None)
            result.errors.append(ObjectError(
                Origin(source, mark.line + 1 if mark is not None else None),
                f"cannot parse YAML {_yaml_error_text(e)}; {_KEEP_NOTE}",
                file_level=True))
            return result
    for data, node in docs:
        line = node.start_mark.line + 1 if node is not None else (1 if len(docs) == 1 else None)
        _collect(data, Origin(source, line), node, result)
    return merge_results([result])


def merge_results(results: Iterable[LoadResult]) -> LoadResult:
    """Concatenate results in order, keeping only the first definition of each object.

    A later object with the same (kind, namespace, name) as an earlier one is
    dropped and reported, naming where the first definition is.
    """
    out = LoadResult()
    first: dict[tuple[str, str, str], KubeObject] = {}
    for r in results:
        out.errors.extend(r.errors)
        for obj in r.objects:
            key = (type(obj).__name__, "" if isinstance(obj, Node) else obj.meta.namespace, obj.meta.name)
            prev = first.get(key)
            if prev is None:
                first[key] = obj
                out.objects.append(obj)
                continue
            skind, sns, sname = source_key(obj)
            pkind, _, pname = source_key(prev)
            also = "" if (pkind, pname) == (skind, sname) else f" (as {pkind} {pname})"
            out.errors.append(ObjectError(
                obj.meta.origin,
                [FieldError("metadata.name",
                            f"Duplicate value: {json.dumps(obj.meta.name)}: {key[0]} {key[1] or ''}{'/' if key[1] else ''}"
                            f"{key[2]} is already defined at {prev.meta.origin}{also}; the first definition "
                            "(in sorted file order) is used, remove one of them")],
                kind=skind, namespace=sns, name=sname))
    return out


def is_manifest_file(name: str) -> bool:
    """A manifest file name: *.yaml/*.yml/*.json, not hidden, not an editor temp file."""
    base = os.path.basename(name)
    if base.startswith((".", "#", "~")) or base.endswith("~"):
        return False
    return base.lower().endswith(MANIFEST_SUFFIXES)


def find_manifest_files(path: str | os.PathLike) -> list[Path]:
    """The manifest files under ``path`` (itself if it is a file), recursively, sorted.

    Hidden directories are skipped (this also skips the ``..data`` symlink
    farm of a ConfigMap volume; the visible symlinks into it are read).
    Sorted by path components, so ``a/x.yaml`` comes before ``a.yaml``'s
    sibling ``b.yaml`` exactly as ``sorted()`` of ``Path`` objects would.
    """
    return [Path(f) for f in manifest_paths(path)]


def manifest_paths(path: str | os.PathLike) -> list[str]:
    """:func:`find_manifest_files` as plain strings (cheap enough to call every poll)."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        return [root]
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(top, f) for f in files if is_manifest_file(f))
    found.sort(key=lambda f: f.split(os.sep))
    return found


def load_file(path: str | os.PathLike) -> LoadResult:
    """Read and parse one manifest file; an unreadable file is one file-level error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return LoadResult(errors=[ObjectError(Origin(str(path)), f"cannot read the file: {reason}", file_level=True)])
    return parse_documents(text, str(path))


def load_path(path: str | os.PathLike) -> LoadResult:
    """Load a manifest file, or every manifest file under a folder (sorted).

    A missing path is one file-level error.  The same object in two files:
    the first file in sorted order wins, the other is reported.
    """
    p = Path(path)
    if not p.exists():
        return LoadResult(errors=[ObjectError(Origin(str(p)), "no such file or directory; pass a manifest file or a "
                                              "folder of *.yaml/*.yml/*.json manifests", file_level=True)])
    return merge_results(load_file(f) for f in find_manifest_files(p))
