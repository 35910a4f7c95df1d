"""Traces: one request through a lab, captured at every hop, with each address translation named.

``kubelab trace LAB --from POD --to SERVICE[:PORT]`` (see
:mod:`kubelab.netlab.trace_cli`) does this:

1. picks the capture points: every interface of the source's namespace (a
   pod, a node, or the external client), of every node, and of every pod
   behind the Service (from the lab's EndpointSlices) -- except bridge
   devices (``cbr0``, ``ul0``), whose frames are the same ones their ports
   already show;
2. opens one scapy ``L2ListenSocket`` per interface *inside* its namespace
   (a socket keeps the namespace it was created in, so one
   :class:`~scapy.sendrecv.AsyncSniffer` in this process listens to all of
   them), with kernel timestamps (``SO_TIMESTAMPNS``) so the hops of one
   packet sort in the order they happened, and with the packet direction
   (``PACKET_OUTGOING`` or not) kept;
3. makes one request from the source with a real client and a source port
   chosen here, so the flow is known before it starts: ``nc`` for TCP and
   UDP, ``dig`` for port 53;
4. groups the captures by packet (NAT rewrites addresses and ports, never
   the IP ID, TCP sequence numbers or payload) and prints each packet where
   its addresses change, naming the namespace that changed them: a request's
   destination rewritten is DNAT, its source rewritten is SNAT
   (masquerade), and on replies the same rewrites undone (un-DNAT /
   un-SNAT, conntrack's reverse NAT);
5. writes every capture to one pcapng file, one interface block per
   capture point named ``WHERE/IFACE`` (``node1/eth0``), with the
   namespace in each packet's comment and the direction in its flags.

A packet socket sees ingress frames before netfilter's PREROUTING and egress
frames after POSTROUTING, so when a rewrite shows up between a frame
entering a namespace and leaving it, that namespace rewrote it.

Pure parts (:func:`analyze`, :func:`format_trace`) take
:class:`Observation` lists, so they are unit-tested without a kernel.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelab.netlab import nsutil, topology

PACKET_OUTGOING = 4  # linux/if_packet.h
BRIDGES = (topology.BRIDGE, topology.UNDERLAY_BRIDGE)
DNS_PORT = 53


class TraceError(RuntimeError):
    """A trace could not be set up (unknown pod/service/port, lab in UML, no capture)."""


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturePoint:
    """One interface to listen on: ``where`` is a pod, node or ``client`` name."""

    where: str
    netns: str
    ifname: str
    note: str = ""  # e.g. the pod a node-side veth belongs to

    @property
    def label(self) -> str:
        return f"{self.where}/{self.ifname}"


@dataclass(frozen=True)
class FlowTuple:
    """Addresses of one packet as seen at one point."""

    proto: str  # TCP | UDP
    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass(frozen=True)
class Observation:
    """One captured frame: when, where, which direction, what addresses, which packet."""

    time: float
    point: CapturePoint
    outgoing: bool
    tuple: FlowTuple
    ident: tuple  # what NAT leaves alone: identifies the packet across hops
    summary: str = ""  # TCP flags / payload length, for the listing
    raw: bytes = b""

    @property
    def where(self) -> str:
        return self.point.where


@dataclass(frozen=True)
class Translation:
    """One address rewrite of one packet."""

    kind: str  # DNAT | SNAT | un-DNAT | un-SNAT
    where: str  # the namespace (pod/node name) that rewrote it
    before: str  # "ip:port"
    after: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}: {self.before} -> {self.after}"


@dataclass
class PacketHops:
    """One packet and every place it was seen, in time order."""

    reply: bool
    observations: list[Observation]
    # (index of the observation that first shows the rewrite, the rewrite)
    steps: list[tuple[int, Translation]] = field(default_factory=list)

    @property
    def translations(self) -> list[Translation]:
        return [t for _, t in self.steps]


@dataclass
class TraceResult:
    """Everything one trace found."""

    lab: str
    source: str
    source_ip: str
    service: str
    target: FlowTuple  # the request as the client sends it
    points: list[CapturePoint]
    observations: list[Observation]
    packets: list[PacketHops]
    client_output: str = ""
    client_returncode: int = 0
    conntrack: dict[str, list[str]] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)  # backend IP -> pod key

    @property
    def translations(self) -> list[Translation]:
        """Distinct rewrites, first-seen order."""
        out: list[Translation] = []
        for p in self.packets:
            for t in p.translations:
                if t not in out:
                    out.append(t)
        return out

    @property
    def answered_by(self) -> str:
        """The backend pod the request reached ("" if none did)."""
        for p in self.packets:
            if not p.reply:
                last = p.observations[-1].tuple
                if last.dst in self.backends:
                    return self.backends[last.dst]
        return ""


# --------------------------------------------------------------------------
# Analysis (pure)
# --------------------------------------------------------------------------


def _endpoint(addr: str, port: int) -> str:
    return f"{addr}:{port}"


def analyze(observations: Iterable[Observation], client: FlowTuple) -> list[PacketHops]:
    """Group captures into packets and find where each packet's addresses were rewritten.

    ``client`` is the request as the client sent it; a packet whose first
    sighting has the client's source port as its source (or destination,
    for replies) decides the direction.
    """
    groups: dict[tuple, list[Observation]] = {}
    for ob in sorted(observations, key=lambda o: o.time):
        groups.setdefault(ob.ident, []).append(ob)
    packets: list[PacketHops] = []
    for obs in groups.values():
        first = obs[0].tuple
        reply = not (first.sport == client.sport and first.src == client.src) and (
            first.dport == client.sport or first.dst == client.src or first.src != client.src
        )
        hops = PacketHops(reply=reply, observations=obs)
        for i, (prev, cur) in enumerate(zip(obs, obs[1:]), 1):
            # Ingress frames are captured before PREROUTING, egress ones after
            # POSTROUTING: a rewrite after an ingress sighting is that
            # namespace's; after an egress one, the next namespace's.
            where = prev.where if not prev.outgoing or prev.where == cur.where else cur.where
            a, b = prev.tuple, cur.tuple
            if (a.dst, a.dport) != (b.dst, b.dport):
                kind = "un-SNAT" if reply else "DNAT"
                hops.steps.append((i, Translation(kind, where, _endpoint(a.dst, a.dport), _endpoint(b.dst, b.dport))))
            if (a.src, a.sport) != (b.src, b.sport):
                kind = "un-DNAT" if reply else "SNAT"
                hops.steps.append((i, Translation(kind, where, _endpoint(a.src, a.sport), _endpoint(b.src, b.sport))))
        packets.append(hops)
    packets.sort(key=lambda p: p.observations[0].time)
    return packets


def _shown(obs: Sequence[Observation]) -> list[int]:
    """Indexes of the sightings worth a line: the first, each whose addresses changed, the last."""
    out: list[int] = []
    for i, ob in enumerate(obs):
        if i == 0 or i == len(obs) - 1 or ob.tuple != obs[i - 1].tuple:
            out.append(i)
    return out


def format_trace(result: TraceResult, *, verbose: bool = False, limit: int | None = None) -> str:
    """The trace as text: packets hop by hop, translations, who answered.

    ``verbose`` lists every sighting (not only the first, the last and those
    whose addresses changed); ``limit`` lists only the first packets.
    """
    lines: list[str] = []
    t = result.target
    lines.append(
        f"trace in lab {result.lab}: {result.source} ({result.source_ip}) -> {result.service} "
        f"{t.dst}:{t.dport}/{t.proto}, client source port {t.sport}"
    )
    wheres: dict[str, list[str]] = {}
    for p in result.points:
        wheres.setdefault(p.where, []).append(p.ifname)
    lines.append("captured at: " + ", ".join(f"{w} ({' '.join(ifs)})" for w, ifs in wheres.items()))
    lines.append("")
    if not result.packets:
        lines.append("no packets of this flow were captured")
    t0 = result.packets[0].observations[0].time if result.packets else 0.0
    width = max((len(_where_text(o)) for p in result.packets for o in p.observations), default=10)
    shown_packets = result.packets if limit is None else result.packets[:limit]
    for n, packet in enumerate(shown_packets, 1):
        rows = list(range(len(packet.observations))) if verbose else _shown(packet.observations)
        previous = -1
        for i in rows:
            ob = packet.observations[i]
            head = f"{n:3d} {(ob.time - t0) * 1000:9.3f}ms" if previous < 0 else " " * 15
            kinds = [f"{tr.kind} at {tr.where}" for at, tr in packet.steps if previous < at <= i]
            note = "  [" + ", ".join(kinds) + "]" if kinds else ""
            summary = f" {ob.tuple.proto} {ob.summary}".rstrip() if previous < 0 else ""
            lines.append(f"{head}  {_where_text(ob):<{width}}  {ob.tuple}{summary}{note}")
            previous = i
    if len(shown_packets) < len(result.packets):
        lines.append(f"      ... {len(result.packets) - len(shown_packets)} more packets (--verbose lists them all)")
    lines.append("")
    trs = result.translations
    lines.append("translations:")
    if not trs:
        lines.append("  none: every hop saw the same addresses")
    for tr in trs:
        what = {
            "DNAT": "request destination rewritten (the Service address to a backend)",
            "SNAT": "request source rewritten (masquerade)",
            "un-DNAT": "reply source rewritten back to the Service address",
            "un-SNAT": "reply destination rewritten back to the client",
        }[tr.kind]
        lines.append(f"  {tr.kind:<8} at {tr.where:<10} {tr.before} -> {tr.after}   {what}")
    if not any(tr.kind == "SNAT" for tr in trs) and result.packets:
        lines.append(f"  no SNAT: the backend saw the client's own address {result.source_ip}")
    for where, entries in result.conntrack.items():
        for entry in entries:
            lines.append(f"conntrack at {where}: {entry}")
    if result.answered_by:
        lines.append(f"answered by: {result.answered_by}")
    out = result.client_output.strip().splitlines()
    if out:
        lines.append(f"client got: {out[0]}")
    elif result.client_returncode:
        lines.append(f"client got no answer (exit {result.client_returncode})")
    return "\n".join(lines) + "\n"


def _where_text(ob: Observation) -> str:
    note = f"({ob.point.note})" if ob.point.note else ""
    return f"{ob.point.label}{note} {'out' if ob.outgoing else 'in'}"


# --------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------


def _interfaces(netns: str) -> list[str]:
    """Interfaces of a namespace that carry the lab's frames (not lo, not bridges)."""
    from pyroute2 import IPRoute

    with nsutil.entered(netns):
        ipr = IPRoute()
    try:
        out = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if name == "lo" or kind == "bridge" or name in BRIDGES:
                continue
            out.append(name)
        return sorted(out)
    finally:
        ipr.close()


