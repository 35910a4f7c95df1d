"""The cluster DNS responder: a Provider fed by a source, serving UDP and TCP.

:class:`ClusterDNS` receives Service/EndpointSlice/Pod events (it is a
:class:`kubelab.proxy.provider.Provider`), keeps a :class:`ClusterIndex`,
and answers queries:

* hottest path (UDP, :class:`ExactCache`): the very same query bytes as
  before (minus the ID) get the very same answer bytes (with that ID) from
  one dict lookup; datagrams come and go in batches through
  recvmmsg/sendmmsg (:mod:`kubelab.dns.mmsg`), drained on readiness;
* hot path (:meth:`ClusterDNS.answer_fast`): parse the question by hand,
  find a prebuilt :class:`~kubelab.dns.wire.Template` keyed by the
  lowercased question, stamp ID/flags/question/OPT, done;
* slow path (:meth:`ClusterDNS.answer_slow`): everything else -- first sight
  of a question (computed by :class:`~kubelab.dns.answer.Responder` and kept
  as a template), odd packets (dnspython parses them; garbage gets FORMERR or
  is dropped), forwarding with the cache, ExternalName targets, autopath.

Recursion (forwarding) is served only to clients inside ``recursion_cidrs``;
others get REFUSED, as CoreDNS's *acl* plugin would answer them.  Cluster
names are answered to everyone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass, field

from kubelab.dns import mmsg, wire
from kubelab.dns.answer import Reply, Responder, Settings, in_zone, render
from kubelab.dns.forward import Forwarder
from kubelab.dns.index import ClusterIndex
from kubelab.dns.metrics import BUCKET0_NS, NBUCKETS, P_AUTOPATH, P_CACHE, P_FORWARD, P_KUBERNETES, P_NONE, DNSCounters
from kubelab.model import EndpointSlice, Pod, Service
from kubelab.proxy.provider import Provider

DEFAULT_RECURSION_CIDRS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
MAX_TEMPLATES = 200_000  # prebuilt answers kept before the store is dropped and rebuilt on demand
TCP_IDLE_TIMEOUT = 10.0  # CoreDNS: idle timeout of a TCP connection
MAX_EXACT = 50_000  # whole-response entries per UDP socket (about 300 bytes each) before that cache is dropped and refilled
UDP_BATCH = 256  # datagrams drained per readiness wakeup before yielding to the loop
MMSG_BATCH = 64  # datagrams per recvmmsg/sendmmsg call
UDP_RCVBUF = 4 << 20  # ask for a deep receive queue so bursts wait instead of being dropped


@dataclass
class DNSConfig:
    """Everything a :class:`ClusterDNS` is built from."""

    settings: Settings = field(default_factory=Settings)
    recursion_cidrs: tuple[str, ...] = DEFAULT_RECURSION_CIDRS
    autopath: bool = False
    autopath_search: tuple[str, ...] = ()  # the server's own search path, appended after the cluster ones


class ClusterDNS(Provider):
    """Cluster DNS: index + answers + forwarding, without sockets (see :class:`DNSServer`)."""

    def __init__(
        self,
        config: DNSConfig,
        logger: logging.Logger,
        *,
        forwarder: Forwarder | None = None,
        counters: DNSCounters | None = None,
        query_log=None,
    ) -> None:
        self.config = config
        # Called as query_log(client_ip, name_wire, qtype, tcp) for every parsed question (traces, tests).
        self.query_log = query_log
        self.log = logger
        s = config.settings
        self.index = ClusterIndex(keep_pods=s.pods == "verified" or config.autopath)
        self.responder = Responder(self.index, s)
        self.forwarder = forwarder
        self.counters = counters if counters is not None else DNSCounters()
        self.templates: dict[bytes, wire.Template] = {}
        self.plugin_of: dict[bytes, int] = {}
        self.autopath_templates: dict[bytes, tuple[wire.Template, bool]] = {}  # -> (answer, walk found something)
        # The whole-packet caches of the UDP sockets (see _UDPServer); cleared with the templates.
        self.exact_caches: list[ExactCache] = []
        self._gen = -1
        self._nets = [ipaddress.ip_network(c, strict=False) for c in config.recursion_cidrs]
        self._allowed: dict[str, bool] = {}
        zone_wire = wire.text_to_wire(s.zone)
        self._svc_zone_wire = b"\x03svc" + zone_wire

    # -- Provider ------------------------------------------------------------

    def on_service_add(self, service: Service) -> None:
        self.index.set_service(service)

    def on_service_update(self, old: Service, new: Service) -> None:
        if (old.namespace, old.name) != (new.namespace, new.name):
            self.index.delete_service(old)
        self.index.set_service(new)

    def on_service_delete(self, service: Service) -> None:
        self.index.delete_service(service)

    def on_services_synced(self) -> None:
        if not self.index.services_synced:
            self.index.services_synced = True
            self.index._changed()
            self.log.info("services synced (%d)", len(self.index.services))

    def on_endpoint_slice_add(self, slice_: EndpointSlice) -> None:
        self.index.set_slice(slice_)

    def on_endpoint_slice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        if (old.namespace, old.name, old.service_name) != (new.namespace, new.name, new.service_name):
            self.index.delete_slice(old)
        self.index.set_slice(new)

    def on_endpoint_slice_delete(self, slice_: EndpointSlice) -> None:
        self.index.delete_slice(slice_)

    def on_endpoint_slices_synced(self) -> None:
        if not self.index.endpoints_synced:
            self.index.endpoints_synced = True
            self.index._changed()
            self.log.info("endpoint slices synced (%d services with endpoints)", len(self.index.slices))

    def on_pod_add(self, pod: Pod) -> None:
        self.index.set_pod(pod)

    def on_pod_update(self, old: Pod, new: Pod) -> None:
        if (old.namespace, old.name) != (new.namespace, new.name):
            self.index.delete_pod(old)
        self.index.set_pod(new)

    def on_pod_delete(self, pod: Pod) -> None:
        self.index.delete_pod(pod)

    def on_pods_synced(self) -> None:
        self.index.pods_synced = True

    @property
    def ready(self) -> bool:
        return self.index.synced

    # -- answering -----------------------------------------------------------

    def _fresh(self) -> None:
        if self._gen != self.index.generation:
            self.templates.clear()
            self.plugin_of.clear()
            self.autopath_templates.clear()
            for c in self.exact_caches:
                c.clear()
            self._gen = self.index.generation

    def fold_counts(self) -> None:
        """Move the per-entry hit counts of the UDP whole-packet caches into :attr:`counters` (before a scrape)."""
        for c in self.exact_caches:
            c.fold()

    def recursion_allowed(self, ip: str) -> bool:
        ok = self._allowed.get(ip)
        if ok is None:
            try:
                a = ipaddress.ip_address(ip.split("%", 1)[0])
                if a.version == 6 and a.ipv4_mapped is not None:
                    a = a.ipv4_mapped
                ok = any(a in n for n in self._nets)
            except ValueError:
                ok = False
            if len(self._allowed) > 10000:
                self._allowed.clear()
            self._allowed[ip] = ok
        return ok

    def _autopath_ns(self, client_ip: str, q: wire.Query) -> str | None:
        """The client pod's namespace when autopath applies to this question (cheap wire check)."""
        ns = self.index.pod_namespace_for_ip(client_ip)
        if ns is None:
            return None
        if not q.name_wire.endswith(bytes((len(ns),)) + ns.encode() + self._svc_zone_wire):
            return None
        return ns

    def answer_fast(self, data: bytes, client_ip: str, tcp: bool):
        """(answer, qtype) from a prebuilt template, or False when the slow path is needed.

        Written for speed: the question is located with one ``find`` of the
        root label.  A zero byte inside a label would end the name early,
        but then the key is not a valid name and matches no template.
        """
        n = len(data)
        if n < 17 or data[2] & 0xF8 or data[4:11] != b"\x00\x01\x00\x00\x00\x00\x00" or self.query_log is not None:
            return False
        end = data.find(0, 12)
        qend = end + 5
        if end < 0 or qend > n:
            return False
        if self._gen != self.index.generation:
            self._fresh()
        key = data[12 : end + 1].lower() + data[end + 1 : qend]
        if self.config.autopath:
            q = wire.parse_query(data)
            if q is None:
                return False
            if self._autopath_ns(client_ip, q) is not None:
                hit = self.autopath_templates.get(key)
                if hit is None:
                    return False
                t, found = hit
                if found:
                    self.counters.autopath_success += 1
            else:
                t = self.templates.get(key)
        else:
            t = self.templates.get(key)
        if t is None:
            return False
        qtype = (data[end + 1] << 8) | data[end + 2]
        ar = data[11]
        if ar == 0:
            if qend != n:
                return False
            return t.stamp_raw(data, qend, -1, False, 65535 if tcp else 512), qtype
        # one OPT record, version 0
        if ar != 1 or n < qend + 11 or data[qend : qend + 3] != b"\x00\x00\x29" or data[qend + 6] or qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]) != n:
            return False
        size = (data[qend + 3] << 8) | data[qend + 4]
        limit = 65535 if tcp else (size if size > 512 else 512)
        return t.stamp_raw(data, qend, size if size > 512 else 512, bool(data[qend + 7] & 0x80), limit), qtype

    def log_query(self, data: bytes, client_ip: str, tcp: bool) -> None:
        q = wire.parse_query(data)
        if q is not None:
            self.query_log(client_ip, data[12 : q.qend - 4], q.qtype, tcp)

    async def answer_slow(self, data: bytes, client_ip: str, tcp: bool) -> tuple[bytes | None, int, int, int]:
        """(response or None to drop, qtype, rcode, plugin) for any packet."""
        if self.query_log is not None:
            self.log_query(data, client_ip, tcp)
        q = wire.parse_query(data)
        if q is None:
            data, q, bad = _canonical_query(data)
            if q is None:
                if bad is None:
                    return None, 0, 0, P_NONE
                return bad, 0, bad[3] & 0xF, P_NONE
        if q.edns_version:
            # RFC 6891 6.1.3: unknown EDNS version -> BADVERS (extended rcode 16 = 1 in the OPT TTL's top byte).
            resp = wire.error_response(data, 0) or b""
            if resp:
                resp = resp[:10] + b"\x00\x01" + resp[12:] + b"\x00\x00\x29\x04\xd0\x01\x00\x00\x00\x00\x00"
            return resp, q.qtype, wire.BADVERS, P_NONE
        self._fresh()
        limit = 65535 if tcp else (q.edns if q.edns > 0 else wire.MIN_UDP_SIZE)
        qname = wire.name_to_text(q.name_wire).lower()
        if q.qclass not in (wire.CLASS_IN, wire.TYPE_ANY):
            return wire.error_response(data, wire.REFUSED), q.qtype, wire.REFUSED, P_NONE

        ap_ns = self._autopath_ns(client_ip, q) if self.config.autopath else None
        if ap_ns is not None and in_zone(qname, f"{ap_ns}.svc.{self.config.settings.zone}"):
            return await self._autopath(data, q, qname, ap_ns, client_ip, tcp, limit)

        reply = self.responder.answer(qname, q.qtype)
        if reply.forward:
            return await self._forward(data, q, client_ip, tcp)
        if reply.needs:
            reply = await self._with_upstream(qname, q.qtype, reply, client_ip, tcp)
        t = self._template(q, reply)
        if not reply.dynamic and len(self.templates) < MAX_TEMPLATES:
            self.templates[q.key] = t
        return t.stamp(data, q, limit), q.qtype, reply.rcode, P_KUBERNETES

    def _template(self, q: wire.Query, reply: Reply) -> wire.Template:
        return wire.template_from_wire(render(reply, q.name_wire, q.qtype, q.qclass))

    async def _with_upstream(self, qname: str, qtype: int, reply: Reply, client_ip: str, tcp: bool) -> Reply:
        upstream: dict = {}
        allowed = self.recursion_allowed(client_ip) and self.forwarder is not None
        for name, t in reply.needs:
            upstream[(name, t)] = await self.forwarder.lookup(name, t, tcp=tcp) if allowed else _refused_msg(name, t)
        return self.responder.answer(qname, qtype, upstream)

    async def _forward(self, data: bytes, q: wire.Query, client_ip: str, tcp: bool):
        if self.forwarder is None or not self.forwarder.upstreams or not self.recursion_allowed(client_ip):
            return wire.error_response(data, wire.REFUSED), q.qtype, wire.REFUSED, P_NONE
        before = self.forwarder.cache.stats.misses
        resp = await self.forwarder.query(data, q.key, q.qend, tcp=tcp)
        plugin = P_FORWARD if self.forwarder.cache.stats.misses != before else P_CACHE
        if resp is None:
            return wire.error_response(data, wire.SERVFAIL), q.qtype, wire.SERVFAIL, P_NONE
        return resp, q.qtype, resp[3] & 0xF, plugin

    async def _autopath(self, data, q, qname, ns, client_ip, tcp, limit):
        """CoreDNS autopath: walk the pod's search path on the server, CNAME the asked name to the found one."""
        import dns.message
        import dns.name
        import dns.rrset

        zone = self.config.settings.zone
        first = f"{ns}.svc.{zone}"
        base = qname[: -len(first) - 1] if qname != first else ""
        search = [first, f"svc.{zone}", zone, *self.config.autopath_search, ""]
        orig = wire.name_to_text(q.name_wire)  # the asker's spelling
        first_reply = None
        dynamic = False
        for s in search:
            if not base:
                break
            name = f"{base}.{s}" if s else f"{base}."
            reply = self.responder.answer(name, q.qtype)
            if reply.forward:
                dynamic = True
                if self.forwarder is None or not self.recursion_allowed(client_ip):
                    msg = _refused_msg(name, q.qtype)
                else:
                    msg = await self.forwarder.lookup(name, q.qtype, tcp=tcp)
                if msg is None:
                    continue  # a forwarding failure writes nothing: try the next element
            else:
                if reply.needs:
                    reply = await self._with_upstream(name, q.qtype, reply, client_ip, tcp)
                    dynamic = True
                qw = wire.text_to_wire(name)
                msg = dns.message.from_wire(render(reply, qw, q.qtype, q.qclass))
            if first_reply is None:
                first_reply = msg
            # CoreDNS: an element whose handler did not write to the client
            # (plugin.ClientWrite false: SERVFAIL, REFUSED, FORMERR, NOTIMP)
            # or that is NXDOMAIN moves the walk on; anything else is the answer.
            if msg.rcode() in _WALK_ON:
                continue
            # cnamer: prefix a CNAME from the asked name to the first answer's owner.
            origname = dns.name.from_text(orig)
            for rrset in msg.answer:
                if rrset.name != origname:
                    c = dns.rrset.from_text(origname, rrset.ttl, "IN", "CNAME", rrset.name.to_text())
                    msg.answer.insert(0, c)
                    break
            msg.question = [dns.rrset.RRset(origname, q.qclass, q.qtype)]
            self.counters.autopath_success += 1
            return self._finish_autopath(data, q, msg, limit, dynamic, True)
        if first_reply is None:
            return wire.error_response(data, wire.SERVFAIL), q.qtype, wire.SERVFAIL, P_AUTOPATH
        first_reply.question = [dns.rrset.RRset(dns.name.from_text(orig), q.qclass, q.qtype)]
        # The client keeps walking itself: answer with the first element's reply, under the asked name.
        return self._finish_autopath(data, q, first_reply, limit, dynamic, False)

    def _finish_autopath(self, data, q, msg, limit, dynamic, found):
        msg.id = 0
        msg.use_edns(False)
        raw = msg.to_wire(max_size=65535, want_shuffle=False)  # dnspython shuffles rdatas by default; CoreDNS keeps order
        t = wire.template_from_wire(raw)
        if not dynamic and len(self.autopath_templates) < MAX_TEMPLATES:
            self.autopath_templates[q.key] = (t, found)
        return t.stamp(data, q, limit), q.qtype, t.rcode, P_AUTOPATH


