"""iptables mode's --cleanup in a kernel without nf_tables (UML 6.1's module set).

Addresses: none (rules only, in a network namespace ``kl-iptu-<pid>`` inside UML).
kube-proxy's cleanup tries every backend; one this kernel lacks holds nothing
of ours, so it must not fail the cleanup (it did: every `kubelab bench` mode
switch inside UML reported a failed --cleanup).
"""

from __future__ import annotations

import os
import sys

NS = f"kl-iptu-{os.getpid()}"


def test_cleanup_skips_the_missing_nft_backend_and_cleans_legacy(uml_clean):
    uml = uml_clean
    assert uml.run(["iptables-nft", "-t", "nat", "-S"]).returncode != 0, "this UML kernel has nf_tables now: test moot"
    uml.run(["ip", "netns", "add", NS], check=True)
    try:
        inns = ["ip", "netns", "exec", NS]
        for args in (["-t", "nat", "-N", "KUBE-SERVICES"], ["-t", "nat", "-A", "KUBE-SERVICES", "-j", "RETURN"],
                     ["-t", "nat", "-N", "FOREIGN"]):
            uml.run([*inns, "iptables-legacy", *args], check=True)
        r = uml.run([*inns, sys.executable, "-m", "kubelab", "proxy", "--proxy-mode", "iptables", "--cleanup"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "skipping cleanup on the nft backend" in r.stdout + r.stderr
        left = uml.run([*inns, "iptables-legacy-save", "-t", "nat"], check=True).stdout
        assert "KUBE-SERVICES" not in left and ":FOREIGN" in left, left
    finally:
        uml.run(["ip", "netns", "delete", NS])
