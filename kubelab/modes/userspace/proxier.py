"""``--proxy-mode userspace``: kube-proxy's classic userspace proxier, in asyncio.

For every service port the proxier opens a listener on a random local port
(:mod:`~kubelab.modes.userspace.driver`), points the load balancer
(:mod:`~kubelab.modes.userspace.loadbalancer`) at the port's endpoints, and
writes iptables rules (:mod:`~kubelab.modes.userspace.rules`) that send the
ClusterIP, externalIPs, LoadBalancer IPs and NodePort to that listener, from
pods and from the node itself.

A sync keeps listeners of unchanged service ports (their connections go on);
a service port whose protocol changed gets a new listener; a removed one
has its listener closed at once and its established connections closed
after the endpoint grace period.  The rules are rewritten in one
``iptables-restore --noflush`` when they differ from the last ones written
(and on every full sync).  A listener that cannot be opened is reported and
the sync fails, so the controller retries it; everything else keeps working.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import IO

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.userspace.driver import DriverOptions, Relay, TcpServicePort, UdpServicePort
from kubelab.modes.userspace.loadbalancer import LoadBalancerRR
from kubelab.modes.userspace.rules import FILTER_CHAINS, NAT_CHAINS, Listener, Portal, PortalTables, portals_of, render_rules
from kubelab.proxy.provider import Dataplane, ModeDeps, SyncState

# Settings with no kube-proxy flag, read from ModeDeps.extra (name -> default).
EXTRA_DEFAULTS: dict[str, object] = {
    "userspace_udp_max_sessions": 1024,  # per UDP service port; least recently used make room
    "userspace_endpoint_grace_period": 30.0,  # s before connections to a removed endpoint close
    "userspace_pipe_size": 256 * 1024,  # bytes per splice pipe
    "userspace_quarantine": 5.0,  # s an endpoint whose dial failed is tried last
    "userspace_host_ip": "",  # node IP local traffic is DNAT-ed to; default: first node IP
    "iptables": "",  # iptables command, e.g. iptables-legacy (UML); "" = detect the backend as kube-proxy does
}


class UserspaceConfigError(ValueError):
    """A userspace setting is unusable; the message says which and how to fix it."""


@dataclass(frozen=True)
class UserspaceOptions:
    """Everything the userspace proxier reads from ProxyConfig and ModeDeps.extra."""

    listen_ip: str = "0.0.0.0"
    host_ip: str = ""
    nodeport_ips: tuple[str, ...] = ()
    iptables: str = ""
    quarantine: float = 5.0
    driver: DriverOptions = field(default_factory=DriverOptions)

    @classmethod
    def from_deps(cls, deps: ModeDeps) -> UserspaceOptions:
        cfg = deps.config
        extra = {**EXTRA_DEFAULTS, **{k: v for k, v in deps.extra.items() if k in EXTRA_DEFAULTS}}
        listen_ip = cfg.bind_address or "0.0.0.0"
        try:
            addr = ipaddress.ip_address(listen_ip)
        except ValueError:
            raise UserspaceConfigError(f"--bind-address {listen_ip!r} is not an IP address; use e.g. 0.0.0.0") from None
        if addr.is_loopback:
            # As kube-proxy's ErrProxyOnLocalhost: DNAT to loopback drops packets.
            raise UserspaceConfigError(
                f"--bind-address {listen_ip}: the userspace proxy cannot listen on loopback "
                "(iptables cannot DNAT pod traffic to it); use 0.0.0.0 or a node address"
            )
        if addr.version == 6:
            raise UserspaceConfigError(f"--bind-address {listen_ip}: the userspace mode relays IPv4 only; use 0.0.0.0")
        if cfg.udp_idle_timeout <= 0:
            raise UserspaceConfigError(f"--udp-timeout must be positive, got {cfg.udp_idle_timeout}")
        if cfg.userspace_max_connections < 1:
            raise UserspaceConfigError(f"--userspace-max-connections must be at least 1, got {cfg.userspace_max_connections}")
        if cfg.userspace_connect_retries < 1:
            raise UserspaceConfigError(f"userspace connect retries must be at least 1, got {cfg.userspace_connect_retries}")
        driver = DriverOptions(
            max_connections=cfg.userspace_max_connections,
            connect_retries=cfg.userspace_connect_retries,
            udp_idle_timeout=float(cfg.udp_idle_timeout),
            udp_max_sessions=int(extra["userspace_udp_max_sessions"]),
            endpoint_grace_period=float(extra["userspace_endpoint_grace_period"]),
            pipe_size=int(extra["userspace_pipe_size"]),
        )
        node_ips = tuple(ip for ip in deps.node.ips if ":" not in ip)
        # Host traffic is DNAT-ed to this address: never loopback (DNAT to
        # 127.0.0.0/8 is dropped without route_localnet) nor link-local.
        usable = [ip for ip in node_ips if not ipaddress.ip_address(ip).is_loopback and not ipaddress.ip_address(ip).is_link_local]
        return cls(
            listen_ip=listen_ip,
            host_ip=str(extra["userspace_host_ip"]) or (usable[0] if usable else ""),
            nodeport_ips=node_ips if cfg.nodeport_addresses else (),
            iptables=str(extra["iptables"]),
            quarantine=float(extra["userspace_quarantine"]),
            driver=driver,
        )


@dataclass(frozen=True)
class DesiredPort:
    """What one service port should look like after a sync."""

    name: ServicePortName
    service: ServicePort
    endpoints: tuple[str, ...]
    portals: tuple[Portal, ...]


def usable_endpoints(endpoints: Iterable[Endpoint], svc: ServicePort, node: NodeInfo) -> list[Endpoint]:
    """The endpoints new connections may go to, as kube-proxy's CategorizeEndpoints says.

    One listener serves internal and external traffic alike, so the union
    of what either traffic class may use (``all_reachable_endpoints``).
    """
    eps = list(endpoints)
    try:
        from kubelab.proxy.topology import categorize_endpoints
    except ImportError:  # the foundation room's module has not landed yet
        categorize_endpoints = None
    if categorize_endpoints is not None:
        return list(categorize_endpoints(eps, svc, node).all_reachable_endpoints or ())
    ready = [e for e in eps if e.ready]
    if ready:
        return ready
    # kube-proxy's fallback: serving, terminating endpoints when none is ready.
    return [e for e in eps if e.serving and e.terminating]


def desired_ports(state: SyncState) -> tuple[dict[ServicePortName, DesiredPort], list[str]]:
    """The service ports this mode proxies, and why others are skipped."""
    out: dict[ServicePortName, DesiredPort] = {}
    skipped: list[str] = []
    for name, svc in state.service_map.items():
        if svc.protocol not in ("TCP", "UDP"):
            skipped.append(f"{name}: protocol {svc.protocol} is not relayed by the userspace mode (TCP and UDP are)")
            continue
        if svc.cluster_ip in ("", "None"):
            continue  # headless / ExternalName: nothing to proxy
        if ":" in svc.cluster_ip:
            skipped.append(f"{name}: IPv6 cluster IP {svc.cluster_ip}: the userspace mode relays IPv4 only")
            continue
        svc4 = replace(
            svc,
            external_ips=tuple(ip for ip in svc.external_ips if ":" not in ip),
            load_balancer_vips=tuple(ip for ip in svc.load_balancer_vips if ":" not in ip),
        )
        eps = usable_endpoints(state.endpoints_map.get(name, ()), svc, state.node)
        out[name] = DesiredPort(name, svc4, tuple(str(e) for e in eps if ":" not in e.ip), tuple(portals_of(svc4)))
    return out, skipped


class UserspaceProxier(Dataplane):
    """kube-proxy's userspace mode: per-service-port listeners, relays and portal rules."""

    name = "userspace"

    def __init__(self, deps: ModeDeps):
        self.deps = deps
        self.log = deps.logger
        self.options = UserspaceOptions.from_deps(deps)
        self.lb = LoadBalancerRR(quarantine_seconds=self.options.quarantine)
        self.tables = PortalTables(self.options.iptables, run=deps.run)
        self.relay: Relay | None = None
        self.ports: dict[ServicePortName, TcpServicePort | UdpServicePort] = {}
        self.claims: dict[tuple[str, str, int], tuple[ServicePortName, socket.socket]] = {}
        self.applied_rules = ""
        self._skip_logged: set[str] = set()
        self._host_ip = self.options.host_ip

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.relay is not None:
            return
        self._raise_fd_limit()
        self.relay = Relay(asyncio.get_running_loop(), self.lb, self.options.driver, self.log)

    async def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        self.ports.clear()
        for _owner, s in self.claims.values():
            s.close()
        self.claims.clear()

    def cleanup(self) -> None:
        """Remove our chains and jumps; from both iptables backends unless one was named."""
        self.applied_rules = ""
        if self.options.iptables:
            self.tables.cleanup()
            return
        errors = []
        for backend in ("nft", "legacy"):
            # Touch only a backend holding our chains: restoring into an
            # unused one would create its tables (and iptables-nft would
            # then warn about legacy tables forever).
            rc, out, _err = self.tables.run([f"iptables-{backend}-save"])
            if rc != 0 or not any(c in out for c in (*NAT_CHAINS, *FILTER_CHAINS)):
                continue
            try:
                PortalTables(f"iptables-{backend}", run=self.tables.run).cleanup()
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise RuntimeError("userspace cleanup failed: " + "; ".join(errors))

    def _raise_fd_limit(self) -> None:
        # Each relayed connection holds up to 6 fds (2 sockets, 2 pipes of 2
        # fds each); keep 1024 spare.  kube-proxy raised RLIMIT_NOFILE to
        # 64000 for the same reason.
        want = self.options.driver.max_connections * 6 + 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= want:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
            return
        except (ValueError, OSError):
            pass
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
        fits = max(1, (soft - 1024) // 6)
        self.log.warning(
            "userspace: the open-files limit is %d (and cannot be raised here), too low for %d connections; "
            "limiting relayed connections to %d. Raise the hard limit (ulimit -Hn, LimitNOFILE=) "
            "or lower --userspace-max-connections.",
            soft, self.options.driver.max_connections, fits,
        )
        self.options = replace(self.options, driver=replace(self.options.driver, max_connections=fits))

    # -- sync ----------------------------------------------------------------

    def host_ip(self) -> str:
        """The node address host traffic is DNAT-ed to (kube-proxy's hostIP)."""
        if not self._host_ip:
            self._host_ip = _detect_host_ip(self.tables.run)
        return self._host_ip

    def rules_text(
        self,
        desired: Mapping[ServicePortName, DesiredPort],
        proxy_ports: Mapping[ServicePortName, int],
        include_missing: bool = False,
    ) -> str:
        """Rules for the listeners in ``proxy_ports`` (and port 0 for the rest if asked)."""
        listeners = [
            (Listener(n, d.service.protocol, proxy_ports.get(n, 0)), d.portals)
            for n, d in desired.items()
            if n in proxy_ports or include_missing
        ]
        return render_rules(listeners, self.options.listen_ip, self.host_ip() or "0.0.0.0", self.options.nodeport_ips)

    def render(self, state: SyncState) -> str:
        desired, skipped = desired_ports(state)
        ports = {n: p.port for n, p in self.ports.items()}
        lines = [f"# kubelab userspace proxier: {len(desired)} service port(s), listeners on {self.options.listen_ip}"]
        for n, d in sorted(desired.items()):
            where = f"{self.options.listen_ip}:{ports[n]}" if n in ports else f"{self.options.listen_ip}:<random port>"
            eps = ", ".join(d.endpoints) or "no endpoints"
            aff = (
                f", ClientIP affinity {d.service.sticky_max_age_seconds or 10800}s"
                if d.service.session_affinity_client_ip
                else ""
            )
            lines.append(f"# listener {n} {d.service.protocol} {where} -> {eps}{aff}")
        for s in skipped:
            lines.append(f"# skipped {s}")
        if not ports:
            lines.append("# (--to-ports 0 below stands for each listener's random port)")
        return "\n".join(lines) + "\n" + self.rules_text(desired, ports, include_missing=True)

    async def sync_proxy_rules(self, state: SyncState) -> None:
        if self.deps.dry_run:
            out: IO[str] | None = self.deps.out
            if out is not None:
                out.write(self.render(state))
            return
        if self.relay is None:
            await self.start()
        relay = self.relay
        assert relay is not None
        desired, skipped = desired_ports(state)
        for s in skipped:
            if s not in self._skip_logged:
                self._skip_logged.add(s)
                self.log.warning("userspace: skipping %s", s)
        errors: list[str] = []

        # Removed service ports, and ports whose protocol changed.
        for name in list(self.ports):
            d = desired.get(name)
            if d is None or d.service.protocol != _protocol_of(self.ports[name]):
                self.log.info("userspace: stopping the listener of %s", name)
                self.ports.pop(name).close()
                self.lb.delete_service(name)
        # New and updated service ports.
        for name, d in desired.items():
            port = self.ports.get(name)
            if port is None:
                try:
                    if d.service.protocol == "TCP":
                        port = relay.open_tcp(name, self.options.listen_ip)
                    else:
                        port = relay.open_udp(name, self.options.listen_ip)
                except OSError as e:
                    errors.append(f"cannot open a {d.service.protocol} listener for {name} on {self.options.listen_ip}: {e}")
                    continue
                self.ports[name] = port
                self.log.info("userspace: proxying %s on %s port %d", name, d.service.protocol, port.port)
            self.lb.new_service(name, d.service.session_affinity, d.service.sticky_max_age_seconds)
            if self.lb.set_endpoints(name, d.endpoints) or state.full_sync:
                port.endpoints_changed(set(d.endpoints))
        self._sync_claims(desired)

        text = self.rules_text(desired, {n: p.port for n, p in self.ports.items()})
        if state.full_sync or text != self.applied_rules:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.tables.apply, text, state.full_sync or not self.applied_rules)
            except RuntimeError as e:
                self.applied_rules = ""
                errors.append(str(e))
            else:
                self.applied_rules = text
        self.lb.cleanup_stale_sticky_sessions()
        if errors:
            raise RuntimeError("userspace sync failed: " + "; ".join(errors))

    def _sync_claims(self, desired: Mapping[ServicePortName, DesiredPort]) -> None:
        """Hold NodePorts (and ports of local external IPs) open, so nothing else takes them."""
        want: dict[tuple[str, str, int], ServicePortName] = {}
        for name, d in desired.items():
            for p in d.portals:
                if p.kind == "nodeport":
                    want.setdefault((d.service.protocol, "", p.port), name)
                elif p.kind == "external":
                    want.setdefault((d.service.protocol, p.ip, p.port), name)
        for key in list(self.claims):
            if key not in want:
                self.claims.pop(key)[1].close()
        for key, owner in want.items():
            if key in self.claims:
                continue
            proto, ip, port = key
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((ip or "0.0.0.0", port))
                if proto == "TCP":
                    s.listen(1)
            except OSError as e:
                s.close()
                if ip and e.errno == 99:  # EADDRNOTAVAIL: the external IP is not on this node
                    continue
                self.log.warning(
                    "userspace: %s: cannot hold %s port %s:%d open (%s); another program may take it",
                    owner, proto, ip or "*", port, e,
                )
                continue
            self.claims[key] = (owner, s)


def _protocol_of(port: TcpServicePort | UdpServicePort) -> str:
    return "TCP" if isinstance(port, TcpServicePort) else "UDP"


def _detect_host_ip(run) -> str:
    """The first global IPv4 address of this network namespace."""
    rc, out, _err = run(["ip", "-4", "-o", "addr", "show", "scope", "global"])
    if rc == 0:
        for line in out.splitlines():
            parts = line.split()
            if "inet" in parts:
                return parts[parts.index("inet") + 1].split("/")[0]
    return ""
