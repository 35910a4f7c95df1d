"""The API source's small pure parts: the watch line splitter and client-go's back-off.

No addresses: nothing is contacted.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from kubelab.proxy.sources import kube


class Chunks:
    """A response body that arrives in the given chunks (aiohttp's ``iter_any`` shape)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):
        for c in self.chunks:
            yield c


def lines(chunks: list[bytes], max_bytes: int = kube.MAX_EVENT_BYTES) -> list[bytes]:
    async def collect():
        return [line async for line in kube.iter_lines(Chunks(chunks), max_bytes)]

    return asyncio.run(collect())


SPLITS = [
    ("whole-lines", [b'{"a":1}\n', b'{"b":2}\n'], [b'{"a":1}', b'{"b":2}']),
    ("two-in-one-chunk", [b'{"a":1}\n{"b":2}\n'], [b'{"a":1}', b'{"b":2}']),
    ("byte-by-byte", [bytes([c]) for c in b'{"a":1}\n{"b":2}\n'], [b'{"a":1}', b'{"b":2}']),
    ("split-at-newline", [b'{"a":1}', b'\n{"b"', b':2}\n'], [b'{"a":1}', b'{"b":2}']),
    ("blank-lines-skipped", [b'\n\n{"a":1}\n\r\n'], [b'{"a":1}']),
    # A stream cut mid-event: the half line is never handed out (it is re-read after the reconnect).
    ("cut-mid-event", [b'{"a":1}\n{"type":"MODIFIED","obj'], [b'{"a":1}']),
    ("empty", [], []),
]


@pytest.mark.parametrize("chunks,want", [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_iter_lines(chunks, want):
    assert lines(chunks) == want


def test_iter_lines_refuses_an_endless_line():
    with pytest.raises(kube.APIStatusError, match="over 16 bytes"):
        lines([b"x" * 10, b"y" * 10], max_bytes=16)
    # Lines of any size below the limit pass, however they are chunked.
    big = b"z" * 300_000
    assert lines([big[:70_000], big[70_000:] + b"\n"]) == [big]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_caps_jitters_and_resets():
    clock = Clock()
    b = kube.Backoff(0.8, 30.0, 2.0, 1.0, 120.0, clock, random.Random(1))
    delays = []
    for _ in range(8):
        delays.append(b.next())
        clock.now += 1
    bases = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    for base, d in zip(bases, delays):
        assert base <= d <= 2 * base, (base, d)
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    # Two quiet minutes later it starts again from the initial delay.
    clock.now += 121
    assert 0.8 <= b.next() <= 1.6


def test_backoff_without_jitter_is_exact():
    clock = Clock()
    b = kube.Backoff(1.0, 4.0, 2.0, 0.0, 120.0, clock, random.Random(1))
    assert [b.next() for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]


STATUSES = [
    ("status-body", 410, b'{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version: 5 (9)"}',
     None, ("Expired", "too old resource version: 5 (9)", None, True)),
    ("retry-after", 429, b'{"kind":"Status","reason":"TooManyRequests","message":"slow down"}', "7",
     ("TooManyRequests", "slow down", 7.0, False)),
    ("not-json", 502, b"<html>bad gateway</html>", "soon", ("Unknown", "<html>bad gateway</html>", None, False)),
]


@pytest.mark.parametrize("code,raw,retry_after,want", [c[1:] for c in STATUSES], ids=[c[0] for c in STATUSES])
def test_status_error(code, raw, retry_after, want):
    e = kube.status_error(code, raw, retry_after, "list services")
    assert (e.reason, e.message, e.retry_after, e.expired) == want
    assert str(e).startswith(f"list services: {code} ")
