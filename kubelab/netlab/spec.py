"""A lab spec: the lab's settings plus the Kubernetes manifests it runs.

A lab file is YAML, several documents.  One document has a top-level
``lab:`` mapping (the settings); every other document is a Kubernetes
manifest (Service, Pod, a Deployment as a replica shorthand, ``kind: List``)::

    lab:
      name: basic
      proxyMode: iptables        # iptables | ipvs | userspace | none
      kernel: host               # host | uml | auto (uml for ipvs when the host has no IPVS)
      nodes: [node1, node2]      # or a count (node1..nodeN), or [{name, zone, labels}]
      podCIDR: 10.244.0.0/16     # split per node, nodeCIDRMaskSize bits each (default 24)
      serviceCIDR: 10.96.0.0/12
      underlayCIDR: 172.18.0.0/24
      clusterDomain: cluster.local
      dns: {enabled: true, clusterIP: 10.96.0.10}
      nodePortRange: 30000-32767
      manifests: [more.yaml]     # more files, relative to this one

:class:`LabSpec` is the parsed, *validated* form: building one checks the
settings and loads every manifest into a :class:`~kubelab.netlab.cluster.Cluster`
(IP allocation, placement, duplicates), so a bad file is rejected with
every problem listed -- file, line, object, field -- before anything is
created.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubelab.model import LABEL_HOSTNAME, LABEL_TOPOLOGY_ZONE, Origin

PROXY_MODES = ("iptables", "ipvs", "userspace", "none")
KERNELS = ("host", "uml", "auto")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
# Lab names end up in namespace names, unix socket paths and log lines; keep them short.
MAX_LAB_NAME = 24

SETTING_KEYS = {
    "name",
    "proxyMode",
    "kernel",
    "nodes",
    "podCIDR",
    "nodeCIDRMaskSize",
    "serviceCIDR",
    "underlayCIDR",
    "clusterDomain",
    "dns",
    "nodePortRange",
    "manifests",
    "proxyArgs",
}


class LabSpecError(ValueError):
    """A lab file (or an applied manifest) is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class NodeSpec:
    """One lab node: a network namespace with a pod bridge and an underlay uplink."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def zone(self) -> str:
        return self.labels.get(LABEL_TOPOLOGY_ZONE, "")


@dataclass(frozen=True)
class DNSSettings:
    enabled: bool = False
    cluster_ip: str = ""  # default: the 10th address of the service CIDR, like kubeadm


@dataclass(frozen=True)
class LabSettings:
    """The ``lab:`` document, validated."""

    name: str
    proxy_mode: str = "none"
    kernel: str = "auto"
    nodes: tuple[NodeSpec, ...] = (NodeSpec("node1"),)
    pod_cidr: str = "10.244.0.0/16"
    node_cidr_mask_size: int = 24
    service_cidr: str = "10.96.0.0/12"
    underlay_cidr: str = "172.18.0.0/24"
    cluster_domain: str = "cluster.local"
    dns: DNSSettings = DNSSettings()
    node_port_range: tuple[int, int] = (30000, 32767)
    proxy_args: tuple[str, ...] = ()  # extra `kubelab proxy` flags for every node

    def node_pod_cidr(self, index: int) -> ipaddress.IPv4Network:
        """The pod CIDR of the index-th node (kube-controller-manager's --allocate-node-cidrs)."""
        return _nth_subnet(ipaddress.ip_network(self.pod_cidr), self.node_cidr_mask_size, index)

    def node_ip(self, index: int) -> str:
        """Underlay address of the index-th node: .10, .11, ..."""
        return str(ipaddress.ip_network(self.underlay_cidr)[10 + index])

    @property
    def gateway_ip(self) -> str:
        """The underlay router (the underlay namespace's bridge address)."""
        return str(ipaddress.ip_network(self.underlay_cidr)[1])

    @property
    def client_ip(self) -> str:
        """The external client's underlay address."""
        net = ipaddress.ip_network(self.underlay_cidr)
        return str(net[net.num_addresses - 2])

    @property
    def dns_cluster_ip(self) -> str:
        if self.dns.cluster_ip:
            return self.dns.cluster_ip
        return str(ipaddress.ip_network(self.service_cidr)[10])

    def node_index(self, name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.name == name:
                return i
        raise KeyError(name)


def _nth_subnet(net: ipaddress.IPv4Network, prefix: int, index: int) -> ipaddress.IPv4Network:
    size = 1 << (32 - prefix)
    return ipaddress.ip_network(f"{ipaddress.ip_address(int(net.network_address) + index * size)}/{prefix}")


@dataclass(frozen=True)
class Document:
    """One manifest document as written, with where it came from."""

    data: Any
    origin: Origin


@dataclass(frozen=True)
class LabSpec:
    """A validated lab: settings and the manifests to load (see module docstring)."""

    settings: LabSettings
    documents: tuple[Document, ...] = ()
    source: str = ""  # the lab file, for messages

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    def from_file(cls, path: str | Path, *, name: str | None = None, **overrides: Any) -> LabSpec:
        """Read and validate a lab file (and the manifests it lists).

        ``name`` renames the lab (tests run the same file under unique names);
        ``overrides`` replace ``lab:`` settings by their YAML key, e.g.
        ``proxyMode="iptables"``.  Raises :class:`LabSpecError` listing every problem.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise LabSpecError([f"{path}: cannot read lab file: {exc.strerror}"]) from None
        docs = read_documents(text, str(path))
        settings_docs = [d for d in docs if isinstance(d.data, dict) and "lab" in d.data and "kind" not in d.data]
        if len(settings_docs) > 1:
            raise LabSpecError([f"{d.origin}: second `lab:` document; a lab file has one" for d in settings_docs[1:]])
        raw = dict(settings_docs[0].data["lab"] or {}) if settings_docs else {}
        if not isinstance(raw, dict):
            raise LabSpecError([f"{settings_docs[0].origin}: `lab:` must be a mapping of settings"])
        manifests = [d for d in docs if not (isinstance(d.data, dict) and "lab" in d.data and "kind" not in d.data)]
        for extra in raw.get("manifests") or []:
            extra_path = (path.parent / str(extra)) if not Path(str(extra)).is_absolute() else Path(str(extra))
            manifests.extend(read_manifest_path(extra_path))
        raw.setdefault("name", path.stem)
        return cls.from_dict(raw, manifests, source=str(path), name=name, **overrides)

    @classmethod
    def from_dict(
        cls,
        settings: dict[str, Any],
        manifests: list[Any] | tuple[Any, ...] = (),
        *,
        source: str = "<lab>",
        name: str | None = None,
        **overrides: Any,
    ) -> LabSpec:
        """Build a lab from a ``lab:`` settings mapping and manifests (dicts or :class:`Document`)."""
        raw = dict(settings)
        raw.update(overrides)
        if name is not None:
            raw["name"] = name
        lab_settings = parse_settings(raw, source)
        documents = tuple(
            d if isinstance(d, Document) else Document(d, Origin(source, None)) for d in manifests
        )
        spec = cls(lab_settings, documents, source)
        # Validate everything now: allocation, placement, duplicates, malformed objects.
        spec.build_cluster()
        return spec

    def build_cluster(self):
        """A fresh :class:`~kubelab.netlab.cluster.Cluster` with every manifest applied."""
        from kubelab.netlab.cluster import Cluster

        cluster = Cluster(self.settings)
        cluster.apply_documents(list(self.documents))
        return cluster


# --------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------


def read_documents(text: str, source: str) -> list[Document]:
    """Split multi-document YAML, keeping each document's first line; ``kind: List`` is flattened."""
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    out: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            line = node.start_mark.line + 1
            data = loader.construct_document(node)
            if data is None:
                continue
            origin = Origin(source, line)
            if isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list):
                out.extend(Document(item, origin) for item in data["items"])
            else:
                out.append(Document(data, origin))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise LabSpecError([f"{where}: malformed YAML: {problem}"]) from None
    finally:
        loader.dispose()
    return out


def read_manifest_path(path: Path) -> list[Document]:
    """Documents of a manifest file, or of every *.yaml/*.yml/*.json file of a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    else:
        files = [path]
    docs: list[Document] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError as exc:
            raise LabSpecError([f"{f}: cannot read manifest: {exc.strerror}"]) from None
        docs.extend(read_documents(text, str(f)))
    return docs


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def parse_settings(raw: dict[str, Any], source: str) -> LabSettings:
    """Validate the ``lab:`` mapping; raises :class:`LabSpecError` listing every problem."""
    problems: list[str] = []
    where = f"{source}: lab"

    def bad(key: str, msg: str) -> None:
        problems.append(f"{where}.{key}: {msg}")

    unknown = sorted(set(raw) - SETTING_KEYS)
    for key in unknown:
        bad(key, f"unknown setting; known settings are {', '.join(sorted(SETTING_KEYS))}")

    name = str(raw.get("name", ""))
    if not name or not NAME_RE.match(name) or len(name) > MAX_LAB_NAME:
        bad("name", f"{name!r} is not a valid lab name: lowercase letters, digits and '-', at most {MAX_LAB_NAME} characters")

    mode = str(raw.get("proxyMode", "none"))
    if mode not in PROXY_MODES:
        bad("proxyMode", f"{mode!r} is not one of {', '.join(PROXY_MODES)}")
    kernel = str(raw.get("kernel", "auto"))
    if kernel not in KERNELS:
        bad("kernel", f"{kernel!r} is not one of {', '.join(KERNELS)}")

    nodes = _parse_nodes(raw.get("nodes", 1), bad)

    nets: dict[str, ipaddress.IPv4Network] = {}
    defaults = {"podCIDR": "10.244.0.0/16", "serviceCIDR": "10.96.0.0/12", "underlayCIDR": "172.18.0.0/24"}
    for key, default in defaults.items():
        value = str(raw.get(key, default))
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            bad(key, f"{value!r} is not a CIDR ({exc})")
            continue
        if net.version != 4:
            bad(key, f"{value}: only IPv4 labs are supported")
            continue
        nets[key] = net
    keys = list(nets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if nets[a].overlaps(nets[b]):
                bad(b, f"{nets[b]} overlaps {a} {nets[a]}; pick disjoint ranges")

    mask = raw.get("nodeCIDRMaskSize", 24)
    if not isinstance(mask, int) or isinstance(mask, bool) or not 8 <= mask <= 30:
        bad("nodeCIDRMaskSize", f"{mask!r} must be an integer from 8 to 30")
        mask = 24
    if "podCIDR" in nets and nodes:
        pod = nets["podCIDR"]
        if mask < pod.prefixlen:
            bad("nodeCIDRMaskSize", f"/{mask} is larger than podCIDR {pod}")
        elif (1 << (mask - pod.prefixlen)) < len(nodes):
            bad("podCIDR", f"{pod} split into /{mask} gives {1 << (mask - pod.prefixlen)} node ranges, fewer than {len(nodes)} nodes")
    if "underlayCIDR" in nets and nets["underlayCIDR"].num_addresses < 16 + len(nodes):
        bad("underlayCIDR", f"{nets['underlayCIDR']} is too small for {len(nodes)} nodes (node IPs start at .10)")

    domain = str(raw.get("clusterDomain", "cluster.local")).strip(".")
    if not domain or not all(NAME_RE.match(p) for p in domain.split(".")):
        bad("clusterDomain", f"{domain!r} is not a DNS domain")

    dns_raw = raw.get("dns", {}) or {}
    if isinstance(dns_raw, bool):
        dns_raw = {"enabled": dns_raw}
    dns = DNSSettings()
    if not isinstance(dns_raw, dict):
        bad("dns", "must be a mapping {enabled, clusterIP} or true/false")
    else:
        for key in sorted(set(dns_raw) - {"enabled", "clusterIP"}):
            bad(f"dns.{key}", "unknown setting; known: enabled, clusterIP")
        cip = str(dns_raw.get("clusterIP", "") or "")
        if cip:
            try:
                addr = ipaddress.ip_address(cip)
                if "serviceCIDR" in nets and addr not in nets["serviceCIDR"]:
                    bad("dns.clusterIP", f"{cip} is outside serviceCIDR {nets['serviceCIDR']}")
            except ValueError:
                bad("dns.clusterIP", f"{cip!r} is not an IP address")
        dns = DNSSettings(bool(dns_raw.get("enabled", False)), cip)

    npr = str(raw.get("nodePortRange", "30000-32767"))
    port_range = (30000, 32767)
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", npr)
    if not m or not (0 < int(m.group(1)) <= int(m.group(2)) <= 65535):
        bad("nodePortRange", f"{npr!r} must be 'FIRST-LAST' within 1-65535, e.g. 30000-32767")
    else:
        port_range = (int(m.group(1)), int(m.group(2)))

    proxy_args = raw.get("proxyArgs", []) or []
    if not isinstance(proxy_args, list) or not all(isinstance(a, str) for a in proxy_args):
        bad("proxyArgs", "must be a list of strings (extra `kubelab proxy` flags)")
        proxy_args = []

    if problems:
        raise LabSpecError(problems)
    return LabSettings(
        name=name,
        proxy_mode=mode,
        kernel=kernel,
        nodes=tuple(nodes),
        pod_cidr=str(nets["podCIDR"]),
        node_cidr_mask_size=mask,
        service_cidr=str(nets["serviceCIDR"]),
        underlay_cidr=str(nets["underlayCIDR"]),
        cluster_domain=domain,
        dns=dns,
        node_port_range=port_range,
        proxy_args=tuple(proxy_args),
    )


def _parse_nodes(raw: Any, bad) -> list[NodeSpec]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not 1 <= raw <= 64:
            bad("nodes", f"{raw} nodes: a lab has 1 to 64 nodes")
            return []
        raw = [f"node{i + 1}" for i in range(raw)]
    if not isinstance(raw, list) or not raw:
        bad("nodes", "must be a node count or a non-empty list of names or {name, zone, labels} mappings")
        return []
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            bad(f"nodes[{i}]", "must be a name or a {name, zone, labels} mapping")
            continue
        name = str(item.get("name", ""))
        if not NAME_RE.match(name) or len(name) > 32:
            bad(f"nodes[{i}].name", f"{name!r} is not a valid node name (lowercase DNS label, at most 32 characters)")
            continue
        if name in seen:
            bad(f"nodes[{i}].name", f"duplicate node name {name!r}")
            continue
        seen.add(name)
        labels = item.get("labels", {}) or {}
        if not isinstance(labels, dict):
            bad(f"nodes[{i}].labels", "must be a mapping")
            labels = {}
        labels = {str(k): str(v) for k, v in labels.items()}
        labels.setdefault(LABEL_HOSTNAME, name)
        if item.get("zone"):
            labels[LABEL_TOPOLOGY_ZONE] = str(item["zone"])
        for key in sorted(set(item) - {"name", "zone", "labels"}):
            bad(f"nodes[{i}].{key}", "unknown node setting; known: name, zone, labels")
        nodes.append(NodeSpec(name, labels))
    return nodes
