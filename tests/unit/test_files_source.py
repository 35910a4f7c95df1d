"""kubelab.proxy.sources.files: the watched manifest folder feeding a recording Provider.

Most tests drive the source one poll at a time (``poll_once``), so they are
exact about which events a change produces; the ``run()`` tests use the real
polling loop and wait (generously, no timing assertions) for the events.

Addresses used (manifest values only, nothing is sent): services
10.96.0.0/16, pods 10.244.0.0/16, plus examples/basic's (see its README).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest

from kubelab.model import EndpointSlice, Service
from kubelab.proxy.provider import Provider
from kubelab.proxy.sources.files import FilesSource

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "basic"


class Recorder(Provider):
    """A Provider that records every call as (method, object names...)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _rec(self, method, *objs):
        self.calls.append((method, *(f"{o.meta.namespace}/{o.meta.name}" if o.meta.namespace else o.meta.name
                                     for o in objs)))
        self.last = objs

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls

    def on_service_add(self, service): self._rec("service_add", service)
    def on_service_update(self, old, new): self._rec("service_update", old, new)
    def on_service_delete(self, service): self._rec("service_delete", service)
    def on_services_synced(self): self.calls.append(("services_synced",))
    def on_endpoint_slice_add(self, s): self._rec("slice_add", s)
    def on_endpoint_slice_update(self, old, new): self._rec("slice_update", old, new)
    def on_endpoint_slice_delete(self, s): self._rec("slice_delete", s)
    def on_endpoint_slices_synced(self): self.calls.append(("slices_synced",))
    def on_pod_add(self, pod): self._rec("pod_add", pod)
    def on_pod_update(self, old, new): self._rec("pod_update", old, new)
    def on_pod_delete(self, pod): self._rec("pod_delete", pod)
    def on_pods_synced(self): self.calls.append(("pods_synced",))
    def on_node_add(self, node): self._rec("node_add", node)
    def on_node_update(self, old, new): self._rec("node_update", old, new)
    def on_node_delete(self, node): self._rec("node_delete", node)
    def on_nodes_synced(self): self.calls.append(("nodes_synced",))


def service(name: str, ip: str, port: int = 80, extra: str = "") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {ip}\n"
            f"  ports:\n  - port: {port}\n{extra}")


def endpoint_slice(svc: str, *ips: str) -> str:
    eps = "".join(f"- addresses: [{ip}]\n" for ip in ips)
    return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-x1\n"
            f"  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n- port: 8080\n"
            f"endpoints:\n{eps}")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "10-web.yaml").write_text(service("web", "10.96.0.10") + "---\n" + endpoint_slice("web", "10.244.1.5"))
    (d / "20-db.yaml").write_text(service("db", "10.96.0.20", 5432))
    return d


@pytest.fixture
def source(folder):
    rec = Recorder()
    src = FilesSource(folder, [rec], logging.getLogger("test.files"))
    src.poll_once(initial=True)
    rec.take()
    return src, rec


def settle(src: FilesSource) -> list[tuple]:
    """Two polls: a change is applied once the file looked the same twice."""
    first = src.poll_once()
    assert first == [], "a change must wait one poll for the file to settle"
    src.poll_once()
    return src.handlers[0].take()


def write(path: Path, text: str) -> None:
    path.write_text(text)


# ---------------------------------------------------------------------------
# Initial load
# ---------------------------------------------------------------------------


def test_initial_load_then_synced(folder):
    async def main():
        rec = Recorder()
        src = FilesSource(folder, rec, logging.getLogger("test.files"))  # one provider, not a list: accepted
        task = asyncio.ensure_future(src.run())
        try:
            for _ in range(200):
                if src.synced:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return rec.calls

    calls = asyncio.run(main())
    assert calls == [
        ("service_add", "default/web"), ("service_add", "default/db"), ("slice_add", "default/web-x1"),
        ("nodes_synced",), ("services_synced",), ("slices_synced",), ("pods_synced",),
    ]


def test_example_folder_initial_events():
    rec = Recorder()
    src = FilesSource(EXAMPLE, [rec])
    src.poll_once(initial=True)
    adds = [c for c in rec.calls if c[0].endswith("_add")]
    assert len(adds) == 20 and src.errors == []
    # Nodes, then services, then slices, then pods.
    order = [c[0] for c in adds]
    assert order == sorted(order, key=["node_add", "service_add", "slice_add", "pod_add"].index)


# ---------------------------------------------------------------------------
# Edits become add / update / delete
# ---------------------------------------------------------------------------


