"""The IPVS mode's kernel adapters against the real UML kernel (no traffic): ipsets created over nfnetlink.

No addresses: only ipsets, in a network namespace of its own
(``kl-ipvs-sets``) so the shared kernel's root namespace is untouched.
"""

from __future__ import annotations

import re

import pytest

from kubelab.modes.ipvs import render as R

NS = "kl-ipvs-sets"

CREATE_AND_LIST = r"""
import subprocess
from kubelab.modes.ipvs.kernel import IPSets
from kubelab.netlab import nsutil

def headers(names):
    out = {}
    for name in names:
        text = subprocess.run(["ipset", "list", "-t", name], capture_output=True, text=True, check=True).stdout
        out[name] = text
    return out

with nsutil.entered(NS):
    specs = list(SPECS)
    for i, spec in enumerate(specs):  # the ipset tool's sets, under other names
        argv = spec.create_argv()
        argv[2] = f"KL-TOOL-{i}"
        subprocess.run(argv, check=True, capture_output=True)
    sets = IPSets(lambda *a, **k: (1, "", "not used"))
    try:
        sets.create_all(specs)
        sets.create_all(specs)  # -exist: the second time is no error
        ours = headers([s.name for s in specs])
        tools = headers([f"KL-TOOL-{i}" for i in range(len(specs))])
    finally:
        sets.close()
(ours, tools)
"""


@pytest.fixture
def netns(uml_clean):
    uml_clean.run(["ip", "netns", "add", NS], check=True)
    try:
        yield uml_clean
    finally:
        uml_clean.run(["ip", "netns", "delete", NS])


def _comparable(text: str) -> str:
    # Name, references and memory differ; initval is random per set.
    keep = [line for line in text.splitlines() if line.split(":")[0] in ("Type", "Revision", "Header")]
    return re.sub(r"\s*initval 0x[0-9a-f]+", "", "\n".join(keep))


def test_sets_created_over_netlink_match_the_ipset_tools(netns):
    ours, tools = netns.python(f"NS = {NS!r}\nfrom kubelab.modes.ipvs import render as R\nSPECS = R.IPSETS\n" + CREATE_AND_LIST,
                               timeout=120)
    assert len(ours) == len(R.IPSETS) == 17
    for i, spec in enumerate(R.IPSETS):
        mine, theirs = _comparable(ours[spec.name]), _comparable(tools[f"KL-TOOL-{i}"])
        assert mine == theirs, f"{spec.name}:\n{mine}\n--- ipset create made ---\n{theirs}"
        assert "comment" in mine and f"Type: {spec.set_type}" in mine, mine
