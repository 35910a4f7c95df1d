"""Relay logic of the userspace mode, with no I/O.

The asyncio driver (:mod:`kubelab.modes.userspace.driver`) does the system
calls; the decisions live here so they can be tested without sockets:

* :class:`Flow` -- one direction of a TCP relay (client->backend or
  backend->client) through a kernel pipe: how many bytes sit in the pipe,
  whether the source hit end-of-file, when to read, when to write, when to
  pass the FIN on (``shutdown(SHUT_WR)``).  Half-close falls out of it: each
  direction finishes on its own, the other keeps flowing.  Backpressure too:
  a flow stops reading its source while its pipe is full, so a slow reader
  on one side slows the writer on the other, both ways.
* :data:`ENDPOINT_DIAL_TIMEOUTS` -- kube-proxy's retry schedule.
* :class:`SessionTable` -- the UDP per-client session table: idle timeout,
  bounded size (least recently used sessions make room), expiry sweep.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

# kube-proxy's endpointDialTimeout (pkg/proxy/userspace/proxysocket.go):
# a connection tries up to four endpoints, waiting this long for each.
ENDPOINT_DIAL_TIMEOUTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


def dial_timeouts(retries: int) -> tuple[float, ...]:
    """The connect timeout of each try, for ``retries`` tries (>= 1).

    The first four are kube-proxy's; more tries keep the last (2 s) value.
    """
    if retries < 1:
        raise ValueError(f"userspace connect retries must be at least 1, got {retries}")
    base = ENDPOINT_DIAL_TIMEOUTS
    return base[:retries] + (base[-1],) * max(0, retries - len(base))


class Flow:
    """One direction of a TCP relay, source socket -> pipe -> destination socket.

    The driver asks :attr:`want_read` / :attr:`want_write` after each event
    and keeps its event-loop registrations equal to them; it reports each
    splice with :meth:`read` / :meth:`wrote`, and calls ``shutdown`` on the
    destination once when :attr:`should_shutdown` turns true.
    """

    __slots__ = ("capacity", "pending", "src_eof", "dst_shut", "bytes")

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("pipe capacity must be positive")
        self.capacity = capacity
        self.pending = 0  # bytes in the pipe, not yet written to the destination
        self.src_eof = False  # the source sent FIN
        self.dst_shut = False  # the FIN was passed on to the destination
        self.bytes = 0  # bytes relayed (written to the destination)

    @property
    def room(self) -> int:
        """How much one read may move into the pipe."""
        return self.capacity - self.pending

    @property
    def want_read(self) -> bool:
        return not self.src_eof and self.pending < self.capacity

    @property
    def want_write(self) -> bool:
        return self.pending > 0

    @property
    def should_shutdown(self) -> bool:
        """The source finished and everything it sent was delivered: pass the FIN on."""
        return self.src_eof and self.pending == 0 and not self.dst_shut

    @property
    def done(self) -> bool:
        return self.dst_shut

    def read(self, n: int) -> None:
        """A read moved ``n`` bytes from the source into the pipe (0 = end of file)."""
        if n < 0 or n > self.capacity - self.pending:
            raise ValueError(f"read of {n} bytes into a pipe with {self.capacity - self.pending} free")
        if self.src_eof and n:
            raise ValueError("read after end of file")
        if n == 0:
            self.src_eof = True
        else:
            self.pending += n

    def wrote(self, n: int) -> None:
        """A write moved ``n`` bytes from the pipe to the destination."""
        if n < 0 or n > self.pending:
            raise ValueError(f"write of {n} bytes from a pipe holding {self.pending}")
        self.pending -= n
        self.bytes += n

    def shut(self) -> None:
        """The driver passed the FIN on."""
        if not self.should_shutdown:
            raise ValueError("shutdown before the source finished and the pipe drained")
        self.dst_shut = True


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SessionTable(Generic[K, V]):
    """UDP sessions keyed by client address: idle timeout and a size bound.

    Kept in least-recently-used order, so both the expiry sweep and making
    room stop at the first session that is still fresh.
    """

    def __init__(self, max_sessions: int, idle_timeout: float, clock: Callable[[], float]):
        if max_sessions < 1:
            raise ValueError(f"UDP session table size must be at least 1, got {max_sessions}")
        if idle_timeout <= 0:
            raise ValueError(f"UDP idle timeout must be positive, got {idle_timeout}")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: OrderedDict[K, list] = OrderedDict()  # key -> [value, last_used]

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    def get(self, key: K) -> V | None:
        """The session of ``key``, marked as used now; None if there is none."""
        entry = self._sessions.get(key)
        if entry is None:
            return None
        entry[1] = self._clock()
        self._sessions.move_to_end(key)
        return entry[0]

    def touch(self, key: K) -> None:
        """Traffic from the backend side keeps a session alive too."""
        entry = self._sessions.get(key)
        if entry is not None:
            entry[1] = self._clock()
            self._sessions.move_to_end(key)

    def add(self, key: K, value: V) -> list[tuple[K, V]]:
        """Add a session; returns the sessions evicted to stay within the bound."""
        evicted: list[tuple[K, V]] = []
        old = self._sessions.pop(key, None)
        if old is not None:
            evicted.append((key, old[0]))
        while len(self._sessions) >= self.max_sessions:
            k, (v, _) = self._sessions.popitem(last=False)
            evicted.append((k, v))
        self._sessions[key] = [value, self._clock()]
        return evicted

    def pop(self, key: K) -> V | None:
        entry = self._sessions.pop(key, None)
        return entry[0] if entry else None

    def expire(self) -> list[tuple[K, V]]:
        """Remove and return sessions idle for at least the idle timeout."""
        deadline = self._clock() - self.idle_timeout
        out: list[tuple[K, V]] = []
        while self._sessions:
            k, entry = next(iter(self._sessions.items()))
            if entry[1] > deadline:
                break
            self._sessions.popitem(last=False)
            out.append((k, entry[0]))
        return out

    def remove_if(self, pred: Callable[[V], bool]) -> list[tuple[K, V]]:
        """Remove and return every session whose value matches ``pred``."""
        gone = [(k, e[0]) for k, e in self._sessions.items() if pred(e[0])]
        for k, _ in gone:
            del self._sessions[k]
        return gone

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, e[0]) for k, e in list(self._sessions.items()))
