"""Answers for the cluster zone, computed the way CoreDNS's kubernetes plugin does.

This is the slow, exact path: given a question it decides rcode, answer,
authority and additional records following coredns/coredns
plugin/kubernetes (handler.go ServeDNS, kubernetes.go Services/Records/
findServices/findPods, parse.go parseRequest, reverse.go, ns.go) and the
generic lookups in plugin/backend_lookup.go (A/AAAA/SRV/TXT/CNAME/PTR/NS/
SOA, SRV weights, BackendError with the SOA).  The result is rendered once
with dnspython into a :class:`kubelab.dns.wire.Template` that the server
stamps for every later identical question.

An ExternalName whose target is outside the cluster zone needs the
upstream's answer (CoreDNS: Upstream.Lookup); :meth:`Responder.answer`
then reports the lookups it needs and is called again with their results.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from kubelab.dns import wire
from kubelab.dns.index import AddressRec, ClusterIndex

DNS_SCHEMA_VERSION = "1.1.0"
DNS_VERSION_TTL = 28800
MAX_CNAME_CHAIN = 10

POD_MODES = ("disabled", "insecure", "verified")


class NameError_(Exception):
    """CoreDNS's errNoItems / errNsNotExposed / errInvalidRequest: the name does not exist."""


@dataclass(frozen=True)
class Settings:
    """What answers depend on besides the cluster."""

    zone: str = "cluster.local."  # with trailing dot, lowercase
    ttl: int = 5
    pods: str = "disabled"
    endpoint_pod_names: bool = False
    reverse_zones: tuple[str, ...] = ("in-addr.arpa.", "ip6.arpa.")
    local_ips: tuple[str, ...] = ()  # this server's IPs, for NS / ns.dns.<zone> (CoreDNS boundIPs)

    @property
    def zones(self) -> tuple[str, ...]:
        return (self.zone, *self.reverse_zones)


@dataclass(frozen=True, slots=True)
class Item:
    """CoreDNS's msg.Service: one candidate record (host is an IP or a name)."""

    host: str
    port: int = 0
    target: str = ""  # the name an SRV points at (msg.Domain(Key)); also A owner in additional
    ttl: int = 5
    text: str = ""

    @property
    def kind(self) -> int:
        """HostType: A, AAAA, or CNAME when host is not an IP (TXT items have text)."""
        if self.text:
            return wire.TYPE_TXT
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return wire.TYPE_CNAME
        return wire.TYPE_A if ip.version == 4 else wire.TYPE_AAAA


RR = tuple[str, int, int, str]  # (owner, ttl, type, rdata text)


@dataclass
class Reply:
    """A computed answer, not yet rendered."""

    rcode: int = wire.NOERROR
    answer: list = field(default_factory=list)  # RR tuples or dnspython RRsets (from upstream)
    authority: list = field(default_factory=list)
    additional: list = field(default_factory=list)
    aa: bool = True
    ra: bool = False
    truncated: bool = False
    # Set when the answer used the upstream (never prebuilt: TTLs and content change).
    dynamic: bool = False
    # ("forward", None): the question is not ours, forward it.
    forward: bool = False
    needs: list[tuple[str, int]] = field(default_factory=list)


