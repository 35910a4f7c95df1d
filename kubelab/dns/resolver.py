"""A stub resolver that walks resolv.conf exactly as glibc or musl does.

glibc (resolv/res_query.c ``__res_context_search``, 2.36 as on Debian 12):

* count the dots (a trailing dot counts) and note a trailing dot;
* if dots >= ndots or there is a trailing dot, try the name as is first; a
  trailing dot stops there, whatever the answer;
* then, if the name had no dot (RES_DEFNAMES) or had dots but no trailing
  dot (RES_DNSRCH), try ``name.domain`` for each search domain: NXDOMAIN
  and NODATA keep walking, so does SERVFAIL; anything else stops the walk;
* finally try the name as is, unless that was done already or the search
  list held the root;
* getaddrinfo/``getent ahosts`` ask A and AAAA together (A first, same
  socket); a pair succeeds when either has answers; the pair's code is the
  A answer's rcode unless that is NOERROR, then the AAAA answer's.

musl (src/network/lookup_name.c ``name_from_dns_search``): with dots >=
ndots or a trailing dot only the name as is is asked; otherwise each search
domain then the name as is; only NXDOMAIN continues (NODATA and SERVFAIL
stop the walk).  The answers of a pair are judged in order, A first: a
timeout or SERVFAIL is EAI_AGAIN, NXDOMAIN moves on (even when the other
half had addresses), any other error is EAI_FAIL.  Its query core
(res_msend.c ``__res_msend_rc``, :class:`MuslSender`) differs from glibc's:
each query goes to every nameserver at once, ``timeout`` is the total time
with a resend of the unanswered queries every ``timeout/attempts``, only
NOERROR and NXDOMAIN answers are accepted, a SERVFAIL is re-asked at once
(at most 2 x queries times per interval) and REFUSED/NOTIMP/FORMERR are
ignored -- so both end in EAI_AGAIN after the whole timeout.  NODATA is
EAI_NODATA as musl >= 1.2.4 reports it (1.2.3, Debian 12's, said EAI_NONAME;
musl commit 85050ac5).

The walk is pure: it is given a ``send(name, qtypes)`` function, so tests
can drive it from a table; :class:`UDPSender` is the real one.
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import time
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

A, AAAA = 1, 28
NOERROR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 2, 3, 4, 5
MAXNS = 3  # glibc and musl both use the first three nameservers
STYLES = ("glibc", "musl")


@dataclass
class ResolvConf:
    """The parts of resolv.conf a stub resolver uses."""

    nameservers: list[tuple[str, int]] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    ndots: int = 1
    attempts: int = 2
    timeout: float = 5.0
    options: set[str] = field(default_factory=set)

    def describe(self) -> str:
        ns = " ".join(h if p == 53 else f"{h}:{p}" for h, p in self.nameservers) or "(none)"
        return f"nameserver {ns}; search {' '.join(self.search) or '(none)'}; ndots {self.ndots}; attempts {self.attempts}; timeout {self.timeout:g}"


def parse_resolv_conf(text: str, *, style: str = "glibc", env: dict | None = None, hostname: str | None = None) -> ResolvConf:
    """Parse resolv.conf text as ``style``'s resolver does (last search/domain line wins; limits capped)."""
    conf = ResolvConf()
    have_search = False
    opts: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0] if style == "glibc" else raw.split("#", 1)[0]
        parts = line.split()
        if not parts:
            continue
        key, vals = parts[0], parts[1:]
        if key == "nameserver" and vals:
            if len(conf.nameservers) < MAXNS:
                conf.nameservers.append((vals[0].split("%", 1)[0], 53))
        elif key == "domain" and vals:
            conf.search = [vals[0]]
            have_search = True
        elif key == "search":
            conf.search = list(vals)
            have_search = True
        elif key == "options":
            opts.extend(vals)
    env = os.environ if env is None else env
    if style == "glibc":
        if env.get("LOCALDOMAIN"):
            conf.search = env["LOCALDOMAIN"].split()
            have_search = True
        if env.get("RES_OPTIONS"):
            opts.extend(env["RES_OPTIONS"].split())
        if not have_search:
            # glibc falls back to the domain part of the host name.
            host = hostname if hostname is not None else socket.gethostname()
            if "." in host:
                conf.search = [host.split(".", 1)[1]]
    limits = {"glibc": (15, 5, 30), "musl": (15, 10, 60)}[style]
    for o in opts:
        name, _, val = o.partition(":")
        if name in ("ndots", "attempts", "timeout") and val:
            try:
                n = int(val)
            except ValueError:
                continue
            if name == "ndots":
                conf.ndots = max(0, min(n, limits[0]))
            elif name == "attempts":
                conf.attempts = max(1, min(n, limits[1]))
            else:
                conf.timeout = float(max(1, min(n, limits[2])))
        else:
            conf.options.add(name)
    if not conf.nameservers:
        conf.nameservers = [("127.0.0.1", 53)]
    return conf


