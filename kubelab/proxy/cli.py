"""``kubelab proxy``: the service proxy, with kube-proxy's flags.

Wiring only: configuration (flags over ``--config FILE``), node facts from the
kernel, the mode from :func:`kubelab.modes.make_mode`, a source (manifest
files, or an API server), the shared :class:`~kubelab.proxy.controller.ProxyController`,
and the health and metrics servers.  Everything runs on one asyncio loop
(uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from kubelab.model import NodeInfo
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.configfile import ConfigError, load_config_file, merge_flags, parse_duration

DESCRIPTION = """\
Run the service proxy, like kube-proxy: watch Services and EndpointSlices and
program this node so that traffic to cluster IPs, NodePorts, external IPs and
load-balancer IPs reaches the service's endpoints.

Modes (--proxy-mode): iptables (kube-proxy's NAT chains, programmed with one
atomic iptables-restore), ipvs (IPVS virtual servers over netlink, plus ipsets
and a few iptables rules), userspace (asyncio TCP/UDP relays).

Objects come from --source PATH (a manifest file or a folder of them, exactly
as `kubectl get -o yaml` prints them; the folder is watched: edits, new and
deleted files become syncs within --min-sync-period) or from an API server
(--kubeconfig / --in-cluster).  Nothing is programmed until both Services and
EndpointSlices have been read once.

--dry-run prints what the mode would program (iptables-restore text, IPVS
virtual servers and ipset members, userspace listeners) and touches nothing.
"""

EPILOG = """\
examples:
  # what iptables mode would program for the example manifests, then exit
  kubelab proxy --proxy-mode iptables --source examples/basic --dry-run

  # print it again after every change to the folder
  kubelab proxy --proxy-mode iptables --source examples/basic --dry-run --watch

  # program this node (root), NodePorts only on 192.0.2.0/24 addresses
  kubelab proxy --proxy-mode ipvs --source examples/basic \\
      --cluster-cidr 10.244.0.0/16 --nodeport-addresses 192.0.2.0/24

  # a kube-proxy ConfigMap's config.conf; flags given here override it
  kubelab proxy --config kube-proxy-config.yaml --source examples/basic

  # remove every rule, set and virtual server this mode created, and nothing else
  kubelab proxy --proxy-mode iptables --cleanup

endpoints:
  http://127.0.0.1:10249/metrics   Prometheus metrics, kube-proxy's names (--metrics-bind-address)
  http://0.0.0.0:10256/healthz     kube-proxy's health JSON; 503 when a queued
                                   sync is 2 x --sync-period late (--healthz-bind-address)
