"""Model objects for DNS tests, demos and benchmarks (no I/O).

:func:`fixture_cluster` is a small cluster shaped like the one CoreDNS's
plugin/kubernetes handler tests use (ClusterIP, IPv6, dual-stack, headless
with and without hostnames and ports, ExternalName to outside and to a
service), written with our own objects; :func:`synthetic_cluster` makes
N services and M pods for memory and speed figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from kubelab.model import (
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    ObjectMeta,
    ObjectReference,
    Pod,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)


def svc(ns: str, name: str, ips: tuple[str, ...], ports=(("http", "TCP", 80),), *, type_: str = "ClusterIP", external_name: str = "") -> Service:
    return Service(
        meta=ObjectMeta(name=name, namespace=ns),
        type=type_,
        cluster_ips=ips,
        ports=tuple(ServicePortSpec(port=p, protocol=proto, name=n) for n, proto, p in ports),
        external_name=external_name,
    )


def eps(ns: str, service: str, addrs, ports=(("http", "TCP", 80),), *, name: str = "", address_type: str = "IPv4") -> EndpointSlice:
    """``addrs``: (ip, hostname or None, ready) tuples, or plain IPs."""
    endpoints = []
    for a in addrs:
        if isinstance(a, str):
            a = (a, None, True)
        ip, hostname, ready = a
        endpoints.append(
            SliceEndpoint(
                addresses=(ip,),
                conditions=EndpointConditions(ready=ready),
                hostname=hostname,
                target_ref=ObjectReference(kind="Pod", namespace=ns, name=f"{service}-{ip.replace('.', '-').replace(':', '-')}"),
            )
        )
    return EndpointSlice(
        meta=ObjectMeta(name=name or f"{service}-abc12", namespace=ns, labels={"kubernetes.io/service-name": service}),
        service_name=service,
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(EndpointPort(port=p, protocol=proto, name=n) for n, proto, p in ports),
    )


def pod(ns: str, name: str, ip: str, *, deleting: bool = False) -> Pod:
    return Pod(meta=ObjectMeta(name=name, namespace=ns, deletion_timestamp="2024-01-01T00:00:00Z" if deleting else None), pod_ips=(ip,) if ip else ())


def fixture_cluster() -> tuple[list[Service], list[EndpointSlice], list[Pod]]:
    """The table-test cluster (namespaces testns, kube-system, podns)."""
    services = [
        svc("kube-system", "kube-dns", ("10.0.0.10",), (("dns", "UDP", 53), ("dns-tcp", "TCP", 53), ("metrics", "TCP", 9153))),
        svc("testns", "svc1", ("10.0.0.1",)),
        svc("testns", "svcempty", ("10.0.0.2",)),
        svc("testns", "svc6", ("1234:abcd::1",)),
        svc("testns", "svc-dual-stack", ("10.0.0.3", "10::3")),
        svc("testns", "multiport", ("10.0.0.4",), (("http", "TCP", 80), ("https", "TCP", 443), ("dns", "UDP", 53), ("", "TCP", 8080))),
        svc("testns", "noports", ("10.0.0.5",), ()),
        svc("testns", "hdls1", ("None",)),
        svc("testns", "hdlsprtls", ("None",), ()),
        svc("testns", "hdlsempty", ("None",)),
        svc("testns", "external", (), type_="ExternalName", external_name="ext.interwebs.test"),
        svc("testns", "external-to-service", (), type_="ExternalName", external_name="svc1.testns.svc.cluster.local."),
        svc("testns", "external-ip", (), type_="ExternalName", external_name="192.0.2.1"),
    ]
    slices = [
        eps("kube-system", "kube-dns", ["172.0.0.100"], (("dns", "UDP", 53),)),
        eps("testns", "svc1", [("172.0.0.1", "ep1a", True)]),
        eps("testns", "svcempty", []),
        eps(
            "testns",
            "hdls1",
            [
                ("172.0.0.2", None, True),
                ("172.0.0.3", None, True),
                ("172.0.0.4", "dup-name", True),
                ("172.0.0.5", "dup-name", True),
                ("172.0.0.6", None, False),  # not ready: never served
            ],
        ),
        eps("testns", "hdls1", ["5678:abcd::1", "5678:abcd::2"], name="hdls1-v6", address_type="IPv6"),
        eps("testns", "hdlsprtls", ["172.0.0.20"], ()),
        eps("testns", "hdlsempty", [("172.0.0.30", None, False)]),
    ]
    pods = [
        pod("podns", "foo", "10.240.0.1"),
        pod("podns", "gone", "10.240.0.2", deleting=True),
        pod("testns", "client", "10.240.0.9"),
    ]
    return services, slices, pods


def feed(provider, services, slices, pods=(), *, sync: bool = True) -> None:
    """Send objects to a Provider as a source would (adds, then the synced signals)."""
    for s in services:
        provider.on_service_add(s)
    for s in slices:
        provider.on_endpoint_slice_add(s)
    for p in pods:
        provider.on_pod_add(p)
    if sync:
        provider.on_services_synced()
        provider.on_endpoint_slices_synced()
        provider.on_pods_synced()


def synthetic_cluster(n_services: int, n_pods: int, *, namespaces: int = 50) -> Iterator[Service | EndpointSlice | Pod]:
    """N ClusterIP services (one port each, 1 in 10 headless) and M pods spread over their endpoints."""
    per_svc = max(1, n_pods // max(1, n_services))
    pod_i = 0
    for i in range(n_services):
        ns = f"ns{i % namespaces}"
        name = f"svc{i}"
        headless = i % 10 == 0
        ip = "None" if headless else f"10.96.{i // 250}.{i % 250 + 1}"
        yield svc(ns, name, (ip,))
        addrs = []
        for _ in range(per_svc):
            if pod_i >= n_pods:
                break
            pip = f"10.{100 + pod_i // 65000}.{(pod_i // 250) % 260 % 256}.{pod_i % 250 + 1}"
            addrs.append(pip)
            yield pod(ns, f"{name}-{pod_i}", pip)
            pod_i += 1
        yield eps(ns, name, addrs)
    while pod_i < n_pods:
        yield pod("idle", f"p{pod_i}", f"10.200.{(pod_i // 250) % 256}.{pod_i % 250 + 1}")
        pod_i += 1


class ThreadedServer:
    """A :class:`~kubelab.dns.server.ClusterDNS` serving UDP+TCP from a background thread (tests, benchmarks).

    ``with ThreadedServer(config, objects, listen=[("127.0.0.1", 0)]) as s:``
    then ``s.port``; ``s.call(fn)`` runs ``fn(dns)`` on the server's loop
    (object events must be fed there, like a source would).
    """

    def __init__(
        self, config, services=(), slices=(), pods=(), *, listen=(("127.0.0.1", 0),), upstreams=(), sync: bool = True, logger=None, query_log=None,
        batched: bool | None = None,
    ) -> None:
        import logging

        self.query_log = query_log
        self.batched = batched
        self.config = config
        self.objects = (list(services), list(slices), list(pods))
        self.listen = list(listen)
        self.upstreams = list(upstreams)
        self.sync = sync
        self.log = logger or logging.getLogger("kubelab.dns.test")
        self.loop = None
        self.thread = None
        self.dns = None
        self.addresses: list[tuple[str, int]] = []

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def __enter__(self):
        import asyncio
        import threading

        import uvloop

        from kubelab.dns.forward import Forwarder
        from kubelab.dns.server import ClusterDNS, DNSServer

        self.loop = uvloop.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        async def start():
            self.dns = ClusterDNS(self.config, self.log, forwarder=Forwarder(self.upstreams, timeout=1.0), query_log=self.query_log)
            feed(self.dns, *self.objects, sync=self.sync)
            self.server = DNSServer(self.dns, self.listen, batched=self.batched)
            await self.server.start()
            self.addresses = self.server.addresses

        def main():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name="kubelab-dns-test", daemon=True)
        self.thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def call(self, fn):
        """Run ``fn(dns)`` on the server loop and return its result."""
        import asyncio

        async def run():
            return fn(self.dns)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def __exit__(self, *exc) -> None:
        import asyncio

        async def stop():
            await self.server.stop()
            self.dns.forwarder.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()
