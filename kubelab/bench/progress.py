"""A progress display for long benchmark runs.

On a terminal it redraws one status line (step i/n, elapsed, estimated time
left); elsewhere (CI logs, pipes) it prints one line per step, so logs stay
readable.  Given each step's duration estimate, the time left is the
estimates still ahead scaled by how the run compares with the estimates so
far (steps differ a lot: growing a lab to 10,000 Services is not a sync of
100); without them, the average step time so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import IO


class Progress:
    """Counts steps of a run of known length and shows where it is."""

    def __init__(self, total: int, out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic,
                 estimates: Sequence[float] | None = None):
        self.total = max(1, total)
        self.estimates = list(estimates) if estimates is not None and len(estimates) == total else None
        self.done = 0
        self.out = out or sys.stderr
        self.clock = clock
        self.start = clock()
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())

    def step(self, what: str) -> None:
        """Announce the step about to run."""
        elapsed = self.clock() - self.start
        eta = ""
        if self.done:
            left = elapsed / self.done * (self.total - self.done)
            if self.estimates is not None:
                done_est, ahead_est = sum(self.estimates[:self.done]), sum(self.estimates[self.done:])
                if done_est > 0:
                    left = ahead_est * elapsed / done_est
            eta = f", ~{_dur(left)} left"
        line = f"[{self.done + 1}/{self.total} {_dur(elapsed)}{eta}] {what}"
        if self.tty:
            self.out.write("\r\x1b[2K" + line[:200])
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.done += 1

    def finish(self, what: str = "done") -> None:
        line = f"[{self.total}/{self.total} {_dur(self.clock() - self.start)}] {what}"
        self.out.write(("\r\x1b[2K" if self.tty else "") + line + "\n")
        self.out.flush()


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
