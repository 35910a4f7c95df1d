"""Statistics for benchmark figures measured on shared, noisy machines.

Every figure is a median of repeated runs with its spread, and every target
is a *ratio* of kubelab against a peer measured in the same run: the peer
and kubelab are run alternately (ABAB...) so slow phases of the machine hit
both, and the ratio is taken per pair before the median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated samples of one figure."""

    median: float
    low: float  # min of the samples
    high: float  # max of the samples
    p25: float
    p75: float
    n: int
    samples: tuple[float, ...] = field(default=(), repr=False)

    @property
    def spread_pct(self) -> float:
        """Half the min..max range, as a percentage of the median."""
        if not self.median:
            return 0.0
        return 100.0 * (self.high - self.low) / 2.0 / abs(self.median)

    def fmt(self, unit: str = "", digits: int = 3) -> str:
        """"12.3 (±4.1%, n=5)" with ``unit`` after the number."""
        u = f" {unit}" if unit else ""
        return f"{_sig(self.median, digits)}{u} (±{self.spread_pct:.1f}%, n={self.n})"

    def as_dict(self) -> dict:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "p25": self.p25,
            "p75": self.p75,
            "n": self.n,
            "samples": list(self.samples),
        }


def summarize(samples: Sequence[float]) -> Summary:
    """Summarise repeated samples; raises ValueError on an empty list."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples to summarise")
    return Summary(
        median=statistics.median(xs),
        low=xs[0],
        high=xs[-1],
        p25=percentile(xs, 25),
        p75=percentile(xs, 75),
        n=len(xs),
        samples=tuple(xs),
    )


def percentile(sorted_xs: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile of an already sorted sequence."""
    if not sorted_xs:
        raise ValueError("no samples")
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    rank = (len(sorted_xs) - 1) * pct / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    frac = rank - lo
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * frac)


def paired_ratios(ours: Sequence[float], peer: Sequence[float]) -> Summary:
    """Summary of ours[i] / peer[i] over pairs measured back to back."""
    if len(ours) != len(peer):
        raise ValueError(f"paired samples differ in length: {len(ours)} vs {len(peer)}")
    ratios = [o / p for o, p in zip(ours, peer) if p]
    return summarize(ratios)


def _sig(x: float, digits: int) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"
