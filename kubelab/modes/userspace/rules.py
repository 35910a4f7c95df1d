"""The userspace mode's iptables rules: pure rendering, and a small applier.

kube-proxy's classic userspace layout (pkg/proxy/userspace/proxier.go,
removed in v1.26):

* nat ``KUBE-PORTALS-CONTAINER`` (jumped to first from PREROUTING): traffic
  from pods / other hosts to a ClusterIP, externalIP or LoadBalancer IP is
  ``REDIRECT``-ed to the service port's local listener when the proxy
  listens on all addresses (else ``DNAT`` to the listen address);
* nat ``KUBE-PORTALS-HOST`` (first in OUTPUT): the same from the node
  itself, ``DNAT`` to the node IP (REDIRECT of local traffic goes to
  127.0.0.1, whose replies conntrack cannot match, so kube-proxy DNATs);
* nat ``KUBE-NODEPORT-CONTAINER`` / ``KUBE-NODEPORT-HOST`` (last in
  PREROUTING / OUTPUT, only for ``--dst-type LOCAL``): NodePorts;
* filter ``KUBE-NODEPORT-NON-LOCAL`` (INPUT): accept new connections to the
  listeners even under a default-deny INPUT policy.

Differences, on purpose: traffic to an externalIP is redirected from every
source (kube-proxy's userspace mode skipped bridged pods with
``-m physdev ! --physdev-is-in``; its iptables and IPVS modes do not), and
``--nodeport-addresses`` limits NodePorts to those node IPs.

All chains are written in one ``iptables-restore --noflush`` transaction;
the jumps from the built-in chains are checked with ``-C`` and added in the
same transaction when missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kubelab.model import ServicePort, ServicePortName

CONTAINER_PORTALS = "KUBE-PORTALS-CONTAINER"
HOST_PORTALS = "KUBE-PORTALS-HOST"
CONTAINER_NODEPORTS = "KUBE-NODEPORT-CONTAINER"
HOST_NODEPORTS = "KUBE-NODEPORT-HOST"
NON_LOCAL_NODEPORTS = "KUBE-NODEPORT-NON-LOCAL"

NAT_CHAINS = (CONTAINER_PORTALS, HOST_PORTALS, CONTAINER_NODEPORTS, HOST_NODEPORTS)
FILTER_CHAINS = (NON_LOCAL_NODEPORTS,)

_PORTALS_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
_NODEPORTS_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
_NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"


@dataclass(frozen=True)
class Jump:
    """A jump from a built-in chain into ours; ``first`` means insert at the top."""

    table: str
    chain: str
    first: bool
    args: tuple[str, ...]

    def spec(self) -> list[str]:
        return list(self.args)


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", text)


# Order matters (see kube-proxy's iptablesInit): portals before NodePorts.
JUMPS: tuple[Jump, ...] = (
    Jump("nat", "PREROUTING", True, (*_comment(_PORTALS_COMMENT), "-j", CONTAINER_PORTALS)),
    Jump("nat", "OUTPUT", True, (*_comment(_PORTALS_COMMENT), "-j", HOST_PORTALS)),
    Jump("nat", "PREROUTING", False, ("-m", "addrtype", "--dst-type", "LOCAL", *_comment(_NODEPORTS_COMMENT), "-j", CONTAINER_NODEPORTS)),
    Jump("nat", "OUTPUT", False, ("-m", "addrtype", "--dst-type", "LOCAL", *_comment(_NODEPORTS_COMMENT), "-j", HOST_NODEPORTS)),
    Jump("filter", "INPUT", True, (*_comment(_NON_LOCAL_COMMENT), "-j", NON_LOCAL_NODEPORTS)),
)


@dataclass(frozen=True)
class Listener:
    """Where one service port's traffic is relayed from: protocol and local port."""

    name: ServicePortName
    protocol: str
    proxy_port: int


@dataclass(frozen=True)
class Portal:
    """One address the rules send to a listener: a (kind, ip, port).

    ``kind`` is ``cluster``, ``external`` (externalIPs), ``loadbalancer``
    (ingress IPs) or ``nodeport`` (``ip`` empty: every local address, or the
    ``--nodeport-addresses`` IPs).
    """

    kind: str
    ip: str
    port: int


def portals_of(svc: ServicePort) -> list[Portal]:
    """Every portal of a service port, in kube-proxy's order."""
    out: list[Portal] = []
    if svc.cluster_ip and svc.cluster_ip != "None":
        out.append(Portal("cluster", svc.cluster_ip, svc.port))
    out += [Portal("external", ip, svc.port) for ip in svc.external_ips]
    out += [Portal("loadbalancer", ip, svc.port) for ip in svc.load_balancer_vips]
    if svc.node_port:
        out.append(Portal("nodeport", "", svc.node_port))
    return out


