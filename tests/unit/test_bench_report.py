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


def test_progress_time_left_follows_the_step_estimates():
    import io

    # Step 1 was estimated at 10 s and took 20 s (the machine runs 2x slow):
    # step 2, estimated at 100 s, should take ~200 s more, not another 20 s.
    t = iter([0.0, 0.0, 20.0])
    out = io.StringIO()
    p = Progress(2, out=out, clock=lambda: next(t), estimates=[10, 100])
    p.step("first")
    p.step("second")
    assert out.getvalue().splitlines()[1] == "[2/2 20s, ~3m20s left] second"


# --------------------------------------------------------------------------
# kubelab bench: options, plans, bar charts, the probe's wire format
# --------------------------------------------------------------------------


def test_category_series_plots_bars_and_names_rows(tmp_path):
    r = Results(command="kubelab bench")
    r.series.append(Series("data path", "ratio to a direct connection", "figure", "ratio", [0, 1],
                           {"iptables (host)": [summarize([1.0, 1.1]), None], "ipvs (uml)": [summarize([0.9]), summarize([2.0])]},
                           categories=["setup p50", "bulk MB/s"], hline=1.0))
    paths = r.write(tmp_path)
    md = paths["results.md"].read_text()
    assert "| setup p50 | 1.05 (±4.8%, n=2) | 0.900 (±0.0%, n=1) |" in md
    assert "| bulk MB/s | - | 2.00 (±0.0%, n=1) |" in md
    assert json.loads(paths["results.json"].read_text())["series"][0]["categories"] == ["setup p50", "bulk MB/s"]
    assert (tmp_path / "data-path-ratio-to-a-direct-connection.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "text,kernel,mode",
    [("iptables", "host", "iptables"), ("ipvs", "uml", "ipvs"), ("uml:userspace", "uml", "userspace"),
     ("host:iptables", "host", "iptables")],
    ids=["bare-iptables-host", "bare-ipvs-uml", "uml-userspace", "explicit-host"],
)
def test_subject_parse(text, kernel, mode):
    from kubelab.bench.suites import Subject

    s = Subject.parse(text)
    assert (s.kernel, s.mode) == (kernel, mode)
    assert Subject.parse(s.key) == s


@pytest.mark.parametrize("text", ["nft", "vm:iptables", "host:"], ids=["unknown-mode", "unknown-kernel", "no-mode"])
def test_subject_parse_errors_say_the_form(text):
    from kubelab.bench.suites import Subject

    with pytest.raises(ValueError, match=r"KERNEL:\]MODE"):
        Subject.parse(text)


@pytest.mark.parametrize(
    "argv,problem",
    [(["--suites", "datapath,latency"], "unknown suite 'latency'"), (["--runs", "0"], "--runs must be at least 1"),
     (["--services", "100,lots"], "--services '100,lots'"), (["--modes", "bpf"], "'bpf'"),
     (["--seconds", "0"], "--seconds must be a whole number")],
    ids=["suite", "runs", "services", "mode", "seconds"],
)
def test_cli_rejects_bad_flags_with_the_flag_named(argv, problem, capsys):
    from kubelab.cli import main

    assert main(["bench", *argv, "--plan"]) == 2
    assert problem in capsys.readouterr().err


def test_quick_plan_states_duration_under_five_minutes(capsys):
    from kubelab.cli import main

    assert main(["bench", "--quick", "--plan"]) == 0
    captured = capsys.readouterr()
    assert "expected duration about" in captured.err
    line = captured.err.split("expected duration about ")[1].split()[0]
    minutes = int(line.split("m")[0]) if "m" in line else 0
    assert minutes < 5, captured.err
    steps = captured.out.splitlines()
    # Every suite is in the quick plan, IPVS runs in UML.
    for suite in ("datapath", "control", "scale", "dns"):
        assert any(s.lstrip().startswith(suite) for s in steps), suite
    assert any("ipvs (uml)" in s for s in steps)


def test_full_plan_covers_every_mode_on_both_kernels(capsys):
    from kubelab.cli import main

    assert main(["bench", "--plan", "--suites", "datapath"]) == 0
    out = capsys.readouterr().out
    for subject in ("userspace (host)", "iptables (host)", "userspace (uml)", "iptables (uml)", "ipvs (uml)"):
        assert f"data path, {subject}: start kubelab proxy" in out


