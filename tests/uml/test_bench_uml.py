"""``kubelab bench`` with a lab inside User-Mode Linux: the IPVS data path and control plane, end to end.

Runs ``python -m kubelab bench --suites datapath,control --modes uml:ipvs
--runs 1`` (the lab boots its own UML kernel; this module does not use the
shared ``uml`` fixture) and checks the outputs are produced and sane --
never how fast anything was.

Addresses, all inside the UML kernel's namespaces (lab ``kb<pid>-uml``):
pod CIDR 10.244.0.0/16 (node1 10.244.0.0/24 with the client pod, node2
10.244.1.0/24 with the backends and control-plane endpoints at
10.244.1.203-250), service CIDR 10.96.0.0/12, underlay 172.18.0.0/24.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubelab.netlab.testing import leftovers

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-uml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubelab", "bench", "--suites", "datapath,control", "--modes", "uml:ipvs",
         "--runs", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=800)
    except subprocess.TimeoutExpired:
        proc.send_signal(2)  # SIGINT: the CLI tears its labs down
        stdout, stderr = proc.communicate(timeout=120)
    return {"rc": proc.returncode, "stderr": stderr, "out": out, "lab": f"kb{proc.pid % 100000}-uml"}


def test_runs_clean_and_leaves_nothing(bench_run):
    assert bench_run["rc"] == 0, bench_run["stderr"][-3000:]
    assert leftovers(bench_run["lab"]) == []


@pytest.mark.parametrize(
    "figure,unit",
    [("connection setup p50 (connect + first answer)", "µs"), ("short connections/s (wrk, Connection: close)", "conn/s"),
     ("bulk TCP throughput (iperf3)", "MB/s"), ("UDP round trips/s (dnsperf, 10 in flight)", "q/s")],
    ids=["setup", "short", "bulk", "udp"],
)
def test_ipvs_figures_against_direct(bench_run, figure, unit):
    assert bench_run["rc"] == 0, bench_run["stderr"][-3000:]
    doc = json.loads((bench_run["out"] / "results.json").read_text())
    (f,) = [f for f in doc["figures"] if f["name"] == figure and f["subject"] == "ipvs (uml kernel)"]
    assert f["unit"] == unit and f["peer"] == "direct to pod"
    assert f["value"]["median"] > 0 and f["peer_value"]["median"] > 0 and f["ratio"]["n"] == 1


def test_control_plane_in_uml(bench_run):
    assert bench_run["rc"] == 0, bench_run["stderr"][-3000:]
    doc = json.loads((bench_run["out"] / "results.json").read_text())
    (f,) = [f for f in doc["figures"] if f["suite"] == "control plane"]
    # Corrected for the UML kernel's clock offset: a latency, not a clock difference.
    assert f["subject"] == "ipvs (uml kernel)" and all(0 < s < 60 for s in f["value"]["samples"])
    assert (bench_run["out"] / "control-plane-network-programming-latency.png").read_bytes()[:4] == b"\x89PNG"
