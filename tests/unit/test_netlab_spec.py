"""Lab files: settings, validation before anything is created, allocation, the endpoints controller.

Addresses: pod CIDR 10.244.0.0/16 (and 10.250.0.0/16, 10.96.0.0/16 in
overlap cases), service CIDR 10.96.0.0/12, underlay 172.18.0.0/24 and
10.0.0.0/8; nothing is sent anywhere.
"""

from __future__ import annotations

import textwrap

import pytest

from kubelab.model import ContainerPort, EndpointConditions, Node, ObjectMeta, Pod, Service, ServicePortSpec
from kubelab.netlab.endpoints import MAX_ENDPOINTS_PER_SLICE, endpoint_slices, service_endpoint_slices, slice_to_manifest
from kubelab.netlab.spec import LabSpec, LabSpecError

GOOD = """\
lab:
  name: good
  nodes: [node1, node2]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
"""


def write(tmp_path, text, name="lab.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_lab_allocates_and_spreads(tmp_path):
    spec = LabSpec.from_file(write(tmp_path, GOOD))
    cluster = spec.build_cluster()
    snap = cluster.snapshot()
    assert sorted(snap["pods"]) == ["default/web-1", "default/web-2", "default/web-3"]
    nodes = [snap["pods"][f"default/web-{i}"]["node"] for i in (1, 2, 3)]
    assert nodes == ["node1", "node2", "node1"]
    assert snap["pods"]["default/web-1"]["ip"] == "10.244.0.2"
    assert snap["pods"]["default/web-2"]["ip"] == "10.244.1.2"
    assert snap["services"]["default/web"]["clusterIP"] == "10.96.0.2"
    assert snap["nodes"]["node2"] == {"ip": "172.18.0.11", "podCIDR": "10.244.1.0/24", "labels": {"kubernetes.io/hostname": "node2"}}


BAD = [
    pytest.param(
        "lab: {name: x, podCIDR: 10.96.0.0/16}\n",
        ["lab.serviceCIDR", "overlaps podCIDR 10.96.0.0/16"],
        id="overlapping-pod-and-service-cidr",
    ),
    pytest.param(
        "lab: {name: x, underlayCIDR: 10.0.0.0/8}\n",
        ["lab.underlayCIDR", "overlaps"],
        id="underlay-overlaps",
    ),
    pytest.param(
        "lab: {name: x, nodes: [a, b]}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {nodeName: c}\n",
        ["lab.yaml:3", "Pod default/p", "spec.nodeName 'c' is not a lab node", "a, b"],
        id="pod-on-unknown-node",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\n",
        ["lab.yaml:7", "Pod default/p: duplicate name", "lab.yaml:3"],
        id="duplicate-pod",
    ),
    pytest.param(
        "lab: {name: x, nodes: [a, a]}\n",
        ["lab.nodes[1].name", "duplicate node name 'a'"],
        id="duplicate-node",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n"
        "---\nkind: Service\napiVersion: v1\nmetadata: {name: t}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n",
        ["lab.yaml:8", "Service default/t", "spec.clusterIP 10.96.0.5 is already allocated"],
        id="duplicate-cluster-ip",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: s}\nspec:\n  ports: [{port: 80\n",
        ["lab.yaml:", "malformed YAML"],
        id="malformed-yaml",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}\n",
        ["lab.yaml:3", "Service default/s", "port"],
        id="malformed-service-port",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: n}\n",
        ["lab.yaml:3", "kind 'Node' is not supported", "lab: nodes:"],
        id="node-manifest",
    ),
    pytest.param(
        "lab: {name: x}\n---\n- just\n- a list\n",
        ["lab.yaml:3", "not a Kubernetes object"],
        id="not-an-object",
    ),
    pytest.param(
        "lab: {name: x, proxyMode: nft, colour: blue}\n",
        ["lab.proxyMode: 'nft' is not one of", "lab.colour: unknown setting"],
        id="bad-settings-all-listed",
    ),
    pytest.param(
        "lab: {name: x, nodes: 3, podCIDR: 10.244.0.0/23}\n",
        ["lab.podCIDR", "fewer than 3 nodes"],
        id="pod-cidr-too-small",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 80}]}\n",
        ["Service default/s", "spec.ports[0].nodePort 80 is outside nodePortRange 30000-32767"],
        id="node-port-out-of-range",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\nstatus: {podIP: 10.245.0.9}\n",
        ["Pod default/p", "status.podIP 10.245.0.9 is not a usable address of node node1's pod CIDR 10.244.0.0/24"],
        id="pod-ip-outside-node-cidr",
    ),
    pytest.param(
        "lab: {name: x}\n---\nkind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\n"
        "spec: {replicas: 1, selector: {matchLabels: {app: a}}, template: {metadata: {labels: {app: b}}, spec: {}}}\n",
        ["Deployment default/d", "spec.selector.matchLabels"],
        id="deployment-selector-mismatch",
    ),
    pytest.param(
        "lab: {name: Bad_Name}\n",
        ["lab.name", "not a valid lab name"],
        id="bad-lab-name",
    ),
]


