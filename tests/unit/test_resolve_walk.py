"""The search walk of ``kubelab resolve`` for glibc and musl, driven from an answer table (no sockets).

Addresses: none on the wire; answers use 10.0.0.0/24 and fd00::/64 as data.
"""

from __future__ import annotations

import pytest

from kubelab.dns.resolver import A, AAAA, NOERROR, NXDOMAIN, SERVFAIL, Response, Walker, parse_resolv_conf

KUBELET = "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"

# name -> {qtype: rcode or list of answer lines}; anything else NXDOMAIN (authoritative).
TABLE = {
    "web.default.svc.cluster.local.": {A: ["web.default.svc.cluster.local. 5 IN A 10.0.0.1"], AAAA: NOERROR},
    "db.svc.cluster.local.": {A: NOERROR, AAAA: NOERROR},  # exists, no addresses (NODATA)
    "flaky.default.svc.cluster.local.": {A: SERVFAIL, AAAA: SERVFAIL},
    "flaky.svc.cluster.local.": {A: ["flaky.svc.cluster.local. 5 IN A 10.0.0.9"], AAAA: NOERROR},
    "v6.default.svc.cluster.local.": {A: NOERROR, AAAA: ["v6.default.svc.cluster.local. 5 IN AAAA fd00::1"]},
    "example.com.": {A: ["example.com. 5 IN A 10.0.0.80"], AAAA: NOERROR},
}


def fake_send(qname, types, ns, res):
    from kubelab.dns.resolver import Sent

    out = []
    for t in types:
        entry = TABLE.get(qname, {}).get(t, NXDOMAIN if qname not in TABLE else NOERROR)
        if isinstance(entry, list):
            r = Response(qname, t, NOERROR, entry, aa=True)
        else:
            r = Response(qname, t, entry, [], aa=True)
        res.sent.append(Sent(qname, t, "10.96.0.10", r))
        out.append(r)
    return out


def walk(name, style="glibc", conf=KUBELET, family="unspec"):
    c = parse_resolv_conf(conf, style=style, env={}, hostname="node")
    c.attempts = 1
    return Walker(c, fake_send, style=style).resolve(name, family)


def names(result):
    out = []
    for n, t in result.queries:
        if t == "A":
            out.append(n)
    return out


CASES = [
    ("glibc-short-first-domain", "glibc", "web", ["web.default.svc.cluster.local."], "ok"),
    ("glibc-svc-ns", "glibc", "web.default", ["web.default.default.svc.cluster.local.", "web.default.svc.cluster.local."], "ok"),
    (
        "glibc-fqdn-without-dot-walks-then-as-is",
        "glibc",
        "example.com",
        ["example.com.default.svc.cluster.local.", "example.com.svc.cluster.local.", "example.com.cluster.local.", "example.com."],
        "ok",
    ),
    ("glibc-trailing-dot-only-as-is", "glibc", "example.com.", ["example.com."], "ok"),
    ("glibc-trailing-dot-stops-even-on-nxdomain", "glibc", "nothere.", ["nothere."], "HOST_NOT_FOUND"),
    ("glibc-nodata-keeps-walking", "glibc", "db", ["db.default.svc.cluster.local.", "db.svc.cluster.local.", "db.cluster.local.", "db."], "NO_DATA"),
    ("glibc-servfail-keeps-walking", "glibc", "flaky", ["flaky.default.svc.cluster.local.", "flaky.svc.cluster.local."], "ok"),
    ("glibc-aaaa-answer-counts", "glibc", "v6", ["v6.default.svc.cluster.local."], "ok"),
    (
        "glibc-ndots-reached-as-is-first",
        "glibc",
        "a.b.c.d.e.f",
        ["a.b.c.d.e.f.", "a.b.c.d.e.f.default.svc.cluster.local.", "a.b.c.d.e.f.svc.cluster.local.", "a.b.c.d.e.f.cluster.local."],
        "HOST_NOT_FOUND",
    ),
    ("musl-short", "musl", "web", ["web.default.svc.cluster.local."], "ok"),
    ("musl-nodata-stops", "musl", "db", ["db.default.svc.cluster.local.", "db.svc.cluster.local."], "EAI_NODATA"),
    ("musl-servfail-stops", "musl", "flaky", ["flaky.default.svc.cluster.local."], "EAI_AGAIN"),
    ("musl-ndots-reached-no-search", "musl", "a.b.c.d.e.f", ["a.b.c.d.e.f."], "EAI_NONAME"),
    ("musl-trailing-dot", "musl", "example.com.", ["example.com."], "ok"),
    (
        "musl-fqdn-without-dot",
        "musl",
        "example.com",
        ["example.com.default.svc.cluster.local.", "example.com.svc.cluster.local.", "example.com.cluster.local.", "example.com."],
        "ok",
    ),
]


@pytest.mark.parametrize("style,name,expect,status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_walk(style, name, expect, status):
    r = walk(name, style)
    assert names(r) == expect
    assert r.status == status
    # unspec asks A then AAAA for every step
    assert [t for _, t in r.queries] == ["A", "AAAA"] * len(expect)


def test_family_inet_asks_only_a():
    r = walk("web", family="inet")
    assert r.queries == [("web.default.svc.cluster.local.", "A")]


PARSE = [
    ("last-search-wins", "search a b\ndomain c\n", ["c"], 1),
    ("search-after-domain", "domain c\nsearch a b\n", ["a", "b"], 1),
    ("ndots-capped-15", "options ndots:99\n", [], 15),
    ("comments", "# x\nsearch a ; b\n", ["a"], 1),
]


@pytest.mark.parametrize("text,search,ndots", [c[1:] for c in PARSE], ids=[c[0] for c in PARSE])
def test_parse_resolv_conf(text, search, ndots):
    c = parse_resolv_conf(text, style="glibc", env={}, hostname="node")
    assert c.search == search and c.ndots == ndots


def test_glibc_hostname_domain_fallback_and_env():
    c = parse_resolv_conf("nameserver 1.1.1.1\n", style="glibc", env={}, hostname="node.example.org")
    assert c.search == ["example.org"]
    c = parse_resolv_conf("search a\n", style="glibc", env={"LOCALDOMAIN": "x y", "RES_OPTIONS": "ndots:3"}, hostname="n")
    assert c.search == ["x", "y"] and c.ndots == 3


def test_bad_name():
    with pytest.raises(ValueError, match="not a host name"):
        walk("a..b")
