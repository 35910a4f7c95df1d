"""Labs inside User-Mode Linux: the two-node lab with the ipvs proxy mode, driven from the host.

The host kernel has no IPVS, so ``kernel: auto`` with ``proxyMode: ipvs``
puts the whole lab inside a UML kernel that the lab boots itself (this
module does not use the shared ``uml`` fixture).  Addresses, all inside the
UML kernel's namespaces: pod CIDR 10.244.0.0/16 (node1 10.244.0.0/24,
node2 10.244.1.0/24), service CIDR 10.96.0.0/12 (``srv`` at 10.96.0.2),
underlay 172.18.0.0/24 (node1 .10, node2 .11, external client .254), srv's
node port from 30000.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kubelab.netlab import nsutil
from kubelab.netlab.lab import Lab, LabError
from kubelab.netlab.spec import LabSpec
from kubelab.netlab.testing import leftovers, unique_lab_name

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "srv"},
           "spec": {"type": "NodePort", "selector": {"app": "srv"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "srv"},
    "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "srv"}},
             "template": {"metadata": {"labels": {"app": "srv"}},
                          "spec": {"containers": [{"name": "srv", "ports": [
                              {"name": "http", "containerPort": 8080},
                              {"name": "udp", "containerPort": 9001, "protocol": "UDP"}]}]}}},
}
TESTER = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tester"},
          "spec": {"nodeName": "node1", "containers": [{"name": "c"}]}}


def _uml_gone(record: dict) -> list[str]:
    """What is left of a lab's UML kernel: live processes with its umid, its work folder."""
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f"umid={record['umid']}".encode() in f.read():
                        left.append(f"process {entry}")
            except OSError:
                pass
    if os.path.exists(record["workdir"]):
        left.append(record["workdir"])
    return left


@pytest.fixture(scope="module")
def lab():
    assert not os.path.exists("/proc/net/ip_vs"), "this host has IPVS: the automatic UML choice is not exercised"
    spec = LabSpec.from_dict({"nodes": ["node1", "node2"], "proxyMode": "ipvs"}, [SERVICE, DEPLOYMENT, TESTER],
                             name=unique_lab_name())
    lab = Lab.up(spec)
    record = lab.state()["uml"]
    try:
        lab.wait_synced(timeout=180)
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name) == []
        assert _uml_gone(record) == []


def test_lab_lives_in_uml_with_ipvs(lab):
    state = lab.state()
    assert lab.kernel == "uml" and state["uml"]["kernel"].startswith("6.")
    assert nsutil.names(f"kl-{lab.name}.") == []  # nothing on the host kernel
    mods = lab.exec("node1", ["cat", "/proc/modules"], check=True).stdout
    loaded = {line.split()[0] for line in mods.splitlines()}
    assert {"ip_vs", "ip_vs_rr", "br_netfilter", "veth", "bridge"} <= loaded
    # The real ipvs proxy programmed the Service in each node.
    for node in ("node1", "node2"):
        ipvs = lab.exec(node, ["ipvsadm", "-Ln", "-t", f"{lab.service_ip('default/srv')}:80"], check=True).stdout
        backends = sorted(line.split()[1] for line in ipvs.splitlines() if line.strip().startswith("->") and "Masq" in line)
        assert backends == sorted(f"{lab.pod_ip(p)}:8080" for p in ("srv-1", "srv-2")), ipvs


REACH = [
    pytest.param("srv-1", "srv-2", "curl", id="pod-to-pod-across-nodes-http"),
    pytest.param("srv-2", "srv-1", "nc-udp", id="pod-to-pod-across-nodes-udp"),
    pytest.param("tester", "srv-1", "curl", id="pod-to-pod-same-node"),
    pytest.param("external", "srv-2", "curl", id="external-client-to-pod"),
]


@pytest.mark.parametrize("src,dst,how", REACH)
def test_reachability(lab, src, dst, how):
    ip = lab.pod_ip(dst)
    if how == "curl":
        r = lab.exec(src, ["curl", "-sS", "--max-time", "5", f"http://{ip}:8080/"], timeout=20)
    else:
        r = lab.exec(src, ["sh", "-c", f"printf 'ping\\n' | nc -u -w 2 {ip} 9001"], timeout=20)
        assert r.stdout.endswith("ping\n"), r
    assert r.stdout.startswith(f"pod={dst} client={lab.address(src)}:"), r


def test_clusterip_through_ipvs_round_robin(lab):
    seen = []
    for _ in range(4):
        r = lab.exec("tester", ["curl", "-sS", "--max-time", "5", f"http://{lab.service_ip('default/srv')}/"], timeout=20)
        assert r.returncode == 0, r
        seen.append(r.stdout.split()[0])
    assert sorted(set(seen)) == ["pod=srv-1", "pod=srv-2"], seen  # rr alternates


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_external_client_reaches_a_node_port(lab, node):
    """From outside the cluster to a node's underlay IP, through IPVS to a pod (masqueraded)."""
    url = f"http://{lab.node_ip(node)}:{lab.node_port('default/srv', port=80)}/"
    r = lab.exec("external", ["curl", "-sS", "--max-time", "5", url], timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("pod=srv-"), r
    assert f"client={lab.client_ip}:" not in r.stdout, r


def test_cli_round_trip(lab):
    kl = [sys.executable, "-m", "kubelab", "lab"]
    r = subprocess.run(kl + ["exec", lab.name, "srv-1", "--", "curl", "-sS", "--max-time", "5", f"http://{lab.pod_ip('srv-2')}:8080/"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("pod=srv-2 client="), r
    r = subprocess.run(kl + ["exec", lab.name, "srv-1", "--", "sh", "-c", "exit 7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 7
    state = json.loads(subprocess.run(kl + ["status", lab.name, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert state["kernel"] == "uml" and state["processes"]["proxy/node1"]["running"]
    assert all(p["pid"] is None and p["umlPid"] for p in state["processes"].values())
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "extra"},
           "spec": {"nodeName": "node2", "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]}}
    lab.apply([pod])
    r = lab.exec("tester", ["curl", "-sS", "--max-time", "5", f"http://{lab.pod_ip('extra')}:8080/"], timeout=20)
    assert r.stdout.startswith("pod=extra "), r
    r = subprocess.run(kl + ["delete", lab.name, "pod/extra", "--now"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert "default/extra" not in lab.status()["pods"]
    with pytest.raises(LabError, match="inside UML"):
        lab.popen("tester", ["true"])


def test_down_after_the_host_process_died():
    spec = LabSpec.from_dict({"nodes": 1, "kernel": "uml"}, [], name=unique_lab_name())
    lab = Lab.up(spec)
    state = lab.state()
    try:
        os.kill(state["daemonPid"], signal.SIGKILL)  # a crash: nobody powers UML off
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{state['daemonPid']}") and time.monotonic() < deadline:
            lab._process.poll()
            time.sleep(0.1)
        assert _uml_gone(state["uml"]) != []  # the kernel outlived its host process
    finally:
        Lab.down_by_name(lab.name)
    assert leftovers(lab.name) == []
    assert _uml_gone(state["uml"]) == []
