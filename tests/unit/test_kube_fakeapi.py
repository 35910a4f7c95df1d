"""The test API server itself: it must answer like a kube-apiserver, and refuse what one would.

Raw HTTP with aiohttp against 127.0.0.1 (ephemeral port); objects carry
10.96.0.0/16 addresses (data only).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from fakeapi import FakeAPIServer
from fakeapi.testing import service

pytestmark = pytest.mark.timeout(60)


async def _get(api, session, path, **params):
    async with session.get(api.url + path, params=params) as r:
        return r.status, await r.json(content_type=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


REJECTED = [
    # (id, path, params, status, reason, a client bug -> violation)
    ("unknown-path", "/api/v1/servicez", {}, 404, "NotFound", False),
    ("unknown-group", "/apis/nope.example/v1/things", {}, 404, "NotFound", False),
    ("unknown-param", "/api/v1/services", {"labelselector": "a=b"}, 400, "BadRequest", True),
    ("bad-label-selector", "/api/v1/services", {"labelSelector": "a in (b"}, 400, "BadRequest", True),
    ("unsupported-field", "/api/v1/services", {"fieldSelector": "spec.ports=80"}, 400, "BadRequest", True),
    ("rvmatch-without-rv", "/api/v1/services", {"resourceVersionMatch": "Exact"}, 400, "BadRequest", True),
    ("exact-rv-0", "/api/v1/services", {"resourceVersionMatch": "Exact", "resourceVersion": "0"}, 400, "BadRequest", True),
    ("rv-with-continue", "/api/v1/services", {"resourceVersion": "1000", "continue": "x"}, 400, "BadRequest", True),
    ("garbage-continue", "/api/v1/services", {"continue": "not-a-token"}, 400, "BadRequest", True),
    ("negative-limit", "/api/v1/services", {"limit": "-1"}, 400, "BadRequest", True),
    ("bookmarks-on-list", "/api/v1/services", {"allowWatchBookmarks": "true"}, 400, "BadRequest", True),
    ("rv-not-a-number", "/api/v1/services", {"resourceVersion": "abc", "limit": "1"}, 400, "BadRequest", True),
    ("rv-from-the-future", "/api/v1/services", {"resourceVersion": "99999", "limit": "1"}, 504, "Timeout", True),
    ("watch-with-continue", "/api/v1/services", {"watch": "true", "continue": "x"}, 400, "BadRequest", True),
    ("watch-with-limit", "/api/v1/services", {"watch": "true", "limit": "5"}, 400, "BadRequest", True),
    ("cluster-scoped-in-namespace", "/api/v1/namespaces/default/nodes", {}, 404, "NotFound", False),
]


@pytest.mark.parametrize("path,params,status,reason,violation", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejects_like_a_real_server(path, params, status, reason, violation):
    async def main():
        api = FakeAPIServer(strict=False)
        async with api, aiohttp.ClientSession() as s:
            got, body = await _get(api, s, path, **params)
            assert (got, body["kind"], body["reason"], body["code"]) == (status, "Status", reason, status)
            assert bool(api.violations) is violation, api.violations

    run(main())


FIELD_SELECTORS = [
    # (id, server minor, fieldSelector, status, violation)
    ("cluster-ip-1.32", 32, "spec.clusterIP!=None", 200, False),
    ("type-1.32", 32, "spec.type=ClusterIP", 200, False),
    # Before 1.31 (kubernetes PR #123905) Services had no such field selectors:
    # a 400 that is the old server's limit, not the client's mistake.
    ("cluster-ip-1.30", 30, "spec.clusterIP!=None", 400, False),
    ("metadata-1.30", 30, "metadata.name=a", 200, False),
    ("never-a-field", 32, "spec.selector=x", 400, True),
]


@pytest.mark.parametrize("minor,selector,status,violation", [c[1:] for c in FIELD_SELECTORS],
                         ids=[c[0] for c in FIELD_SELECTORS])
def test_field_selectors_by_server_version(minor, selector, status, violation):
    async def main():
        api = FakeAPIServer(strict=False, minor=minor)
        async with api, aiohttp.ClientSession() as s:
            api.apply_all([service("a", "10.96.2.1"), service("h", "None")])
            got, body = await _get(api, s, "/api/v1/services", fieldSelector=selector)
            assert got == status, body
            if status == 200:
                want = {"spec.clusterIP!=None": ["a"], "spec.type=ClusterIP": ["a", "h"], "metadata.name=a": ["a"]}
                assert [i["metadata"]["name"] for i in body["items"]] == want[selector]
            else:
                assert body["message"] == f"field label not supported: {selector.split('=')[0].rstrip('!')}"
            assert bool(api.violations) is violation, api.violations

    run(main())


def test_strict_server_fails_the_test_on_violations():
    async def main():
        with pytest.raises(AssertionError, match="unknown query parameter"):
            async with FakeAPIServer() as api, aiohttp.ClientSession() as s:
                await _get(api, s, "/api/v1/services", bogus="1")

    run(main())


def test_list_semantics_and_pagination():
    async def main():
        async with FakeAPIServer() as api, aiohttp.ClientSession() as s:
            api.apply_all([service(f"s{i}", f"10.96.0.{i}") for i in range(1, 6)])
            rv_before = api.store.rv
            status, page1 = await _get(api, s, "/api/v1/services", limit="2")
            assert status == 200 and page1["kind"] == "ServiceList"
            assert all("kind" not in item for item in page1["items"])  # typed list items carry no kind
            assert page1["metadata"]["remainingItemCount"] == 3
            api.delete("Service", "default", "s4")  # after the first page: pages stay at its revision
            _, page2 = await _get(api, s, "/api/v1/services", limit="2", **{"continue": page1["metadata"]["continue"]})
            _, page3 = await _get(api, s, "/api/v1/services", limit="2", **{"continue": page2["metadata"]["continue"]})
            names = [i["metadata"]["name"] for p in (page1, page2, page3) for i in p["items"]]
            assert names == ["s1", "s2", "s3", "s4", "s5"] and "continue" not in page3["metadata"]
            assert {p["metadata"]["resourceVersion"] for p in (page1, page2, page3)} == {str(rv_before)}
            # resourceVersion=0: any revision, limit ignored (the watch cache's behaviour).
            _, any_ = await _get(api, s, "/api/v1/services", resourceVersion="0", limit="1")
            assert len(any_["items"]) == 4 and "continue" not in any_["metadata"]
            # Exact at an old revision, then 410 once compacted.
            _, exact = await _get(api, s, "/api/v1/services", resourceVersion=str(rv_before), limit="10")
            assert len(exact["items"]) == 5
            api.compact()
            status, gone = await _get(api, s, "/api/v1/services", resourceVersion=str(rv_before), limit="10")
            assert (status, gone["reason"]) == (410, "Expired")
            status, gone = await _get(api, s, "/api/v1/services", limit="2", **{"continue": page1["metadata"]["continue"]})
            assert (status, gone["reason"]) == (410, "Expired") and gone["metadata"]["continue"]
            # Not-older-than without a limit: the newest data.
            _, newest = await _get(api, s, "/api/v1/services", resourceVersion=str(rv_before))
            assert len(newest["items"]) == 4

    run(main())


async def _watch_lines(api, session, **params):
    async with session.get(api.url + "/api/v1/services", params={"watch": "true", "timeoutSeconds": "1", **params}) as r:
        assert r.status == 200
        return [json.loads(line) async for line in r.content if line.strip()]


def test_watch_semantics():
    async def main():
        async with FakeAPIServer(bookmark_interval=0.3) as api, aiohttp.ClientSession() as s:
            api.apply_all([service("a", "10.96.1.1", labels={"team": "x"}), service("b", "10.96.1.2")])
            rv = api.store.rv
            # No resourceVersion: synthetic ADDED for the current state.
            evs = await _watch_lines(api, s)
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "a"), ("ADDED", "b")]
            assert all(e["object"]["kind"] == "Service" for e in evs)  # watch objects do carry kind
            # From a revision: only what changed after it, selectors as transitions.
            api.apply(service("b", "10.96.1.2", labels={"team": "x"}))  # enters team=x
            api.apply(service("a", "10.96.1.1", labels={"team": "y"}))  # leaves team=x
            api.delete("Service", "default", "b")
            evs = await _watch_lines(api, s, resourceVersion=str(rv), labelSelector="team=x", allowWatchBookmarks="true")
            changes = [(e["type"], e["object"]["metadata"]["name"]) for e in evs if e["type"] != "BOOKMARK"]
            assert changes == [("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b")]
            assert any(e["type"] == "BOOKMARK" for e in evs)
            bm = [e for e in evs if e["type"] == "BOOKMARK"][0]["object"]
            assert set(bm["metadata"]) == {"resourceVersion", "creationTimestamp"}
            # Without allowWatchBookmarks: none.
            evs = await _watch_lines(api, s, resourceVersion=str(api.store.rv))
            assert evs == []
            # Too old: one ERROR event carrying 410 Expired.
            api.compact()
            evs = await _watch_lines(api, s, resourceVersion=str(rv))
            assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in evs] == [("ERROR", 410, "Expired")]

    run(main())


def test_faults_and_auth():
    async def main():
        async with FakeAPIServer(tokens={"t": "alice"}) as api, aiohttp.ClientSession() as s:
            status, body = await _get(api, s, "/api/v1/services")
            assert (status, body["reason"]) == (401, "Unauthorized")
            hdr = {"Authorization": "Bearer t"}
            api.inject(status=429, retry_after=3)
            async with s.get(api.url + "/api/v1/services", headers=hdr) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "3"
            async with s.get(api.url + "/api/v1/services", headers=hdr) as r:
                assert r.status == 200
            # A dropped connection: aiohttp retries an idempotent GET once, so drop twice.
            api.inject(status=0, count=2)
            with pytest.raises(aiohttp.ClientError):
                async with s.get(api.url + "/api/v1/services", headers=hdr) as r:
                    await r.read()

    run(main())
