"""`kubelab dns` as a process: --source folder end to end with dig, edits picked up, bad input, flag errors.

Addresses: the server listens on 127.0.0.1 (ephemeral ports for DNS and
HTTP); model data from a copy of examples/basic (10.96.100.0/24 services,
10.244.0.0/16 endpoints) plus 10.96.7.0/24 for services the test adds.
No upstream is reachable (--upstream 127.0.0.1:<closed port>).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # generous: other rooms' tests share these two cores


def _free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubelab(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubelab", "dns", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def dig(port: int, name: str, qtype: str = "A", *extra: str) -> tuple[str, list[str]]:
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=3", "+noall", "+answer", "+comments", *extra, name, qtype],
        capture_output=True, text=True, timeout=30,
    )
    if r.returncode != 0:
        return "NO-ANSWER", []
    status = next((line.split("status: ")[1].split(",")[0] for line in r.stdout.splitlines() if "status:" in line), "NO-ANSWER")
    return status, [" ".join(line.split()) for line in r.stdout.splitlines() if line and not line.startswith(";")]


def wait_for(fn, what: str):
    """Poll ``fn`` until it returns something true; fail (saying what) after DEADLINE."""
    end = time.monotonic() + DEADLINE
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}; last: {last!r}")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  clusterIP: {ip}
  ports:
  - name: http
    port: 80
"""


@pytest.fixture
def served(tmp_path):
    """A copy of examples/basic served by `kubelab dns --source`; yields (folder, dns port, http port, process)."""
    folder = tmp_path / "manifests"
    shutil.copytree(ROOT / "examples" / "basic", folder, ignore=shutil.ignore_patterns("*.md"))
    port, http = _free_port(), _free_port(socket.SOCK_STREAM)
    proc = _kubelab(
        "--source", str(folder), "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{_free_port()}",
        "--metrics-bind-address", f"127.0.0.1:{http}", "--health-bind-address", f"127.0.0.1:{http}",
    )
    try:
        wait_for(lambda: proc.poll() is not None or http_get(http, "/ready")[0] == 200, "/ready")
        assert proc.poll() is None, proc.stdout.read()
        yield folder, port, http, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_source_folder_end_to_end(served):
    folder, port, http, proc = served
    # What examples/basic holds, over UDP and TCP.
    for proto in ("+notcp", "+tcp"):
        assert dig(port, "web.default.svc.cluster.local", "A", proto) == ("NOERROR", ["web.default.svc.cluster.local. 5 IN A 10.96.100.10"])
    status, lines = dig(port, "web-headless.default.svc.cluster.local")
    assert status == "NOERROR" and {line.rsplit(" ", 1)[1] for line in lines} == {"10.244.1.10", "10.244.1.11", "10.244.2.10"}
    assert dig(port, "api.default.svc.cluster.local")[0] == "NXDOMAIN"

    # Edit the folder: a new file with a new service, and web-headless gone from services.yaml.
    (folder / "api.yaml").write_text(SERVICE.format(name="api", ns="default", ip="10.96.7.1"))
    text = (folder / "services.yaml").read_text()
    docs = text.split("\n---\n")
    kept = [d for d in docs if "name: web-headless\n" not in d]
    assert len(kept) == len(docs) - 1
    (folder / "services.yaml").write_text("\n---\n".join(kept))
    wait_for(lambda: dig(port, "api.default.svc.cluster.local")[0] == "NOERROR", "api to appear")
    assert dig(port, "api.default.svc.cluster.local") == ("NOERROR", ["api.default.svc.cluster.local. 5 IN A 10.96.7.1"])
    wait_for(lambda: dig(port, "web-headless.default.svc.cluster.local")[0] == "NXDOMAIN", "web-headless to go")
    # The UDP whole-packet cache must not keep serving the old answer for the same bytes.
    assert dig(port, "web.default.svc.cluster.local") == ("NOERROR", ["web.default.svc.cluster.local. 5 IN A 10.96.100.10"])

    # A broken edit: the error is logged naming the file, the last good state stays, the process keeps serving.
    (folder / "api.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default\nspec: [\n")
    (folder / "other.yaml").write_text(SERVICE.format(name="other", ns="default", ip="10.96.7.2"))
    wait_for(lambda: dig(port, "other.default.svc.cluster.local")[0] == "NOERROR", "other to appear after the broken edit")
    assert dig(port, "api.default.svc.cluster.local") == ("NOERROR", ["api.default.svc.cluster.local. 5 IN A 10.96.7.1"])
    assert proc.poll() is None

    _, metrics = http_get(http, "/metrics")
    assert 'coredns_dns_requests_total{family="1",proto="udp"' in metrics
    assert "coredns_kubernetes_synced 1.0" in metrics

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "api.yaml" in out  # the broken file was named in the log


# (id, argv, words the error must contain)
FLAG_ERRORS = [
    ("no-source", [], ["--source", "--kubeconfig"]),
    ("autopath-needs-verified", ["--source", "examples/basic", "--autopath"], ["--autopath", "--pods verified"]),
    ("bad-cluster-cidr", ["--source", "examples/basic", "--cluster-cidr", "10.0.0.0/33"], ["--cluster-cidr", "10.0.0.0/33"]),
    ("bad-ttl", ["--source", "examples/basic", "--ttl", "99999"], ["--ttl", "0-3600"]),
    ("bad-domain", ["--source", "examples/basic", "--cluster-domain", "a..b"], ["--cluster-domain"]),
    ("bad-listen", ["--source", "examples/basic", "--listen", "nowhere:53"], ["nowhere"]),
    ("workers-out-of-range", ["--source", "examples/basic", "--workers", "0"], ["--workers", "1-64"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in FLAG_ERRORS], ids=[c[0] for c in FLAG_ERRORS])
def test_flag_errors_say_what_to_fix(argv, words):
    proc = _kubelab(*argv, "--metrics-bind-address", "", "--health-bind-address", "")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    for w in words:
        assert w in out, out


def test_port_in_use_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = _kubelab("--source", "examples/basic", "--listen", f"127.0.0.1:{port}", "--metrics-bind-address", "", "--health-bind-address", "")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "--listen" in out


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "kubelab", "dns", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0
    for w in ("--source", "--autopath", "--pods", "--upstream", "--cluster-cidr", "SERVFAIL", "examples:"):
        assert w in out.stdout


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _udp_sockets_on(port: int) -> int:
    """How many UDP sockets are bound to 127.0.0.1:port (from /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    return sum(1 for line in Path("/proc/net/udp").read_text().splitlines()[1:] if line.split()[1] == want)


def test_workers_share_the_port_and_stop_together():
    port = _free_port()
    proc = _kubelab("--source", "examples/basic", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{_free_port()}",
                    "--metrics-bind-address", "", "--health-bind-address", "", "--workers", "2")
    try:
        # The second worker binds only once it has synced: then two sockets share the port.
        wait_for(lambda: proc.poll() is not None or _udp_sockets_on(port) == 2, "two UDP sockets on the port")
        assert proc.poll() is None, proc.stdout.read()
        kids = _children(proc.pid)
        assert len(kids) == 1
        # Datagrams are dealt at random over both workers: every answer is right whichever served it.
        for i in range(20):
            status, answers = dig(port, "web.default.svc.cluster.local", "A", "+notcp" if i % 2 else "+tcp")
            assert status == "NOERROR" and len(answers) == 1 and answers[0].startswith("web.default.svc.cluster.local. 5 IN A 10.96."), answers
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    wait_for(lambda: all(not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split(")")[1][:3] for k in kids), "workers gone")