_WALK_ON = frozenset((wire.NXDOMAIN, wire.SERVFAIL, wire.REFUSED, wire.FORMERR, wire.NOTIMP))


def _refused_msg(name: str, qtype: int):
    import dns.message

    m = dns.message.make_response(dns.message.make_query(name, qtype))
    m.set_rcode(wire.REFUSED)
    return m


def _canonical_query(data: bytes) -> tuple[bytes, wire.Query | None, bytes | None]:
    """Parse an unusual packet with dnspython and rebuild it as a plain query.

    Returns (canonical bytes, Query, None) when it is a query we can answer,
    (data, None, error reply) for FORMERR/NOTIMP, (data, None, None) to drop.
    """
    import dns.exception
    import dns.message
    import dns.opcode

    if len(data) < 12 or data[2] & wire.QR:
        return data, None, None
    opcode = (data[2] >> 3) & 0xF
    if opcode != dns.opcode.QUERY:
        return data, None, wire.error_response(data, wire.NOTIMP, with_question=False)
    try:
        m = dns.message.from_wire(data, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error, UnicodeError):
        return data, None, wire.error_response(data, wire.FORMERR, with_question=False)
    if len(m.question) != 1:
        return data, None, wire.error_response(data, wire.FORMERR, with_question=False)
    qq = m.question[0]
    qwire = qq.name.to_wire()
    head = data[:4] + struct.pack("!HHHH", 1, 0, 0, 1 if m.edns >= 0 else 0)
    body = qwire + struct.pack("!HH", qq.rdtype, qq.rdclass)
    if m.edns >= 0:
        do = bool(m.ednsflags & 0x8000)
        body += b"\x00\x00\x29" + struct.pack("!H", max(m.payload, 1)) + bytes((0, m.edns)) + (b"\x80\x00" if do else b"\x00\x00") + b"\x00\x00"
    canon = head + body
    q = wire.parse_query(canon)
    if q is None:
        return data, None, wire.error_response(data, wire.FORMERR, with_question=False)
    return canon, q, None


