"""Forwarding names outside the cluster zone to upstream resolvers, with a cache.

Like CoreDNS's *forward* plugin (plugin/forward): the client's query goes
upstream unchanged except for its ID, over the protocol the client used
(a truncated UDP answer goes back truncated and the client retries over
TCP), trying the next upstream when one times out.  Like the *cache*
plugin (plugin/cache, ``cache 30`` in the default Corefile), NOERROR and
NXDOMAIN answers are kept for their smallest TTL capped at ``max_ttl``,
served with TTLs counted down, the asker's ID and the asker's spelling of
the name.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kubelab.dns import wire

DEFAULT_TIMEOUT = 2.0  # CoreDNS forward: read timeout per upstream attempt


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """"1.2.3.4", "1.2.3.4:53", "[fd00::1]:53", "fd00::1" -> (host, port); ValueError names what is wrong."""
    t = text.strip()
    if t.startswith("dns://"):
        t = t[len("dns://") :]
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif t.count(":") == 1:
        host, _, p = t.partition(":")
        port = int(p) if p else default_port
    else:
        host, port = t, default_port
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (write ADDR or ADDR:PORT, [IPv6]:PORT)") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is out of range 1-65535")
    return host, port


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The ``nameserver`` lines of a resolv.conf, in order."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1])
    except FileNotFoundError:
        pass
    return out


@dataclass
class CacheStats:
    hits_success: int = 0
    hits_denial: int = 0
    misses: int = 0


@dataclass(slots=True)
class _Entry:
    wire: bytes
    stored: float
    expires: float
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    qend: int
    denial: bool


@dataclass
class Cache:
    """The forwarder's answer cache (CoreDNS plugin/cache semantics, simplified to one store)."""

    max_ttl: int = 30
    min_ttl: int = 5
    capacity: int = 10000
    clock: object = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)
    _store: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key: bytes, query: bytes, qend: int) -> bytes | None:
        e = self._store.get(key)
        if e is None:
            self.stats.misses += 1
            return None
        now = self.clock()
        if now >= e.expires:
            del self._store[key]
            self.stats.misses += 1
            return None
        if e.denial:
            self.stats.hits_denial += 1
        else:
            self.stats.hits_success += 1
        age = int(now - e.stored)
        buf = bytearray(e.wire)
        buf[0:2] = query[0:2]
        buf[12:qend] = query[12:qend]  # the asker's spelling (same length by construction of the key)
        for off, ttl in zip(e.ttl_offsets, e.ttls, strict=True):
            struct.pack_into("!I", buf, off, max(0, ttl - age))
        # RD and CD follow the asker.
        buf[2] = (buf[2] & ~wire.RD) | (query[2] & wire.RD)
        return bytes(buf)

    def put(self, key: bytes, response: bytes) -> None:
        if self.max_ttl <= 0 or len(response) < 12:
            return
        rcode = response[3] & 0xF
        if rcode not in (wire.NOERROR, wire.NXDOMAIN) or response[2] & wire.TC:
            return
        try:
            qd, an, ns, ar = struct.unpack("!HHHH", response[4:12])
            if qd != 1:
                return
            qend = wire.question_end(response)
            recs = wire.walk_records(response, qend, an + ns + ar)
        except (ValueError, IndexError, struct.error):
            return
        offsets = tuple(t for _, t, _ in recs if t >= 0)
        ttls = tuple(struct.unpack_from("!I", response, t)[0] for t in offsets)
        denial = rcode == wire.NXDOMAIN or an == 0
        relevant = ttls[: an + ns] if an + ns else ()
        ttl = min(relevant) if relevant else self.min_ttl
        if denial and ns:
            # RFC 2308: negative answers live for min(SOA TTL, SOA MINIMUM).
            try:
                soa_start = recs[an][0]
                rdata_at = wire.skip_name(response, soa_start) + 10
                rdata_at = wire.skip_name(response, wire.skip_name(response, rdata_at))
                minimum = struct.unpack_from("!I", response, rdata_at + 16)[0]
                ttl = min(ttl, minimum)
            except (ValueError, IndexError, struct.error):
                pass
        ttl = max(self.min_ttl, min(ttl, self.max_ttl))
        now = self.clock()
        if key in self._store:
            del self._store[key]
        elif len(self._store) >= self.capacity:
            self._store.popitem(last=False)
        self._store[key] = _Entry(response, now, now + ttl, offsets, ttls, qend, denial)

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()