@dataclass
class Response:
    """One answer as the walk needs it."""

    qname: str
    qtype: int
    rcode: int
    answers: list[str] = field(default_factory=list)  # zone-file lines of the answer section
    aa: bool = False
    ra: bool = False
    tc: bool = False
    arcount: int = 0
    server: str = ""

    @property
    def ancount(self) -> int:
        return len(self.answers)

    @property
    def rejected(self) -> bool:
        """send_dg moves to the next server on these (SERVFAIL, NOTIMP, REFUSED, or a lame empty answer)."""
        if self.rcode in (SERVFAIL, NOTIMP, REFUSED):
            return True
        return self.rcode == NOERROR and not self.answers and not self.aa and not self.ra and self.arcount == 0


@dataclass
class Sent:
    """One query on the wire and what came back (None = timeout)."""

    qname: str
    qtype: int
    server: str
    response: Response | None


@dataclass
class Result:
    """The outcome of a walk: every query sent, the answers used, and the h_errno / EAI code."""

    name: str
    sent: list[Sent] = field(default_factory=list)
    answers: list[Response] = field(default_factory=list)
    status: str = ""  # "ok", HOST_NOT_FOUND, NO_DATA, TRY_AGAIN, NO_RECOVERY (glibc) / EAI_* (musl)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query sent, in order -- what a wire trace shows."""
        return [(s.qname, dns.rdatatype.to_text(s.qtype)) for s in self.sent]


def qtypes_for(family: str) -> tuple[int, ...]:
    return {"unspec": (A, AAAA), "inet": (A,), "inet6": (AAAA,)}[family]


def _join(name: str, domain: str | None) -> str:
    if domain is None:
        return name if name.endswith(".") else name + "."
    d = domain.strip(".")
    return f"{name}.{d}." if d else f"{name}."


