"""``kubelab dns --kubeconfig`` against the test API server, asked with dig.

The DNS view of the API source: every Service, headless ones included
(kube-proxy's selectors would hide them), and their EndpointSlices.

Addresses: the test API server and kubelab dns on 127.0.0.1 (ephemeral
ports); records carry 10.96.0.0/16 (cluster IPs) and 10.244.0.0/16
(endpoints) -- data only, never contacted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakeapi import FakeAPIServer
from fakeapi.testing import endpoint_slice, service, write_kubeconfig

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def dig(port: int, name: str, qtype: str = "A") -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "dig", "+short", "+tries=1", "+time=2", "-p", str(port), "@127.0.0.1", name, qtype,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = await proc.communicate()
    return sorted(out.decode().split())


def test_dns_sees_headless_services_through_the_api(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([
                service("web", "10.96.0.50"),
                service("db", "None"),  # headless: no cluster IP (its slices carry the headless label)
                endpoint_slice("db-1", "db", ["10.244.0.7", "10.244.0.8"], labels={"service.kubernetes.io/headless": ""}),
            ])
            # The kubeconfig's current context names a dead server; --context picks the live one.
            kc = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9", extra_contexts=[("live", api.url, {})])
            port = free_port()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
            log = open(tmp_path / "dns.log", "w")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubelab", "dns", "--kubeconfig", str(kc), "--context", "live", "--listen", f"127.0.0.1:{port}",
                "--metrics-bind-address", "", "--health-bind-address", "", "--upstream", "127.0.0.1:9",
                stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                async def answers(name, want):
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 60
                    while (got := await dig(port, name)) != want:
                        if loop.time() > deadline or proc.returncode is not None:
                            raise AssertionError(f"{name}: {got} != {want}; log: {(tmp_path / 'dns.log').read_text()[-2000:]}")
                        await asyncio.sleep(0.2)

                await answers("web.default.svc.cluster.local.", ["10.96.0.50"])
                await answers("db.default.svc.cluster.local.", ["10.244.0.7", "10.244.0.8"])
                # A change on the API server reaches the answers through the watch.
                api.apply(endpoint_slice("db-1", "db", ["10.244.0.9"], labels={"service.kubernetes.io/headless": ""}))
                await answers("db.default.svc.cluster.local.", ["10.244.0.9"])
                api.delete("Service", "default", "web")
                await answers("web.default.svc.cluster.local.", [])
                assert {(r.query.get("labelSelector"), r.query.get("fieldSelector"))
                        for r in api.requests_for(path="/services")} == {(None, None)}
                assert {r.query.get("labelSelector") for r in api.requests_for(path="/endpointslices")} == {None}
            finally:
                proc.terminate()
                await proc.wait()
                log.close()

    asyncio.run(asyncio.wait_for(main(), 100))
