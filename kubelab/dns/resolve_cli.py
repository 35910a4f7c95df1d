"""``kubelab resolve``: resolve a name the way glibc or musl walks resolv.conf, printing every query."""

from __future__ import annotations

import argparse
import json
import sys

from kubelab.dns.resolver import STYLES, ResolvConf, Walker, parse_resolv_conf, rcode_text, sender_for

DESCRIPTION = """\
A stub resolver that follows resolv.conf exactly as glibc's
__res_context_search (or musl's name_from_dns_search) does: the trailing
dot, ndots, the search order, which answers continue the walk (glibc:
NXDOMAIN, NODATA and SERVFAIL go on; musl: only NXDOMAIN), and the final
as-is query.  --style musl also follows musl's query core: every
nameserver at once, 'timeout' is the whole budget with a resend every
timeout/attempts, REFUSED ignored and SERVFAIL re-asked until then.
With --family unspec (the default, like getaddrinfo and 'getent ahosts')
each step asks A and AAAA together.  Every query sent is
printed with the answer it got, then the result.
"""

EPILOG = """\
examples:
  kubelab resolve web --resolv-conf examples/resolv.conf
  kubelab resolve web.default --search default.svc.cluster.local svc.cluster.local cluster.local \\
      --ndots 5 --server 127.0.0.1:5353
  kubelab resolve example.com --style musl --json

exit status: 0 when the name resolved, 1 when it did not, 2 on bad usage.
/etc/hosts is not consulted (nsswitch 'files'): only DNS.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the name to resolve, as an application would pass it (a trailing dot means absolute)")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf", help="resolv.conf to follow (default: /etc/resolv.conf)")
    p.add_argument("--search", nargs="+", metavar="DOMAIN", help="override the search list")
    p.add_argument("--ndots", type=int, help="override options ndots:N")
    p.add_argument("--server", action="append", metavar="ADDR[:PORT]", help="override the nameservers (repeatable)")
    p.add_argument("--style", choices=STYLES, default="glibc", help="whose search rules to follow (default: glibc)")
    p.add_argument("--family", choices=("unspec", "inet", "inet6"), default="unspec", help="unspec asks A+AAAA like getaddrinfo(AF_UNSPEC); inet only A; inet6 only AAAA")
    p.add_argument("--timeout", type=float, help="override options timeout:N (seconds per try)")
    p.add_argument("--attempts", type=int, help="override options attempts:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def load_conf(args: argparse.Namespace) -> ResolvConf:
    from kubelab.dns.forward import parse_hostport

    try:
        with open(args.resolv_conf, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        if args.server is None:
            raise ValueError(f"--resolv-conf {args.resolv_conf}: no such file (or give --server ADDR)") from None
        text = ""
    conf = parse_resolv_conf(text, style=args.style)
    if args.search is not None:
        conf.search = list(args.search)
    if args.ndots is not None:
        if args.ndots < 0:
            raise ValueError("--ndots must be 0 or more")
        conf.ndots = min(args.ndots, 15)
    if args.server:
        conf.nameservers = [parse_hostport(s, 53) for s in args.server]
    if args.timeout is not None:
        conf.timeout = args.timeout
    if args.attempts is not None:
        conf.attempts = max(1, args.attempts)
    return conf


def run(args: argparse.Namespace) -> int:
    try:
        conf = load_conf(args)
        walker = Walker(conf, sender_for(args.style, conf), style=args.style)
        result = walker.resolve(args.name, args.family)
    except ValueError as e:
        print(f"kubelab resolve: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "style": args.style,
                    "resolv_conf": conf.describe(),
                    "queries": [
                        {
                            "name": s.qname,
                            "type": t,
                            "server": s.server,
                            "rcode": rcode_text(s.response.rcode) if s.response else "TIMEOUT",
                            "answers": s.response.answers if s.response else [],
                        }
                        for s, (_, t) in zip(result.sent, result.queries, strict=True)
                    ],
                    "status": result.status,
                    "answers": [a for r in result.answers for a in r.answers],
                },
                indent=2,
            )
        )
    else:
        print(f";; {args.style}: {conf.describe()}")
        for i, (s, (_, t)) in enumerate(zip(result.sent, result.queries, strict=True), 1):
            if s.response is None:
                got = "timeout"
            else:
                r = s.response
                flags = " ".join(f for f, on in (("aa", r.aa), ("ra", r.ra), ("tc", r.tc)) if on)
                got = f"{rcode_text(r.rcode)} {r.ancount} answer{'s' if r.ancount != 1 else ''}" + (f" [{flags}]" if flags else "")
                if args.style == "musl" and r.rcode not in (0, 3):
                    got += " (ignored: musl takes only NOERROR/NXDOMAIN, resends until the timeout)"
            print(f"query {i}: {s.qname} {t} @{s.server} -> {got}")
        print(f"result: {result.status}")
        for r in result.answers:
            for line in r.answers:
                print(f"  {line}")
    return 0 if result.status == "ok" else 1