# -- sockets ---------------------------------------------------------------------


class ExactCache:
    """Whole responses keyed by whole queries, minus the 2-byte ID, for one UDP socket.

    A plain query for a cluster name is answered from a template stamped with
    the query's flags, question spelling and OPT; for the *same bytes* the
    stamped answer is always the same, so the second time a client sends
    exactly these bytes (dnsperf, a stub resolver asking again after the
    TTL, a busy pod) the answer is one dict lookup and one concatenation.
    Only answers that depend on nothing but the query bytes go in: templates
    of the cluster index (not forwarded, not autopath, not TCP), at a UDP
    size limit that the query bytes fix.

    Each entry is ``[response tail, hits, duration sum ns, qtype, rcode,
    counts per duration bucket above the first (or None), address of the
    tail's bytes, length of the tail]`` (the address lets sendmmsg read the
    tail in place, :meth:`kubelab.dns.mmsg.MMsgSocket.refer`); hits are folded
    into :class:`DNSCounters` by :meth:`fold` (before each scrape and
    whenever the cache is dropped), so the hot path counts with a couple of
    increments instead of four dict updates.
    """

    __slots__ = ("entries", "counters", "family")

    def __init__(self, counters: DNSCounters, family: int) -> None:
        self.entries: dict[bytes, list] = {}
        self.counters = counters
        self.family = family

    def fold(self) -> None:
        c = self.counters
        req, resp, dur, dsum = c.requests, c.responses, c.durations, c.duration_sum_ns
        for e in self.entries.values():
            hits = e[1]
            if not hits:
                continue
            qtype, rcode = e[3], e[4]
            k = ("udp", self.family, qtype)
            req[k] = req.get(k, 0) + hits
            k2 = (rcode, P_KUBERNETES)
            resp[k2] = resp.get(k2, 0) + hits
            h = dur.get(qtype)
            if h is None:
                h = dur[qtype] = [0] * (NBUCKETS + 1)
                dsum[qtype] = 0
            slow = e[5]
            if slow is None:
                h[0] += hits
            else:
                for b, k in enumerate(slow):
                    h[b] += k
                h[0] += hits - sum(slow)
                e[5] = None
            dsum[qtype] += e[2]
            e[1] = 0
            e[2] = 0

    def clear(self) -> None:
        self.fold()
        self.entries.clear()


