"""The iptables mode: kube-proxy's iptables proxier as a kubelab Dataplane.

One sync = render (``render.py``, pure) + one ``iptables-restore --noflush``
(``kernel.py``) + housekeeping, as kube-proxy's ``syncProxyRules``:

* **Full syncs** (first sync, then once an hour -- kube-proxy's
  ``FullSyncPeriod``, never in large-cluster mode --, after any failure, after
  the canary chain vanished) write kube-proxy's complete rules; the periodic
  sync every sync-period in between is partial (nothing changed: nothing
  written).  One
  ``iptables-save`` per table tells which jump rules from the built-in
  chains (PREROUTING/OUTPUT -> KUBE-SERVICES, ...) and canary chains are
  missing -- they join the same restore -- and which per-service chains
  exist (stale ones are flushed and deleted; in large-cluster mode, >1000
  endpoints, only once per sync-period, as upstream).  The text is piped to
  iptables-restore while it is being rendered (render and restore overlap).
* **Partial syncs** touch only what changed: the changed services' own
  KUBE-SVC/SVL/EXT/FW/SEP chains are rewritten, their rules in the shared
  top-level chains are deleted/added one by one (``-D`` exact text,
  ``-I KUBE-SERVICES 1`` so the KUBE-NODEPORTS jump stays last), and chains
  they no longer use are deleted -- known from the previous render, with no
  ``iptables-save``.  kube-proxy rewrites the top-level chains in full on
  every sync; at 10k services that is 10k rules per partial sync.
* A failed restore leaves the previous rules in force (restore is atomic
  per table), is logged with the failing line, counted, and raised so the
  controller retries; the proxier's next sync is full whatever it is asked.
* Afterwards: healthCheckNodePort servers are updated and stale UDP
  conntrack entries deleted.

A canary chain (KUBE-PROXY-CANARY in mangle, nat and filter) is watched
every sync-period; when someone flushes the tables it disappears and a full
sync is forced (kube-proxy's ``iptables.Monitor``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kubelab.model import NodeInfo
from kubelab.modes.iptables import chains as C
from kubelab.modes.iptables.kernel import IPTables, IPTablesError, RestoreError, detect_backend, extract_lines
from kubelab.modes.iptables.render import LocalDetector, RenderConfig, Renderer, RenderResult
from kubelab.proxy.kernel.conntrack import Conntrack, clean_stale_entries
from kubelab.proxy.kernel.exec import Runner
from kubelab.proxy.kernel.sysctl import Sysctl, SysctlError
from kubelab.proxy.provider import Dataplane, ModeDeps, SyncState

SYSCTL_ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
SYSCTL_TCP_BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"


@dataclass(frozen=True)
class JumpChain:
    """A rule in a built-in chain jumping to one of ours (kube-proxy's iptablesJumpChain)."""

    table: str
    dst: str
    src: str
    comment: str
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        args = list(self.extra)
        if self.comment:
            args += ["-m", "comment", "--comment", self.comment]
        return args + ["-j", self.dst]

    def restore_args(self) -> str:
        """The same rule as restore text (the comment quoted)."""
        words = list(self.extra)
        if self.comment:
            words += ["-m", "comment", "--comment", f'"{self.comment}"']
        return " ".join([*words, "-j", self.dst])


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
JUMP_CHAINS = (
    JumpChain("filter", C.KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _NEW),
    JumpChain("filter", C.KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _NEW),
    JumpChain("filter", C.KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    JumpChain("filter", C.KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    JumpChain("filter", C.KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    JumpChain("filter", C.KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    JumpChain("filter", C.KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", C.KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", C.KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    JumpChain("nat", C.KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    JumpChain("nat", C.KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    JumpChain("nat", C.KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
)
# Duplicates of kubelet's KUBE-FIREWALL jumps (pkg/kubelet/kubelet_network_linux.go).
KUBELET_JUMP_CHAINS = (
    JumpChain("filter", C.KUBE_FIREWALL, "INPUT", ""),
    JumpChain("filter", C.KUBE_FIREWALL, "OUTPUT", ""),
)
CANARY_TABLES = ("mangle", "nat", "filter")
FULL_SYNC_PERIOD = 3600.0  # seconds: kube-proxy's proxyutil.FullSyncPeriod


class SyncError(RuntimeError):
    """A sync failed; the previous rules stay in force."""


def masquerade_mark(bit: int) -> str:
    """The mark kube-proxy derives from --iptables-masquerade-bit, formatted as it does ("%#08x")."""
    if not 0 <= bit <= 31:
        raise ValueError(f"--iptables-masquerade-bit must be within [0, 31], got {bit}")
    return "%#08x" % (1 << bit)


def local_detector_for(config: Any, node: NodeInfo, ip_family: int = 4, node_pod_cidrs: tuple[str, ...] = ()) -> LocalDetector:
    """kube-proxy's LocalTrafficDetector from --detect-local-mode and its inputs (no-op when unset)."""
    mode = config.detect_local_mode or "ClusterCIDR"

    def of_family(cidrs: tuple[str, ...]) -> str:
        for c in cidrs:
            try:
                if ipaddress.ip_network(c.strip(), strict=False).version == ip_family:
                    return c
            except ValueError:
                raise ValueError(f"--cluster-cidr: {c!r} is not a CIDR (e.g. 10.244.0.0/16)") from None
        return ""

    if mode == "ClusterCIDR":
        cidr = of_family(tuple(config.cluster_cidr))
        return LocalDetector.by_cidr(cidr) if cidr else LocalDetector()
    if mode == "NodeCIDR":
        cidr = of_family(node_pod_cidrs)
        return LocalDetector.by_cidr(cidr) if cidr else LocalDetector()
    if mode == "BridgeInterface":
        if not config.bridge_interface:
            raise ValueError("--detect-local-mode=BridgeInterface needs --pod-bridge-interface")
        return LocalDetector.by_interface(config.bridge_interface)
    if mode == "InterfaceNamePrefix":
        if not config.interface_name_prefix:
            raise ValueError("--detect-local-mode=InterfaceNamePrefix needs --pod-interface-name-prefix")
        return LocalDetector.by_interface_prefix(config.interface_name_prefix)
    raise ValueError(f"--detect-local-mode={mode!r}: choose ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix")


@dataclass(frozen=True)
class NodePortAddresses:
    """--nodeport-addresses for one family: match every local address, or these CIDRs."""

    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    primary: bool = False

    @classmethod
    def parse(cls, values: tuple[str, ...], ip_family: int = 4) -> NodePortAddresses:
        if tuple(values) == ("primary",):
            return cls(primary=True)
        nets = []
        for v in values:
            try:
                net = ipaddress.ip_network(v.strip(), strict=False)
            except ValueError:
                raise ValueError(f"--nodeport-addresses: {v!r} is not a CIDR (e.g. 192.168.0.0/24) or 'primary'") from None
            if net.version == ip_family:
                nets.append(net)
        return cls(tuple(nets))

    @property
    def match_all(self) -> bool:
        return not self.primary and (not self.cidrs or any(n.prefixlen == 0 for n in self.cidrs))

    def contains_ipv4_loopback(self) -> bool:
        if self.match_all:
            return True
        lo = ipaddress.ip_address("127.0.0.1")
        return any(n.version == 4 and lo in n for n in self.cidrs)

    def select(self, addresses: list[str], node_ips: tuple[str, ...]) -> tuple[str, ...]:
        if self.primary:
            return tuple(ip for ip in node_ips if ip == _primary_ip(node_ips, 4))
        out = []
        for a in addresses:
            ip = ipaddress.ip_address(a)
            if any(ip.version == n.version and ip in n for n in self.cidrs) and a not in out:
                out.append(a)
        return tuple(out)


def _primary_ip(ips: tuple[str, ...], ip_family: int) -> str:
    """The node's primary IP of a family: the first that is not loopback or link-local."""
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if addr.version == ip_family and not addr.is_loopback and not addr.is_link_local:
            return ip
    return ""


@dataclass
class _SyncStats:
    last_full_sync: float = float("-inf")
    last_cleanup: float = float("-inf")
    syncs: int = 0
    full_syncs: int = 0
    last_text: str = ""
    last_restore: str = ""
    last_result: RenderResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


class IPTablesProxier(Dataplane):
    """kube-proxy's iptables mode (``--proxy-mode iptables``), IPv4."""

    name = "iptables"

    def __init__(self, deps: ModeDeps) -> None:
        self.deps = deps
        self.config = deps.config
        self.log = deps.logger or logging.getLogger("kubelab.iptables")
        self.metrics = deps.metrics
        self.run = deps.run or Runner()
        self.ip_family = 4
        # Tests may hand in a ready adapter (a fake, or one bound to a backend).
        self._iptables: IPTables | None = deps.extra.get("iptables")
        self._backend: str | None = deps.extra.get("iptables_backend")
        self.sysctl = deps.extra.get("sysctl") or Sysctl(self.run)
        self.conntrack = deps.extra.get("conntrack") or Conntrack(self.run)
        self._node_pod_cidrs: tuple[str, ...] = tuple(deps.extra.get("node_pod_cidrs", ()))
        self._interface_addresses = deps.extra.get("interface_addresses")  # callable -> list[str], for tests
        self._health_factory = deps.extra.get("service_health_server")
        self._proxier_health = deps.extra.get("proxier_health")
        mark = masquerade_mark(self.config.masquerade_bit)
        self.nodeport_addresses = NodePortAddresses.parse(tuple(self.config.nodeport_addresses), self.ip_family)
        localhost = bool(self.config.iptables_localhost_nodeports) and self.nodeport_addresses.contains_ipv4_loopback()
        # What render() (--dry-run) uses; the kernel-dependent bits are filled in on the first sync.
        self.render_config = RenderConfig(
            ip_family=self.ip_family,
            masquerade_all=self.config.masquerade_all,
            masquerade_mark=mark,
            local_detector=local_detector_for(self.config, deps.node, self.ip_family, self._node_pod_cidrs),
            localhost_nodeports=localhost,
            nodeport_match_all=self.nodeport_addresses.match_all,
            nodeport_ips=self.nodeport_addresses.select(list(deps.node.ips), deps.node.ips),
            node_ip=_primary_ip(deps.node.ips, self.ip_family),
            random_fully=True,
        )
        self._renderer: Renderer | None = None
        self._kernel_ready = False
        self._need_full_sync = True
        self._result: RenderResult | None = None  # the last successful sync (fragments + totals)
        # Tests and --dry-run comparisons read the last restore input; a proxy keeps no copy.
        self._keep_last_text = bool(deps.extra.get("keep_last_text"))
        self._lock = asyncio.Lock()
        self._monitor_task: asyncio.Task | None = None
        self._health = None
        self._last_state: SyncState | None = None
        self.stats = _SyncStats()

    @property
    def full_sync_period(self) -> float:
        """Seconds between regular full syncs: kube-proxy's ``FullSyncPeriod`` (one hour).

        In large-cluster mode (more than 1,000 endpoints after the last sync)
        none at all, as upstream ("avoid regular full syncs for large
        clusters"): a full sync of 10,000 Services costs 3 s on a 2-core host
        (BENCHMARKS.md ## modes compared) and repairs nothing a partial one
        misses, since failures and a flushed canary force one anyway.
        """
        if self._result is not None and self._result.large_cluster_mode:
            return math.inf
        return FULL_SYNC_PERIOD

    # ------------------------------------------------------------ kernel setup

    @property
    def iptables(self) -> IPTables:
        if self._iptables is None:
            backend = self._backend or detect_backend(self.run)
            self._iptables = IPTables(self.run, backend, self.ip_family)
            self.log.info("iptables backend: %s (detected as kube-proxy's iptables-wrapper does)", backend)
        return self._iptables

    def _addresses(self) -> list[str]:
        if self._interface_addresses is not None:
            return list(self._interface_addresses())
        rc, out, err = self.run(["ip", "-j", "addr", "show"])
        if rc != 0:
            self.log.error("cannot list interface addresses for --nodeport-addresses: %s", err.strip())
            return []
        return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", ()) if "local" in a]

    def _init_kernel(self) -> None:
        """Once, before the first sync: sysctls, backend features, node IPs for --nodeport-addresses."""
        if self._kernel_ready:
            return
        cfg = self.render_config
        if cfg.localhost_nodeports:
            # NodePorts on 127.0.0.0/8 need route_localnet (https://issues.k8s.io/90259).
            self.log.info(
                "setting route_localnet=1 to allow NodePorts on localhost; to avoid it pass "
                "--iptables-localhost-nodeports=false or --nodeport-addresses without 127.0.0.0/8"
            )
            try:
                self.sysctl.ensure(SYSCTL_ROUTE_LOCALNET, 1)
            except SysctlError as e:
                raise SyncError(f"{e}; localhost NodePorts need it") from e
        try:
            liberal = self.sysctl.get(SYSCTL_TCP_BE_LIBERAL) != 0
        except (SysctlError, ValueError):
            liberal = False
        if liberal:
            self.log.info("nf_conntrack_tcp_be_liberal set, not installing DROP rules for INVALID packets")
        nodeport_ips = cfg.nodeport_ips
        if not self.nodeport_addresses.match_all:
            nodeport_ips = self.nodeport_addresses.select(self._addresses(), self.deps.node.ips)
            if not nodeport_ips:
                self.log.error(
                    "no local address matches --nodeport-addresses %s: NodePorts will not be reachable",
                    ",".join(self.config.nodeport_addresses),
                )
        self.render_config = replace(
            cfg,
            random_fully=self.iptables.has_random_fully(),
            conntrack_tcp_liberal=liberal,
            nodeport_ips=nodeport_ips,
        )
        self._kernel_ready = True

    @property
    def renderer(self) -> Renderer:
        """The renderer for the current :attr:`render_config` (rebuilt when it changes)."""
        if self._renderer is None or self._renderer.config is not self.render_config:
            self._renderer = Renderer(self.render_config)
        return self._renderer

    def _save_tables(self) -> dict[str, str]:
        """``iptables-save`` of filter, nat and mangle (what a full sync checks its jumps and stale chains against)."""
        return {table: self.iptables.save(table) for table in ("filter", "nat", "mangle")}

    def _jump_lines(self, saved: dict[str, str]) -> dict[str, list[str]]:
        """Restore lines for the jump rules (and canary chains) that ``saved`` lacks, per table.

        kube-proxy ensures each jump with ``iptables -C`` / ``-I`` and each
        canary with ``-N``: some 40 commands per full sync at ~25-100 ms each.
        The saves already tell what is there, so the missing pieces ride in
        the sync's one restore instead: ``-I <builtin> 1 ...`` in kube-proxy's
        order (each prepended, as its EnsureRule(Prepend) does), and the
        canaries declared (empty chains; declaring flushes nothing of value).
        """
        jumps = JUMP_CHAINS + (KUBELET_JUMP_CHAINS if self.render_config.localhost_nodeports else ())
        builtin = {j.src for j in jumps}
        rules: dict[str, dict[str, list[str]]] = {}
        for table, text in saved.items():
            per_chain: dict[str, list[str]] = {}
            for line in text.splitlines():
                if line.startswith("-A "):
                    chain = line[3:].split(" ", 1)[0]
                    if chain in builtin:
                        per_chain.setdefault(chain, []).append(line)
            rules[table] = per_chain

        def present(j: JumpChain) -> bool:
            if f"\n:{j.dst} " not in saved.get(j.table, ""):
                return False
            want = [f"-j {j.dst}"] + ([f'--comment "{j.comment}"'] if j.comment else [])
            for line in rules.get(j.table, {}).get(j.src, ()):
                if all(w in line for w in want) and (j.comment or line == f"-A {j.src} -j {j.dst}"):
                    return True
            return False

        out: dict[str, list[str]] = {t: [f":{C.KUBE_PROXY_CANARY} - [0:0]"] for t in CANARY_TABLES}
        for j in jumps:
            if not present(j):
                out[j.table].append(f"-I {j.src} 1 {j.restore_args()}")
        return out

    # ------------------------------------------------------------ syncing

    def render(self, state: SyncState) -> str:
        """The restore input of a full sync of ``state`` (``--dry-run``); touches nothing."""
        return self.renderer.render(state.service_map, state.endpoints_map, state.node).text

    async def sync_proxy_rules(self, state: SyncState) -> None:
        async with self._lock:
            self._last_state = state
            await asyncio.to_thread(self._sync, state, False)
            await self._sync_health(state)

    def _sync(self, state: SyncState, force_full: bool) -> None:
        t0 = time.perf_counter()
        self._init_kernel()
        previous = self._result
        full = state.full_sync or force_full or self._need_full_sync or previous is None
        t1 = time.perf_counter()

        existing = None
        saved: dict[str, str] = {}
        now = time.monotonic()
        if full:
            # One iptables-save per table tells which jump rules and canaries are
            # missing (they join the restore) and, in nat, which per-service chains
            # exist: partial syncs know their stale chains from the fragments they
            # replace; full syncs also delete leftovers found here -- in large
            # clusters once per period, as upstream.
            try:
                saved = self._save_tables()
            except IPTablesError as e:
                self._need_full_sync = True
                raise SyncError(f"cannot read the current rules (iptables-save): {e}") from e
            large = Renderer.total_endpoints(state.service_map, state.endpoints_map) > C.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
            if not large or now - self.stats.last_cleanup > self.config.sync_period:
                existing = {line[1:].split(" ", 1)[0] for line in saved["nat"].split("\n") if line.startswith(":")}
        t2 = time.perf_counter()

        stream = None
        if full:
            stream = self.renderer.stream_full(
                state.service_map, state.endpoints_map, state.node, existing, extra=self._jump_lines(saved)
            )
            result = None
            text = ""
        else:
            result = self.renderer.render_partial(
                state.service_map, state.endpoints_map, state.node, state.updated_services, previous.fragments, previous
            )
            text = result.text
        t3 = time.perf_counter()
        try:
            if stream is not None:
                # Rendering and the restore overlap: the text is piped as it is produced.
                self.iptables.restore_stream(stream)
                result = stream.result
                if result is None:
                    raise RestoreError("the full-sync render stopped early (see the log)")
            elif text:
                self.iptables.restore_all(text)
        except RestoreError as e:
            self._need_full_sync = True
            self._result = None
            if self.metrics is not None:
                self.metrics.iptables_restore_failures_total.inc()
                if not full:
                    self.metrics.iptables_partial_restore_failures_total.inc()
            if stream is not None and e.line:
                # The streamed text was never kept: render it again (deterministic) for the report.
                text = "".join(self.renderer.stream_full(
                    state.service_map, state.endpoints_map, state.node, existing, extra=self._jump_lines(saved)
                ))
            detail = f"\n{extract_lines(text, e.line)}" if e.line else ""
            self.log.error("%s%s", e, detail)
            raise SyncError(f"{e} (previous rules stay in force; retrying as a full sync)") from e
        t4 = time.perf_counter()

        total_endpoints = result.total_endpoints
        if self._keep_last_text:
            # What iptables-restore got (with missing jumps and canaries; a full sync's, rendered again).
            self.stats.last_restore = "".join(self.renderer.stream_full(
                state.service_map, state.endpoints_map, state.node, existing, extra=self._jump_lines(saved)
            )) if full else text
            # kube-proxy's rules alone, as tests compare them with upstream's expectations.
            self.stats.last_text = self.renderer.render_full(
                state.service_map, state.endpoints_map, state.node, existing
            ).text if full else text
        # The fragments are all a partial sync needs; the text (17 MB at 10k services) goes.
        result.text = ""
        if full:
            # Index the service ports now (~5 ms at 10k) rather than in the first partial sync.
            self.renderer.ports_of(state.service_map, ())
        self._result = result
        self._need_full_sync = False
        if existing is not None:
            self.stats.last_cleanup = now
        self.stats.syncs += 1
        if full:
            self.stats.full_syncs += 1
            self.stats.last_full_sync = now
        self.stats.last_result = result
        if self.metrics is not None:
            m = self.metrics
            m.iptables_total.labels(table="filter").set(result.filter_rules)
            m.iptables_last.labels(table="filter").set(result.filter_rules)
            m.iptables_total.labels(table="nat").set(result.nat_rules_total)
            m.iptables_last.labels(table="nat").set(result.nat_rules_written)
            m.no_local_endpoints_total.labels(traffic_policy="internal").set(result.no_local_internal)
            m.no_local_endpoints_total.labels(traffic_policy="external").set(result.no_local_external)

        # Housekeeping: stale UDP conntrack entries.
        clean_stale_entries(
            self.conntrack,
            state.service_map,
            state.deleted_udp_cluster_ips,
            state.deleted_udp_endpoints,
            state.newly_active_udp_services,
            self.ip_family,
        )
        t5 = time.perf_counter()
        self.stats.timings = {
            "setup": t1 - t0,
            "save": t2 - t1,
            # A full sync renders while the restore reads: "restore" then includes the render.
            "render": (t3 - t2) + (stream.seconds if stream is not None else 0.0),
            "restore": t4 - t3,
            "conntrack": t5 - t4,
        }
        self.log.debug(
            "iptables %s sync: %d services, %d endpoints, %s",
            "full" if full else "partial",
            len(state.service_map),
            total_endpoints,
            ", ".join(f"{k} {v * 1000:.1f}ms" for k, v in self.stats.timings.items()),
        )

    # ------------------------------------------------------------ health checks

    async def _sync_health(self, state: SyncState) -> None:
        if self._health is None:
            return
        ports: dict[str, int] = {}
        local: dict[str, set[str]] = {}
        # Only services with a healthCheckNodePort matter: no pass over every endpoint.
        for name, svc in state.service_map.items():
            if not svc.health_check_node_port:
                continue
            key = name.namespaced_name
            ports[key] = svc.health_check_node_port
            # kube-proxy counts the service's ready local endpoints (distinct IPs, all ports).
            for ep in state.endpoints_map.get(name, ()):
                if ep.ready and ep.is_local:
                    local.setdefault(key, set()).add(ep.ip)
        try:
            await self._health.sync_services(ports)
            self._health.sync_endpoints({k: len(v) for k, v in local.items()})
        except Exception as e:  # health checks must never break programming
            self.log.error("error syncing healthcheck services: %s", e)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the healthCheckNodePort servers and the canary monitor."""
        if self._health is None:
            if self._health_factory is not None:
                self._health = self._health_factory()
            else:
                from kubelab.proxy.health import ServiceHealthServer

                ips = () if self.nodeport_addresses.match_all else self.render_config.nodeport_ips
                self._health = ServiceHealthServer(self.deps.node.name, ips, self._proxier_health)
        if self._monitor_task is None:
            self._monitor_task = asyncio.ensure_future(self._monitor())

    async def stop(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        if self._health is not None:
            await self._health.stop()
            self._health = None

    def canary_missing(self) -> bool:
        """True when the mangle canary is gone (someone flushed our tables)."""
        return not self.iptables.chain_exists("mangle", C.KUBE_PROXY_CANARY)

    async def _monitor(self) -> None:
        """kube-proxy's iptables.Monitor: poll the canary each sync-period; force a full sync when it is gone."""
        interval = max(float(self.config.sync_period), 0.2)
        while True:
            await asyncio.sleep(interval)
            if self._last_state is None:
                continue
            try:
                missing = await asyncio.to_thread(self.canary_missing)
            except Exception as e:
                self.log.error("canary check failed: %s", e)
                continue
            if not missing:
                continue
            # Wait for the flush to finish (all canaries gone, or 1/10 of a period), as upstream.
            deadline = time.monotonic() + interval / 10
            while time.monotonic() < deadline:
                gone = await asyncio.to_thread(
                    lambda: all(not self.iptables.chain_exists(t, C.KUBE_PROXY_CANARY) for t in CANARY_TABLES)
                )
                if gone:
                    break
                await asyncio.sleep(interval / 100)
            self.log.warning("iptables canary %s vanished: tables were flushed, forcing a full resync", C.KUBE_PROXY_CANARY)
            self._need_full_sync = True
            async with self._lock:
                state = self._last_state
                try:
                    await asyncio.to_thread(self._sync, state, True)
                except Exception as e:
                    self.log.error("resync after flush failed: %s (the next sync retries)", e)

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Remove every chain and jump rule this mode creates, on both backends; leave foreign rules."""
        errors: list[str] = []
        backends = [self._iptables.backend] if self._iptables is not None and self._backend else ["nft", "legacy"]
        for backend in backends:
            ipt = self._iptables if (self._iptables is not None and self._iptables.backend == backend) else IPTables(
                self.run, backend, self.ip_family
            )
            if len(backends) > 1 and (why := ipt.unavailable()):
                # Trying both backends, as kube-proxy's cleanup does; one this kernel
                # lacks holds nothing of ours, so it is not a failure.
                self.log.info("skipping cleanup on the %s backend: not usable here (%s)", backend, why)
                continue
            errors += cleanup_leftovers(ipt, self.log)
        if errors:
            raise SyncError("cleanup incomplete: " + "; ".join(errors))


def cleanup_leftovers(ipt: IPTables, log: logging.Logger) -> list[str]:
    """kube-proxy's CleanupLeftovers for one backend, plus the canaries and KUBE-FIREWALL kubelab wrote."""
    errors: list[str] = []
    for j in JUMP_CHAINS + KUBELET_JUMP_CHAINS:
        try:
            while ipt.delete_rule(j.table, j.src, j.args()):
                pass
        except IPTablesError as e:
            errors.append(str(e))
    plans = {
        "nat": [C.KUBE_SERVICES, C.KUBE_NODEPORTS, C.KUBE_POSTROUTING, C.KUBE_MARK_MASQ, C.KUBE_PROXY_CANARY],
        "filter": [
            C.KUBE_SERVICES,
            C.KUBE_EXTERNAL_SERVICES,
            C.KUBE_FORWARD,
            C.KUBE_NODEPORTS,
            C.KUBE_PROXY_FIREWALL,
            C.KUBE_FIREWALL,
            C.KUBE_PROXY_CANARY,
        ],
        "mangle": [C.KUBE_PROXY_CANARY],
    }
    for table, fixed in plans.items():
        try:
            existing = ipt.chains(table)
        except IPTablesError as e:
            errors.append(str(e))
            continue
        ours = [c for c in fixed if c in existing] + sorted(c for c in existing if C.is_service_chain_name(c))
        if not ours:
            continue
        text = "\n".join([f"*{table}", *(f":{c} - [0:0]" for c in ours), *(f"-X {c}" for c in ours), "COMMIT", ""])
        try:
            ipt.restore_all(text)
            log.info("removed %d chains from %s (%s)", len(ours), table, ipt.backend)
        except RestoreError as e:
            # Something foreign still jumps to one of ours: delete one by one, keep going.
            log.warning("bulk cleanup of %s failed (%s); deleting chains one by one", table, e)
            for c in ours:
                try:
                    ipt.delete_chain(table, c)
                except IPTablesError as e2:
                    errors.append(str(e2))
    return errors
