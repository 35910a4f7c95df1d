"""DNS: dnsperf against kubelab dns and its peers (dnsmasq, unbound) serving the same names.

This suite drives the dns room's ``bench/dns_bench.py`` (its server setup
and dnsperf parsing are reused, not copied): every server answers the A
records of the same N cluster Service names on loopback -- kubelab dns as
shipped (``kubelab dns --source`` on Service manifests), dnsmasq from a
hosts file, unbound from local-data -- and each round runs every server
once, order reversed every other round.  Figures per peer: queries/s, p99
latency and server CPU per query, as kubelab / peer ratios per round.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

from kubelab.bench.report import Figure, Series
from kubelab.bench.stats import paired_ratios, summarize
from kubelab.bench.suites import Context, Step

SUITE = "dns"
PEERS = ("dnsmasq", "unbound")


def load_dns_bench():
    """The dns room's bench/dns_bench.py as a module (it lives beside the package in the checkout)."""
    import kubelab

    path = Path(kubelab.__file__).resolve().parents[1] / "bench" / "dns_bench.py"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the dns suite runs from a kubelab checkout (bench/ beside kubelab/)")
    spec = importlib.util.spec_from_file_location("kubelab_bench_dns_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DNS:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.mod = None
        self.tmp: Path | None = None
        self.servers: dict = {}
        self.rounds: dict[str, list[dict]] = {}
        self.peers = [p for p in PEERS if shutil.which(p)]

    def start(self) -> None:
        self.mod = load_dns_bench()
        n = self.ctx.opts.dns_services
        self.tmp = Path(tempfile.mkdtemp(prefix="kl-bench-dns-"))
        names = [(f"svc{i}.ns{i % 50}.svc.cluster.local", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(n)]
        (self.tmp / "hosts").write_text("".join(f"{ip} {name}\n" for name, ip in names))
        rnd = random.Random(1)
        (self.tmp / "queries").write_text("".join(f"{rnd.choice(names)[0]} A\n" for _ in range(50000)))
        # The arguments dns_bench.py's start_servers reads (its argparse
        # names): one kubelab dns with --workers 1, the installed peers.
        self.servers = self.mod.start_servers(SimpleNamespace(peers=self.peers, workers=[1]), self.tmp, names, [])
        for who, (proc, port) in self.servers.items():
            self.mod.wait_answer(port, names[0][0], proc, who)
            self.mod.warm(port, self.tmp, names)  # each name once, then 2 s: as bench/dns_bench.py
        self.rounds = {who: [] for who in self.servers}

    def round(self, i: int) -> None:
        order = list(self.servers) if i % 2 == 0 else list(self.servers)[::-1]
        for who in order:
            proc, port = self.servers[who]
            r = self.mod.dnsperf(port, self.tmp / "queries", self.ctx.opts.seconds, pid=proc.pid)
            if not r["qps"]:
                raise RuntimeError(f"dnsperf got no answers from {who} on port {port}")
            self.rounds[who].append(r)

    def stop(self) -> None:
        for proc, _ in self.servers.values():
            proc.terminate()
        for proc, _ in self.servers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._report()

    def _report(self) -> None:
        res = self.ctx.results
        ours = self.rounds.get("kubelab") or []
        for peer in self.peers:
            theirs = self.rounds.get(peer) or []
            k = min(len(ours), len(theirs))
            if not k:
                continue
            for key, name, unit, higher in (("qps", "queries/s (dnsperf -c 4 -q 200)", "q/s", True),
                                            ("p99_ms", "p99 latency", "ms", False),
                                            ("cpu_us_per_query", "server CPU per query", "µs", False)):
                a = [r[key] for r in ours[:k]]
                b = [r[key] for r in theirs[:k]]
                res.figures.append(Figure(SUITE, name, "kubelab dns", unit, summarize(a), peer, summarize(b),
                                          paired_ratios(a, b), higher_is_better=higher))
        whos = [w for w in self.servers if self.rounds.get(w)]
        if whos:
            res.series.append(Series(SUITE, "queries per second", "server", "queries/s", list(range(len(whos))),
                                     {"median, min..max": [summarize([r["qps"] for r in self.rounds[w]]) for w in whos]},
                                     categories=whos))
        if not self.peers:
            res.notes.append("dns: no peer installed (apt-get install dnsmasq-base unbound): kubelab dns measured alone")
        res.notes.append(f"dns: {self.ctx.opts.dns_services:,} Service names, random A queries, dnsperf -c 4 -q 200 on "
                         f"loopback, {self.ctx.opts.seconds:g} s per server per round, servers alternate (ABBA)")


def plan(ctx: Context) -> list[Step]:
    d = _DNS(ctx)
    per = (ctx.opts.seconds + 3) * (1 + len(d.peers))  # dnsperf waits for stragglers after each run
    steps = [Step(f"dns: start kubelab dns and {', '.join(d.peers) or 'no peer'} on loopback, warm up", 22, d.start, "dns")]
    for i in range(ctx.opts.runs):
        steps.append(Step(f"dns: round {i + 1}/{ctx.opts.runs}", per, lambda i=i: d.round(i), "dns"))
    steps.append(Step("dns: stop servers, figures", 1, d.stop, "dns", always=True))
    return steps
