"""Helpers for tests that use labs (any room): unique names and a leak check.

``unique_lab_name()`` gives a lab name no concurrently running test
(this process or another) uses; ``leftovers(name)`` lists whatever of a lab
still exists -- namespaces, their bind mounts, /etc/netns entries, its
directory, processes -- so a test can assert a teardown was complete.
Every link of a lab lives inside one of its namespaces (none is made in the
host's), so once no mount and no process holds a namespace, its links are gone.
"""

from __future__ import annotations

import itertools
import os

from kubelab.netlab import nsutil, topology
from kubelab.netlab.lab import lab_dir

_counter = itertools.count(1)


def unique_lab_name(prefix: str = "t") -> str:
    """``<prefix><pid>-<n>``: a valid lab name (at most 24 characters) unique across processes."""
    return f"{prefix}{os.getpid() % 100000}-{next(_counter)}"


def leftovers(name: str) -> list[str]:
    """Everything of lab ``name`` still present; an empty list means it is all gone."""
    pre = topology.prefix(name)
    left = [f"netns {n}" for n in nsutil.names(pre)]
    try:
        left += [f"/etc/netns/{n}" for n in os.listdir(topology.ETC_NETNS) if n.startswith(pre)]
    except FileNotFoundError:
        pass
    with open("/proc/self/mountinfo") as f:
        left += [f"mount {line.split()[4]}" for line in f if f"/{pre}" in line.split()[4]]
    d = lab_dir(name)
    if d.exists():
        left.append(str(d))
    marker = f"{d}/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or cmd.rstrip().endswith(str(d)) or f" {d} " in cmd:
            left.append(f"process {entry}: {cmd.strip()}")
    return left
