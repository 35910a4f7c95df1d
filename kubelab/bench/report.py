"""Benchmark results: one JSON document, a Markdown table, and PNG plots.

A :class:`Results` collects *figures* (one measured quantity for one subject,
optionally against a peer, as a ratio) and *series* (a quantity against a
parameter, e.g. first-packet latency against the number of Services, one
line per mode).  ``write()`` saves ``results.json``, ``results.md`` and one
PNG per series in an output folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kubelab.bench.stats import Summary


@dataclass
class Figure:
    """One quantity for one subject, with the peer it is compared against."""

    suite: str
    name: str  # e.g. "short connections/s"
    subject: str  # e.g. "kubelab userspace"
    unit: str
    value: Summary
    peer: str = ""  # e.g. "haproxy"
    peer_value: Summary | None = None
    ratio: Summary | None = None  # subject / peer, paired
    target: str = ""  # e.g. ">= 1.0"
    higher_is_better: bool = True

    def meets_target(self) -> bool | None:
        """Whether the median ratio meets ``target`` (None when there is none)."""
        if not self.target or self.ratio is None:
            return None
        op, _, num = self.target.partition(" ")
        bound = float(num)
        r = self.ratio.median
        return {">=": r >= bound, "<=": r <= bound, ">": r > bound, "<": r < bound}[op]

    def as_dict(self) -> dict:
        return {
            "suite": self.suite,
            "name": self.name,
            "subject": self.subject,
            "unit": self.unit,
            "value": self.value.as_dict(),
            "peer": self.peer,
            "peer_value": self.peer_value.as_dict() if self.peer_value else None,
            "ratio": self.ratio.as_dict() if self.ratio else None,
            "target": self.target,
            "meets_target": self.meets_target(),
        }


@dataclass
class Series:
    """A quantity against a parameter, one line per label (mode or peer)."""

    suite: str
    name: str
    x_label: str
    y_label: str
    x: list[float]
    lines: dict[str, list[Summary | None]] = field(default_factory=dict)
    log_x: bool = False
    log_y: bool = False
    # Named x values (e.g. figures compared across modes): plotted as grouped
    # bars, one group per category, ``x`` then only orders them (0, 1, ...).
    categories: list[str] | None = None
    hline: float | None = None  # a reference level drawn dashed (e.g. 1.0 = the baseline)
    hline_label: str = ""  # what that level is, for the legend
    # Line style per label ("-", "--", ":"): e.g. baselines dashed beside the
    # figure they are measured with.
    styles: dict[str, str] = field(default_factory=dict)

    def x_names(self) -> list[str]:
        if self.categories:
            return [c.replace("\n", " ") for c in self.categories]
        return [f"{x:,g}" for x in self.x]

    def as_dict(self) -> dict:
        return {
            "suite": self.suite,
            "name": self.name,
            "x_label": self.x_label,
            "y_label": self.y_label,
            "x": self.x,
            "categories": self.categories,
            "log_x": self.log_x,
            "log_y": self.log_y,
            "lines": {k: [s.as_dict() if s else None for s in v] for k, v in self.lines.items()},
        }


@dataclass
class Results:
    """Everything one ``kubelab bench`` run measured, with where and how."""

    command: str = field(default_factory=lambda: shlex.join(["kubelab", "bench", *sys.argv[2:]]))
    figures: list[Figure] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def machine(self) -> dict:
        mem_gib = 0.0
        try:
            with open("/proc/meminfo") as f:
                mem_gib = int(f.readline().split()[1]) / 1024 / 1024
        except OSError:
            pass
        return {
            "cpus": os.cpu_count(),
            "memory_gib": round(mem_gib, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpu": _cpu_model(),
        }

    def as_dict(self) -> dict:
        return {
            "command": self.command,
            "date": self.started,
            "machine": self.machine(),
            "figures": [f.as_dict() for f in self.figures],
            "series": [s.as_dict() for s in self.series],
            "notes": self.notes,
        }

    def markdown(self, plots: dict[str, str] | None = None) -> str:
        """The results as Markdown: a header, one table per suite, plot links."""
        m = self.machine()
        lines = [
            f"Command: `{self.command}`  ",
            f"Date: {self.started}; machine: {m['cpus']} cores, {m['memory_gib']} GiB, "
            f"kernel {m['kernel']}, Python {m['python']}, {m['cpu']}",
            "",
        ]
        suites: dict[str, list[Figure]] = {}
        for f in self.figures:
            suites.setdefault(f.suite, []).append(f)
        for suite, figs in suites.items():
            lines += [f"### {suite}", "", "| figure | subject | value | peer | peer value | ratio | target | met |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for f in figs:
                met = f.meets_target()
                lines.append(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                        f.name,
                        f.subject,
                        f.value.fmt(f.unit),
                        f.peer or "-",
                        f.peer_value.fmt(f.unit) if f.peer_value else "-",
                        f.ratio.fmt() if f.ratio else "-",
                        f.target or "-",
                        {True: "yes", False: "**no**", None: "-"}[met],
                    )
                )
            lines.append("")
        for s in self.series:
            lines += [f"### {s.suite}: {s.name}", "", "| " + s.x_label + " | " + " | ".join(s.lines) + " |",
                      "| --- |" + " --- |" * len(s.lines)]
            for i, x in enumerate(s.x_names()):
                cells = [(v[i].fmt() if i < len(v) and v[i] else "-") for v in s.lines.values()]
                lines.append(f"| {x} | " + " | ".join(cells) + " |")
            lines.append("")
            if plots and s.name in plots:
                lines += [f"![{s.name}]({plots[s.name]})", ""]
        for n in self.notes:
            lines.append(f"- {n}")
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write results.json, results.md and one PNG per series; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        plots: dict[str, str] = {}
        for s in self.series:
            png = out / (_slug(f"{s.suite}-{s.name}") + ".png")
            plot_series(s, png)
            plots[s.name] = png.name
            paths[png.name] = png
        (out / "results.json").write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        (out / "results.md").write_text(self.markdown(plots))
        paths["results.json"] = out / "results.json"
        paths["results.md"] = out / "results.md"
        return paths


def plot_series(s: Series, path: Path) -> None:
    """One PNG: a line per label with median markers and min..max error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on these machines
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    many = len(s.lines) > 4
    # Many lines: the legend goes beside the axes, not over the data.
    fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.6 if many else 4.2), dpi=110)
    if s.categories:
        _bars(ax, s)
    # "X, direct to pod" and "X, reference" share X's colour (the style tells them apart).
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups: dict[str, str] = {}
    for label, values in ({} if s.categories else s.lines).items():
        colour = groups.setdefault(label.split(", ")[0], palette[len(groups) % len(palette)])
        xs = [x for x, v in zip(s.x, values) if v]
        meds = [v.median for v in values if v]
        lo = [v.median - v.low for v in values if v]
        hi = [v.high - v.median for v in values if v]
        ax.errorbar(xs, meds, yerr=[lo, hi], marker="o", capsize=3, label=label, color=colour,
                    linestyle=s.styles.get(label, "-"))
    if s.log_x:
        ax.set_xscale("log")
    if not s.categories:
        # Label the measured points themselves (100, 1,000, 10,000), not 10^k.
        ax.set_xticks(s.x, [f"{x:,g}" for x in s.x])
        ax.minorticks_off()
    if s.log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        # Minor ticks labelled at 2x and 5x only: readable, not crowded.
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,g}" if f"{v:.0e}"[0] in "25" else ""))
    if s.hline is not None:
        ax.axhline(s.hline, color="grey", linestyle="--", linewidth=1, label=s.hline_label or None)
    ax.set_xlabel(s.x_label)
    ax.set_ylabel(s.y_label, fontsize=9 if len(s.y_label) > 40 else None)
    ax.set_title(f"{s.suite}: {s.name}")
    ax.grid(True, alpha=0.3, which="both" if s.log_y else "major")
    if many and not s.categories:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8 if many else None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bars(ax, s: Series) -> None:
    """Grouped bars (one group per category, one bar per line) with min..max whiskers."""
    n = max(1, len(s.lines))
    width = 0.8 / n
    for j, (label, values) in enumerate(s.lines.items()):
        xs = [i + (j - (n - 1) / 2) * width for i, v in enumerate(values) if v]
        meds = [v.median for v in values if v]
        lo = [v.median - v.low for v in values if v]
        hi = [v.high - v.median for v in values if v]
        ax.bar(xs, meds, width=width * 0.95, yerr=[lo, hi], capsize=3, label=label)
    multiline = any("\n" in c for c in s.categories)
    ax.set_xticks(range(len(s.categories)), s.categories, rotation=0 if multiline else 15,
                  ha="center" if multiline else "right", fontsize=8)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