def in_zone(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def match_zone(name: str, zones: tuple[str, ...]) -> str | None:
    """The longest of ``zones`` that ``name`` is in (plugin.Zones.Matches)."""
    best = None
    for z in zones:
        if in_zone(name, z) and (best is None or len(z) > len(best)):
            best = z
    return best


def endpoint_hostname(addr: AddressRec, endpoint_pod_names: bool) -> str:
    """The endpoint's DNS label (kubernetes.go endpointHostname)."""
    if addr.hostname:
        return addr.hostname
    if endpoint_pod_names and addr.target_name:
        return addr.target_name
    if "." in addr.ip:
        return addr.ip.replace(".", "-")
    if ":" in addr.ip:
        h = addr.ip.replace(":", "-")
        return h + "0" if h.endswith("-") else h
    return ""


def _strip_underscore(s: str) -> str:
    return s[1:] if s.startswith("_") else s


@dataclass
class Request:
    """parseRequest's recordRequest."""

    port: str = ""
    protocol: str = ""
    endpoint: str = ""
    service: str = ""
    namespace: str = ""
    pod_or_svc: str = ""


def parse_request(name: str, zone: str) -> Request:
    """Split a name of the cluster zone into its parts (parse.go parseRequest)."""
    base = name[: len(name) - len(zone)].rstrip(".") if name != zone else ""
    r = Request()
    if base in ("", "svc", "pod"):
        return r
    segs = base.split(".")
    last = len(segs) - 1
    r.pod_or_svc = segs[last]
    if r.pod_or_svc not in ("pod", "svc"):
        raise NameError_("invalid request")
    last -= 1
    if last < 0:
        return r
    r.namespace = segs[last]
    last -= 1
    if last < 0:
        return r
    r.service = segs[last]
    last -= 1
    if last < 0:
        return r
    if last == 0:
        r.endpoint = segs[0]
    elif last == 1:
        r.protocol = _strip_underscore(segs[1])
        r.port = _strip_underscore(segs[0])
    else:
        raise NameError_("query too long")
    return r


def _match_port(r: Request, name: str, protocol: str) -> bool:
    return (not r.port or r.port == name) and (not r.protocol or r.protocol == protocol)


def reverse_to_ip(name: str) -> str:
    """The address a reverse name stands for, or "" (dnsutil.ExtractAddressFromReverse)."""
    if name.endswith(".in-addr.arpa."):
        parts = name[: -len(".in-addr.arpa.")].split(".")
        try:
            return str(ipaddress.IPv4Address(".".join(reversed(parts))))
        except ValueError:
            return ""
    if name.endswith(".ip6.arpa."):
        nibbles = name[: -len(".ip6.arpa.")].split(".")
        if len(nibbles) != 32 or any(len(n) != 1 for n in nibbles):
            return ""
        h = "".join(reversed(nibbles))
        try:
            return str(ipaddress.IPv6Address(int(h, 16)))
        except ValueError:
            return ""
    return ""


class Responder:
    """Computes CoreDNS-identical answers for the cluster and reverse zones."""

    def __init__(self, index: ClusterIndex, settings: Settings) -> None:
        self.index = index
        self.s = settings

    # -- entry point ---------------------------------------------------------

    def answer(self, qname: str, qtype: int, upstream: dict | None = None) -> Reply:
        """Answer ``qname`` (lowercase, trailing dot) for ``qtype``.

        ``upstream`` maps (name, qtype) to the upstream's dnspython message for
        names this answer needs resolved outside the zone; when a needed name
        is missing the reply lists it in ``needs`` and nothing else is valid.
        """
        zone = match_zone(qname, self.s.zones)
        if zone is None:
            return Reply(forward=True)
        reverse = zone != self.s.zone
        ctx = _Ctx(zone=zone, upstream=upstream)
        records: list = []
        extra: list = []
        try:
            if qtype in (wire.TYPE_A, wire.TYPE_AAAA):
                records = self._address(ctx, qname, qtype, [])
            elif qtype == wire.TYPE_TXT:
                records = self._txt(ctx, qname)
            elif qtype == wire.TYPE_CNAME:
                items = self._services(ctx, qname, qtype)
                if items and items[0].kind == wire.TYPE_CNAME:
                    records = [(qname, items[0].ttl, wire.TYPE_CNAME, _fqdn(items[0].host))]
            elif qtype == wire.TYPE_PTR:
                records = self._ptr(ctx, qname)
            elif qtype == wire.TYPE_MX:
                self._services(ctx, qname, qtype)  # never mail: existence only
            elif qtype == wire.TYPE_SRV:
                records, extra = self._srv(ctx, qname)
            elif qtype == wire.TYPE_SOA:
                if qname == zone:
                    records = [self._soa(zone)]
            elif qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR):
                return Reply(rcode=wire.REFUSED, aa=False)
            elif qtype == wire.TYPE_NS and qname == zone:
                records, extra = self._ns(zone)
            else:
                # A fake A lookup tells NODATA from NXDOMAIN.
                self._address(ctx, qname, wire.TYPE_A, [])
        except NameError_:
            if reverse:
                # The default Corefile says "fallthrough in-addr.arpa ip6.arpa".
                return Reply(forward=True)
            rcode = wire.NXDOMAIN if self.index.synced else wire.SERVFAIL
            return Reply(rcode=rcode, authority=[self._soa(zone)])
        if ctx.needs:
            return Reply(needs=ctx.needs, dynamic=True)
        if not records:
            return Reply(rcode=wire.NOERROR, authority=[self._soa(zone)], dynamic=ctx.dynamic)
        return Reply(answer=records, additional=extra, truncated=ctx.truncated, dynamic=ctx.dynamic)

    # -- backend (kubernetes.go) ----------------------------------------------

    def _services(self, ctx: _Ctx, qname: str, qtype: int) -> list[Item]:
        """Kubernetes.Services for the non-TXT, non-NS-apex cases."""
        zone = ctx.zone
        if qname == "ns.dns." + zone:
            items = []
            for owner, ip in self._ns_addrs(zone):
                kind = wire.TYPE_A if ":" not in ip else wire.TYPE_AAAA
                if kind == qtype:
                    items.append(Item(host=ip, target=qname, ttl=self.s.ttl))
            return items
        items = self._records(ctx, qname)
        if qtype == wire.TYPE_SRV:
            items = [i for i in items if i.kind != wire.TYPE_CNAME]
        return items

    def _records(self, ctx: _Ctx, qname: str) -> list[Item]:
        zone = ctx.zone
        r = parse_request(qname, zone)
        if not r.pod_or_svc:
            return []
        if zone != self.s.zone:
            raise NameError_("reverse zone")
        if not self.index.namespace_exists(r.namespace):
            raise NameError_("namespace not exposed")
        if r.pod_or_svc == "pod":
            return self._find_pods(r, zone)
        return self._find_services(r, zone)

    def _find_pods(self, r: Request, zone: str) -> list[Item]:
        if self.s.pods == "disabled":
            raise NameError_("pods disabled")
        if not r.service:
            return []
        podname = r.service
        if podname.count("-") == 3 and "--" not in podname:
            ip = podname.replace("-", ".")
        else:
            ip = podname.replace("-", ":")
        if self.s.pods == "insecure":
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise NameError_("not an IP") from None
            return [Item(host=ip, ttl=self.s.ttl)]
        items = []
        for ns, _name in self.index.pods_by_ip.get(ip, ()):
            if ns == r.namespace:
                items.append(Item(host=ip, ttl=self.s.ttl))
        if not items:
            raise NameError_("no such pod")
        return items

    def _find_services(self, r: Request, zone: str) -> list[Item]:
        if not r.service:
            return []
        svc = self.index.services.get((r.namespace, r.service))
        if svc is None:
            raise NameError_("no such service")
        ttl = self.s.ttl
        base = f"{svc.name}.{svc.namespace}.svc.{zone}"
        items: list[Item] = []
        found = False
        if svc.type == "ExternalName":
            if r.endpoint or r.port or r.protocol:
                raise NameError_("no endpoints for ExternalName")
            it = Item(host=svc.external_name, target=base, ttl=ttl)
            if it.kind == wire.TYPE_CNAME:
                return [it]
            raise NameError_("ExternalName is an IP")
        if svc.headless or r.endpoint:
            for sl in self.index.service_slices(svc.namespace, svc.name):
                for addr in sl.addresses:
                    host = endpoint_hostname(addr, self.s.endpoint_pod_names)
                    if r.endpoint and r.endpoint != host:
                        continue
                    for p in sl.ports:
                        if not _match_port(r, p.name, p.protocol):
                            continue
                        items.append(Item(host=addr.ip, port=p.port, target=f"{host}.{base}", ttl=ttl))
                        found = True
        else:
            for p in svc.ports:
                if not _match_port(r, p.name, p.protocol):
                    continue
                found = True
                for ip in svc.cluster_ips:
                    items.append(Item(host=ip, port=p.port, target=base, ttl=ttl))
        if not found:
            raise NameError_("no matching port or endpoint")
        return items

    def _ns_addrs(self, zone: str) -> list[tuple[str, str]]:
        """(name, ip) of this server (ns.go nsAddrs): the services it is an endpoint of, else ns.dns.<zone>."""
        out: list[tuple[str, str]] = []
        found = False
        for ip in self.s.local_ips:
            for ns, svcname, slname in sorted(self.index.slices_by_ip.get(ip, ())):
                found = True
                svc = self.index.services.get((ns, svcname))
                if svc is None:
                    continue
                name = f"{svc.name}.{svc.namespace}.svc.{zone}"
                if svc.headless:
                    sl = self.index.slices.get((ns, svcname), {}).get(slname)
                    for a in sl.addresses if sl else ():
                        out.append((f"{endpoint_hostname(a, self.s.endpoint_pod_names)}.{name}", a.ip))
                else:
                    out.extend((name, cip) for cip in svc.cluster_ips)
        if not found:
            out = [("ns.dns." + zone, ip) for ip in self.s.local_ips]
        return out

    # -- lookups (backend_lookup.go) -----------------------------------------

    def _address(self, ctx: _Ctx, qname: str, qtype: int, previous: list) -> list:
        zone = ctx.zone
        if qname == zone:
            # checkForApex: apex.dns.<zone> is an invalid request here, so the zone
            # itself is looked up, which parses to nothing: NODATA.
            items: list[Item] = []
        else:
            items = self._services(ctx, qname, qtype)
        records: list = []
        seen: set[str] = set()
        for it in items:
            kind = it.kind
            if kind == wire.TYPE_CNAME:
                target = _fqdn(it.host).lower()
                if target == qname or target.endswith("." + qname):
                    continue  # x CNAME x is a loop
                cname = (qname, it.ttl, wire.TYPE_CNAME, _fqdn(it.host))
                if len(previous) > MAX_CNAME_CHAIN or any(p[3].lower() == cname[3].lower() and p[0] == qname for p in previous):
                    continue
                if in_zone(target, zone):
                    try:
                        nxt = self._address(ctx, target, qtype, [*previous, cname])
                    except NameError_:
                        continue
                    if nxt:
                        records.append(cname)
                        records.extend(nxt)
                    continue
                ctx.dynamic = True
                up = ctx.lookup(target, qtype)
                if up is _MISSING:
                    continue
                records.append(cname)
                if up is not None:
                    if up.flags & dns.flags.TC:
                        ctx.truncated = True
                    records.extend(up.answer)
                continue
            if kind == qtype and it.host not in seen:
                seen.add(it.host)
                records.append((qname, it.ttl, qtype, it.host))
        return records

    def _txt(self, ctx: _Ctx, qname: str) -> list:
        zone = ctx.zone
        base = qname[: len(qname) - len(zone)].rstrip(".") if qname != zone else ""
        if base == "dns-version":
            return [(qname, DNS_VERSION_TTL, wire.TYPE_TXT, f'"{DNS_SCHEMA_VERSION}"')]
        items = self._records(ctx, qname)
        if items:
            return []  # the name exists with other types: NODATA
        raise NameError_("no TXT")

    def _ptr(self, ctx: _Ctx, qname: str) -> list:
        ip = reverse_to_ip(qname)
        if not ip:
            self._records(ctx, qname)
            return []
        out: list = []
        seen: set[str] = set()
        for target in self._names_for_ip(ip, ctx.zone):
            if target not in seen:
                seen.add(target)
                out.append((qname, self.s.ttl, wire.TYPE_PTR, target))
        if not out:
            raise NameError_("no PTR")
        return out

    def _names_for_ip(self, ip: str, zone: str) -> list[str]:
        """reverse.go serviceRecordForIP: the first service with that cluster IP, else every endpoint with it."""
        primary = self.s.zone
        for ns, name in self.index.service_by_ip.get(ip, ()):
            return [f"{name}.{ns}.svc.{primary}"]
        out = []
        for ns, svcname, slname in sorted(self.index.slices_by_ip.get(ip, ())):
            sl = self.index.slices.get((ns, svcname), {}).get(slname)
            for a in sl.addresses if sl else ():
                if a.ip == ip:
                    out.append(f"{endpoint_hostname(a, self.s.endpoint_pod_names)}.{svcname}.{ns}.svc.{primary}")
        return out

    def _srv(self, ctx: _Ctx, qname: str) -> tuple[list, list]:
        items = self._services(ctx, qname, wire.TYPE_SRV)
        total = 100 * len(items)  # every item has weight 0 -> counts 100, all at priority 0
        records: list = []
        extra: list = []
        dup: set = set()
        for it in items:
            if it.port == -1:
                continue
            w = math.floor(100.0 / total * 100) if total else 0
            weight = max(1, min(w, 65535))
            target = it.target
            if (target, "", it.port) not in dup:
                dup.add((target, "", it.port))
                records.append((qname, it.ttl, wire.TYPE_SRV, f"0 {weight} {it.port} {target}"))
            if (target, it.host, 0) not in dup:
                dup.add((target, it.host, 0))
                extra.append((target, it.ttl, it.kind, it.host))
        return records, extra

    def _ns(self, zone: str) -> tuple[list, list]:
        records: list = []
        extra: list = []
        seen: set[str] = set()
        for name, ip in self._ns_addrs(zone):
            kind = wire.TYPE_A if ":" not in ip else wire.TYPE_AAAA
            extra.append((name, self.s.ttl, kind, ip))
            if name not in seen:
                seen.add(name)
                records.append((zone, self.s.ttl, wire.TYPE_NS, name))
        return records, extra

    def _soa(self, zone: str) -> RR:
        ttl = min(self.s.ttl, 300)
        rdata = f"ns.dns.{zone} hostmaster.{zone} {self.index.modified & 0xFFFFFFFF} 7200 1800 86400 {self.s.ttl}"
        return (zone, ttl, wire.TYPE_SOA, rdata)


