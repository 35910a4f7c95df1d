"""The proxy modes, in one explicit table.

Each entry is "module:Class" of a :class:`kubelab.proxy.provider.Dataplane`
subclass whose constructor takes a :class:`~kubelab.proxy.provider.ModeDeps`.
Imported lazily so that, say, the iptables mode does not import pyroute2.
"""

from __future__ import annotations

import importlib

from kubelab.proxy.provider import Dataplane, ModeDeps

MODES: dict[str, str] = {
    "userspace": "kubelab.modes.userspace.proxier:UserspaceProxier",
    "iptables": "kubelab.modes.iptables.proxier:IPTablesProxier",
    "ipvs": "kubelab.modes.ipvs.proxier:IPVSProxier",
}


def make_mode(name: str, deps: ModeDeps) -> Dataplane:
    """Build the dataplane for ``--proxy-mode name``."""
    try:
        target = MODES[name]
    except KeyError:
        raise ValueError(f"unknown proxy mode {name!r}: choose one of {', '.join(sorted(MODES))}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(deps)
