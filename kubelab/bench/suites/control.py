"""Control plane: network programming latency, from an EndpointSlice change to traffic reaching the new endpoint.

Service ``bench/prog`` selects ``app: prog``.  For each change, with the
proxy under test running on node1:

1. the probe (:mod:`kubelab.bench.suites.probe` ``until``) starts in the
   client pod and connects to the Service every ~2 ms;
2. once it runs, a new pod ``prog-K`` (the lab's echo server, on node2) is
   applied; ``lab.apply`` returns when the lab has written the new
   EndpointSlice to the manifests the proxy watches (``--source``) -- that
   moment is the start;
3. the end is the first answer from ``prog-K`` seen by the probe, i.e. the
   endpoint is programmed and traffic reaches it;
4. the previous pod is deleted (grace 0), so the next change starts from
   one endpoint again.

Both ends are wall-clock times; in a UML lab the kernel's clock offset is
measured (``date`` bracketed by host reads) and subtracted.  The latency
includes the files source's change detection (a file counts once it looked
the same on two polls) and ``--min-sync-period`` (1 s) as kube-proxy's own
rate limit would.  There is no peer for this figure: subjects are compared
with each other (and against kube-proxy's 1 s minimum sync period).
"""

from __future__ import annotations

import threading
import time

from kubelab.bench.report import Figure, Series
from kubelab.bench.stats import summarize
from kubelab.bench.suites import Context, Step, Subject
from kubelab.bench.suites.labkit import NS, echo_pod, service_doc

SUITE = "control plane"


class _Control:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.samples: dict[str, list[float]] = {}
        self.serial: dict[str, int] = {}  # kernel -> last prog pod number

    def session(self, subject: Subject) -> None:
        lab = self.ctx.labs.get(subject.kernel)
        k = self.serial.get(subject.kernel)
        if k is None:
            k = 0
            lab.lab.apply([service_doc("prog", 9000, 9000), echo_pod("prog-0", app="prog", ip=_ip(0))])
        self.serial[subject.kernel] = k
        lab.start_proxy(subject.mode)
        offset = lab.clock_offset()
        out = self.samples.setdefault(subject.key, [])
        for _ in range(self.ctx.opts.changes):
            out.append(self._one_change(lab, k + 1, offset))
            k += 1
            self.serial[subject.kernel] = k
            lab.lab.delete(f"pod/{NS}/prog-{k - 1}", grace=0)

    def _one_change(self, lab, k: int, offset: float) -> float:
        ip = lab.service_ip("prog")
        ready = lab.workdir / f"until-{k}.ready"
        ready.unlink(missing_ok=True)
        result: dict = {}

        def watch() -> None:
            try:
                result["r"] = lab.probe("until", ip, 9000, f"prog-{k}", 60, str(ready), timeout=120)
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while not ready.exists():
            if not t.is_alive() or time.monotonic() > deadline:
                t.join(1)
                raise RuntimeError(f"the probe in the client pod did not start: {result.get('error')}")
            time.sleep(0.01)
        time.sleep(0.05)  # let it make a first connection to the old endpoint
        lab.lab.apply([echo_pod(f"prog-{k}", app="prog", ip=_ip(k))])
        start = time.time() + offset
        t.join(150)
        if "error" in result:
            raise result["error"]
        r = result.get("r") or {}
        if not r.get("seen"):
            raise RuntimeError(f"traffic never reached the new endpoint prog-{k} within 60s; proxy log:\n{lab.proxy_log(6)}")
        return r["seen"] - start


def _ip(k: int) -> str:
    # Every new endpoint gets an address no recent pod had, so a stale
    # neighbour or conntrack entry for a reused IP can never be what is
    # measured.  (Before the netlab room derived a pod's MAC from its IP, a
    # reused IP was black-holed for ~30 s: 28-57 s "programming latencies".)
    return f"10.244.1.{250 - k % 48}"


def plan(ctx: Context) -> list[Step]:
    opts = ctx.opts
    c = _Control(ctx)
    steps = []
    # Reverse order: the data path suite's last subject is still running.
    for s in reversed(opts.subjects):
        uml = s.kernel == "uml"
        # The proxy is usually still running from the data path suite: a
        # quick run's 2 changes took 3 s in UML and 2-4 s on the host.
        est = (3 if uml else 1) + opts.changes * (1.5 if uml else 1.0)
        steps.append(Step(f"control plane: {s}: {opts.changes} endpoint changes", est, lambda s=s: c.session(s), f"control:{s.key}"))
    steps.append(Step("control plane: figures", 0, lambda: _report(ctx, c), "control:report", always=True))
    return steps


def _report(ctx: Context, c: _Control) -> None:
    subjects = [s for s in ctx.opts.subjects if c.samples.get(s.key)]
    for s in subjects:
        ctx.results.figures.append(Figure(SUITE, "network programming latency (new endpoint -> first connection to it)",
                                          f"{s.mode} ({s.kernel} kernel)", "s", summarize(c.samples[s.key]),
                                          higher_is_better=False))
    if subjects:
        ctx.results.series.append(Series(
            SUITE, "network programming latency", "subject", "seconds", list(range(len(subjects))),
            {"median, min..max": [summarize(c.samples[s.key]) for s in subjects]}, categories=[str(s) for s in subjects],
            hline=1.0, hline_label="kube-proxy's --min-sync-period default (1 s)",
        ))
