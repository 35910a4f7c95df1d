"""Real manifests: the Kubernetes docs' Service / EndpointSlice examples, kubectl output, examples/basic, folders.

The docs manifests below are copied verbatim from kubernetes/website
(content/en/docs/concepts/services-networking/service.md,
endpoint-slices.md, dual-stack.md and content/en/examples/service/...).

Addresses used (manifest values only, nothing is sent): the docs' own
(10.0.171.239, 10.1.2.3, 10.4.5.6, 192.0.2.127, 198.51.100.32,
2001:db8:fd00::/64), and examples/basic's (see its README: nodes
192.168.200.0/24, pods 10.244.0.0/16, services 10.96.0.0/16, LB 203.0.113.0/24).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubelab.model import EndpointPort, EndpointSlice, LoadBalancerIngress, Node, Pod, Service, ServicePortSpec
from kubelab.proxy.objects import (
    find_manifest_files,
    is_manifest_file,
    load_file,
    load_path,
    parse_documents,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "basic"

# --- service.md ------------------------------------------------------------

DOCS_SERVICE_SIMPLE = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
"""

DOCS_NAMED_PORT = """\
apiVersion: v1
kind: Pod
metadata:
  name: nginx
  labels:
    app.kubernetes.io/name: proxy
spec:
  containers:
  - name: nginx
    image: nginx:stable
    ports:
      - containerPort: 80
        name: http-web-svc

---
apiVersion: v1
kind: Service
metadata:
  name: nginx-service
spec:
  selector:
    app.kubernetes.io/name: proxy
  ports:
  - name: name-of-service-port
    protocol: TCP
    port: 80
    targetPort: http-web-svc
"""

DOCS_NO_SELECTOR = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: my-service-1 # by convention, use the name of the Service
                     # as a prefix for the name of the EndpointSlice
  labels:
    # You should set the "kubernetes.io/service-name" label.
    # Set its value to match the name of the Service
    kubernetes.io/service-name: my-service
addressType: IPv4
ports:
  - name: http # should match with the name of the service port defined above
    appProtocol: http
    protocol: TCP
    port: 9376
endpoints:
  - addresses:
      - "10.4.5.6"
  - addresses:
      - "10.1.2.3"
"""

DOCS_MULTI_PORT = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 9376
    - name: https
      protocol: TCP
      port: 443
      targetPort: 9377
"""

DOCS_NODEPORT = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  type: NodePort
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - port: 80
      # By default and for convenience, the `targetPort` is set to
      # the same value as the `port` field.
      targetPort: 80
      # Optional field
      # By default and for convenience, the Kubernetes control plane
      # will allocate a port from a range (default: 30000-32767)
      nodePort: 30007
"""

DOCS_LOADBALANCER = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
  clusterIP: 10.0.171.239
  type: LoadBalancer
status:
  loadBalancer:
    ingress:
    - ip: 192.0.2.127
"""

DOCS_EXTERNALNAME = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
  namespace: prod
spec:
  type: ExternalName
  externalName: my.database.example.com
"""

DOCS_EXTERNAL_IPS = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 49152
  externalIPs:
    - 198.51.100.32
"""

# --- endpoint-slices.md ----------------------------------------------------

DOCS_ENDPOINTSLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: example-abc
  labels:
    kubernetes.io/service-name: example
addressType: IPv4
ports:
  - name: http
    protocol: TCP
    port: 80
endpoints:
  - addresses:
      - "10.1.2.3"
    conditions:
      ready: true
    hostname: pod-1
    nodeName: node-1
    zone: us-west2-a
"""

# The same page before v1.21 (discovery.k8s.io/v1beta1, topology map): a
# version kube-proxy no longer reads, so it must be reported, not guessed at.
DOCS_ENDPOINTSLICE_V1BETA1 = """\
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: example-abc
  labels:
    kubernetes.io/service-name: example
addressType: IPv4
ports:
  - name: http
    protocol: TCP
    port: 80
endpoints:
  - addresses:
      - "10.1.2.3"
    conditions:
      ready: true
    hostname: pod-1
    topology:
      kubernetes.io/hostname: node-1
      topology.kubernetes.io/zone: us-west2-a
