"""kube-proxy's BoundedFrequencyRunner on asyncio, with an injectable clock.

Upstream: kubernetes ``pkg/util/async/bounded_frequency_runner.go``.

A runner calls one async function:

* at most once per ``min_interval`` (completion to next start), except that up
  to ``burst_runs`` runs may happen back to back; burst credit accrues at one
  run per ``min_interval`` (a token bucket, like upstream's flowcontrol
  limiter);
* at least once per ``max_interval``, even when nobody asks (the periodic
  resync);
* as soon as allowed after :meth:`BoundedFrequencyRunner.run` is called --
  requests that arrive while a run is in progress or too early are coalesced
  into one;
* no later than a requested delay after :meth:`retry_after` (the sync loop's
  back-off after a failed sync).

Runs never overlap.  An exception from the function is logged and does not
stop the loop; the caller decides about retries (``retry_after``).

Where kubelab's use differs from kube-proxy's, on purpose (checked against
``pkg/util/async`` and its successor ``pkg/proxy/runner``):

* burst: kube-proxy's proxiers passed ``burstSyncs = 2`` to the token-bucket
  runner; the newer ``pkg/proxy/runner`` dropped the burst (strictly one run
  per ``min_interval`` after completion).  kubelab keeps the burst of 2.
* periodic run: the iptables proxier's max interval is one hour
  (``FullSyncPeriod``) and ``--sync-period`` is its retry interval and
  canary-check period; the IPVS proxier resyncs every ``--sync-period``.
  kubelab's controller runs every mode at least once per ``--sync-period``;
  whether that run is a full sync is the mode's ``full_sync_period``
  (iptables: one hour, as upstream, so its periodic runs are partial and,
  with nothing changed, write nothing).
* retry: kube-proxy retries a failed sync after ``--sync-period``; kubelab's
  controller backs off from ``--min-sync-period`` doubling up to
  ``--sync-period`` (see :mod:`kubelab.proxy.controller`), so a transient
  failure (an xtables lock held by someone else) costs seconds, not 30 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger("kubelab.proxy.runner")


class Clock(Protocol):
    """Monotonic time and a way to wait for it (seconds, as floats)."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """The event loop's clock: what production uses."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class FakeClock:
    """A clock that moves only when told: deterministic tests of timing logic.

    ``await clock.advance(seconds)`` moves time forward, wakes every sleeper
    whose deadline passed, and lets the event loop run until it is idle again.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((deadline, fut))
        try:
            await fut
        finally:
            self._sleepers = [(d, f) for d, f in self._sleepers if f is not fut]

    async def advance(self, seconds: float) -> None:
        """Move time forward in steps, so each wake-up sees its own deadline as now."""
        target = self._now + seconds
        while True:
            await settle()
            pending = sorted(d for d, f in self._sleepers if not f.done() and d <= target)
            if not pending:
                break
            self._now = max(self._now, pending[0])
            for d, f in self._sleepers:
                if d <= self._now and not f.done():
                    f.set_result(None)
        self._now = target
        await settle()

    def next_deadline(self) -> float | None:
        """The earliest pending sleeper's deadline (for assertions in tests)."""
        live = [d for d, f in self._sleepers if not f.done()]
        return min(live) if live else None


async def settle(rounds: int = 20) -> None:
    """Let every ready task run a few steps (tests with a FakeClock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class _TokenBucket:
    """Upstream's flowcontrol token bucket: ``qps`` refill, ``burst`` capacity, starts full."""

    def __init__(self, qps: float, burst: int, clock: Clock) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.clock = clock
        self.last = clock.now()

    def try_accept(self) -> bool:
        now = self.clock.now()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.qps)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class BoundedFrequencyRunner:
    """Runs ``fn`` no more often than ``min_interval`` and no less often than ``max_interval``."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Awaitable[None]],
        min_interval: float,
        max_interval: float,
        burst_runs: int = 1,
        clock: Clock | None = None,
    ) -> None:
        if max_interval < min_interval:
            raise ValueError(f"{name}: max interval ({max_interval}s) must be >= min interval ({min_interval}s)")
        self.name = name
        self.fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.burst_runs = burst_runs
        self.clock: Clock = clock or MonotonicClock()
        self.runs = 0  # completed calls of fn, for tests and logs
        self._wake: asyncio.Event | None = None
        self._run_requested = False
        self._retry_at: float | None = None
        self._limiter: _TokenBucket | None = None
        self._last_run = float("-inf")
        self._next = 0.0  # when the timer fires next

    def _event(self) -> asyncio.Event:
        # Created lazily so the constructor does not need a running loop.
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def run(self) -> None:
        """Ask for a run as soon as the min interval allows (coalesced with other requests)."""
        self._run_requested = True
        self._event().set()

    def retry_after(self, seconds: float) -> None:
        """Make sure fn runs again within ``seconds`` from now (keeps the soonest request)."""
        at = self.clock.now() + seconds
        if self._retry_at is not None and self._retry_at <= at:
            return
        self._retry_at = at
        self._event().set()

    async def loop(self) -> None:
        """Serve run requests and the periodic timer until cancelled."""
        wake = self._event()
        if self.min_interval > 0 and self._limiter is None:
            self._limiter = _TokenBucket(1.0 / self.min_interval, self.burst_runs, self.clock)
        self._next = self.clock.now() + self.max_interval
        log.debug("%s loop running", self.name)
        while True:
            if not wake.is_set():
                sleeper = asyncio.ensure_future(self.clock.sleep_until(self._next))
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (sleeper, waiter):
                        t.cancel()
                    await asyncio.gather(sleeper, waiter, return_exceptions=True)
            wake.clear()
            if self._retry_at is not None:
                if self._retry_at < self._next:
                    log.debug("%s: retrying in %.3fs", self.name, self._retry_at - self.clock.now())
                    self._next = self._retry_at
                self._retry_at = None
            if self._run_requested or self.clock.now() >= self._next:
                self._run_requested = False
                await self._try_run()

    async def _try_run(self) -> None:
        if self._limiter is None or self._limiter.try_accept():
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: run failed", self.name)
            self.runs += 1
            self._last_run = self.clock.now()
            # A retry requested during the run stays in force.
            self._next = self._last_run + self.max_interval
            if self._retry_at is not None:
                self._event().set()
            return
        # Too early: run when the next token is due, or at the timer if sooner.
        now = self.clock.now()
        next_possible = now + max(0.0, self.min_interval - (now - self._last_run))
        if self._limiter is not None and self._limiter.tokens < 1.0:
            next_possible = max(next_possible, now + (1.0 - self._limiter.tokens) / self._limiter.qps)
        self._next = min(self._next, next_possible)
