"""`kubelab demo` end to end: its output, and its teardown after success, failure, Ctrl-C and SIGTERM.

Addresses: the example lab's (inside its own namespaces only) -- pod CIDR
10.244.0.0/16 (node1 10.244.0.0/24, node2 10.244.1.0/24), service CIDR
10.96.0.0/12 (kube-dns 10.96.0.10), underlay 172.18.0.0/24 (node1 .10,
node2 .11, external client .254).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from kubelab.netlab.testing import leftovers, unique_lab_name

DEMO = [sys.executable, "-m", "kubelab", "demo"]


def test_demo_end_to_end(tmp_path):
    name = unique_lab_name("demo")
    pcap = tmp_path / "demo.pcapng"
    try:
        r = subprocess.run(DEMO + ["--name", name, "--requests", "12", "--pcap", str(pcap)],
                           capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([sys.executable, "-m", "kubelab", "lab", "down", name], capture_output=True, timeout=60)
    out = r.stdout
    assert r.returncode == 0, r.stderr + out
    steps = re.findall(r"^\[(\d)/5\]", out, re.M)
    assert steps == ["1", "2", "3", "4", "5"], out
    web_ip = re.search(r"Service default/web: cluster IP (\S+),", out).group(1)
    # The spread table: every request answered, only by the Service's pods, by more than one of them.
    rows = re.findall(r"^  (web-\d)\s+(node\d)\s+(\d+)\s+\d+%", out, re.M)
    assert sum(int(n) for _, _, n in rows) == 12, out
    assert len(rows) >= 2 and {node for _, node, _ in rows} <= {"node1", "node2"}, out
    assert "requests failed" not in out
    # DNS from the pod: glibc via the kubelet resolv.conf, and dig at the kube-dns cluster IP.
    assert re.search(rf"getent hosts web\s+-> {re.escape(web_ip)}\s+web\.default\.svc\.cluster\.local", out), out
    assert f"dig @10.96.0.10 web.default.svc.cluster.local -> {web_ip}" in out, out
    # The trace: the client's packet to the cluster IP, then DNAT in node1 (the client's node).
    assert re.search(rf"client/eth0 out\s+\S+ -> {re.escape(web_ip)}:80 TCP S", out), out
    assert "[DNAT at node1]" in out and "[un-DNAT at node1]" in out, out
    assert re.search(r"answered by: default/web-\d", out), out
    assert pcap.stat().st_size > 0
    assert "nothing left behind" in out
    assert leftovers(name) == []


def test_demo_failure_tears_down(tmp_path):
    # Two hostNetwork pods on one node want the same port: the lab fails half-way up.
    name = unique_lab_name("demo")
    bad = tmp_path / "clash.yaml"
    pod = ("apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}}}\nspec: {{nodeName: node1, hostNetwork: true, "
           "containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n")
    bad.write_text("lab: {nodes: [node1], proxyMode: iptables}\n---\n" + pod.format(n="a") + "---\n" + pod.format(n="b"))
    r = subprocess.run(DEMO + ["--name", name, "--file", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r
    assert "cannot listen on TCP 172.18.0.10:8080" in r.stderr, r.stderr
    assert "[5/5] tearing lab" in r.stdout and "nothing left behind" in r.stdout, r.stdout
    assert leftovers(name) == []


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, id="ctrl-c"), pytest.param(signal.SIGTERM, id="sigterm")])
def test_demo_interrupted_tears_down(signum):
    name = unique_lab_name("demo")
    proc = subprocess.Popen(DEMO + ["--name", name, "--requests", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[2/5]"):
                break
            assert time.monotonic() < deadline, lines
        time.sleep(1)  # somewhere in the requests loop
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run([sys.executable, "-m", "kubelab", "lab", "down", name], capture_output=True, timeout=60)
    out = "".join(lines) + rest
    assert proc.returncode == 130, (out, err)
    assert "interrupted: tearing the lab down" in out and "nothing left behind" in out, out
    assert leftovers(name) == []
