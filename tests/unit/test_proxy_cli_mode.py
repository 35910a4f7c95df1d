"""A Dataplane for exercising ``kubelab proxy`` end to end without root.

Loaded by the CLI through its hidden ``--mode-class`` flag (never through
``kubelab.modes.MODES``).  ``render`` prints one line per service port with
its cluster IP and sorted endpoints, so tests can read syncs off stdout.
Addresses: none of its own (it only formats what it is given).
"""

from __future__ import annotations

from kubelab.model import Endpoint, ServicePort, ServicePortName
from kubelab.proxy.provider import Dataplane, ModeDeps, SyncState


class EchoDataplane(Dataplane):
    """Renders service ports and endpoints as text; a real sync records the state."""

    name = "echo"

    def __init__(self, deps: ModeDeps) -> None:
        self.deps = deps
        self.synced: list[SyncState] = []

    async def sync_proxy_rules(self, state: SyncState) -> None:
        self.synced.append(state)

    def render(self, state: SyncState) -> str:
        lines = []
        for name in sorted(state.service_map):
            port = state.service_map[name]
            eps = " ".join(str(e) for e in state.endpoints_map.get(name, ()))
            lines.append(f"SVC {name} {port.cluster_ip}:{port.port}/{port.protocol} -> {eps or '(none)'}")
        return "\n".join(lines)

    def cleanup(self) -> None:
        print("ECHO cleanup")


def test_render_format():
    name = ServicePortName("default", "web", "http", "TCP")
    state = SyncState(
        service_map={name: ServicePort(cluster_ip="172.30.0.10", port=80)},
        endpoints_map={name: (Endpoint("10.244.1.1", 8080),)},
        node=None,  # type: ignore[arg-type]
    )
    assert EchoDataplane(None).render(state) == "SVC default/web:http 172.30.0.10:80/TCP -> 10.244.1.1:8080"  # type: ignore[arg-type]