def test_run_steps_skips_the_rest_of_a_failed_group_but_not_always_steps():
    from kubelab.bench.suites import BenchOptions, Context, LabPool, Step, run_steps

    ran = []

    def boom():
        raise RuntimeError("no such mode")

    ctx = Context(BenchOptions(), Results(command="x"), LabPool())
    run_steps(ctx, [Step("a start", 1, boom, "a"), Step("a measure", 1, lambda: ran.append("a measure"), "a"),
                    Step("a stop", 1, lambda: ran.append("a stop"), "a", always=True),
                    Step("b measure", 1, lambda: ran.append("b measure"), "b")])
    assert ran == ["a stop", "b measure"]
    assert ctx.failed == ["a start: not measured: no such mode"]
    assert ctx.results.notes == ["a start: not measured: no such mode"]


def test_probe_dns_query_is_a_valid_question():
    import dns.message

    from kubelab.bench.suites import probe

    q = dns.message.from_wire(probe._dns_query(7))
    assert q.id == 7 and str(q.question[0].name) == "bench.test." and q.question[0].rdtype == 1


def test_run_steps_interrupted_still_runs_always_steps():
    from kubelab.bench.suites import BenchOptions, Context, LabPool, Step, run_steps

    ran = []

    def interrupt():
        raise KeyboardInterrupt

    ctx = Context(BenchOptions(), Results(command="x"), LabPool())
    with pytest.raises(KeyboardInterrupt):
        run_steps(ctx, [Step("measure", 1, interrupt, "a"), Step("more", 1, lambda: ran.append("more"), "a"),
                        Step("stop servers", 1, lambda: ran.append("stop"), "a", always=True)])
    assert ran == ["stop"]


def test_scale_curve_is_through_the_service_over_the_reference_round_by_round(tmp_path):
    """The first-packet curve divides by the node2 reference, never by "direct" (which walks the rules too)."""
    from kubelab.bench.suites import BenchOptions, Context, LabPool
    from kubelab.bench.suites.scale import _Scale

    opts = BenchOptions.make(quick=False, subjects=("host:iptables", "uml:iptables", "uml:ipvs"), runs=2,
                             scale_counts=(100, 10000))
    ctx = Context(opts, Results(command="kubelab bench"), LabPool())
    sc = _Scale(ctx, list(opts.subjects))
    walk = {"host:iptables": 2.0, "uml:iptables": 5.0, "uml:ipvs": 0.0}  # extra per 10,000 rules, as a factor
    for key, extra in walk.items():
        for count in (100, 10000):
            for rnd, noise in enumerate((1.0, 3.0)):  # round 2 runs on a 3x slower machine
                grow = 1.0 + extra * count / 10000
                through = 300.0 * grow * noise
                # In iptables mode "direct" walks the same rules: Service / direct stays ~1.
                direct = 290.0 * (grow if key.endswith("iptables") else 1.0) * noise
                for via, v in (("service", through), ("direct", direct), ("reference", 100.0 * noise)):
                    sc.first_packet.setdefault((via, key, count), []).append(v)
    sc.report()
    res = ctx.results
    (curve,) = [s for s in res.series if s.name == "first-packet latency, ratio to a reference"]
    assert set(curve.lines) == {"iptables (host)", "iptables (uml)", "ipvs (uml)"}  # both UML subjects, not only one
    assert curve.lines["iptables (uml)"][1].median == pytest.approx(3.0 * 6.0)
    assert curve.lines["ipvs (uml)"][1].median == pytest.approx(3.0)
    assert curve.lines["iptables (host)"][0].spread_pct == pytest.approx(0.0, abs=1e-9)  # the 3x noise cancelled
    (absolute,) = [s for s in res.series if s.name == "first-packet latency (connect p50)"]
    assert absolute.log_y and absolute.styles["iptables (host), direct to pod"] == "--"
    assert absolute.styles["ipvs (uml), reference"] == ":"
    growth = {f.subject: f.ratio.median for f in res.figures if f.name.startswith("first-packet latency growth")}
    assert growth == pytest.approx({"iptables (host)": (1 + 2.0) / (1 + 0.02), "iptables (uml)": 6.0 / 1.05,
                                    "ipvs (uml)": 1.0})
    paths = res.write(tmp_path)
    md = paths["results.md"].read_text()
    assert "| 10,000 | 9.00 (±0.0%, n=2) | 18.0 (±0.0%, n=2) | 3.00 (±0.0%, n=2) |" in md, md


