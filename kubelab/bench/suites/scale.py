"""Scale: first-packet latency, sync time and proxy memory against the number of Services.

The bench lab grows to each count in turn (``bench/s0..sN``, each a
ClusterIP Service over the echo pod, plus ``bench/zz-probe`` -- the Service
sorted last, so in iptables mode its rule is the last one of
KUBE-SERVICES that a new connection's first packet walks).  At every count,
each subject (iptables and ipvs modes; the userspace mode has no per-packet
rule walk) takes its turn on node1:

* full sync time: the proxy's first sync, from its own
  ``kubeproxy_sync_full_proxy_rules_duration_seconds`` histogram;
* first-packet latency: batches of sequential ``connect()`` calls (each a
  new conntrack entry, so each SYN goes through the nat table), p50 per
  batch, ``runs`` rounds of three batches in rotating order:

  - *through the Service*: client pod (node1) -> the probe Service;
  - *direct to pod*: client pod -> the echo pod's IP.  This is NOT a
    rule-free baseline: in iptables mode every new connection entering
    node1 (PREROUTING -> KUBE-SERVICES) walks all the Service rules before
    it falls through, so "direct" pays the walk too and the ratio Service /
    direct stays ~1.0 at any count (what the first version of this suite
    reported);
  - *reference*: the ``ref`` pod on node2 -> the echo pod (node2 to node2):
    the same kernel under the same load at the same moment, but its packets
    never pass node1's rules.  Through-the-Service / reference per round is
    the figure: the machine's noise cancels and the walk stays;

* sync after one Service changed (its port flips 9000 <-> 9001): partial
  syncs where the mode has them, from the proxy's histograms;
* memory: the proxy's resident set (VmRSS) after those syncs.

Figures: each subject's first-packet latency at the largest count as a ratio
to the reference, and its growth from the smallest to the largest count (both
normalised by the reference, round by round) -- iptables' linear walk against
IPVS's hash lookup.
"""

from __future__ import annotations

import statistics
import time

from kubelab.bench.report import Figure, Series
from kubelab.bench.stats import paired_ratios, summarize
from kubelab.bench.suites import Context, Step, Subject
from kubelab.bench.suites.labkit import probe_service, scale_services

SUITE = "scale"
SYN_BATCH = 200


