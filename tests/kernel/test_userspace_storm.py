"""A long storm of short, half-closing connections through the userspace relay.

DESIGN.md records uvloop crashing (heap corruption) in Protocol-pair relays
that pass half-close on with ``write_eof()`` under many short connections
(MagicStack/uvloop#706, #649).  Our relay uses no transports (raw sockets
in one edge-triggered epoll set of its own, which the loop watches through
one descriptor; small flows copied, bulk ones spliced); this proves it
survives the same load on the loop ``kubelab proxy`` runs it on (uvloop:
100,000 connections) and on stdlib asyncio (20,000), with no error and a
flat descriptor count.

Each connection: connect, send an HTTP request, ``shutdown(SHUT_WR)``
(half-close), read the whole reply until EOF, close.  The backend is an
haproxy HTTP responder.  Everything runs in one network namespace made for
the test, on its loopback (127.0.0.1); the relay writes no iptables rules
(clients connect to its listener directly).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

BACKEND_PORT = 8080

RESPONDER = """\
global
  maxconn 4000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend web
  bind 127.0.0.1:8080
  http-request return status 200 content-type text/plain string "hello from the backend"
"""

# The storm client: plain non-blocking sockets and epoll, bounded in count
# and time; prints one JSON line.
CLIENT = textwrap.dedent(
    """
    import errno, json, select, socket, sys, time
    port, total, concurrency, limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    REQ = b"GET / HTTP/1.1\\r\\nHost: storm\\r\\nConnection: close\\r\\n\\r\\n"
    ep = select.epoll()
    conns = {}
    started = done = errors = 0
    first_error = ""
    t0 = time.monotonic()

    def start():
        global started
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        e = s.connect_ex(("127.0.0.1", port))
        if e not in (0, errno.EINPROGRESS):
            raise OSError(e, "connect")
        conns[s.fileno()] = [s, b"", False]
        ep.register(s.fileno(), select.EPOLLOUT)
        started += 1

    while (done + errors) < total and time.monotonic() - t0 < limit:
        while started < total and len(conns) < concurrency:
            start()
        for fd, ev in ep.poll(1.0):
            s, buf, sent = conns[fd]
            try:
                if not sent:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "connect")
                    s.send(REQ)
                    s.shutdown(socket.SHUT_WR)  # the half-close under test
                    conns[fd][2] = True
                    ep.modify(fd, select.EPOLLIN)
                    continue
                data = s.recv(65536)
                if data:
                    conns[fd][1] = buf + data
                    continue
                if not buf.startswith(b"HTTP/1.1 200") or not buf.endswith(b"hello from the backend"):
                    raise OSError(0, f"bad reply {buf[:60]!r}")
                done += 1
            except OSError as e:
                errors += 1
                first_error = first_error or str(e)
            ep.unregister(fd)
            s.close()
            del conns[fd]
    print(json.dumps({"done": done, "errors": errors, "first_error": first_error,
                      "seconds": round(time.monotonic() - t0, 1), "open": len(conns)}))
    """
)


def _run_in(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, **kw)


class Standalone:
    """kubelab's userspace proxier (no rules) in ``ns``, driven by JSON lines."""

    def __init__(self, ns: str, loop: str, log):
        self.log = log
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kubelab.modes.userspace.standalone",
             "--node-ip", "127.0.0.1", "--loop", loop, "--no-rules", "--max-connections", "2000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
        )
        assert self.read().get("ready")

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"relay exited with {self.proc.poll()}"
        return json.loads(line)

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        resp = self.read()
        assert resp["ok"], resp
        return resp

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("loop,total", [("uvloop", 100_000), ("asyncio", 20_000)], ids=["uvloop-100k", "asyncio-20k"])
def test_short_connection_storm_with_half_close(netns, tmp_path, loop, total):
    ns = netns()
    _run_in(ns, ["ip", "link", "set", "lo", "up"], check=True)
    (tmp_path / "responder.cfg").write_text(RESPONDER)
    (tmp_path / "client.py").write_text(CLIENT)
    backend = subprocess.Popen(["ip", "netns", "exec", ns, "haproxy", "-db", "-f", str(tmp_path / "responder.cfg")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(tmp_path / "relay.log", "w")
    relay = Standalone(ns, loop, log)
    try:
        ports = relay.request(cmd="sync", services=[
            dict(name="storm", cluster_ip="10.96.0.99", port=80, endpoints=[f"127.0.0.1:{BACKEND_PORT}"])])
        port = ports["ports"]["default/storm"]

        def storm(n: int) -> dict:
            r = _run_in(ns, [sys.executable, str(tmp_path / "client.py"), str(port), str(n), "64", "400"], timeout=480)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        warm = storm(3000)  # fills the pipe pool to its working size
        assert warm["errors"] == 0 and warm["done"] == 3000, warm
        before = relay.request(cmd="stats")
        got = storm(total)
        after = relay.request(cmd="stats")
        assert got == {**got, "done": total, "errors": 0, "open": 0}, got
        assert relay.proc.poll() is None, "the relay died under the storm"
        # Every connection closed; descriptors flat (pooled pipes are 2 fds each).
        assert after["active"] == 0
        assert after["fds"] - 2 * after["pool"] == before["fds"] - 2 * before["pool"], (before, after)
        assert after["stats"]["closed"] - before["stats"]["closed"] == total
    finally:
        relay.close()
        log.close()
        backend.terminate()
        backend.wait()