def test_scale_endpoints_sweep_plan_and_series(tmp_path):
    """The endpoints sweep runs at the largest count up to 1,000, ends with its pods deleted, and plots 1..E."""
    from kubelab.bench.suites import BenchOptions, Context, LabPool
    from kubelab.bench.suites import scale
    from kubelab.bench.suites.scale import _Scale, endpoints_count

    assert endpoints_count([100, 1000, 5000, 10000]) == 1000
    assert endpoints_count([5, 20]) == 20
    assert endpoints_count([5000, 10000]) == 5000
    opts = BenchOptions.make(quick=False, suites=("scale",), subjects=("host:iptables", "uml:ipvs"),
                             scale_counts=(100, 1000, 5000), scale_endpoints=(10, 5))
    assert opts.scale_endpoints == (1, 5, 10)  # 1 (the Service-count measurement) is always the base
    ctx = Context(opts, Results(command="kubelab bench"), LabPool())
    steps = [s.what for s in scale.plan(ctx)]
    at_1000 = steps.index("scale: iptables (host) at 1,000 Services (full sync and memory x3, first packets, changes)")
    assert steps[at_1000 + 1:at_1000 + 6] == [
        "scale: 5 endpoints per Service (1,000 Services) in the host lab",
        "scale: iptables (host) with 5 endpoints per Service (full sync and memory x3, changes)",
        "scale: 10 endpoints per Service (1,000 Services) in the host lab",
        "scale: iptables (host) with 10 endpoints per Service (full sync and memory x3, changes)",
        "scale: back to 1 endpoint per Service in the host lab",
    ]
    # The lab only grows to 5,000 after its extra pods are gone.
    assert steps.index("scale: back to 1 endpoint per Service in the uml lab") < steps.index("scale: 5,000 Services in the uml lab")
    assert len([s for s in steps if "endpoints per Service" in s]) == 8

    sc = _Scale(ctx, list(opts.subjects))
    for key in ("host:iptables", "uml:ipvs"):
        sc.full_sync[(key, 1000)] = [0.3]
        sc.change_sync[(key, 1000)] = [0.02, 0.03]
        sc.rss[(key, 1000)] = [99.0]
        for e in (5, 10):
            sc.ep_full_sync[(key, e)] = [0.3 * e]
            sc.ep_change_sync[(key, e)] = [0.02 * e]
            sc.ep_rss[(key, e)] = [99.0 + e]
    sc.report()
    (full,) = [s for s in ctx.results.series if s.name == "full sync time against endpoints"]
    assert full.x == [1.0, 5.0, 10.0] and full.x_label == "endpoints per Service (1,000 Services)"
    assert [v.median for v in full.lines["iptables (host)"]] == pytest.approx([0.3, 1.5, 3.0])
    (change,) = [s for s in ctx.results.series if s.name == "sync after one Service changed, against endpoints"]
    assert [v.median for v in change.lines["ipvs (uml)"]] == pytest.approx([25.0, 100.0, 200.0])  # ms
    paths = ctx.results.write(tmp_path)
    assert "endpoints per Service (1,000 Services)" in paths["results.md"].read_text()


def test_cli_endpoints_flag_errors_name_the_flag(capsys):
    from kubelab.cli import main

    assert main(["bench", "--endpoints", "1,many", "--plan"]) == 2
    assert "--endpoints '1,many'" in capsys.readouterr().err
    assert main(["bench", "--endpoints", "0", "--plan"]) == 2
    assert "--endpoints needs counts from 1 to 100" in capsys.readouterr().err


class _FakeBenchLab:
    """What the scale suite asks of a BenchLab, counting fresh proxy starts (no kernel touched)."""

    def __init__(self, full_syncs=(0.4, 0.5, 0.6)):
        self.full_syncs = list(full_syncs)
        self.starts = 0
        self.running = False
        self.probes = 0
        self.changes = 0
        self.events = []

    def start_proxy(self, mode, extra_args=(), fresh=False):
        assert fresh and not self.running
        self.starts += 1
        self.running = True
        self.events.append("start")

    def stop_proxy(self):
        self.running = False
        self.events.append("stop")

    def metrics(self):
        assert self.running
        n = self.starts
        return {"kubeproxy_sync_full_proxy_rules_duration_seconds_count": 1,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_sum": self.full_syncs[n - 1],
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count": self.changes,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum": 0.01 * self.changes}

    def rss_bytes(self):
        return (90 + self.starts) * 1_000_000

    def service_ip(self, name):
        return "10.96.0.10"

    def pod_ip(self, name):
        return "10.244.1.2"

    def probe(self, kind, host, port, count, pod=None):
        self.probes += 1
        return {"us": [100.0] * count, "errors": 0}

    def proxy_log(self):
        return ""

    @property
    def lab(self):
        fake = self

        class _Lab:
            def apply(self, docs):
                fake.changes += 1
                fake.events.append("change")

        return _Lab()


