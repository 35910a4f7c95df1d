"""The suites of ``kubelab bench``: data path, scale, control plane, DNS.

Each suite is a module with

* ``plan(opts) -> list[Step]`` -- what it will run, so the CLI can state
  the expected duration and the progress display knows the step count
  before anything starts;
* ``run(ctx, steps)`` -- runs the steps, adding figures, series and notes to
  ``ctx.results``.

Suites share labs through :class:`LabPool` (one host-kernel lab, one UML
lab, each brought up at first use and torn down at the end), so a run boots
UML at most once.  A *subject* is a proxy mode on a kernel
(``host:iptables``, ``uml:ipvs``); the host kernel has no IPVS, so IPVS is
measured in UML, next to userspace and iptables in the same UML kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from kubelab.bench.progress import Progress
from kubelab.bench.report import Results

# Run order: the scale suite grows the labs' Service count, so it comes
# after the suites that want a small lab.
SUITE_NAMES = ("datapath", "control", "scale", "dns")
KERNELS = ("host", "uml")
MODES = ("userspace", "iptables", "ipvs")

# Default subjects: everything on both kernels, except IPVS on the host
# (no ip_vs there).  --quick keeps the host modes and IPVS in UML.
FULL_SUBJECTS = ("host:userspace", "host:iptables", "uml:userspace", "uml:iptables", "uml:ipvs")
QUICK_SUBJECTS = ("host:userspace", "host:iptables", "uml:ipvs")


@dataclass(frozen=True)
class Subject:
    """A proxy mode on a kernel: what one column of the comparison is."""

    kernel: str  # host | uml
    mode: str  # userspace | iptables | ipvs

    @classmethod
    def parse(cls, text: str) -> Subject:
        kernel, _, mode = text.rpartition(":")
        kernel = kernel or ("uml" if mode == "ipvs" else "host")
        if kernel not in KERNELS or mode not in MODES:
            raise ValueError(f"{text!r}: a subject is [KERNEL:]MODE with KERNEL one of {', '.join(KERNELS)} "
                             f"and MODE one of {', '.join(MODES)}, e.g. uml:ipvs or iptables")
        return cls(kernel, mode)

    def __str__(self) -> str:
        return f"{self.mode} ({self.kernel})"

    @property
    def key(self) -> str:
        return f"{self.kernel}:{self.mode}"


@dataclass
class BenchOptions:
    """What to run: the CLI's flags, validated."""

    suites: tuple[str, ...] = SUITE_NAMES
    subjects: tuple[Subject, ...] = tuple(Subject.parse(s) for s in FULL_SUBJECTS)
    quick: bool = False
    runs: int = 5  # repetitions (pairs) per figure
    seconds: float = 3.0  # length of one wrk / iperf3 / dnsperf run
    scale_counts: tuple[int, ...] = (100, 1000, 5000, 10000)
    scale_endpoints: tuple[int, ...] = (1, 5, 10, 20)  # endpoints per Service in the scale suite's sweep
    changes: int = 5  # control plane: endpoint changes per subject
    dns_services: int = 2000

    @classmethod
    def make(cls, *, quick: bool, suites: tuple[str, ...] | None = None, subjects: tuple[str, ...] | None = None,
             runs: int | None = None, seconds: float | None = None, scale_counts: tuple[int, ...] | None = None,
             scale_endpoints: tuple[int, ...] | None = None) -> BenchOptions:
        base = cls(
            subjects=tuple(Subject.parse(s) for s in (QUICK_SUBJECTS if quick else FULL_SUBJECTS)),
            quick=quick,
            runs=2 if quick else 5,
            seconds=1.0 if quick else 3.0,
            scale_counts=(100, 1000) if quick else (100, 1000, 5000, 10000),
            scale_endpoints=(1, 3) if quick else (1, 5, 10, 20),
            changes=2 if quick else 7,
            dns_services=1000 if quick else 2000,
        )
        if suites is not None:
            unknown = [s for s in suites if s not in SUITE_NAMES]
            if unknown:
                raise ValueError(f"--suites: unknown suite {unknown[0]!r}; choose from {', '.join(SUITE_NAMES)}")
            base.suites = tuple(s for s in SUITE_NAMES if s in suites)
        if subjects is not None:
            base.subjects = tuple(dict.fromkeys(Subject.parse(s) for s in subjects))
        if runs is not None:
            if runs < 1:
                raise ValueError("--runs must be at least 1")
            base.runs = runs
        if seconds is not None:
            if seconds < 1 or seconds != int(seconds):
                raise ValueError("--seconds must be a whole number of seconds, at least 1 (wrk and iperf3 count in seconds)")
            base.seconds = seconds
        if scale_counts is not None:
            if not scale_counts or min(scale_counts) < 1:
                raise ValueError("--services needs positive counts, e.g. 100,1000")
            base.scale_counts = tuple(sorted(set(scale_counts)))
        if scale_endpoints is not None:
            if not scale_endpoints or min(scale_endpoints) < 1 or max(scale_endpoints) > 100:
                raise ValueError("--endpoints needs counts from 1 to 100 endpoints per Service, e.g. 1,5,10 (1 alone: no sweep)")
            base.scale_endpoints = tuple(sorted(set(scale_endpoints) | {1}))
        return base


