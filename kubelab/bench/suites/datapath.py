"""Data path: what a client in a pod sees through each proxy mode, against a direct connection to the pod.

For every subject (a mode on a kernel) the proxy runs on node1 of the
bench lab (:mod:`kubelab.bench.suites.labkit`) and the client pod measures,
pair by pair, through the Service's ClusterIP and directly to the backend
pod's IP (the 1.0 baseline, from a second client pod on node1, ``client-direct``:
see :class:`~kubelab.bench.suites.labkit.BenchLab`), the order swapped every
other pair:

* connection setup latency, p50 and p99: sequential short TCP connections,
  each connect + one HTTP request + the answer (haproxy responding), timed
  client side by :mod:`kubelab.bench.suites.probe`;
* short connections/s: ``wrk -t1 -c16 -H 'Connection: close'`` to the same
  responder;
* bulk TCP throughput: ``iperf3 -c`` to ``iperf3 -s``;
* UDP round trips/s: ``dnsperf -q 10`` to dnsmasq; and one-in-flight UDP
  round-trip latency (p50) from the probe.

Each figure's ratio is subject / direct per pair, then the median.
"""

from __future__ import annotations

import statistics

from kubelab.bench.report import Figure, Series
from kubelab.bench.stats import paired_ratios, percentile, summarize
from kubelab.bench.suites import Context, Step, Subject

SUITE = "data path"

# (key, figure name, unit, higher is better)
METRICS = (
    ("setup_p50", "connection setup p50 (connect + first answer)", "µs", False),
    ("setup_p99", "connection setup p99 (connect + first answer)", "µs", False),
    ("short", "short connections/s (wrk, Connection: close)", "conn/s", True),
    ("bulk", "bulk TCP throughput (iperf3)", "MB/s", True),
    ("udp_rate", "UDP round trips/s (dnsperf, 10 in flight)", "q/s", True),
    ("udp_p50", "UDP round trip p50 (one in flight)", "µs", False),
)
SHORT_NAMES = {"setup_p50": "setup p50", "setup_p99": "setup p99", "short": "short conn/s", "bulk": "bulk MB/s",
               "udp_rate": "UDP q/s", "udp_p50": "UDP RTT p50"}
# Service port, pod port of each backend.
PORTS = {"web": (80, 8080), "bulk": (5201, 5201), "dns": (53, 53)}


class _Session:
    """One subject's samples: key -> ([through the proxy], [direct]) appended pair by pair."""

    def __init__(self, ctx: Context, subject: Subject):
        self.ctx = ctx
        self.subject = subject
        self.samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k, *_ in METRICS}

    @property
    def lab(self):
        return self.ctx.labs.get(self.subject.kernel)

    def start(self) -> None:
        self.lab.start_proxy(self.subject.mode)

    def measure(self, kind: str, i: int) -> None:
        order = ("proxy", "direct") if i % 2 == 0 else ("direct", "proxy")
        got: dict[str, dict[str, float]] = {}
        for via in order:
            got[via] = self._one(kind, via)
        for key in got["proxy"]:
            ours, direct = self.samples[key]
            ours.append(got["proxy"][key])
            direct.append(got["direct"][key])

    def _one(self, kind: str, via: str) -> dict[str, float]:
        lab, opts = self.lab, self.ctx.opts
        backend = {"setup": "web", "short": "web", "bulk": "bulk", "udp_rate": "dns", "udp_p50": "dns"}[kind]
        host = lab.target(backend, via)
        port = PORTS[backend][1 if via == "direct" else 0]
        pod = "client-direct" if via == "direct" else "client"  # why two pods: labkit's BenchLab
        if kind == "setup":
            n = 100 if self.subject.kernel == "uml" else 300
            r = lab.probe("rtt", host, port, n, pod=pod)
            us = sorted(r["us"])
            if len(us) < n * 0.9:
                raise RuntimeError(f"{r['errors']} of {n} connections to {host}:{port} failed")
            return {"setup_p50": percentile(us, 50), "setup_p99": percentile(us, 99)}
        if kind == "short":
            return {"short": lab.wrk(host, port, opts.seconds, pod=pod)}
        if kind == "bulk":
            return {"bulk": lab.iperf3(host, port, opts.seconds, pod=pod)}
        if kind == "udp_rate":
            return {"udp_rate": lab.dnsperf(host, port, opts.seconds, pod=pod)}
        r = lab.probe("udp", host, port, 100, pod=pod)
        if len(r["us"]) < 90:
            raise RuntimeError(f"{r['errors']} of 100 UDP round trips to {host}:{port} lost")
        return {"udp_p50": statistics.median(r["us"])}

    def figures(self) -> list[Figure]:
        out = []
        for key, name, unit, higher in METRICS:
            ours, direct = self.samples[key]
            if not ours:
                continue
            out.append(Figure(SUITE, name, f"{self.subject.mode} ({self.subject.kernel} kernel)", unit, summarize(ours),
                              "direct to pod", summarize(direct), paired_ratios(ours, direct), higher_is_better=higher))
        return out


KINDS = ("setup", "short", "bulk", "udp_rate", "udp_p50")


def plan(ctx: Context) -> list[Step]:
    opts = ctx.opts
    steps: list[Step] = []
    sessions: list[_Session] = []
    for subject in opts.subjects:
        s = _Session(ctx, subject)
        sessions.append(s)
        uml = subject.kernel == "uml"
        group = f"datapath:{subject.key}"
        # Estimates measured on the 2-core machine (a --quick run, load ~5).
        steps.append(Step(f"data path, {subject}: start kubelab proxy", 12 if uml else 5, s.start, group))
        per = {"setup": 2.5 if uml else 0.5, "short": 2 * opts.seconds + (1 if uml else 0), "bulk": 2 * opts.seconds,
               "udp_rate": 2 * opts.seconds + (1 if uml else 0.5), "udp_p50": 1.5 if uml else 0.5}
        for i in range(opts.runs):
            for kind in KINDS:
                steps.append(Step(f"data path, {subject}: {kind.replace('_', ' ')} pair {i + 1}/{opts.runs}", per[kind],
                                  lambda s=s, kind=kind, i=i: s.measure(kind, i), group))
    steps.append(Step("data path: figures", 0, lambda: _report(ctx, sessions), "datapath:report", always=True))
    return steps


def _report(ctx: Context, sessions: list[_Session]) -> None:
    done = [s for s in sessions if any(s.samples[k][0] for k, *_ in METRICS)]
    for s in done:
        ctx.results.figures.extend(s.figures())
    if not done:
        return
    keys = [k for k, *_ in METRICS]
    lines = {}
    for s in done:
        lines[str(s.subject)] = [paired_ratios(*s.samples[k]) if s.samples[k][0] else None for k in keys]
    ctx.results.series.append(Series(
        SUITE, "ratio to a direct connection", "figure", "through the proxy / direct (1.0 = direct)", list(range(len(keys))),
        lines, categories=[f"{SHORT_NAMES[k]}\n({'higher' if higher else 'lower'} is better)" for k, _, _, higher in METRICS],
        hline=1.0, hline_label="direct to pod", log_y=True,
    ))
