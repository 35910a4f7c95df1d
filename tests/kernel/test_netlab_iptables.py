"""The example lab with the real iptables proxy in every node: Services, DNS, NodePorts, `kubelab trace`.

Addresses (inside the lab's own namespaces only): pod CIDR 10.244.0.0/16
(node1 10.244.0.0/24, node2 10.244.1.0/24), service CIDR 10.96.0.0/12
(kube-dns 10.96.0.10, others allocated from 10.96.0.2), underlay
172.18.0.0/24 (node1 .10, node2 .11, external client .254), node ports from
30000; examples/labs/more-services.yaml's externalIP 192.0.2.10 and
LoadBalancer IP 192.0.2.20 (routed from the external client to node1).
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest

from kubelab.netlab.lab import Lab
from kubelab.netlab.spec import LabSpec
from kubelab.netlab.testing import leftovers, unique_lab_name

ROOT = Path(__file__).resolve().parents[2]
BASIC = ROOT / "examples" / "labs" / "basic.yaml"


@pytest.fixture(scope="module")
def lab():
    spec = LabSpec.from_file(BASIC, name=unique_lab_name(), proxyMode="iptables")
    lab = Lab.up(spec)
    try:
        lab.wait_synced(timeout=60)
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name) == []


def _web_pods_on(lab, node):
    return sorted(k.split("/")[1] for k, p in lab.state()["pods"].items() if p["labels"].get("app") == "web" and p["node"] == node)


def test_example_places_web_pods_on_both_nodes(lab):
    assert lab.state()["pods"]["default/client"]["node"] == "node1"
    assert _web_pods_on(lab, "node1") and _web_pods_on(lab, "node2")


# (where from, URL template, expected source address the backend sees: "self" = the client's own IP, "node" = a node IP)
SERVICE_CASES = [
    pytest.param("client", "http://{cluster_ip}/", "self", id="pod-to-clusterip"),
    pytest.param("client", "http://web/", "self", id="pod-to-service-name-via-cluster-dns"),
    pytest.param("client", "http://web.default/", "self", id="pod-to-service-dot-namespace-via-search-path"),
    pytest.param("client", "http://web.default.svc.cluster.local:80/", "self", id="pod-to-service-fqdn"),
    pytest.param("external", "http://{node1}:{node_port}/", "node", id="external-to-nodeport-node1-masqueraded"),
    pytest.param("external", "http://{node2}:{node_port}/", "node", id="external-to-nodeport-node2-masqueraded"),
]


@pytest.mark.parametrize("source,url,seen", SERVICE_CASES)
def test_service_requests_reach_every_backend(lab, source, url, seen):
    url = url.format(
        cluster_ip=lab.service_ip("default/web"), node1=lab.node_ip("node1"), node2=lab.node_ip("node2"),
        node_port=lab.node_port("default/web-nodeport", port=80),
    )
    answers = collections.Counter()
    sources = set()
    for _ in range(24):
        r = lab.exec(source, ["curl", "-sS", "--max-time", "5", url], timeout=15)
        assert r.returncode == 0, r
        pod, client = r.stdout.split()
        answers[pod.removeprefix("pod=")] += 1
        sources.add(client.removeprefix("client=").rsplit(":", 1)[0])
    # kube-proxy's random pick over 3 endpoints: 24 requests all landing on one pod is a bug, not luck (3 * (1/3)^23).
    assert set(answers) <= {"web-1", "web-2", "web-3"} and len(answers) >= 2, answers
    if seen == "self":
        assert sources == {lab.address(source)}
    else:
        # Off-cluster traffic to a NodePort is masqueraded (a node or pod-bridge address), never the client's.
        assert lab.client_ip not in sources and sources, sources


def test_udp_through_clusterip(lab):
    r = lab.exec("client", ["sh", "-c", f"printf 'ping\\n' | nc -u -w 2 {lab.service_ip('default/web')} 9001"], timeout=15)
    first, _, rest = r.stdout.partition("\n")
    assert first.startswith("pod=web-") and f"client={lab.pod_ip('client')}:" in first, r
    assert rest == "ping\n"


def test_example_more_services_apply_through_the_cli(lab):
    """`kubelab lab apply LAB examples/labs/more-services.yaml`, then every path it advertises."""
    more = ROOT / "examples" / "labs" / "more-services.yaml"
    kl = [sys.executable, "-m", "kubelab", "lab"]
    r = subprocess.run(kl + ["apply", lab.name, str(more)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "service/default/web-public configured" in r.stdout, r
    try:
        lab.wait_synced(timeout=60)
        echo_ip = lab.service_ip("default/echo")
        r = lab.exec("client", ["sh", "-c", "printf 'hi\\n' | nc -N -w 5 echo 9000"], timeout=15)
        assert r.stdout.startswith("pod=echo-") and r.stdout.endswith("hi\n"), r
        r = lab.exec("client", ["sh", "-c", f"printf 'ping\\n' | nc -u -w 2 {echo_ip} 9001"], timeout=15)
        assert r.stdout.startswith("pod=echo-") and r.stdout.endswith("ping\n"), r
        for ip in ("192.0.2.10", "192.0.2.20"):  # externalIP, LoadBalancer ingress IP: from outside the cluster
            r = lab.exec("external", ["curl", "-sS", "--max-time", "5", f"http://{ip}/"], timeout=15)
            assert r.stdout.startswith("pod=web-"), (ip, r)
    finally:
        r = subprocess.run(kl + ["delete", lab.name, "deployment/echo", "service/echo", "service/web-public", "--now"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert "default/echo" not in lab.state()["services"] and not lab.pods({"app": "echo"})
    lab.wait_synced(timeout=60)


def test_applied_service_works_after_wait_synced(lab, tmp_path):
    extra = tmp_path / "more.yaml"
    extra.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-echo}\n"
        "spec: {selector: {app: web}, ports: [{port: 7000, targetPort: 9000}]}\n"
    )
    lab.apply(extra)
    lab.wait_synced(timeout=60)
    ip = lab.service_ip("default/web-echo")
    r = lab.exec("client", ["sh", "-c", f"printf 'hi\\n' | nc -N -w 5 {ip} 7000"], timeout=15)
    assert r.stdout.startswith("pod=web-") and r.stdout.endswith("hi\n"), r
    lab.delete("service/web-echo")
    lab.wait_synced(timeout=60)
    r = lab.exec("client", ["nc", "-z", "-w", "2", ip, "7000"], timeout=15)
    assert r.returncode != 0, r


TRACE_CASES = [
    # (from, --to, --proto, translations that must be named, translations that must not)
    pytest.param("client", "web:80", "tcp", ["DNAT     at node1", "un-DNAT  at node1"], ["SNAT     at"], id="pod-clusterip-tcp"),
    pytest.param("client", "web:udp", "udp", ["DNAT     at node1", "un-DNAT  at node1"], ["SNAT     at"], id="pod-clusterip-udp"),
    pytest.param("external", "web:80", "tcp", ["DNAT     at node1", "SNAT     at node1", "un-SNAT  at node1"], [],
                 id="external-clusterip-masqueraded"),
]


@pytest.mark.parametrize("source,to,proto,named,absent", TRACE_CASES)
def test_trace_shows_the_clusterip_dnat(lab, tmp_path, source, to, proto, named, absent):
    pcap = tmp_path / "trace.pcapng"
    # The UDP case relies on the default pcap file (./trace-LAB-TIME.pcapng, here in tmp_path).
    named_pcap = ["--pcap", str(pcap)] if proto == "tcp" else []
    r = subprocess.run(
        [sys.executable, "-m", "kubelab", "trace", lab.name, "--from", source, "--to", to, "--proto", proto, *named_pcap],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    if not named_pcap:
        (pcap,) = tmp_path.glob(f"trace-{lab.name}-*.pcapng")
    assert f"pcap: {pcap.name if not named_pcap else pcap} (" in r.stdout, r.stdout
    out = r.stdout
    cip = lab.service_ip("default/web")
    src = lab.address(source)
    port = 80 if proto == "tcp" else 9001
    target = 8080 if proto == "tcp" else 9001
    # The first line of the flow: the client's own packet to the cluster IP, as sent.
    first = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    assert f"{source}/eth0 out" in first and f"{src}:" in first and f"-> {cip}:{port}" in first, out
    dnat = [line for line in out.splitlines() if "[DNAT at node1" in line]
    assert dnat and all(f":{target}" in line and cip not in line.split("->")[1] for line in dnat), out
    for text in named:
        assert text in out, out
    for text in absent:
        assert text not in out, out
    backend = next(line for line in out.splitlines() if line.startswith("answered by: "))
    assert backend.removeprefix("answered by: ") in {"default/web-1", "default/web-2", "default/web-3"}
    assert "conntrack at node1:" in out
    # The pcap holds every sighting; tcpdump reads it and sees both the cluster IP and a backend.
    dump = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert f"> {cip}.{port}:" in dump.stdout and any(
        f"{lab.pod_ip(p)}.{target}" in dump.stdout for p in ("web-1", "web-2", "web-3")
    ), dump.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(["--from", "nobody", "--to", "web"], "no pod, node, 'external' or 'underlay' named 'nobody'", id="unknown-source"),
        pytest.param(["--from", "client", "--to", "nosvc"], "no service 'default/nosvc'", id="unknown-service"),
        pytest.param(["--from", "client", "--to", "web:81"], "has no TCP/UDP port 81; its ports: http 80/TCP", id="unknown-port"),
        pytest.param(["--from", "client", "--to", "web:80", "--proto", "udp"], "has no UDP port 80", id="wrong-protocol"),
    ],
)
def test_trace_errors_name_the_problem(lab, args, message):
    r = subprocess.run([sys.executable, "-m", "kubelab", "trace", lab.name, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr, r.stderr
