"""What lab pods run: in-process servers (one asyncio process serves every pod) or a real command.

A pod whose first container has a ``command`` runs it (``args`` appended)
in the pod's namespace with ``ip netns exec``, so it sees the pod's
resolv.conf; ``$(VAR)`` references expand from the pod's environment as in
Kubernetes (``POD_NAME``, ``POD_NAMESPACE``, ``POD_IP``, ``NODE_NAME``,
``HOST_IP``, ``KUBELAB_MANIFESTS``, ``KUBELAB_PYTHON`` and the container's
``env`` values).

Every other pod gets a built-in server on each of its container ports.
Sockets are created *inside the pod's namespace* and stay there, so one
process serves hundreds of pods.  Each server tells who answered and the
client address it saw (to show which backend was picked and whether the
source was NATed):

* TCP (default): the first bytes decide.  An HTTP request gets an HTTP/1.1
  response with body ``pod=NAME client=IP:PORT\\n`` (keep-alive honoured,
  header ``X-Pod``); anything else gets that line, then every byte echoed
  back until the client closes.
* UDP: each datagram is answered with the line followed by the datagram.
* A TCP port whose name starts with ``stream``: the line, then
  ``seq=N pod=NAME`` every ``kubelab.dev/stream-interval-ms`` ms (default 100)
  until the client goes -- a long-lived connection.
* A TCP port whose name starts with ``bulk``: the line, then zeros as fast as
  the client reads them (iperf-like throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from dataclasses import dataclass, field

from kubelab.model import Pod
from kubelab.netlab import nsutil

log = logging.getLogger("kubelab.netlab.workloads")

ANNOTATION_STREAM_INTERVAL = "kubelab.dev/stream-interval-ms"
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
BULK_CHUNK = b"\0" * 65536
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class PortServer:
    """One built-in server: which port, which protocol, which behaviour."""

    port: int
    protocol: str  # TCP | UDP
    kind: str  # echo | udp-echo | stream | bulk


def port_servers(pod: Pod) -> list[PortServer]:
    """The built-in servers a pod runs (none if it runs a command)."""
    if pod_command(pod):
        return []
    out: list[PortServer] = []
    seen = set()
    for cp in pod.ports:
        key = (cp.port, cp.protocol)
        if key in seen:
            continue
        seen.add(key)
        if cp.protocol == "UDP":
            out.append(PortServer(cp.port, "UDP", "udp-echo"))
        elif cp.protocol == "TCP":
            kind = "stream" if cp.name.startswith("stream") else "bulk" if cp.name.startswith("bulk") else "echo"
            out.append(PortServer(cp.port, "TCP", kind))
    return out


def pod_command(pod: Pod) -> list[str]:
    """The first container's command + args, unexpanded; [] if none."""
    if not pod.containers:
        return []
    c = pod.containers[0]
    cmd = list(c.get("command") or [])
    if not cmd:
        return []
    return [str(x) for x in cmd + list(c.get("args") or [])]


