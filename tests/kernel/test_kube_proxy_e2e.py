"""``kubelab proxy --kubeconfig`` for real: the API source programming iptables, judged by curl.

Inside a fresh network namespace: the strict test API server (as a
process, on the namespace's own 127.0.0.1), a backend web server, and
``kubelab proxy --proxy-mode iptables --kubeconfig``.  curl inside the
namespace reaches the backend through the Service's cluster IP; a change
made on the API server reaches the kernel, also right after the watches
were cut mid-event; during an API outage the
programmed rules keep serving; a 410 relist that implies a deleted
EndpointSlice removes the backend (curl is refused, as kube-proxy's REJECT
rule does for a Service without endpoints).

Addresses (all inside namespace kl-kube-<pid>-<n>, gone with it):
172.31.0.0/16 cluster IPs (routed to lo), 198.18.0.1/32 backend on lo,
127.0.0.1 the test API server.
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
from fakeapi.testing import endpoint_slice, service, write_kubeconfig

REPO = Path(__file__).resolve().parents[2]
WAIT = 90.0
_seq = count()

pytestmark = pytest.mark.timeout(300)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=WAIT)


def _until(predicate, what) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.fixture
def ns():
    name = f"kl-kube-{os.getpid()}-{next(_seq)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
        # Locally generated packets need a route before OUTPUT's DNAT rewrites them.
        sh("ip", "netns", "exec", name, "ip", "route", "add", "172.31.0.0/16", "dev", "lo")
        yield name
    finally:
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], check=False)
        sh("ip", "netns", "del", name, check=False)


class Proc:
    """A process inside the namespace, stopped (and reaped) at teardown."""

    def __init__(self, argv: list[str], **kw) -> None:
        self.p = subprocess.Popen(argv, **kw)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


class API:
    """The test API server process, driven through its stdin."""

    def __init__(self, ns: str, objects: Path, env: dict) -> None:
        self.proc = Proc(["ip", "netns", "exec", ns, sys.executable, "-m", "fakeapi.serve", "--objects", str(objects),
                          "--bookmark-interval", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = self.proc.p.stdout.readline()
        assert first.startswith("listening "), first + self.proc.p.stderr.read()
        self.url = first.split()[1]

    def do(self, **cmd) -> object:
        self.proc.p.stdin.write(json.dumps(cmd) + "\n")
        self.proc.p.stdin.flush()
        line = self.proc.p.stdout.readline()
        assert line.startswith("ok "), line
        return json.loads(line[3:])

    def close(self) -> tuple[int, str]:
        if self.proc.p.poll() is None:
            self.proc.p.stdin.close()
            try:
                self.proc.p.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.stop()
        return self.proc.p.returncode, self.proc.p.stderr.read()


@pytest.fixture
def backend(ns, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello from the backend\n")
    proc = Proc(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "8080", "--bind", "198.18.0.1",
                 "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(lambda: curl(ns, "http://198.18.0.1:8080/")[0] == 0, "the backend to listen")
        yield proc
    finally:
        proc.stop()


def curl(ns: str, url: str) -> tuple[int, str]:
    r = sh("ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5", url, check=False)
    return r.returncode, r.stdout


HELLO = "hello from the backend\n"


def test_iptables_proxy_fed_by_the_api(ns, backend, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([service("web", "172.31.0.10", port=80),
                                   endpoint_slice("web-1", "web", ["198.18.0.1"], port=8080)]))
    api = API(ns, objects, env)
    log = tmp_path / "proxy.log"
    proxy = None
    try:
        kc = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        with open(log, "w") as logf:
            proxy = Proc(["ip", "netns", "exec", ns, sys.executable, "-m", "kubelab", "proxy", "--proxy-mode", "iptables",
                          "--kubeconfig", str(kc), "--hostname-override", "node-1", "--min-sync-period", "200ms",
                          "--metrics-bind-address", "", "--healthz-bind-address", ""],
                         stdout=logf, stderr=subprocess.STDOUT, env=env)
        tail = lambda what: lambda: f"{what}; proxy log: {log.read_text()[-3000:]}"  # noqa: E731
        _until(lambda: curl(ns, "http://172.31.0.10/")[1] == HELLO, tail("the cluster IP to answer"))
        rules = sh("ip", "netns", "exec", ns, "iptables-save", "-t", "nat").stdout
        assert "KUBE-SERVICES" in rules and "default/web:http cluster IP" in rules

        # A change on the API server reaches the kernel through the watch.
        api.do(op="apply", object=service("web", "172.31.0.10", port=81))
        _until(lambda: curl(ns, "http://172.31.0.10:81/")[1] == HELLO, tail("port 81 after the update"))

        # Watches cut mid-event (half a JSON line, then RST): the proxy resumes
        # from its last resourceVersion and what changed next still arrives.
        assert api.do(op="cut") >= 2
        api.do(op="apply", object=service("web2", "172.31.0.12", port=80))
        api.do(op="apply", object=endpoint_slice("web2-1", "web2", ["198.18.0.1"], port=8080))
        _until(lambda: curl(ns, "http://172.31.0.12/")[1] == HELLO, tail("web2 after the cut"))
        assert curl(ns, "http://172.31.0.10:81/")[1] == HELLO

        # API outage: watches cut, connections dropped. The programmed rules keep serving.
        api.do(op="outage", count=8)
        for _ in range(5):
            assert curl(ns, "http://172.31.0.10:81/")[1] == HELLO
        _until(lambda: api.do(op="stats")["faults_left"] == 0, tail("the outage to be retried through"))
        assert proxy.p.poll() is None

        # The history the proxy would resume from is compacted while its watches
        # are down; the slice is deleted meanwhile: only a relist can tell.
        api.do(op="outage", count=2)
        api.do(op="delete", kind="EndpointSlice", namespace="default", name="web-1")
        api.do(op="apply", object=service("other", "172.31.0.11", port=80))
        api.do(op="compact")
        _until(lambda: curl(ns, "http://172.31.0.10:81/")[0] != 0, tail("the backend to be removed after the relist"))
        filt = sh("ip", "netns", "exec", ns, "iptables-save", "-t", "filter").stdout
        assert '"default/web:http has no endpoints"' in filt, filt
        assert "default/web:http has no endpoints" not in rules
        assert "relisted" in log.read_text()
        stats = api.do(op="stats")
        assert stats["violations"] == []
        assert any(op == "watch" and status == 200 for op, _, status in stats["requests"])
    finally:
        rc = proxy.stop() if proxy else 0
        api_rc, api_err = api.close()
    assert rc == 0, log.read_text()[-3000:]
    assert api_rc == 0, api_err
