"""Scale: first-packet latency, sync time and proxy memory against the number of Services.

The bench lab grows to each count in turn (``bench/s0..sN``, each a
ClusterIP Service over the echo pod, plus ``bench/zz-probe`` -- the Service
sorted last, so in iptables mode its rule is the last one of
KUBE-SERVICES that a new connection's first packet walks).  At every count,
each subject (iptables and ipvs modes; the userspace mode has no per-packet
rule walk) takes its turn on node1:

* full sync time: a new proxy process's first sync, from its own
  ``kubeproxy_sync_full_proxy_rules_duration_seconds`` histogram, once per
  fresh start (up to three starts, each on a kernel the last one's
  ``--cleanup`` emptied) so the figure is a median with its spread;
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
* memory: the proxy's resident set (VmRSS) right after each full sync.

Endpoints: at one Service count (the largest up to 1,000, see
:func:`endpoints_count`) every Service gets more endpoints in turn
(``--endpoints``, default 1, 5, 10, 20 per Service): the replicas of
Deployment ``bench/echo-more`` on node2, echo pods that every scale Service
selects, each a real pod with its own address.  Each subject then measures its full sync, its
sync after one Service changed and its memory again, so sync time is seen
against the number of endpoints as well as of Services.  The Deployment is scaled
to 0 before the lab grows further.

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
from kubelab.bench.suites.labkit import more_echo_pods, probe_service, scale_services

SUITE = "scale"
SYN_BATCH = 200
FULL_SYNC_METRIC = "kubeproxy_sync_full_proxy_rules_duration_seconds"
PARTIAL_SYNC_METRIC = "kubeproxy_sync_partial_proxy_rules_duration_seconds"
# Seconds to wait, after a full sync finished first, for the partial sync that
# carries a change: --min-sync-period (1 s) plus the slowest partial sync seen
# (UML iptables-legacy at 10,000 Services: 4.8 s), with room.
CARRY_GRACE = 10.0


def endpoints_count(counts: list[int]) -> int:
    """The Service count at which the endpoints sweep runs: the largest up to 1,000, else the smallest.

    Why not the largest: 10,000 Services x 20 endpoints is 200,000 endpoints,
    a full iptables-restore of ~1 M lines -- minutes per subject inside UML
    for a curve whose shape 1,000 Services already shows.
    """
    small = [c for c in counts if c <= 1000]
    return max(small) if small else min(counts)


class _Scale:
    def __init__(self, ctx: Context, subjects: list[Subject]):
        self.ctx = ctx
        self.subjects = subjects
        self.counts = list(ctx.opts.scale_counts)
        self.ep_at = endpoints_count(self.counts)
        self.ep_counts = sorted(set(ctx.opts.scale_endpoints) | {1})
        self.ep_have: dict[str, int] = {}  # kernel -> endpoints per Service now (1 = just the echo pod)
        # (subject key, endpoints per Service) -> samples, at ep_at Services
        self.ep_full_sync: dict[tuple[str, int], list[float]] = {}
        self.ep_change_sync: dict[tuple[str, int], list[float]] = {}
        self.ep_rss: dict[tuple[str, int], list[float]] = {}
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
        # Apply in slices of 1,000 Services.  Every request rewrites the lab's
        # whole services and EndpointSlice files, so small slices cost
        # O(n^2): 0 -> 10,000 in slices of 100 took 5m14s inside UML, one
        # request 12 s.  Slices of 1,000 keep each reply well inside the
        # request's 120 s limit.
        docs += scale_services(count - have, start=have)
        for i in range(0, len(docs), 1000):
            lab.lab.apply(docs[i:i + 1000])
        self.have[kernel] = count

    def measure(self, subject: Subject, count: int) -> None:
        lab = self.ctx.labs.get(subject.kernel)
        if self.have.get(subject.kernel) != count:
            raise RuntimeError(f"the {subject.kernel} lab does not hold {count:,} Services (growing it failed)")
        key = (subject.key, count)
        def first_start() -> None:
            self._first_packets(lab, subject, count)
            self._changes(lab, subject.kernel, key, self.change_sync)

        self._fresh_starts(lab, subject, key, self.full_sync, self.rss, first_start)

    def _fresh_starts(self, lab, subject: Subject, key: tuple, full_sync: dict, rss: dict, first_start) -> None:
        """:meth:`sync_runs` fresh proxies, each giving a full sync and memory sample; ``first_start()`` runs on the first."""
        for rep in range(self.sync_runs()):
            lab.start_proxy(subject.mode, fresh=True)
            try:
                self._full_sync_and_memory(lab, key, full_sync, rss)
                if rep == 0:
                    first_start()
            finally:
                # Stopped (and cleaned up) now: the next start syncs from
                # nothing again, the next count adds Services with no proxy
                # running, and nothing lingers into the next suite.
                lab.stop_proxy()

    def sync_runs(self) -> int:
        """Fresh proxy starts per measurement: each gives one full sync and one memory sample.

        A full sync is the first sync of a new process (on a kernel the last
        one's ``--cleanup`` emptied), so every sample costs a restart: inside
        UML ~15 s at 1,000 Services, ~40 s at 10,000.  ``--quick`` takes one:
        a second start per point put its plan at 5m54s, over its 5 minutes.
        """
        return 1 if self.ctx.opts.quick else max(1, min(3, self.ctx.opts.runs))

    def _first_packets(self, lab, subject: Subject, count: int) -> None:
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

    @staticmethod
    def _full_sync_and_memory(lab, key: tuple, full_sync: dict, rss: dict) -> None:
        """The fresh proxy's first full sync (its own histogram) and its resident set right after it."""
        m = lab.metrics()
        n_full = m.get(FULL_SYNC_METRIC + "_count", 0)
        if not n_full:
            raise RuntimeError(f"the proxy reports no full sync although it is synced; proxy log:\n{lab.proxy_log()}")
        # Normally exactly one so far; a second (a retry after a failed
        # restore) averages in, as its cost is part of getting in sync.
        full_sync.setdefault(key, []).append(m[FULL_SYNC_METRIC + "_sum"] / n_full)
        rss.setdefault(key, []).append(lab.rss_bytes() / 1e6)

    def _changes(self, lab, kernel: str, key: tuple, change_sync: dict) -> None:
        for _ in range(max(2, min(3, self.ctx.opts.runs))):
            change_sync.setdefault(key, []).append(self._one_change(lab, kernel))

    def set_endpoints(self, kernel: str, per_service: int) -> None:
        """Give every scale Service ``per_service`` endpoints: the echo pod plus a Deployment of more on node2."""
        lab = self.ctx.labs.get(kernel)
        if self.have.get(kernel) != self.ep_at:
            raise RuntimeError(f"the {kernel} lab does not hold {self.ep_at:,} Services (growing it failed)")
        # One Deployment, scaled in one request each way: the lab rewrites
        # every Service's EndpointSlice once per request, so adding and
        # deleting pods one by one cost ~2 s each at 1,000 Services (36 s to
        # delete 19 on the host).  Grace 0: no terminating endpoints linger
        # into the next measurement.
        lab.lab.apply([more_echo_pods(per_service - 1)])
        self.ep_have[kernel] = per_service
        pods = lab.lab.pods({"app": "echo"})
        if len(pods) != per_service:
            raise RuntimeError(f"{len(pods)} echo pods in the {kernel} lab, wanted {per_service}: {', '.join(pods)}")

    def measure_endpoints(self, subject: Subject, per_service: int) -> None:
        """Full sync, sync after one change and memory with ``per_service`` endpoints behind every Service."""
        lab = self.ctx.labs.get(subject.kernel)
        if self.ep_have.get(subject.kernel) != per_service:
            raise RuntimeError(f"the {subject.kernel} lab does not have {per_service} endpoints per Service (adding pods failed)")
        key = (subject.key, per_service)
        self._fresh_starts(lab, subject, key, self.ep_full_sync, self.ep_rss,
                           lambda: self._changes(lab, subject.kernel, key, self.ep_change_sync))

    def _one_change(self, lab, kernel: str) -> float:
        """Flip one Service's port; the duration of the sync that carried the change (seconds).

        The first sync to finish after the change can be a periodic full sync
        that was already running when it came: kubelab's IPVS mode, like
        kube-proxy's IPVS proxier, resyncs everything every --sync-period,
        ~10 s at 10,000 Services inside UML, and a third of the samples there
        read 8-16 s.  So when a full sync finishes first, a partial one that
        finishes within CARRY_GRACE after it is the one that carried the
        change; if none comes, the full sync carried it.
        """
        full, partial = FULL_SYNC_METRIC, PARTIAL_SYNC_METRIC
        before = lab.metrics()
        count0 = {n: before.get(n + "_count", 0) for n in (full, partial)}
        sum0 = {n: before.get(n + "_sum", 0.0) for n in (full, partial)}
        port = 9001 if self.flip.get(kernel, 9000) == 9000 else 9000
        self.flip[kernel] = port
        svc = scale_services(1)[0]
        svc["spec"]["ports"][0]["port"] = port
        lab.lab.apply([svc])
        deadline = time.monotonic() + 120
        full_done: tuple[float, float] | None = None  # (its duration, when it was seen)

        def mean_of_new(m: dict, n: str) -> float:
            return (m[n + "_sum"] - sum0[n]) / (m[n + "_count"] - count0[n])

        while True:
            m = lab.metrics()
            now = time.monotonic()
            if m.get(partial + "_count", 0) > count0[partial]:
                return mean_of_new(m, partial)
            if full_done is None and m.get(full + "_count", 0) > count0[full]:
                full_done = (mean_of_new(m, full), now)
            if full_done is not None and now - full_done[1] > CARRY_GRACE:
                return full_done[0]
            if now > deadline:
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
        self._report_endpoints(labels)
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

    def _report_endpoints(self, labels: list[tuple[str, str]]) -> None:
        """Sync times and memory against endpoints per Service (1 = the Service-count measurement at ep_at)."""
        if len(self.ep_counts) < 2:
            return
        res = self.ctx.results
        at = self.ep_at
        for name, ylabel, by_count, by_ep, scale, log_y in (
            ("full sync time against endpoints", "seconds (log scale)", self.full_sync, self.ep_full_sync, 1.0, True),
            ("sync after one Service changed, against endpoints", "ms (log scale)", self.change_sync,
             self.ep_change_sync, 1e3, True),
            ("proxy memory (RSS) against endpoints", "MB", self.rss, self.ep_rss, 1.0, False),
        ):
            lines = {}
            for key, label in labels:
                vals = []
                for e in self.ep_counts:
                    data = by_count.get((key, at)) if e == 1 else by_ep.get((key, e))
                    vals.append(summarize([v * scale for v in data]) if data else None)
                if any(v is not None for v in vals[1:]):
                    lines[label] = vals
            if lines:
                res.series.append(Series(SUITE, name, f"endpoints per Service ({at:,} Services)", ylabel,
                                         [float(e) for e in self.ep_counts], lines, log_y=log_y))

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
                # Fitted to runs on 2 cores (2026-12-02): UML 30 / 48-63 / 115-126 s
                # at 100 / 1,000 / 10,000 Services with 3 rounds; host 8 / 7-11 / 71 s.
                est = (20 if uml else 5) + count * (0.009 if uml else 0.006) + opts.runs * (4 if uml else 0.75)
                # Each further fresh start (one more full sync and memory
                # sample): a proxy start inside UML costs ~15 s before any sync.
                est += (sc.sync_runs() - 1) * _restart_estimate(uml, count, count)
                steps.append(Step(f"scale: {s} at {count:,} Services (full sync and memory x{sc.sync_runs()}, first packets, changes)", est,
                                  lambda s=s, c=count: sc.measure(s, c), f"scale:{s.key}:{count}"))
            if count == sc.ep_at and len(sc.ep_counts) > 1:
                steps += _endpoint_steps(sc, kernel, [x for x in subjects if x.kernel == kernel])
    steps.append(Step("scale: figures", 0, sc.report, "scale:report", always=True))
    return steps


def _restart_estimate(uml: bool, services: int, endpoints: int) -> float:
    """Seconds for one more fresh proxy start, full sync and cleanup over ``services`` with ``endpoints`` in all.

    Fitted to the full run of 2026-12-03 (2 cores): per extra start UML 11 / 51 / 82 s at
    100 / 5,000 / 10,000 Services and 70 s at 1,000 x 20 endpoints; host 3 / 10 / 35 s and 19 s.
    """
    return (10 if uml else 2) + services * (0.005 if uml else 0.0025) + endpoints * (0.003 if uml else 0.0008)


def _endpoint_steps(sc: _Scale, kernel: str, subjects: list[Subject]) -> list[Step]:
    """The endpoints sweep at ``sc.ep_at`` Services in one lab, ending with the extra pods deleted."""
    uml = kernel == "uml"
    group = f"scale:endpoints:{kernel}"
    steps: list[Step] = []
    for e in sc.ep_counts[1:]:
        steps.append(Step(f"scale: {e} endpoints per Service ({sc.ep_at:,} Services) in the {kernel} lab",
                          3 if uml else 2, lambda k=kernel, e=e: sc.set_endpoints(k, e), group))
        for s in subjects:
            # Measured on 2 cores at 1,000 Services x 3/5/10/20: host 9/14/18/32 s,
            # UML 19/31-55/39-58/54-79 s.
            est = (15 if uml else 8) + sc.ep_at * e * (0.0025 if uml else 0.0012)
            est += (sc.sync_runs() - 1) * _restart_estimate(uml, sc.ep_at, sc.ep_at * e)
            steps.append(Step(f"scale: {s} with {e} endpoints per Service (full sync and memory x{sc.sync_runs()}, changes)", est,
                              lambda s=s, e=e: sc.measure_endpoints(s, e), group))
    # Always: the Service counts after this one are measured with one endpoint each.
    steps.append(Step(f"scale: back to 1 endpoint per Service in the {kernel} lab", 3 if uml else 2,
                      lambda k=kernel: sc.set_endpoints(k, 1), group, always=True))
    return steps
