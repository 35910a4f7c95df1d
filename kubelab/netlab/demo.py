"""``kubelab demo``: the example lab end to end -- a Service spreading requests, cluster DNS, a traced flow.

Steps, each announced on a progress line:

1. bring up ``examples/labs/basic.yaml`` (two nodes, a ``web`` Service with
   three pods across them, the cluster DNS pod, ``kubelab proxy`` in
   iptables mode in each node) and wait until every proxy has synced;
2. send requests from the pod ``client`` to ``http://web/`` with curl and
   count which pod answered each (the servers name themselves);
3. resolve the Service's name in that pod with glibc (``getent hosts``,
   through the kubelet-style resolv.conf) and with ``dig`` straight at the
   kube-dns cluster IP;
4. trace one request (:mod:`kubelab.netlab.trace`): the DNAT of the cluster
   IP to a backend and the reply's way back;
5. tear the lab down -- also after a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time
from pathlib import Path

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "examples" / "labs" / "basic.yaml"
STEPS = 5

DESCRIPTION = """\
Bring up the example lab (two nodes, a `web` Service with three pods across
them, cluster DNS, `kubelab proxy` in iptables mode), show requests to the
Service spread over its pods, a DNS lookup from a pod, and a trace of one
flow through the nodes' NAT, then tear everything down (also on failure or
Ctrl-C).  Needs root: it builds network namespaces.  Takes about 10 s."""

EPILOG = """\
examples:
  kubelab demo
  kubelab demo --requests 60 --proxy-mode userspace
  kubelab demo --keep          # leave the lab up to explore: kubelab lab status demo
  kubelab demo --pcap demo.pcapng

After --keep, try: kubelab lab exec demo client -- curl -s http://web/
                   kubelab trace demo --from client --to web:80
                   kubelab lab down demo"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help=f"lab file (default: {DEFAULT_FILE})")
    parser.add_argument("--name", default="demo", help="lab name (default: demo)")
    parser.add_argument("--proxy-mode", choices=("iptables", "ipvs", "userspace"), default=None,
                        help="override the lab file's proxy mode (default: the file's, iptables)")
    parser.add_argument("--requests", type=int, default=30, help="requests sent to the Service (default 30)")
    parser.add_argument("--pcap", metavar="FILE", help="also write the traced flow to FILE (pcapng)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end (`kubelab lab down NAME` later)")


class _Progress:
    """Numbered progress lines with the time since the start."""

    def __init__(self, out, steps: int):
        self.out = out
        self.steps = steps
        self.n = 0
        self.start = time.monotonic()

    def step(self, text: str) -> None:
        self.n += 1
        self.line(f"[{self.n}/{self.steps}] {text}")

    def line(self, text: str = "") -> None:
        self.out.write(f"{text}".rstrip() + "\n")
        self.out.flush()

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.start:.1f}s"


