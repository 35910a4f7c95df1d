"""``kubelab dns``: the cluster DNS responder, like CoreDNS with its kubernetes plugin."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from kubelab.dns.answer import POD_MODES, Settings
from kubelab.dns.forward import Cache, Forwarder, parse_hostport, resolv_conf_nameservers
from kubelab.dns.server import DEFAULT_RECURSION_CIDRS, ClusterDNS, DNSConfig, DNSServer

DESCRIPTION = """\
Serve the Kubernetes DNS records (kubernetes/dns docs/specification.md) for
the Services, EndpointSlices and Pods of a source, answering exactly as
CoreDNS's kubernetes plugin does: A/AAAA for cluster IPs, headless endpoint
IPs and <hostname>.<svc>.<ns>.svc.<zone>, SRV for named ports, PTR for cluster
IPs and endpoints, ExternalName as CNAME, pod records a-b-c-d.<ns>.pod.<zone>,
dns-version.<zone> TXT; NXDOMAIN/NODATA with the zone's SOA; SERVFAIL until
Services and EndpointSlices had their initial sync.  Other names are
forwarded to --upstream with a cache.  UDP and TCP on the same port.
"""

EPILOG = """\
recursion (forwarding names outside the cluster zone) is served only to
clients inside --cluster-cidr (plus loopback); other clients get REFUSED for
such names, as CoreDNS's acl plugin would answer them.  Cluster names are
answered to every client.

examples:
  kubelab dns --source examples/basic --listen 127.0.0.1:5353
  kubelab dns --source manifests/ --listen 10.96.0.10:53 --pods verified --autopath \\
      --cluster-cidr 10.244.0.0/16 --upstream 1.1.1.1
  dig @127.0.0.1 -p 5353 web.default.svc.cluster.local
  curl -s 127.0.0.1:9153/metrics | grep coredns_dns_requests_total
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source")
    src.add_argument("--source", metavar="PATH", help="manifest file or folder (kubectl get -o yaml output), watched for changes")
    src.add_argument("--kubeconfig", metavar="FILE", help="watch a real API server instead of --source")
    src.add_argument("--in-cluster", action="store_true", help="inside a pod: watch the API server with the service account (token, CA, KUBERNETES_SERVICE_HOST/PORT)")
    src.add_argument("--context", metavar="NAME", help="the --kubeconfig context to use instead of its current one")
    src.add_argument("--master", metavar="URL", help="the API server's address, overriding the kubeconfig's (or alone, for a server without authentication)")
    srv = p.add_argument_group("serving")
    srv.add_argument("--listen", metavar="ADDR:PORT", action="append", help="address to serve UDP and TCP on (repeatable; default 0.0.0.0:53)")
    srv.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serving processes sharing the --listen ports with SO_REUSEPORT, UDP datagrams dealt to them at random (1-64, default 1). "
        "Each worker watches the source and keeps its own index and caches (N times the memory); /metrics and /health "
        "report the first worker only",
    )
    srv.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set on the processes --workers starts
    srv.add_argument("--cluster-domain", default="cluster.local", help="the cluster zone (default: cluster.local)")
    srv.add_argument("--ttl", type=int, default=5, help="TTL of cluster answers, 0-3600 seconds (default: 5, as CoreDNS)")
    srv.add_argument(
        "--pods",
        choices=POD_MODES,
        default="disabled",
        help="pod records a-b-c-d.<ns>.pod.<zone>: disabled (NXDOMAIN, CoreDNS's default), insecure (answer any IP-shaped name "
        "in an existing namespace), verified (only if a pod with that IP exists in that namespace)",
    )
    srv.add_argument("--endpoint-pod-names", action="store_true", help="name headless endpoints without a hostname after their pod (CoreDNS endpoint_pod_names), not a-b-c-d")
    srv.add_argument(
        "--autopath",
        action="store_true",
        help="resolve a pod's whole search path on the server in one round trip (CoreDNS autopath @kubernetes); needs --pods verified",
    )
    fwd = p.add_argument_group("forwarding")
    fwd.add_argument("--upstream", metavar="ADDR[:PORT]", action="append", help="upstream resolver for names outside the zone (repeatable; default: nameservers of --resolv-conf)")
    fwd.add_argument("--resolv-conf", default="/etc/resolv.conf", help="where the default upstreams and the autopath search list come from (default: /etc/resolv.conf)")
    fwd.add_argument(
        "--cluster-cidr",
        metavar="CIDR",
        action="append",
        help="clients allowed recursion (repeatable or comma-separated; loopback always). "
        f"Default: {', '.join(DEFAULT_RECURSION_CIDRS)}",
    )
    fwd.add_argument("--cache-ttl", type=int, default=30, help="longest time a forwarded answer is cached, seconds; 0 disables the cache (default: 30, as 'cache 30')")
    fwd.add_argument("--upstream-timeout", type=float, default=2.0, help="seconds to wait for one upstream before trying the next (default: 2)")
    obs = p.add_argument_group("observability")
    obs.add_argument("--metrics-bind-address", default="127.0.0.1:9153", help="serve Prometheus /metrics here (CoreDNS names); empty to disable (default: 127.0.0.1:9153)")
    obs.add_argument("--health-bind-address", default="127.0.0.1:8080", help="serve /health (alive) and /ready (200 once synced, else 503) here; empty to disable (default: 127.0.0.1:8080)")
    obs.add_argument("--v", type=int, default=0, metavar="N", help="log verbosity (0 info, 2+ debug)")