class _UpstreamUDP(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream, multiplexing queries by ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        fut = self.pending.pop((data[0] << 8) | data[1], None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def error_received(self, exc) -> None:  # ICMP unreachable and friends: let the timeout decide
        pass

    def connection_lost(self, exc) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("upstream socket closed"))
        self.pending.clear()


@dataclass
class ForwardStats:
    requests: int = 0
    failures: int = 0
    responses: dict = field(default_factory=dict)  # rcode -> count


class Forwarder:
    """Sends queries to the upstreams in order until one answers."""

    def __init__(self, upstreams: list[tuple[str, int]], *, timeout: float = DEFAULT_TIMEOUT, cache: Cache | None = None) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.cache = cache if cache is not None else Cache()
        self.stats = ForwardStats()
        self._udp: dict[tuple[str, int], _UpstreamUDP] = {}
        self._rand = random.Random()

    async def _proto(self, up: tuple[str, int]) -> _UpstreamUDP:
        p = self._udp.get(up)
        if p is None or p.transport is None or p.transport.is_closing():
            loop = asyncio.get_running_loop()
            _, p = await loop.create_datagram_endpoint(_UpstreamUDP, remote_addr=up)
            self._udp[up] = p
        return p

    async def query(self, data: bytes, key: bytes, qend: int, *, tcp: bool = False) -> bytes | None:
        """The upstream's answer to client query ``data`` with the client's ID, or None when all failed."""
        cached = self.cache.get(key, data, qend)
        if cached is not None:
            return cached
        for up in self.upstreams:
            self.stats.requests += 1
            try:
                resp = await (self._tcp_query(up, data) if tcp else self._udp_query(up, data))
            except (OSError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                self.stats.failures += 1
                continue
            if resp is None or len(resp) < 12:
                self.stats.failures += 1
                continue
            rc = resp[3] & 0xF
            self.stats.responses[rc] = self.stats.responses.get(rc, 0) + 1
            self.cache.put(key, resp)
            return resp
        return None

    async def _udp_query(self, up: tuple[str, int], data: bytes) -> bytes | None:
        p = await self._proto(up)
        loop = asyncio.get_running_loop()
        for _ in range(16):
            qid = self._rand.getrandbits(16)
            if qid not in p.pending:
                break
        fut = loop.create_future()
        p.pending[qid] = fut
        try:
            p.transport.sendto(struct.pack("!H", qid) + data[2:])
            resp = await asyncio.wait_for(fut, self.timeout)
        finally:
            p.pending.pop(qid, None)
        # Check it answers our question (the same name, any case) before trusting it.
        n = _qlen(data)
        if resp[4:6] != b"\x00\x01" or len(resp) < 12 + n or resp[12 : 12 + n].lower() != data[12 : 12 + n].lower():
            return None
        return data[:2] + resp[2:]

    async def _tcp_query(self, up: tuple[str, int], data: bytes) -> bytes | None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(up[0], up[1]), self.timeout)
        try:
            qid = self._rand.getrandbits(16)
            msg = struct.pack("!H", qid) + data[2:]
            writer.write(struct.pack("!H", len(msg)) + msg)
            await writer.drain()
            hdr = await asyncio.wait_for(reader.readexactly(2), self.timeout)
            resp = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", hdr)[0]), self.timeout)
        finally:
            writer.close()
        if len(resp) < 12 or resp[0:2] != struct.pack("!H", qid):
            return None
        return data[:2] + resp[2:]

    async def lookup(self, name: str, qtype: int, *, tcp: bool = False):
        """Resolve ``name`` upstream for ``qtype`` (ExternalName targets); a dnspython message, or None."""
        import dns.message

        q = dns.message.make_query(name, qtype)
        q.flags |= 0x0100  # RD
        data = q.to_wire()
        parsed = wire.parse_query(data)
        if parsed is None:
            return None
        resp = await self.query(data, parsed.key, parsed.qend, tcp=tcp)
        if resp is None:
            return None
        try:
            return dns.message.from_wire(resp, ignore_trailing=True)
        except Exception:  # noqa: BLE001 - a broken upstream answer counts as no answer
            return None

    def close(self) -> None:
        for p in self._udp.values():
            if p.transport is not None:
                p.transport.close()
        self._udp.clear()


def _qlen(data: bytes) -> int:
    try:
        return wire.question_end(data) - 12
    except ValueError:
        return 0