"""

log = logging.getLogger("kubelab.proxy")


def _go_bool(text: str) -> bool:
    """Go's strconv.ParseBool, for kube-proxy style ``--flag=false``."""
    value = text.strip().lower()
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _cidrs(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if items == ("primary",):
        return items
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a CIDR: give comma-separated IP blocks such as 192.0.2.0/24,2001:db8::/64, or 'primary'"
            ) from None
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """kube-proxy's flags.  Every default is None so that only given flags override --config."""
    from kubelab.modes import MODES

    src = parser.add_argument_group("where objects come from")
    src.add_argument("--source", metavar="PATH", help="manifest file or folder to read and watch (YAML/JSON, multi-document, kind: List)")
    src.add_argument("--kubeconfig", metavar="FILE", help="read Services/EndpointSlices/Nodes from the API server in this kubeconfig")
    src.add_argument("--in-cluster", action="store_true", help="use the pod's service account to reach the API server")
    src.add_argument("--master", metavar="URL", help="the API server's address, overriding the kubeconfig's")
    src.add_argument("--context", metavar="NAME", help="the kubeconfig context to use instead of the current one")

    mode = parser.add_argument_group("mode and node")
    mode.add_argument("--proxy-mode", choices=sorted(MODES), help="which proxy mode to run: iptables, ipvs or userspace (default iptables)")
    mode.add_argument("--config", metavar="FILE", help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1); flags given override it")
    mode.add_argument("--hostname-override", metavar="NAME", help="this node's name: endpoints whose nodeName matches are local (externalTrafficPolicy/internalTrafficPolicy Local, topology), and its Node object gives the zone (default: the host name, lower-cased)")
    mode.add_argument("--cluster-cidr", type=_cidrs, metavar="CIDR[,CIDR]", help="pod CIDR(s), one per IP family: traffic to a cluster IP from outside them is masqueraded (SNAT) so replies come back through this node (default: none, and no such rule, as kube-proxy)")
    mode.add_argument("--masquerade-all", type=_go_bool, nargs="?", const=True, metavar="BOOL", help="SNAT all traffic sent via service IPs, not only traffic from outside --cluster-cidr; --masquerade-all alone means true (default false)")
    mode.add_argument("--nodeport-addresses", type=_cidrs, metavar="CIDRS", help="NodePorts answer only on node IPs in these blocks (comma-separated, e.g. 192.0.2.0/24,2001:db8::/64), or 'primary' for the node's primary IP of each family (default: every local address)")
    mode.add_argument("--bind-address", metavar="IP", help="userspace mode: the IP its relays listen on (default 0.0.0.0, every address); the iptables and ipvs modes do not use it")
    mode.add_argument("--ipvs-scheduler", metavar="NAME", help="IPVS scheduler when --proxy-mode ipvs: rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, fo, ovf, mh (default rr); a Service overrides it with the annotation ipvs.kubelab.dev/scheduler (kubelab's; kube-proxy has none)")
    mode.add_argument("--ipvs-graceful-termination-timeout", type=_duration, metavar="DURATION", help="ipvs mode: a removed TCP real server drains with weight 0 until its connections are gone, at most this long (default 15m)")
    mode.add_argument("--ipvs-strict-arp", type=_go_bool, nargs="?", const=True, metavar="BOOL", help="ipvs mode: set arp_ignore=1/arp_announce=2 so the service IPs on the kube-ipvs0 dummy interface are not answered to ARP (default false)")
    mode.add_argument("--iptables-masquerade-bit", type=int, metavar="BIT", help="fwmark bit used to mark packets for SNAT (default 14)")
    mode.add_argument("--udp-timeout", type=_duration, metavar="DURATION", help="userspace mode: close a UDP session idle this long, e.g. 250ms, 2s (default 250ms, as kube-proxy)")
    mode.add_argument("--userspace-max-connections", type=int, metavar="N", help="userspace mode: relay at most N TCP connections at once; more wait in the listen backlog, and the log says so (default 10000)")

    sync = parser.add_argument_group("syncing")
    sync.add_argument("--min-sync-period", type=_duration, metavar="DURATION", help="rate limit: after a sync, wait this long before the next (two may run back to back, kube-proxy's burst), so a flurry of changes becomes one sync; Go duration, e.g. 1s, 500ms (default 1s)")
    sync.add_argument("--sync-period", type=_duration, metavar="DURATION", help="a full resync at least this often even without changes; also the cap of the retry back-off after a failed sync, and /healthz turns 503 when a queued sync is 2 x this late; e.g. 30s, 1m0s (default 30s)")
    sync.add_argument("--dry-run", action="store_true", help="print what the mode would program after the initial sync, touch nothing, exit")
    sync.add_argument("--watch", action="store_true", help="with --dry-run: keep watching and print again after every sync")
    sync.add_argument("--cleanup", action="store_true", help="remove everything this mode created, then exit")

    srv = parser.add_argument_group("servers and logs")
    srv.add_argument("--metrics-bind-address", metavar="IP:PORT", help="serve /metrics here (default 127.0.0.1:10249; '' disables)")
    srv.add_argument("--healthz-bind-address", metavar="IP:PORT", help="serve /healthz and /livez here (default 0.0.0.0:10256; '' disables)")
    srv.add_argument("--v", "-v", type=int, dest="verbosity", metavar="N", help="log verbosity: 0-3 one line per sync (what, how long) and every error; 4+ also debug lines and the traceback of an unexpected failure (default 0)")
    # A Dataplane class by import path, for tests and out-of-tree modes; never a mode-table entry.
    parser.add_argument("--mode-class", metavar="MODULE:CLASS", help=argparse.SUPPRESS)