def _fail(msg: str) -> int:
    print(f"kubelab dns: {msg}", file=sys.stderr)
    return 2


def build_config(args: argparse.Namespace) -> DNSConfig:
    """Validate flags into a DNSConfig; ValueError says which flag and how to fix it."""
    zone = args.cluster_domain.strip().lower().rstrip(".") + "."
    if zone == "." or ".." in zone:
        raise ValueError(f"--cluster-domain {args.cluster_domain!r} is not a domain name (e.g. cluster.local)")
    if not 0 <= args.ttl <= 3600:
        raise ValueError(f"--ttl {args.ttl} is out of range: use 0-3600 (CoreDNS caps at 3600)")
    if args.autopath and args.pods != "verified":
        raise ValueError("--autopath needs --pods verified (CoreDNS autopath @kubernetes finds the client's namespace from its pod)")
    cidrs: list[str] = []
    for item in args.cluster_cidr or []:
        for c in item.split(","):
            c = c.strip()
            if not c:
                continue
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"--cluster-cidr {c!r} is not a CIDR (write e.g. 10.244.0.0/16)") from None
            cidrs.append(c)
    recursion = ("127.0.0.0/8", "::1/128", *cidrs) if cidrs else DEFAULT_RECURSION_CIDRS
    search: list[str] = []
    try:
        with open(args.resolv_conf, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("search", "domain"):
                    search = [s.rstrip(".").lower() + "." for s in parts[1:]]
    except FileNotFoundError:
        pass
    return DNSConfig(
        settings=Settings(zone=zone, ttl=args.ttl, pods=args.pods, endpoint_pod_names=args.endpoint_pod_names, local_ips=_local_ips(args)),
        recursion_cidrs=recursion,
        autopath=args.autopath,
        autopath_search=tuple(search),
    )


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one extra worker: the same flags, no HTTP, no workers of its own."""
    argv = [sys.executable, "-m", "kubelab", "dns", "--worker", "--workers", str(args.workers)]
    for flag, value in (("--source", args.source), ("--kubeconfig", args.kubeconfig), ("--context", args.context),
                        ("--master", args.master)):
        if value:
            argv += [flag, value]
    if args.in_cluster:
        argv.append("--in-cluster")
    for flag, values in (("--listen", args.listen), ("--upstream", args.upstream), ("--cluster-cidr", args.cluster_cidr)):
        for v in values or ():
            argv += [flag, v]
    argv += ["--cluster-domain", args.cluster_domain, "--ttl", str(args.ttl), "--pods", args.pods, "--resolv-conf", args.resolv_conf,
             "--cache-ttl", str(args.cache_ttl), "--upstream-timeout", str(args.upstream_timeout), "--v", str(args.v),
             "--metrics-bind-address", "", "--health-bind-address", ""]
    if args.endpoint_pod_names:
        argv.append("--endpoint-pod-names")
    if args.autopath:
        argv.append("--autopath")
    return argv


def _die_with_parent() -> None:
    """In a worker, before exec: SIGTERM when the first worker exits, however it exits (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _listen(args) -> list[tuple[str, int]]:
    return [parse_hostport(x, 53) for x in (args.listen or ["0.0.0.0:53"])]


def _local_ips(args) -> tuple[str, ...]:
    """This server's addresses for NS answers (CoreDNS boundIPs): the listen IPs, else every interface address; never loopback."""
    ips: list[str] = []
    for host, _ in _listen(args):
        a = ipaddress.ip_address(host)
        if a.is_unspecified:
            ips.extend(_interface_ips())
        elif not a.is_loopback:
            ips.append(host)
    return tuple(dict.fromkeys(ips))


def _interface_ips() -> list[str]:
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            out = []
            for msg in ipr.get_addr():
                a = msg.get_attr("IFA_ADDRESS")
                if a and not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local:
                    out.append(a)
            return out
    except Exception:  # noqa: BLE001 - NS answers are a nicety; never fail startup over them
        return []


def _make_source(args, provider, log):
    if args.source:
        try:
            from kubelab.proxy.sources.files import FilesSource
        except ImportError as e:
            raise ValueError(f"--source needs kubelab.proxy.sources.files, which is not available: {e}") from None
        return FilesSource(args.source, provider, log)
    try:
        from kubelab.proxy.sources.kube import KubeSource, KubeSourceConfig
    except ImportError as e:
        raise ValueError(f"--kubeconfig needs kubelab.proxy.sources.kube, which is not available: {e}") from None
    # Pods are watched only when answers need them (CoreDNS: pods verified / autopath).
    need_pods = args.pods == "verified" or args.autopath
    return KubeSource(KubeSourceConfig.for_dns(kubeconfig=args.kubeconfig, in_cluster=args.in_cluster, pods=need_pods,
                                               context=args.context, master=args.master), [provider], log)


async def _http(bind: str, dns: ClusterDNS, registry, log):
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    host, port = parse_hostport(bind, 0)

    async def health(_req):
        return web.Response(text="OK")

    async def ready(_req):
        if dns.ready:
            return web.Response(text="OK")
        return web.Response(status=503, text="kubernetes\n")

    async def metrics(_req):
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("http: /health /ready /metrics on %s", bind)
    return runner


async def serve(args: argparse.Namespace, log: logging.Logger) -> int:
    from kubelab.dns.metrics import make_registry

    try:
        if not 1 <= args.workers <= 64:
            raise ValueError(f"--workers {args.workers} is out of range: use 1-64")
        config = build_config(args)
        listen = _listen(args)
        ups_text = args.upstream or resolv_conf_nameservers(args.resolv_conf)
        upstreams = [parse_hostport(u, 53) for u in ups_text]
    except ValueError as e:
        return _fail(str(e))
    # Never forward to ourselves (a node resolv.conf naming this very server).
    upstreams = [u for u in upstreams if u not in listen]
    forwarder = Forwarder(upstreams, timeout=args.upstream_timeout, cache=Cache(max_ttl=args.cache_ttl))
    dns = ClusterDNS(config, log, forwarder=forwarder)
    try:
        source = _make_source(args, dns, log)
    except ValueError as e:
        return _fail(str(e))
    many = args.workers > 1
    # The first worker attaches the program that spreads datagrams over the group.
    server = DNSServer(dns, listen, reuse_port=many, spread=args.workers if many and not args.worker else 0)
    src_task = None
    if args.worker:
        # An extra worker joins the group only once synced: the others already
        # answer, so its share of the queries must not get SERVFAIL meanwhile.
        src_task = asyncio.ensure_future(source.run())
        while not dns.ready and not src_task.done():
            await asyncio.sleep(0.05)
        if src_task.done():
            return 1 if src_task.exception() is not None else 0
    try:
        await server.start()
    except OSError as e:
        return _fail(f"cannot listen on {', '.join(f'{h}:{p}' for h, p in listen)}: {e.strerror or e} (pick a free port with --listen ADDR:PORT; port 53 needs root)")
    log.info("serving %s on %s (udp+tcp); upstreams %s", config.settings.zone, ", ".join(f"{h}:{p}" for h, p in server.addresses), upstreams or "none")
    runners = []
    registry = make_registry(dns.counters, forwarder, lambda: dns.ready, dns.fold_counts)
    try:
        for bind in dict.fromkeys(b for b in (args.metrics_bind_address, args.health_bind_address) if b):
            runners.append(await _http(bind, dns, registry, log))
    except (OSError, ValueError) as e:
        await server.stop()
        return _fail(f"cannot serve HTTP: {e} (change --metrics-bind-address / --health-bind-address)")
    workers: list = []
    if many and not args.worker:
        import subprocess

        for _ in range(args.workers - 1):
            workers.append(subprocess.Popen(_worker_argv(args), preexec_fn=_die_with_parent))  # noqa: PLW1509 - prctl only
        log.info("started %d more workers (pids %s)", len(workers), ", ".join(str(w.pid) for w in workers))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if src_task is None:
        src_task = asyncio.ensure_future(source.run())
    stop_task = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({src_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if src_task in done and src_task.exception() is not None:
        log.error("source failed: %s", src_task.exception())
        rc = 1
    elif src_task in done:
        await stop.wait()  # a one-shot source finished: keep serving until told to stop
    src_task.cancel()
    stop_task.cancel()
    for r in runners:
        await r.cleanup()
    await server.stop()
    forwarder.close()
    for w in workers:
        w.terminate()
    for w in workers:
        try:
            await asyncio.wait_for(asyncio.to_thread(w.wait), 10)
        except asyncio.TimeoutError:
            w.kill()
            w.wait()
    return rc


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.v >= 2 else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kubelab.dns")
    if not args.source and not args.kubeconfig and not args.in_cluster and not args.master:
        return _fail("give --source PATH (manifests) or --kubeconfig FILE / --in-cluster / --master URL (API server)")
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(args, log))
    except ImportError:
        return asyncio.run(serve(args, log))
