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

from kubelab.model import EndpointPort, EndpointSlice, LoadBalancerIngress, Node, Pod, Service, ServicePortSpec, Taint
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


# `kubectl get endpointslice -n default -l kubernetes.io/service-name=echo -o yaml`
# as a real cluster prints it: ownerReferences, managedFields, the trigger-time
# annotation, targetRefs, hints, an endpoint being terminated.
KUBECTL_SLICE_LIST = """\
apiVersion: v1
items:
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.7
    conditions:
      ready: true
      serving: true
      terminating: false
    hints:
      forZones:
      - name: zone-a
    nodeName: node-a
    targetRef:
      kind: Pod
      name: echo-6d4cf56db6-2xk9q
      namespace: default
      uid: 7c1e2a55-0b9d-4f3e-a8c4-1d2e3f4a5b6c
    zone: zone-a
  - addresses:
    - 10.244.2.9
    conditions:
      ready: false
      serving: true
      terminating: true
    hints:
      forZones:
      - name: zone-b
    nodeName: node-b
    targetRef:
      kind: Pod
      name: echo-6d4cf56db6-8p7rd
      namespace: default
      uid: 0f9e8d7c-6b5a-4c3d-9e2f-1a0b9c8d7e6f
    zone: zone-b
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T10:00:03Z"
    creationTimestamp: "2024-05-02T10:00:00Z"
    generateName: echo-
    generation: 4
    labels:
      app: echo
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: echo
      service.kubernetes.io/headless: ""
    managedFields:
    - apiVersion: discovery.k8s.io/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:addressType: {}
        f:endpoints: {}
        f:metadata:
          f:annotations:
            .: {}
            f:endpoints.kubernetes.io/last-change-trigger-time: {}
          f:generateName: {}
          f:ownerReferences:
            .: {}
            k:{"uid":"2f4c6e8a-1b3d-4f5a-9c7e-0d2b4f6a8c1e"}: {}
        f:ports: {}
      manager: kube-controller-manager
      operation: Update
      time: "2024-05-02T10:00:03Z"
    name: echo-x7k2p
    namespace: default
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: echo
      uid: 2f4c6e8a-1b3d-4f5a-9c7e-0d2b4f6a8c1e
    resourceVersion: "9034"
    uid: 5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d
  ports:
  - name: ""
    port: 8080
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"""

# `kubectl get endpoints legacy -o yaml` (core/v1, deprecated since 1.33, as
# the API server still returns it, warning header aside).
KUBECTL_ENDPOINTS = """\
apiVersion: v1
kind: Endpoints
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T10:05:00Z"
  creationTimestamp: "2024-05-02T09:30:00Z"
  labels:
    app: legacy
  name: legacy
  namespace: default
  resourceVersion: "9120"
  uid: 1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e
subsets:
- addresses:
  - ip: 10.244.1.30
    nodeName: node-a
    targetRef:
      kind: Pod
      name: legacy-0
      namespace: default
      uid: 6e5d4c3b-2a19-4f8e-b7d6-c5b4a3928170
  notReadyAddresses:
  - ip: 10.244.2.30
    nodeName: node-b
    targetRef:
      kind: Pod
      name: legacy-1
      namespace: default
      uid: 9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d
  ports:
  - name: pg
    port: 5432
    protocol: TCP
"""