@pytest.mark.parametrize("text,expected", BAD)
def test_bad_lab_files_are_rejected_with_every_problem_named(tmp_path, text, expected):
    with pytest.raises(LabSpecError) as info:
        LabSpec.from_file(write(tmp_path, text))
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_several_problems_are_all_reported(tmp_path):
    text = (
        "lab: {name: x, nodes: [a]}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {nodeName: z}\n"
        "---\nkind: Pod\napiVersion: v1\nmetadata: {name: q}\nspec: {nodeName: y}\n"
    )
    with pytest.raises(LabSpecError) as info:
        LabSpec.from_file(write(tmp_path, text))
    assert len(info.value.problems) == 2


def test_extra_manifest_files_and_overrides(tmp_path):
    write(tmp_path, "kind: Service\napiVersion: v1\nmetadata: {name: extra}\nspec: {ports: [{port: 81}]}\n", "more.yaml")
    lab = write(tmp_path, "lab: {name: x, manifests: [more.yaml]}\n")
    spec = LabSpec.from_file(lab, name="renamed", proxyMode="iptables")
    assert spec.name == "renamed" and spec.settings.proxy_mode == "iptables"
    assert "default/extra" in spec.build_cluster().snapshot()["services"]


def test_apply_is_all_or_nothing_and_keeps_allocations(tmp_path):
    from kubelab.netlab.spec import Document
    from kubelab.model import Origin

    cluster = LabSpec.from_file(write(tmp_path, GOOD)).build_cluster()
    before = cluster.snapshot()
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"nodeName": "nope"}}
    with pytest.raises(LabSpecError):
        cluster.apply_documents([Document(svc, Origin("a", 1)), Document(bad, Origin("a", 2))])
    assert cluster.snapshot() == before
    cluster.apply_documents([Document(svc, Origin("a", 1))])
    assert cluster.snapshot()["services"]["default/web"]["clusterIP"] == before["services"]["default/web"]["clusterIP"]
    svc2 = dict(svc, spec=dict(svc["spec"], clusterIP="10.96.0.99"))
    with pytest.raises(LabSpecError, match="spec.clusterIP is immutable"):
        cluster.apply_documents([Document(svc2, Origin("a", 1))])


def test_node_ports_allocated_and_kept(tmp_path):
    from kubelab.netlab.spec import Document
    from kubelab.model import Origin

    cluster = LabSpec.from_file(write(tmp_path, "lab: {name: x, nodePortRange: 30000-30001}\n")).build_cluster()
    mk = lambda n: {"apiVersion": "v1", "kind": "Service", "metadata": {"name": n},
                    "spec": {"type": "NodePort", "ports": [{"port": 80}]}}
    cluster.apply_documents([Document(mk("a"), Origin("f", 1)), Document(mk("b"), Origin("f", 2))])
    ports = {k: v["ports"][0]["nodePort"] for k, v in cluster.snapshot()["services"].items()}
    assert ports == {"default/a": 30000, "default/b": 30001}
    cluster.apply_documents([Document(mk("a"), Origin("f", 1))])  # re-apply keeps it
    assert cluster.snapshot()["services"]["default/a"]["ports"][0]["nodePort"] == 30000
    with pytest.raises(LabSpecError, match="no free node port in 30000-30001"):
        cluster.apply_documents([Document(mk("c"), Origin("f", 3))])


def test_pod_delete_marks_terminating_then_remove(tmp_path):
    cluster = LabSpec.from_file(write(tmp_path, GOOD)).build_cluster()
    assert cluster.delete("Pod", "default", "web-2", grace=7) == 7
    slices = [s for s in cluster.slices() if s.service_name == "web"]
    by_pod = {ep.target_ref.name: ep.conditions for s in slices for ep in s.endpoints}
    assert by_pod["web-2"] == EndpointConditions(ready=False, serving=True, terminating=True)
    assert by_pod["web-1"] == EndpointConditions(ready=True, serving=True, terminating=False)
    cluster.remove_pod("default", "web-2")
    assert {ep.target_ref.name for s in cluster.slices() if s.service_name == "web" for ep in s.endpoints} == {"web-1", "web-3"}


# --------------------------------------------------------------------------
# endpoints controller
# --------------------------------------------------------------------------


def pod(name, ip, *, labels=None, ready=True, terminating=False, node="n1", ports=(), phase="Running", hostname="", subdomain=""):
    meta = ObjectMeta(name=name, labels=labels if labels is not None else {"app": "a"}, uid=f"uid-{name}",
                      deletion_timestamp="2024-01-01T00:00:00Z" if terminating else None)
    return Pod(meta=meta, node_name=node, pod_ips=(ip,) if ip else (), ready=ready, ports=tuple(ports), phase=phase,
               hostname=hostname, subdomain=subdomain)


def svc(name="s", *, selector={"app": "a"}, ports=(ServicePortSpec(80, "TCP", "http", 8080),), pnra=False, type_="ClusterIP"):
    return Service(meta=ObjectMeta(name=name), selector=selector, ports=tuple(ports), cluster_ips=("10.96.0.5",),
                   publish_not_ready_addresses=pnra, type=type_)