class Walker:
    """Runs one style's search walk over a ``send(qname, qtypes, result) -> list[Response|None]`` function."""

    def __init__(self, conf: ResolvConf, send, *, style: str = "glibc") -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}: use glibc or musl")
        self.conf = conf
        self.send = send
        self.style = style

    def resolve(self, name: str, family: str = "unspec") -> Result:
        if not name or name.startswith(".") or ".." in name:
            raise ValueError(f"{name!r} is not a host name")
        res = Result(name=name)
        types = qtypes_for(family)
        if self.style == "glibc":
            self._glibc(name, types, res)
        else:
            self._musl(name, types, res)
        return res

    # -- glibc ------------------------------------------------------------------

    def _glibc_query(self, qname: str, types, res: Result) -> str:
        """__res_context_query for one name: "ok" or the h_errno it sets."""
        rs = self._send_with_retries(qname, types, res)
        if rs is None:
            res._last_rcode = NOERROR  # type: ignore[attr-defined]
            return "TRY_AGAIN"
        hp = rs[0]
        hp2 = rs[1] if len(rs) > 1 and rs[1] is not None else hp
        if hp is None:
            hp = hp2
        res._last_rcode = hp.rcode  # type: ignore[attr-defined]
        good = [r for r in (hp, hp2) if r.rcode == NOERROR and r.ancount]
        if good:
            res.answers = [r for r in ([hp] if hp is hp2 else [hp, hp2]) if r.rcode == NOERROR and r.ancount]
            return "ok"
        code = hp2.rcode if hp.rcode == NOERROR else hp.rcode
        return {NXDOMAIN: "HOST_NOT_FOUND", SERVFAIL: "TRY_AGAIN", NOERROR: "NO_DATA"}.get(code, "NO_RECOVERY")

    def _send_with_retries(self, qname: str, types, res: Result):
        """res_send: attempts x nameservers; rejected answers move on, a usable half of a pair is kept."""
        last = None
        for _attempt in range(self.conf.attempts):
            for ns in self.conf.nameservers:
                got = self.send(qname, types, ns, res)
                if got is None:
                    continue
                usable = [r if (r is not None and not r.rejected) else None for r in got]
                if any(u is not None for u in usable):
                    if len(usable) > 1 and (usable[0] is None or usable[1] is None):
                        # One half rejected: glibc returns the other alone (resplen2 = 0).
                        only = usable[0] or usable[1]
                        return [only, only]
                    return usable
                last = [r for r in got if r is not None] or last
        if last:
            res._servfail = last[0].rcode == SERVFAIL  # type: ignore[attr-defined]
        return None

    def _glibc(self, name: str, types, res: Result) -> None:
        dots = name.count(".")
        trailing = name.endswith(".")
        tried_as_is = False
        searched = False
        root_on_list = False
        saved = None
        got_nodata = got_servfail = False
        st = "HOST_NOT_FOUND"  # true if we never query
        if dots >= self.conf.ndots or trailing:
            st = self._glibc_query(_join(name, None), types, res)
            if st == "ok" or trailing:
                res.status = st
                return
            saved = st
            tried_as_is = True
        if (not dots) or (dots and not trailing):
            for domain in self.conf.search:
                searched = True
                d = domain[1:] if domain.startswith(".") else domain
                if d == "":
                    root_on_list = True
                st = self._glibc_query(_join(name, d), types, res)
                if st == "ok":
                    res.status = st
                    return
                if st == "NO_DATA":
                    got_nodata = True
                    continue
                if st == "HOST_NOT_FOUND":
                    continue
                if st == "TRY_AGAIN" and getattr(res, "_servfail", False):
                    got_servfail = True
                    res._servfail = False  # type: ignore[attr-defined]
                    continue
                break
        if (dots or not searched or "no-tld-query" not in self.conf.options) and not (tried_as_is or root_on_list):
            st = self._glibc_query(_join(name, None), types, res)
            if st == "ok":
                res.status = st
                return
        if saved is not None:
            res.status = saved
        elif got_nodata:
            res.status = "NO_DATA"
        elif got_servfail:
            res.status = "TRY_AGAIN"
        else:
            res.status = st

    # -- musl -------------------------------------------------------------------

    def _musl_query(self, qname: str, types, res: Result) -> str:
        """name_from_dns for one name: "ok", "continue" (NXDOMAIN) or the EAI code."""
        # One call: musl's query core does its own resends and nameserver
        # fan-out within the total timeout (MuslSender); None = no answer.
        got = self.send(qname, types, self.conf.nameservers[0], res)
        if got is None:
            return "EAI_AGAIN"
        # Judged in query order, A first, as musl's loop over abuf[] does:
        # an NXDOMAIN A with a timed-out AAAA still moves the search on.
        for r in got:
            if r is None or r.rcode == SERVFAIL:
                return "EAI_AGAIN"
            if r.rcode == NXDOMAIN:
                return "continue"
            if r.rcode != NOERROR:
                return "EAI_FAIL"
        if any(r.ancount for r in got):
            res.answers = [r for r in got if r.ancount]
            return "ok"
        return "EAI_NODATA"

    def _musl(self, name: str, types, res: Result) -> None:
        dots = name.count(".")
        trailing = name.endswith(".")
        base = name[:-1] if trailing else name
        search = [] if (dots >= self.conf.ndots or trailing) else self.conf.search
        for d in search:
            if len(base) + 1 + len(d.strip(".")) >= 255:
                continue
            st = self._musl_query(_join(base, d), types, res)
            if st != "continue":
                res.status = st
                return
        st = self._musl_query(_join(base, None), types, res)
        res.status = "EAI_NONAME" if st == "continue" else st


