"""Run the userspace dataplane alone, driven by JSON lines on stdin.

For kernel tests, benchmarks and experiments that want the real proxier
(listeners, relays, iptables rules) without the controller and a source:
each input line is one request, each output line its JSON answer.

    {"cmd": "sync", "services": [SERVICE, ...], "full_sync": true}
        -> {"ok": true, "ports": {"ns/name:port": listener_port, ...}}
    {"cmd": "stats"}    -> {"ok": true, "fds": N, "pool": N, "active": N, "stats": {...}}
    {"cmd": "cleanup"}  -> remove every rule and chain of the mode
    {"cmd": "quit"}     -> stop (rules stay, as ``stop()`` leaves them)

    SERVICE = {"name": "web", "namespace": "default", "port_name": "http",
               "protocol": "TCP", "cluster_ip": "10.96.0.20", "port": 80,
               "node_port": 30080, "external_ips": [...], "lb_ips": [...], "affinity": "ClientIP",
               "timeout": 60, "endpoints": ["10.244.0.2:8080", ...]}

``python3 -m kubelab.modes.userspace.standalone --node-ip 172.18.0.10
[--loop uvloop|asyncio] [--no-rules] [--grace 30] [--max-connections N]``.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import threading

from kubelab.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from kubelab.modes.userspace.proxier import UserspaceProxier
from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.provider import ModeDeps, SyncState


def build_state(req: dict, node: NodeInfo) -> SyncState:
    """A SyncState from the ``services`` of a sync request."""
    smap: dict[ServicePortName, ServicePort] = {}
    emap: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for s in req.get("services", []):
        proto = s.get("protocol", "TCP")
        name = ServicePortName(s.get("namespace", "default"), s["name"], s.get("port_name", ""), proto)
        smap[name] = ServicePort(
            cluster_ip=s["cluster_ip"],
            port=int(s["port"]),
            protocol=proto,
            node_port=int(s.get("node_port", 0)),
            external_ips=tuple(s.get("external_ips", ())),
            load_balancer_vips=tuple(s.get("lb_ips", ())),
            session_affinity=s.get("affinity", "None"),
            sticky_max_age_seconds=int(s.get("timeout", 0)),
        )
        eps = []
        for e in s.get("endpoints", []):
            ip, _, port = e.rpartition(":")
            eps.append(Endpoint(ip.strip("[]"), int(port)))
        emap[name] = tuple(eps)
    return SyncState(service_map=smap, endpoints_map=emap, node=node, full_sync=bool(req.get("full_sync", True)))


def _no_iptables(argv, input=None, timeout=None):
    """A runner that pretends every iptables command worked (``--no-rules``)."""
    if argv and "iptables" in argv[0]:
        return 0, "", ""
    from kubelab.proxy.kernel.exec import Runner

    return Runner()(argv, input=input, timeout=timeout)


async def serve(args: argparse.Namespace) -> None:
    node = NodeInfo(args.node_name, ips=tuple(args.node_ip))
    deps = ModeDeps(
        config=ProxyConfig(
            proxy_mode="userspace",
            udp_idle_timeout=args.udp_timeout,
            userspace_max_connections=args.max_connections,
        ),
        node=node,
        logger=logging.getLogger("kubelab.userspace"),
        run=_no_iptables if args.no_rules else None,
        extra={"userspace_endpoint_grace_period": args.grace, "iptables": args.iptables},
    )
    proxier = UserspaceProxier(deps)
    await proxier.start()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, '{"cmd": "quit"}')

    threading.Thread(target=reader, daemon=True).start()
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
    while True:
        line = (await queue.get()).strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "sync":
                await proxier.sync_proxy_rules(build_state(req, node))
                resp = {"ok": True, "ports": {str(n): p.port for n, p in proxier.ports.items()}}
            elif cmd == "stats":
                relay = proxier.relay
                resp = {
                    "ok": True,
                    "fds": len(os.listdir("/proc/self/fd")),
                    "pool": len(relay.pipes._free) if relay else 0,
                    "active": relay.active if relay else 0,
                    "udp_sessions": sum(len(p.sessions) for p in relay.udp_ports) if relay else 0,
                    "stats": dataclasses.asdict(relay.stats) if relay else {},
                }
            elif cmd == "cleanup":
                proxier.cleanup()
                resp = {"ok": True}
            elif cmd == "quit":
                await proxier.stop()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                resp = {"ok": False, "error": f"unknown cmd {cmd!r}: use sync, stats, cleanup or quit"}
        except Exception as e:  # noqa: BLE001 - report every failure to the driver of this process
            resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(resp), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-name", default="node1")
    ap.add_argument("--node-ip", action="append", default=[], help="node address (repeatable); host traffic is DNAT-ed to the first")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--no-rules", action="store_true", help="write no iptables rules (connect to the listeners directly)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds before connections to removed endpoints close")
    ap.add_argument("--udp-timeout", type=float, default=0.25, help="UDP session idle timeout, seconds")
    ap.add_argument("--max-connections", type=int, default=10000)
    ap.add_argument("--iptables", default="", help="iptables command (e.g. iptables-legacy); default: detect the backend")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