NODES = {"n1": Node(meta=ObjectMeta(name="n1", namespace="", labels={"topology.kubernetes.io/zone": "z1"}))}

CONDITIONS = [
    pytest.param(dict(), False, (True, True, False), id="ready"),
    pytest.param(dict(ready=False), False, (False, False, False), id="not-ready"),
    pytest.param(dict(terminating=True), False, (False, True, True), id="terminating-serving"),
    pytest.param(dict(terminating=True, ready=False), False, (False, False, True), id="terminating-not-serving"),
    pytest.param(dict(ready=False), True, (True, False, False), id="not-ready-published"),
    pytest.param(dict(terminating=True), True, (True, True, True), id="terminating-published"),
]


@pytest.mark.parametrize("kw,pnra,expected", CONDITIONS)
def test_endpoint_conditions_follow_kube_controller_manager(kw, pnra, expected):
    [sl] = service_endpoint_slices(svc(pnra=pnra), [pod("p", "10.244.0.2", **kw)], NODES)
    c = sl.endpoints[0].conditions
    assert (c.ready, c.serving, c.terminating) == expected


def test_endpoint_fields_and_manifest():
    p = pod("p", "10.244.0.2", hostname="h", subdomain="s", ports=[ContainerPort(8080, "TCP", "http")])
    [sl] = service_endpoint_slices(svc(ports=(ServicePortSpec(80, "TCP", "http", "http"),)), [p], NODES)
    ep = sl.endpoints[0]
    assert (ep.hostname, ep.node_name, ep.zone, ep.target_ref.name, ep.target_ref.uid) == ("h", "n1", "z1", "p", "uid-p")
    m = slice_to_manifest(sl, "svc-uid")
    assert m["metadata"]["labels"]["kubernetes.io/service-name"] == "s"
    assert m["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert m["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert m["metadata"]["ownerReferences"][0]["uid"] == "svc-uid"


SELECTION = [
    pytest.param(pod("p", "10.244.0.2", labels={"app": "b"}), 0, id="selector-mismatch"),
    pytest.param(pod("p", ""), 0, id="no-ip"),
    pytest.param(pod("p", "10.244.0.2", phase="Succeeded"), 0, id="terminal"),
    pytest.param(pod("p", "10.244.0.2", hostname="h", subdomain="other"), 1, id="hostname-only-with-subdomain"),
]


@pytest.mark.parametrize("p,count", SELECTION)
def test_which_pods_become_endpoints(p, count):
    [sl] = service_endpoint_slices(svc(), [p], NODES)  # no endpoints -> the placeholder slice
    assert len(sl.endpoints) == count
    if count:
        assert sl.endpoints[0].hostname is None


def test_selectorless_and_external_name_get_no_slices():
    assert service_endpoint_slices(svc(selector=None), [pod("p", "10.244.0.2")], NODES) == []
    assert service_endpoint_slices(svc(type_="ExternalName"), [pod("p", "10.244.0.2")], NODES) == []


def test_named_ports_group_pods_and_slices_hold_at_most_100():
    named = (ServicePortSpec(80, "TCP", "http", "http"),)
    pods = [pod(f"p{i}", f"10.244.{i // 250}.{i % 250 + 2}", ports=[ContainerPort(8080 + (i % 2), "TCP", "http")])
            for i in range(250)]
    pods.append(pod("noport", "10.244.9.9"))  # named port unresolved: endpoint without ports
    slices = service_endpoint_slices(svc(ports=named), pods, NODES)
    sizes = sorted(len(s.endpoints) for s in slices)
    assert sizes == [1, 25, 25, 100, 100]
    assert all(len(s.endpoints) <= MAX_ENDPOINTS_PER_SLICE for s in slices)
    assert {tuple(p.port for p in s.ports) for s in slices} == {(8080,), (8081,), ()}
    assert len({s.name for s in slices}) == len(slices)
    # Same input, same names.
    assert [s.name for s in slices] == [s.name for s in service_endpoint_slices(svc(ports=named), pods, NODES)]


def test_only_same_namespace():
    other = Pod(meta=ObjectMeta(name="p", namespace="other", labels={"app": "a"}), pod_ips=("10.244.0.9",))
    assert endpoint_slices([svc()], [other], NODES.values())[0].endpoints == ()


@pytest.mark.parametrize(
    "ip,mac",
    [
        pytest.param("10.244.0.2", "0a:58:0a:f4:00:02", id="pod"),
        pytest.param("10.244.1.1", "0a:58:0a:f4:01:01", id="bridge"),
        pytest.param("172.18.0.255", "0a:58:ac:12:00:ff", id="underlay-gateway"),
    ],
)
def test_mac_follows_the_ip(ip, mac):
    """A reused pod IP gets the MAC the old pod had, so stale neighbour entries still point at it."""
    from kubelab.netlab.topology import mac_for

    assert mac_for(ip) == mac
