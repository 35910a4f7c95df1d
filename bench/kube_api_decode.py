"""What the API client's model classes cost: listing N Services through kubernetes_asyncio.

    python3 bench/kube_api_decode.py [--services 10000 --runs 5]

Against the strict test API server (tests/fakeapi, in this process, on
127.0.0.1), the same unpaginated list request decoded three ways, run
alternately so machine noise hits each alike:

* ``models``: the generated call as documented -- the body deserialised into
  V1ServiceList / V1Service model objects (what kubernetes_asyncio's and the
  official ``kubernetes.aio``'s ``Watch`` helpers do for every event);
* ``json``: the same call with ``_preload_content=False`` and ``json.loads``
  (what kubelab.proxy.sources.kube does);
* ``json+parse``: plus ``kubelab.proxy.objects.parse_object`` on every item
  (the whole of kubelab's decode path).

Then the time for ``KubeSource`` to deliver N Services (pages of 500) and
signal synced.  Prints medians with min-max, and the ratio models / json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fakeapi import FakeAPIServer  # noqa: E402
from fakeapi.testing import Recorder, service, write_kubeconfig  # noqa: E402
from kubernetes_asyncio import client as kclient  # noqa: E402

from kubelab.model import Origin  # noqa: E402
from kubelab.proxy.objects import parse_object  # noqa: E402
from kubelab.proxy.sources import kube  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    n = args.services
    async with FakeAPIServer() as api:
        api.apply_all(service(f"svc-{i:05d}", f"10.96.{i // 250}.{i % 250 + 1}", ns=f"ns-{i % 7}") for i in range(n))
        conf = kclient.Configuration(host=api.url)
        times: dict[str, list[float]] = {"models": [], "json": [], "json+parse": [],
                                         "decode only: models": [], "decode only: json": [],
                                         "decode only: json+parse": [], "KubeSource sync": []}
        async with kclient.ApiClient(conf) as client:
            core = kclient.CoreV1Api(client)
            for _ in range(args.runs):
                t = time.perf_counter()
                lst = await core.list_service_for_all_namespaces()
                times["models"].append(time.perf_counter() - t)
                assert len(lst.items) == n
                for name in ("json", "json+parse"):
                    t = time.perf_counter()
                    resp = await core.list_service_for_all_namespaces(_preload_content=False)
                    body = json.loads(await resp.read())
                    if name == "json+parse":
                        origin = Origin("bench")
                        objs = [parse_object({**d, "kind": "Service", "apiVersion": "v1"}, origin) for d in body["items"]]
                        assert len(objs) == n
                    times[name].append(time.perf_counter() - t)
                # The same bytes decoded in-process: no server time in these.
                resp = await core.list_service_for_all_namespaces(_preload_content=False)
                raw = await resp.read()
                t = time.perf_counter()
                lst = client.deserialize(SimpleNamespace(data=raw), "V1ServiceList")
                times["decode only: models"].append(time.perf_counter() - t)
                t = time.perf_counter()
                body = json.loads(raw)
                times["decode only: json"].append(time.perf_counter() - t)
                t = time.perf_counter()
                body = json.loads(raw)
                objs = [parse_object({**d, "kind": "Service", "apiVersion": "v1"}, Origin("bench")) for d in body["items"]]
                times["decode only: json+parse"].append(time.perf_counter() - t)
                assert len(lst.items) == len(objs) == n
                with tempfile.TemporaryDirectory() as d:
                    kc = write_kubeconfig(Path(d) / "kc", api.url)
                    src = kube.KubeSource(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), endpoint_slices=False),
                                          [Recorder()])
                    t = time.perf_counter()
                    task = asyncio.ensure_future(src.run())
                    while not src.synced:
                        await asyncio.sleep(0.005)
                    times["KubeSource sync"].append(time.perf_counter() - t)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
    print(f"{n} Services, {args.runs} runs (median, min-max):")
    print("| decode | time |\n| --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} s ({min(ts):.3f}-{max(ts):.3f}) |")
    for a, b in (("models", "json"), ("decode only: models", "decode only: json"),
                 ("decode only: models", "decode only: json+parse")):
        ratios = [x / y for x, y in zip(times[a], times[b])]
        print(f"{a} / {b}: {statistics.median(ratios):.1f}x (paired runs, {min(ratios):.1f}-{max(ratios):.1f})")


if __name__ == "__main__":
    asyncio.run(main())
