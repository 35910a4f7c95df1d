"""Which kernel a lab runs in (no kernel needed): ``kernel: auto`` picks UML for IPVS on a host without it.

No addresses: pure decisions.
"""

from __future__ import annotations

import pytest

from kubelab.netlab.umllab import resolve_kernel


@pytest.mark.parametrize(
    "kernel,mode,has_ipvs,expect",
    [
        pytest.param("auto", "ipvs", False, "uml", id="auto-ipvs-host-without-ipvs"),
        pytest.param("auto", "ipvs", True, "host", id="auto-ipvs-host-with-ipvs"),
        pytest.param("auto", "iptables", False, "host", id="auto-iptables"),
        pytest.param("auto", "none", False, "host", id="auto-none"),
        pytest.param("uml", "iptables", True, "uml", id="explicit-uml"),
        pytest.param("host", "ipvs", False, "host", id="explicit-host-wins"),
    ],
)
def test_resolve_kernel(kernel, mode, has_ipvs, expect):
    assert resolve_kernel(kernel, mode, has_ipvs) == expect
