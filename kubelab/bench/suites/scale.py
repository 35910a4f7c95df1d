"""Scale: first-packet latency, sync time and proxy memory against the number of Services.

The bench lab grows to each count in turn (``bench/s0..sN``, each a
ClusterIP Service over the echo pod, plus ``bench/zz-probe`` -- the Service
sorted last, so in iptables mode its rule is the last one of
KUBE-SERVICES that a new connection's first packet walks).  At every count,
each subject (iptables and ipvs modes; the userspace mode has no per-packet
rule walk) takes its turn on node1:

* full sync time: the proxy's first sync, from its own
  ``kubeproxy_sync_full_proxy_rules_duration_seconds`` histogram;
* first-packet latency: sequential ``connect()`` calls from the client pod
  to the probe Service (each a new conntrack entry, so each SYN is NATed
  through the rules), p50 per batch, ``runs`` batches; a direct connect to
  the echo pod is measured alongside as the floor;
* sync after one Service changed (its port flips 9000 <-> 9001): partial
  syncs where the mode has them, from the proxy's histograms;
* memory: the proxy's resident set (VmRSS) after those syncs.

Figures: each subject's first-packet latency at the largest count against
the same subject at the smallest (batch by batch), the growth the curve
shows -- iptables' linear walk against IPVS's hash lookup.
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
        # (subject key or "direct:KERNEL", count) -> list of samples
        self.first_packet: dict[tuple[str, int], list[float]] = {}
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
        # Apply in slices of 100: the lab's control socket reads one request
        # line of at most 64 KiB (asyncio's StreamReader limit).
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
            for i in range(self.ctx.opts.runs):
                for via, host in (("proxy", probe_ip), ("direct", echo_ip))[:: 1 if i % 2 == 0 else -1]:
                    r = lab.probe("syn", host, 9000, SYN_BATCH)
                    if len(r["us"]) < SYN_BATCH * 0.9:
                        raise RuntimeError(f"{r['errors']} of {SYN_BATCH} connects to {host}:9000 failed")
                    k = key if via == "proxy" else (f"direct:{subject.kernel}", count)
                    self.first_packet.setdefault(k, []).append(statistics.median(r["us"]))
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
        for kernel in sorted({s.kernel for s in self.subjects}):
            labels.append((f"direct:{kernel}", f"direct to pod ({kernel})"))

        def series(name: str, ylabel: str, data: dict, scale: float = 1.0, with_direct: bool = False) -> None:
            lines = {}
            for key, label in labels:
                if key.startswith("direct:") and not with_direct:
                    continue
                vals = [summarize([v * scale for v in data[(key, c)]]) if data.get((key, c)) else None for c in self.counts]
                if any(vals):
                    lines[label] = vals
            if lines:
                res.series.append(Series(SUITE, name, "Services", ylabel, x, lines, log_x=True))

        series("first-packet latency (connect p50)", "µs", self.first_packet, with_direct=True)
        # The same batches as ratios to the direct connect measured beside
        # them: the machine's noise cancels, the rule walk stays.
        ratio_lines = {}
        for key, label in labels:
            if key.startswith("direct:"):
                continue
            direct_key = "direct:" + key.split(":", 1)[0]
            vals = []
            for c in self.counts:
                a, b = self.first_packet.get((key, c)), self.first_packet.get((direct_key, c))
                vals.append(paired_ratios(a, b) if a and b and len(a) == len(b) else None)
            if any(vals):
                ratio_lines[label] = vals
        if ratio_lines:
            res.series.append(Series(SUITE, "first-packet latency, ratio to direct", "Services",
                                     "connect p50 through the Service / direct to pod", x, ratio_lines, log_x=True, hline=1.0))
        series("full sync time", "seconds", self.full_sync)
        series("sync after one Service changed", "ms", self.change_sync, scale=1e3)
        series("proxy memory (RSS)", "MB", self.rss)
        lo, hi = self.counts[0], self.counts[-1]
        if lo == hi:
            return
        for key, label in labels:
            a, b = self.first_packet.get((key, hi)), self.first_packet.get((key, lo))
            if a and b and len(a) == len(b):
                res.figures.append(Figure(SUITE, f"first-packet latency at {hi:,} Services", label, "µs", summarize(a),
                                          f"same at {lo:,} Services", summarize(b), paired_ratios(a, b), higher_is_better=False))


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
                est = (25 if uml else 8) + count * (0.02 if uml else 0.005) + opts.runs * (2 if uml else 0.5)
                steps.append(Step(f"scale: {s} at {count:,} Services (sync, first packets, changes, memory)", est,
                                  lambda s=s, c=count: sc.measure(s, c), f"scale:{s.key}:{count}"))
    steps.append(Step("scale: figures", 0, sc.report, "scale:report", always=True))
    return steps
