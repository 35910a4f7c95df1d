"""BoundedFrequencyRunner against a fake clock (no wall-clock timing at all).

Addresses: none (no network).
"""

from __future__ import annotations

import asyncio
import functools

import pytest

from kubelab.proxy.runner import BoundedFrequencyRunner, FakeClock, MonotonicClock, settle


def arun(fn):
    """Run an async test function in a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


class Recorder:
    """The runner's function: records the fake time of each call; can fail or block."""

    def __init__(self, clock):
        self.clock = clock
        self.calls: list[float] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self):
        self.calls.append(self.clock.now())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("boom")


async def _start(min_interval=1.0, max_interval=10.0, burst=1):
    clock = FakeClock(start=0.0)
    fn = Recorder(clock)
    runner = BoundedFrequencyRunner("test", fn, min_interval, max_interval, burst, clock=clock)
    task = asyncio.create_task(runner.loop())
    await settle()
    return clock, fn, runner, task


async def _stop(task):
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_max_interval_below_min_is_an_error():
    with pytest.raises(ValueError, match="max interval"):
        BoundedFrequencyRunner("x", Recorder(FakeClock()), 5, 1)


# Each script step: ("run",) asks for a run; ("adv", seconds) moves the clock;
# after every step the list of call times so far is compared.
SCRIPTS = [
    (
        "first run immediate, second waits min interval",
        dict(min_interval=1.0, max_interval=10.0, burst=1),
        [("run", [0.0]), ("adv", 0.5, [0.0]), ("run", [0.0]), ("adv", 0.49, [0.0]), ("adv", 0.01, [0.0, 1.0])],
    ),
    (
        "many requests coalesce into one",
        dict(min_interval=1.0, max_interval=10.0, burst=1),
        [("run", [0.0]), ("run", [0.0]), ("run", [0.0]), ("adv", 1.0, [0.0, 1.0]), ("adv", 5.0, [0.0, 1.0])],
    ),
    (
        "periodic run at max interval with no requests",
        dict(min_interval=1.0, max_interval=10.0, burst=1),
        [("adv", 9.9, []), ("adv", 0.1, [10.0]), ("adv", 10.0, [10.0, 20.0])],
    ),
    (
        "a run resets the periodic timer",
        dict(min_interval=1.0, max_interval=10.0, burst=1),
        [("adv", 5.0, []), ("run", [5.0]), ("adv", 9.9, [5.0]), ("adv", 0.1, [5.0, 15.0])],
    ),
    (
        "burst of two then rate limited",
        dict(min_interval=1.0, max_interval=10.0, burst=2),
        [("run", [0.0]), ("run", [0.0, 0.0]), ("run", [0.0, 0.0]), ("adv", 0.5, [0.0, 0.0]),
         ("adv", 0.5, [0.0, 0.0, 1.0])],
    ),
    (
        "burst credit refills one per min interval",
        dict(min_interval=1.0, max_interval=100.0, burst=3),
        [("run", [0.0]), ("run", [0.0, 0.0]), ("run", [0.0, 0.0, 0.0]), ("adv", 2.0, [0.0, 0.0, 0.0]),
         ("run", [0.0, 0.0, 0.0, 2.0]), ("run", [0.0, 0.0, 0.0, 2.0, 2.0]), ("run", [0.0, 0.0, 0.0, 2.0, 2.0]),
         ("adv", 1.0, [0.0, 0.0, 0.0, 2.0, 2.0, 3.0])],
    ),
    (
        "zero min interval: every request runs",
        dict(min_interval=0.0, max_interval=10.0, burst=1),
        [("run", [0.0]), ("run", [0.0, 0.0]), ("adv", 0.1, [0.0, 0.0])],
    ),
]


@pytest.mark.parametrize("kw,steps", [s[1:] for s in SCRIPTS], ids=[s[0] for s in SCRIPTS])
@arun
async def test_scripts(kw, steps):
    clock, fn, runner, task = await _start(**kw)
    try:
        for step in steps:
            if step[0] == "run":
                runner.run()
                await settle()
            else:
                await clock.advance(step[1])
            assert fn.calls == pytest.approx(step[-1]), step
    finally:
        await _stop(task)


@arun
async def test_retry_after_brings_next_run_forward():
    clock, fn, runner, task = await _start(min_interval=1.0, max_interval=30.0)
    try:
        runner.run()
        await settle()
        runner.retry_after(5.0)
        runner.retry_after(8.0)  # later than the pending retry: ignored
        await clock.advance(4.9)
        assert fn.calls == [0.0]
        await clock.advance(0.1)
        assert fn.calls == pytest.approx([0.0, 5.0])
        # After the retry the periodic timer is back to max interval.
        await clock.advance(29.9)
        assert len(fn.calls) == 2
        await clock.advance(0.1)
        assert fn.calls == pytest.approx([0.0, 5.0, 35.0])
    finally:
        await _stop(task)


@arun
async def test_retry_requested_inside_a_failing_run():
    clock = FakeClock(start=0.0)
    calls: list[float] = []

    async def fn():
        calls.append(clock.now())
        if len(calls) < 3:
            runner.retry_after(2.0 * len(calls))  # back-off, as the controller does
            raise RuntimeError("sync failed")

    runner = BoundedFrequencyRunner("t", fn, 1.0, 60.0, clock=clock)
    task = asyncio.create_task(runner.loop())
    try:
        await settle()
        runner.run()
        await clock.advance(10.0)
        # A failure does not kill the loop; retries come at 2 s then 4 s later.
        assert calls == pytest.approx([0.0, 2.0, 6.0])
        assert runner.runs == 3
    finally:
        await _stop(task)


@arun
async def test_runs_never_overlap_and_requests_during_a_run_coalesce():
    clock, fn, runner, task = await _start(min_interval=1.0, max_interval=60.0)
    try:
        fn.gate = asyncio.Event()
        runner.run()
        await settle()
        assert len(fn.calls) == 1
        for _ in range(5):
            runner.run()
        await clock.advance(3.0)  # the first run is still blocked
        assert len(fn.calls) == 1
        fn.gate.set()
        fn.gate = None
        await settle()
        # The five requests made during the run became one run, right after it
        # ended: the min interval is counted from the previous start, as
        # upstream's token bucket does.
        assert fn.calls == pytest.approx([0.0, 3.0])
        await clock.advance(30.0)
        assert fn.calls == pytest.approx([0.0, 3.0])
    finally:
        await _stop(task)


@arun
async def test_real_clock_smoke():
    """The production clock drives the same loop (no timing is asserted)."""
    done = asyncio.Event()

    async def fn():
        done.set()

    runner = BoundedFrequencyRunner("real", fn, 0.01, 1.0, clock=MonotonicClock())
    task = asyncio.create_task(runner.loop())
    try:
        runner.run()
        await asyncio.wait_for(done.wait(), timeout=30)
    finally:
        await _stop(task)
