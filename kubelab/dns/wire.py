"""DNS wire format: the hand-written hot path and the small helpers around it.

Parsing a whole message with dnspython costs 70-125 us; the server only needs
the question to find a prebuilt answer (DESIGN.md: "parsing just the question
by hand 0.7 us").  So :func:`parse_query` reads the header, the question and
an optional EDNS0 OPT record by hand, and :class:`Template` holds a response
rendered once (by dnspython, at index time) minus its ID, flags and question,
which are spliced in from the query.  Because every owner name that equals
the question is a compression pointer to offset 12, copying the client's
question bytes also echoes the client's letter case everywhere, as CoreDNS
does.

Everything unusual (compressed or over-long question, several questions,
a non-OPT additional record, opcodes other than QUERY) returns ``None`` from
:func:`parse_query` so that the caller takes the slow path with dnspython.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Header flag bits (RFC 1035 4.1.1), byte 2 and byte 3 of the header.
QR = 0x80
AA = 0x04
TC = 0x02
RD = 0x01
RA = 0x80
CD = 0x10

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_PTR, TYPE_MX, TYPE_TXT = 1, 2, 5, 6, 12, 15, 16
TYPE_AAAA, TYPE_SRV, TYPE_OPT, TYPE_IXFR, TYPE_AXFR, TYPE_ANY = 28, 33, 41, 251, 252, 255
CLASS_IN = 1

MIN_UDP_SIZE = 512  # RFC 1035 2.3.4, and the floor CoreDNS applies to EDNS0 sizes
MAX_NAME_WIRE = 255


@dataclass(slots=True)
class Query:
    """The parts of a query the server needs, parsed by hand.

    ``key`` is the question in wire form with the name lowercased (name,
    qtype, qclass): the key of the answer cache.  ``qend`` is the offset just
    past the question.  ``edns`` is the requester's UDP payload size, or -1
    when the query carried no OPT record.
    """

    key: bytes
    qend: int
    qtype: int
    qclass: int
    edns: int = -1
    do: bool = False
    edns_version: int = 0

    @property
    def name_wire(self) -> bytes:
        return self.key[:-4]


def parse_query(data: bytes) -> Query | None:
    """Parse a plain query (one question, optional OPT); ``None`` means "use the slow path"."""
    n = len(data)
    if n < 17:
        return None
    # QR must be 0 and opcode QUERY; qdcount 1, ancount 0, nscount 0, arcount 0 or 1.
    if data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00" or data[10]:
        return None
    arcount = data[11]
    if arcount > 1:
        return None
    i = 12
    while True:
        ln = data[i] if i < n else -1
        if ln == 0:
            break
        if ln < 0 or ln > 63:  # pointer in a question, or truncated
            return None
        i += ln + 1
        if i - 12 >= MAX_NAME_WIRE:
            return None
    qend = i + 5
    if qend > n:
        return None
    key = data[12 : i + 1].lower() + data[i + 1 : qend]
    qtype = (data[i + 1] << 8) | data[i + 2]
    qclass = (data[i + 3] << 8) | data[i + 4]
    if arcount == 0:
        if qend != n:
            return None
        return Query(key, qend, qtype, qclass)
    # One additional record: only a root-owned OPT (RFC 6891 6.1.2) is fast.
    if n < qend + 11 or data[qend] != 0 or data[qend + 1] != 0 or data[qend + 2] != TYPE_OPT:
        return None
    rdlen = (data[qend + 9] << 8) | data[qend + 10]
    if qend + 11 + rdlen != n:
        return None
    size = (data[qend + 3] << 8) | data[qend + 4]
    return Query(key, qend, qtype, qclass, max(size, MIN_UDP_SIZE), bool(data[qend + 7] & 0x80), data[qend + 6])


def opt_record(payload: int, do: bool) -> bytes:
    """An OPT pseudo-record (root owner) advertising ``payload`` and echoing DO."""
    return b"\x00\x00\x29" + struct.pack("!H", min(payload, 65535)) + b"\x00\x00" + (b"\x80\x00" if do else b"\x00\x00") + b"\x00\x00"


def skip_name(buf: bytes, i: int) -> int:
    """Offset just past the (possibly compressed) name starting at ``i``."""
    n = len(buf)
    while True:
        if i >= n:
            raise ValueError("name runs past the end of the message")
        ln = buf[i]
        if ln == 0:
            return i + 1
        if ln & 0xC0 == 0xC0:
            return i + 2
        if ln & 0xC0:
            raise ValueError("bad label type")
        i += ln + 1


def walk_records(buf: bytes, start: int, count: int) -> list[tuple[int, int, int]]:
    """(start, ttl offset, end) of ``count`` resource records from ``start``."""
    out = []
    i = start
    for _ in range(count):
        s = i
        i = skip_name(buf, i)
        if i + 10 > len(buf):
            raise ValueError("record header runs past the end of the message")
        rtype = (buf[i] << 8) | buf[i + 1]
        rdlen = (buf[i + 8] << 8) | buf[i + 9]
        ttl_at = i + 4 if rtype != TYPE_OPT else -1
        i += 10 + rdlen
        if i > len(buf):
            raise ValueError("record data runs past the end of the message")
        out.append((s, ttl_at, i))
    return out


def question_end(buf: bytes) -> int:
    """Offset just past the single question of ``buf`` (qdcount must be 1)."""
    return skip_name(buf, 12) + 4


@dataclass(slots=True)
class Template:
    """A response prebuilt for one question, ready to be stamped per query.

    ``body`` is everything after the question (answer, authority and
    additional records, without OPT); ``ends`` are the offsets in ``body``
    where each record ends, for truncation; ``counts`` are (an, ns, ar).
    ``rcode`` and ``flags`` (header byte 2 without RD) are the answer's.
    """

    body: bytes
    counts: tuple[int, int, int]
    rcode: int
    aa: bool = True
    ra: bool = False
    ends: tuple[int, ...] = ()
    heads: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.ends and sum(self.counts):
            self.ends = tuple(e for _, _, e in walk_records(self.body, 0, sum(self.counts)))
        an, ns, ar = self.counts
        b2 = QR | (AA if self.aa else 0)
        heads = []
        # index: bit0 RD, bit1 CD, bit2 EDNS (one more additional record)
        for idx in range(8):
            rd, cd, ed = idx & 1, idx & 2, idx & 4
            b3 = (RA if self.ra else 0) | (CD if cd else 0) | (self.rcode & 0xF)
            heads.append(bytes((b2 | rd, b3)) + struct.pack("!HHHH", 1, an, ns, ar + (1 if ed else 0)))
        self.heads = tuple(heads)

    def stamp(self, data: bytes, q: Query, limit: int) -> bytes:
        """The response to query ``data`` (parsed as ``q``), at most ``limit`` bytes."""
        return self.stamp_raw(data, q.qend, q.edns, q.do, limit)

    def stamp_raw(self, data: bytes, qend: int, edns: int, do: bool, limit: int) -> bytes:
        """:meth:`stamp` without a :class:`Query` (the server's hot path)."""
        idx = (data[2] & 1) | ((data[3] & CD) >> 3)
        if edns < 0:
            out = data[:2] + self.heads[idx] + data[12:qend] + self.body
        else:
            out = data[:2] + self.heads[idx | 4] + data[12:qend] + self.body + opt_record(edns, do)
        if len(out) <= limit:
            return out
        return self.truncated(data, Query(b"", qend, 0, 0, edns, do), limit)

    def truncated(self, data: bytes, q: Query, limit: int) -> bytes:
        """As miekg/dns Msg.Truncate (which CoreDNS applies): keep records in order while they fit, set TC."""
        opt = opt_record(q.edns, q.do) if q.edns >= 0 else b""
        room = limit - len(opt) - q.qend
        keep = 0
        for end in self.ends:
            if end > room:
                break
            keep += 1
        an, ns, ar = self.counts
        kan = min(an, keep)
        kns = min(ns, keep - kan)
        kar = keep - kan - kns
        b2 = QR | (AA if self.aa else 0) | TC | (data[2] & RD)
        b3 = (RA if self.ra else 0) | (data[3] & CD) | (self.rcode & 0xF)
        body = self.body[: self.ends[keep - 1]] if keep else b""
        head = bytes((b2, b3)) + struct.pack("!HHHH", 1, kan, kns, kar + (1 if opt else 0))
        return data[:2] + head + data[12 : q.qend] + body + opt


def template_from_wire(wire: bytes) -> Template:
    """Split a full response rendered by dnspython (one question, no OPT) into a :class:`Template`."""
    qd, an, ns, ar = struct.unpack("!HHHH", wire[4:12])
    if qd != 1:
        raise ValueError("a template needs exactly one question")
    qend = question_end(wire)
    body = wire[qend:]
    recs = walk_records(body, 0, an + ns + ar)
    return Template(
        body=body,
        counts=(an, ns, ar),
        rcode=wire[3] & 0xF,
        aa=bool(wire[2] & AA),
        ra=bool(wire[3] & RA),
        ends=tuple(e for _, _, e in recs),
    )


def error_response(data: bytes, rcode: int, *, aa: bool = False, ra: bool = False, with_question: bool = True) -> bytes | None:
    """A bare error reply (FORMERR, NOTIMP, REFUSED, SERVFAIL) echoing ID, opcode, RD and the question when it parses.

    Returns ``None`` when the packet is too short to carry an ID or is itself
    a response (answering responses invites loops): drop those.
    """
    if len(data) < 12 or data[2] & QR:
        return None
    b2 = QR | (data[2] & 0x78) | (AA if aa else 0) | (data[2] & RD)
    b3 = (RA if ra else 0) | (data[3] & CD) | (rcode & 0xF)
    question = b""
    if with_question and data[4:6] == b"\x00\x01":
        try:
            qe = question_end(data)
            if qe <= len(data) and not _has_pointer(data, 12):
                question = data[12:qe]
        except ValueError:
            question = b""
    return data[:2] + bytes((b2, b3)) + struct.pack("!HHHH", 1 if question else 0, 0, 0, 0) + question


def _has_pointer(buf: bytes, i: int) -> bool:
    while True:
        ln = buf[i]
        if ln == 0:
            return False
        if ln & 0xC0:
            return True
        i += ln + 1


def name_to_text(name_wire: bytes) -> str:
    """Wire-form name (uncompressed) to dotted text with a trailing dot; bytes outside ASCII letters escaped as dnspython does."""
    import dns.name

    return dns.name.from_wire(name_wire + b"\x00\x00\x00\x00", 0)[0].to_text()


def text_to_wire(name: str) -> bytes:
    """Dotted text to uncompressed, lowercased wire form."""
    import dns.name

    return dns.name.from_text(name).canonicalize().to_wire()
