"""kubelab.proxy.objects: every field of issue 2 parses, every validation error is reported.

Addresses used (nothing is sent anywhere; these are manifest values only):
service IPs 10.96.0.0/16 and fd00:96::/64; pod IPs 10.244.0.0/16 and
fd00:244::/64; node IPs 192.168.200.0/24; externalIPs / load-balancer IPs
203.0.113.0/24 and 198.51.100.0/24 (TEST-NET-2/3); deliberately invalid
ones (10.96.0.300, 127.0.0.1, 169.254.1.1, 0.0.0.0, ::1).
"""

from __future__ import annotations

import copy
import json

import pytest

from kubelab.model import (
    LABEL_HEADLESS,
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
    ContainerPort,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    LoadBalancerIngress,
    Node,
    NodeAddress,
    ObjectReference,
    Origin,
    Pod,
    Service,
    ServicePortSpec,
    Taint,
)
from kubelab.proxy.objects import (
    MIRRORING_MANAGED_BY,
    ObjectError,
    parse_documents,
    parse_object,
    parse_objects,
    source_key,
)

ORIGIN = Origin("test.yaml", 1)


def deep_merge(base: dict, patch: dict) -> dict:
    """``patch`` over ``base``; a None value in ``patch`` deletes the key."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


SVC = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"}, "ports": [{"port": 80}]},
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {"name": "web-abc12", "namespace": "shop", "labels": {LABEL_SERVICE_NAME: "web"}},
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.244.1.5"]}],
    "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
}
ENDPOINTS = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": {"name": "legacy", "namespace": "shop"},
    "subsets": [{"addresses": [{"ip": "10.244.1.30"}], "ports": [{"port": 9000}]}],
}
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"containers": [{"name": "web", "image": "agnhost"}]},
}
NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
}


def svc(patch: dict | None = None, spec: dict | None = None) -> dict:
    d = deep_merge(SVC, patch or {})
    if spec is not None:
        d["spec"] = deep_merge(d["spec"], spec)
    return d


def lb(spec: dict | None = None, status: dict | None = None) -> dict:
    d = svc(spec={"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}], **(spec or {})})
    if status is not None:
        d["status"] = {"loadBalancer": status}
    return d


def one(d: dict):
    return parse_object(d, ORIGIN)


# ---------------------------------------------------------------------------
# Fields: (id, manifest, attribute path on the parsed object, expected value)
# ---------------------------------------------------------------------------


def attr(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


FIELD_CASES = [
    # --- Service: defaults as the API server applies them
    ("svc-default-type", svc(), "type", "ClusterIP"),
    ("svc-default-protocol", svc(), "ports.0.protocol", "TCP"),
    ("svc-default-targetport-is-port", svc(), "ports.0.target_port", 80),
    ("svc-default-affinity", svc(), "session_affinity", "None"),
    ("svc-default-affinity-timeout", svc(), "session_affinity_timeout", 10800),
    ("svc-default-etp", svc(spec={"type": "NodePort"}), "external_traffic_policy", "Cluster"),
    ("svc-default-itp", svc(), "internal_traffic_policy", "Cluster"),
    ("svc-default-namespace", svc({"metadata": {"namespace": None}}), "meta.namespace", "default"),
    ("svc-default-allocate-lb-nodeports", lb(), "allocate_load_balancer_node_ports", True),
    ("svc-default-publish-not-ready", svc(), "publish_not_ready_addresses", False),
    ("svc-default-traffic-distribution", svc(), "traffic_distribution", None),
    ("svc-no-clusterip-is-unallocated", svc(spec={"clusterIP": None}), "cluster_ips", ()),
    # --- Service: every field
    ("svc-clusterip", svc(), "cluster_ips", ("10.96.0.20",)),
    ("svc-clusterip-families-derived", svc(), "ip_families", ("IPv4",)),
    ("svc-clusterips-only", svc(spec={"clusterIP": None, "clusterIPs": ["fd00:96::20"]}), "cluster_ip", "fd00:96::20"),
    ("svc-dual-stack", svc(spec={"clusterIPs": ["10.96.0.20", "fd00:96::20"], "ipFamilies": ["IPv4", "IPv6"],
                                 "ipFamilyPolicy": "RequireDualStack"}), "cluster_ips", ("10.96.0.20", "fd00:96::20")),
    ("svc-dual-stack-families", svc(spec={"clusterIPs": ["10.96.0.20", "fd00:96::20"], "ipFamilies": ["IPv4", "IPv6"]}),
     "ip_families", ("IPv4", "IPv6")),
    ("svc-headless", svc(spec={"clusterIP": "None"}), "headless", True),
    ("svc-headless-ips", svc(spec={"clusterIP": "None", "clusterIPs": ["None"]}), "cluster_ips", ("None",)),
    ("svc-headless-no-ports", svc(spec={"clusterIP": "None", "ports": None}), "ports", ()),
    ("svc-port-name", svc(spec={"ports": [{"name": "http", "port": 80}]}), "ports.0.name", "http"),
    ("svc-port-udp", svc(spec={"ports": [{"port": 53, "protocol": "UDP"}]}), "ports.0.protocol", "UDP"),
    ("svc-port-sctp", svc(spec={"ports": [{"port": 9, "protocol": "SCTP"}]}), "ports.0.protocol", "SCTP"),
    ("svc-targetport-number", svc(spec={"ports": [{"port": 80, "targetPort": 8080}]}), "ports.0.target_port", 8080),
    ("svc-targetport-named", svc(spec={"ports": [{"port": 80, "targetPort": "http-web"}]}), "ports.0.target_port", "http-web"),
    ("svc-app-protocol", svc(spec={"ports": [{"port": 80, "appProtocol": "kubernetes.io/h2c"}]}), "ports.0.app_protocol",
     "kubernetes.io/h2c"),
    ("svc-two-ports", svc(spec={"ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                          {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}),
     "ports", (ServicePortSpec(53, "UDP", "dns", 53), ServicePortSpec(53, "TCP", "dns-tcp", 53))),
    ("svc-nodeport", svc(spec={"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}), "ports.0.node_port", 30080),
    ("svc-nodeport-type", svc(spec={"type": "NodePort"}), "type", "NodePort"),
    ("svc-selector", svc(), "selector", {"app": "web"}),
    ("svc-no-selector", svc(spec={"selector": None}), "selector", None),
    ("svc-external-ips", svc(spec={"externalIPs": ["198.51.100.32", "2001:db8::32"]}), "external_ips",
     ("198.51.100.32", "2001:db8::32")),
    ("svc-external-ips-etp-default", svc(spec={"externalIPs": ["198.51.100.32"]}), "external_traffic_policy", "Cluster"),
    ("svc-external-ips-etp-local", svc(spec={"externalIPs": ["198.51.100.32"], "externalTrafficPolicy": "Local"}),
     "external_traffic_policy", "Local"),
    ("svc-affinity-clientip", svc(spec={"sessionAffinity": "ClientIP"}), "session_affinity", "ClientIP"),
    ("svc-affinity-clientip-default-timeout", svc(spec={"sessionAffinity": "ClientIP"}), "session_affinity_timeout", 10800),
    ("svc-affinity-timeout", svc(spec={"sessionAffinity": "ClientIP",
                                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
     "session_affinity_timeout", 60),
    ("svc-affinity-timeout-max", svc(spec={"sessionAffinity": "ClientIP",
                                           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
     "session_affinity_timeout", 86400),
    ("svc-etp-local", lb({"externalTrafficPolicy": "Local"}), "external_traffic_policy", "Local"),
    ("svc-itp-local", svc(spec={"internalTrafficPolicy": "Local"}), "internal_traffic_policy", "Local"),
    ("svc-hcnp", lb({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}), "health_check_node_port", 32000),
    ("svc-lb-source-ranges", lb({"loadBalancerSourceRanges": ["203.0.113.0/24", " 198.51.100.0/25 "]}),
     "load_balancer_source_ranges", ("203.0.113.0/24", "198.51.100.0/25")),
    ("svc-lb-source-ranges-annotation",
     deep_merge(lb(), {"metadata": {"annotations": {
         "service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24,198.51.100.0/25"}}}),
     "load_balancer_source_ranges", ("203.0.113.0/24", "198.51.100.0/25")),
    ("svc-lb-ingress-ip", lb(status={"ingress": [{"ip": "203.0.113.10"}]}), "load_balancer_ingress",
     (LoadBalancerIngress(ip="203.0.113.10", ip_mode="VIP"),)),
    ("svc-lb-ingress-ipmode-proxy", lb(status={"ingress": [{"ip": "203.0.113.10", "ipMode": "Proxy"}]}),
     "load_balancer_ingress.0.ip_mode", "Proxy"),
    ("svc-lb-ingress-hostname", lb(status={"ingress": [{"hostname": "lb.example.com"}]}), "load_balancer_ingress",
     (LoadBalancerIngress(hostname="lb.example.com"),)),
    ("svc-lb-ingress-with-ports", lb(status={"ingress": [{"ip": "203.0.113.10", "ports": [{"port": 80, "protocol": "TCP"}]}]}),
     "load_balancer_ingress.0.ip", "203.0.113.10"),
    ("svc-lb-allocate-false", lb({"allocateLoadBalancerNodePorts": False, "ports": [{"port": 80}]}),
     "allocate_load_balancer_node_ports", False),
    ("svc-publish-not-ready", svc(spec={"publishNotReadyAddresses": True}), "publish_not_ready_addresses", True),
    ("svc-traffic-distribution", svc(spec={"trafficDistribution": "PreferClose"}), "traffic_distribution", "PreferClose"),
    ("svc-traffic-distribution-same-node", svc(spec={"trafficDistribution": "PreferSameNode"}), "traffic_distribution",
     "PreferSameNode"),
    ("svc-externalname", svc(spec={"type": "ExternalName", "externalName": "my.database.example.com",
                                   "clusterIP": None, "selector": None}), "external_name", "my.database.example.com"),
    ("svc-externalname-no-ips", svc(spec={"type": "ExternalName", "externalName": "db.example.com.", "clusterIP": None}),
     "cluster_ips", ()),
    ("svc-externalname-ignored-for-clusterip", svc(spec={"externalName": "db.example.com"}), "external_name", ""),
    ("svc-label-proxy-name", svc({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: "other-proxy"}}}),
     f"meta.labels", {LABEL_SERVICE_PROXY_NAME: "other-proxy"}),
    ("svc-label-headless", svc({"metadata": {"labels": {LABEL_HEADLESS: ""}}}), "meta.labels", {LABEL_HEADLESS: ""}),
    ("svc-annotations", svc({"metadata": {"annotations": {"a": "1"}}}), "meta.annotations", {"a": "1"}),
    ("svc-uid-rv", svc({"metadata": {"uid": "u-1", "resourceVersion": "42"}}), "meta.resource_version", "42"),
    ("svc-unknown-fields-ignored", svc({"metadata": {"managedFields": [{"manager": "kubectl"}], "creationTimestamp": "x"},
                                        "somethingNew": {"a": 1}}, spec={"futureField": True}), "name", "web"),
    ("svc-loadbalancerclass-ignored", lb({"loadBalancerClass": "example.com/lb"}), "type", "LoadBalancer"),
    # --- EndpointSlice
    ("slice-service-name", SLICE, "service_name", "web"),
    ("slice-address-type", SLICE, "address_type", "IPv4"),
    ("slice-addresses", SLICE, "endpoints.0.addresses", ("10.244.1.5",)),
    ("slice-conditions-unknown", SLICE, "endpoints.0.conditions", EndpointConditions()),
    ("slice-conditions", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "conditions": {
        "ready": False, "serving": True, "terminating": True}}]}), "endpoints.0.conditions",
     EndpointConditions(ready=False, serving=True, terminating=True)),
    ("slice-hostname", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "hostname": "web-0"}]}),
     "endpoints.0.hostname", "web-0"),
    ("slice-nodename", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-a"}]}),
     "endpoints.0.node_name", "node-a"),
    ("slice-zone", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "zone": "zone-a"}]}),
     "endpoints.0.zone", "zone-a"),
    ("slice-hints-zones", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "hints": {
        "forZones": [{"name": "zone-a"}, {"name": "zone-b"}]}}]}), "endpoints.0.hints_for_zones", ("zone-a", "zone-b")),
    ("slice-hints-nodes", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "hints": {
        "forNodes": [{"name": "node-a"}]}}]}), "endpoints.0.hints_for_nodes", ("node-a",)),
    ("slice-target-ref", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "targetRef": {
        "kind": "Pod", "name": "web-0", "namespace": "shop", "uid": "u1"}}]}), "endpoints.0.target_ref",
     ObjectReference("Pod", "shop", "web-0", "u1")),
    ("slice-ports", SLICE, "ports", (EndpointPort(8080, "TCP", ""),)),
    ("slice-port-default-protocol", deep_merge(SLICE, {"ports": [{"name": "dns", "port": 53}]}), "ports.0.protocol", "TCP"),
    ("slice-port-nil", deep_merge(SLICE, {"ports": [{"name": "all"}]}), "ports.0.port", None),
    ("slice-port-app-protocol", deep_merge(SLICE, {"ports": [{"port": 80, "appProtocol": "http"}]}),
     "ports.0.app_protocol", "http"),
    ("slice-no-ports", deep_merge(SLICE, {"ports": None}), "ports", ()),
    ("slice-no-endpoints", deep_merge(SLICE, {"endpoints": None}), "endpoints", ()),
    ("slice-ipv6", deep_merge(SLICE, {"addressType": "IPv6", "endpoints": [{"addresses": ["fd00:244::5"]}]}),
     "endpoints.0.addresses", ("fd00:244::5",)),
    ("slice-fqdn", deep_merge(SLICE, {"addressType": "FQDN", "endpoints": [{"addresses": ["db.example.com"]}]}),
     "address_type", "FQDN"),
    ("slice-managed-by-label", deep_merge(SLICE, {"metadata": {"labels": {LABEL_MANAGED_BY: "staff"}}}),
     f"meta.labels", {LABEL_SERVICE_NAME: "web", LABEL_MANAGED_BY: "staff"}),
    # --- Pod
    ("pod-no-status-runs", POD, "phase", "Running"),
    ("pod-no-status-ready", POD, "ready", True),
    ("pod-default-grace", POD, "termination_grace_period", 30),
    ("pod-containers-raw", POD, "containers", ({"name": "web", "image": "agnhost"},)),
    ("pod-ips", deep_merge(POD, {"status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:244::5"}]}}),
     "pod_ips", ("10.244.1.5", "fd00:244::5")),
    ("pod-ip-only", deep_merge(POD, {"status": {"podIP": "10.244.1.5", "phase": "Running"}}), "pod_ip", "10.244.1.5"),
    ("pod-host-ip", deep_merge(POD, {"status": {"hostIP": "192.168.200.11"}}), "host_ip", "192.168.200.11"),
    ("pod-hostname", deep_merge(POD, {"spec": {"hostname": "web-0"}}), "hostname", "web-0"),
    ("pod-subdomain", deep_merge(POD, {"spec": {"subdomain": "web-headless"}}), "subdomain", "web-headless"),
    ("pod-node-name", deep_merge(POD, {"spec": {"nodeName": "node-a"}}), "node_name", "node-a"),
    ("pod-host-network", deep_merge(POD, {"spec": {"hostNetwork": True}}), "host_network", True),
    ("pod-grace", deep_merge(POD, {"spec": {"terminationGracePeriodSeconds": 5}}), "termination_grace_period", 5),
    ("pod-phase-pending", deep_merge(POD, {"status": {"phase": "Pending"}}), "phase", "Pending"),
    ("pod-pending-not-ready", deep_merge(POD, {"status": {"phase": "Pending"}}), "ready", False),
    ("pod-ready-condition-false", deep_merge(POD, {"status": {"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}}), "ready", False),
    ("pod-ready-condition-true", deep_merge(POD, {"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True"}]}}), "ready", True),
    ("pod-container-ports", deep_merge(POD, {"spec": {"containers": [{"name": "web", "ports": [
        {"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]}}), "ports",
     (ContainerPort(8080, "TCP", "http"), ContainerPort(53, "UDP", ""))),
    # --- Node
    ("node-cluster-scoped", NODE, "meta.namespace", ""),
    ("node-zone", NODE, "zone", "zone-a"),
    ("node-addresses", deep_merge(NODE, {"status": {"addresses": [
        {"type": "InternalIP", "address": "192.168.200.11"}, {"type": "Hostname", "address": "node-a"}]}}), "addresses",
     (NodeAddress("InternalIP", "192.168.200.11"), NodeAddress("Hostname", "node-a"))),
    ("node-pod-cidrs", deep_merge(NODE, {"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]}}),
     "pod_cidrs", ("10.244.1.0/24", "fd00:244:1::/64")),
    ("node-pod-cidr-singular", deep_merge(NODE, {"spec": {"podCIDR": "10.244.1.0/24"}}), "pod_cidrs", ("10.244.1.0/24",)),
    ("node-no-taints", NODE, "taints", ()),
    ("node-taints", deep_merge(NODE, {"spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1714644000", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule", "timeAdded": "2024-05-02T10:00:00Z"}]}}),
     "taints", (Taint("ToBeDeletedByClusterAutoscaler", "1714644000", "NoSchedule"),
                Taint("node.kubernetes.io/unschedulable", "", "NoSchedule"))),
    ("node-deleting", deep_merge(NODE, {"metadata": {"deletionTimestamp": "2024-05-02T10:00:00Z"}}),
     "meta.deletion_timestamp", "2024-05-02T10:00:00Z"),
]


@pytest.mark.parametrize("manifest,path,expected", [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_field(manifest, path, expected):
    assert attr(one(manifest), path) == expected


def test_field_case_ids_unique():
    ids = [c[0] for c in FIELD_CASES] + [c[0] for c in ERROR_CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------
# Validation errors: (id, manifest, field path named, text in the message)
# ---------------------------------------------------------------------------

ERROR_CASES = [
    # metadata / names
    ("missing-name", svc({"metadata": {"name": None}}), "metadata.name", "Required value"),
    ("service-name-not-dns1035", svc({"metadata": {"name": "1web"}}), "metadata.name", "DNS-1035 label"),
    ("service-name-uppercase", svc({"metadata": {"name": "Web"}}), "metadata.name", "DNS-1035 label"),
    ("service-name-too-long", svc({"metadata": {"name": "a" * 64}}), "metadata.name", "no more than 63 characters"),
    ("namespace-not-dns1123", svc({"metadata": {"namespace": "Shop_1"}}), "metadata.namespace", "RFC 1123 label"),
    ("slice-name-not-dns1123", deep_merge(SLICE, {"metadata": {"name": "web_abc"}}), "metadata.name", "RFC 1123 subdomain"),
    ("pod-name-not-dns1123", deep_merge(POD, {"metadata": {"name": "Web-0"}}), "metadata.name", "RFC 1123 subdomain"),
    ("label-value-invalid", svc({"metadata": {"labels": {"app": "a b"}}}), "metadata.labels[app]", "a valid label"),
    ("label-value-not-string", svc({"metadata": {"labels": {"version": 1.5}}}), "metadata.labels[version]", "must be a string"),
    ("selector-key-invalid", svc(spec={"selector": {"-app": "web"}}), "spec.selector[-app]", "name part"),
    # versions
    ("slice-v1beta1", deep_merge(SLICE, {"apiVersion": "discovery.k8s.io/v1beta1"}), "apiVersion",
     'Unsupported value: "discovery.k8s.io/v1beta1": supported values: "discovery.k8s.io/v1"'),
    ("service-v2", svc({"apiVersion": "v2"}), "apiVersion", 'Unsupported value: "v2"'),
    ("service-no-apiversion", svc({"apiVersion": None}), "apiVersion", "Unsupported value: null"),
    # type
    ("unknown-type", svc(spec={"type": "Internal"}), "spec.type",
     'Unsupported value: "Internal": supported values: "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"'),
    # cluster IPs
    ("bad-clusterip", svc(spec={"clusterIP": "10.96.0.300"}), "spec.clusterIP", "must be empty, 'None', or a valid IP address"),
    ("bad-clusterip-leading-zero", svc(spec={"clusterIP": "10.96.0.020"}), "spec.clusterIP", "valid IP address"),
    ("bad-clusterips-entry", svc(spec={"clusterIP": None, "clusterIPs": ["10.96.0.20", "fd00::zz"]}), "spec.clusterIPs[1]",
     "valid IP address"),
    ("clusterips-mismatch", svc(spec={"clusterIPs": ["10.96.0.21"]}), "spec.clusterIPs[0]", "must match `clusterIP`"),
    ("clusterips-same-family", svc(spec={"clusterIPs": ["10.96.0.20", "10.96.0.21"]}), "spec.clusterIPs[1]",
     "no more than one IP for each IP family"),
    ("clusterips-three", svc(spec={"clusterIPs": ["10.96.0.20", "fd00::20", "10.96.0.22"]}), "spec.clusterIPs",
     "up to 2 values"),
    ("ipfamily-unknown", svc(spec={"ipFamilies": ["IPv5"]}), "spec.ipFamilies[0]", 'Unsupported value: "IPv5"'),
    ("ipfamily-mismatch", svc(spec={"ipFamilies": ["IPv6"]}), "spec.ipFamilies[0]", "does not match the IP family"),
    ("ipfamily-policy-unknown", svc(spec={"ipFamilyPolicy": "DualStack"}), "spec.ipFamilyPolicy", "Unsupported value"),
    ("headless-nodeport", svc(spec={"type": "NodePort", "clusterIP": "None"}), "spec.clusterIP",
     "may not be set to 'None' for NodePort services"),
    ("headless-loadbalancer", svc(spec={"type": "LoadBalancer", "clusterIP": "None"}), "spec.clusterIP",
     "may not be set to 'None' for LoadBalancer services"),
    # external IPs
    ("bad-externalip", svc(spec={"externalIPs": ["198.51.100.256"]}), "spec.externalIPs[0]", "must be a valid IP address"),
    ("externalip-loopback", svc(spec={"externalIPs": ["198.51.100.1", "127.0.0.1"]}), "spec.externalIPs[1]",
     "may not be in the loopback range"),
    ("externalip-unspecified", svc(spec={"externalIPs": ["0.0.0.0"]}), "spec.externalIPs[0]", "may not be unspecified"),
    ("externalip-link-local", svc(spec={"externalIPs": ["169.254.1.1"]}), "spec.externalIPs[0]", "link-local range"),
    ("externalip-zone", svc(spec={"externalIPs": ["fe80::1%eth0"]}), "spec.externalIPs[0]", "must be a valid IP address"),
    # ports
    ("ports-required", svc(spec={"ports": None}), "spec.ports", "Required value"),
    ("port-zero", svc(spec={"ports": [{"port": 0}]}), "spec.ports[0].port", "must be between 1 and 65535, inclusive"),
    ("port-too-big", svc(spec={"ports": [{"port": 65536}]}), "spec.ports[0].port", "Invalid value: 65536"),
    ("port-missing", svc(spec={"ports": [{"name": "x"}]}), "spec.ports[0].port", "Required value"),
    ("port-not-integer", svc(spec={"ports": [{"port": "eighty"}]}), "spec.ports[0].port", "must be an integer"),
    ("targetport-too-big", svc(spec={"ports": [{"port": 80, "targetPort": 70000}]}), "spec.ports[0].targetPort",
     "between 1 and 65535"),
    ("targetport-bad-name", svc(spec={"ports": [{"port": 80, "targetPort": "Http_Port"}]}), "spec.ports[0].targetPort",
     "alpha-numeric"),
    ("targetport-digits-string", svc(spec={"ports": [{"port": 80, "targetPort": "8080"}]}), "spec.ports[0].targetPort",
     "at least one letter"),
    ("targetport-name-too-long", svc(spec={"ports": [{"port": 80, "targetPort": "a-very-long-port-name"}]}),
     "spec.ports[0].targetPort", "no more than 15 characters"),
    ("port-name-missing-multiport", svc(spec={"ports": [{"name": "http", "port": 80}, {"port": 443}]}),
     "spec.ports[1].name", "Required value"),
    ("port-name-duplicate", svc(spec={"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 8080}]}),
     "spec.ports[1].name", 'Duplicate value: "http"'),
    ("port-name-invalid", svc(spec={"ports": [{"name": "HTTP", "port": 80}]}), "spec.ports[0].name", "RFC 1123 label"),
    ("port-protocol-duplicate", svc(spec={"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
     "spec.ports[1]", 'Duplicate value: "80/TCP"'),
    ("unknown-protocol", svc(spec={"ports": [{"port": 80, "protocol": "ICMP"}]}), "spec.ports[0].protocol",
     'Unsupported value: "ICMP": supported values: "TCP", "UDP", "SCTP"'),
    ("protocol-lowercase", svc(spec={"ports": [{"port": 80, "protocol": "tcp"}]}), "spec.ports[0].protocol",
     'Unsupported value: "tcp"'),
    ("app-protocol-invalid", svc(spec={"ports": [{"port": 80, "appProtocol": "h 2"}]}), "spec.ports[0].appProtocol",
     "name part"),
    # node ports
    ("nodeport-on-clusterip", svc(spec={"ports": [{"port": 80, "nodePort": 30080}]}), "spec.ports[0].nodePort",
     "Forbidden: may not be used when `type` is 'ClusterIP'"),
    ("nodeport-on-externalname", svc(spec={"type": "ExternalName", "externalName": "a.example.com", "clusterIP": None,
                                           "ports": [{"port": 80, "nodePort": 30080}]}), "spec.ports[0].nodePort",
     "may not be used when `type` is 'ExternalName'"),
    ("nodeport-out-of-range", svc(spec={"type": "NodePort", "ports": [{"port": 80, "nodePort": 70000}]}),
     "spec.ports[0].nodePort", "Invalid value: 70000: must be between 1 and 65535, inclusive"),
    ("nodeport-duplicate", svc(spec={"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                                                                    {"name": "b", "port": 81, "nodePort": 30080}]}),
     "spec.ports[1].nodePort", "Duplicate value: 30080"),
    # ExternalName
    ("externalname-missing", svc(spec={"type": "ExternalName", "clusterIP": None}), "spec.externalName", "Required value"),
    ("externalname-invalid", svc(spec={"type": "ExternalName", "clusterIP": None, "externalName": "my_db.example.com"}),
     "spec.externalName", "RFC 1123 subdomain"),
    ("externalname-with-clusterip", svc(spec={"type": "ExternalName", "externalName": "db.example.com"}),
     "spec.clusterIP", "Forbidden: may not be set for ExternalName services"),
    # session affinity
    ("bad-session-affinity", svc(spec={"sessionAffinity": "Sticky"}), "spec.sessionAffinity",
     'Unsupported value: "Sticky": supported values: "ClientIP", "None"'),
    ("affinity-timeout-zero", svc(spec={"sessionAffinity": "ClientIP",
                                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "must be greater than 0 and at most 86400"),
    ("affinity-timeout-too-big", svc(spec={"sessionAffinity": "ClientIP",
                                           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "Invalid value: 86401"),
    ("affinity-config-with-none", svc(spec={"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
     "spec.sessionAffinityConfig", "must not be set when session affinity is None"),
    # traffic policies
    ("bad-etp", lb({"externalTrafficPolicy": "Everywhere"}), "spec.externalTrafficPolicy",
     'Unsupported value: "Everywhere": supported values: "Cluster", "Local"'),
    ("etp-on-clusterip", svc(spec={"externalTrafficPolicy": "Local"}), "spec.externalTrafficPolicy",
     "may only be set for externally-accessible services"),
    ("bad-itp", svc(spec={"internalTrafficPolicy": "Node"}), "spec.internalTrafficPolicy", 'Unsupported value: "Node"'),
    ("hcnp-on-nodeport", svc(spec={"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}),
     "spec.healthCheckNodePort",
     "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"),
    ("hcnp-on-lb-cluster", lb({"healthCheckNodePort": 32000}), "spec.healthCheckNodePort", "may only be set when"),
    ("hcnp-out-of-range", lb({"externalTrafficPolicy": "Local", "healthCheckNodePort": 70000}), "spec.healthCheckNodePort",
     "between 1 and 65535"),
    ("bad-traffic-distribution", svc(spec={"trafficDistribution": "Nearest"}), "spec.trafficDistribution",
     'Unsupported value: "Nearest"'),
    # load balancer
    ("bad-source-range", lb({"loadBalancerSourceRanges": ["10.0.0.0/33"]}), "spec.loadBalancerSourceRanges[0]",
     "must be a list of IP ranges"),
    ("source-range-not-cidr", lb({"loadBalancerSourceRanges": ["203.0.113.0/24", "203.0.113.7"]}),
     "spec.loadBalancerSourceRanges[1]", 'Invalid value: "203.0.113.7"'),
    ("source-range-on-clusterip", svc(spec={"loadBalancerSourceRanges": ["10.0.0.0/8"]}), "spec.loadBalancerSourceRanges",
     "may only be used when `type` is 'LoadBalancer'"),
    ("source-range-annotation-bad",
     deep_merge(lb(), {"metadata": {"annotations": {"service.beta.kubernetes.io/load-balancer-source-ranges": "x/8"}}}),
     "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]", "must be a list of IP ranges"),
    ("allocate-nodeports-on-clusterip", svc(spec={"allocateLoadBalancerNodePorts": False}),
     "spec.allocateLoadBalancerNodePorts", "may only be used when `type` is 'LoadBalancer'"),
    ("bad-loadbalancerip", lb({"loadBalancerIP": "203.0.113.x"}), "spec.loadBalancerIP", "valid IP address"),
    ("bad-lb-ingress-ip", lb(status={"ingress": [{"ip": "203.0.113.999"}]}), "status.loadBalancer.ingress[0].ip",
     "must be a valid IP address"),
    ("lb-ingress-hostname-ip", lb(status={"ingress": [{"hostname": "203.0.113.9"}]}),
     "status.loadBalancer.ingress[0].hostname", "must be a DNS name, not an IP address"),
    ("lb-ipmode-without-ip", lb(status={"ingress": [{"hostname": "lb.example.com", "ipMode": "VIP"}]}),
     "status.loadBalancer.ingress[0].ipMode", "may not be specified when `ip` is not set"),
    ("lb-bad-ipmode", lb(status={"ingress": [{"ip": "203.0.113.9", "ipMode": "Direct"}]}),
     "status.loadBalancer.ingress[0].ipMode", 'Unsupported value: "Direct": supported values: "Proxy", "VIP"'),
    # wrong shapes
    ("spec-not-mapping", svc({"spec": ["ports"]}), "spec", "must be an object"),
    ("ports-not-list", svc(spec={"ports": {"port": 80}}), "spec.ports", "must be a list"),
    ("publish-not-ready-not-bool", svc(spec={"publishNotReadyAddresses": "yes please"}), "spec.publishNotReadyAddresses",
     "must be true or false"),
    # EndpointSlice
    ("slice-no-service-name", deep_merge(SLICE, {"metadata": {"labels": None}}),
     "metadata.labels[kubernetes.io/service-name]", "kube-proxy ignores an EndpointSlice without this label"),
    ("slice-bad-address-type", deep_merge(SLICE, {"addressType": "IPX"}), "addressType",
     'Unsupported value: "IPX": supported values: "FQDN", "IPv4", "IPv6"'),
    ("slice-missing-address-type", deep_merge(SLICE, {"addressType": None}), "addressType", "Required value"),
    ("slice-bad-address", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.500"]}]}), "endpoints[0].addresses[0]",
     "must be a valid IPv4 address"),
    ("slice-address-family-mismatch", deep_merge(SLICE, {"endpoints": [{"addresses": ["fd00:244::5"]}]}),
     "endpoints[0].addresses[0]", "must be a valid IPv4 address (this is an IPv6 address)"),
    ("slice-ipv4-in-ipv6", deep_merge(SLICE, {"addressType": "IPv6", "endpoints": [{"addresses": ["10.244.1.5"]}]}),
     "endpoints[0].addresses[0]", "must be a valid IPv6 address"),
    ("slice-address-loopback", deep_merge(SLICE, {"endpoints": [{"addresses": ["127.0.0.1"]}]}), "endpoints[0].addresses[0]",
     "loopback"),
    ("slice-fqdn-bad", deep_merge(SLICE, {"addressType": "FQDN", "endpoints": [{"addresses": ["db"]}]}),
     "endpoints[0].addresses[0]", "at least two segments"),
    ("slice-endpoint-no-addresses", deep_merge(SLICE, {"endpoints": [{"addresses": []}]}), "endpoints[0].addresses",
     "must contain at least 1 address"),
    ("slice-bad-hostname", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "hostname": "web.0"}]}),
     "endpoints[0].hostname", "RFC 1123 label"),
    ("slice-bad-condition", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": "yes"}}]}),
     "endpoints[0].conditions.ready", "must be true or false"),
    ("slice-port-out-of-range", deep_merge(SLICE, {"ports": [{"port": 0}]}), "ports[0].port", "between 1 and 65535"),
    ("slice-port-duplicate-name", deep_merge(SLICE, {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
     "ports[1].name", 'Duplicate value: "a"'),
    ("slice-port-bad-protocol", deep_merge(SLICE, {"ports": [{"port": 80, "protocol": "QUIC"}]}), "ports[0].protocol",
     "Unsupported value"),
    ("slice-hint-no-name", deep_merge(SLICE, {"endpoints": [{"addresses": ["10.244.1.5"], "hints": {"forZones": [{}]}}]}),
     "endpoints[0].hints.forZones[0].name", "Required value"),
    # core/v1 Endpoints
    ("endpoints-bad-ip", deep_merge(ENDPOINTS, {"subsets": [{"addresses": [{"ip": "10.244.1.x"}], "ports": [{"port": 9000}]}]}),
     "subsets[0].addresses[0].ip", "valid IP address"),
    ("endpoints-not-ready-bad-ip", deep_merge(ENDPOINTS, {"subsets": [{"notReadyAddresses": [{"ip": "::1"}],
                                                                        "ports": [{"port": 9000}]}]}),
     "subsets[0].notReadyAddresses[0].ip", "loopback"),
    ("endpoints-empty-subset", deep_merge(ENDPOINTS, {"subsets": [{"ports": [{"port": 9000}]}]}), "subsets[0]",
     "must specify `addresses` or `notReadyAddresses`"),
    ("endpoints-port-range", deep_merge(ENDPOINTS, {"subsets": [{"addresses": [{"ip": "10.244.1.30"}],
                                                                  "ports": [{"port": 90000}]}]}),
     "subsets[0].ports[0].port", "between 1 and 65535"),
    ("endpoints-port-name-missing", deep_merge(ENDPOINTS, {"subsets": [{"addresses": [{"ip": "10.244.1.30"}],
                                                                         "ports": [{"name": "a", "port": 1}, {"port": 2}]}]}),
     "subsets[0].ports[1].name", "Required value"),
    # Pod
    ("pod-bad-ip", deep_merge(POD, {"status": {"podIP": "10.244.1.500"}}), "status.podIP", "valid IP address"),
    ("pod-bad-ips", deep_merge(POD, {"status": {"podIPs": [{"ip": "nope"}]}}), "status.podIPs[0].ip", "valid IP address"),
    ("pod-ip-mismatch", deep_merge(POD, {"status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.6"}]}}),
     "status.podIP", "must be the same as `podIPs[0].ip`"),
    ("pod-container-port-zero", deep_merge(POD, {"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 0}]}]}}),
     "spec.containers[0].ports[0].containerPort", "between 1 and 65535"),
    ("pod-container-port-bad-name", deep_merge(POD, {"spec": {"containers": [{"name": "c", "ports": [
        {"containerPort": 80, "name": "a-very-long-port-name"}]}]}}), "spec.containers[0].ports[0].name", "no more than 15"),
    ("pod-bad-hostname", deep_merge(POD, {"spec": {"hostname": "Web_0"}}), "spec.hostname", "RFC 1123 label"),
    ("pod-bad-subdomain", deep_merge(POD, {"spec": {"subdomain": "a.b"}}), "spec.subdomain", "RFC 1123 label"),
    ("pod-negative-grace", deep_merge(POD, {"spec": {"terminationGracePeriodSeconds": -1}}),
     "spec.terminationGracePeriodSeconds", "greater than or equal to 0"),
    # Node
    ("node-bad-pod-cidr", deep_merge(NODE, {"spec": {"podCIDRs": ["10.244.1.0/33"]}}), "spec.podCIDRs[0]", "valid CIDR"),
    ("node-bad-internal-ip", deep_merge(NODE, {"status": {"addresses": [{"type": "InternalIP", "address": "node-a"}]}}),
     "status.addresses[0].address", "valid IP address"),
    ("node-taint-no-key", deep_merge(NODE, {"spec": {"taints": [{"effect": "NoSchedule"}]}}), "spec.taints[0].key",
     "Required value"),
    ("node-taint-bad-effect", deep_merge(NODE, {"spec": {"taints": [{"key": "a", "effect": "NoRun"}]}}),
     "spec.taints[0].effect", 'Unsupported value: "NoRun": supported values: "NoSchedule", "PreferNoSchedule", "NoExecute"'),
    ("node-taint-bad-key", deep_merge(NODE, {"spec": {"taints": [{"key": "-a", "effect": "NoSchedule"}]}}),
     "spec.taints[0].key", "name part"),
    ("node-bad-address-type", deep_merge(NODE, {"status": {"addresses": [{"type": "PublicIP", "address": "203.0.113.1"}]}}),
     "status.addresses[0].type", 'Unsupported value: "PublicIP"'),
]


@pytest.mark.parametrize("manifest,field,text", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_validation_error(manifest, field, text):
    with pytest.raises(ObjectError) as ei:
        parse_objects(manifest, ORIGIN)
    err = ei.value
    fields = [c.path for c in err.causes]
    assert field in fields, f"{field} not among {fields}: {err}"
    cause = next(c for c in err.causes if c.path == field and text in c.detail) if any(
        c.path == field and text in c.detail for c in err.causes) else None
    assert cause is not None, f"{text!r} not in the {field} error: {err}"
    md = manifest.get("metadata") or {}
    s = str(err)
    assert s.startswith("test.yaml:1: "), s
    kind = manifest["kind"]
    assert s.startswith(f"test.yaml:1: {kind} "), s
    if md.get("name"):
        assert f"/{md['name']}: " in s or f"{kind} {md['name']}: " in s, s
    assert f"{field}: " in s


def test_one_error_lists_every_problem():
    d = svc({"metadata": {"name": "Bad"}}, spec={"ports": [{"port": 0, "protocol": "ICMP"}], "sessionAffinity": "x"})
    with pytest.raises(ObjectError) as ei:
        one(d)
    assert [c.path for c in ei.value.causes] == [
        "metadata.name", "spec.ports[0].port", "spec.ports[0].protocol", "spec.sessionAffinity"]
    assert ei.value.field == "metadata.name"
    assert ei.value.key == ("Service", "shop", "Bad")


# ---------------------------------------------------------------------------
# core/v1 Endpoints -> EndpointSlices (the mirroring controller's conversion)
# ---------------------------------------------------------------------------

ENDPOINTS_FULL = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": {
        "name": "legacy", "namespace": "shop", "labels": {"team": "db"},
        "annotations": {"note": "kept", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                        "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-02T09:30:00Z"},
    },
    "subsets": [
        {
            "addresses": [
                {"ip": "10.244.1.30", "hostname": "db-0", "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "name": "db-0", "namespace": "shop", "uid": "u0"}},
                {"ip": "fd00:244::30", "nodeName": "node-a"},
            ],
            "notReadyAddresses": [{"ip": "10.244.2.30", "nodeName": "node-b"}],
            "ports": [{"name": "pg", "port": 5432}, {"name": "metrics", "port": 9187, "protocol": "TCP",
                                                     "appProtocol": "http"}],
        },
        {"addresses": [{"ip": "10.244.3.30"}], "ports": [{"name": "pg", "port": 6432}]},
    ],
}


def test_endpoints_mirrored_into_slices():
    slices = parse_objects(ENDPOINTS_FULL, ORIGIN)
    assert [(s.name, s.address_type) for s in slices] == [
        ("legacy-0", "IPv4"), ("legacy-1", "IPv6"), ("legacy-2", "IPv4")]
    v4 = slices[0]
    assert v4.service_name == "legacy"
    assert v4.meta.labels == {"team": "db", LABEL_SERVICE_NAME: "legacy", LABEL_MANAGED_BY: MIRRORING_MANAGED_BY}
    assert v4.meta.annotations == {"note": "kept"}
    assert v4.ports == (EndpointPort(5432, "TCP", "pg"), EndpointPort(9187, "TCP", "metrics", "http"))
    ready, not_ready = v4.endpoints
    assert ready.addresses == ("10.244.1.30",)
    assert ready.conditions == EndpointConditions(ready=True, serving=True)
    assert (ready.hostname, ready.node_name) == ("db-0", "node-a")
    assert ready.target_ref == ObjectReference("Pod", "shop", "db-0", "u0")
    assert not_ready.addresses == ("10.244.2.30",)
    assert not_ready.conditions == EndpointConditions(ready=False, serving=False)
    assert not not_ready.conditions.is_ready and not not_ready.conditions.is_serving
    assert slices[1].endpoints[0].addresses == ("fd00:244::30",)
    assert slices[2].ports == (EndpointPort(6432, "TCP", "pg"),)
    assert {source_key(s) for s in slices} == {("Endpoints", "shop", "legacy")}


def test_endpoints_ipv6_restringified():
    d = deep_merge(ENDPOINTS, {"subsets": [{"addresses": [{"ip": "FD00:0244:0000::0030"}], "ports": [{"port": 1}]}]})
    (s,) = parse_objects(d, ORIGIN)
    assert s.endpoints[0].addresses == ("fd00:244::30",)


def test_endpoints_skip_mirror_label():
    d = deep_merge(ENDPOINTS, {"metadata": {"labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}}})
    assert parse_objects(d, ORIGIN) == []


def test_endpoints_without_subsets_is_no_slice():
    assert parse_objects(deep_merge(ENDPOINTS, {"subsets": None}), ORIGIN) == []


def test_parse_object_single_endpoints():
    s = parse_object(ENDPOINTS, ORIGIN)
    assert isinstance(s, EndpointSlice) and s.name == "legacy-0"


# ---------------------------------------------------------------------------
# Streams: documents, Lists, JSON, unknown kinds, lines
# ---------------------------------------------------------------------------


def test_multi_document_yaml_with_lines():
    text = """\
