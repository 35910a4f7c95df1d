"""Wire handling: hand parser, templates, truncation, EDNS, garbage and a fuzz test.

Addresses: model data only (10.0.0.0/24, 172.0.0.0/24); no sockets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubelab.dns import wire
from kubelab.dns.answer import Settings
from kubelab.dns.server import ClusterDNS, DNSConfig
from kubelab.dns.testing import feed, fixture_cluster


@pytest.fixture(scope="module")
def d():
    s = ClusterDNS(DNSConfig(settings=Settings()), logging.getLogger("test"))
    feed(s, *fixture_cluster())
    return s


def answer(d, data: bytes, tcp: bool = False):
    out = d.answer_fast(data, "127.0.0.1", tcp)
    if out is False:
        out, *_ = asyncio.run(d.answer_slow(data, "127.0.0.1", tcp))
    else:
        out = out[0]
    return out


PARSE = [
    ("plain", dns.message.make_query("a.b.", "A", use_edns=False).to_wire(), (b"\x01a\x01b\x00\x00\x01\x00\x01", -1)),
    ("edns-1232", dns.message.make_query("A.B.", "AAAA", use_edns=0, payload=1232).to_wire(), (b"\x01a\x01b\x00\x00\x1c\x00\x01", 1232)),
    ("edns-small-floor-512", dns.message.make_query("a.b.", "A", use_edns=0, payload=100).to_wire(), (b"\x01a\x01b\x00\x00\x01\x00\x01", 512)),
]


@pytest.mark.parametrize("data,expect", [c[1:] for c in PARSE], ids=[c[0] for c in PARSE])
def test_parse_query(data, expect):
    q = wire.parse_query(data)
    assert (q.key, q.edns) == expect


SLOW = [
    ("too-short", b"\x12\x34\x01"),
    ("response-bit", bytes.fromhex("1234 8100 0001 0000 0000 0000 0161 00 0001 0001".replace(" ", ""))),
    ("two-questions", bytes.fromhex("1234 0100 0002 0000 0000 0000 0161 00 0001 0001 0162 00 0001 0001".replace(" ", ""))),
    ("pointer-in-question", bytes.fromhex("1234 0100 0001 0000 0000 0000 c00c 0001 0001".replace(" ", ""))),
    ("label-over-63", bytes.fromhex("1234 0100 0001 0000 0000 0000 40".replace(" ", "")) + b"a" * 64 + b"\x00\x00\x01\x00\x01"),
]


@pytest.mark.parametrize("data", [c[1] for c in SLOW], ids=[c[0] for c in SLOW])
def test_odd_packets_leave_the_fast_path(data):
    assert wire.parse_query(data) is None


GARBAGE = [
    ("short", b"\x00\x01\x02", None),
    ("response", bytes.fromhex("1234 8100 0001 0000 0000 0000 0161 00 0001 0001".replace(" ", "")), None),
    ("two-questions", bytes.fromhex("1234 0100 0002 0000 0000 0000 0161 00 0001 0001 0162 00 0001 0001".replace(" ", "")), "FORMERR"),
    ("truncated-question", bytes.fromhex("1234 0100 0001 0000 0000 0000 0561 62".replace(" ", "")), "FORMERR"),
    ("no-question", bytes.fromhex("1234 0100 0000 0000 0000 0000".replace(" ", "")), "FORMERR"),
    ("opcode-notify", bytes.fromhex("1234 2000 0001 0000 0000 0000 0161 00 0006 0001".replace(" ", "")), "NOTIMP"),
    ("opcode-update", bytes.fromhex("1234 2800 0001 0000 0000 0000 0161 00 0006 0001".replace(" ", "")), "NOTIMP"),
]


@pytest.mark.parametrize("data,rcode", [c[1:] for c in GARBAGE], ids=[c[0] for c in GARBAGE])
def test_garbage_gets_formerr_notimp_or_is_dropped(d, data, rcode):
    out = answer(d, data)
    if rcode is None:
        assert out is None
    else:
        assert out[:2] == data[:2]
        assert out[2] & wire.QR
        assert dns.rcode.to_text(out[3] & 0xF) == rcode


def test_case_is_echoed_and_id_kept(d):
    q = dns.message.make_query("SvC1.TESTNS.svc.Cluster.LOCAL.", "A", use_edns=False)
    q.id = 0xBEEF
    out = answer(d, q.to_wire())
    assert out[:2] == b"\xbe\xef"
    assert b"\x04SvC1\x06TESTNS\x03svc\x07Cluster\x05LOCAL\x00" in out
    m = dns.message.from_wire(out)
    assert m.answer[0].name.to_text() == "SvC1.TESTNS.svc.Cluster.LOCAL."


def test_edns_echoed_with_do_bit(d):
    q = dns.message.make_query("svc1.testns.svc.cluster.local.", "A", use_edns=0, payload=1400, want_dnssec=True)
    m = dns.message.from_wire(answer(d, q.to_wire()))
    assert m.edns == 0 and m.ednsflags & dns.flags.DO and m.payload == 1400


def test_edns_unknown_version_badvers(d):
    q = dns.message.make_query("svc1.testns.svc.cluster.local.", "A", use_edns=1)
    m = dns.message.from_wire(answer(d, q.to_wire()))
    assert m.rcode() == dns.rcode.BADVERS


@pytest.mark.parametrize("edns,tcp,tc", [(False, False, True), (512, False, True), (4096, False, False), (False, True, False)], ids=["udp-512", "edns-512", "edns-4096", "tcp"])
def test_truncation_keeps_whole_records_and_sets_tc(d, edns, tcp, tc):
    q = dns.message.make_query("_http._tcp.hdls1.testns.svc.cluster.local.", "SRV", use_edns=0 if edns else False, payload=edns or 512)
    out = answer(d, q.to_wire(), tcp=tcp)
    m = dns.message.from_wire(out)
    assert bool(m.flags & dns.flags.TC) == tc
    if not tcp:
        assert len(out) <= (edns or 512)
    if tc:
        # Truncation keeps a prefix of the full answer, as miekg/dns Msg.Truncate.
        assert 0 < sum(len(r) for r in m.answer) <= 5
    else:
        assert sum(len(r) for r in m.answer) == 5 and sum(len(r) for r in m.additional) == 6


def test_template_stamp_matches_a_full_render(d):
    q = dns.message.make_query("svc-dual-stack.testns.svc.cluster.local.", "SRV", use_edns=False)
    first = answer(d, q.to_wire())
    second = answer(d, q.to_wire())  # from the template
    assert first == second


def _mutations(seed: int, base: list[bytes], n: int):
    rnd = random.Random(seed)
    for _ in range(n):
        b = bytearray(rnd.choice(base))
        op = rnd.randrange(4)
        if op == 0 and b:
            b = b[: rnd.randrange(len(b))]  # truncated
        elif op == 1 and b:
            for _ in range(rnd.randrange(1, 6)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 2:
            b += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        else:
            b = bytearray(rnd.randrange(256) for _ in range(rnd.randrange(0, 80)))
        yield bytes(b)


BASE = [
    dns.message.make_query("svc1.testns.svc.cluster.local.", "A").to_wire(),
    dns.message.make_query("_http._tcp.hdls1.testns.svc.cluster.local.", "SRV", use_edns=0).to_wire(),
    dns.message.make_query("1.0.0.10.in-addr.arpa.", "PTR", use_edns=False).to_wire(),
]


def _check_reply(data: bytes, out):
    if out is None:
        return
    assert isinstance(out, bytes) and len(out) >= 12
    assert out[:2] == data[:2]
    assert out[2] & wire.QR


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_random_and_truncated_packets_never_crash(d, seed):
    for data in _mutations(seed, BASE, 500):
        _check_reply(data, answer(d, data))
        _check_reply(data, answer(d, data, tcp=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_hypothesis_any_bytes(d, data):
    _check_reply(data, answer(d, data))


def test_template_truncated_counts():
    body = b""
    t = wire.Template(body=body, counts=(0, 0, 0), rcode=3)
    q = wire.parse_query(dns.message.make_query("x.", "A", use_edns=False).to_wire())
    data = struct.pack("!H", 7) + b"\x01\x00" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x01x\x00\x00\x01\x00\x01"
    out = t.stamp(data, q, 512)
    m = dns.message.from_wire(out)
    assert m.id == 7 and m.rcode() == dns.rcode.NXDOMAIN and m.flags & dns.flags.RD


def test_names_are_compressed(d):
    """Owner names reuse earlier labels through pointers (RFC 1035 4.1.4); SRV targets never do (RFC 2782, as miekg/dns)."""
    q = dns.message.make_query("_http._tcp.hdls1.testns.svc.cluster.local.", "SRV", use_edns=0, payload=4096)
    out = answer(d, q.to_wire())
    qend = wire.question_end(out)
    assert out[qend : qend + 2] == b"\xc0\x0c"  # the first answer's owner is the question itself
    # Spelled out in the question and in each of the 5 SRV targets; the 6 glue owners are compressed.
    assert out.count(b"\x05hdls1\x06testns\x03svc\x07cluster\x05local\x00") == 6
    assert b"\x09172-0-0-2\xc0" in out and b"\x08dup-name\xc0" in out
    m = dns.message.from_wire(out)
    uncompressed = len(q.to_wire()) + sum(_plain_len(rrset) for rrset in m.answer + m.additional)
    assert len(out) < uncompressed * 0.6, (len(out), uncompressed)


def _plain_len(rrset) -> int:
    """Bytes the RRset takes on the wire with no compression at all."""
    import io

    f = io.BytesIO()
    rrset.to_wire(f, compress=None)
    return len(f.getvalue())