def capture_points(lab, source: str, backends: Iterable[str]) -> list[CapturePoint]:
    """Where to listen: the source's namespace, every node, every backend pod."""
    state = lab.state()
    veth_owner = {
        topology.pod_veth(*key.split("/", 1)): key.split("/", 1)[1]
        for key, pod in state["pods"].items()
        if not pod["hostNetwork"]
    }
    spots: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(where: str, netns: str) -> None:
        if netns not in seen:
            seen.add(netns)
            spots.append((where, netns))

    add(source, lab.netns(source))
    for node in state["nodes"]:
        add(node, lab.netns(node))
    for key in backends:
        add(key.split("/", 1)[1] if key.startswith("default/") else key, lab.netns(key))
    points = []
    for where, netns in spots:
        for ifname in _interfaces(netns):
            points.append(CapturePoint(where, netns, ifname, veth_owner.get(ifname, "")))
    return points


def _tap_socket_class():
    from scapy.arch.linux import L2ListenSocket
    from scapy.layers import inet  # noqa: F401 - binds IP/TCP/UDP under Ether before the first frame is parsed
    from scapy.layers.l2 import Ether

    class TapSocket(L2ListenSocket):
        """A listen socket that keeps each frame's direction (scapy drops it)."""

        def recv(self, x: int = 65535, **kwargs: Any):
            data, sa_ll, ts = self._recv_raw(self.ins, x)
            if not data:
                return None
            pkt = Ether(data)
            pkt.time = ts if ts else time.time()
            pkt.direction = 2 if sa_ll[2] == PACKET_OUTGOING else 1  # pcapng EPB flags: 1 in, 2 out
            return pkt

    return TapSocket