def test_scale_full_sync_and_memory_are_one_sample_per_fresh_start():
    """Three fresh proxies give three full syncs and memory samples; first packets and changes run on the first only."""
    from kubelab.bench.suites import BenchOptions, Context, LabPool, Subject
    from kubelab.bench.suites.scale import _Scale

    opts = BenchOptions.make(quick=False, suites=("scale",), subjects=("uml:ipvs",), runs=5, scale_counts=(100,))
    fake = _FakeBenchLab()
    pool = LabPool(labs={"uml": fake})
    ctx = Context(opts, Results(command="kubelab bench"), pool)
    sc = _Scale(ctx, list(opts.subjects))
    sc.have["uml"] = 100
    sc.measure(Subject.parse("uml:ipvs"), 100)
    key = ("uml:ipvs", 100)
    assert fake.starts == 3 and not fake.running
    assert sc.full_sync[key] == pytest.approx([0.4, 0.5, 0.6])
    assert sc.rss[key] == pytest.approx([91.0, 92.0, 93.0])
    assert fake.probes == 5 * 3  # runs rounds of three paths, on the first start only
    assert len(sc.change_sync[key]) == 3
    # Every start is stopped (and cleaned up) before the next.
    assert fake.events[:1] == ["start"] and fake.events.count("stop") == 3
    assert fake.events.index("stop") > fake.events.index("change")


def test_scale_missing_full_sync_metric_is_an_error_not_a_silent_gap():
    from kubelab.bench.suites import BenchOptions, Context, LabPool, Subject
    from kubelab.bench.suites.scale import _Scale

    opts = BenchOptions.make(quick=True, suites=("scale",), subjects=("uml:ipvs",), scale_counts=(100,))
    fake = _FakeBenchLab()
    fake.metrics = lambda: {}
    ctx = Context(opts, Results(command="kubelab bench"), LabPool(labs={"uml": fake}))
    sc = _Scale(ctx, list(opts.subjects))
    sc.have["uml"] = 100
    with pytest.raises(RuntimeError, match="no full sync"):
        sc.measure(Subject.parse("uml:ipvs"), 100)
    assert not fake.running  # stopped even so


class _ScriptedMetrics(_FakeBenchLab):
    """Proxy metrics that change along a script, one step per scrape (the last repeats)."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)

    def metrics(self):
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


def _sync_metrics(full=(1, 2.0), partial=(0, 0.0)):
    f, p = "kubeproxy_sync_full_proxy_rules_duration_seconds", "kubeproxy_sync_partial_proxy_rules_duration_seconds"
    return {f + "_count": full[0], f + "_sum": full[1], p + "_count": partial[0], p + "_sum": partial[1]}


@pytest.mark.parametrize(
    "script,want",
    [
        # The change's own partial sync: 30 ms.
        pytest.param([_sync_metrics(), _sync_metrics(), _sync_metrics(partial=(1, 0.03))], 0.03, id="partial"),
        # A periodic full sync (10 s) already running finishes first; the partial after it carried the change.
        pytest.param([_sync_metrics(), _sync_metrics(full=(2, 12.0)), _sync_metrics(full=(2, 12.0), partial=(1, 0.02))],
                     0.02, id="full-in-flight-then-partial"),
        # The full sync carried the change: no partial follows within the grace.
        pytest.param([_sync_metrics(), _sync_metrics(full=(2, 12.0))], 10.0, id="full-carried-it"),
    ],
)
def test_scale_change_sync_is_the_sync_that_carried_the_change(monkeypatch, script, want):
    from kubelab.bench.suites import BenchOptions, Context, LabPool
    from kubelab.bench.suites import scale
    from kubelab.bench.suites.scale import _Scale

    monkeypatch.setattr(scale, "CARRY_GRACE", 0.3)
    opts = BenchOptions.make(quick=True, suites=("scale",), subjects=("uml:ipvs",), scale_counts=(100,))
    fake = _ScriptedMetrics(script)
    sc = _Scale(Context(opts, Results(command="kubelab bench"), LabPool(labs={"uml": fake})), list(opts.subjects))
    assert sc._one_change(fake, "uml") == pytest.approx(want)
    assert fake.changes == 1
