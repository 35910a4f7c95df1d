"""Shared fixtures for kernel tests (root, network namespaces on the host kernel).

* ``lab_name`` -- a lab name unique to this test process and test, so
  concurrent test runs (other rooms, other sessions) never collide.
* ``make_lab`` -- ``make_lab(spec_or_path, **lab_overrides) -> Lab``: brings a
  lab up (``kubelab.netlab.lab.Lab.up``) under a unique name and always tears
  it down at teardown, checking nothing of it is left behind.
* ``netns`` -- ``netns() -> name``: a bare network namespace of your own,
  removed (with every process inside) at teardown.
* ``leftovers(name)`` -- what remains of a lab (namespaces, /etc/netns
  entries, processes, state dir): an empty list means clean.
"""

from __future__ import annotations

import pytest

from kubelab.netlab.testing import leftovers, unique_lab_name

__all__ = ["leftovers", "unique_lab_name"]


@pytest.fixture
def lab_name() -> str:
    return unique_lab_name()


@pytest.fixture
def make_lab():
    from kubelab.netlab.lab import Lab
    from kubelab.netlab.spec import LabSpec

    labs: list = []

    def make(spec, **overrides):
        if not isinstance(spec, LabSpec):
            spec = LabSpec.from_file(spec, name=overrides.pop("name", None) or unique_lab_name(), **overrides)
        lab = Lab.up(spec)
        labs.append(lab)
        return lab

    yield make
    problems = []
    for lab in labs:
        lab.down()
        left = leftovers(lab.name)
        if left:
            problems.append(f"lab {lab.name} left behind: {left}")
    assert not problems, problems


@pytest.fixture
def netns():
    from kubelab.netlab import nsutil

    made: list[str] = []

    def make() -> str:
        name = unique_lab_name("kl-test-")
        nsutil.add(name)
        made.append(name)
        return name

    yield make
    for name in made:
        nsutil.kill_pids(nsutil.pids_in(name))
        nsutil.remove(name)