"""

# --- dual-stack.md / examples/service/networking ----------------------------

DOCS_DUAL_STACK_PREFERRED_IPFAMILIES = """\
---
{
  apiVersion: "v1",
  kind: "Service",
  metadata: {
    name: "my-service",
    labels: {
      app.kubernetes.io/name: "MyApp",
    },
  },
  spec: {
    ipFamilyPolicy: "PreferDualStack",
    ipFamilies: [
      "IPv6",
      "IPv4",
    ],
    selector: {
      app.kubernetes.io/name: "MyApp",
    },
    ports: [{
      protocol: "TCP",
      port: 80,
    }],
  },
}
"""

# dual-stack.md: what `kubectl get svc my-service -o yaml` shows for a
# headless service that only set its ipFamilyPolicy.
DOCS_DUAL_STACK_KUBECTL_HEADLESS = """\
apiVersion: v1
kind: Service
metadata:
  labels:
    app.kubernetes.io/name: MyApp
  name: my-service
spec:
  clusterIP: None
  clusterIPs:
  - None
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  ports:
  - port: 80
    protocol: TCP
    targetPort: 80
  selector:
    app.kubernetes.io/name: MyApp
"""

# dual-stack.md: a dual-stack service as the API server returns it.
DOCS_DUAL_STACK_KUBECTL = """\
apiVersion: v1
kind: Service
metadata:
  labels:
    app.kubernetes.io/name: MyApp
  name: my-service
spec:
  clusterIP: 10.0.197.123
  clusterIPs:
  - 10.0.197.123
  - 2001:db8:fd00::5118
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  ports:
  - port: 80
    protocol: TCP
    targetPort: 80
  selector:
    app.kubernetes.io/name: MyApp
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"""

# A `kubectl get svc -o yaml` List, with everything the API server adds.
KUBECTL_SVC_LIST = """\
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-02T09:12:40Z"
    labels:
      component: apiserver
      provider: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "196"
    uid: 8c0e3b2c-7f3a-4a8e-b6c1-0f1e2d3c4b5a
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"echo","namespace":"default"},"spec":{"externalTrafficPolicy":"Local","ports":[{"port":80,"targetPort":8080}],"selector":{"app":"echo"},"type":"LoadBalancer"}}
    creationTimestamp: "2024-05-02T10:00:00Z"
    finalizers:
    - service.kubernetes.io/load-balancer-cleanup
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:spec:
          f:allocateLoadBalancerNodePorts: {}
          f:externalTrafficPolicy: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2024-05-02T10:00:00Z"
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:status:
          f:loadBalancer:
            f:ingress: {}
      manager: metallb-controller
      operation: Update
      subresource: status
      time: "2024-05-02T10:00:01Z"
    name: echo
    namespace: default
    resourceVersion: "9001"
    uid: 2f4c6e8a-1b3d-4f5a-9c7e-0d2b4f6a8c1e
  spec:
    allocateLoadBalancerNodePorts: true
    clusterIP: 10.96.12.7
    clusterIPs:
    - 10.96.12.7
    externalTrafficPolicy: Local
    healthCheckNodePort: 31555
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - nodePort: 30616
      port: 80
      protocol: TCP
      targetPort: 8080
    selector:
      app: echo
    sessionAffinity: None
    type: LoadBalancer
  status:
    loadBalancer:
      ingress:
      - ip: 203.0.113.40
        ipMode: VIP
kind: List
metadata:
  resourceVersion: ""