def _is_any(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _common(name: ServicePortName, protocol: str, port: int, ip: str) -> str:
    proto = protocol.lower()
    s = f"-m comment --comment {_quote(str(name))} -p {proto} -m {proto} --dport {port}"
    if ip:
        s += f" -d {ip}/32"
    return s


def render_rules(
    listeners: Sequence[tuple[Listener, Sequence[Portal]]],
    listen_ip: str,
    host_ip: str,
    nodeport_ips: Sequence[str] = (),
) -> str:
    """The ``iptables-restore`` input for every listener's portals (chain contents only).

    ``listen_ip`` is where listeners are bound (0.0.0.0 -> REDIRECT from
    outside the node); ``host_ip`` is the node address that local traffic is
    DNAT-ed to; ``nodeport_ips`` restricts NodePorts (empty = every local
    address, via the jump's ``--dst-type LOCAL``).
    """
    if not _is_any(listen_ip):
        host_ip = listen_ip
    nat = {c: [] for c in NAT_CHAINS}
    flt: list[str] = []
    for lst, portals in sorted(listeners, key=lambda item: (item[0].name, item[0].protocol)):
        pp = lst.proxy_port
        if _is_any(listen_ip):
            to_container = f"-j REDIRECT --to-ports {pp}"
        else:
            to_container = f"-j DNAT --to-destination {listen_ip}:{pp}"
        to_host = f"-j DNAT --to-destination {host_ip}:{pp}"
        has_nodeport = False
        for portal in portals:
            if portal.kind == "nodeport":
                has_nodeport = True
                for ip in nodeport_ips or ("",):
                    common = _common(lst.name, lst.protocol, portal.port, ip)
                    nat[CONTAINER_NODEPORTS].append(f"-A {CONTAINER_NODEPORTS} {common} {to_container}")
                    nat[HOST_NODEPORTS].append(f"-A {HOST_NODEPORTS} {common} {to_host}")
            else:
                common = _common(lst.name, lst.protocol, portal.port, portal.ip)
                nat[CONTAINER_PORTALS].append(f"-A {CONTAINER_PORTALS} {common} {to_container}")
                nat[HOST_PORTALS].append(f"-A {HOST_PORTALS} {common} {to_host}")
        if has_nodeport:
            common = _common(lst.name, lst.protocol, pp, "")
            flt.append(f"-A {NON_LOCAL_NODEPORTS} {common} -m state --state NEW -j ACCEPT")
    lines = ["*nat"] + [f":{c} - [0:0]" for c in NAT_CHAINS]
    for c in NAT_CHAINS:
        lines += nat[c]
    lines += ["COMMIT", "*filter"] + [f":{c} - [0:0]" for c in FILTER_CHAINS] + flt + ["COMMIT"]
    return "\n".join(lines) + "\n"


def add_jumps(text: str, missing: Iterable[Jump]) -> str:
    """Put ``-I`` / ``-A`` lines for missing jumps into restore text, per table."""
    missing = list(missing)
    if not missing:
        return text
    out: list[str] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        if line == "COMMIT":
            for j in missing:
                if j.table == table:
                    op = "-I" if j.first else "-A"
                    pos = " 1" if j.first else ""
                    out.append(f"{op} {j.chain}{pos} " + " ".join(_q(a) for a in j.args))
        out.append(line)
    return "\n".join(out) + "\n"


def _q(arg: str) -> str:
    return _quote(arg) if (" " in arg or ";" in arg) else arg


def cleanup_text(present: Iterable[Jump]) -> str:
    """Restore text removing the jumps that exist and all our chains."""
    present = list(present)
    lines: list[str] = []
    for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
        lines.append(f"*{table}")
        # Declaring a chain creates (or flushes) it, so deleting it next
        # works whether or not it existed.
        lines += [f":{c} - [0:0]" for c in chains]
        for j in present:
            if j.table == table:
                lines.append(f"-D {j.chain} " + " ".join(_q(a) for a in j.args))
        lines += [f"-X {c}" for c in chains]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


Runner = Callable[..., tuple[int, str, str]]


class PortalTables:
    """The only place that knows the iptables command lines of this mode.

    Commands go through ``run`` (``kubelab.proxy.kernel.exec.Runner`` by
    default).  ``iptables`` names the command (``iptables``,
    ``iptables-legacy``, ``iptables-nft``); empty means pick the backend the
    way kube-proxy's iptables-wrapper does (the iptables room's
    ``detect_backend``), on first use.
    """

    def __init__(self, iptables: str = "", run: Runner | None = None):
        if run is None:
            from kubelab.proxy.kernel.exec import Runner as ExecRunner

            run = ExecRunner()
        self.run = run
        self._iptables = iptables

    @property
    def iptables(self) -> str:
        if not self._iptables:
            from kubelab.modes.iptables.kernel import detect_backend

            self._iptables = f"iptables-{detect_backend(self.run)}"
        return self._iptables

    @property
    def restore(self) -> str:
        return self.iptables + "-restore"

    def missing_jumps(self) -> list[Jump]:
        missing = []
        for j in JUMPS:
            rc, _out, _err = self.run([self.iptables, "-w", "-t", j.table, "-C", j.chain, *j.spec()])
            if rc != 0:
                missing.append(j)
        return missing

    def present_jumps(self) -> list[Jump]:
        missing = set(self.missing_jumps())
        return [j for j in JUMPS if j not in missing]

    def apply(self, text: str, check_jumps: bool = True) -> str:
        """Write the chains (and any missing jumps) in one transaction; returns what was applied."""
        if check_jumps:
            text = add_jumps(text, self.missing_jumps())
        rc, _out, err = self.run([self.restore, "-w", "--noflush"], input=text)
        if rc != 0:
            raise RuntimeError(f"{self.restore} --noflush failed (exit {rc}): {err.strip()}\n--- input ---\n{text}")
        return text

    def cleanup(self) -> None:
        text = cleanup_text(self.present_jumps())
        rc, _out, err = self.run([self.restore, "-w", "--noflush"], input=text)
        if rc != 0:
            raise RuntimeError(f"{self.restore} --noflush (cleanup) failed (exit {rc}): {err.strip()}")
