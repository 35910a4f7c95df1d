"""KubeSource against the strict test API server: list/watch semantics end to end.

Addresses: the test API server listens on 127.0.0.1 (an ephemeral port);
objects carry Service IPs in 10.96.0.0/16, endpoint/pod IPs in
10.244.0.0/16 and node IPs in 192.0.2.0/24 -- data only, never contacted.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from fakeapi import FakeAPIServer
from fakeapi.testing import endpoint_slice, endpoints, make_source, node, pod, running, service

from kubelab.proxy.sources import kube

pytestmark = pytest.mark.timeout(120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


# ---------------------------------------------------------------- sync barrier


def test_initial_sync_barrier(tmp_path):
    """Nothing is synced before its complete list; synced comes after every add of its kind, once."""

    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([service("a", "10.96.0.1"), service("b", "10.96.0.2"), service("c", "10.96.0.3")])
            api.apply(endpoint_slice("a-1", "a", ["10.244.0.1"]))
            # The EndpointSlice list is slow: Services sync first, slices wait.
            api.inject(status=None, op="list", path="endpointslices", delay=0.5)
            src, rec = make_source(api, tmp_path, page_size=2)
            async with running(src):
                await api.wait_for(lambda: rec.count("on_services_synced") == 1, what="services synced")
                assert rec.count("on_endpoint_slices_synced") == 0
                assert not src.synced
                await api.wait_for(lambda: src.synced, what="all synced")
                calls = [c[0] for c in rec.calls]
                assert calls.index("on_services_synced") == 1 + max(i for i, c in enumerate(calls) if c == "on_service_add")
                assert calls.index("on_endpoint_slices_synced") > calls.index("on_endpoint_slice_add")
                assert sorted(rec.names("on_service_add")) == ["a", "b", "c"]
                # A relist (after 410) never repeats the synced signal.
                api.apply(pod("elsewhere", "10.244.0.9"))  # history moves on past our resourceVersion...
                api.compact()  # ...and the server forgets it
                api.cut_watches()
                await api.wait_for(lambda: src.reflectors["services"].lists == 2, what="relist")
                assert rec.count("on_services_synced") == 1

    run(main())


# ---------------------------------------------------------------- each kind

KINDS = [
    # (id, object, modified object, kind, handler prefix)
    ("service", service("web", "10.96.0.20"), service("web", "10.96.0.20", port=81), "Service", "service"),
    ("endpointslice", endpoint_slice("web-abc", "web", ["10.244.1.1"]),
     endpoint_slice("web-abc", "web", ["10.244.1.1", "10.244.1.2"]), "EndpointSlice", "endpoint_slice"),
    ("pod", pod("web-0", "10.244.1.1"), pod("web-0", "10.244.1.9"), "Pod", "pod"),
    ("node", node("node-a", "192.0.2.1"), node("node-a", "192.0.2.1", zone="zone-b"), "Node", "node"),
]


@pytest.mark.parametrize("obj,modified,kind,prefix", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_add_update_delete(tmp_path, obj, modified, kind, prefix):
    async def main():
        async with FakeAPIServer() as api:
            src, rec = make_source(api, tmp_path, purpose="dns", node_name="node-a")
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                assert rec.count(f"on_{prefix}_add") == 0
                api.apply(obj)
                await api.wait_for(lambda: rec.count(f"on_{prefix}_add") == 1, what="add")
                api.apply(modified)
                await api.wait_for(lambda: rec.count(f"on_{prefix}_update") == 1, what="update")
                (key, got), = rec.of_kind(kind).items()
                assert got.meta.resource_version == api.get(kind, key[0], key[1])["metadata"]["resourceVersion"]
                ns = obj["metadata"].get("namespace", "")
                api.delete(kind, ns, obj["metadata"]["name"])
                await api.wait_for(lambda: rec.count(f"on_{prefix}_delete") == 1, what="delete")
                assert rec.of_kind(kind) == {}

    run(main())


def test_other_nodes_are_not_watched(tmp_path):
    """The proxy watches only its own Node (field selector metadata.name=<node>)."""

    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([node("node-a"), node("node-b", "192.0.2.2")])
            src, rec = make_source(api, tmp_path, node_name="node-b")
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                assert rec.names("on_node_add") == ["node-b"]
                assert {r.query.get("fieldSelector") for r in api.requests_for(path="/nodes")} == {"metadata.name=node-b"}

    run(main())


# ---------------------------------------------------------------- selectors

SELECTOR_CASES = [
    # (id, purpose, server's Kubernetes minor, Services delivered, EndpointSlices delivered)
    ("proxy", "proxy", 32, ["plain"], ["other-proxy-1", "plain-1"]),
    ("proxy-on-1.30", "proxy", 30, ["headless", "plain"], ["other-proxy-1", "plain-1"]),
    ("dns", "dns", 32, ["headless", "other-proxy", "plain"], ["headless-1", "other-proxy-1", "plain-1"]),
]


@pytest.mark.parametrize("purpose,minor,services,slices", [c[1:] for c in SELECTOR_CASES],
                         ids=[c[0] for c in SELECTOR_CASES])
def test_selectors(tmp_path, purpose, minor, services, slices):
    """kube-proxy's selectors (server.go): Services ``!service-proxy-name`` and ``spec.clusterIP!=None``,
    EndpointSlices ``!service.kubernetes.io/headless``; DNS sees everything.

    The objects are shaped as a cluster makes them: a headless Service has
    ``clusterIP: None`` and no label; the EndpointSlice controller labels its
    slices ``service.kubernetes.io/headless`` and copies the Service's labels
    (the proxy name too) onto the slices.
    """

    async def main():
        async with FakeAPIServer(minor=minor) as api:
            proxy_name = {"service.kubernetes.io/service-proxy-name": "cilium"}
            api.apply_all([
                service("plain", "10.96.0.30"),
                service("headless", "None"),
                service("other-proxy", "10.96.0.31", labels=proxy_name),
                endpoint_slice("plain-1", "plain", ["10.244.2.1"]),
                endpoint_slice("headless-1", "headless", ["10.244.2.2"], labels={"service.kubernetes.io/headless": ""}),
                endpoint_slice("other-proxy-1", "other-proxy", ["10.244.2.3"], labels=proxy_name),
            ])
            src, rec = make_source(api, tmp_path, purpose=purpose)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                assert sorted(rec.names("on_service_add")) == services
                assert sorted(rec.names("on_endpoint_slice_add")) == slices
                svc_sel = {(r.query.get("labelSelector"), r.query.get("fieldSelector"), r.status)
                           for r in api.requests_for(path="/services")}
                slice_sel = {r.query.get("labelSelector") for r in api.requests_for(path="/endpointslices")}
                if purpose == "dns":
                    assert svc_sel == {(None, None, 200)} and slice_sel == {None}
                    return
                assert slice_sel == {"!service.kubernetes.io/headless"}
                want = {("!service.kubernetes.io/service-proxy-name", "spec.clusterIP!=None", 200)}
                if minor < 31:
                    # An older server refuses the field selector once; then it is left out for good.
                    want = {("!service.kubernetes.io/service-proxy-name", "spec.clusterIP!=None", 400),
                            ("!service.kubernetes.io/service-proxy-name", None, 200)}
                    assert src.reflectors["services"].lists == 1
                await api.wait_for(lambda: api.watching("services") == 1, what="the services watch")
                # A Service handed to another proxy later leaves our view: a delete.
                api.apply(service("plain", "10.96.0.30", labels={"service.kubernetes.io/service-proxy-name": "x"}))
                await api.wait_for(lambda: rec.names("on_service_delete") == ["plain"], what="delete on relabel")
                assert {(r.query.get("labelSelector"), r.query.get("fieldSelector"), r.status)
                        for r in api.requests_for(path="/services")} == want

    run(main())


# ---------------------------------------------------------------- 410 and relist


@pytest.mark.parametrize("expired_watch", ["event", "http"], ids=["410-as-error-event", "410-as-http-status"])
def test_relist_after_410_computes_deletes(tmp_path, expired_watch):
    async def main():
        async with FakeAPIServer(expired_watch=expired_watch) as api:
            api.apply_all([service(n, f"10.96.1.{i}") for i, n in enumerate(["keep", "change", "gone"], 1)])
            api.apply(endpoint_slice("gone-1", "gone", ["10.244.3.1"]))
            src, rec = make_source(api, tmp_path)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                # While the watches are down, the world changes and the server
                # compacts: resuming is impossible, the source must relist.
                api.inject(status=503, op="watch", count=2, retry_after=0)
                api.cut_watches(partial=False)
                api.delete("Service", "default", "gone")
                api.delete("EndpointSlice", "default", "gone-1")
                api.apply(service("change", "10.96.1.2", port=8443))
                api.apply(service("new", "10.96.1.9"))
                api.compact()
                await api.wait_for(lambda: src.reflectors["services"].lists == 2 and
                                   src.reflectors["endpointslices"].lists == 2, what="relists")
                after = rec.calls[1 + max(rec.calls.index(("on_services_synced",)),
                                          rec.calls.index(("on_endpoint_slices_synced",))):]
                assert sorted(after) == sorted([
                    ("on_service_delete", ("default", "gone")),
                    ("on_endpoint_slice_delete", ("default", "gone-1")),
                    ("on_service_update", ("default", "change"), ("default", "change")),
                    ("on_service_add", ("default", "new")),
                ])
                assert sorted(n for _, n in rec.of_kind("Service")) == ["change", "keep", "new"]
                # The 410 came as a watch ERROR event; the relist was a fresh paginated list.
                watches = api.requests_for(op="watch", path="/services")
                assert any(int(w.query["resourceVersion"]) < api.store.compacted for w in watches)
                lists = api.requests_for(op="list", path="/services")
                assert len(lists) == 2 and all("resourceVersion" not in r.query for r in lists)
                # And the next watch resumes from the relist's resourceVersion.
                await api.wait_for(lambda: int(api.requests_for(op="watch", path="/services")[-1].query["resourceVersion"])
                                   >= api.store.compacted, what="watch after relist")

    run(main())


def test_expired_continue_token_falls_back_to_one_full_list(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([service(f"s{i:02d}", f"10.96.2.{i}") for i in range(1, 26)])
            pages = []

            def compact_after_first_page(record):
                if record.op == "list" and "/services" in record.path:
                    pages.append(record)
                    if len(pages) == 2:  # the first continue request finds the token expired
                        api.apply(service("late", "10.96.2.99"))
                        api.compact()

            api.on_request = compact_after_first_page
            src, rec = make_source(api, tmp_path, page_size=10)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                lists = api.requests_for(op="list", path="/services")
                assert [(r.query.get("limit"), "continue" in r.query, r.status) for r in lists] == [
                    ("10", False, 200), ("10", True, 410), (None, False, 200)]
                assert len(rec.names("on_service_add")) == 26  # exactly once each, "late" included
                assert rec.count("on_services_synced") == 1

    run(main())


# ---------------------------------------------------------------- cuts


def test_reconnect_after_cuts_loses_and_duplicates_nothing(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            names = [f"svc{i}" for i in range(6)]
            api.apply_all([service(n, f"10.96.3.{i}") for i, n in enumerate(names, 1)])
            src, rec = make_source(api, tmp_path)
            rng = random.Random(8)
            expected_updates = {n: 0 for n in names}
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                for step in range(40):
                    n = rng.choice(names)
                    api.apply(service(n, f"10.96.3.{names.index(n) + 1}", port=1000 + step))
                    expected_updates[n] += 1
                    if step % 7 == 3:
                        await asyncio.sleep(0)
                        api.cut_watches(partial=True)  # mid-event: half a JSON line, then RST
                    if step % 5 == 0:
                        await asyncio.sleep(0.02)
                await api.wait_for(
                    lambda: all(rec.of_kind("Service")[("default", n)].meta.resource_version ==
                                api.get("Service", "default", n)["metadata"]["resourceVersion"] for n in names),
                    what="convergence")
                got = {n: sum(1 for c in rec.calls if c[0] == "on_service_update" and c[1][1] == n) for n in names}
                assert got == expected_updates
                assert src.reflectors["services"].lists == 1  # resumed every time, never relisted
                assert src.reflectors["services"].watches > 2
                assert rec.count("on_service_add") == len(names) and rec.count("on_service_delete") == 0

    run(main())


def test_bookmarks_move_the_resume_point(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            api.apply(service("a", "10.96.4.1"))
            src, rec = make_source(api, tmp_path)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                # Other kinds move the global revision; only a bookmark tells the Services watch.
                for i in range(5):
                    api.apply(pod(f"p{i}", f"10.244.4.{i + 1}"))
                before = src.reflectors["services"].resource_version
                await api.wait_for(lambda: api.watching("services") == 1, what="the services watch to be open")
                api.send_bookmarks()
                await api.wait_for(lambda: src.reflectors["services"].resource_version == str(api.store.rv),
                                   what="bookmark")
                assert int(src.reflectors["services"].resource_version) > int(before)
                api.cut_watches()
                await api.wait_for(lambda: api.requests_for(op="watch", path="/services")[-1].query["resourceVersion"]
                                   == str(api.store.rv), what="re-watch from the bookmark")
                assert all(r.query.get("allowWatchBookmarks") == "True" for r in api.requests_for(op="watch"))
                assert rec.count("on_service_update") == 0

    run(main())


def test_server_side_watch_timeout_rewatches_without_relisting(tmp_path):
    """A watch the server ends on timeoutSeconds is simply opened again from the last resourceVersion."""

    async def main():
        async with FakeAPIServer() as api:
            api.apply(service("a", "10.96.4.10"))
            src, rec = make_source(api, tmp_path, endpoint_slices=False, min_watch_timeout=1.0)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                await api.wait_for(lambda: len(api.requests_for(op="watch")) >= 2, what="a second watch")
                api.apply(service("b", "10.96.4.11"))
                await api.wait_for(lambda: rec.names("on_service_add") == ["a", "b"], what="b")
                watches = api.requests_for(op="watch")
                assert all(1 <= int(w.query["timeoutSeconds"]) <= 2 for w in watches)
                assert src.reflectors["services"].lists == 1

    run(main())


def test_fragmented_watch_stream(tmp_path):
    """Events cut into 7-byte HTTP chunks written apart are reassembled, none lost or doubled."""

    async def main():
        async with FakeAPIServer(trickle=7) as api:
            api.apply(service("a", "10.96.4.20"))
            src, rec = make_source(api, tmp_path, endpoint_slices=False)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                await api.wait_for(lambda: api.watching("services") == 1, what="the services watch")
                for port in range(81, 86):
                    api.apply(service("a", "10.96.4.20", port=port))
                api.apply(service("b", "10.96.4.21"))
                api.delete("Service", "default", "a")
                await api.wait_for(lambda: rec.names("on_service_delete") == ["a"], what="the delete")
                assert rec.count("on_service_update") == 5 and rec.names("on_service_add") == ["a", "b"]
                assert src.reflectors["services"].watches == 1 and src.errors == {}

    run(main())


# ---------------------------------------------------------------- errors and back-off


def test_slow_list_times_out_and_is_retried(tmp_path, caplog):
    """A list slower than the request timeout is abandoned and retried (after a back-off), then syncs."""

    async def main():
        async with FakeAPIServer() as api:
            api.apply(service("a", "10.96.5.10"))
            api.inject(status=None, op="list", path="/services", delay=3.0)
            src, rec = make_source(api, tmp_path, endpoint_slices=False, request_timeout=0.5)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced after the slow list")
            assert rec.names("on_service_add") == ["a"]
            assert len(api.requests_for(op="list", path="/services")) == 2

    with caplog.at_level(logging.WARNING):
        run(main())
    assert "list failed" in caplog.text and "Timeout" in caplog.text


def test_errors_back_off_with_jitter_and_honour_retry_after(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            api.apply(service("a", "10.96.5.1"))
            slept: list[float] = []

            async def fake_sleep(d):
                slept.append(d)
                await asyncio.sleep(0)

            api.inject(status=500, op="list", path="/services", count=4)
            api.inject(status=429, op="list", path="/services", count=1, retry_after=7)
            src, rec = make_source(api, tmp_path, services=True, endpoint_slices=False,
                                   backoff_initial=0.8, backoff_max=30.0)
            src.deps = kube.KubeSourceDeps(sleep=fake_sleep, rng=random.Random(3))
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced after errors")
            assert rec.names("on_service_add") == ["a"]
            assert [r.status for r in api.requests_for(op="list")] == [500, 500, 500, 500, 429, 200]
            # client-go's reflector back-off: 0.8 s doubling, each plus up to 100 % jitter.
            for i, d in enumerate(slept[:4]):
                assert 0.8 * 2**i <= d <= 2 * 0.8 * 2**i, (i, d)
            assert slept[4] >= 7  # Retry-After wins over a shorter back-off
            assert len(set(slept)) == len(slept)

    run(main())


def test_dataplane_input_frozen_during_outage(tmp_path):
    """While the API is down nothing is delivered (the programmed state stays); then it converges."""

    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([service("a", "10.96.6.1"), service("b", "10.96.6.2")])
            src, rec = make_source(api, tmp_path, endpoint_slices=False)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                n_calls = len(rec.calls)
                api.inject(status=0, op="watch", count=6)  # connections dropped without an answer
                api.cut_watches()
                await api.wait_for(lambda: not any(f.count for f in api.faults), what="outage to pass")
                assert len(rec.calls) == n_calls
                api.delete("Service", "default", "a")
                await api.wait_for(lambda: rec.names("on_service_delete") == ["a"], what="recovery")

    run(main())


def test_handler_exception_does_not_stop_the_watch(tmp_path, caplog):
    class Boom(Exception):
        pass

    async def main():
        async with FakeAPIServer() as api:
            src, rec = make_source(api, tmp_path, endpoint_slices=False)
            calls = []

            class Fragile:
                def on_service_add(self, svc):
                    calls.append(svc.name)
                    if svc.name == "bad-handler":
                        raise Boom("handler bug")

                def on_services_synced(self):
                    pass

            src.handlers.append(Fragile())
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                api.apply(service("bad-handler", "10.96.7.1"))
                api.apply(service("after", "10.96.7.2"))
                await api.wait_for(lambda: calls == ["bad-handler", "after"], what="both delivered")
                assert rec.names("on_service_add") == ["bad-handler", "after"]

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "Fragile.on_service_add failed" in caplog.text


# ---------------------------------------------------------------- scale and size


def test_ten_thousand_services_in_pages(tmp_path):
    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([service(f"svc-{i:05d}", f"10.96.{i // 250}.{i % 250 + 1}", ns=f"ns-{i % 7}")
                           for i in range(10_000)])
            src, rec = make_source(api, tmp_path, endpoint_slices=False, page_size=500)
            async with running(src):
                await api.wait_for(lambda: src.synced, timeout=60, what="10k services synced")
            lists = api.requests_for(op="list", path="/services")
            assert len(lists) == 20 and all(r.query["limit"] == "500" for r in lists)
            assert all(r.status == 200 for r in lists)
            assert rec.count("on_service_add") == 10_000
            assert len(rec.of_kind("Service")) == 10_000
            assert rec.calls[-1] == ("on_services_synced",)

    run(main())


def test_watch_event_larger_than_a_read_buffer(tmp_path):
    """A full EndpointSlice (1,000 endpoints, a ~200 KB watch line) arrives whole."""

    async def main():
        async with FakeAPIServer() as api:
            src, rec = make_source(api, tmp_path)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                ips = [f"10.244.{i // 250 + 10}.{i % 250 + 1}" for i in range(1000)]
                api.apply(endpoint_slice("big", "big", ips))
                await api.wait_for(lambda: rec.count("on_endpoint_slice_add") == 1, what="big slice")
                (_, got), = rec.of_kind("EndpointSlice").items()
                assert len(got.endpoints) == 1000
                assert api.requests_for(op="watch", path="endpointslices")[-1].query["watch"] == "True"

    run(main())


# ---------------------------------------------------------------- Endpoints fallback

FALLBACK = [("slices-served", True, "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/endpoints"),
            ("slices-absent", False, "/api/v1/endpoints", "/apis/discovery.k8s.io/v1/endpointslices")]


@pytest.mark.parametrize("served,used,unused", [c[1:] for c in FALLBACK], ids=[c[0] for c in FALLBACK])
def test_endpoints_fallback_only_without_endpointslice_api(tmp_path, served, used, unused):
    async def main():
        async with FakeAPIServer(endpoint_slices=served) as api:
            api.apply(service("web", "10.96.8.1"))
            api.apply(endpoints("web", ["10.244.8.1", "10.244.8.2"]))
            if served:
                api.apply(endpoint_slice("web-x", "web", ["10.244.8.1", "10.244.8.2"]))
            src, rec = make_source(api, tmp_path)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                assert src.endpoint_slices_served is served
                (_, got), = rec.of_kind("EndpointSlice").items()
                assert got.service_name == "web"
                assert sorted(a for e in got.endpoints for a in e.addresses) == ["10.244.8.1", "10.244.8.2"]
                assert api.requests_for(path=used) and not api.requests_for(path=unused)
                assert [r.status for r in api.requests if r.path == "/apis/discovery.k8s.io/v1/"] == [200 if served else 404]

    run(main())


# ---------------------------------------------------------------- bad objects


def test_bad_objects_keep_the_last_good_version(tmp_path, caplog):
    async def main():
        async with FakeAPIServer() as api:
            api.apply_all([service("good", "10.96.9.1"), service("flaky", "10.96.9.2"),
                           service("born-bad", "10.96.9.3", port=70000)])
            src, rec = make_source(api, tmp_path, endpoint_slices=False)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                # A bad object on the initial list: reported, not delivered; the others flow.
                assert sorted(rec.names("on_service_add")) == ["flaky", "good"]
                assert "born-bad" in src.errors["Service default/born-bad"]
                assert "port" in src.errors["Service default/born-bad"]
                # good -> bad: nothing delivered, the last good version stays in force.
                api.apply(service("flaky", "not-an-ip"))
                await api.wait_for(lambda: "Service default/flaky" in src.errors, what="error recorded")
                assert "clusterIP" in src.errors["Service default/flaky"]
                assert rec.of_kind("Service")[("default", "flaky")].cluster_ip == "10.96.9.2"
                api.apply(service("other", "10.96.9.4"))  # others still flow
                await api.wait_for(lambda: "other" in rec.names("on_service_add"), what="others flow")
                # A relist with the bad version in it keeps the last good one (no delete).
                api.apply(pod("elsewhere", "10.244.9.9"))
                api.compact()
                api.cut_watches()
                await api.wait_for(lambda: src.reflectors["services"].lists == 2, what="relist")
                assert ("default", "flaky") in rec.of_kind("Service") and rec.count("on_service_delete") == 0
                # Fixed: an update from the last good version to the new one.
                api.apply(service("flaky", "10.96.9.22"))
                await api.wait_for(lambda: rec.of_kind("Service")[("default", "flaky")].cluster_ip == "10.96.9.22",
                                   what="fixed")
                assert "Service default/flaky" not in src.errors
                # The born-bad one becomes good: an add.  Deleting a bad one forgets its error.
                api.apply(service("born-bad", "10.96.9.3"))
                await api.wait_for(lambda: "born-bad" in rec.names("on_service_add"), what="born-bad fixed")
                api.apply(service("doomed", "bad-ip"))
                await api.wait_for(lambda: "Service default/doomed" in src.errors, what="doomed error")
                api.delete("Service", "default", "doomed")
                await api.wait_for(lambda: "Service default/doomed" not in src.errors, what="error forgotten")
                assert "doomed" not in rec.names("on_service_delete")

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "Service default/flaky" in caplog.text and "last good version stays in force" in caplog.text
