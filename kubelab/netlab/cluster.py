"""The lab's object store: what an API server, scheduler and IPAM would do.

:class:`Cluster` holds the lab's Services, Pods and hand-written
EndpointSlices as manifests (plain dicts, exactly what gets written for the
proxies and DNS to read) together with their parsed model objects.  Applying
manifests is atomic: every document is checked -- malformed objects,
duplicates, unknown nodes, addresses outside their ranges or already taken --
and either all of them are taken or none, with every problem listed.

It also does the allocation a cluster does on create:

* Pods: a node when ``spec.nodeName`` is empty (fewest pods first, then node
  order), a pod IP from the node's pod CIDR (hostNetwork pods get the node
  IP), ``status`` (phase Running, podIP, hostIP, the Ready condition);
* Services: a cluster IP from the service CIDR when omitted, node ports from
  the node-port range for NodePort / LoadBalancer ports without one;
* Deployments (``apps/v1``) are a replica shorthand: ``replicas`` pods named
  ``<name>-1 .. <name>-N`` from the template.

Lab-only annotations on a pod (or a Deployment's pod template):
``kubelab.dev/ready: "false"`` makes a pod not Ready.  The workload a pod
runs is described in :mod:`kubelab.netlab.workloads`.

No I/O: the lab daemon owns a Cluster and turns its changes into namespaces,
workloads and manifest files.
"""

from __future__ import annotations

import copy
import ipaddress
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubelab.model import LABEL_HOSTNAME, Node, NodeAddress, ObjectMeta, Origin, Pod, Service
from kubelab.netlab.endpoints import endpoint_slices, slice_to_manifest
from kubelab.netlab.spec import NAME_RE, Document, LabSettings, LabSpecError

ANNOTATION_READY = "kubelab.dev/ready"
DNS_NAMESPACE = "kube-system"
DNS_SERVICE = "kube-dns"
DNS_POD = "kubelab-dns-1"
DNS_LABELS = {"k8s-app": "kube-dns"}
SUPPORTED_KINDS = ("Service", "Pod", "Deployment", "EndpointSlice", "Endpoints", "Namespace")

Key = tuple[str, str]  # (namespace, name)


@dataclass
class ApplyResult:
    """What one apply changed."""

    added_pods: list[Key] = field(default_factory=list)
    updated_pods: list[Key] = field(default_factory=list)
    services: list[Key] = field(default_factory=list)
    slices: list[Key] = field(default_factory=list)
    # Pods a Deployment scaled down: delete them (gracefully) next.
    scaled_down: list[Key] = field(default_factory=list)


@dataclass
class _Entry:
    raw: dict
    obj: Any


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(raw: dict, origin: Origin):
    """The model object of a manifest (a list of slices for core/v1 Endpoints), or the error text.

    Parsing and validation are the foundation's (``kubelab.proxy.objects``),
    so the lab accepts exactly what the proxies and DNS will read.
    """
    from kubelab.proxy.objects import ObjectError, parse_objects

    try:
        objs = parse_objects(raw, origin)
    except ObjectError as exc:
        return None, str(exc)
    if raw.get("kind") == "Endpoints":
        return objs, None
    return objs[0], None