_MISSING = object()


@dataclass
class _Ctx:
    zone: str
    upstream: dict | None
    needs: list = field(default_factory=list)
    dynamic: bool = False
    truncated: bool = False

    def lookup(self, name: str, qtype: int):
        if self.upstream is None or (name, qtype) not in self.upstream:
            if (name, qtype) not in self.needs:
                self.needs.append((name, qtype))
            return _MISSING
        return self.upstream[(name, qtype)]


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


# -- rendering -------------------------------------------------------------------


def render(reply: Reply, qname_wire: bytes, qtype: int, qclass: int = wire.CLASS_IN, msg_id: int = 0, rd: bool = False) -> bytes:
    """Render ``reply`` as a full response (no OPT) with dnspython."""
    qname = dns.name.from_wire(qname_wire, 0)[0]
    m = dns.message.Message(id=msg_id)
    m.flags = dns.flags.QR | (dns.flags.AA if reply.aa else 0) | (dns.flags.RA if reply.ra else 0) | (dns.flags.RD if rd else 0)
    if reply.truncated:
        m.flags |= dns.flags.TC
    m.set_rcode(reply.rcode)
    m.question.append(dns.rrset.RRset(qname, qclass, qtype))
    for section, rrs in ((m.answer, reply.answer), (m.authority, reply.authority), (m.additional, reply.additional)):
        for rr in rrs:
            section.append(_rrset(rr, qname))
    # Each record is its own RRset so order and duplicates are exactly as computed.
    return m.to_wire(max_size=65535)


def _rrset(rr, qname: dns.name.Name):
    if isinstance(rr, dns.rrset.RRset):
        return rr
    owner, ttl, rtype, rdata = rr
    name = dns.name.from_text(owner)
    if name == qname:
        name = qname  # same object: the question's spelling
    return dns.rrset.from_text(name, ttl, dns.rdataclass.IN, rtype, rdata)


def rr_lines(wire_msg: bytes) -> dict[str, list[str]]:
    """Zone-file lines per section of a wire response (for tests and ``--debug``)."""
    m = dns.message.from_wire(wire_msg, ignore_trailing=True)
    out: dict[str, list[str]] = {"answer": [], "authority": [], "additional": []}
    for key, sec in (("answer", m.answer), ("authority", m.authority), ("additional", m.additional)):
        for rrset in sec:
            for line in rrset.to_text().splitlines():
                out[key].append(" ".join(line.split()))
    return out


def rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(rcode)


def rdtype_value(text: str) -> int:
    return int(dns.rdatatype.from_text(text))