def _sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def spread_table(counts: collections.Counter, nodes: dict[str, str], total: int) -> list[str]:
    """``POD  NODE  REQUESTS  SHARE`` rows with a bar, pods in name order."""
    rows = [("POD", "NODE", "REQUESTS", "SHARE")]
    for pod in sorted(counts):
        share = counts[pod] / total if total else 0.0
        rows.append((pod, nodes.get(pod, "?"), str(counts[pod]), f"{share:4.0%} " + "#" * round(share * 30)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]


def run(args: argparse.Namespace) -> int:
    from kubelab.netlab.lab import Lab, LabError, LabSpecError
    from kubelab.netlab.spec import LabSpec
    from kubelab.netlab.trace import TraceError, format_trace, trace, write_pcap

    out = sys.stdout
    p = _Progress(out, STEPS)
    if args.requests < 1:
        print("error: --requests must be at least 1", file=sys.stderr)
        return 2
    if not args.file.exists():
        print(f"error: lab file {args.file} not found; pass --file examples/labs/basic.yaml from a kubelab checkout",
              file=sys.stderr)
        return 2
    overrides = {"proxyMode": args.proxy_mode} if args.proxy_mode else {}
    try:
        spec = LabSpec.from_file(args.file, name=args.name, **overrides)
    except LabSpecError as exc:
        print(f"error: {args.file} is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    s = spec.settings
    previous = signal.signal(signal.SIGTERM, _sigterm)
    lab = None
    return_code = 1  # anything unexpected: still torn down, then raised
    try:
        p.step(f"bringing up lab {spec.name} from {args.file.name}: {len(s.nodes)} nodes "
               f"({', '.join(n.name for n in s.nodes)}), proxy mode {s.proxy_mode}, DNS {'on' if s.dns.enabled else 'off'} ...")
        lab = Lab.up(spec)
        lab.wait_synced(timeout=120)
        state = lab.state()
        p.line(f"      up in {p.elapsed()}; every node's kubelab proxy has synced")
        for name, node in state["nodes"].items():
            pods = sorted(k.split("/")[1] for k, v in state["pods"].items() if v["node"] == name)
            p.line(f"      {name} {node['ip']} pods {node['podCIDR']}: {', '.join(pods)}")
        web_ip = lab.service_ip("default/web")
        p.line(f"      Service default/web: cluster IP {web_ip}, endpoints "
               + ", ".join(f"{k.split('/')[1]} {v['ip']}" for k, v in sorted(state["pods"].items()) if v["labels"].get("app") == "web"))

        p.step(f"{args.requests} requests from pod client to http://web/ (curl; name -> {web_ip} -> a pod)")
        counts: collections.Counter = collections.Counter()
        failures = []
        for _ in range(args.requests):
            r = lab.exec("client", ["curl", "-sS", "--max-time", "5", "http://web/"], timeout=20)
            if r.returncode == 0 and r.stdout.startswith("pod="):
                counts[r.stdout.split()[0].removeprefix("pod=")] += 1
            else:
                failures.append((r.stderr or r.stdout).strip())
        nodes = {k.split("/")[1]: v["node"] for k, v in state["pods"].items()}
        for row in spread_table(counts, nodes, args.requests):
            p.line(row)
        if failures:
            p.line(f"      {len(failures)} requests failed, first: {failures[0]}")

        p.step("DNS from pod client: glibc through its resolv.conf, then dig at the kube-dns cluster IP")
        dns_ip = state["dns"]["clusterIP"]
        resolv = lab.exec("client", ["cat", "/etc/resolv.conf"], timeout=10).stdout.strip().replace("\n", " | ")
        p.line(f"      resolv.conf: {resolv}")
        r = lab.exec("client", ["getent", "hosts", "web"], timeout=20)
        p.line(f"      $ getent hosts web        -> {r.stdout.strip() or 'no answer (exit %d)' % r.returncode}")
        fqdn = f"web.default.svc.{s.cluster_domain}"
        r = lab.exec("client", ["dig", "+short", "+time=2", "+tries=2", f"@{dns_ip}", fqdn], timeout=20)
        p.line(f"      $ dig @{dns_ip} {fqdn} -> {r.stdout.strip() or 'no answer (exit %d)' % r.returncode}")

        p.step("trace of one request from pod client to web:80 (scapy in every namespace on the way)")
        try:
            result = trace(lab, "client", "web", port="80", proto="tcp")
        except TraceError as exc:
            p.line(f"      trace failed: {exc}")
        else:
            for line in format_trace(result, limit=3).rstrip().splitlines():
                p.line(f"      {line}")
            if args.pcap:
                n = write_pcap(result, args.pcap)
                p.line(f"      pcap: {args.pcap} ({n} frames)")
        return_code = 0
    except KeyboardInterrupt:
        p.line("\ninterrupted: tearing the lab down")
        return_code = 130
    except (LabError, LabSpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        try:
            if not (args.keep and return_code == 0):
                _teardown(p, spec.name, lab)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if args.keep and return_code == 0:
        p.line(f"lab {spec.name} is still up: kubelab lab status {spec.name}; kubelab lab down {spec.name}")
    return return_code


def _teardown(p: _Progress, name: str, lab) -> None:
    from kubelab.netlab.lab import Lab
    from kubelab.netlab.testing import leftovers

    p.n = STEPS - 1  # the last step, however far the others got
    p.step(f"tearing lab {name} down")
    if lab is not None:
        lab.down()
    else:
        Lab.down_by_name(name)  # a half-built lab
    left = leftovers(name)
    p.line(f"      lab {name} is down after {p.elapsed()}" + (f"; left behind: {left}" if left else "; nothing left behind"))
