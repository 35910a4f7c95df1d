"""Benchmark statistics and reports (no addresses used)."""

from __future__ import annotations

import json

import pytest

from kubelab.bench.progress import Progress
from kubelab.bench.report import Figure, Results, Series
from kubelab.bench.stats import paired_ratios, percentile, summarize


@pytest.mark.parametrize(
    "samples,median,low,high",
    [
        pytest.param([3.0], 3.0, 3.0, 3.0, id="one"),
        pytest.param([1, 2, 3, 4], 2.5, 1, 4, id="even"),
        pytest.param([5, 1, 3], 3, 1, 5, id="unsorted-odd"),
    ],
)
def test_summarize(samples, median, low, high):
    s = summarize(samples)
    assert (s.median, s.low, s.high, s.n) == (median, low, high, len(samples))


def test_summarize_empty_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_percentile_interpolates():
    assert percentile([0, 10], 25) == 2.5
    assert percentile([1, 2, 3, 4, 5], 50) == 3


def test_paired_ratios_are_per_pair():
    # A noisy machine slows both halves of a pair: the ratio stays put.
    r = paired_ratios([10, 20, 40], [10, 20, 40])
    assert r.median == 1.0 and r.spread_pct == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratios([1], [1, 2])


@pytest.mark.parametrize(
    "target,ratio,met",
    [(">= 1.0", 1.2, True), (">= 1.0", 0.9, False), ("<= 1.0", 0.8, True), ("", 1.0, None)],
    ids=["ge-met", "ge-missed", "le-met", "no-target"],
)
def test_figure_target(target, ratio, met):
    f = Figure("s", "n", "kubelab", "x", summarize([1]), "peer", summarize([1]), summarize([ratio]), target)
    assert f.meets_target() is met


def test_results_write_json_markdown_and_plot(tmp_path):
    r = Results(command="kubelab bench --quick")
    r.figures.append(Figure("dns", "queries/s", "kubelab dns", "q/s", summarize([100, 110]), "dnsmasq",
                            summarize([100, 100]), paired_ratios([100, 110], [100, 100]), ">= 1.0"))
    r.series.append(Series("scale", "sync time", "services", "s", [100, 1000],
                           {"iptables": [summarize([0.1]), summarize([1.0])]}))
    paths = r.write(tmp_path)
    doc = json.loads(paths["results.json"].read_text())
    assert doc["figures"][0]["meets_target"] is True
    assert doc["figures"][0]["ratio"]["median"] == pytest.approx(1.05)
    md = paths["results.md"].read_text()
    assert "| queries/s | kubelab dns |" in md and "![sync time](scale-sync-time.png)" in md
    png = tmp_path / "scale-sync-time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_lines_without_tty():
    import io

    t = iter([0.0, 0.0, 10.0, 20.0])
    out = io.StringIO()
    p = Progress(2, out=out, clock=lambda: next(t))
    p.step("first")
    p.step("second")
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2 0s] first")
    assert lines[1] == "[2/2 10s, ~10s left] second"
    assert lines[2].startswith("[2/2 20s] done")
