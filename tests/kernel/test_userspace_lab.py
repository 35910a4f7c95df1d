"""``kubelab proxy --proxy-mode userspace`` in the example lab, whole stack.

netlab's ``examples/labs/basic.yaml`` with ``proxyMode: userspace``: two
nodes, each running the real ``kubelab proxy`` (controller, file source,
our proxier), three web pods, cluster DNS (``kubelab dns``) reached through
the userspace proxy's UDP relay, the lab's external client.  Clients: curl,
getent (glibc), dig.

Addresses: the lab's defaults -- pods 10.244.0.0/16, services 10.96.0.0/12,
underlay 172.18.0.0/24.  Nothing outside the lab's namespaces.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest

from kubelab.netlab.lab import Lab, LabSpec

pytestmark = pytest.mark.timeout(300)

BASIC = Path(__file__).resolve().parents[2] / "examples" / "labs" / "basic.yaml"


@pytest.fixture(scope="module")
def lab():
    spec = LabSpec.from_file(str(BASIC), name=f"tusl{os.getpid() % 100000}", proxyMode="userspace")
    with Lab.up(spec) as lab:
        lab.wait_synced(timeout=60)
        yield lab


def pods_of(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"pod=(\S+)", text))


def curl_n(lab, where: str, url: str, n: int) -> str:
    r = lab.exec(where, ["sh", "-c", f"for i in $(seq {n}); do curl -sS -m 5 {url}; done"], timeout=120, check=False)
    assert r.returncode == 0, f"{where} -> {url}: {r.stderr}\n{lab.log_tail(20)}"
    return r.stdout


@pytest.mark.parametrize("source", ["default/client", "node1", "node2"], ids=["pod", "node1", "node2"])
def test_cluster_ip_round_robin_over_three_pods(lab, source):
    out = curl_n(lab, source, f"http://{lab.service_ip('default/web')}/", 6)
    assert pods_of(out) == {"web-1": 2, "web-2": 2, "web-3": 2}, out


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_node_port_from_the_external_client(lab, node):
    port = lab.node_port("default/web-nodeport", port=80)
    out = curl_n(lab, "client", f"http://{lab.node_ip(node)}:{port}/", 3)
    assert sum(pods_of(out).values()) == 3, out


def test_cluster_dns_through_the_udp_relay(lab):
    # The pod's resolv.conf points at the kube-dns ClusterIP: glibc's query
    # goes through the userspace proxy's UDP listener to kubelab dns.
    r = lab.exec("default/client", ["sh", "-c", "getent ahosts web.default.svc.cluster.local; curl -sS -m 5 http://web/"], timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert lab.service_ip("default/web") in r.stdout and "pod=web-" in r.stdout
    dig = lab.exec("default/client", ["dig", "+short", "+tries=1", "+time=3", "web.default.svc.cluster.local"], check=False)
    assert dig.stdout.strip() == lab.service_ip("default/web"), dig.stdout + dig.stderr


def test_deleted_pod_gets_no_new_connections(lab):
    lab.delete("pod/web-3", grace=0)
    lab.wait_synced(timeout=60)
    out = curl_n(lab, "default/client", f"http://{lab.service_ip('default/web')}/", 6)
    assert pods_of(out) == {"web-1": 3, "web-2": 3}, out
