"""The userspace mode's asyncio driver: listeners, TCP splice relays, UDP sessions.

Design (measured, see BENCHMARKS.md ``## userspace`` and DESIGN.md):

* TCP relays move bytes with ``os.splice`` socket -> pipe -> socket, never
  through Python buffers.  Relayed sockets sit in one edge-triggered epoll
  set of our own (:class:`Poller`), which the event loop watches through a
  single descriptor: each socket is registered once and never re-armed,
  which took relay CPU per short connection down by about a quarter against
  per-socket ``loop.add_reader`` / ``add_writer`` (BENCHMARKS.md).  No
  asyncio transports or protocols are used, so uvloop's half-close crash in
  Protocol-pair relays (MagicStack/uvloop#706, #649: ``write_eof`` under
  many short connections) is not on this path at all; the kernel test
  ``test_userspace_storm`` runs 100,000 short half-closing connections
  through it on uvloop (and 20,000 on stdlib asyncio).
* Each direction is a :class:`~kubelab.modes.userspace.relay.Flow` (the
  decisions) plus its descriptors (the I/O).  Empty pipes go back to a pool,
  so a short connection costs no pipe() / fcntl() calls.
* A connection dials the endpoint the load balancer picks with kube-proxy's
  growing timeouts (250 ms, 500 ms, 1 s, 2 s); a refused or silent endpoint
  is put in quarantine and the next one is tried, so the client never sees
  a dead pod while a live one exists.
* UDP: one listening socket per service port; per client address a
  connected socket to the chosen endpoint, kept in a bounded
  :class:`~kubelab.modes.userspace.relay.SessionTable` with an idle
  timeout.  Replies leave from the exact local address the client's datagram
  was delivered to (``IP_PKTINFO``), so conntrack maps them back to the
  service address the client asked.
* A global connection limit: at the limit the listeners stop accepting (new
  connections wait in the kernel backlog) and say so in the log once;
  accepting resumes when connections close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import struct
from _socket import socket as _rawsocket  # the C socket type: no Python wrapper, no enum conversions
from collections.abc import Callable
from dataclasses import dataclass, field
from kubelab.model import ServicePortName
from kubelab.modes.userspace.loadbalancer import LoadBalancerRR, NoEndpointsError
from kubelab.modes.userspace.relay import Flow, SessionTable, dial_timeouts

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ; Python 3.10+ has fcntl.F_SETPIPE_SZ too
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h
_PKTINFO_SPACE = socket.CMSG_SPACE(12)  # struct in_pktinfo
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_EP_IN, _EP_OUT, _EP_ERR, _EP_HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
_EP_RDHUP = select.EPOLLRDHUP
_EP_MASK = _EP_IN | _EP_OUT | _EP_RDHUP | select.EPOLLET
_EP_READISH = _EP_IN | _EP_RDHUP | _EP_HUP | _EP_ERR  # the next read says what happened
_EP_WRITEISH = _EP_OUT | _EP_HUP | _EP_ERR
_EP_CLOSING = _EP_RDHUP | _EP_HUP | _EP_ERR
_COPY_CHUNK = 65536  # copy-mode buffer; a read that fills it switches the flow to splice
_ACCEPT_BATCH = 64
_UDP_BATCH = 64
_UDP_MAX_DATAGRAM = 65535


@dataclass(frozen=True)
class DriverOptions:
    """Knobs of the relays (the proxier fills them from ProxyConfig)."""

    max_connections: int = 10000
    connect_retries: int = 4
    udp_idle_timeout: float = 0.25
    udp_max_sessions: int = 1024
    endpoint_grace_period: float = 30.0
    pipe_size: int = 256 * 1024
    pipe_pool: int = 256
    listen_backlog: int = 4096


@dataclass
class RelayStats:
    """Counters a test or the metrics endpoint can read."""

    accepted: int = 0
    relayed: int = 0  # connections that reached an endpoint
    closed: int = 0
    dial_failures: int = 0
    retries: int = 0
    no_endpoint: int = 0  # connections closed because every try failed or none existed
    limit_pauses: int = 0
    udp_sessions: int = 0
    udp_datagrams_in: int = 0
    udp_datagrams_out: int = 0
    udp_dropped: int = 0
    udp_replays: int = 0
    grace_closed: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"ip:port"`` / ``"[v6]:port"`` -> (ip, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class PipePool:
    """Empty kernel pipes, reused across connections."""

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # keep the default 64 KiB (pipe-max-size or the user's pipe budget said no)
        return r, w

    def put(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def capacity(self, pipe: tuple[int, int]) -> int:
        try:
            import fcntl

            return fcntl.fcntl(pipe[1], 1032)  # F_GETPIPE_SZ
        except OSError:
            return 65536

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


class Relay:
    """Everything the listeners of one proxier share: loop, balancer, pipes, limit."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        lb: LoadBalancerRR,
        options: DriverOptions,
        logger: logging.Logger,
    ):
        self.loop = loop
        self.lb = lb
        self.options = options
        self.log = logger
        self.stats = RelayStats()
        self.pipes = PipePool(options.pipe_size, options.pipe_pool)
        self.poller = Poller(loop, logger)
        # One copy buffer for every connection: the loop runs one callback
        # at a time and each read is sent (or its rest saved) before the next.
        self.copy_buf = bytearray(_COPY_CHUNK)
        self.copy_view = memoryview(self.copy_buf)
        self.pipe_capacity = 0  # learnt from the first pipe
        self.timeouts = dial_timeouts(options.connect_retries)
        self.active = 0  # TCP connections open (dialing or relaying)
        self.tcp_ports: set[TcpServicePort] = set()
        self.udp_ports: set[UdpServicePort] = set()
        self._at_limit = False
        self._sweeper: asyncio.TimerHandle | None = None

    # -- connection limit -------------------------------------------------

    def _conn_opened(self) -> None:
        self.active += 1
        if self.active >= self.options.max_connections and not self._at_limit:
            self._at_limit = True
            self.stats.limit_pauses += 1
            self.log.warning(
                "userspace: connection limit reached: %d connections open (--userspace-max-connections %d); "
                "listeners stop accepting and new connections wait in the kernel backlog until some close. "
                "Raise the limit if this is normal load.",
                self.active,
                self.options.max_connections,
            )
            for p in self.tcp_ports:
                p.pause()

    def _conn_closed(self) -> None:
        self.active -= 1
        self.stats.closed += 1
        if self._at_limit and self.active <= self._resume_at():
            self._at_limit = False
            self.log.warning("userspace: %d connections open, below the limit again: accepting", self.active)
            for p in self.tcp_ports:
                p.resume()

    def _resume_at(self) -> int:
        m = self.options.max_connections
        return m - max(1, m // 20)

    @property
    def at_limit(self) -> bool:
        return self._at_limit

    # -- listeners ----------------------------------------------------------

    def open_tcp(self, name: ServicePortName, listen_ip: str, port: int = 0) -> TcpServicePort:
        p = TcpServicePort(self, name, listen_ip, port)
        self.tcp_ports.add(p)
        return p

    def open_udp(self, name: ServicePortName, listen_ip: str, port: int = 0) -> UdpServicePort:
        p = UdpServicePort(self, name, listen_ip, port)
        self.udp_ports.add(p)
        self._ensure_sweeper()
        return p

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            interval = min(1.0, max(0.05, self.options.udp_idle_timeout / 2))
            self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _sweep(self, interval: float) -> None:
        self._sweeper = None
        for p in list(self.udp_ports):
            p.expire()
        if self.udp_ports:
            self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def close(self) -> None:
        """Close every listener and connection, and the pipe pool."""
        for p in list(self.tcp_ports):
            p.close(close_connections=True)
        for p in list(self.udp_ports):
            p.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pipes.close()
        self.poller.close()


class TcpServicePort:
    """The listener of one TCP service port and the connections it accepted."""

    def __init__(self, relay: Relay, name: ServicePortName, listen_ip: str, port: int = 0):
        self.relay = relay
        self.name = name
        family = socket.AF_INET6 if ":" in listen_ip else socket.AF_INET
        self.family = family
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listen_ip, port))
            sock.listen(relay.options.listen_backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.port = sock.getsockname()[1]
        self.conns: set[TcpConnection] = set()
        self.by_endpoint: dict[str, set[TcpConnection]] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._accepting = False
        self.closed = False
        if not relay.at_limit:
            self.resume()

    def pause(self) -> None:
        if self._accepting:
            self.relay.loop.remove_reader(self.fd)
            self._accepting = False

    def resume(self) -> None:
        if not self._accepting and not self.closed:
            self.relay.loop.add_reader(self.fd, self._on_accept)
            self._accepting = True

    def _on_accept(self) -> None:
        relay = self.relay
        for _ in range(_ACCEPT_BATCH):
            if relay.at_limit or self.closed:
                return
            try:
                fd, caddr = self.sock._accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: back off instead of spinning on a
                    # listener that stays readable.
                    relay.log.error(
                        "userspace: accept on %s failed: %s; pausing this listener for 100 ms "
                        "(raise the open-files limit or lower --userspace-max-connections)",
                        self.name,
                        e,
                    )
                    self.pause()
                    relay.loop.call_later(0.1, self.resume)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                relay.log.error("userspace: accept on %s failed: %s", self.name, e)
                return
            relay.stats.accepted += 1
            # Family, type and protocol given: no getsockname/getsockopt calls.
            csock = _rawsocket(self.family, socket.SOCK_STREAM, 0, fd)
            TcpConnection(self, csock, caddr[0]).dial()

    def endpoints_changed(self, current: set[str]) -> None:
        """Connections to endpoints that left are closed after the grace period."""
        for ep, timer in list(self._grace.items()):
            if ep in current:
                timer.cancel()
                del self._grace[ep]
        for ep, conns in self.by_endpoint.items():
            if conns and ep not in current and ep not in self._grace:
                self._grace[ep] = self.relay.loop.call_later(
                    self.relay.options.endpoint_grace_period, self._grace_expired, ep
                )

    def _grace_expired(self, ep: str) -> None:
        self._grace.pop(ep, None)
        if ep in self.relay.lb.endpoints(self.name) and not self.closed:
            return
        conns = list(self.by_endpoint.get(ep, ()))
        if conns:
            self.relay.log.info(
                "userspace: closing %d connection(s) of %s to removed endpoint %s after the %.0f s grace period",
                len(conns),
                self.name,
                ep,
                self.relay.options.endpoint_grace_period,
            )
        for c in conns:
            self.relay.stats.grace_closed += 1
            c.abort()

    def close(self, close_connections: bool = False) -> None:
        """Stop accepting; established connections get the grace period (or close now)."""
        if self.closed:
            return
        self.pause()
        self.closed = True
        self.sock.close()
        self.relay.tcp_ports.discard(self)
        for t in self._grace.values():
            t.cancel()
        self._grace.clear()
        if close_connections:
            for c in list(self.conns):
                c.abort()
        else:
            for ep, conns in self.by_endpoint.items():
                if conns:
                    self._grace[ep] = self.relay.loop.call_later(
                        self.relay.options.endpoint_grace_period, self._grace_expired, ep
                    )


class Poller:
    """An edge-triggered epoll set of relayed sockets, watched by the event loop through one fd.

    Why not ``loop.add_reader`` per socket: every (un)registration through
    the loop allocates handles (and under uvloop a libuv poll handle per fd),
    and level-triggered interest has to be switched on and off as pipes fill
    and drain.  Here each socket is registered once, edge-triggered, for
    everything; closing it removes it.  Handlers must tolerate spurious
    events (they just try the I/O and meet EAGAIN).

    Sockets closed while a batch of events is dispatched are closed after
    the batch, so their descriptor numbers cannot be reused by a new socket
    that would then receive the old socket's pending events.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, logger: logging.Logger):
        self.loop = loop
        self.log = logger
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.dispatching = False
        self.to_close: list = []
        loop.add_reader(self.ep.fileno(), self.dispatch)

    def register(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, _EP_MASK)

    def forget(self, fd: int) -> None:
        self.handlers.pop(fd, None)

    def close_later(self, sock) -> None:
        if self.dispatching:
            self.to_close.append(sock)
        else:
            sock.close()

    def dispatch(self) -> None:
        handlers = self.handlers
        self.dispatching = True
        try:
            for fd, ev in self.ep.poll(0, 1024):
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h(ev)
                    except Exception:  # noqa: BLE001 - one broken connection must not starve the batch
                        self.log.exception("userspace: relay handler failed")
        finally:
            self.dispatching = False
            if self.to_close:
                for s in self.to_close:
                    s.close()
                self.to_close.clear()

    def close(self) -> None:
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()


class _Dir(Flow):
    """One direction of a connection: a Flow plus the sockets (and pipe) it moves between.

    A direction starts in *copy* mode: ``recv_into`` a buffer shared by all
    connections, ``send`` at once; only a partial send keeps bytes (at most
    one buffer) for later.  For small messages that is two system calls and
    no pipe; and a short ``recv`` proves the socket drained, so no EAGAIN
    probe is needed.  The first read that fills the whole buffer marks the
    flow as bulk: it switches to *splice* mode (socket -> pooled pipe ->
    socket, no copy through Python) once its leftover is sent.

    ``readable`` / ``writable`` remember the last edge seen on the source /
    destination until a call meets EAGAIN (or a short read drains it);
    ``rdhup`` remembers that the peer's FIN was announced, so a short read
    does not end reading before the 0 that confirms it.
    """

    __slots__ = (
        "conn", "ssock", "src", "dsock", "dst", "pipe", "pr", "pw", "spliced", "bulk",
        "leftover", "readable", "writable", "stalled", "rdhup",
    )

    def __init__(self, conn: TcpConnection, ssock, dsock):
        super().__init__(_COPY_CHUNK)
        self.conn = conn
        self.ssock = ssock
        self.src = ssock.fileno()
        self.dsock = dsock
        self.dst = dsock.fileno()
        self.pipe: tuple[int, int] | None = None
        self.pr = self.pw = -1
        self.spliced = False
        self.bulk = False
        self.leftover = b""
        self.readable = False
        self.writable = True
        self.rdhup = False
        # The pipe counts slots, not bytes: a pipe full of small skbs refuses
        # more data before ``pending`` reaches the capacity.  EAGAIN on the
        # read with bytes in the pipe is therefore ambiguous: wait for a
        # write to free room, then read again.
        self.stalled = False

    def pump(self) -> bool:
        """Move what can be moved now; False if the connection was closed."""
        if not (self._splice() if self.spliced else self._copy()):
            return False
        if self.should_shutdown:
            conn = self.conn
            self.shut()
            if conn.done_dirs:
                # The other direction finished already: close() sends this
                # FIN too (both receive queues are empty, so no RST), one
                # system call fewer per connection.
                conn.dir_done()
                return False
            try:
                self.dsock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone; the other direction will notice
            conn.dir_done()
        return True

    def _copy(self) -> bool:
        relay = self.conn.relay
        buf = relay.copy_buf
        while True:
            if self.pending:
                if not self.writable:
                    return True
                try:
                    m = self.dsock.send(self.leftover)
                except BlockingIOError:
                    self.writable = False
                    return True
                except OSError as e:
                    self.conn.abort(e)
                    return False
                self.wrote(m)
                self.leftover = self.leftover[m:]
                if self.pending:
                    self.writable = False  # a short send: the socket buffer is full
                    return True
            if self.bulk:
                self._to_splice()
                return self._splice()
            if not self.readable or self.src_eof:
                return True
            try:
                n = self.ssock.recv_into(buf)
            except BlockingIOError:
                self.readable = False
                return True
            except OSError as e:
                self.conn.abort(e)
                return False
            self.read(n)
            if n == 0:
                return True
            if n == _COPY_CHUNK:
                self.bulk = True
            elif not self.rdhup:
                self.readable = False  # a short read drained the socket
            m = 0
            if self.writable:
                try:
                    m = self.dsock.send(relay.copy_view[:n])
                except BlockingIOError:
                    self.writable = False
                except OSError as e:
                    self.conn.abort(e)
                    return False
            self.wrote(m)
            if m < n:
                self.leftover = bytes(relay.copy_view[m:n])
                self.writable = False

    def _to_splice(self) -> None:
        relay = self.conn.relay
        self.pipe = relay.pipes.get()
        self.pr, self.pw = self.pipe
        if not relay.pipe_capacity:
            relay.pipe_capacity = relay.pipes.capacity(self.pipe)
        self.capacity = relay.pipe_capacity
        self.spliced = True

    def _splice(self) -> bool:
        while True:
            moved = False
            if self.readable and not self.src_eof and not self.stalled and self.pending < self.capacity:
                try:
                    n = os.splice(self.src, self.pw, self.capacity - self.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    if self.pending:
                        self.stalled = True
                    else:
                        self.readable = False  # the pipe is empty: it is the socket that is
                except OSError as e:
                    self.conn.abort(e)
                    return False
                else:
                    self.read(n)
                    moved = n > 0
            if self.pending and self.writable:
                try:
                    m = os.splice(self.pr, self.dst, self.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.writable = False
                except OSError as e:
                    self.conn.abort(e)
                    return False
                else:
                    if m:
                        self.wrote(m)
                        self.stalled = False
                        moved = True
            if not moved:
                return True


class TcpConnection:
    """One client connection: dialing an endpoint (with retries), then relaying."""

    __slots__ = (
        "port", "relay", "poller", "csock", "cfd", "client_ip", "bsock", "bfd", "endpoint",
        "tries", "tried", "timer", "up", "down", "open", "done_dirs", "dialing",
    )

    def __init__(self, port: TcpServicePort, csock, client_ip: str):
        self.port = port
        self.relay = port.relay
        self.poller = self.relay.poller
        csock.setblocking(False)
        self.csock = csock
        self.cfd = csock.fileno()
        self.client_ip = client_ip
        self.bsock = None
        self.bfd = -1
        self.endpoint = ""
        self.tries = 0
        self.tried: set[str] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.up: _Dir | None = None  # client -> backend
        self.down: _Dir | None = None  # backend -> client
        self.open = True
        self.dialing = False
        self.done_dirs = 0
        port.conns.add(self)
        self.relay._conn_opened()

    # -- dialing -------------------------------------------------------------

    def dial(self) -> None:
        relay = self.relay
        while self.open:
            if self.tries >= len(relay.timeouts):
                relay.stats.no_endpoint += 1
                relay.log.warning(
                    "userspace: %s: no endpoint answered after %d tries (%s); closing the client connection from %s",
                    self.port.name, self.tries, ", ".join(sorted(self.tried)) or "none", self.client_ip,
                )
                self.abort()
                return
            try:
                ep = relay.lb.next_endpoint(self.port.name, self.client_ip, bool(self.tries), self.tried)
            except NoEndpointsError:
                relay.stats.no_endpoint += 1
                relay.log.info("userspace: %s has no endpoints; rejecting the connection from %s", self.port.name, self.client_ip)
                self.abort()
                return
            timeout = relay.timeouts[self.tries]
            self.tries += 1
            if self.tries > 1:
                relay.stats.retries += 1
            self.tried.add(ep)
            self.endpoint = ep
            host, port = split_endpoint(ep)
            s = _rawsocket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            err = s.connect_ex((host, port))
            if err == errno.EINPROGRESS or err == 0:
                self.bsock, self.bfd = s, s.fileno()
                self.poller.register(self.bfd, self._on_backend)
                if err == 0:
                    self._connected()
                else:
                    self.dialing = True
                    self.timer = relay.loop.call_later(timeout, self._on_dial_timeout)
                return
            s.close()
            self._dial_failed(ep, os.strerror(err))

    def _dial_result(self, ev: int) -> None:
        if not ev & (_EP_OUT | _EP_ERR | _EP_HUP):
            return
        err = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not ev & _EP_OUT:
            err = errno.ECONNREFUSED
        self.dialing = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if err:
            self._drop_backend()
            self._dial_failed(self.endpoint, os.strerror(err))
            self.dial()
            return
        self._connected()

    def _on_dial_timeout(self) -> None:
        self.timer = None
        if not self.open or not self.dialing:
            return
        self.dialing = False
        self._drop_backend()
        self._dial_failed(self.endpoint, f"no answer within {self.relay.timeouts[self.tries - 1]:g} s")
        self.dial()

    def _drop_backend(self) -> None:
        if self.bsock is not None:
            self.poller.forget(self.bfd)
            self.poller.close_later(self.bsock)
            self.bsock, self.bfd = None, -1

    def _dial_failed(self, ep: str, why: str) -> None:
        relay = self.relay
        relay.stats.dial_failures += 1
        relay.lb.report_dial_failure(self.port.name, ep)
        relay.log.info("userspace: %s: dial to endpoint %s failed (%s); trying the next endpoint", self.port.name, ep, why)

    # -- relaying ------------------------------------------------------------

    def _connected(self) -> None:
        relay = self.relay
        relay.stats.relayed += 1
        for s in (self.csock, self.bsock):
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.up = _Dir(self, self.csock, self.bsock)
        self.down = _Dir(self, self.bsock, self.csock)
        self.port.by_endpoint.setdefault(self.endpoint, set()).add(self)
        self.poller.register(self.cfd, self._on_client)
        # The client usually spoke already (an HTTP request): move it now
        # rather than after another trip through the event loop.
        self.up.readable = True
        self._pump()

    def _on_client(self, ev: int) -> None:
        if ev & _EP_READISH:
            self.up.readable = True
            if ev & _EP_CLOSING:
                self.up.rdhup = True
        if ev & _EP_WRITEISH:
            self.down.writable = True
        self._pump()

    def _on_backend(self, ev: int) -> None:
        if self.dialing:
            self._dial_result(ev)
            return
        if self.down is None:
            return  # an edge from before the relay started
        if ev & _EP_READISH:
            self.down.readable = True
            if ev & _EP_CLOSING:
                self.down.rdhup = True
        if ev & _EP_WRITEISH:
            self.up.writable = True
        self._pump()

    def _pump(self) -> None:
        # The directions share no pipe and no interest: one pass each.
        if self.up.pump() and self.open:
            self.down.pump()

    def dir_done(self) -> None:
        self.done_dirs += 1
        if self.done_dirs == 2:
            self.close()

    def abort(self, err: BaseException | None = None) -> None:
        """Close both sides with a reset, so each peer learns the stream broke."""
        if not self.open:
            return
        for s in (self.csock, self.bsock):
            if s is not None:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        relay = self.relay
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for d in (self.up, self.down):
            if d is not None:
                if d.pipe is not None:
                    relay.pipes.put(d.pipe, d.pending == 0)
                relay.stats.bytes["in" if d is self.up else "out"] += d.bytes
        poller = self.poller
        poller.forget(self.cfd)
        poller.close_later(self.csock)
        if self.bsock is not None:
            poller.forget(self.bfd)
            poller.close_later(self.bsock)
        port = self.port
        port.conns.discard(self)
        if self.up is not None:
            s = port.by_endpoint.get(self.endpoint)
            if s is not None:
                s.discard(self)
                if not s:
                    del port.by_endpoint[self.endpoint]
        relay._conn_closed()


class UdpServicePort:
    """The listening socket of one UDP service port and its client sessions."""

    def __init__(self, relay: Relay, name: ServicePortName, listen_ip: str, port: int = 0):
        self.relay = relay
        self.name = name
        self.v6 = ":" in listen_ip
        sock = socket.socket(socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if not self.v6:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind((listen_ip, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.port = sock.getsockname()[1]
        self.sessions: SessionTable[tuple, _UdpSession] = SessionTable(
            relay.options.udp_max_sessions, relay.options.udp_idle_timeout, relay.loop.time
        )
        self.closed = False
        relay.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        relay = self.relay
        sock = self.sock
        for _ in range(_UDP_BATCH):
            try:
                data, anc, _flags, caddr = sock.recvmsg(_UDP_MAX_DATAGRAM, _PKTINFO_SPACE)
            except BlockingIOError:
                return
            except OSError as e:
                relay.log.debug("userspace: %s: recvmsg: %s", self.name, e)
                return
            relay.stats.udp_datagrams_in += 1
            sess = self.sessions.get(caddr)
            if sess is None:
                sess = self._new_session(caddr, _pktinfo_reply(anc), frozenset())
                if sess is None:
                    continue
            sess.send(data)

    def _new_session(self, caddr: tuple, pktinfo: list, exclude: frozenset[str]) -> _UdpSession | None:
        relay = self.relay
        try:
            ep = relay.lb.next_endpoint(self.name, caddr[0], bool(exclude), exclude)
        except NoEndpointsError:
            relay.stats.udp_dropped += 1
            return None
        host, port = split_endpoint(ep)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.connect((host, port))
        except OSError as e:
            s.close()
            relay.lb.report_dial_failure(self.name, ep)
            relay.log.info("userspace: %s: UDP endpoint %s: %s", self.name, ep, e)
            relay.stats.udp_dropped += 1
            return None
        sess = _UdpSession(self, caddr, pktinfo, s, ep, exclude | {ep})
        for _k, old in self.sessions.add(caddr, sess):
            old.close()
        relay.stats.udp_sessions += 1
        return sess

    def reply(self, sess: _UdpSession, data: bytes) -> None:
        try:
            if sess.pktinfo:
                self.sock.sendmsg([data], sess.pktinfo, 0, sess.caddr)
            else:
                self.sock.sendto(data, sess.caddr)
            self.relay.stats.udp_datagrams_out += 1
        except OSError:
            self.relay.stats.udp_dropped += 1

    def endpoint_refused(self, sess: _UdpSession) -> None:
        """The endpoint answered with ICMP port unreachable: move the client on."""
        relay = self.relay
        relay.lb.report_dial_failure(self.name, sess.endpoint)
        self.sessions.pop(sess.caddr)  # sess is the current one: closed sessions get no events
        sess.close()
        unanswered = sess.unanswered
        # ``tried`` is None once the endpoint answered: a later refusal means
        # it went away, and only the datagram that drew it is replayed.
        tried = sess.tried if sess.tried is not None else frozenset({sess.endpoint})
        if unanswered is not None and len(tried) < len(relay.timeouts):
            nxt = self._new_session(sess.caddr, sess.pktinfo, tried)
            if nxt is not None:
                relay.stats.udp_replays += 1
                nxt.send(unanswered)

    def endpoints_changed(self, current: set[str]) -> None:
        """Sessions to endpoints that left end now: the next datagram picks a live one."""
        for _k, sess in self.sessions.remove_if(lambda s: s.endpoint not in current):
            sess.close()

    def expire(self) -> None:
        for _k, sess in self.sessions.expire():
            sess.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.loop.remove_reader(self.fd)
        self.sock.close()
        for _k, sess in list(self.sessions.items()):
            sess.close()
        self.relay.udp_ports.discard(self)


def _pktinfo_reply(anc: list) -> list:
    """Ancillary data making a reply leave from the address the request came to."""
    for level, typ, data in anc:
        if level == socket.IPPROTO_IP and typ == _IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }:
            # ``addr`` is the header destination (after DNAT/REDIRECT); send
            # from it, on whatever interface routing picks.
            return [(socket.IPPROTO_IP, _IP_PKTINFO, struct.pack("=i4s4s", 0, data[8:12], b"\0\0\0\0"))]
    return []


class _UdpSession:
    """One client's flow through a UDP service port: a connected socket to an endpoint."""

    __slots__ = ("owner", "caddr", "pktinfo", "sock", "fd", "endpoint", "tried", "unanswered", "open")

    def __init__(self, owner: UdpServicePort, caddr: tuple, pktinfo: list, sock: socket.socket, endpoint: str, tried: frozenset[str]):
        self.owner = owner
        self.caddr = caddr
        self.pktinfo = pktinfo
        self.sock = sock
        self.fd = sock.fileno()
        self.endpoint = endpoint
        self.tried = tried
        # Until the endpoint first answers, keep the last datagram so it can
        # be replayed to another endpoint if this one turns out dead.
        self.unanswered: bytes | None = None
        self.open = True
        owner.relay.loop.add_reader(self.fd, self._on_readable)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.owner.relay.stats.udp_dropped += 1
            return
        except ConnectionRefusedError:
            # An earlier datagram drew ICMP port unreachable.
            self.unanswered = data
            self.owner.endpoint_refused(self)
            return
        except OSError:
            self.owner.relay.stats.udp_dropped += 1
            return
        if self.tried is not None:
            self.unanswered = data

    def _on_readable(self) -> None:
        owner = self.owner
        for _ in range(_UDP_BATCH):
            try:
                data = self.sock.recv(_UDP_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                owner.endpoint_refused(self)
                return
            except OSError:
                return
            if self.tried is not None:
                self.tried = None  # answered: no more replays
                self.unanswered = None
            owner.sessions.touch(self.caddr)
            owner.reply(self, data)
            if not self.open:
                return

    def close(self) -> None:
        if self.open:
            self.open = False
            self.owner.relay.loop.remove_reader(self.fd)
            self.sock.close()