class _UDPServer:
    """One UDP socket served by draining it on readiness (no DatagramProtocol).

    uvloop's DatagramProtocol costs a callback, an address tuple and a
    transport ``sendto`` per datagram, and one epoll round per datagram
    when the loop is idle in between.  Here the loop only says "readable":
    :meth:`_drain` then reads up to :data:`UDP_BATCH` datagrams with plain
    non-blocking ``recvfrom`` and answers each with ``sendto`` until the
    queue is empty, so under load one wakeup serves many queries (the
    recvmmsg idea, without leaving the standard library).  Queries the fast
    paths cannot answer go to a task running :meth:`ClusterDNS.answer_slow`.
    """

    def __init__(self, dns_: ClusterDNS, sock: socket.socket, *, batched: bool | None = None) -> None:
        self.dns = dns_
        self.sock = sock
        self.family = 2 if sock.family == socket.AF_INET6 else 1
        self.exact = ExactCache(dns_.counters, self.family)
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        # recvmmsg/sendmmsg when the platform has them (batched=None: if available).
        if batched is None:
            batched = mmsg.available()
        # echo=2: every answer goes out as the query's own ID (straight from the
        # receive slot) followed by the answer's tail, gathered by the kernel.
        self.mm = mmsg.MMsgSocket(sock, batch=MMSG_BATCH, echo=2) if batched else None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.dns.exact_caches.append(self.exact)
        self.loop.add_reader(self.sock.fileno(), self._drain if self.mm is None else self._drain_batched)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        if self.exact in self.dns.exact_caches:
            self.exact.clear()
            self.dns.exact_caches.remove(self.exact)
        for t in self.tasks:
            t.cancel()
        self.sock.close()

    def _drain(self) -> None:
        d = self.dns
        if d._gen != d.index.generation:
            d._fresh()
        recv = self.sock.recvfrom
        send = self.sock.sendto
        clock = time.perf_counter_ns
        entries = self.exact.entries
        get = entries.get
        # The exact cache ignores the client address, so it is off when answers
        # depend on it (autopath) or when every question must be logged.
        use_exact = not d.config.autopath and d.query_log is None
        fast = d.answer_fast
        counters = d.counters
        fam = self.family
        t = clock()
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. a queued ICMP error; the socket itself is fine
                continue
            if use_exact:
                e = get(data[2:])
                if e is not None:
                    try:
                        send(data[:2] + e[0], addr)
                    except OSError:  # send queue full: drop, the client retries
                        counters.dropped += 1
                    t1 = clock()
                    ns = t1 - t
                    t = t1
                    if ns < BUCKET0_NS:
                        e[1] += 1
                        e[2] += ns
                    else:
                        counters.observe("udp", fam, e[3], e[4], P_KUBERNETES, ns)
                    continue
            try:
                out = fast(data, addr[0], False)
            except Exception:  # noqa: BLE001 - never let one packet stop the server
                d.log.exception("answering a UDP packet from %s", addr[0])
                out = False
            if out is False:
                task = asyncio.ensure_future(self._slow(data, addr, t))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                t = clock()
                continue
            out, qtype = out
            try:
                send(out, addr)
            except OSError:
                counters.dropped += 1
            rcode = out[3] & 0xF
            if use_exact and not out[2] & wire.TC:
                if len(entries) >= MAX_EXACT:
                    self.exact.clear()
                tail = out[2:]
                entries[data[2:]] = [tail, 0, 0, qtype, rcode, None, mmsg.buffer_address(tail), len(tail)]
            t1 = clock()
            counters.observe("udp", fam, qtype, rcode, P_KUBERNETES, t1 - t)
            t = t1

    def _drain_batched(self) -> None:
        """:meth:`_drain` with recvmmsg/sendmmsg: one system call reads a batch, one sends its answers.

        Every query of a batch is answered (or handed to the slow path)
        before the batch's answers go out together, so the latency recorded
        for each is the time from the batch's arrival to that send.
        """
        d = self.dns
        if d._gen != d.index.generation:
            d._fresh()
        m = self.mm
        clock = time.perf_counter_ns
        entries = self.exact.entries
        get = entries.get
        use_exact = not d.config.autopath and d.query_log is None
        fast = d.answer_fast
        counters = d.counters
        fam = self.family
        rview, rmeta, slot, slots = m.rview, m.rmeta, m.slot, m.slots
        iov, staged = m.slen, m.staged
        put = m.put
        address = mmsg.buffer_address
        for _ in range(UDP_BATCH // MMSG_BATCH):
            try:
                n = m.recv()
            except OSError:  # e.g. a queued ICMP error; the socket itself is fine
                d.log.debug("recvmmsg failed", exc_info=True)
                return
            if not n:
                return
            t = clock()
            hits = []
            observed = []
            for i, len_at, o, w in slots[:n]:
                ln = rmeta[len_at]
                if ln >= slot:
                    # Filled the whole slot, so possibly cut (MSG_TRUNC): far longer
                    # than any sane DNS query over UDP (slot = 4096 bytes).
                    counters.dropped += 1
                    continue
                end = o + ln
                if use_exact:
                    # MMsgSocket.refer inlined: the answer is the query's ID (echoed from
                    # the receive slot) and the cached tail, read in place by sendmmsg.
                    # ``hits`` keeps the entry, and so the tail, alive until the flush.
                    e = get(rview[o + 2 : end].tobytes())
                    if e is not None:
                        iov[w] = e[6]
                        iov[w + 1] = e[7]
                        staged[i] = True
                        hits.append(e)
                        continue
                data = rview[o:end].tobytes()
                addr = m.address(i)
                try:
                    out = fast(data, addr[0], False)
                except Exception:  # noqa: BLE001 - never let one packet stop the server
                    d.log.exception("answering a UDP packet from %s", addr[0])
                    out = False
                if out is False:
                    task = asyncio.ensure_future(self._slow(data, addr, t))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                    continue
                out, qtype = out
                if not put(i, out):
                    self._sendto(out, addr)
                rcode = out[3] & 0xF
                if use_exact and not out[2] & wire.TC:
                    if len(entries) >= MAX_EXACT:
                        self.exact.clear()
                    tail = out[2:]
                    e = [tail, 0, 0, qtype, rcode, None, address(tail), len(tail)]
                    entries[data[2:]] = e
                    hits.append(e)
                else:
                    observed.append((qtype, rcode))
            counters.dropped += m.flush()
            ns = clock() - t
            b = (ns // BUCKET0_NS).bit_length()
            if b == 0:
                for e in hits:
                    e[1] += 1
                    e[2] += ns
            else:
                if b > NBUCKETS:
                    b = NBUCKETS
                for e in hits:
                    e[1] += 1
                    e[2] += ns
                    if e[5] is None:
                        e[5] = [0] * (NBUCKETS + 1)
                    e[5][b] += 1
            for qtype, rcode in observed:
                counters.observe("udp", fam, qtype, rcode, P_KUBERNETES, ns)
            if n < MMSG_BATCH:
                return

    def _sendto(self, out: bytes, addr) -> None:
        try:
            self.sock.sendto(out, addr)
        except OSError:
            self.dns.counters.dropped += 1

    async def _slow(self, data: bytes, addr, t0: int) -> None:
        d = self.dns
        try:
            out, qtype, rcode, plugin = await d.answer_slow(data, addr[0], False)
        except Exception:  # noqa: BLE001
            d.log.exception("answering a UDP packet from %s", addr[0])
            out = wire.error_response(data, wire.SERVFAIL)
            qtype, rcode, plugin = 0, wire.SERVFAIL, P_NONE
        if out is None:
            d.counters.dropped += 1
            return
        try:
            self.sock.sendto(out, addr)
        except OSError:
            d.counters.dropped += 1
            return
        d.counters.observe("udp", self.family, qtype, rcode, plugin, time.perf_counter_ns() - t0)


SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h


def spread_reuseport(sock: socket.socket, workers: int) -> None:
    """Deal each datagram of ``sock``'s SO_REUSEPORT group to a random one of ``workers`` sockets.

    Without a program the kernel picks the socket by a hash of the 4-tuple,
    so a client with a few source ports (dnsperf -c 4, one pod's resolver)
    can land wholly on one worker.  DNS over UDP keeps no state between
    datagrams, so a per-packet choice is safe.  The classic BPF program
    (Documentation/networking/filter.rst, ancillary SKF_AD_RANDOM) returns
    ``random % workers``, an index into the group in bind order; an index
    past the sockets bound so far falls back to the hash.
    """
    # ld [SKF_AD_OFF + SKF_AD_RANDOM]; mod #workers; ret a
    prog = struct.pack("=HBBI", 0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF)
    prog += struct.pack("=HBBI", 0x94, 0, 0, workers)
    prog += struct.pack("=HBBI", 0x16, 0, 0, 0)
    import ctypes

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxP" if struct.calcsize("P") == 8 else "HxxP", 3, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking UDP socket for ``host:port`` (IPv4 or IPv6 literal)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE)
    family, _, _, _, sockaddr = info[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        except OSError:  # capped by net.core.rmem_max; the default queue still works
            pass
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _TCP(asyncio.Protocol):
    """DNS over TCP: 2-byte length framing, pipelined queries answered in order of completion."""

    def __init__(self, dns_: ClusterDNS, conns: set) -> None:
        self.dns = dns_
        self.buf = bytearray()
        self.transport = None
        self.peer = ("", 0)
        self.conns = conns
        self.idle: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self.conns.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TCP_IDLE_TIMEOUT, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.conns.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        for t in self.tasks:
            t.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 1 << 20:
            self._close()
            return
        self._arm()
        while len(self.buf) >= 2:
            n = (self.buf[0] << 8) | self.buf[1]
            if len(self.buf) < 2 + n:
                break
            msg = bytes(self.buf[2 : 2 + n])
            del self.buf[: 2 + n]
            t0 = time.perf_counter_ns()
            d = self.dns
            try:
                out = d.answer_fast(msg, self.peer[0], True)
            except Exception:  # noqa: BLE001
                d.log.exception("answering a TCP message from %s", self.peer[0])
                out = False
            if out is False:
                task = asyncio.ensure_future(self._slow(msg, t0))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                out, qtype = out
                self._send(out)
                d.counters.observe("tcp", 2 if len(self.peer) > 2 else 1, qtype, out[3] & 0xF, P_KUBERNETES, time.perf_counter_ns() - t0)

    def _send(self, out: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(out)) + out)

    async def _slow(self, msg: bytes, t0: int) -> None:
        d = self.dns
        try:
            out, qtype, rcode, plugin = await d.answer_slow(msg, self.peer[0], True)
        except Exception:  # noqa: BLE001
            d.log.exception("answering a TCP message from %s", self.peer[0])
            out, qtype, rcode, plugin = wire.error_response(msg, wire.SERVFAIL), 0, wire.SERVFAIL, P_NONE
        if out is None:
            d.counters.dropped += 1
            return
        self._send(out)
        d.counters.observe("tcp", 2 if len(self.peer) > 2 else 1, qtype, rcode, plugin, time.perf_counter_ns() - t0)


class DNSServer:
    """UDP and TCP listeners for one :class:`ClusterDNS` (started by :meth:`start`, not the constructor)."""

    def __init__(
        self, dns_: ClusterDNS, listen: list[tuple[str, int]], *, reuse_port: bool = False, batched: bool | None = None, spread: int = 0
    ) -> None:
        self.dns = dns_
        self.listen = listen
        self.reuse_port = reuse_port
        self.spread = spread  # > 1: deal UDP datagrams at random over this many SO_REUSEPORT sockets (spread_reuseport)
        self.batched = batched  # recvmmsg/sendmmsg: None = when available, False = plain recvfrom/sendto
        self._udp: list = []
        self._tcp: list = []
        self._conns: set = set()
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.listen:
                sock = udp_socket(host, port, reuse_port=self.reuse_port)
                if self.reuse_port and self.spread > 1:
                    spread_reuseport(sock, self.spread)
                udp = _UDPServer(self.dns, sock, batched=self.batched)
                self._udp.append(udp)
                udp.start()
                bound = sock.getsockname()
                # TCP on the same port as UDP (the OS picks one when port is 0).
                srv = await loop.create_server(lambda: _TCP(self.dns, self._conns), host=host, port=bound[1], reuse_port=self.reuse_port or None)
                self._tcp.append(srv)
                self.addresses.append((bound[0], bound[1]))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for udp in self._udp:
            udp.close()
        for srv in self._tcp:
            srv.close()
        for c in list(self._conns):
            c._close()
        for srv in self._tcp:
            await srv.wait_closed()
        self._udp.clear()
        self._tcp.clear()