# `kubectl get pod echo-6d4cf56db6-2xk9q -o yaml`, untrimmed.
KUBECTL_POD = """\
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2024-05-02T10:00:00Z"
  generateName: echo-6d4cf56db6-
  labels:
    app: echo
    pod-template-hash: 6d4cf56db6
  name: echo-6d4cf56db6-2xk9q
  namespace: default
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: echo-6d4cf56db6
    uid: 4d3c2b1a-0f9e-4d8c-b7a6-958473625140
  resourceVersion: "9010"
  uid: 7c1e2a55-0b9d-4f3e-a8c4-1d2e3f4a5b6c
spec:
  containers:
  - args:
    - netexec
    - --http-port=8080
    image: registry.k8s.io/e2e-test-images/agnhost:2.47
    imagePullPolicy: IfNotPresent
    name: agnhost
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
    readinessProbe:
      failureThreshold: 3
      httpGet:
        path: /healthz
        port: http
        scheme: HTTP
      periodSeconds: 10
      successThreshold: 1
      timeoutSeconds: 1
    resources: {}
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
    volumeMounts:
    - mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      name: kube-api-access-5w2xq
      readOnly: true
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  hostname: echo-0
  nodeName: node-a
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: default
  serviceAccountName: default
  subdomain: echo-headless
  terminationGracePeriodSeconds: 30
  tolerations:
  - effect: NoExecute
    key: node.kubernetes.io/not-ready
    operator: Exists
    tolerationSeconds: 300
  volumes:
  - name: kube-api-access-5w2xq
    projected:
      defaultMode: 420
      sources:
      - serviceAccountToken:
          expirationSeconds: 3607
          path: token
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:00:02Z"
    status: "True"
    type: PodReadyToStartContainers
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:00:00Z"
    status: "True"
    type: Initialized
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:00:03Z"
    status: "True"
    type: Ready
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:00:03Z"
    status: "True"
    type: ContainersReady
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:00:00Z"
    status: "True"
    type: PodScheduled
  containerStatuses:
  - containerID: containerd://3b8f0d2c9a7e6f5d4c3b2a190817263544536271809a8b7c6d5e4f3a2b1c0d9e
    image: registry.k8s.io/e2e-test-images/agnhost:2.47
    imageID: registry.k8s.io/e2e-test-images/agnhost@sha256:7e8bdd271312fd25fc5ff5a8f04727be84044eb3d7d8d03611972a6752e2e11e
    lastState: {}
    name: agnhost
    ready: true
    restartCount: 0
    started: true
    state:
      running:
        startedAt: "2024-05-02T10:00:01Z"
  hostIP: 192.168.200.11
  hostIPs:
  - ip: 192.168.200.11
  phase: Running
  podIP: 10.244.1.7
  podIPs:
  - ip: 10.244.1.7
  qosClass: BestEffort
  startTime: "2024-05-02T10:00:00Z"
"""