def pod_env(pod: Pod, extra: dict[str, str]) -> dict[str, str]:
    env = {
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": pod.pod_ip,
        "NODE_NAME": pod.node_name,
        "HOST_IP": pod.host_ip,
    }
    env.update(extra)
    if pod.containers:
        for item in pod.containers[0].get("env") or []:
            if isinstance(item, dict) and "name" in item and "value" in item:
                env[str(item["name"])] = expand(str(item["value"]), env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables replaced, unknown ones left as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def identity(pod_name: str, peer) -> bytes:
    host, port = peer[0], peer[1]
    return f"pod={pod_name} client={host}:{port}\n".encode()


class _UDPEcho(asyncio.DatagramProtocol):
    def __init__(self, pod_name: str):
        self.pod_name = pod_name
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(identity(self.pod_name, addr) + data, addr)


@dataclass
class _PodServers:
    servers: list = field(default_factory=list)
    transports: list = field(default_factory=list)
    tasks: set = field(default_factory=set)


class Workloads:
    """Built-in servers for many pods, in one event loop (see module docstring)."""

    def __init__(self):
        self._pods: dict[tuple[str, str], _PodServers] = {}

    def serving(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._pods

    async def start_pod(self, pod: Pod, netns: str, bind_ip: str = "0.0.0.0") -> None:
        """Open the pod's listeners inside ``netns`` (a node's for hostNetwork pods, bound to ``bind_ip``)."""
        key = (pod.namespace, pod.name)
        await self.stop_pod(*key)
        servers = port_servers(pod)
        state = _PodServers()
        self._pods[key] = state
        loop = asyncio.get_running_loop()
        interval = _interval(pod)
        try:
            for ps in servers:
                sock = _bound_socket(netns, bind_ip, ps)
                if ps.protocol == "UDP":
                    transport, _ = await loop.create_datagram_endpoint(lambda: _UDPEcho(pod.name), sock=sock)
                    state.transports.append(transport)
                else:
                    handler = self._tcp_handler(pod.name, ps.kind, interval, state)
                    state.servers.append(await asyncio.start_server(handler, sock=sock, limit=1 << 20))
        except BaseException:
            await self.stop_pod(*key)
            raise

    def _tcp_handler(self, pod_name: str, kind: str, interval: float, state: _PodServers):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            state.tasks.add(task)
            try:
                peer = writer.get_extra_info("peername")
                if kind == "stream":
                    await _stream(reader, writer, pod_name, peer, interval)
                elif kind == "bulk":
                    await _bulk(writer, pod_name, peer)
                else:
                    await _echo_or_http(reader, writer, pod_name, peer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                state.tasks.discard(task)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        return handle

    async def stop_pod(self, namespace: str, name: str) -> None:
        state = self._pods.pop((namespace, name), None)
        if state is None:
            return
        for server in state.servers:
            server.close()
        for transport in state.transports:
            transport.close()
        for task in list(state.tasks):
            task.cancel()
        for server in state.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def stop_all(self) -> None:
        for key in list(self._pods):
            await self.stop_pod(*key)


def _interval(pod: Pod) -> float:
    raw = pod.meta.annotations.get(ANNOTATION_STREAM_INTERVAL, "100")
    try:
        return max(1.0, float(raw)) / 1000.0
    except ValueError:
        return 0.1


def _bound_socket(netns: str, ip: str, ps: PortServer) -> socket.socket:
    kind = socket.SOCK_DGRAM if ps.protocol == "UDP" else socket.SOCK_STREAM
    with nsutil.entered(netns):
        sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, ps.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {ps.protocol} {ip}:{ps.port} in {netns}: {exc.strerror}") from None
    return sock


async def _echo_or_http(reader, writer, pod_name, peer) -> None:
    first = await reader.read(65536)
    if not first:
        return
    if first.startswith(HTTP_METHODS):
        await _http(reader, writer, pod_name, peer, first)
        return
    writer.write(identity(pod_name, peer) + first)
    await writer.drain()
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    # Half-close: answer everything, then close our side too.
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _http(reader, writer, pod_name, peer, buffered: bytes) -> None:
    body = identity(pod_name, peer)
    buf = buffered
    while True:
        while b"\r\n\r\n" not in buf:
            more = await reader.read(65536)
            if not more:
                return
            buf += more
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        request_line = lines[0].split()
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        length = int(headers.get(b"content-length", b"0") or 0)
        while len(buf) < length:
            more = await reader.read(65536)
            if not more:
                return
            buf += more
        buf = buf[length:]
        version = request_line[2] if len(request_line) > 2 else b"HTTP/1.0"
        keep = headers.get(b"connection") != b"close" if version == b"HTTP/1.1" else headers.get(b"connection") == b"keep-alive"
        is_head = request_line[0] == b"HEAD"
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Pod: " + pod_name.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + (b"\r\nConnection: keep-alive" if keep else b"\r\nConnection: close")
            + b"\r\n\r\n" + (b"" if is_head else body)
        )
        writer.write(response)
        await writer.drain()
        if not keep:
            return
        if not buf:
            more = await reader.read(65536)
            if not more:
                return
            buf = more


async def _stream(reader, writer, pod_name, peer, interval) -> None:
    writer.write(identity(pod_name, peer))
    await writer.drain()
    eof = asyncio.ensure_future(reader.read())  # the client closing ends the stream
    try:
        seq = 0
        while not eof.done():
            seq += 1
            writer.write(f"seq={seq} pod={pod_name}\n".encode())
            await writer.drain()
            await asyncio.wait([eof], timeout=interval)
    finally:
        eof.cancel()


async def _bulk(writer, pod_name, peer) -> None:
    writer.write(identity(pod_name, peer))
    while True:
        writer.write(BULK_CHUNK)
        await writer.drain()