def build_config(args: argparse.Namespace) -> ProxyConfig:
    """Defaults, then --config FILE, then every flag that was given."""
    base = ProxyConfig()
    if args.config:
        # The mode that will run picks the file's section (a --proxy-mode flag wins).
        base, _ = load_config_file(args.config, mode=args.proxy_mode)
    return merge_flags(
        base,
        {
            "proxy_mode": args.proxy_mode,
            "hostname_override": args.hostname_override,
            "cluster_cidr": args.cluster_cidr,
            "masquerade_all": args.masquerade_all,
            "nodeport_addresses": args.nodeport_addresses,
            "bind_address": args.bind_address,
            "metrics_bind_address": args.metrics_bind_address,
            "healthz_bind_address": args.healthz_bind_address,
            "ipvs_scheduler": args.ipvs_scheduler,
            "ipvs_strict_arp": args.ipvs_strict_arp,
            "ipvs_graceful_termination_timeout": getattr(args, "ipvs_graceful_termination_timeout", None),
            "masquerade_bit": args.iptables_masquerade_bit,
            "udp_idle_timeout": args.udp_timeout,
            "userspace_max_connections": args.userspace_max_connections,
            "min_sync_period": args.min_sync_period,
            "sync_period": args.sync_period,
            "verbosity": args.verbosity,
        },
    )


# ---------------------------------------------------------------- node facts


def node_name(config: ProxyConfig) -> str:
    """kube-proxy's node name: --hostname-override, else the host name, trimmed and lower-cased."""
    return (config.hostname_override or socket.gethostname()).strip().lower()


def kernel_addresses() -> list[str]:
    """Every IP address on this host's (this network namespace's) interfaces."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return [msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr() if msg.get_attr("IFA_ADDRESS")]
    except Exception as e:  # no netlink (unusual sandbox): ask iproute2 instead
        log.debug("pyroute2 could not list addresses (%s); using `ip -j addr`", e)
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", []) if a.get("local")]


def filter_node_ips(addresses: Iterable[str], nodeport_addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses NodePorts use: all, those inside the given CIDRs, or the primary one per family."""
    addrs = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    if not nodeport_addresses:
        chosen = addrs
    elif nodeport_addresses == ("primary",):
        # kube-proxy takes the Node object's primary IPs; without one, the
        # first global address of each family is the best stand-in.
        chosen = []
        for family in (4, 6):
            usable = [a for a in addrs if a.version == family and not a.is_loopback and not a.is_link_local]
            if usable:
                chosen.append(usable[0])
    else:
        nets = [ipaddress.ip_network(c, strict=False) for c in nodeport_addresses]
        chosen = [a for a in addrs if any(a.version == n.version and a in n for n in nets)]
    seen: dict[str, None] = {}
    for a in chosen:
        seen.setdefault(str(a), None)
    return tuple(seen)


# ---------------------------------------------------------------- running


class UsageError(Exception):
    """A problem with how kubelab proxy was invoked; the message says how to fix it."""


class SourceError(Exception):
    """The source of objects stopped with an error (e.g. an unusable kubeconfig)."""


def _load_dataplane(args: argparse.Namespace, config: ProxyConfig, deps: Any) -> Any:
    try:
        if args.mode_class:
            module_name, _, class_name = args.mode_class.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            return cls(deps)
        from kubelab.modes import make_mode

        return make_mode(config.proxy_mode, deps)
    except ImportError as e:
        raise UsageError(
            f"the {args.mode_class or config.proxy_mode} proxy mode is not available in this build ({e}); "
            "pick another --proxy-mode"
        ) from None


def _check_source_args(args: argparse.Namespace) -> None:
    api = args.kubeconfig or args.in_cluster or args.master
    if not (args.source or api):
        raise UsageError(
            "no source of objects: give --source PATH (a manifest file or folder), "
            "or --kubeconfig FILE / --in-cluster / --master URL for an API server"
        )
    if args.source and api:
        raise UsageError("give either --source PATH or --kubeconfig/--in-cluster/--master, not both")


def _make_source(args: argparse.Namespace, handlers: list, logger: logging.Logger, node_name: str) -> Any:
    if args.kubeconfig or args.in_cluster or args.master:
        try:
            kube = importlib.import_module("kubelab.proxy.sources.kube")
        except ImportError as e:
            raise UsageError(
                "the API server source (--kubeconfig/--in-cluster) is not available yet "
                f"in this build ({e}); use --source PATH with manifest files"
            ) from None
        config = kube.config_from_args(args, purpose="proxy", node_name=node_name)
        try:
            config.validate()
        except kube.KubeConfigError as e:
            raise UsageError(str(e)) from None
        return kube.KubeSource(config, handlers, logger)
    try:
        from kubelab.proxy.sources.files import FilesSource
    except ImportError as e:
        raise UsageError(f"the manifest files source is not available in this build ({e})") from None

    return FilesSource(args.source, handlers, logger)