# `kubectl get node node-a -o yaml`, untrimmed (a node being drained by the
# cluster autoscaler: the taint kube-proxy's /healthz looks for).
KUBECTL_NODE = """\
apiVersion: v1
kind: Node
metadata:
  annotations:
    kubeadm.alpha.kubernetes.io/cri-socket: unix:///run/containerd/containerd.sock
    node.alpha.kubernetes.io/ttl: "0"
    volumes.kubernetes.io/controller-managed-attach-detach: "true"
  creationTimestamp: "2024-05-02T09:14:03Z"
  labels:
    beta.kubernetes.io/arch: amd64
    beta.kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: node-a
    kubernetes.io/os: linux
    node.kubernetes.io/exclude-from-external-load-balancers: ""
    topology.kubernetes.io/region: region-1
    topology.kubernetes.io/zone: zone-a
  name: node-a
  resourceVersion: "9500"
  uid: 3f1f6c1e-4a3a-4a8e-9b0e-0d1c5a2b7e11
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs:
  - 10.244.1.0/24
  providerID: kind://docker/kind/node-a
  taints:
  - effect: NoSchedule
    key: ToBeDeletedByClusterAutoscaler
    value: "1714644000"
status:
  addresses:
  - address: 192.168.200.11
    type: InternalIP
  - address: node-a
    type: Hostname
  allocatable:
    cpu: "2"
    ephemeral-storage: 61202244Ki
    hugepages-2Mi: "0"
    memory: 8025424Ki
    pods: "110"
  capacity:
    cpu: "2"
    ephemeral-storage: 61202244Ki
    hugepages-2Mi: "0"
    memory: 8025424Ki
    pods: "110"
  conditions:
  - lastHeartbeatTime: "2024-05-02T10:01:12Z"
    lastTransitionTime: "2024-05-02T09:14:03Z"
    message: kubelet has sufficient memory available
    reason: KubeletHasSufficientMemory
    status: "False"
    type: MemoryPressure
  - lastHeartbeatTime: "2024-05-02T10:01:12Z"
    lastTransitionTime: "2024-05-02T09:14:33Z"
    message: kubelet is posting ready status
    reason: KubeletReady
    status: "True"
    type: Ready
  daemonEndpoints:
    kubeletEndpoint:
      Port: 10250
  images:
  - names:
    - registry.k8s.io/e2e-test-images/agnhost@sha256:7e8bdd271312fd25fc5ff5a8f04727be84044eb3d7d8d03611972a6752e2e11e
    - registry.k8s.io/e2e-test-images/agnhost:2.47
    sizeBytes: 51190137
  nodeInfo:
    architecture: amd64
    bootID: 0e4f5a6b-7c8d-4e9f-a0b1-c2d3e4f5a6b7
    containerRuntimeVersion: containerd://1.7.15
    kernelVersion: 6.1.0-21-amd64
    kubeProxyVersion: v1.30.0
    kubeletVersion: v1.30.0
    machineID: 3c2b1a0f9e8d4c7bb6a5948372615049
    operatingSystem: linux
    osImage: Debian GNU/Linux 12 (bookworm)
    systemUUID: 3c2b1a0f-9e8d-4c7b-b6a5-948372615049
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
    ("kubectl-slice-list", KUBECTL_SLICE_LIST, lambda o: [(s.name, s.service_name) for s in o] == [("echo-x7k2p", "echo")]
     and o[0].ports == (EndpointPort(8080, "TCP", ""),)
     and [(e.addresses, e.conditions.ready, e.conditions.serving, e.conditions.terminating, e.node_name, e.zone,
           e.hints_for_zones, e.target_ref.name) for e in o[0].endpoints] == [
         (("10.244.1.7",), True, True, False, "node-a", "zone-a", ("zone-a",), "echo-6d4cf56db6-2xk9q"),
         (("10.244.2.9",), False, True, True, "node-b", "zone-b", ("zone-b",), "echo-6d4cf56db6-8p7rd")]
     and o[0].meta.annotations["endpoints.kubernetes.io/last-change-trigger-time"] == "2024-05-02T10:00:03Z"
     and o[0].meta.labels["service.kubernetes.io/headless"] == ""),
    ("kubectl-endpoints", KUBECTL_ENDPOINTS, lambda o: [s.service_name for s in o] == ["legacy"]
     and [(e.addresses, e.conditions.ready, e.node_name, e.target_ref.name) for e in o[0].endpoints] == [
         (("10.244.1.30",), True, "node-a", "legacy-0"), (("10.244.2.30",), False, "node-b", "legacy-1")]
     and o[0].ports == (EndpointPort(5432, "TCP", "pg"),)
     # the mirroring controller copies every annotation but these two (endpointslicemirroring)
     and "endpoints.kubernetes.io/last-change-trigger-time" not in o[0].meta.annotations),
    ("kubectl-pod", KUBECTL_POD, lambda o: isinstance(o[0], Pod) and o[0].pod_ips == ("10.244.1.7",)
     and o[0].host_ip == "192.168.200.11" and o[0].hostname == "echo-0" and o[0].subdomain == "echo-headless"
     and o[0].node_name == "node-a" and o[0].phase == "Running" and o[0].ready
     and [(p.name, p.port) for p in o[0].ports] == [("http", 8080)]),
    ("kubectl-node", KUBECTL_NODE, lambda o: isinstance(o[0], Node) and o[0].zone == "zone-a"
     and [(a.type, a.address) for a in o[0].addresses] == [("InternalIP", "192.168.200.11"), ("Hostname", "node-a")]
     and o[0].pod_cidrs == ("10.244.1.0/24",)
     and o[0].taints == (Taint("ToBeDeletedByClusterAutoscaler", "1714644000", "NoSchedule"),)),
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
