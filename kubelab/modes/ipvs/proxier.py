"""The IPVS mode: kube-proxy's IPVS proxier as a kubelab Dataplane (``--proxy-mode ipvs``).

Each sync renders the desired state (``render.py``, pure) and reconciles the
kernel against it (``kernel.py``):

* **Full syncs** (first sync, every sync-period, after any failure) read
  everything back from the kernel -- virtual servers, their real servers,
  the addresses on ``kube-ipvs0``, every ipset's members -- and add what is
  missing, set what differs (scheduler, flags, persistence, weight) and
  remove what is ours and no longer wanted.
* **Partial syncs** re-render only the services that changed, read back only
  their virtual servers, and apply the set/address deltas computed from
  per-entry reference counts; the iptables ruleset is restored only when its
  text changed.

"Ours": a virtual server whose address is bound to ``kube-ipvs0`` or listed
in the KUBE-IPVS-IPS set, or a NodePort one (a node address and a port in
our KUBE-NODE-PORT-* sets).  Upstream kube-proxy deletes *every* virtual
server outside ``--ipvs-exclude-cidrs``; kubelab leaves foreign ones alone
(the issue asks for it) and still honours the exclude CIDRs.

Graceful termination (upstream ``graceful_termination.go``): a real server
that is no longer wanted gets weight 0, so no new connections go to it, and
is deleted once its ActiveConn+InactConn reach 0 -- or after
``--ipvs-graceful-termination-timeout`` seconds (kubelab's addition; upstream
waits forever).  UDP real servers are deleted at once and their conntrack
entries cleared.  When an endpoint comes back while draining, its weight is
restored instead of deleting and re-adding it (upstream deletes first, which
resets the connections it was draining).

All changes of one sync go to the kernel as batches: one netlink batch for
IPVS, one per address/ipset direction, one ``iptables-restore --noflush``.
The netlink messages are our own ``struct`` encoding, not pyroute2's IPVS
API: pyroute2 measured 32x slower per message (459 vs 14 µs) and 0.85 s to
import in UML, which alone would lose to ``ipvsadm -R``; see ``kernel.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from kubelab.model import ServicePortName
from kubelab.modes.ipvs import render as R
from kubelab.modes.ipvs.kernel import (
    IPVS,
    AddressBinder,
    IPSets,
    IPVSOp,
    KernelError,
    RealServer,
    VirtualServer,
)
from kubelab.proxy.kernel.conntrack import Conntrack, clean_stale_entries
from kubelab.proxy.kernel.exec import Runner
from kubelab.proxy.kernel.sysctl import Sysctl, SysctlError
from kubelab.proxy.provider import Dataplane, ModeDeps, SyncState

SYSCTL_VS_CONNTRACK = "net/ipv4/vs/conntrack"
SYSCTL_EXPIRE_NODEST_CONN = "net/ipv4/vs/expire_nodest_conn"
SYSCTL_EXPIRE_QUIESCENT_TEMPLATE = "net/ipv4/vs/expire_quiescent_template"
SYSCTL_FORWARD = "net/ipv4/ip_forward"
SYSCTL_ARP_IGNORE = "net/ipv4/conf/all/arp_ignore"
SYSCTL_ARP_ANNOUNCE = "net/ipv4/conf/all/arp_announce"


class ProcSysctl:
    """Sysctls of this process's network namespace through ``/proc/sys`` (a ``sysctl`` process costs ~0.1 s in UML).

    The IPVS mode's netlink adapters act on the calling process's namespace,
    so its sysctls do too; same interface as ``kubelab.proxy.kernel.sysctl.Sysctl``.
    """

    @staticmethod
    def _path(name: str) -> str:
        return "/proc/sys/" + name.replace(".", "/")

    def get(self, name: str) -> int:
        try:
            with open(self._path(name)) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise SysctlError(f"cannot read sysctl {name}: {exc}") from exc

    def set(self, name: str, value: int) -> None:
        try:
            with open(self._path(name), "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise SysctlError(f"cannot set sysctl {name}={value}: {exc} (needs root)") from exc

    def ensure(self, name: str, value: int) -> bool:
        try:
            if self.get(name) == value:
                return False
        except SysctlError:
            pass
        self.set(name, value)
        return True


class SyncError(RuntimeError):
    """A sync could not program everything; what failed is named, the rest is in force."""


@dataclass
class Draining:
    """A real server on its way out (weight 0)."""

    vs: VirtualServer
    rs: RealServer
    deadline: float


@dataclass
class Stats:
    syncs: int = 0
    full_syncs: int = 0
    last_ops: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class IPVSProxier(Dataplane):
    """kube-proxy's IPVS mode, IPv4.

    Tests and labs may hand in adapters through ``deps.extra``: ``ipvs``,
    ``addresses``, ``ipsets``, ``iptables``, ``sysctl``, ``conntrack``,
    ``iptables_backend`` ("legacy" inside UML), ``graceful_check_interval``
    (seconds), ``clock`` (monotonic time function).
    """

    name = "ipvs"

    def __init__(self, deps: ModeDeps) -> None:
        from kubelab.modes.iptables.proxier import NodePortAddresses, local_detector_for, masquerade_mark

        self.deps = deps
        self.config = deps.config
        self.log = deps.logger or logging.getLogger("kubelab.ipvs")
        self.metrics = deps.metrics
        self.run = deps.run or Runner()
        self.ip_family = 4
        scheduler = (self.config.ipvs_scheduler or R.DEFAULT_SCHEDULER).strip()
        if scheduler not in R.SCHEDULERS:
            raise ValueError(f"--ipvs-scheduler={scheduler!r} is not an IPVS scheduler: choose one of {', '.join(R.SCHEDULERS)}")
        self.exclude_cidrs = []
        for c in self.config.ipvs_exclude_cidrs:
            try:
                self.exclude_cidrs.append(ipaddress.ip_network(c.strip(), strict=False))
            except ValueError:
                raise ValueError(f"--ipvs-exclude-cidrs: {c!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
        self.nodeport_addresses = NodePortAddresses.parse(tuple(self.config.nodeport_addresses), self.ip_family)
        detector = local_detector_for(self.config, deps.node, self.ip_family, tuple(deps.extra.get("node_pod_cidrs", ())))
        self.render_config = R.RenderConfig(
            scheduler=scheduler,
            masquerade_all=self.config.masquerade_all,
            masquerade_mark=masquerade_mark(self.config.masquerade_bit),
            local_detector_if_not_local=tuple(detector.if_not_local),
            nodeport_ips=tuple(ip for ip in deps.node.ips if _is_family(ip, 4) and not _is_loopback(ip)),
            node_addresses=frozenset(deps.node.ips),
            node_ip=deps.node.ips[0] if deps.node.ips else "",
            random_fully=True,
        )
        self._ipvs: Any = deps.extra.get("ipvs")
        self._addrs: Any = deps.extra.get("addresses")
        self._ipsets: Any = deps.extra.get("ipsets")
        self._iptables: Any = deps.extra.get("iptables")
        self._backend: str | None = deps.extra.get("iptables_backend")
        self.sysctl = deps.extra.get("sysctl") or (Sysctl(self.run) if deps.run is not None else ProcSysctl())
        self.conntrack = deps.extra.get("conntrack") or Conntrack(self.run)
        self.clock = deps.extra.get("clock") or time.monotonic
        self.graceful_check_interval = float(deps.extra.get("graceful_check_interval", 5.0))
        self._health_factory = deps.extra.get("service_health_server")
        self._proxier_health = deps.extra.get("proxier_health")
        self._kernel_ready = False
        self._need_full_sync = True
        self._fragments: dict[ServicePortName, R.Fragment] | None = None
        self._set_counts: dict[str, Counter] = {}
        self._bind_counts: Counter = Counter()
        self._applied_iptables = ""
        self._pending_jumps: list[tuple[str, str]] | None = None  # from the last save; None = verified
        self._apply_marks: dict[str, float] = {}
        self.draining: dict[tuple, Draining] = {}
        self._lock = asyncio.Lock()
        self._graceful_task: asyncio.Task | None = None
        self._health = None
        self.stats = Stats()
        self._gauges = self._make_gauges()

    # ------------------------------------------------------------ adapters

    @property
    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = IPVS()
        return self._ipvs

    @property
    def addresses(self) -> AddressBinder:
        if self._addrs is None:
            self._addrs = AddressBinder()
        return self._addrs

    @property
    def ipsets(self) -> IPSets:
        if self._ipsets is None:
            self._ipsets = IPSets(self.run)
        return self._ipsets

    @property
    def iptables(self) -> Any:
        if self._iptables is None:
            from kubelab.modes.iptables.kernel import IPTables, detect_backend

            backend = self._backend or detect_backend(self.run)
            if self._backend is None and self.run([f"iptables-{backend}", "-w", "5", "-t", "nat", "-S"])[0] != 0:
                # e.g. UML: nf_tables without its NAT chain type; the legacy backend works there.
                backend = "legacy" if backend == "nft" else "nft"
            self._iptables = IPTables(self.run, backend, self.ip_family)
            self.log.info("iptables backend: %s", backend)
        return self._iptables

    def _make_gauges(self) -> dict[str, Any]:
        if self.metrics is None or not hasattr(self.metrics, "registry"):
            return {}
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge

        out: dict[str, Any] = {}
        specs = {
            "virtual_servers": (Gauge, "sync_proxy_rules_ipvs_virtual_servers", "IPVS virtual servers programmed by the last sync (kubelab)"),
            "real_servers": (Gauge, "sync_proxy_rules_ipvs_real_servers", "IPVS real servers wanted by the last sync (kubelab)"),
            "draining": (Gauge, "sync_proxy_rules_ipvs_graceful_termination_real_servers", "Real servers draining with weight 0 (kubelab)"),
            "failures": (PCounter, "sync_proxy_rules_ipvs_failures", "IPVS, address or ipset changes the kernel refused (kubelab)"),
        }
        for key, (cls, name, doc) in specs.items():
            try:
                out[key] = cls(name, doc, subsystem="kubeproxy", registry=self.metrics.registry)
            except ValueError:  # already registered by another proxier on this registry
                pass
        return out

    # ------------------------------------------------------------ kernel setup

    def _init_kernel(self) -> None:
        if self._kernel_ready:
            return
        wanted = [(SYSCTL_VS_CONNTRACK, 1), (SYSCTL_EXPIRE_NODEST_CONN, 1), (SYSCTL_EXPIRE_QUIESCENT_TEMPLATE, 1), (SYSCTL_FORWARD, 1)]
        if self.config.ipvs_strict_arp:
            wanted += [(SYSCTL_ARP_IGNORE, 1), (SYSCTL_ARP_ANNOUNCE, 2)]
        # conn_reuse_mode is left alone: kube-proxy only touches it on kernels < 5.9 (issue 93297).
        for key, value in wanted:
            try:
                self.sysctl.ensure(key, value)
            except SysctlError as exc:
                raise SyncError(f"{exc} (is the ip_vs module loaded? modprobe ip_vs)") from exc
        if self.config.ipvs_tcp_timeout or self.config.ipvs_tcpfin_timeout or self.config.ipvs_udp_timeout:
            try:
                self.ipvs.set_timeouts(
                    int(self.config.ipvs_tcp_timeout), int(self.config.ipvs_tcpfin_timeout), int(self.config.ipvs_udp_timeout)
                )
            except OSError as exc:
                self.log.error("cannot set IPVS timeouts: %s", exc)
        version, self._pending_jumps = self._read_jumps()
        self.render_config = replace(self.render_config, random_fully=version >= (1, 6, 2))
        self._kernel_ready = True

    def _ensure_sets(self) -> dict[str, set[str]]:
        """Full syncs: every ipset exists (missing ones created in one ``ipset restore``); returns members."""
        members: dict[str, set[str]] = {}
        missing = []
        for spec in R.IPSETS:
            try:
                members[spec.name] = self.ipsets.members(spec.name, spec.set_type)
            except KernelError:
                missing.append(spec)
                members[spec.name] = set()
        if missing:
            self.ipsets.create_all(missing)
        return members

    def _read_jumps(self) -> tuple[tuple[int, ...], list[tuple[str, str]]]:
        """(iptables version, restore lines inserting the missing jumps from built-in chains).

        One ``iptables-save`` answers both (each ``iptables -C`` or
        ``--version`` costs a process, 0.2-0.5 s in UML).
        """
        ipt = self.iptables
        rc, out, err = self.run([f"{'ip6tables' if self.ip_family == 6 else 'iptables'}-{ipt.backend}-save"])
        if rc != 0:
            raise SyncError(f"cannot read iptables rules ({ipt.backend}): {(err or out).strip()}")
        m = re.search(r"iptables-save v(\d+)\.(\d+)\.(\d+)", out)
        version = tuple(int(x) for x in m.groups()) if m else (1, 8, 0)
        table = ""
        present: set[tuple[str, str]] = set()
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith("-A "):
                present.add((table, line[3:].strip()))
        missing = [
            (table, f"-I {src} 1 {_jump_rule(comment, dst)}")
            for table, src, dst, comment in R.JUMP_CHAINS
            if (table, f"{src} {_jump_rule(comment, dst)}") not in present
        ]
        return version, missing

    def _restore_with_jumps(self, text: str) -> list[str]:
        """Full syncs: restore our chains and make sure the jumps to them exist, in one process when possible.

        Steady state: the jumps are re-asserted inside the restore as
        delete-then-insert pairs (atomic, and they stay first in their
        chains).  If that fails -- a jump went missing, or this is the first
        sync -- one ``iptables-save`` finds the missing ones and the restore
        inserts just those.
        """
        if self._pending_jumps is None:
            pairs = [
                line
                for table, src, dst, comment in R.JUMP_CHAINS
                for line in ((table, f"-D {src} {_jump_rule(comment, dst)}"), (table, f"-I {src} 1 {_jump_rule(comment, dst)}"))
            ]
            if not self._restore_iptables(R.with_jumps(text, pairs), force=True, quiet=True):
                return []
            _, self._pending_jumps = self._read_jumps()
        errors = self._restore_iptables(R.with_jumps(text, self._pending_jumps), force=True)
        if not errors:
            self._pending_jumps = None
        return errors

    def _refresh_node_addresses(self) -> None:
        addrs = sorted(a for a in self.addresses.all_addresses_except_device() if _is_family(a, self.ip_family))
        if self.nodeport_addresses.match_all:
            nodeport = [a for a in addrs if not _is_loopback(a) and not ipaddress.ip_address(a).is_link_local]
        else:
            nodeport = [a for a in self.nodeport_addresses.select(addrs, self.deps.node.ips) if not _is_loopback(a)]
            if not nodeport:
                self.log.error(
                    "no local address matches --nodeport-addresses %s: NodePorts will not be reachable",
                    ",".join(self.config.nodeport_addresses),
                )
        self.render_config = replace(self.render_config, nodeport_ips=tuple(nodeport), node_addresses=frozenset(addrs))

    # ------------------------------------------------------------ rendering

    def render(self, state: SyncState) -> str:
        """What a full sync of ``state`` programs (``--dry-run``); touches nothing."""
        desired = R.render(state.service_map, state.endpoints_map, state.node, self.render_config)
        return R.dry_run_text(desired)

    # ------------------------------------------------------------ syncing

    async def sync_proxy_rules(self, state: SyncState) -> None:
        async with self._lock:
            await asyncio.to_thread(self._sync, state)
            await self._sync_health(state)

    def _sync(self, state: SyncState) -> None:
        t0 = time.perf_counter()
        full = state.full_sync or self._need_full_sync or self._fragments is None
        self._need_full_sync = True  # until this sync succeeds
        try:
            prep = _Marks()
            self._init_kernel()
            prep("init")
            kernel_sets: dict[str, set[str]] = {}
            if full:
                self.addresses.ensure_device()
                prep("device")
                kernel_sets = self._ensure_sets()
                prep("ipsets")
                self._refresh_node_addresses()
                prep("node_addresses")
        except (KernelError, OSError) as exc:
            raise SyncError(f"cannot prepare the kernel for IPVS: {exc}") from exc
        except Exception as exc:  # IPTablesError and friends
            raise SyncError(f"cannot prepare iptables for IPVS: {exc}") from exc
        t1 = time.perf_counter()

        old = self._fragments or {}
        if full:
            names = list(state.service_map)
        else:
            names = [n for n in state.service_map if n.namespaced_name in state.updated_services]
            names += [n for n in old if n not in state.service_map]
        cfg = self.render_config
        new: dict[ServicePortName, R.Fragment] = {} if full else dict(old)
        for n in names:
            svc = state.service_map.get(n)
            if svc is None:
                new.pop(n, None)
            else:
                new[n] = R.render_service_port(n, svc, state.endpoints_map.get(n, ()), state.node, cfg)
        for n in names:
            for err in new[n].errors if n in new else ():
                self.log.error("%s", err)
        t2 = time.perf_counter()

        errors: list[str] = []
        if full:
            desired = R.desired_from(new.values(), cfg)
            for err in desired.errors:
                self.log.error("%s", err)
            ops_errors, stats = self._reconcile_full(desired, new, kernel_sets)
        else:
            ops_errors, stats = self._reconcile_partial(old, new, names)
        errors += ops_errors
        t3 = time.perf_counter()

        # Stale UDP conntrack entries (services and endpoints that went away).
        try:
            clean_stale_entries(
                self.conntrack,
                state.service_map,
                state.deleted_udp_cluster_ips,
                state.deleted_udp_endpoints,
                state.newly_active_udp_services,
                self.ip_family,
            )
        except Exception as exc:  # conntrack cleanup must never fail a sync
            self.log.error("conntrack cleanup failed: %s", exc)
        t4 = time.perf_counter()

        self._fragments = new
        self.stats.syncs += 1
        self.stats.full_syncs += int(full)
        self.stats.timings = {"prepare": t1 - t0, "render": t2 - t1, "apply": t3 - t2, "conntrack": t4 - t3}
        if full:
            self.stats.timings.update({f"prepare.{k}": v for k, v in prep.spans.items()})
            self.stats.timings.update({f"apply.{k}": v for k, v in self._apply_marks.items()})
        self._publish_metrics(new, stats)
        if errors:
            if "failures" in self._gauges:
                self._gauges["failures"].inc(len(errors))
            for e in errors:
                self.log.error("%s", e)
            raise SyncError(f"{len(errors)} change(s) failed, retrying as a full sync: " + "; ".join(errors[:5]))
        self._need_full_sync = False
        self.log.debug(
            "ipvs %s sync: %d service ports, %s",
            "full" if full else "partial",
            len(new),
            ", ".join(f"{k} {v * 1000:.1f}ms" for k, v in self.stats.timings.items()),
        )

    # -- full ------------------------------------------------------------------

    def _reconcile_full(
        self, desired: R.Desired, frags: dict[ServicePortName, R.Fragment], kernel_sets: dict[str, set[str]]
    ) -> tuple[list[str], dict]:
        errors: list[str] = []
        mark = _Marks()
        bound_before = self.addresses.addresses()
        kernel_vs = {vs.key: vs for vs in self.ipvs.services()}
        kernel_rs = self.ipvs.all_real_servers() if kernel_vs else {}

        ops: list[IPVSOp] = []
        for key, want in desired.services.items():
            ops += self._service_ops(want, kernel_vs.get(key), kernel_rs.get(key))
        # Stale virtual servers: ours, and not wanted any more.
        ours_ips = bound_before | kernel_sets.get(R.KUBE_IPVS_IPS, set())
        nodeport_ports = {
            "TCP": kernel_sets.get(R.KUBE_NODE_PORT_TCP, set()),
            "UDP": kernel_sets.get(R.KUBE_NODE_PORT_UDP, set()),
        }
        sctp = kernel_sets.get(R.KUBE_NODE_PORT_SCTP, set())
        for key, vs in kernel_vs.items():
            if key in desired.services or not self._is_ours(vs, ours_ips, nodeport_ports, sctp):
                continue
            ops.append(IPVSOp("del_service", vs))
            self._forget_draining(vs)
        mark("read")
        errors += self._apply_ipvs(ops)
        mark("ipvs")

        # Addresses: bind what is wanted, unbind the rest of ours.
        for addr, code in self.addresses.bind(sorted(desired.bind - bound_before)):
            errors.append(f"cannot bind {addr} to {self.addresses.device}: {_strerror(code)}")
        mark("bind")
        try:
            errors += self._restore_with_jumps(desired.iptables)
        except SyncError as exc:
            errors.append(str(exc))
        # What partial syncs compare against: the text without the jump lines.
        if self._applied_iptables:
            self._applied_iptables = desired.iptables
        for addr, code in self.addresses.unbind(sorted(bound_before - desired.bind)):
            errors.append(f"cannot unbind {addr} from {self.addresses.device}: {_strerror(code)}")
        mark("iptables")

        # ipsets: add before delete never matters for correctness here (rules reference sets, not members).
        for spec in R.IPSETS:
            want = desired.set_entries.get(spec.name, set())
            have = kernel_sets.get(spec.name, set())
            for entry, code in self.ipsets.add(spec.name, spec.set_type, sorted(want - have)):
                errors.append(f"cannot add {entry} to ipset {spec.name}: {_strerror(code)}")
            for entry, code in self.ipsets.delete(spec.name, spec.set_type, sorted(have - want)):
                errors.append(f"cannot delete {entry} from ipset {spec.name}: {_strerror(code)}")
        mark("ipsets")

        self._set_counts = R.count_entries(frags.values())
        self._bind_counts = Counter(a for f in frags.values() for a in f.bind)
        self._process_draining()
        self.stats.last_ops = len(ops)
        self._apply_marks = mark.spans
        return errors, {"services": len(desired.services), "real_servers": sum(len(d.real_servers) for d in desired.services.values())}

    def _is_ours(self, vs: VirtualServer, ours_ips: set[str], nodeport_ports: dict[str, set[str]], sctp: set[str]) -> bool:
        if not _is_family(vs.address, self.ip_family):
            return False
        ip = ipaddress.ip_address(vs.address)
        if any(ip in net for net in self.exclude_cidrs):
            return False
        if vs.address in ours_ips:
            return True
        if vs.address in self.render_config.node_addresses:
            if vs.protocol == "SCTP":
                return f"{vs.address},sctp:{vs.port}" in sctp
            return str(vs.port) in nodeport_ports.get(vs.protocol, set())
        return False

    # -- partial -----------------------------------------------------------------

    def _reconcile_partial(
        self, old: dict[ServicePortName, R.Fragment], new: dict[ServicePortName, R.Fragment], names: list[ServicePortName]
    ) -> tuple[list[str], dict]:
        errors: list[str] = []
        keys: dict[tuple, R.DesiredService | None] = {}
        for n in names:
            for k in old.get(n, R.Fragment()).services:
                keys.setdefault(k, None)
        for n in names:
            for k, d in new.get(n, R.Fragment()).services.items():
                keys[k] = d
        ops: list[IPVSOp] = []
        for key, want in keys.items():
            probe = want.vs if want is not None else _stub_vs(key)
            have = self.ipvs.get_service(probe)
            if want is not None:
                ops += self._service_ops(want, have)
            elif have is not None:
                ops.append(IPVSOp("del_service", have))
                self._forget_draining(have)
        errors += self._apply_ipvs(ops)

        # Reference-counted deltas for addresses and set entries.
        set_add: dict[str, set[str]] = {}
        set_del: dict[str, set[str]] = {}
        bind_add: set[str] = set()
        bind_del: set[str] = set()
        for n in names:
            of, nf = old.get(n), new.get(n)
            for set_name, entries in (of.set_entries.items() if of else ()):
                c = self._set_counts.setdefault(set_name, Counter())
                for e in entries:
                    c[e] -= 1
                    if c[e] <= 0:
                        del c[e]
                        set_del.setdefault(set_name, set()).add(e)
            for set_name, entries in (nf.set_entries.items() if nf else ()):
                c = self._set_counts.setdefault(set_name, Counter())
                for e in entries:
                    if c[e] == 0:
                        set_add.setdefault(set_name, set()).add(e)
                        set_del.get(set_name, set()).discard(e)
                    c[e] += 1
            for a in of.bind if of else ():
                self._bind_counts[a] -= 1
                if self._bind_counts[a] <= 0:
                    del self._bind_counts[a]
                    bind_del.add(a)
            for a in nf.bind if nf else ():
                if self._bind_counts[a] == 0:
                    bind_add.add(a)
                    bind_del.discard(a)
                self._bind_counts[a] += 1
        if bind_add:
            set_add.setdefault(R.KUBE_IPVS_IPS, set()).update(bind_add)
        if bind_del:
            set_del.setdefault(R.KUBE_IPVS_IPS, set()).update(bind_del)
        self._set_counts[R.KUBE_IPVS_IPS] = Counter(dict.fromkeys(self._bind_counts, 1))

        for addr, code in self.addresses.bind(sorted(bind_add)):
            errors.append(f"cannot bind {addr} to {self.addresses.device}: {_strerror(code)}")
        for set_name, entries in set_add.items():
            spec = R.IPSET_BY_NAME[set_name]
            for entry, code in self.ipsets.add(set_name, spec.set_type, sorted(entries)):
                errors.append(f"cannot add {entry} to ipset {set_name}: {_strerror(code)}")
        nonempty = {k: bool(v) for k, v in self._set_counts.items()}
        no_access = [x for f in new.values() for x in f.lb_no_node_access]
        errors += self._restore_iptables(R.render_iptables(nonempty, no_access, self.render_config), force=False)
        for addr, code in self.addresses.unbind(sorted(bind_del)):
            errors.append(f"cannot unbind {addr} from {self.addresses.device}: {_strerror(code)}")
        for set_name, entries in set_del.items():
            spec = R.IPSET_BY_NAME[set_name]
            for entry, code in self.ipsets.delete(set_name, spec.set_type, sorted(entries)):
                errors.append(f"cannot delete {entry} from ipset {set_name}: {_strerror(code)}")
        self._process_draining()
        self.stats.last_ops = len(ops)
        services = sum(len(f.services) for f in new.values())
        return errors, {"services": services, "real_servers": sum(len(d.real_servers) for f in new.values() for d in f.services.values())}

    # -- shared --------------------------------------------------------------------

    def _service_ops(
        self, want: R.DesiredService, have: VirtualServer | None, current_rs: list[RealServer] | None = None
    ) -> list[IPVSOp]:
        """Ops that turn the kernel's ``have`` (None: absent) into ``want``, including real servers."""
        vs = want.vs
        if have is None:
            self._forget_draining(vs)
            return [IPVSOp("add_service", vs)] + [IPVSOp("add_dest", vs, rs) for rs in want.real_servers]
        ops: list[IPVSOp] = []
        if not have.same_config(vs):
            ops.append(IPVSOp("set_service", vs))
        if current_rs is None:
            current_rs = self.ipvs.real_servers(vs)
        current = {rs.key: rs for rs in current_rs}
        wanted = {rs.key: rs for rs in want.real_servers}
        for key, rs in wanted.items():
            cur = current.get(key)
            self.draining.pop((vs.key, key), None)
            if cur is None:
                ops.append(IPVSOp("add_dest", vs, rs))
            elif cur.weight != rs.weight or cur.fwd_method != rs.fwd_method:
                ops.append(IPVSOp("set_dest", vs, rs))
        for key, cur in current.items():
            if key in wanted:
                continue
            ops += self._graceful_delete(vs, cur)
        return ops

    def _graceful_delete(self, vs: VirtualServer, rs: RealServer) -> list[IPVSOp]:
        dkey = (vs.key, rs.key)
        if dkey in self.draining:
            return []
        if vs.protocol == "UDP" or rs.active_conns + rs.inactive_conns == 0:
            if vs.protocol == "UDP":
                self._clear_udp_conntrack(vs, rs)
            return [IPVSOp("del_dest", vs, rs)]
        self.draining[dkey] = Draining(vs, replace(rs, weight=0), self.clock() + float(self.config.ipvs_graceful_termination_timeout))
        return [IPVSOp("set_dest", vs, replace(rs, weight=0))] if rs.weight != 0 else []

    def _clear_udp_conntrack(self, vs: VirtualServer, rs: RealServer) -> None:
        try:
            if vs.address in self.render_config.node_addresses:
                self.conntrack.clear_entries_for_port_nat(rs.address, vs.port, "udp")
            else:
                self.conntrack.clear_entries_for_nat(vs.address, rs.address, "udp")
        except Exception as exc:
            self.log.error("cannot clear conntrack entries of %s -> %s: %s", vs, rs, exc)

    def _forget_draining(self, vs: VirtualServer) -> None:
        for dkey in [k for k in self.draining if k[0] == vs.key]:
            del self.draining[dkey]

    def _process_draining(self) -> None:
        """Delete draining real servers whose connections are gone or whose time is up."""
        if not self.draining:
            return
        now = self.clock()
        ops = []
        by_vs: dict[tuple, list[Draining]] = {}
        for d in self.draining.values():
            by_vs.setdefault(d.vs.key, []).append(d)
        for items in by_vs.values():
            current = {rs.key: rs for rs in self.ipvs.real_servers(items[0].vs)}
            for d in items:
                cur = current.get(d.rs.key)
                dkey = (d.vs.key, d.rs.key)
                if cur is None:
                    del self.draining[dkey]
                elif cur.active_conns + cur.inactive_conns == 0 or now >= d.deadline:
                    if now >= d.deadline and cur.active_conns + cur.inactive_conns:
                        self.log.info("graceful termination of %s/%s timed out with %d connections", d.vs, d.rs, cur.active_conns)
                    ops.append(IPVSOp("del_dest", d.vs, d.rs))
                    del self.draining[dkey]
        for e in self._apply_ipvs(ops):
            self.log.error("graceful termination: %s", e)

    def _apply_ipvs(self, ops: list[IPVSOp]) -> list[str]:
        if not ops:
            return []
        out = []
        for f in self.ipvs.apply(ops):
            hint = ""
            if f.op.op in ("add_service", "set_service") and f.errno == 2:
                hint = f" (scheduler {f.op.vs.scheduler!r} not available: modprobe ip_vs_{f.op.vs.scheduler})"
            out.append(f"IPVS {f}{hint}")
        return out

    def _restore_iptables(self, text: str, force: bool, quiet: bool = False) -> list[str]:
        if not force and text == self._applied_iptables:
            return []
        from kubelab.modes.iptables.kernel import RestoreError, extract_lines

        try:
            self.iptables.restore_all(text)
        except RestoreError as exc:
            self._applied_iptables = ""
            if quiet:
                return [str(exc)]
            if self.metrics is not None:
                self.metrics.iptables_restore_failures_total.inc()
            detail = f"\n{extract_lines(text, exc.line)}" if exc.line else ""
            return [f"{exc}{detail}"]
        self._applied_iptables = text
        return []

    def process_graceful_termination(self) -> None:
        """One round of the graceful-termination check (what the background task runs)."""
        self._process_draining()
        if "draining" in self._gauges:
            self._gauges["draining"].set(len(self.draining))

    def _publish_metrics(self, frags: dict[ServicePortName, R.Fragment], stats: dict) -> None:
        g = self._gauges
        if "virtual_servers" in g:
            g["virtual_servers"].set(stats.get("services", 0))
            g["real_servers"].set(stats.get("real_servers", 0))
        if "draining" in g:
            g["draining"].set(len(self.draining))
        if self.metrics is not None and hasattr(self.metrics, "no_local_endpoints_total"):
            self.metrics.no_local_endpoints_total.labels(traffic_policy="internal").set(
                len({n.namespaced_name for n, f in frags.items() if f.no_local_internal})
            )
            self.metrics.no_local_endpoints_total.labels(traffic_policy="external").set(
                len({n.namespaced_name for n, f in frags.items() if f.no_local_external})
            )

    # ------------------------------------------------------------ health checks

    async def _sync_health(self, state: SyncState) -> None:
        if self._health is None:
            return
        ports = {n.namespaced_name: s.health_check_node_port for n, s in state.service_map.items() if s.health_check_node_port}
        local: dict[str, set[str]] = {}
        for name, eps in state.endpoints_map.items():
            for ep in eps:
                if ep.ready and ep.is_local:
                    local.setdefault(name.namespaced_name, set()).add(ep.ip)
        try:
            await self._health.sync_services(ports)
            self._health.sync_endpoints({k: len(v) for k, v in local.items()})
        except Exception as exc:
            self.log.error("error syncing healthcheck services: %s", exc)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start healthCheckNodePort servers and the graceful-termination checker."""
        if self._health is None:
            if self._health_factory is not None:
                self._health = self._health_factory()
            else:
                from kubelab.proxy.health import ServiceHealthServer

                ips = () if self.nodeport_addresses.match_all else self.render_config.nodeport_ips
                self._health = ServiceHealthServer(self.deps.node.name, ips, self._proxier_health)
        if self._graceful_task is None:
            self._graceful_task = asyncio.ensure_future(self._graceful_loop())

    async def stop(self) -> None:
        if self._graceful_task is not None:
            self._graceful_task.cancel()
            await asyncio.gather(self._graceful_task, return_exceptions=True)
            self._graceful_task = None
        if self._health is not None:
            await self._health.stop()
            self._health = None

    async def _graceful_loop(self) -> None:
        while True:
            await asyncio.sleep(self.graceful_check_interval)
            if not self.draining:
                continue
            async with self._lock:
                try:
                    await asyncio.to_thread(self.process_graceful_termination)
                except Exception as exc:
                    self.log.error("graceful termination check failed: %s", exc)

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Remove our virtual servers, kube-ipvs0, our iptables chains and ipsets; nothing else."""
        errors: list[str] = []
        try:
            ipvs = self.ipvs
        except (KernelError, OSError) as exc:
            ipvs = None
            self.log.info("no IPVS in this kernel (%s): nothing to remove there", exc)
        kernel_sets: dict[str, set[str]] = {}
        for spec in R.IPSETS:
            try:
                kernel_sets[spec.name] = self.ipsets.members(spec.name, spec.set_type)
            except (KernelError, OSError):
                kernel_sets[spec.name] = set()
        bound = self.addresses.addresses()
        try:
            node_addrs = self.addresses.all_addresses_except_device()
        except OSError:
            node_addrs = set()
        self.render_config = replace(self.render_config, node_addresses=frozenset(node_addrs))
        if ipvs is not None:
            ours_ips = bound | kernel_sets.get(R.KUBE_IPVS_IPS, set())
            ports = {"TCP": kernel_sets.get(R.KUBE_NODE_PORT_TCP, set()), "UDP": kernel_sets.get(R.KUBE_NODE_PORT_UDP, set())}
            ops = [
                IPVSOp("del_service", vs)
                for vs in ipvs.services()
                if self._is_ours(vs, ours_ips, ports, kernel_sets.get(R.KUBE_NODE_PORT_SCTP, set()))
            ]
            errors += self._apply_ipvs(ops)
            self.log.info("removed %d IPVS virtual servers", len(ops) - len(errors))
        try:
            if self.addresses.delete_device():
                self.log.info("removed %s", self.addresses.device)
        except Exception as exc:
            errors.append(f"cannot delete {self.addresses.device}: {exc}")
        errors += self._cleanup_iptables()
        for spec in R.IPSETS:
            try:
                self.ipsets.destroy(spec.name)
            except KernelError as exc:
                errors.append(str(exc))
        if errors:
            raise SyncError("cleanup incomplete: " + "; ".join(errors))

    def _cleanup_iptables(self) -> list[str]:
        """Delete our jumps and chains with one save and one restore per backend (no per-rule processes)."""
        from kubelab.modes.iptables.kernel import IPTables, RestoreError

        errors: list[str] = []
        backends = [self._iptables.backend] if self._iptables is not None else ([self._backend] if self._backend else ["nft", "legacy"])
        for backend in backends:
            ipt = self._iptables if self._iptables is not None else IPTables(self.run, backend, self.ip_family)
            rc, out, _ = self.run([f"iptables-{backend}-save"])
            if rc != 0:
                continue  # this backend is not usable here: nothing of ours can be in it
            table = ""
            rules: dict[str, list[str]] = {}
            chains: dict[str, set[str]] = {}
            for line in out.splitlines():
                if line.startswith("*"):
                    table = line[1:].strip()
                elif line.startswith(":"):
                    chains.setdefault(table, set()).add(line[1:].split(" ", 1)[0])
                elif line.startswith("-A "):
                    rules.setdefault(table, []).append(line[3:].strip())
            for table, ours in (("nat", R.NAT_CHAINS), ("filter", R.FILTER_CHAINS)):
                present = [c for c in ours if c in chains.get(table, set())]
                deletes = []
                for t, src, dst, comment in R.JUMP_CHAINS:
                    rule = f'{src} -m comment --comment "{comment}" -j {dst}'
                    if t == table:
                        deletes += [f"-D {rule}"] * rules.get(table, []).count(rule)
                if not present and not deletes:
                    continue
                text = "\n".join(
                    [f"*{table}", *(f":{c} - [0:0]" for c in present), *deletes, *(f"-X {c}" for c in present), "COMMIT", ""]
                )
                try:
                    ipt.restore_all(text)
                except RestoreError as exc:
                    errors.append(f"cannot remove our {table} chains ({backend}): {exc}")
        return errors

    def close(self) -> None:
        for adapter in (self._ipvs, self._addrs, self._ipsets):
            if adapter is not None and hasattr(adapter, "close"):
                adapter.close()


class _Marks:
    """Durations of the named steps of one sync, for ``Stats.timings`` (each call ends a step)."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.spans[name] = now - self._last
        self._last = now


def _jump_rule(comment: str, dst: str) -> str:
    return f'-m comment --comment "{comment}" -j {dst}'


def _is_family(ip: str, family: int) -> bool:
    try:
        return ipaddress.ip_address(ip).version == family
    except ValueError:
        return False


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _stub_vs(key: tuple[str, str, int]) -> VirtualServer:
    return VirtualServer(key[0], key[1], key[2])


def _strerror(code: int) -> str:
    import os

    return os.strerror(code)