def _setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 4 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s"))
    root = logging.getLogger("kubelab")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def serve(args: argparse.Namespace, config: ProxyConfig, node: NodeInfo) -> int:
    """Build everything, run until SIGTERM/SIGINT (or the one-shot dry run ends)."""
    from kubelab.proxy.controller import ProxyController
    from kubelab.proxy.health import MetricsServer, ProxierHealthServer
    from kubelab.proxy.metrics import ProxyMetrics
    from kubelab.proxy.provider import ModeDeps

    name, ips = node.name, node.ips
    metrics = ProxyMetrics()
    deps = ModeDeps(config=config, node=node, logger=log, metrics=metrics, dry_run=args.dry_run, out=sys.stdout)
    dataplane = _load_dataplane(args, config, deps)
    one_shot = args.dry_run and not args.watch
    health = None
    servers: list[Any] = []
    if not one_shot:
        if config.healthz_bind_address:
            health = ProxierHealthServer(config.healthz_bind_address, 2 * config.sync_period, metrics=metrics)
            servers.append(health)
        if config.metrics_bind_address:
            servers.append(MetricsServer(config.metrics_bind_address, metrics, config.proxy_mode, config))
    controller = ProxyController(deps, dataplane, health=health, watch=args.watch)
    source = _make_source(args, [controller], log, name)
    log.info(
        "kubelab proxy %s mode on node %s (node IPs %s), min-sync-period %gs, sync-period %gs%s",
        config.proxy_mode, name, ", ".join(ips) or "none", config.min_sync_period, config.sync_period,
        ", dry run" if args.dry_run else "",
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    started: list[Any] = []
    tasks: list[asyncio.Task] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        ctl_task = asyncio.ensure_future(controller.run())
        src_task = asyncio.ensure_future(source.run())
        stop_task = asyncio.ensure_future(stop.wait())
        tasks = [ctl_task, src_task, stop_task]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if src_task in done and src_task.exception() is not None:
            e = src_task.exception()
            raise SourceError(f"the source of objects failed: {type(e).__name__}: {e}") from e
        if ctl_task in done and ctl_task.exception() is not None:
            raise ctl_task.exception()  # type: ignore[misc]
        if src_task in done and not one_shot and not stop.is_set():
            # A source that returns has nothing more to say (a one-off file
            # read); keep serving what it gave until stopped.
            await asyncio.wait([ctl_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        return 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in reversed(started):
            await server.stop()


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop  # measured 1.6-1.8x stdlib asyncio for our relays and DNS (DESIGN.md)

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``kubelab proxy``."""
    try:
        config = build_config(args)
    except ConfigError as e:
        print(f"kubelab proxy: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(config.verbosity)
    if args.watch and not args.dry_run:
        print("kubelab proxy: error: --watch only makes sense with --dry-run", file=sys.stderr)
        return 2
    try:
        if args.cleanup:
            from kubelab.proxy.provider import ModeDeps

            deps = ModeDeps(config=config, node=NodeInfo(name=node_name(config)), logger=log)
            _load_dataplane(args, config, deps).cleanup()
            log.info("cleaned up %s mode state", config.proxy_mode)
            return 0
        _check_source_args(args)
        # Read the kernel's addresses before the event loop starts: pyroute2's
        # synchronous API runs a loop of its own.
        node = NodeInfo(name=node_name(config), ips=filter_node_ips(kernel_addresses(), config.nodeport_addresses))
        with _event_loop_runner() as runner:
            return runner.run(serve(args, config, node))
    except UsageError as e:
        print(f"kubelab proxy: error: {e}", file=sys.stderr)
        return 2
    except SourceError as e:
        print(f"kubelab proxy: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kubelab proxy: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an unusable mode: say what, keep the trace for --v=4
        log.debug("unexpected failure", exc_info=True)
        print(f"kubelab proxy: error: {type(e).__name__}: {e} (run with --v=4 for the traceback)", file=sys.stderr)
        return 1