class _Scale:
    def __init__(self, ctx: Context, subjects: list[Subject]):
        self.ctx = ctx
        self.subjects = subjects
        self.counts = list(ctx.opts.scale_counts)
        self.have: dict[str, int] = {}  # kernel -> services applied so far (without the probe)
        # (path, subject key, count) -> batch p50s (µs), path one of PATHS
        self.first_packet: dict[tuple[str, str, int], list[float]] = {}
        self.full_sync: dict[tuple[str, int], list[float]] = {}
        self.change_sync: dict[tuple[str, int], list[float]] = {}
        self.rss: dict[tuple[str, int], list[float]] = {}
        self.flip: dict[str, int] = {}

    def grow(self, kernel: str, count: int) -> None:
        lab = self.ctx.labs.get(kernel)
        have = self.have.get(kernel)
        docs = []
        if have is None:
            docs.append(probe_service())
            have = 0
        # Apply in slices of 100 Services: small requests to the lab daemon
        # (one request for 10,000 would work too since the netlab room lifted
        # the 64 KiB line limit; slices keep each reply quick).
        docs += scale_services(count - have, start=have)
        for i in range(0, len(docs), 100):
            lab.lab.apply(docs[i:i + 100])
        self.have[kernel] = count

    def measure(self, subject: Subject, count: int) -> None:
        lab = self.ctx.labs.get(subject.kernel)
        if self.have.get(subject.kernel) != count:
            raise RuntimeError(f"the {subject.kernel} lab does not hold {count:,} Services (growing it failed)")
        key = (subject.key, count)
        lab.start_proxy(subject.mode, fresh=True)
        try:
            m = lab.metrics()
            n_full = m.get("kubeproxy_sync_full_proxy_rules_duration_seconds_count", 0)
            if n_full:
                # The first full sync (normally the only one so far).
                self.full_sync.setdefault(key, []).append(
                    m["kubeproxy_sync_full_proxy_rules_duration_seconds_sum"] / n_full)
            probe_ip = lab.service_ip("zz-probe")
            echo_ip = lab.pod_ip("echo")
            paths = [("service", "client", probe_ip), ("direct", "client", echo_ip), ("reference", "ref", echo_ip)]
            for i in range(self.ctx.opts.runs):
                # Rotate the order every round: no path always goes first.
                for via, pod, host in paths[i % 3:] + paths[:i % 3]:
                    r = lab.probe("syn", host, 9000, SYN_BATCH, pod=pod)
                    if len(r["us"]) < SYN_BATCH * 0.9:
                        raise RuntimeError(f"{r['errors']} of {SYN_BATCH} connects from {pod} to {host}:9000 failed")
                    self.first_packet.setdefault((via, subject.key, count), []).append(statistics.median(r["us"]))
            for _ in range(max(2, min(3, self.ctx.opts.runs))):
                self.change_sync.setdefault(key, []).append(self._one_change(lab, subject.kernel))
            self.rss.setdefault(key, []).append(lab.rss_bytes() / 1e6)
        finally:
            # Stopped (and cleaned up) now: the next count adds Services
            # with no proxy running, and nothing lingers into the next suite.
            lab.stop_proxy()

    def _one_change(self, lab, kernel: str) -> float:
        """Flip one Service's port; the duration of the sync that follows (seconds)."""
        before = lab.metrics()
        names = ("kubeproxy_sync_full_proxy_rules_duration_seconds", "kubeproxy_sync_partial_proxy_rules_duration_seconds")
        count0 = {n: before.get(n + "_count", 0) for n in names}
        sum0 = {n: before.get(n + "_sum", 0.0) for n in names}
        port = 9001 if self.flip.get(kernel, 9000) == 9000 else 9000
        self.flip[kernel] = port
        svc = scale_services(1)[0]
        svc["spec"]["ports"][0]["port"] = port
        lab.lab.apply([svc])
        deadline = time.monotonic() + 120
        while True:
            m = lab.metrics()
            for n in names:
                if m.get(n + "_count", 0) > count0[n]:
                    return (m[n + "_sum"] - sum0[n]) / (m[n + "_count"] - count0[n])
            if time.monotonic() > deadline:
                raise RuntimeError(f"no sync within 120s after changing one Service; proxy log:\n{lab.proxy_log()}")
            time.sleep(0.1)

    def report(self) -> None:
        res = self.ctx.results
        x = [float(c) for c in self.counts]
        labels = [(s.key, str(s)) for s in self.subjects]
        fp = self.first_packet

        def series(name: str, ylabel: str, data: dict, scale: float = 1.0, log_y: bool = False) -> None:
            lines = {}
            for key, label in labels:
                vals = [summarize([v * scale for v in data[(key, c)]]) if data.get((key, c)) else None for c in self.counts]
                if any(vals):
                    lines[label] = vals
            if lines:
                res.series.append(Series(SUITE, name, "Services", ylabel, x, lines, log_y=log_y))

        # Absolute: every path, so the reader sees that "direct" rises with
        # the Service rules in iptables mode while the reference stays flat.
        lines, styles = {}, {}
        for key, label in labels:
            for via, suffix, style in (("service", "", "-"), ("direct", ", direct to pod", "--"), ("reference", ", reference", ":")):
                vals = [summarize(fp[(via, key, c)]) if fp.get((via, key, c)) else None for c in self.counts]
                if any(vals):
                    lines[label + suffix] = vals
                    styles[label + suffix] = style
        if lines:
            res.series.append(Series(SUITE, "first-packet latency (connect p50)", "Services", "µs (log scale)", x, lines,
                                     log_y=True, styles=styles))
        # The curve: through the Service / reference, round by round.
        ratio_lines = {}
        for key, label in labels:
            vals = [self._ratio(key, c) for c in self.counts]
            if any(vals):
                ratio_lines[label] = vals
        if ratio_lines:
            # A linear Services axis: a linear walk is a straight line.
            res.series.append(Series(SUITE, "first-packet latency, ratio to a reference", "Services",
                                     "through the Service / reference", x, ratio_lines, hline=1.0,
                                     hline_label="reference: pod to pod on node2 (no proxy rules)"))
        # Sync times span decades (a partial IPVS sync of ms, a full UML
        # iptables-restore of seconds): log scale.
        series("full sync time", "seconds (log scale)", self.full_sync, log_y=True)
        series("sync after one Service changed", "ms (log scale)", self.change_sync, scale=1e3, log_y=True)
        series("proxy memory (RSS)", "MB", self.rss)
        lo, hi = self.counts[0], self.counts[-1]
        for key, label in labels:
            a, b = fp.get(("service", key, hi)), fp.get(("reference", key, hi))
            if a and b and len(a) == len(b):
                res.figures.append(Figure(SUITE, f"first-packet latency at {hi:,} Services (connect p50)", label, "µs",
                                          summarize(a), "reference (pod to pod, no proxy rules)", summarize(b),
                                          paired_ratios(a, b), higher_is_better=False))
            if lo == hi:
                continue
            norm_hi, norm_lo = self._normalised(key, hi), self._normalised(key, lo)
            if norm_hi and norm_lo and len(norm_hi) == len(norm_lo):
                res.figures.append(Figure(SUITE, f"first-packet latency growth, {lo:,} -> {hi:,} Services (each / reference)",
                                          label, "x", summarize(norm_hi), f"same at {lo:,} Services", summarize(norm_lo),
                                          paired_ratios(norm_hi, norm_lo), higher_is_better=False))

    def _normalised(self, key: str, count: int) -> list[float]:
        """Through-the-Service batch p50 / the reference batch of the same round."""
        a, b = self.first_packet.get(("service", key, count)), self.first_packet.get(("reference", key, count))
        if not a or not b or len(a) != len(b):
            return []
        return [x / y for x, y in zip(a, b) if y]

    def _ratio(self, key: str, count: int):
        vals = self._normalised(key, count)
        return summarize(vals) if vals else None


def plan(ctx: Context) -> list[Step]:
    opts = ctx.opts
    subjects = [s for s in opts.subjects if s.mode in ("iptables", "ipvs")]
    if not subjects:
        return []
    sc = _Scale(ctx, subjects)
    steps: list[Step] = []
    for count in sc.counts:
        for kernel in sorted({s.kernel for s in subjects}):
            uml = kernel == "uml"
            steps.append(Step(f"scale: {count:,} Services in the {kernel} lab", count * (0.005 if uml else 0.002),
                              lambda k=kernel, c=count: sc.grow(k, c), f"scale:grow:{kernel}"))
            for s in (x for x in subjects if x.kernel == kernel):
                est = (25 if uml else 8) + count * (0.02 if uml else 0.005) + opts.runs * (3 if uml else 0.75)
                steps.append(Step(f"scale: {s} at {count:,} Services (sync, first packets, changes, memory)", est,
                                  lambda s=s, c=count: sc.measure(s, c), f"scale:{s.key}:{count}"))
    steps.append(Step("scale: figures", 0, sc.report, "scale:report", always=True))
    return steps
