"""What reading manifests costs, and how fast the files source notices an edit.

    python3 bench/foundation_objects_parse.py [--services 1000 --endpoints 10 --runs 5]

1. Parse: one YAML stream of N Services and N EndpointSlices (``--endpoints``
   each), read three ways, alternated so machine noise hits each alike:

   * ``yaml``: ``yaml.load_all`` with libyaml's CSafeLoader -- the floor,
     what any Python reader of the file pays;
   * ``k8s-models``: that plus kubernetes_asyncio's generated model classes
     (``ApiClient.deserialize`` into V1Service / V1EndpointSlice) -- the
     peer: a typed read of the same objects, with no validation;
   * ``kubelab``: ``kubelab.proxy.objects.parse_documents`` -- compose (for
     line numbers), construct, default and validate into the model.

   Prints medians (min-max) and the ratios kubelab / yaml and kubelab / k8s-models.

2. Edit latency: ``FilesSource.run()`` on a folder at the default 0.2 s
   poll; the time from an edit's write to the provider's update call,
   median of ``--edits`` edits, against kube-proxy's 1 s min-sync-period.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from kubelab.proxy.objects import parse_documents
from kubelab.proxy.sources.files import FilesSource


def manifests(n: int, endpoints: int) -> str:
    docs = []
    for i in range(n):
        name = f"svc-{i:05d}"
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": f"ns-{i % 7}", "labels": {"app": name}},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                     "sessionAffinity": "None", "type": "ClusterIP"},
        })
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": f"ns-{i % 7}",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.{(i * endpoints + j) // 65000 % 200 + 1}.{(i * endpoints + j) // 250 % 250}."
                                         f"{(i * endpoints + j) % 250 + 1}"],
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": f"node-{j % 3}", "zone": f"zone-{j % 3}"}
                          for j in range(endpoints)],
        })
    return yaml.dump_all(docs, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


def read_yaml(text: str) -> int:
    return len(list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))))


def read_models(text: str, client, types) -> int:
    n = 0
    for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        # ApiClient.deserialize takes a response; __deserialize is what it calls on the data.
        client._ApiClient__deserialize(d, types[d["kind"]])
        n += 1
    return n


def read_kubelab(text: str) -> int:
    r = parse_documents(text, "bench.yaml")
    assert not r.errors, r.errors[:3]
    return len(r.objects)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f} ms ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


async def bench_parse(args) -> None:
    from kubernetes_asyncio import client as kclient

    text = manifests(args.services, args.endpoints)
    api = kclient.ApiClient()  # needs a running loop, hence async
    types = {"Service": "V1Service", "EndpointSlice": "V1EndpointSlice"}
    runs = {"yaml": [], "k8s-models": [], "kubelab": []}
    readers = {"yaml": lambda: read_yaml(text), "k8s-models": lambda: read_models(text, api, types),
               "kubelab": lambda: read_kubelab(text)}
    for _ in range(args.runs):
        for name, fn in readers.items():
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    ratios_yaml = [k / y for k, y in zip(runs["kubelab"], runs["yaml"])]
    ratios_models = [k / m for k, m in zip(runs["kubelab"], runs["k8s-models"])]
    print(f"{args.services} Services + {args.services} EndpointSlices x {args.endpoints} endpoints "
          f"({len(text) / 1e6:.1f} MB of YAML), {args.runs} runs:")
    for name, xs in runs.items():
        print(f"  {name:11s} {fmt(xs)}")
    print(f"  kubelab / yaml       {statistics.median(ratios_yaml):.2f} ({min(ratios_yaml):.2f}-{max(ratios_yaml):.2f})")
    print(f"  kubelab / k8s-models {statistics.median(ratios_models):.2f} "
          f"({min(ratios_models):.2f}-{max(ratios_models):.2f})")
    await api.close()


class _Stamp:
    """A provider that records when updates arrive."""

    def __init__(self) -> None:
        self.updates: list[float] = []

    def on_service_update(self, old, new) -> None:
        self.updates.append(time.perf_counter())


async def bench_latency(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "svc.yaml").write_text(manifests(1, 1))
        for i in range(20):  # a realistic folder: the watched file among others
            (folder / f"other-{i:02d}.yaml").write_text(manifests(5, 3).replace("svc-0", f"o{i}-svc-0"))
        stamp = _Stamp()
        src = FilesSource(folder, [stamp])
        task = asyncio.ensure_future(src.run())
        lat = []
        try:
            while not src.synced:
                await asyncio.sleep(0.01)
            base = (folder / "svc.yaml").read_text()
            for k in range(args.edits):
                before = len(stamp.updates)
                t = time.perf_counter()
                (folder / "svc.yaml").write_text(base.replace("port: 80\n", f"port: {81 + k}\n"))
                while len(stamp.updates) == before:
                    await asyncio.sleep(0.005)
                lat.append(stamp.updates[-1] - t)
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    print(f"edit -> on_service_update, 21 files, poll {src.poll_interval}s, {args.edits} edits: "
          f"median {statistics.median(lat):.2f} s ({min(lat):.2f}-{max(lat):.2f}); "
          f"ratio to the 1 s min-sync-period {statistics.median(lat) / 1.0:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--edits", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(bench_parse(args))
    asyncio.run(bench_latency(args))


if __name__ == "__main__":
    main()
