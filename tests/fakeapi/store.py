"""The fake API server's storage: every object version under one global resourceVersion.

Like etcd behind a real kube-apiserver: one revision counter for all kinds,
each write gets the next revision, old revisions stay readable (for
``continue`` tokens and watches that resume) until compacted.  Compaction
at revision C makes every read or watch *at* a revision older than C answer
410 Gone (reason ``Expired``).
"""

from __future__ import annotations

import bisect
import copy
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResourceType:
    """One API resource: where it is served and what it supports."""

    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool
    field_labels: frozenset[str]
    verbs: tuple[str, ...] = ("get", "list", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


_META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "services", "Service", True, _META_FIELDS | {"spec.clusterIP", "spec.type"}),
    ResourceType("", "v1", "endpoints", "Endpoints", True, _META_FIELDS),
    ResourceType(
        "", "v1", "pods", "Pod", True,
        _META_FIELDS | {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                        "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"},
    ),
    ResourceType("", "v1", "nodes", "Node", False, frozenset({"metadata.name", "spec.unschedulable"})),
    ResourceType("", "v1", "namespaces", "Namespace", False, frozenset({"metadata.name", "status.phase"})),
    ResourceType("", "v1", "events", "Event", True, _META_FIELDS, ("create", "get", "list", "watch")),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, _META_FIELDS | {"addressType"}),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, _META_FIELDS, ("create", "get", "list", "watch")),
)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Change:
    """One write, as a watch sees it."""

    rv: int
    resource: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict  # the new object (for DELETED: the last state, stamped with the deletion's RV)
    old: dict | None  # the previous state (None for ADDED)


@dataclass
class _History:
    rvs: list[int] = field(default_factory=list)
    objs: list[dict | None] = field(default_factory=list)  # None = deleted at that rv

    def at(self, rv: int) -> dict | None:
        i = bisect.bisect_right(self.rvs, rv)
        return self.objs[i - 1] if i else None


class Store:
    """All objects of all resources, versioned."""

    def __init__(self, start_rv: int = 1000) -> None:
        self.rv = start_rv  # the latest revision; a real cluster never starts at 0
        self.compacted = start_rv  # reads/watches at revisions older than this are Expired
        self._data: dict[str, dict[tuple[str, str], _History]] = {}
        self.log: list[Change] = []
        self.listeners: list[Callable[[Change], None]] = []
        self._sorted: dict[str, list[tuple[str, str]]] = {}  # key order cache, per resource

    @staticmethod
    def key_of(resource: ResourceType, obj: dict) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace", "") if resource.namespaced else "", meta.get("name", ""))

    def _hist(self, resource: ResourceType) -> dict[tuple[str, str], _History]:
        return self._data.setdefault(f"{resource.group}/{resource.plural}", {})

    def get(self, resource: ResourceType, key: tuple[str, str], rv: int | None = None) -> dict | None:
        h = self._hist(resource).get(key)
        if h is None:
            return None
        return h.at(self.rv if rv is None else rv)

    def sorted_keys(self, resource: ResourceType) -> list[tuple[str, str]]:
        """Every key ever stored for ``resource`` (live or not), in etcd's key order."""
        name = f"{resource.group}/{resource.plural}"
        keys = self._sorted.get(name)
        if keys is None:
            keys = self._sorted[name] = sorted(self._hist(resource))
        return keys

    def snapshot(self, resource: ResourceType, rv: int | None = None,
                 after: tuple[str, str] | None = None) -> Iterator[tuple[tuple[str, str], dict]]:
        """Live objects of ``resource`` at revision ``rv`` (default latest), in key order, after ``after``."""
        at = self.rv if rv is None else rv
        hists = self._hist(resource)
        keys = self.sorted_keys(resource)
        start = bisect.bisect_right(keys, after) if after is not None else 0
        for key in keys[start:]:
            obj = hists[key].at(at)
            if obj is not None:
                yield key, obj

    def write(self, resource: ResourceType, obj: dict | None, key: tuple[str, str]) -> Change | None:
        """Create, replace (obj given) or delete (obj None) one object; returns the change."""
        old = self.get(resource, key)
        if obj is None and old is None:
            return None
        self.rv += 1
        if obj is None:
            stamped = copy.deepcopy(old)
            stamped["metadata"]["resourceVersion"] = str(self.rv)
            change = Change(self.rv, resource, "DELETED", stamped, old)
            stored = None
        else:
            obj = copy.deepcopy(obj)
            obj["kind"] = resource.kind
            obj["apiVersion"] = resource.api_version
            meta = obj.setdefault("metadata", {})
            if resource.namespaced:
                meta.setdefault("namespace", "default")
            elif "namespace" in meta:
                del meta["namespace"]
            meta["resourceVersion"] = str(self.rv)
            meta["uid"] = (old or {}).get("metadata", {}).get("uid") or meta.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = (old or {}).get("metadata", {}).get("creationTimestamp") or now_rfc3339()
            change = Change(self.rv, resource, "MODIFIED" if old is not None else "ADDED", obj, old)
            stored = obj
        hists = self._hist(resource)
        if key not in hists:
            self._sorted.pop(f"{resource.group}/{resource.plural}", None)
        h = hists.setdefault(key, _History())
        h.rvs.append(self.rv)
        h.objs.append(stored)
        self.log.append(change)
        for listener in list(self.listeners):
            listener(change)
        return change

    def changes_since(self, resource: ResourceType, rv: int) -> list[Change]:
        """Every change of ``resource`` after revision ``rv`` (the caller checked rv >= compacted)."""
        i = bisect.bisect_right([c.rv for c in self.log], rv)
        return [c for c in self.log[i:] if c.resource == resource]

    def compact(self, rv: int | None = None) -> None:
        """Forget history before ``rv`` (default: now), as etcd compaction does."""
        rv = self.rv if rv is None else rv
        self.compacted = max(self.compacted, rv)
        self.log = [c for c in self.log if c.rv > self.compacted]
        for hists in self._data.values():
            for key in list(hists):
                h = hists[key]
                i = bisect.bisect_right(h.rvs, self.compacted)
                keep_from = max(i - 1, 0)
                h.rvs, h.objs = h.rvs[keep_from:], h.objs[keep_from:]
                if len(h.objs) == 1 and h.objs[0] is None:
                    del hists[key]
        self._sorted.clear()