@dataclass
class Step:
    """One unit of work announced on the progress display, with a duration guess (seconds).

    Steps of one ``group`` (a subject's session: start the proxy, measure,
    stop it) depend on each other: once one fails, the rest of the group is
    skipped, except steps marked ``always`` (stopping a proxy, writing the
    figures measured so far).
    """

    what: str
    estimate: float
    fn: Callable[[], None]
    group: str = ""
    always: bool = False


def run_steps(ctx: Context, steps: list[Step]) -> None:
    """Run steps in order, announcing each; a failure is recorded and skips the rest of its group."""
    failed_groups: set[str] = set()
    for i, step in enumerate(steps):
        if ctx.progress is not None:
            ctx.progress.step(step.what)
        if step.group in failed_groups and not step.always:
            continue
        try:
            step.fn()
        except KeyboardInterrupt:
            # Interrupted: still stop servers and keep the figures measured so far.
            for later in steps[i + 1:]:
                if later.always:
                    with contextlib.suppress(Exception):
                        later.fn()
            raise
        except Exception as exc:  # noqa: BLE001 - one subject failing must not lose the others' figures
            failed_groups.add(step.group)
            ctx.fail(step.what, exc)


def uml_unavailable() -> str:
    """Why labs in User-Mode Linux cannot run here ("" when they can)."""
    if shutil.which("linux") is None:
        return "Debian's user-mode-linux (the `linux` binary) is not installed: apt-get install user-mode-linux"
    if not os.path.isdir("/usr/lib/uml/modules"):
        return "/usr/lib/uml/modules is missing (user-mode-linux's modules package)"
    return ""


@dataclass
class LabPool:
    """Bench labs shared by the suites of one run: at most one per kernel, up at first use."""

    prefix: str = field(default_factory=lambda: f"kb{os.getpid() % 100000}")
    labs: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)

    def get(self, kernel: str):
        from kubelab.bench.suites.labkit import BenchLab

        if kernel in self.failures:
            raise self.failures[kernel]
        if kernel not in self.labs:
            why = uml_unavailable() if kernel == "uml" else ""
            if why:
                self.failures[kernel] = RuntimeError(why)
                raise self.failures[kernel]
            lab = BenchLab(name=f"{self.prefix}-{kernel}", kernel=kernel)
            try:
                lab.__enter__()
            except Exception as exc:
                self.failures[kernel] = exc
                raise
            self.labs[kernel] = lab
        return self.labs[kernel]

    def close(self) -> None:
        for lab in self.labs.values():
            with contextlib.suppress(Exception):
                lab.close()
        self.labs.clear()


@dataclass
class Context:
    """What a running suite uses: options, the results being built, labs, progress."""

    opts: BenchOptions
    results: Results
    labs: LabPool
    progress: Progress | None = None
    failed: list[str] = field(default_factory=list)

    def fail(self, what: str, exc: BaseException) -> None:
        """Record that ``what`` could not be measured and why; the run goes on."""
        msg = f"{what}: not measured: {exc}"
        self.failed.append(msg)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # One lab that cannot come up fails every step that needs it: say it once.
        if any(n.endswith(f"not measured: {reason}") for n in self.results.notes):
            return
        note = f"{what}: not measured: {exc}"
        self.results.notes.append(note if len(note) < 600 else note[:600] + " ...")