def _open_sockets(points: Sequence[CapturePoint]) -> dict:
    TapSocket = _tap_socket_class()
    sockets: dict = {}
    try:
        for point in points:
            with nsutil.entered(point.netns):
                sock = TapSocket(iface=point.ifname, promisc=False)
            sockets[sock] = point.label
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _observation(pkt, point: CapturePoint) -> Observation | None:
    from scapy.layers.inet import IP, TCP, UDP

    if IP not in pkt:
        return None
    ip = pkt[IP]
    if TCP in pkt:
        l4 = pkt[TCP]
        proto = "TCP"
        payload = bytes(l4.payload)
        ident = ("TCP", ip.id, l4.seq, l4.ack, int(l4.flags), len(payload))
        summary = str(l4.flags) + (f" len={len(payload)}" if payload else "")
    elif UDP in pkt:
        l4 = pkt[UDP]
        proto = "UDP"
        payload = bytes(l4.payload)
        ident = ("UDP", ip.id, payload[:64])
        summary = f"len={len(payload)}"
    else:
        return None
    return Observation(
        time=float(pkt.time),
        point=point,
        outgoing=getattr(pkt, "direction", 1) == 2,
        tuple=FlowTuple(proto, ip.src, int(l4.sport), ip.dst, int(l4.dport)),
        ident=ident,
        summary=summary,
        raw=bytes(pkt),
    )


