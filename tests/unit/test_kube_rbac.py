"""The ClusterRoles in deploy/ are the least rights that work.

The strict test API server enforces each role as RBAC would: with the full
role the source syncs everything (and the proxy records its node event);
without any one rule, some request the source needs is refused (403).

Addresses: the test API server on 127.0.0.1; objects carry 10.96.0.0/16,
10.244.0.0/16 and 192.0.2.0/24 addresses (data only).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from fakeapi import FakeAPIServer
from fakeapi.testing import FAST, Recorder, endpoint_slice, endpoints, node, pod, running, service, write_kubeconfig

from kubelab.proxy.sources import kube

pytestmark = pytest.mark.timeout(120)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

ROLES = {
    # role name: (purpose, service account user)
    "kubelab-proxy": ("proxy", "system:serviceaccount:kube-system:kubelab-proxy"),
    "kubelab-dns": ("dns", "system:serviceaccount:kube-system:kubelab-dns"),
}


def cluster_role(name: str) -> list[dict]:
    for path in DEPLOY.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == name:
                return doc["rules"]
    raise AssertionError(f"no ClusterRole {name} in {DEPLOY}")


async def attempt(tmp_path: Path, role: str, rules: list[dict], slices_served: bool) -> tuple[bool, list[str]]:
    """Run the source with ``rules``; return (everything worked, refused requests)."""
    purpose, user = ROLES[role]
    async with FakeAPIServer(tokens={"tok": user}, rbac={user: rules}, endpoint_slices=slices_served) as api:
        api.apply_all([service("web", "10.96.0.10"), node("node-a"), pod("web-0", "10.244.0.5"),
                       endpoints("web", ["10.244.0.5"])])
        if slices_served:
            api.apply(endpoint_slice("web-1", "web", ["10.244.0.5"]))
        kc = write_kubeconfig(tmp_path / f"kc-{role}", api.url, user={"token": "tok"})
        make = kube.KubeSourceConfig.for_dns if purpose == "dns" else kube.KubeSourceConfig.for_proxy
        cfg = make(kubeconfig=str(kc), node_name="node-a" if purpose == "proxy" else "", **FAST)
        src = kube.KubeSource(cfg, [Recorder()])
        event_expected = purpose == "proxy"
        async with running(src):
            await api.wait_for(
                lambda: any(r.status == 403 for r in api.requests)
                or (src.synced and (not event_expected or api.created)),
                what="sync or a refusal")
        refused = sorted({f"{r.op} {r.path}" for r in api.requests if r.status == 403})
        return src.synced and (not event_expected or bool(api.created)) and not refused, refused


@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize("slices_served", [True, False], ids=["endpointslices", "endpoints-fallback"])
def test_full_role_works(tmp_path, role, slices_served):
    ok, refused = asyncio.run(attempt(tmp_path, role, cluster_role(role), slices_served))
    assert ok, refused


CASES = [(role, i) for role in sorted(ROLES) for i in range(len(cluster_role(role)))]


@pytest.mark.parametrize("role,drop", CASES, ids=[f"{r}-without-rule-{i}" for r, i in CASES])
def test_every_rule_is_needed(tmp_path, role, drop):
    rules = cluster_role(role)
    fewer = rules[:drop] + rules[drop + 1:]

    async def both():
        return [await attempt(tmp_path, role, fewer, served) for served in (True, False)]

    results = asyncio.run(both())
    assert not all(ok for ok, _ in results), f"rule {rules[drop]} of {role} is not needed by anything"
    assert any(refused for _, refused in results)