class UDPSender:
    """Sends the queries of one step over UDP, A then AAAA from one socket, as glibc's send_dg does."""

    def __init__(self, conf: ResolvConf) -> None:
        self.conf = conf
        self.rand = random.Random()

    def __call__(self, qname: str, types, ns: tuple[str, int], res: Result):
        host, port = ns
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        msgs = []
        for t in types:
            q = dns.message.make_query(qname, t, use_edns=0 if "edns0" in self.conf.options else False, payload=1200)
            q.id = self.rand.getrandbits(16)
            q.flags = dns.flags.RD | (dns.flags.AD if "trust-ad" in self.conf.options else 0)
            msgs.append(q)
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            sock.connect((host, port))
            server = f"{host}:{port}" if port != 53 else host
            sent = []
            for q in msgs:
                sock.send(q.to_wire())
                s = Sent(qname, q.question[0].rdtype, server, None)
                res.sent.append(s)
                sent.append(s)
            deadline = time.monotonic() + self.conf.timeout
            pending = {q.id: i for i, q in enumerate(msgs)}
            out: list[Response | None] = [None] * len(msgs)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                r, _, _ = select.select([sock], [], [], left)
                if not r:
                    break
                try:
                    data = sock.recv(65535)
                    m = dns.message.from_wire(data, ignore_trailing=True)
                except (OSError, Exception):  # noqa: BLE001 - ICMP refused, garbage: wait for the rest
                    continue
                i = pending.pop(m.id, None)
                if i is None:
                    continue
                resp = _response(m, qname, msgs[i].question[0].rdtype, server)
                if resp.tc and "ignore-tc" not in self.conf.options:
                    resp = self._tcp(msgs[i], host, port, server, qname) or resp
                out[i] = resp
                sent[i].response = resp
            if all(o is None for o in out):
                return None
            return out
        finally:
            sock.close()

    def _tcp(self, q, host, port, server, qname) -> Response | None:
        import dns.query

        try:
            m = dns.query.tcp(q, host, port=port, timeout=self.conf.timeout)
        except Exception:  # noqa: BLE001
            return None
        return _response(m, qname, q.question[0].rdtype, server)


