"""Deleting stale conntrack entries, as kube-proxy does for UDP services.

UDP has no connection teardown: after an endpoint goes away, conntrack keeps
DNATing a client's "flow" to the dead backend until the entry times out, so
the client is stuck.  kube-proxy deletes such entries after each sync
(``pkg/proxy/conntrack``); this is the same with the ``conntrack`` tool
(conntrack-tools), whose filters (``--orig-dst``, ``--dst-nat``, ``--dport``)
express exactly kube-proxy's four cases.  pyroute2's conntrack support has
no server-side filter for deletes, and dumping the whole table from Python
per sync costs more than one tool run per stale entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from kubelab.model import Endpoint, ServicePort, ServicePortName

RunFn = Callable[..., tuple[int, str, str]]
log = logging.getLogger("kubelab.proxy.kernel.conntrack")


class Conntrack:
    """kube-proxy's conntrack.Interface over ``conntrack -D``."""

    def __init__(self, run: RunFn) -> None:
        self._run = run
        self.deleted_calls: list[list[str]] = []  # what was asked (for logs and tests)

    def _delete(self, args: list[str], ip_family: int) -> int:
        argv = ["conntrack", "-D", *args]
        if ip_family == 6:
            argv += ["-f", "ipv6"]
        self.deleted_calls.append(argv)
        rc, out, err = self._run(argv)
        # conntrack exits 1 with "0 flow entries have been deleted" when nothing matched.
        text = f"{out}\n{err}"
        if rc != 0 and "0 flow entries" not in text:
            log.error("%s failed: %s", " ".join(argv), text.strip())
            return 0
        for line in text.splitlines():
            if "flow entries have been deleted" in line:
                try:
                    return int(line.split()[-6])
                except (ValueError, IndexError):
                    return 0
        return 0

    def clear_entries_for_ip(self, ip: str, protocol: str = "udp") -> int:
        """Flows whose original destination is ``ip`` (a service VIP that went away)."""
        return self._delete(["--orig-dst", ip, "-p", protocol.lower()], 6 if ":" in ip else 4)

    def clear_entries_for_port(self, port: int, ip_family: int = 4, protocol: str = "udp") -> int:
        """Flows to destination ``port`` (a NodePort)."""
        return self._delete(["-p", protocol.lower(), "--dport", str(port)], ip_family)

    def clear_entries_for_nat(self, origin: str, dest: str, protocol: str = "udp") -> int:
        """Flows to service IP ``origin`` that were DNATed to endpoint ``dest``."""
        return self._delete(["--orig-dst", origin, "--dst-nat", dest, "-p", protocol.lower()], 6 if ":" in origin else 4)

    def clear_entries_for_port_nat(self, dest: str, port: int, protocol: str = "udp") -> int:
        """Flows to NodePort ``port`` that were DNATed to endpoint ``dest``."""
        return self._delete(["-p", protocol.lower(), "--dport", str(port), "--dst-nat", dest], 6 if ":" in dest else 4)


def clean_stale_entries(
    ct: Conntrack,
    service_map: Mapping[ServicePortName, ServicePort],
    deleted_udp_cluster_ips: Iterable[str],
    deleted_udp_endpoints: Iterable[tuple[ServicePortName, Endpoint]],
    newly_active_udp_services: Iterable[ServicePortName],
    ip_family: int = 4,
) -> None:
    """kube-proxy's deleteStaleServiceConntrackEntries + deleteStaleEndpointConntrackEntries."""
    for ip in deleted_udp_cluster_ips:
        if (6 if ":" in ip else 4) == ip_family:
            ct.clear_entries_for_ip(ip, "udp")
    # A UDP service that had no endpoints got its traffic REJECTed; conntrack
    # may hold entries for those attempts that would keep failing.
    for name in newly_active_udp_services:
        svc = service_map.get(name)
        if svc is None:
            continue
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_vips):
            if ip and (6 if ":" in ip else 4) == ip_family:
                ct.clear_entries_for_ip(ip, "udp")
        if svc.node_port:
            ct.clear_entries_for_port(svc.node_port, ip_family, "udp")
    for name, ep in deleted_udp_endpoints:
        svc = service_map.get(name)
        if svc is None or ep.ip_family != ip_family:
            continue
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_vips):
            if ip:
                ct.clear_entries_for_nat(ip, ep.ip, "udp")
        if svc.node_port:
            ct.clear_entries_for_port_nat(ep.ip, svc.node_port, "udp")
