"""``kubelab proxy`` for real, inside a fresh network namespace (root).

The proxy runs with a real mode (userspace: listeners plus iptables portal
rules; iptables: kube-proxy's NAT chains) on a folder of manifests; curl inside the namespace
reaches a real backend through the cluster IP, before and after the folder
is edited (and when an edit is invalid: the last good version keeps
serving), and asks the real default endpoints ``127.0.0.1:10249/metrics``
and ``:10256/healthz`` -- the namespace has its own loopback, so the default
ports never collide with the host or other tests.

Addresses (all inside namespace kl-core-<pid>-<n>, gone with it):
172.30.0.0/16 cluster IPs, 198.18.0.1/32 node/backend address on lo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
WAIT = 90.0
_seq = count()

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 172.30.0.10
  clusterIPs: [172.30.0.10]
  ports:
  - name: http
    port: {port}
    protocol: TCP
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [198.18.0.1]
  conditions: {{ready: true}}
  nodeName: node-1
ports:
- name: http
  port: 8080
  protocol: TCP
"""


def sh(*argv: str, check: bool = True, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def netns():
    name = f"kl-core-{os.getpid()}-{next(_seq)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
        # Locally generated packets need a route before OUTPUT's DNAT rewrites them.
        sh("ip", "netns", "exec", name, "ip", "route", "add", "172.30.0.0/16", "dev", "lo")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def backend(netns, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello from the backend\n")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "http.server", "8080", "--bind", "198.18.0.1",
         "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _curl(netns, "http://198.18.0.1:8080/")[0] == 0, "the backend to listen")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _curl(netns: str, url: str) -> tuple[int, str]:
    r = sh("ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "5", url, check=False)
    return r.returncode, r.stdout


def _until(predicate, what) -> None:
    """Poll ``predicate`` up to WAIT seconds; ``what`` is text, or a callable giving it (read on failure)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.mark.parametrize("mode", ["userspace", "iptables"])
def test_proxy_in_netns(mode, netns, backend, tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(SERVICE.format(port=80))
    log = tmp_path / "proxy.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as logf:
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "kubelab", "proxy", "--proxy-mode", mode,
             "--source", str(manifests), "--hostname-override", "node-1", "--min-sync-period", "200ms"],
            stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _until(lambda: _curl(netns, "http://172.30.0.10/")[1] == "hello from the backend\n",
               lambda: f"the cluster IP to answer; log: {log.read_text()[-3000:]}")
        assert "synced 1 services, 1 endpoints in" in log.read_text()

        # Edit the folder: the service moves to port 81.
        (manifests / "web.yaml").write_text(SERVICE.format(port=81))
        _until(lambda: _curl(netns, "http://172.30.0.10:81/")[1] == "hello from the backend\n",
               lambda: f"port 81 after the edit; log: {log.read_text()[-3000:]}")

        # Bad input among good: the service edited into an invalid one (port 82 with
        # an unknown protocol) and a file of broken YAML.  Both are reported by
        # file and field; the last good version (port 81) keeps carrying traffic.
        (manifests / "web.yaml").write_text(SERVICE.format(port=82).replace("    protocol: TCP\n    targetPort",
                                                                             "    protocol: ICMP\n    targetPort", 1))
        (manifests / "zz-broken.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x\n")
        _until(lambda: "spec.ports[0].protocol" in log.read_text() and "zz-broken.yaml" in log.read_text(),
               lambda: f"both errors logged; log: {log.read_text()[-3000:]}")
        errors = log.read_text()
        assert "web.yaml:1: Service default/web: spec.ports[0].protocol: Unsupported value: \"ICMP\"" in errors
        assert _curl(netns, "http://172.30.0.10:81/")[1] == "hello from the backend\n"
        assert _curl(netns, "http://172.30.0.10:82/")[0] != 0

        # kube-proxy's default endpoints, inside the namespace.
        code, body = _curl(netns, "http://127.0.0.1:10249/metrics")
        assert code == 0 and "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in body
        code, body = _curl(netns, "http://198.18.0.1:10256/healthz")
        assert code == 0 and json.loads(body)["nodeEligible"] is True
    finally:
        proxy.terminate()
        try:
            rc = proxy.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proxy.kill()
            rc = proxy.wait()
    assert rc == 0, log.read_text()[-3000:]
