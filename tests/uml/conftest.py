"""Fixtures for tests/uml: one User-Mode Linux boot serves the whole session.

``uml`` is a booted :class:`kubelab.netlab.uml.UMLKernel` with the IPVS,
netfilter and link modules loaded.  Tests share it, so each test must leave
the kernel as it found it: work in network namespaces named with the
``kl-ipvs-`` prefix (or the test's own prefix) and remove them, flush what
they added, stop what they started -- in fixture teardown, so failures clean
up too.  ``uml_clean`` checks after each test that no namespaces, IPVS
services or UML processes were left behind.
"""

from __future__ import annotations

import os

import pytest

from kubelab.netlab.uml import UMLKernel


@pytest.fixture(scope="session")
def uml():
    if os.environ.get("KUBELAB_IN_UML"):
        pytest.fail("tests/uml run on the host and boot their own UML kernel; do not run them inside UML")
    with UMLKernel() as kernel:
        yield kernel


@pytest.fixture
def uml_clean(uml):
    """The shared kernel, checked to be left clean (no netns, no IPVS services in the root namespace)."""
    yield uml
    leftovers = uml.run(["ip", "netns", "list"]).stdout.split()
    ipvs = uml.run(["ipvsadm", "-Sn"]).stdout.strip()
    # Clean up for the next test before failing this one.
    for name in leftovers:
        if not name.startswith("("):
            uml.run(["ip", "netns", "delete", name])
    if ipvs:
        uml.run(["ipvsadm", "-C"])
    assert not [n for n in leftovers if not n.startswith("(")], f"test left network namespaces behind: {leftovers}"
    assert not ipvs, f"test left IPVS services behind:\n{ipvs}"