class Cluster:
    """Services, Pods and EndpointSlices of one lab, with allocation (see module docstring)."""

    def __init__(self, settings: LabSettings):
        self.settings = settings
        self.services: dict[Key, _Entry] = {}
        self.pods: dict[Key, _Entry] = {}
        self.user_slices: dict[Key, _Entry] = {}
        self.deployments: dict[Key, int] = {}
        self.node_cidrs = {n.name: settings.node_pod_cidr(i) for i, n in enumerate(settings.nodes)}
        self.node_ips = {n.name: settings.node_ip(i) for i, n in enumerate(settings.nodes)}
        self.nodes: dict[str, Node] = {}
        for node in settings.nodes:
            meta = ObjectMeta(name=node.name, namespace="", labels=dict(node.labels))
            addrs = (NodeAddress("InternalIP", self.node_ips[node.name]), NodeAddress("Hostname", node.name))
            self.nodes[node.name] = Node(meta=meta, addresses=addrs, pod_cidrs=(str(self.node_cidrs[node.name]),))
        self._service_net = ipaddress.ip_network(settings.service_cidr)
        self._next_cluster_ip = 2  # .1 is the `kubernetes` Service's, by convention
        if settings.dns.enabled:
            self.apply_documents([Document(d, Origin("<lab dns>", None)) for d in self.dns_manifests()])

    # ------------------------------------------------------------------
    # views
    # ------------------------------------------------------------------

    def service_objects(self) -> list[Service]:
        return [e.obj for e in self.services.values()]

    def pod_objects(self) -> list[Pod]:
        return [e.obj for e in self.pods.values()]

    def pod(self, namespace: str, name: str) -> Pod:
        return self.pods[(namespace, name)].obj

    def find_pod(self, ref: str) -> Pod | None:
        """A pod by "name" (any namespace, default first) or "namespace/name"."""
        if "/" in ref:
            ns, _, name = ref.partition("/")
            entry = self.pods.get((ns, name))
            return entry.obj if entry else None
        entry = self.pods.get(("default", ref))
        if entry:
            return entry.obj
        for (ns, name), e in sorted(self.pods.items()):
            if name == ref:
                return e.obj
        return None

    def slices(self) -> list:
        """Controller-made slices (for Services with selectors) plus hand-written ones."""
        out = endpoint_slices(self.service_objects(), self.pod_objects(), self.nodes.values())
        out.extend(e.obj for e in self.user_slices.values())
        return out

    def manifests(self) -> dict[str, list[dict]]:
        """File name -> manifests, what the proxies' and DNS's ``--source`` folder holds."""
        uids = {(e.obj.namespace, e.obj.name): e.obj.meta.uid for e in self.services.values()}
        slices = [
            slice_to_manifest(s, uids.get((s.namespace, s.service_name), ""))
            for s in endpoint_slices(self.service_objects(), self.pod_objects(), self.nodes.values())
        ]
        slices.extend(e.raw for e in self.user_slices.values())
        return {
            "nodes": [self.node_manifest(n) for n in self.settings.nodes],
            "services": [e.raw for e in self.services.values()],
            "pods": [e.raw for e in self.pods.values()],
            "endpointslices": slices,
        }

    def node_manifest(self, node) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": dict(node.labels)},
            "spec": {"podCIDR": str(self.node_cidrs[node.name]), "podCIDRs": [str(self.node_cidrs[node.name])]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.node_ips[node.name]},
                    {"type": "Hostname", "address": node.name},
                ]
            },
        }

    def dns_manifests(self) -> list[dict]:
        """The kube-dns Service and the pod that runs ``kubelab dns`` behind it."""
        s = self.settings
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": DNS_SERVICE, "namespace": DNS_NAMESPACE, "labels": dict(DNS_LABELS)},
            "spec": {
                "selector": dict(DNS_LABELS),
                "clusterIP": s.dns_cluster_ip,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": DNS_POD, "namespace": DNS_NAMESPACE, "labels": dict(DNS_LABELS)},
            "spec": {
                "nodeName": s.nodes[0].name,
                "dnsPolicy": "Default",
                "containers": [
                    {
                        "name": "dns",
                        # $(VAR)s are expanded like Kubernetes does, from the pod's env.
                        "command": [
                            "$(KUBELAB_PYTHON)", "-m", "kubelab", "dns",
                            "--source", "$(KUBELAB_MANIFESTS)",
                            "--listen", "$(POD_IP):53",
                            "--cluster-domain", s.cluster_domain,
                        ],
                        "ports": [
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                        ],
                    }
                ],
            },
        }
        return [service, pod]

    def snapshot(self) -> dict:
        """A JSON-able summary for ``lab status`` and the host-side :class:`~kubelab.netlab.lab.Lab`."""
        pods = {}
        for (ns, name), e in self.pods.items():
            p: Pod = e.obj
            pods[f"{ns}/{name}"] = {
                "ip": p.pod_ip,
                "node": p.node_name,
                "hostNetwork": p.host_network,
                "ready": p.ready,
                "terminating": p.meta.deletion_timestamp is not None,
                "labels": dict(p.meta.labels),
            }
        services = {}
        for (ns, name), e in self.services.items():
            s: Service = e.obj
            services[f"{ns}/{name}"] = {
                "type": s.type,
                "clusterIP": s.cluster_ip,
                "externalIPs": list(s.external_ips),
                "ports": [
                    {"name": p.name, "port": p.port, "protocol": p.protocol, "nodePort": p.node_port}
                    for p in s.ports
                ],
            }
        nodes = {
            n.name: {"ip": self.node_ips[n.name], "podCIDR": str(self.node_cidrs[n.name]), "labels": dict(n.labels)}
            for n in self.settings.nodes
        }
        return {"nodes": nodes, "pods": pods, "services": services}

    # ------------------------------------------------------------------
    # apply / delete
    # ------------------------------------------------------------------

    def apply_documents(self, docs: list[Document]) -> ApplyResult:
        """Create or update every object in ``docs``, all or nothing (raises :class:`LabSpecError`)."""
        problems: list[str] = []
        # Work on copies so a failed apply leaves the last good state in force.
        services = dict(self.services)
        pods = dict(self.pods)
        user_slices = dict(self.user_slices)
        deployments = dict(self.deployments)
        next_cluster_ip = self._next_cluster_ip
        result = ApplyResult()
        seen: dict[tuple[str, str, str], str] = {}

        expanded: list[tuple[dict, Origin]] = []
        for doc in docs:
            raw, origin = doc.data, doc.origin
            if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
                problems.append(f"{origin}: not a Kubernetes object (a mapping with `kind`)")
                continue
            kind = raw["kind"]
            if kind not in SUPPORTED_KINDS:
                hint = " (lab nodes come from the `lab: nodes:` setting)" if kind == "Node" else ""
                problems.append(f"{origin}: kind {kind!r} is not supported in a lab{hint}; supported kinds: {', '.join(SUPPORTED_KINDS)}")
                continue
            if kind == "Namespace":
                continue
            raw = copy.deepcopy(raw)
            meta = raw.setdefault("metadata", {}) if isinstance(raw.get("metadata", {}), dict) else None
            if meta is None:
                problems.append(f"{origin}: {kind}: metadata must be a mapping")
                continue
            meta.setdefault("namespace", "default")
            name = str(meta.get("name", ""))
            key3 = (kind if kind != "Endpoints" else "EndpointSlice", str(meta["namespace"]), name)
            label = f"{kind} {meta['namespace']}/{name}"
            if name and key3 in seen:
                problems.append(f"{origin}: {label}: duplicate name (also defined at {seen[key3]})")
                continue
            seen[key3] = str(origin)
            if kind == "Deployment":
                pods_of, errs, desired = self._expand_deployment(raw, origin)
                problems.extend(errs)
                for pod_raw in pods_of:
                    pkey = ("Pod", pod_raw["metadata"]["namespace"], pod_raw["metadata"]["name"])
                    if pkey in seen:
                        problems.append(f"{origin}: {label}: replica pod {pkey[1]}/{pkey[2]} clashes with a Pod at {seen[pkey]}")
                        continue
                    seen[pkey] = str(origin)
                    expanded.append((pod_raw, origin))
                if not errs:
                    dkey = (str(meta["namespace"]), name)
                    old = deployments.get(dkey, 0)
                    for i in range(desired + 1, old + 1):
                        result.scaled_down.append((dkey[0], f"{name}-{i}"))
                    deployments[dkey] = desired
                continue
            expanded.append((raw, origin))

        # Pods per node, for placement, counting what this apply adds.
        load = {n.name: 0 for n in self.settings.nodes}
        used_ips: set[str] = set()
        for e in pods.values():
            if e.obj.node_name in load:
                load[e.obj.node_name] += 1
            if not e.obj.host_network:
                used_ips.add(e.obj.pod_ip)
        used_cluster_ips = {ip for e in services.values() for ip in e.obj.cluster_ips}
        used_node_ports = {
            p.node_port: (e.obj.namespace, e.obj.name) for e in services.values() for p in e.obj.ports if p.node_port
        }

        for raw, origin in expanded:
            kind = raw["kind"]
            ns, name = str(raw["metadata"]["namespace"]), str(raw["metadata"].get("name", ""))
            key = (ns, name)
            label = f"{kind} {ns}/{name}"
            if not NAME_RE.match(name) or len(name) > 63:
                problems.append(f"{origin}: {label}: metadata.name {name!r} must be a DNS label (lowercase letters, digits, '-', at most 63)")
                continue
            if not NAME_RE.match(ns):
                problems.append(f"{origin}: {label}: metadata.namespace {ns!r} must be a DNS label")
                continue
            if kind == "Pod":
                errs = self._admit_pod(raw, origin, pods.get(key), load, used_ips)
                if errs:
                    problems.extend(errs)
                    continue
                obj, err = _parse(raw, origin)
                if err:
                    problems.append(err)
                    continue
                (result.updated_pods if key in pods else result.added_pods).append(key)
                pods[key] = _Entry(raw, obj)
            elif kind == "Service":
                errs, next_cluster_ip = self._admit_service(
                    raw, origin, services.get(key), used_cluster_ips, used_node_ports, next_cluster_ip
                )
                if errs:
                    problems.extend(errs)
                    continue
                obj, err = _parse(raw, origin)
                if err:
                    problems.append(err)
                    continue
                services[key] = _Entry(raw, obj)
                result.services.append(key)
            else:  # EndpointSlice / Endpoints, for selectorless Services
                obj, err = _parse(raw, origin)
                if err:
                    problems.append(err)
                    continue
                objs = obj if isinstance(obj, (list, tuple)) else [obj]
                for o in objs:
                    user_slices[(o.namespace, o.name)] = _Entry(raw, o)
                    result.slices.append((o.namespace, o.name))

        if problems:
            raise LabSpecError(problems)
        self.services, self.pods, self.user_slices, self.deployments = services, pods, user_slices, deployments
        self._next_cluster_ip = next_cluster_ip
        return result

    def _expand_deployment(self, raw: dict, origin: Origin) -> tuple[list[dict], list[str], int]:
        meta = raw["metadata"]
        label = f"Deployment {meta['namespace']}/{meta.get('name', '')}"
        spec = raw.get("spec") or {}
        errs: list[str] = []
        replicas = spec.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 10000:
            return [], [f"{origin}: {label}: spec.replicas {replicas!r} must be an integer from 0 to 10000"], 0
        template = spec.get("template") or {}
        tmeta = template.get("metadata") or {}
        labels = tmeta.get("labels") or {}
        selector = (spec.get("selector") or {}).get("matchLabels")
        if selector is not None and any(labels.get(k) != v for k, v in selector.items()):
            errs.append(f"{origin}: {label}: spec.selector.matchLabels {selector} does not match spec.template.metadata.labels {labels}")
        if not isinstance(template.get("spec"), dict):
            errs.append(f"{origin}: {label}: spec.template.spec is required (the pod spec of every replica)")
        if errs:
            return [], errs, 0
        pods = []
        for i in range(1, replicas + 1):
            pod_meta = copy.deepcopy(tmeta)
            pod_meta["name"] = f"{meta['name']}-{i}"
            pod_meta["namespace"] = meta["namespace"]
            pod_meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"]}]
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": copy.deepcopy(template["spec"])})
        return pods, [], replicas

    def _admit_pod(self, raw: dict, origin: Origin, old: _Entry | None, load: dict, used_ips: set) -> list[str]:
        """Schedule, allocate and fill status; returns problems."""
        meta, ns, name = raw["metadata"], raw["metadata"]["namespace"], raw["metadata"]["name"]
        label = f"Pod {ns}/{name}"
        spec = raw.setdefault("spec", {})
        if not isinstance(spec, dict):
            return [f"{origin}: {label}: spec must be a mapping"]
        node = spec.get("nodeName") or ""
        host_network = bool(spec.get("hostNetwork", False))
        status = raw.get("status") if isinstance(raw.get("status"), dict) else {}
        if old is not None:
            old_pod: Pod = old.obj
            if old_pod.meta.deletion_timestamp is not None:
                return [f"{origin}: {label}: is terminating; wait until it is gone before creating it again"]
            if node and node != old_pod.node_name:
                return [f"{origin}: {label}: spec.nodeName is immutable ({old_pod.node_name!r} -> {node!r}); delete the pod and create it again"]
            if host_network != old_pod.host_network:
                return [f"{origin}: {label}: spec.hostNetwork is immutable; delete the pod and create it again"]
            node = old_pod.node_name
            ip = old_pod.pod_ip
            meta["uid"] = old_pod.meta.uid
        else:
            if node and node not in load:
                return [f"{origin}: {label}: spec.nodeName {node!r} is not a lab node; nodes are {', '.join(load)}"]
            if not node:
                node = min(load, key=lambda n: load[n])  # dict order breaks ties: node order
            ip = str(status.get("podIP") or "")
            if host_network:
                if ip and ip != self.node_ips[node]:
                    return [f"{origin}: {label}: status.podIP {ip} of a hostNetwork pod must be its node IP {self.node_ips[node]}"]
                ip = self.node_ips[node]
            elif ip:
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    return [f"{origin}: {label}: status.podIP {ip!r} is not an IP address"]
                cidr = self.node_cidrs[node]
                if addr not in cidr or addr in (cidr.network_address, cidr.network_address + 1, cidr.broadcast_address):
                    return [f"{origin}: {label}: status.podIP {ip} is not a usable address of node {node}'s pod CIDR {cidr}"]
                if ip in used_ips:
                    return [f"{origin}: {label}: status.podIP {ip} is already used by another pod"]
            else:
                ip = self._allocate_pod_ip(node, used_ips)
                if ip is None:
                    return [f"{origin}: {label}: node {node}'s pod CIDR {self.node_cidrs[node]} is full; use a larger nodeCIDRMaskSize"]
            if not host_network:
                used_ips.add(ip)
            load[node] += 1
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
        spec["nodeName"] = node
        annotations = meta.get("annotations") or {}
        ready = None
        if ANNOTATION_READY in annotations:
            value = str(annotations[ANNOTATION_READY]).lower()
            if value not in ("true", "false"):
                return [f"{origin}: {label}: metadata.annotations[{ANNOTATION_READY}] must be \"true\" or \"false\", not {value!r}"]
            ready = value == "true"
        conditions = [c for c in (status.get("conditions") or []) if isinstance(c, dict)]
        if ready is None:
            ready = next((str(c.get("status")) == "True" for c in conditions if c.get("type") == "Ready"), True)
        conditions = [c for c in conditions if c.get("type") != "Ready"]
        conditions.append({"type": "Ready", "status": "True" if ready else "False"})
        status = dict(status)
        status.update(
            phase=status.get("phase", "Running"),
            podIP=ip,
            podIPs=[{"ip": ip}],
            hostIP=self.node_ips[node],
            hostIPs=[{"ip": self.node_ips[node]}],
            conditions=conditions,
        )
        raw["status"] = status
        return []

    def _allocate_pod_ip(self, node: str, used: set[str]) -> str | None:
        cidr = self.node_cidrs[node]
        for offset in range(2, cidr.num_addresses - 1):  # .1 is the node's bridge
            ip = str(cidr.network_address + offset)
            if ip not in used:
                return ip
        return None

    def _admit_service(self, raw, origin, old: _Entry | None, used_ips: set, used_ports: dict, next_ip: int):
        meta, ns, name = raw["metadata"], raw["metadata"]["namespace"], raw["metadata"]["name"]
        label = f"Service {ns}/{name}"
        spec = raw.setdefault("spec", {})
        if not isinstance(spec, dict):
            return [f"{origin}: {label}: spec must be a mapping"], next_ip
        svc_type = spec.get("type", "ClusterIP")
        old_svc: Service | None = old.obj if old else None
        if old_svc is not None:
            meta["uid"] = old_svc.meta.uid
            used_ips = used_ips - set(old_svc.cluster_ips)
            used_ports = {p: k for p, k in used_ports.items() if k != (ns, name)}
        else:
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
        errs: list[str] = []
        if svc_type != "ExternalName":
            cip = spec.get("clusterIP")
            if cip in (None, ""):
                if old_svc is not None and old_svc.cluster_ip:
                    cip = old_svc.cluster_ip
                else:
                    cip, next_ip = self._allocate_cluster_ip(used_ips, next_ip)
                    if cip is None:
                        return [f"{origin}: {label}: serviceCIDR {self._service_net} has no free cluster IP"], next_ip
            elif cip != "None":
                try:
                    addr = ipaddress.ip_address(str(cip))
                except ValueError:
                    return [f"{origin}: {label}: spec.clusterIP {cip!r} is not an IP address (or \"None\")"], next_ip
                if addr not in self._service_net:
                    return [f"{origin}: {label}: spec.clusterIP {cip} is outside serviceCIDR {self._service_net}"], next_ip
                if old_svc is not None and old_svc.cluster_ip and old_svc.cluster_ip != str(cip):
                    return [f"{origin}: {label}: spec.clusterIP is immutable ({old_svc.cluster_ip} -> {cip}); delete the Service first"], next_ip
                if str(cip) in used_ips:
                    return [f"{origin}: {label}: spec.clusterIP {cip} is already allocated to another Service"], next_ip
            if cip != "None":
                used_ips.add(str(cip))
            spec["clusterIP"] = str(cip)
            spec["clusterIPs"] = [str(cip)]
        if svc_type in ("NodePort", "LoadBalancer"):
            lo, hi = self.settings.node_port_range
            old_ports = {(p.port, p.protocol): p.node_port for p in (old_svc.ports if old_svc else ())}
            mine: set[int] = set()
            for i, port in enumerate(spec.get("ports") or []):
                if not isinstance(port, dict):
                    continue
                np_ = port.get("nodePort")
                if np_ in (None, 0):
                    np_ = old_ports.get((port.get("port"), port.get("protocol", "TCP")), 0)
                if not np_:
                    np_ = next((p for p in range(lo, hi + 1) if p not in used_ports and p not in mine), None)
                    if np_ is None:
                        errs.append(f"{origin}: {label}: spec.ports[{i}]: no free node port in {lo}-{hi}")
                        continue
                elif not isinstance(np_, int) or not lo <= np_ <= hi:
                    errs.append(f"{origin}: {label}: spec.ports[{i}].nodePort {np_!r} is outside nodePortRange {lo}-{hi}")
                    continue
                elif np_ in used_ports:
                    other = used_ports[np_]
                    errs.append(f"{origin}: {label}: spec.ports[{i}].nodePort {np_} is already used by Service {other[0]}/{other[1]}")
                    continue
                port["nodePort"] = np_
                mine.add(np_)
            for p in mine:
                used_ports[p] = (ns, name)
        return errs, next_ip

    def _allocate_cluster_ip(self, used: set, next_ip: int) -> tuple[str | None, int]:
        net = self._service_net
        size = net.num_addresses
        reserved = {str(net.network_address + 1), self.settings.dns_cluster_ip, str(net.broadcast_address)}
        for i in range(size):
            offset = (next_ip - 2 + i) % (size - 3) + 2
            ip = str(net.network_address + offset)
            if ip not in used and ip not in reserved:
                return ip, offset + 1
        return None, next_ip

    def delete(self, kind: str, namespace: str, name: str, grace: int | None = None) -> int | None:
        """Delete an object.  Pods become terminating; returns their grace period (None for others).

        Raises KeyError naming what is missing.
        """
        key = (namespace, name)
        if kind == "Pod":
            entry = self.pods.get(key)
            if entry is None:
                raise KeyError(f"pod {namespace}/{name} not found")
            pod: Pod = entry.obj
            period = pod.termination_grace_period if grace is None else grace
            if pod.meta.deletion_timestamp is not None:
                return period
            raw = copy.deepcopy(entry.raw)
            raw["metadata"]["deletionTimestamp"] = _now()
            raw["metadata"]["deletionGracePeriodSeconds"] = period
            obj, err = _parse(raw, pod.meta.origin)
            if err:  # cannot happen for an object that parsed before; keep it loud
                raise RuntimeError(err)
            self.pods[key] = _Entry(raw, obj)
            return period
        if kind == "Service":
            if self.services.pop(key, None) is None:
                raise KeyError(f"service {namespace}/{name} not found")
            return None
        if kind == "EndpointSlice":
            if self.user_slices.pop(key, None) is None:
                raise KeyError(f"endpointslice {namespace}/{name} not found (controller-made slices follow their Service)")
            return None
        if kind == "Deployment":
            if key not in self.deployments:
                raise KeyError(f"deployment {namespace}/{name} not found")
            self.deployments.pop(key)
            return None
        raise KeyError(f"cannot delete kind {kind!r}: use pod/NAME, service/NAME, endpointslice/NAME or deployment/NAME")

    def remove_pod(self, namespace: str, name: str) -> Pod | None:
        """Forget a pod once its grace period is over; frees its IP."""
        entry = self.pods.pop((namespace, name), None)
        return entry.obj if entry else None

    def deployment_pods(self, namespace: str, name: str) -> list[Key]:
        return [
            k for k, e in self.pods.items()
            if k[0] == namespace and any(
                r.get("kind") == "Deployment" and r.get("name") == name
                for r in (e.raw["metadata"].get("ownerReferences") or [])
            )
        ]


def node_hostname_label(node: Node) -> str:
    return node.meta.labels.get(LABEL_HOSTNAME, node.name)