EDITS = [
    ("edit-updates", lambda d: write(d / "20-db.yaml", service("db", "10.96.0.21", 5432)),
     [("service_update", "default/db", "default/db")]),
    ("new-file-adds", lambda d: write(d / "30-cache.yaml", service("cache", "10.96.0.30", 6379)),
     [("service_add", "default/cache")]),
    ("new-document-adds", lambda d: write(d / "20-db.yaml", service("db", "10.96.0.20", 5432) + "---\n"
                                          + endpoint_slice("db", "10.244.2.7")),
     [("slice_add", "default/db-x1")]),
    ("deleted-file-deletes", lambda d: (d / "20-db.yaml").unlink(), [("service_delete", "default/db")]),
    ("removed-document-deletes", lambda d: write(d / "10-web.yaml", service("web", "10.96.0.10")),
     [("slice_delete", "default/web-x1")]),
    ("renamed-file-no-events", lambda d: os.rename(d / "20-db.yaml", d / "25-db.yaml"), []),
    ("moved-into-subfolder-no-events", lambda d: ((d / "sub").mkdir(), os.rename(d / "20-db.yaml", d / "sub" / "db.yaml")),
     []),
    ("touch-no-events", lambda d: os.utime(d / "20-db.yaml", None), []),
    ("reformat-no-events", lambda d: write(d / "20-db.yaml", "# a comment moves the object down\n\n"
                                           + service("db", "10.96.0.20", 5432)), []),
    ("same-size-edit-updates", lambda d: write(d / "20-db.yaml", service("db", "10.96.0.20", 5433)),
     [("service_update", "default/db", "default/db")]),
    ("slice-endpoint-change", lambda d: write(d / "10-web.yaml", service("web", "10.96.0.10") + "---\n"
                                              + endpoint_slice("web", "10.244.1.5", "10.244.1.6")),
     [("slice_update", "default/web-x1", "default/web-x1")]),
    ("hidden-file-ignored", lambda d: write(d / ".20-db.yaml.swp", "garbage: ["), []),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in EDITS], ids=[c[0] for c in EDITS])
def test_edit(source, folder, edit, expected):
    src, rec = source
    edit(folder)
    assert settle(src) == expected
    assert src.errors == []
    # Nothing further happens on later polls.
    src.poll_once()
    assert rec.take() == []


def test_update_carries_old_and_new(source, folder):
    src, rec = source
    write(folder / "20-db.yaml", service("db", "10.96.0.21", 5432))
    settle(src)
    old, new = rec.last
    assert (old.cluster_ip, new.cluster_ip) == ("10.96.0.20", "10.96.0.21")
    assert src.objects[("Service", "default", "db")] == new


