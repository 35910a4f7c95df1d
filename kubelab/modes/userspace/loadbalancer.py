"""The userspace mode's load balancer: round-robin with ClientIP affinity.

This is kube-proxy's ``LoadBalancerRR`` (pkg/proxy/userspace/roundrobin.go,
removed in v1.26), no I/O and an injectable clock:

* per service port a shuffled endpoint list and a round-robin index that
  resets whenever the endpoint *set* changes;
* ``sessionAffinity: ClientIP`` keeps a client IP on the endpoint it was
  last given until ``timeoutSeconds`` pass without use (0 means kube-proxy's
  default of 10800 s); a retry after a failed dial asks with
  ``reset_affinity=True`` and moves the client on;
* affinity records of endpoints that went away are dropped.

And one thing the original lacked: endpoints whose dial just failed are put
*in quarantine* for a short while, so the next connections go first to
endpoints that answer instead of each paying the dial timeout again (when
every endpoint is in quarantine they are used anyway: a quarantine never
turns a working service off).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kubelab.model import DEFAULT_CLIENT_IP_TIMEOUT, ServicePortName


class NoEndpointsError(LookupError):
    """The service port is unknown or has no usable endpoint."""


@dataclass
class _Affinity:
    endpoint: str
    last_used: float


@dataclass
class _Balancer:
    """What the load balancer keeps for one service port."""

    endpoints: list[str] = field(default_factory=list)
    index: int = 0
    client_ip_affinity: bool = False
    ttl: float = float(DEFAULT_CLIENT_IP_TIMEOUT)
    affinity: dict[str, _Affinity] = field(default_factory=dict)  # client IP -> endpoint
    quarantine: dict[str, float] = field(default_factory=dict)  # endpoint -> until (clock)


class LoadBalancerRR:
    """Round-robin over each service port's endpoints, with ClientIP affinity.

    Endpoints are ``"ip:port"`` strings (IPv6 bracketed), as kube-proxy's.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        shuffle: Callable[[list[str]], None] = random.shuffle,
        quarantine_seconds: float = 5.0,
    ):
        self._clock = clock
        self._shuffle = shuffle
        self._quarantine_seconds = quarantine_seconds
        self._services: dict[ServicePortName, _Balancer] = {}

    # -- configuration ----------------------------------------------------

    def new_service(self, svc: ServicePortName, session_affinity: str = "None", ttl_seconds: int = 0) -> None:
        """Create (or re-configure) a service port; endpoints are kept."""
        state = self._services.setdefault(svc, _Balancer())
        state.client_ip_affinity = session_affinity == "ClientIP"
        # As kube-proxy: 0 means the API default (3 hours).
        state.ttl = float(ttl_seconds or DEFAULT_CLIENT_IP_TIMEOUT)
        if not state.client_ip_affinity:
            state.affinity.clear()

    def delete_service(self, svc: ServicePortName) -> None:
        self._services.pop(svc, None)

    def set_endpoints(self, svc: ServicePortName, endpoints: Iterable[str]) -> bool:
        """Replace a service port's endpoints; returns whether the set changed.

        As kube-proxy, an unchanged set keeps the order and the round-robin
        position; a changed set is reshuffled, the index reset, and affinity
        records pointing at endpoints that left are dropped.
        """
        new = list(dict.fromkeys(endpoints))
        state = self._services.setdefault(svc, _Balancer())
        if sorted(new) == sorted(state.endpoints):
            return False
        keep = set(new)
        state.affinity = {ip: a for ip, a in state.affinity.items() if a.endpoint in keep}
        state.quarantine = {ep: t for ep, t in state.quarantine.items() if ep in keep}
        self._shuffle(new)
        state.endpoints = new
        state.index = 0
        return True

    def services(self) -> list[ServicePortName]:
        return list(self._services)

    def endpoints(self, svc: ServicePortName) -> list[str]:
        state = self._services.get(svc)
        return list(state.endpoints) if state else []

    def has_endpoints(self, svc: ServicePortName) -> bool:
        state = self._services.get(svc)
        return bool(state and state.endpoints)

    # -- choosing ----------------------------------------------------------

    def next_endpoint(
        self,
        svc: ServicePortName,
        client_ip: str,
        reset_affinity: bool = False,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> str:
        """The endpoint a new connection (or UDP session) from ``client_ip`` goes to.

        ``reset_affinity`` is set on retries after a failed dial (kube-proxy's
        sessionAffinityReset).  ``exclude`` names endpoints this connection
        already tried; they are chosen again only when nothing else is left.
        Raises :class:`NoEndpointsError` when there is no endpoint at all.
        """
        state = self._services.get(svc)
        if state is None or not state.endpoints:
            raise NoEndpointsError(f"service {svc} has no endpoints")
        now = self._clock()
        if state.client_ip_affinity and not reset_affinity:
            aff = state.affinity.get(client_ip)
            if aff is not None and now - aff.last_used < state.ttl and aff.endpoint not in exclude:
                aff.last_used = now
                return aff.endpoint
        endpoint = self._round_robin(state, now, exclude)
        if state.client_ip_affinity:
            state.affinity[client_ip] = _Affinity(endpoint, now)
        return endpoint

    def _round_robin(self, state: _Balancer, now: float, exclude: frozenset[str] | set[str]) -> str:
        eps = state.endpoints
        n = len(eps)
        fallback = None
        for step in range(n):
            i = (state.index + step) % n
            ep = eps[i]
            if ep in exclude:
                continue
            until = state.quarantine.get(ep)
            if until is not None:
                if until > now:
                    if fallback is None:
                        fallback = i
                    continue
                del state.quarantine[ep]
            state.index = (i + 1) % n
            return ep
        # Everything left is excluded or in quarantine: plain round-robin
        # among what was not tried, else among all.
        i = fallback if fallback is not None else state.index
        state.index = (i + 1) % n
        return eps[i]

    def report_dial_failure(self, svc: ServicePortName, endpoint: str) -> None:
        """A dial to ``endpoint`` was refused or timed out: prefer others for a while."""
        state = self._services.get(svc)
        if state is not None and endpoint in state.endpoints and self._quarantine_seconds > 0:
            state.quarantine[endpoint] = self._clock() + self._quarantine_seconds

    def cleanup_stale_sticky_sessions(self) -> int:
        """Drop affinity records idle longer than their TTL; returns how many."""
        now = self._clock()
        dropped = 0
        for state in self._services.values():
            stale = [ip for ip, a in state.affinity.items() if now - a.last_used >= state.ttl]
            for ip in stale:
                del state.affinity[ip]
            dropped += len(stale)
        return dropped

    def affinity_of(self, svc: ServicePortName, client_ip: str) -> str | None:
        """The endpoint ``client_ip`` is stuck to, if any (for tests and --dry-run)."""
        state = self._services.get(svc)
        aff = state.affinity.get(client_ip) if state else None
        return aff.endpoint if aff else None