class MuslSender:
    """musl's query core (res_msend.c ``__res_msend_rc``) over UDP, for ``Walker(style="musl")``.

    Every query goes to every nameserver (the first three) from one socket;
    the unanswered ones are sent again every ``timeout/attempts`` seconds
    until ``timeout`` seconds in all have passed.  Only NOERROR and NXDOMAIN
    answers are accepted; a SERVFAIL is asked again at once of the server
    that sent it (at most 2 x queries times per interval); any other code
    (REFUSED, NOTIMP, FORMERR) is ignored, so the query waits for another
    server or the timeout.  A truncated answer is asked again over TCP, as
    musl >= 1.2.4 does.  Returns the accepted answer per query type, None
    for none; every send and every answer (ignored ones too) is recorded.
    """

    def __init__(self, conf: ResolvConf, clock=time.monotonic) -> None:
        self.conf = conf
        self.clock = clock
        self.rand = random.Random()

    def _servers(self) -> tuple[int, list[tuple]]:
        servers = [(h, p) for h, p in self.conf.nameservers[:MAXNS]]
        if any(":" in h for h, _ in servers):
            # Mixed families: one AF_INET6 socket, IPv4 servers as v4-mapped (as musl does).
            return socket.AF_INET6, [(h if ":" in h else f"::ffff:{h}", p, 0, 0) for h, p in servers]
        return socket.AF_INET, servers

    def __call__(self, qname: str, types, ns: tuple[str, int], res: Result):
        family, servers = self._servers()
        ids = self.rand.sample(range(65536), len(types))  # distinct ids, as musl >= 1.2.4 ensures
        queries = []
        for t, qid in zip(types, ids, strict=True):
            q = dns.message.make_query(qname, t, use_edns=False)
            q.id = qid
            q.flags = dns.flags.RD  # musl clears AD and sends no EDNS
            queries.append(q)
        wires = [q.to_wire() for q in queries]
        by_id = {q.id: i for i, q in enumerate(queries)}
        label = {}
        for s in servers:
            host = s[0].removeprefix("::ffff:") if family == socket.AF_INET6 else s[0]
            label[s] = host if s[1] == 53 else (f"[{host}]:{s[1]}" if ":" in host else f"{host}:{s[1]}")
        accepted: list[Response | None] = [None] * len(queries)
        last_sent: dict[tuple[int, tuple], Sent] = {}

        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)

        def send(i: int, server) -> None:
            try:
                sock.sendto(wires[i], server)
            except OSError:
                return  # musl ignores sendto errors too; the query just waits
            s = Sent(qname, queries[i].question[0].rdtype, label[server], None)
            res.sent.append(s)
            last_sent[(i, server)] = s

        try:
            timeout = self.conf.timeout
            interval = timeout / max(1, self.conf.attempts)
            t0 = now = self.clock()
            t1 = now - interval
            servfail_retry = 0
            while now - t0 < timeout and any(a is None for a in accepted):
                if now - t1 >= interval:
                    for i, a in enumerate(accepted):
                        if a is None:
                            for server in servers:
                                send(i, server)
                    t1 = now
                    servfail_retry = 2 * len(queries)
                ready, _, _ = select.select([sock], [], [], max(0.0, t1 + interval - now))
                while ready:
                    try:
                        data, src = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # ICMP port unreachable from one server: keep waiting
                    server = next((s for s in servers if _same_addr(s, src)), None)
                    if server is None or len(data) < 4:
                        continue  # not from a server we asked
                    i = by_id.get(int.from_bytes(data[:2], "big"))
                    if i is None or accepted[i] is not None:
                        continue
                    try:
                        m = dns.message.from_wire(data, ignore_trailing=True)
                    except Exception:  # noqa: BLE001 - musl would store it and fail to parse; treat as no answer
                        continue
                    resp = _response(m, qname, queries[i].question[0].rdtype, label[server])
                    sent = last_sent.get((i, server))
                    if sent is not None and sent.response is None:
                        sent.response = resp
                    if resp.rcode == SERVFAIL:
                        if servfail_retry:
                            servfail_retry -= 1
                            send(i, server)
                        continue
                    if resp.rcode not in (NOERROR, NXDOMAIN):
                        continue
                    if resp.tc:
                        resp = self._tcp(queries[i], server, label[server], qname) or resp
                        if sent is not None:
                            sent.response = resp
                    accepted[i] = resp
                now = self.clock()
            return accepted
        finally:
            sock.close()

    def _tcp(self, q, server, label, qname) -> Response | None:
        import dns.query

        try:
            m = dns.query.tcp(q, server[0], port=server[1], timeout=self.conf.timeout)
        except Exception:  # noqa: BLE001 - musl leaves the query unanswered
            return None
        return _response(m, qname, q.question[0].rdtype, label)


def _same_addr(a: tuple, b: tuple) -> bool:
    """Same IP (compared as addresses, not text) and port."""
    return a[1] == b[1] and ipaddress.ip_address(a[0].split("%", 1)[0]) == ipaddress.ip_address(b[0].split("%", 1)[0])


def sender_for(style: str, conf: ResolvConf):
    """The query core ``style``'s resolver uses: glibc's send_dg or musl's __res_msend_rc."""
    return MuslSender(conf) if style == "musl" else UDPSender(conf)


def _response(m: dns.message.Message, qname: str, qtype: int, server: str) -> Response:
    lines = []
    for rrset in m.answer:
        for line in rrset.to_text().splitlines():
            lines.append(" ".join(line.split()))
    return Response(
        qname=qname,
        qtype=qtype,
        rcode=m.rcode(),
        answers=lines,
        aa=bool(m.flags & dns.flags.AA),
        ra=bool(m.flags & dns.flags.RA),
        tc=bool(m.flags & dns.flags.TC),
        arcount=sum(len(r) for r in m.additional) + (1 if m.edns >= 0 else 0),
        server=server,
    )


def rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(rcode)