# leading comment
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
---
apiVersion: v1
kind: Service
metadata:
  name: b
spec:
  clusterIP: 10.96.0.2
  ports:
  - port: 80
  - port: 81
"""
    r = parse_documents(text, "multi.yaml")
    assert [o.name for o in r.objects] == ["a"]
    assert r.objects[0].meta.origin == Origin("multi.yaml", 2)
    (err,) = r.errors
    # The document starts on line 8; the offending name is missing on port 0 (line 15).
    assert str(err).startswith("multi.yaml:8: Service default/b: spec.ports[0].name: Required value")
    assert "(line 15)" in str(err)
    assert err.causes[0].line == 15 and err.causes[1].path == "spec.ports[1].name" and err.causes[1].line == 16


def test_field_line_for_nested_value():
    text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n" \
           "    nodePort: 70000\n"
    (err,) = parse_documents(text, "np.yaml").errors
    assert str(err) == ("np.yaml:1: Service default/web: spec.ports[0].nodePort: Invalid value: 70000: "
                        "must be between 1 and 65535, inclusive (line 9)")


LIST_TEXT = """\
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: x}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: a}
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: x}
  spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
"""


def test_kind_list():
    r = parse_documents(LIST_TEXT, "list.yaml")
    assert [(type(o).__name__, o.name, o.meta.origin.line) for o in r.objects] == [("Service", "a", 6)]
    (err,) = r.errors
    assert str(err).startswith("list.yaml:13: Service x/b: spec.clusterIP: Invalid value: \"10.96.0.300\"")


def test_typed_list_items_inherit_kind():
    doc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {"resourceVersion": "7"},
           "items": [{k: v for k, v in SLICE.items() if k not in ("apiVersion", "kind")}]}
    r = parse_documents(json.dumps(doc), "slices.json")
    assert not r.errors
    assert [o.name for o in r.objects] == ["web-abc12"]


def test_service_list_from_rest_api():
    doc = {"apiVersion": "v1", "kind": "ServiceList", "items": [{"metadata": SVC["metadata"], "spec": SVC["spec"]}]}
    r = parse_documents(json.dumps(doc, indent=2), "svcs.json")
    assert [o.name for o in r.objects] == ["web"] and not r.errors
    assert r.objects[0].meta.origin.line == 5  # the item's "{" line in the JSON text


def test_foreign_list_ignored():
    doc = {"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [{"metadata": {"name": "x"}}]}
    r = parse_documents(json.dumps(doc), "d.json")
    assert r.objects == [] and r.errors == []


def test_json_object_and_tab_indented_json():
    text = json.dumps(SVC, indent="\t")
    r = parse_documents(text, "svc.json")
    assert [o.name for o in r.objects] == ["web"] and r.errors == []


def test_concatenated_json_values():
    text = json.dumps(SVC, indent="\t") + "\n" + json.dumps(NODE, indent="\t")
    r = parse_documents(text, "two.json")
    assert [type(o).__name__ for o in r.objects] == ["Service", "Node"] and r.errors == []


@pytest.mark.parametrize("text,where", [
    ("apiVersion: v1\nkind: Service\nmetadata: {name: a\n", "bad.yaml:"),
    ("apiVersion: v1\nkind: Service\n  metadata: x\n bad", "bad.yaml:"),
    ('{"apiVersion": "v1",\n\t"kind": "Service"', "bad.yaml:2"),
], ids=["unclosed-flow", "bad-indent", "json-unclosed"])
def test_broken_file_is_one_error_and_no_objects(text, where):
    r = parse_documents(text, "bad.yaml")
    assert r.objects == []
    (err,) = r.errors
    assert err.file_level and err.key is None
    assert str(err).startswith(where)
    assert "cannot parse" in str(err) and "column" in str(err)


IGNORED_DOCS = [
    ("deployment", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}),
    ("configmap", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}),
    ("knative-service", {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "hello"}}),
    ("not-a-k8s-object", {"nodes": [{"name": "node-a"}], "pods": 3}),
    ("empty-document", None),
]


@pytest.mark.parametrize("doc", [d for _, d in IGNORED_DOCS], ids=[i for i, _ in IGNORED_DOCS])
def test_unknown_kinds_ignored_silently(doc):
    import yaml

    r = parse_documents(yaml.safe_dump(doc) + "---\n" + yaml.safe_dump(SVC), "mixed.yaml")
    assert [o.name for o in r.objects] == ["web"] and r.errors == []


@pytest.mark.parametrize("text,msg", [
    ("- a\n- b\n", "document is not a Kubernetes object"),
    ("just a string\n", "document is not a Kubernetes object"),
    ("apiVersion: v1\nmetadata: {name: x}\n", "kind: Required value"),
], ids=["list-document", "scalar-document", "missing-kind"])
def test_non_object_documents_are_errors(text, msg):
    r = parse_documents(text, "odd.yaml")
    (err,) = r.errors
    assert msg in str(err) and str(err).startswith("odd.yaml:1: ")


def test_duplicate_in_one_stream_first_wins():
    import yaml

    second = deep_merge(SVC, {"spec": {"clusterIP": "10.96.0.99"}})
    r = parse_documents(yaml.safe_dump(SVC) + "---\n" + yaml.safe_dump(second), "dup.yaml")
    assert [o.cluster_ip for o in r.objects] == ["10.96.0.20"]
    (err,) = r.errors
    assert "Service shop/web" in str(err) and "already defined at dup.yaml:1" in str(err)
    assert err.key == ("Service", "shop", "web")


def test_parse_object_rejects_unknown_kind():
    with pytest.raises(ObjectError, match="not a kind kubelab reads"):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}, ORIGIN)


def test_models_compare_equal_regardless_of_origin():
    a = parse_object(SVC, Origin("a.yaml", 1))
    b = parse_object(SVC, Origin("b.yaml", 40))
    assert a == b and a.meta.origin != b.meta.origin


def test_error_pickles_and_compares():
    import pickle

    with pytest.raises(ObjectError) as ei:
        one(svc(spec={"type": "Bogus"}))
    again = pickle.loads(pickle.dumps(ei.value))
    assert again == ei.value and str(again) == str(ei.value)


def test_types_returned():
    objs = [one(SVC), one(SLICE), one(POD), one(NODE)]
    assert [type(o) for o in objs] == [Service, EndpointSlice, Pod, Node]
