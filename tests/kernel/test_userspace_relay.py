"""The userspace relay against real sockets, on both event loops.

In-process: kubelab's driver (listeners, splice relays, UDP sessions) and
small asyncio servers, on 127.0.0.1 only.  What the end-to-end tests cannot
easily provoke: the connection limit, backpressure with a stalled reader,
reset propagation, a service without endpoints, UDP session bound and
idle timeout.

Addresses: 127.0.0.1 (random ports), 127.0.0.1:1 (nothing listens).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket

import pytest
import uvloop

from kubelab.model import ServicePortName
from kubelab.modes.userspace.driver import DriverOptions, Relay
from kubelab.modes.userspace.loadbalancer import LoadBalancerRR

pytestmark = pytest.mark.timeout(120)

SVC = ServicePortName("default", "svc", "", "TCP")
UDP = ServicePortName("default", "svc", "", "UDP")
LOOPS = pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])


def run(loop_name: str, coro_fn, *args):
    if loop_name == "uvloop":
        return uvloop.run(coro_fn(*args))
    return asyncio.run(coro_fn(*args))


async def make_relay(endpoints: list[str], proto: str = "TCP", **opts) -> tuple[Relay, object]:
    lb = LoadBalancerRR()
    name = SVC if proto == "TCP" else UDP
    lb.new_service(name)
    lb.set_endpoints(name, endpoints)
    relay = Relay(asyncio.get_running_loop(), lb, DriverOptions(**opts), logging.getLogger("kubelab.test.userspace"))
    port = relay.open_tcp(name, "127.0.0.1") if proto == "TCP" else relay.open_udp(name, "127.0.0.1")
    return relay, port


async def echo_server(handler=None):
    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    srv = await asyncio.start_server(handler or echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@LOOPS
def test_connection_limit_holds_new_connections_in_the_backlog(loop_name, caplog):
    async def body():
        srv, bport = await echo_server()
        relay, port = await make_relay([f"127.0.0.1:{bport}"], max_connections=2)
        conns = [await asyncio.open_connection("127.0.0.1", port.port) for _ in range(3)]
        for _r, w in conns:
            w.write(b"ping")
        got = [await asyncio.wait_for(r.read(4), 5) for r, _w in conns[:2]]
        assert got == [b"ping", b"ping"]
        # The third waits in the kernel's backlog: no answer while two are open.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conns[2][0].read(4), 0.5)
        assert relay.active == 2 and relay.at_limit
        conns[0][1].close()
        assert await asyncio.wait_for(conns[2][0].read(4), 5) == b"ping"
        for _r, w in conns[1:]:
            w.close()
        relay.close()
        srv.close()

    with caplog.at_level(logging.WARNING, logger="kubelab.test.userspace"):
        run(loop_name, body)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("connection limit reached: 2 connections open" in m for m in msgs), msgs
    assert any("below the limit again" in m for m in msgs), msgs


@LOOPS
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_backpressure_with_a_stalled_reader_then_every_byte_arrives(loop_name, direction):
    """A reader that stops reading stalls the writer on the far side, both ways.

    upload: the backend does not read, the client's send blocks; download:
    the client does not read, the backend's writes block.  Either way the
    relay holds at most one pipe of the stream, and once the reader reads
    again every byte arrives.
    """

    async def body():
        loop = asyncio.get_running_loop()
        release = asyncio.Event()
        payload = os.urandom(1 << 20) * 32  # 32 MiB
        received = hashlib.sha256()
        total = 0
        backend_wrote = 0

        async def slow_reader(reader, writer):
            nonlocal total
            await release.wait()
            while data := await reader.read(1 << 20):
                received.update(data)
                total += len(data)
            writer.write(b"done")
            await writer.drain()
            writer.close()

        async def fast_writer(reader, writer):
            nonlocal backend_wrote
            for off in range(0, len(payload), 1 << 20):
                writer.write(payload[off : off + (1 << 20)])
                await writer.drain()  # blocks while the relay holds the stream back
                backend_wrote = off + (1 << 20)
            writer.close()

        srv, bport = await echo_server(slow_reader if direction == "upload" else fast_writer)
        relay, port = await make_relay([f"127.0.0.1:{bport}"], pipe_size=65536)
        sock = socket.create_connection(("127.0.0.1", port.port))
        sock.setblocking(False)
        if direction == "upload":
            # Fill everything until the client's own send blocks: the relay
            # must not buffer without bound while the backend does not read.
            sent = blocked = 0
            while blocked < 5 and sent < len(payload):
                try:
                    sent += sock.send(payload[sent : sent + (1 << 20)])
                    blocked = 0
                except BlockingIOError:
                    blocked += 1
                    await asyncio.sleep(0.05)
            assert sent < len(payload)
            (conn,) = port.conns
            assert conn.up.pending <= conn.up.capacity
            release.set()
            await loop.sock_sendall(sock, payload[sent:])
            sock.shutdown(socket.SHUT_WR)
            reply = await asyncio.wait_for(loop.sock_recv(sock, 16), 30)
            assert reply == b"done"
        else:
            # The client reads nothing: the backend's drain() must stop
            # returning once the socket buffers and one pipe are full.
            last = -1
            while backend_wrote != last:
                last = backend_wrote
                await asyncio.sleep(0.2)
            assert backend_wrote < len(payload)
            (conn,) = port.conns
            assert conn.down.pending <= conn.down.capacity
            while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30):
                received.update(data)
                total += len(data)
        assert total == len(payload) and received.digest() == hashlib.sha256(payload).digest()
        sock.close()
        relay.close()
        srv.close()

    run(loop_name, body)


@LOOPS
def test_backend_reset_reaches_the_client_and_no_endpoint_is_refused(loop_name):
    async def body():
        async def reset(reader, writer):
            await reader.read(4)
            s = writer.get_extra_info("socket")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()

        srv, bport = await echo_server(reset)
        relay, port = await make_relay([f"127.0.0.1:{bport}"])
        r, w = await asyncio.open_connection("127.0.0.1", port.port)
        w.write(b"ping")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(10), 5)
        w.close()
        # Only dead endpoints: every try fails, the client is reset.
        relay.lb.set_endpoints(SVC, ["127.0.0.1:1"])
        r, w = await asyncio.open_connection("127.0.0.1", port.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(10), 10)
        w.close()
        assert relay.stats.no_endpoint == 1 and relay.stats.dial_failures == 4
        await asyncio.sleep(0.1)
        assert relay.active == 0
        relay.close()
        srv.close()

    run(loop_name, body)


@LOOPS
def test_udp_sessions_bounded_and_idle_timeout(loop_name):
    async def body():
        loop = asyncio.get_running_loop()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, t):
                self.t = t

            def datagram_received(self, data, addr):
                self.t.sendto(b"re:" + data, addr)

        t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        bport = t.get_extra_info("sockname")[1]
        relay, port = await make_relay([f"127.0.0.1:{bport}"], proto="UDP", udp_max_sessions=2, udp_idle_timeout=0.3)
        clients = []
        for i in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.connect(("127.0.0.1", port.port))  # replies must come from the address asked
            c.setblocking(False)
            clients.append(c)
            c.send(b"hi%d" % i)
            assert await asyncio.wait_for(loop.sock_recv(c, 100), 5) == b"re:hi%d" % i
        assert len(port.sessions) == 2  # the least recently used made room
        assert clients[0].getsockname() not in port.sessions
        await asyncio.sleep(1.0)  # idle out (swept every 0.15 s)
        assert len(port.sessions) == 0
        clients[1].send(b"again")
        assert await asyncio.wait_for(loop.sock_recv(clients[1], 100), 5) == b"re:again"
        assert relay.stats.udp_sessions == 4
        for c in clients:
            c.close()
        relay.close()
        t.close()

    run(loop_name, body)
