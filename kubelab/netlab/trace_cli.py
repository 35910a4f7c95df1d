"""``kubelab trace``: one request through a lab, captured at every hop, translations named."""

from __future__ import annotations

import argparse
import sys
import time

DESCRIPTION = """\
Capture one request from a pod (or node, or the external client) to a
Service of a running lab, and show it hop by hop: the client's packet to the
cluster IP, where its destination was rewritten to a backend (DNAT), its
source rewritten when masqueraded (SNAT), and the reply rewritten back.
Captures with scapy inside every namespace on the way (the source, every
node, every backend pod) and writes them all to one pcapng file, one
interface per capture point (named WHERE/IFACE, namespace in the comments):
./trace-LAB-YYYYmmdd-HHMMSS.pcapng unless --pcap FILE or --no-pcap.
The request is made with a real client (nc; dig for port 53) from a source
port chosen here.  Needs root and a lab that is up (`kubelab lab up`)."""

EPILOG = """\
examples:
  kubelab trace basic --from client --to web:80
  kubelab trace basic --from client --to web:udp --proto udp
  kubelab trace basic --from web-1 --to kube-system/kube-dns:53 --proto udp --pcap dns.pcapng
  kubelab trace basic --from client --to web --verbose      # every sighting, not just the changes

Read the pcap with: tcpdump -r FILE -n  (or Wireshark: per-interface names and comments)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lab", help="name of a lab that is up (see `kubelab lab list`)")
    parser.add_argument("--from", dest="source", required=True, metavar="POD",
                        help="where the request starts: a pod (NAME or NAMESPACE/NAME), a node, or `client` (external)")
    parser.add_argument("--to", dest="target", required=True, metavar="SERVICE[:PORT]",
                        help="a Service (NAME or NAMESPACE/NAME) and optionally its port (number or name); "
                             "default: its first port of --proto")
    parser.add_argument("--proto", choices=("tcp", "udp"), default=None,
                        help="protocol of the Service port (default: tcp if it has one, else udp)")
    pcap = parser.add_mutually_exclusive_group()
    pcap.add_argument("--pcap", metavar="FILE",
                      help="write every capture to FILE (pcapng; default ./trace-LAB-YYYYmmdd-HHMMSS.pcapng)")
    pcap.add_argument("--no-pcap", action="store_true", help="write no pcap file")
    parser.add_argument("--sport", type=int, default=None, help="client source port (default: random 40000-59999)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds the client waits for an answer (default 5)")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every sighting of every packet")


def split_target(text: str) -> tuple[str, str | None]:
    """"web:80" -> ("web", "80"); "kube-system/kube-dns:dns" -> (..., "dns"); "web" -> ("web", None)."""
    name, sep, port = text.rpartition(":")
    if not sep:
        return text, None
    if not name or not port:
        raise ValueError(f"--to {text!r}: write SERVICE or SERVICE:PORT, e.g. web:80 or kube-system/kube-dns:53")
    return name, port


def default_pcap_path(lab: str, now: float | None = None) -> str:
    """``trace-LAB-YYYYmmdd-HHMMSS.pcapng`` in the current directory (UTC time)."""
    return time.strftime(f"trace-{lab}-%Y%m%d-%H%M%S.pcapng", time.gmtime(now))


def run(args: argparse.Namespace) -> int:
    from kubelab.netlab.lab import Lab, LabError
    from kubelab.netlab.trace import TraceError, format_trace, trace, write_pcap

    try:
        service, port = split_target(args.target)
        if args.sport is not None and not 1024 <= args.sport <= 65535:
            raise ValueError(f"--sport {args.sport}: pick a port from 1024 to 65535")
        lab = Lab.attach(args.lab)
        result = trace(lab, args.source, service, port=port, proto=args.proto, sport=args.sport, timeout=args.timeout)
    except (ValueError, TraceError, LabError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(format_trace(result, verbose=args.verbose))
    path = None if args.no_pcap else args.pcap or default_pcap_path(args.lab)
    if path and result.packets:
        n = write_pcap(result, path)
        print(f"pcap: {path} ({n} frames from {len(result.points)} capture points; read with tcpdump -r {path} -n)")
    if not result.packets:
        print("error: nothing of the flow was captured; is the lab's proxy running? (`kubelab lab status`)", file=sys.stderr)
        return 1
    return 0