def test_partial_write_is_not_applied(source, folder):
    src, rec = source
    full = service("db", "10.96.0.20", 5432) + "---\n" + service("db2", "10.96.0.22", 5433)
    write(folder / "20-db.yaml", full[: len(full) // 2 + 20])  # the writer is halfway through
    assert src.poll_once() == []
    write(folder / "20-db.yaml", full)  # ... and finishes before the file settled
    assert src.poll_once() == []
    src.poll_once()
    assert rec.take() == [("service_add", "default/db2")]


def test_two_quick_same_size_writes_both_seen(source, folder):
    # Same size, possibly the same mtime tick: the content digest tells them apart.
    src, rec = source
    path = folder / "20-db.yaml"
    st = path.stat()
    write(path, service("db", "10.96.0.20", 5433))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert settle(src) == [("service_update", "default/db", "default/db")]
    write(path, service("db", "10.96.0.20", 5434))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert settle(src) == [("service_update", "default/db", "default/db")]


# ---------------------------------------------------------------------------
# Bad input keeps the last good state
# ---------------------------------------------------------------------------


def test_invalid_object_keeps_last_good_and_logs_once(source, folder, caplog):
    src, rec = source
    caplog.set_level(logging.INFO, logger="test.files")
    path = folder / "20-db.yaml"
    bad = service("db", "10.96.0.20", 5432) + "    nodePort: 30432\n"  # a nodePort on a ClusterIP service
    write(folder / "10-web.yaml", service("web", "10.96.0.11") + "---\n" + endpoint_slice("web", "10.244.1.5"))
    write(path, bad + "---\n" + service("db2", "10.96.0.22", 5433))
    # The good objects in the same file and in other files flow; the bad one stays as it was.
    assert sorted(settle(src)) == [("service_add", "default/db2"), ("service_update", "default/web", "default/web")]
    (err,) = src.errors
    text = str(err)
    assert text.startswith(f"{path}:1: Service default/db: spec.ports[0].nodePort: Forbidden: "
                           "may not be used when `type` is 'ClusterIP'"), text
    assert src.objects[("Service", "default", "db")].cluster_ip == "10.96.0.20"
    for _ in range(4):
        src.poll_once()
    errors_logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors_logged) == 1
    assert "the last good version stays in force" in errors_logged[0].getMessage()
    assert rec.take() == []
    # Fixed: the new version is delivered and the error is gone.
    write(path, service("db", "10.96.0.23", 5432) + "---\n" + service("db2", "10.96.0.22", 5433))
    assert settle(src) == [("service_update", "default/db", "default/db")]
    assert src.errors == []
    assert any("resolved:" in r.getMessage() for r in caplog.records)


def test_invalid_new_object_is_not_added(source, folder):
    src, rec = source
    write(folder / "30-bad.yaml", service("bad", "10.96.0.300"))
    assert settle(src) == []
    (err,) = src.errors
    assert "spec.clusterIP" in str(err) and "30-bad.yaml:1" in str(err)


def test_invalid_object_removed_is_deleted(source, folder):
    src, rec = source
    write(folder / "20-db.yaml", service("db", "10.96.0.20", 0))
    assert settle(src) == []
    (folder / "20-db.yaml").unlink()
    assert settle(src) == [("service_delete", "default/db")]
    assert src.errors == []


def test_broken_yaml_keeps_the_files_objects(source, folder, caplog):
    src, rec = source
    caplog.set_level(logging.INFO, logger="test.files")
    write(folder / "10-web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n")  # mid-edit
    write(folder / "20-db.yaml", service("db", "10.96.0.21", 5432))
    assert settle(src) == [("service_update", "default/db", "default/db")]
    (err,) = src.errors
    assert err.file_level and str(err).startswith(f"{folder}/10-web.yaml:") and "cannot parse YAML" in str(err)
    assert ("Service", "default", "web") in src.objects and ("EndpointSlice", "default", "web-x1") in src.objects
    for _ in range(3):
        src.poll_once()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    write(folder / "10-web.yaml", service("web", "10.96.0.10"))  # parses again: now the slice is really gone
    assert settle(src) == [("slice_delete", "default/web-x1")]
    assert src.errors == []


def test_unreadable_file_keeps_objects(source, folder):
    src, rec = source
    (folder / "20-db.yaml").write_bytes(b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff}\n")
    assert settle(src) == []
    (err,) = src.errors
    assert "cannot read the file" in str(err)
    assert ("Service", "default", "db") in src.objects


def test_invalid_endpoints_keep_their_mirrored_slices(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    ep = ("apiVersion: v1\nkind: Endpoints\nmetadata: {name: legacy}\nsubsets:\n"
          "- addresses: [{ip: %s}]\n  ports: [{port: 9000}]\n")
    write(d / "ep.yaml", ep % "10.244.1.30")
    rec = Recorder()
    src = FilesSource(d, [rec])
    src.poll_once(initial=True)
    assert rec.take()[:1] == [("slice_add", "default/legacy-0")]
    write(d / "ep.yaml", ep % "10.244.1.999")
    assert settle(src) == []
    (err,) = src.errors
    assert "Endpoints default/legacy: subsets[0].addresses[0].ip" in str(err)
    assert src.objects[("EndpointSlice", "default", "legacy-0")].endpoints[0].addresses == ("10.244.1.30",)
    write(d / "ep.yaml", ep % "10.244.1.31")
    assert settle(src) == [("slice_update", "default/legacy-0", "default/legacy-0")]


def test_duplicate_across_files_first_wins_then_second_takes_over(source, folder):
    src, rec = source
    write(folder / "30-db-copy.yaml", service("db", "10.96.0.99", 5432))
    assert settle(src) == []
    (err,) = src.errors
    assert str(err).startswith(f"{folder}/30-db-copy.yaml:1: Service default/db: metadata.name: Duplicate value")
    assert f"already defined at {folder}/20-db.yaml:1" in str(err)
    assert src.objects[("Service", "default", "db")].cluster_ip == "10.96.0.20"
    (folder / "20-db.yaml").unlink()  # the copy is now the only definition
    assert settle(src) == [("service_update", "default/db", "default/db")]
    assert src.objects[("Service", "default", "db")].cluster_ip == "10.96.0.99" and src.errors == []


def test_provider_exception_does_not_stop_others(source, folder, caplog):
    src, rec = source

    class Broken(Recorder):
        def on_service_update(self, old, new):
            raise RuntimeError("boom")

    broken = Broken()
    src.handlers.insert(0, broken)
    write(folder / "20-db.yaml", service("db", "10.96.0.21", 5432))
    src.poll_once()
    src.poll_once()
    assert rec.take() == [("service_update", "default/db", "default/db")]
    assert any("Broken.on_service_update failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# A single file as the source
# ---------------------------------------------------------------------------


def test_single_file_deleted_and_recreated(tmp_path):
    f = tmp_path / "all.yaml"
    write(f, service("web", "10.96.0.10"))
    rec = Recorder()
    src = FilesSource(f, [rec])
    src.poll_once(initial=True)
    assert rec.take() == [("service_add", "default/web")]
    f.unlink()
    assert settle(src) == [("service_delete", "default/web")]
    assert any("no such file or directory" in str(e) for e in src.errors)
    write(f, service("web", "10.96.0.10"))
    assert settle(src) == [("service_add", "default/web")]
    assert src.errors == []


def test_editor_backup_rename_window_is_not_a_delete(tmp_path):
    # vim (backupcopy=no) renames the file away and writes a new one; a poll
    # that lands in between must not delete everything.
    f = tmp_path / "all.yaml"
    write(f, service("web", "10.96.0.10"))
    rec = Recorder()
    src = FilesSource(f, [rec])
    src.poll_once(initial=True)
    rec.take()
    os.rename(f, tmp_path / "all.yaml~")
    assert src.poll_once() == []
    write(f, service("web", "10.96.0.11"))
    src.poll_once()
    src.poll_once()
    assert rec.take() == [("service_update", "default/web", "default/web")]


def test_load_once_does_not_deliver(folder):
    rec = Recorder()
    src = FilesSource(folder, [rec])
    r = src.load_once()
    assert sorted(o.name for o in r.objects) == ["db", "web", "web-x1"]
    assert rec.calls == []


# ---------------------------------------------------------------------------
# The real polling loop
# ---------------------------------------------------------------------------


async def _wait_for(pred, what: str, deadline: float = 15.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_run_delivers_edits_add_update_delete(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(EXAMPLE, d)

    async def main():
        rec = Recorder()
        src = FilesSource(d, [rec], logging.getLogger("test.files"))
        task = asyncio.ensure_future(src.run())
        try:
            await _wait_for(lambda: ("pods_synced",) in rec.calls, "the initial sync")
            rec.take()
            text = (d / "services.yaml").read_text()
            write(d / "services.yaml", text.replace("port: 9000\n    targetPort: 9000", "port: 9001\n    targetPort: 9000"))
            await _wait_for(lambda: rec.calls, "the update")
            assert rec.take() == [("service_update", "default/legacy", "default/legacy")]
            assert rec.last[1].ports[0].port == 9001
            write(d / "extra.yaml", service("extra", "10.96.100.99"))
            await _wait_for(lambda: rec.calls, "the add")
            assert rec.take() == [("service_add", "default/extra")]
            (d / "endpoints.yaml").unlink()
            await _wait_for(lambda: rec.calls, "the delete")
            assert rec.take() == [("slice_delete", "default/legacy-0")]
            # A broken object among good ones: the good change lands, the bad one is held.
            write(d / "extra.yaml", service("extra", "10.96.100.99", 70000) + "---\n" + service("more", "10.96.100.98"))
            await _wait_for(lambda: rec.calls, "the add next to a broken object")
            assert rec.take() == [("service_add", "default/more")]
            (err,) = src.errors
            assert f"{d}/extra.yaml:1: Service default/extra: spec.ports[0].port: Invalid value: 70000" in str(err)
            assert src.objects[("Service", "default", "extra")].ports[0].port == 80
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_run_survives_a_missing_source_that_appears_later(tmp_path):
    d = tmp_path / "later"

    async def main():
        rec = Recorder()
        src = FilesSource(d, [rec])
        task = asyncio.ensure_future(src.run())
        try:
            await _wait_for(lambda: ("services_synced",) in rec.calls, "the (empty) initial sync")
            assert [e for e in src.errors if "no such file or directory" in str(e)]
            rec.take()
            d.mkdir()
            write(d / "svc.yaml", service("web", "10.96.0.10"))
            await _wait_for(lambda: rec.calls, "the add")
            assert rec.take() == [("service_add", "default/web")]
            assert src.errors == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_provider_model_types(folder):
    rec = Recorder()
    src = FilesSource(folder, [rec])
    src.poll_once(initial=True)
    assert isinstance(src.objects[("Service", "default", "web")], Service)
    assert isinstance(src.objects[("EndpointSlice", "default", "web-x1")], EndpointSlice)