"""


DOCS_CASES = [
    ("service-simple", DOCS_SERVICE_SIMPLE,
     lambda o: o[0].ports == (ServicePortSpec(80, "TCP", "", 9376),) and o[0].selector == {"app.kubernetes.io/name": "MyApp"}
     and o[0].cluster_ips == ()),
    ("named-port", DOCS_NAMED_PORT,
     lambda o: isinstance(o[0], Pod) and o[0].ports[0].name == "http-web-svc" and o[1].ports[0].target_port == "http-web-svc"),
    ("no-selector-with-slice", DOCS_NO_SELECTOR,
     lambda o: o[0].selector is None and isinstance(o[1], EndpointSlice) and o[1].service_name == "my-service"
     and o[1].ports == (EndpointPort(9376, "TCP", "http", "http"),)
     and [e.addresses for e in o[1].endpoints] == [("10.4.5.6",), ("10.1.2.3",)]),
    ("multi-port", DOCS_MULTI_PORT, lambda o: [(p.name, p.port, p.target_port) for p in o[0].ports] == [
        ("http", 80, 9376), ("https", 443, 9377)]),
    ("nodeport", DOCS_NODEPORT, lambda o: o[0].type == "NodePort" and o[0].ports[0].node_port == 30007
     and o[0].external_traffic_policy == "Cluster"),
    ("loadbalancer", DOCS_LOADBALANCER, lambda o: o[0].cluster_ip == "10.0.171.239"
     and o[0].load_balancer_ingress == (LoadBalancerIngress(ip="192.0.2.127", ip_mode="VIP"),)),
    ("externalname", DOCS_EXTERNALNAME, lambda o: o[0].namespace == "prod" and o[0].external_name == "my.database.example.com"
     and o[0].cluster_ips == ()),
    ("external-ips", DOCS_EXTERNAL_IPS, lambda o: o[0].external_ips == ("198.51.100.32",)
     and o[0].external_traffic_policy == "Cluster"),
    ("endpointslice", DOCS_ENDPOINTSLICE, lambda o: o[0].endpoints[0].hostname == "pod-1"
     and o[0].endpoints[0].node_name == "node-1" and o[0].endpoints[0].zone == "us-west2-a"
     and o[0].endpoints[0].conditions.ready is True),
    ("dual-stack-flow-style", DOCS_DUAL_STACK_PREFERRED_IPFAMILIES, lambda o: o[0].ip_families == ("IPv6", "IPv4")),
    ("dual-stack-kubectl-headless", DOCS_DUAL_STACK_KUBECTL_HEADLESS, lambda o: o[0].headless
     and o[0].ip_families == ("IPv4", "IPv6")),
    ("dual-stack-kubectl", DOCS_DUAL_STACK_KUBECTL, lambda o: o[0].cluster_ips == ("10.0.197.123", "2001:db8:fd00::5118")),
    ("kubectl-svc-list", KUBECTL_SVC_LIST, lambda o: [s.name for s in o] == ["kubernetes", "echo"]
     and o[0].ports[0].target_port == 6443 and o[1].health_check_node_port == 31555
     and o[1].external_traffic_policy == "Local" and o[1].load_balancer_ingress[0].ip == "203.0.113.40"),
]


@pytest.mark.parametrize("text,check", [c[1:] for c in DOCS_CASES], ids=[c[0] for c in DOCS_CASES])
def test_docs_and_kubectl_manifests_parse(text, check):
    r = parse_documents(text, "docs.yaml")
    assert r.errors == []
    assert check(r.objects)


def test_docs_v1beta1_endpointslice_reported():
    r = parse_documents(DOCS_ENDPOINTSLICE_V1BETA1, "old.yaml")
    assert r.objects == []
    (err,) = r.errors
    assert str(err) == ('old.yaml:1: EndpointSlice default/example-abc: apiVersion: Unsupported value: '
                        '"discovery.k8s.io/v1beta1": supported values: "discovery.k8s.io/v1"')


# --- examples/basic ----------------------------------------------------------


def test_example_folder_loads_clean():
    r = load_path(EXAMPLE)
    assert r.errors == []
    kinds = {}
    for o in r.objects:
        kinds.setdefault(type(o).__name__, []).append(f"{o.meta.namespace}/{o.meta.name}" if o.meta.namespace else o.meta.name)
    assert sorted(kinds["Service"]) == ["default/external-db", "default/legacy", "default/web", "default/web-headless",
                                        "default/web-lb", "default/web-nodeport", "kube-system/kube-dns"]
    assert sorted(kinds["Node"]) == ["node-a", "node-b"]
    assert len(kinds["Pod"]) == 5
    assert "default/legacy-0" in kinds["EndpointSlice"]  # mirrored from core/v1 Endpoints


def test_example_covers_every_service_shape():
    objs = load_path(EXAMPLE).objects
    svcs = {o.name: o for o in objs if isinstance(o, Service)}
    slices = {o.service_name: o for o in objs if isinstance(o, EndpointSlice)}
    assert svcs["web"].ports[0].target_port == "http"
    assert {e.node_name for e in slices["web"].endpoints} == {"node-a", "node-b"} and len(slices["web"].endpoints) == 3
    assert svcs["web-headless"].headless
    assert svcs["web-nodeport"].ports[0].node_port == 30080
    assert svcs["web-lb"].load_balancer_ingress[0].ip == "203.0.113.10"
    assert svcs["external-db"].type == "ExternalName"
    assert {p.protocol for p in svcs["kube-dns"].ports} == {"UDP", "TCP"}
    legacy = slices["legacy"]
    assert [(e.addresses[0], e.conditions.ready) for e in legacy.endpoints] == [("10.244.1.30", True), ("10.244.2.30", False)]
    # Every service with a selector has a slice, and every slice a service.
    assert set(slices) == {n for n, s in svcs.items() if s.type != "ExternalName"}
    node_a = next(o for o in objs if isinstance(o, Node) and o.name == "node-a")
    assert node_a.zone == "zone-a" and node_a.pod_cidrs == ("10.244.1.0/24",)


# --- files and folders ----------------------------------------------------------

SVC_A = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
SVC_A2 = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n"
SVC_B = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}\n"


@pytest.mark.parametrize("name,expected", [
    ("svc.yaml", True), ("svc.yml", True), ("svc.json", True), ("SVC.YAML", True),
    (".svc.yaml", False), (".#svc.yaml", False), ("#svc.yaml#", False), ("svc.yaml~", False),
    ("svc.yaml.swp", False), ("svc.txt", False), ("kustomization", False),
], ids=lambda v: str(v))
def test_is_manifest_file(name, expected):
    assert is_manifest_file(name) is expected


def test_folder_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "20-b.yaml").write_text(SVC_B)
    (tmp_path / "10-a.yml").write_text(SVC_A)
    (tmp_path / ".git" / "x.yaml").write_text(SVC_A2)
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".10-a.yml.swp").write_text("garbage: [")
    (tmp_path / "10-a.yml~").write_text("garbage: [")
    files = find_manifest_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["10-a.yml", "b/20-b.yaml"]
    r = load_path(tmp_path)
    assert [o.name for o in r.objects] == ["a", "b"] and r.errors == []


def test_duplicate_across_files_first_sorted_wins(tmp_path):
    (tmp_path / "10-first.yaml").write_text(SVC_A)
    (tmp_path / "20-second.yaml").write_text(SVC_A2)
    r = load_path(tmp_path)
    assert [o.cluster_ip for o in r.objects] == ["10.96.0.1"]
    (err,) = r.errors
    assert str(err).startswith(f"{tmp_path}/20-second.yaml:1: Service default/a: metadata.name: Duplicate value")
    assert f"already defined at {tmp_path}/10-first.yaml:1" in str(err)


def test_broken_file_skips_only_that_file(tmp_path):
    (tmp_path / "a.yaml").write_text(SVC_A)
    (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: b\n")
    r = load_path(tmp_path)
    assert [o.name for o in r.objects] == ["a"]
    (err,) = r.errors
    assert err.file_level and str(err).startswith(f"{tmp_path}/b.yaml:")


@pytest.mark.parametrize("make", ["dangling-symlink", "not-utf8"])
def test_unreadable_file_is_one_error(tmp_path, make):
    (tmp_path / "a.yaml").write_text(SVC_A)
    bad = tmp_path / "z.yaml"
    if make == "dangling-symlink":
        os.symlink(tmp_path / "gone.yaml", bad)
    else:
        bad.write_bytes(b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff\xfe}\n")
    r = load_path(tmp_path)
    assert [o.name for o in r.objects] == ["a"]
    (err,) = r.errors
    assert err.file_level and str(err).startswith(f"{bad}: cannot read the file: ")


def test_configmap_volume_layout(tmp_path):
    # A ConfigMap volume: visible symlinks into a hidden, atomically swapped ..data dir.
    data = tmp_path / "..2024_05_02_09_00_00.1"
    data.mkdir()
    (data / "svc.yaml").write_text(SVC_A)
    os.symlink(data.name, tmp_path / "..data")
    os.symlink("..data/svc.yaml", tmp_path / "svc.yaml")
    r = load_path(tmp_path)
    assert [o.name for o in r.objects] == ["a"] and r.errors == []


def test_load_single_file_and_missing_path(tmp_path):
    f = tmp_path / "one.json"
    f.write_text('{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}')
    assert [o.name for o in load_file(f).objects] == ["n1"]
    assert [o.name for o in load_path(f).objects] == ["n1"]
    (err,) = load_path(tmp_path / "nope").errors
    assert err.file_level and "no such file or directory" in str(err)
