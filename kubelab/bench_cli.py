"""``kubelab bench``: compare the proxy modes (and kubelab dns) against peers, with tables and plots."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from kubelab.bench.progress import Progress, _dur
from kubelab.bench.report import Results
from kubelab.bench.suites import FULL_SUBJECTS, QUICK_SUBJECTS, SUITE_NAMES, BenchOptions, Context, LabPool, run_steps

DESCRIPTION = """\
Benchmark kubelab's proxy modes side by side, in one lab on one kernel,
and kubelab dns against dnsmasq and unbound.

Suites (--suites):
  datapath  connection setup latency p50/p99, short connections/s (wrk),
            bulk throughput (iperf3), UDP round trips (dnsperf + a probe):
            through each mode's ClusterIP vs directly to the pod (= 1.0)
  scale     first-packet latency, full and partial sync time and proxy
            memory against the number of Services, and sync time and
            memory against endpoints per Service (at 1,000 Services);
            a full sync is a fresh proxy's first: 3 starts per point
            (1 with --quick)
  control   network programming latency: a new endpoint written ->
            the first client connection that reaches it
  dns       dnsperf: kubelab dns vs dnsmasq (and unbound) on the same names

Subjects (--modes) are MODE or KERNEL:MODE: the host kernel runs userspace
and iptables; IPVS (absent from this host kernel) runs in a User-Mode Linux
kernel, where userspace and iptables can run too, for a fair comparison in
one kernel.  Every figure is the median of --runs repetitions with its
spread; ratios are taken pair by pair (kubelab, peer, kubelab, peer, ...)
because shared machines are noisy.  The run states its expected duration
first, shows progress, and writes results.json, results.md and one PNG per
plot into --out.  Needs root (network namespaces)."""

EPILOG = f"""\
defaults:
  --quick   subjects {','.join(QUICK_SUBJECTS)}; 2 runs of 1 s; Services 100,1000;
            endpoints 1,3; under 5 minutes on a 2-core machine
  full      subjects {','.join(FULL_SUBJECTS)}; 5 runs of 3 s;
            Services 100,1000,5000,10000; endpoints 1,5,10,20
            (about 58 minutes on 2 cores; --plan prints the steps)

examples:
  kubelab bench --quick
  kubelab bench --quick --suites datapath --modes iptables --runs 1
  kubelab bench --suites scale --modes host:iptables,uml:iptables,uml:ipvs --services 100,1000,10000
  kubelab bench --plan                      # the steps and expected duration, runs nothing
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run (under 5 minutes): fewer runs, modes and Services")
    parser.add_argument("--suites", default=None, metavar="LIST",
                        help=f"comma-separated suites to run (default all: {','.join(SUITE_NAMES)})")
    parser.add_argument("--modes", default=None, metavar="LIST",
                        help="comma-separated subjects, MODE or KERNEL:MODE (e.g. iptables,uml:ipvs); "
                             "a bare ipvs means uml:ipvs, other bare modes the host kernel")
    parser.add_argument("--runs", type=int, default=None, metavar="N", help="repetitions per figure (default 5, --quick 2)")
    parser.add_argument("--seconds", type=int, default=None, metavar="S",
                        help="length of each wrk / iperf3 / dnsperf run, whole seconds (default 3, --quick 1)")
    parser.add_argument("--services", default=None, metavar="LIST",
                        help="Service counts for the scale suite (default 100,1000,5000,10000; --quick 100,1000)")
    parser.add_argument("--endpoints", default=None, metavar="LIST",
                        help="endpoints per Service for the scale suite's sweep, run at the largest --services count "
                             "up to 1,000 (default 1,5,10,20; --quick 1,3; 1 alone: no sweep)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where results.json, results.md and the PNGs go (default bench/results/quick or bench/results/full)")
    parser.add_argument("--plan", action="store_true", help="print the steps and the expected duration, run nothing")


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(x.strip() for x in text.split(",") if x.strip())


def options(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from the parsed flags; ValueError names the bad flag."""
    counts = None
    if args.services is not None:
        try:
            counts = tuple(int(x) for x in _csv(args.services))
        except ValueError:
            raise ValueError(f"--services {args.services!r}: give comma-separated whole numbers, e.g. 100,1000") from None
    endpoints = None
    if args.endpoints is not None:
        try:
            endpoints = tuple(int(x) for x in _csv(args.endpoints))
        except ValueError:
            raise ValueError(f"--endpoints {args.endpoints!r}: give comma-separated whole numbers, e.g. 1,5,10") from None
    return BenchOptions.make(quick=args.quick, suites=_csv(args.suites), subjects=_csv(args.modes), runs=args.runs,
                             seconds=args.seconds, scale_counts=counts, scale_endpoints=endpoints)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options(args)
    except ValueError as exc:
        print(f"kubelab bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or ("bench/results/quick" if opts.quick else "bench/results/full"))
    results = Results(command=shlex.join(["kubelab", "bench", *_argv_tail()]))
    labs = LabPool()
    ctx = Context(opts, results, labs)
    plans = []
    for name in opts.suites:
        module = importlib.import_module(f"kubelab.bench.suites.{name}")
        plans.append((name, module.plan(ctx)))
    steps = [s for _, p in plans for s in p]
    expected = sum(s.estimate for s in steps) + _lab_up_estimate(opts)
    print(f"kubelab bench: {len(steps)} steps in suites {', '.join(opts.suites)}; "
          f"subjects {', '.join(str(s) for s in opts.subjects)}; expected duration about {_dur(expected)} "
          f"(measured on a 2-core machine; more when it is busy)", file=sys.stderr)
    if args.plan:
        for name, p in plans:
            for s in p:
                print(f"  {name:9s} ~{s.estimate:5.0f}s  {s.what}")
        return 0
    if os.geteuid() != 0 and any(n != "dns" for n in opts.suites):
        print("kubelab bench: the datapath, scale and control suites build network-namespace labs and need root; "
              "run as root, or pick --suites dns", file=sys.stderr)
        return 2
    ctx.progress = Progress(len(steps), estimates=[s.estimate for s in steps])
    started = time.monotonic()
    interrupted = False
    # SIGTERM ends the run like Ctrl-C: labs (namespaces, UML kernels,
    # proxies) are torn down and what was measured so far is written.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_steps(ctx, steps)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        for lab in labs.labs.values():
            results.notes += list(dict.fromkeys(lab.warnings))
        labs.close()
    took = _dur(time.monotonic() - started)
    ctx.progress.finish(f"interrupted after {took}" if interrupted else f"done in {took}")
    results.notes.insert(0, f"run {'interrupted after' if interrupted else 'took'} {took} (expected about {_dur(expected)})")
    paths = results.write(out)
    print(paths["results.md"].read_text())
    print(f"kubelab bench: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if interrupted:
        return 130
    if ctx.failed:
        print("kubelab bench: some figures could not be measured:\n  " + "\n  ".join(ctx.failed), file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _argv_tail() -> list[str]:
    argv = sys.argv[1:]
    if argv and argv[0] == "bench":
        argv = argv[1:]
    return argv


def _lab_up_estimate(opts: BenchOptions) -> float:
    lab_suites = [n for n in opts.suites if n != "dns"]
    if not lab_suites:
        return 0.0
    kernels = {s.kernel for s in opts.subjects}
    return (3.0 if "host" in kernels else 0.0) + (21.0 if "uml" in kernels else 0.0)