def _service_port(lab, service: str, port: str | None, proto: str | None) -> tuple[str, dict, str]:
    from kubelab.netlab.lab import LabError

    try:
        svc = lab.service(service)
    except LabError as exc:
        raise TraceError(str(exc)) from None
    key = service if "/" in service else f"default/{service}"
    cip = svc["clusterIP"]
    if not cip or cip == "None":
        raise TraceError(f"service {key} has no cluster IP (headless or ExternalName): trace a Service with one")
    ports = svc["ports"]
    wanted = proto.upper() if proto else None
    for p in ports:
        if port is not None and str(p["port"]) != port and p["name"] != port:
            continue
        if wanted and p["protocol"] != wanted:
            continue
        if p["protocol"] not in ("TCP", "UDP"):
            continue
        return key, p, cip
    have = ", ".join(f"{p['name'] or '-'} {p['port']}/{p['protocol']}" for p in ports) or "none"
    raise TraceError(
        f"service {key} has no {wanted or 'TCP/UDP'} port {port or ''}".rstrip()
        + f"; its ports: {have}. Give --to {service}:PORT (number or name) and --proto tcp|udp"
    )


def _backends(lab, key: str) -> dict[str, str]:
    """Backend IP -> pod key, from the lab's EndpointSlices."""
    ns, name = key.split("/", 1)
    by_ip = {p["ip"]: k for k, p in lab.state()["pods"].items()}
    try:
        doc = json.loads((lab.manifests_dir / "endpointslices.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for s in doc.get("items", []):
        meta = s.get("metadata", {})
        if meta.get("namespace") != ns or meta.get("labels", {}).get("kubernetes.io/service-name") != name:
            continue
        for ep in s.get("endpoints") or []:
            for addr in ep.get("addresses") or []:
                if addr in by_ip:
                    out[addr] = by_ip[addr]
    return out


def client_argv(proto: str, ip: str, port: int, sport: int, timeout: float, domain: str = "cluster.local") -> list[str]:
    """The real client that makes the traced request: dig for DNS, nc otherwise."""
    if port == DNS_PORT:
        argv = ["dig", "+short", f"@{ip}", "-p", str(port), "-b", f"0.0.0.0#{sport}", "+tries=1", f"+time={max(1, int(timeout))}"]
        if proto == "TCP":
            argv.append("+tcp")
        return argv + [f"kube-dns.kube-system.svc.{domain}"]
    if proto == "UDP":
        return ["nc", "-u", "-w", str(max(1, int(timeout))), "-p", str(sport), ip, str(port)]
    return ["nc", "-N", "-w", str(max(1, int(timeout))), "-p", str(sport), ip, str(port)]


def trace(
    lab,
    source: str,
    service: str,
    *,
    port: str | None = None,
    proto: str | None = None,
    sport: int | None = None,
    timeout: float = 5.0,
    settle: float = 0.5,
) -> TraceResult:
    """Capture one request from ``source`` to ``service`` across the lab (see module docstring)."""
    from scapy.sendrecv import AsyncSniffer

    from kubelab.netlab.lab import LabError

    state = lab.state()
    if state.get("kernel", "host") != "host":
        raise TraceError(f"lab {lab.name} runs inside a {state['kernel']} kernel; traces capture on the host kernel only")
    try:
        source_netns = lab.netns(source)
    except LabError as exc:
        raise TraceError(str(exc)) from None
    key, sp, cip = _service_port(lab, service, port, proto)
    source_ip = lab.address(source)
    sport = sport or random.randint(40000, 59999)
    target = FlowTuple(sp["protocol"], source_ip, sport, cip, int(sp["port"]))
    backends = _backends(lab, key)
    points = capture_points(lab, source, backends.values())
    if not points:
        raise TraceError(f"no interfaces to capture on in {source_netns}")
    by_label = {p.label: p for p in points}
    frames: list = []

    def keep(pkt) -> None:
        frames.append(pkt)

    def mine(pkt) -> bool:
        # Everything TCP/UDP for now: a masquerade may change the source port,
        # which only conntrack can tell afterwards (see flow_pairs).
        from scapy.layers.inet import IP, TCP, UDP

        return IP in pkt and (TCP in pkt or UDP in pkt)

    sockets = _open_sockets(points)
    sniffer = AsyncSniffer(opened_socket=sockets, prn=keep, lfilter=mine, store=False)
    try:
        sniffer.start()
        # The sockets are bound already: frames queue in them even before the
        # sniffer thread first polls, so nothing of the request is missed.
        argv = client_argv(sp["protocol"], cip, int(sp["port"]), sport, timeout, state.get("clusterDomain", "cluster.local"))
        payload = None
        if argv[0] == "nc":
            payload = "GET / HTTP/1.0\r\n\r\n" if sp["protocol"] == "TCP" else "kubelab-trace\n"
        done = lab.exec(source, argv, timeout=timeout + 10, input=payload)
        time.sleep(settle)  # the last ACK/FIN may still be on its way
    finally:
        with contextlib.suppress(Exception):
            sniffer.stop(join=True)
        for sock in sockets:
            with contextlib.suppress(Exception):
                sock.close()
    conntrack = _conntrack(lab, state, target)
    pairs = flow_pairs(target, [e for entries in conntrack.values() for e in entries])
    observations = []
    for pkt in frames:
        point = by_label.get(getattr(pkt, "sniffed_on", ""))
        if point is None:
            continue
        ob = _observation(pkt, point)
        if ob is not None and _pair(ob.tuple) in pairs:
            observations.append(ob)
    observations.sort(key=lambda o: o.time)
    result = TraceResult(
        lab=lab.name,
        source=source,
        source_ip=source_ip,
        service=key,
        target=target,
        points=points,
        observations=observations,
        packets=analyze(observations, target),
        client_output=done.stdout,
        client_returncode=done.returncode,
        backends=backends,
        conntrack=conntrack,
    )
    return result


def _pair(t: FlowTuple) -> tuple:
    return (t.proto, frozenset({(t.src, t.sport), (t.dst, t.dport)}))


_CT_FIELD = re.compile(r"\b(src|dst|sport|dport)=(\S+)")


def flow_pairs(target: FlowTuple, conntrack_lines: Iterable[str]) -> set[tuple]:
    """The address pairs the flow uses at any hop: the client's own, and conntrack's original and reply tuples.

    A masquerade may pick another source port (kube-proxy's MASQUERADE uses
    --random-fully), so the flow after SNAT is known only from conntrack.
    """
    pairs = {_pair(target)}
    for line in conntrack_lines:
        fields = _CT_FIELD.findall(line)
        for i in range(0, len(fields) - 3, 4):
            chunk = dict(fields[i : i + 4])
            if set(chunk) == {"src", "dst", "sport", "dport"}:
                with contextlib.suppress(ValueError):
                    pairs.add(_pair(FlowTuple(target.proto, chunk["src"], int(chunk["sport"]), chunk["dst"], int(chunk["dport"]))))
    return pairs


def _conntrack(lab, state: dict, target: FlowTuple) -> dict[str, list[str]]:
    """Each node's conntrack entries for the flow (what the kernel says it translated)."""
    out: dict[str, list[str]] = {}
    for node in state["nodes"]:
        r = lab.exec(node, ["conntrack", "-L", "-p", target.proto.lower(), "--orig-port-src", str(target.sport)], timeout=10)
        entries = [line.strip() for line in r.stdout.splitlines() if line.strip() and "flow entries" not in line]
        if entries:
            out[node] = entries
    return out


def write_pcap(result: TraceResult, path: str | Path) -> int:
    """Every capture of the trace as one pcapng file; returns the number of packets written."""
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgWriter

    writer = PcapNgWriter(str(path))
    try:
        n = 0
        for ob in result.observations:
            pkt = Ether(ob.raw)
            pkt.time = ob.time
            pkt.sniffed_on = ob.point.label
            pkt.direction = 2 if ob.outgoing else 1
            note = f" veth of pod {ob.point.note}" if ob.point.note else ""
            pkt.comments = [f"netns {ob.point.netns} iface {ob.point.ifname}{note}".encode()]
            writer.write(pkt)
            n += 1
        if n == 0:
            # An empty capture is still a valid file with a section header.
            writer._write_header(None)
    finally:
        writer.close()
    return n


__all__ = [
    "CapturePoint",
    "FlowTuple",
    "Observation",
    "PacketHops",
    "TraceError",
    "TraceResult",
    "Translation",
    "analyze",
    "capture_points",
    "client_argv",
    "format_trace",
    "trace",
    "write_pcap",
]
