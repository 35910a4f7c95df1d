"""recvmmsg/sendmmsg through ctypes (kubelab.dns.mmsg): batches in, answers out to the right senders.

Addresses: 127.0.0.1 and ::1 (ephemeral ports) only.
"""

from __future__ import annotations

import socket

import pytest

from kubelab.dns import mmsg


def test_available_here():
    assert mmsg.available()  # Linux with glibc: the server's UDP fast path uses it


def _pair(family: int, host: str, n_clients: int):
    srv = socket.socket(family, socket.SOCK_DGRAM)
    srv.bind((host, 0))
    srv.setblocking(False)
    clients = []
    for _ in range(n_clients):
        c = socket.socket(family, socket.SOCK_DGRAM)
        c.bind((host, 0))
        c.settimeout(10)
        clients.append(c)
    return srv, clients


def _close(srv, clients):
    srv.close()
    for c in clients:
        c.close()


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_batch_in_answers_out(family, host):
    srv, clients = _pair(family, host, 5)
    try:
        m = mmsg.MMsgSocket(srv, batch=8, slot=64)
        assert m.recv() == 0  # nothing queued: no exception, no batch
        for i, c in enumerate(clients):
            c.sendto(b"q%d" % i + b"x" * i, srv.getsockname())
        n = m.recv()
        assert n == 5
        got = {}
        for i in range(n):
            addr = m.address(i)
            got[addr[:2]] = m.data(i)
            assert m.length(i) == len(m.data(i)) and not m.truncated(i)
        assert got == {c.getsockname()[:2]: b"q%d" % i + b"x" * i for i, c in enumerate(clients)}
        # Answer slots 0, 1, 3 and 4 (2 went to a "slow path"): two runs, each sender gets its own answer.
        for i in (0, 1, 3, 4):
            assert m.put(i, b"a:" + m.data(i))
        assert m.flush() == 0
        for c in clients:
            mine = [i for i in range(n) if m.address(i)[:2] == c.getsockname()[:2]][0]
            if mine == 2:
                c.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    c.recv(100)
            else:
                assert c.recv(100) == b"a:" + got[c.getsockname()[:2]]
    finally:
        _close(srv, clients)


def test_more_than_a_batch_and_truncation():
    srv, clients = _pair(socket.AF_INET, "127.0.0.1", 1)
    try:
        m = mmsg.MMsgSocket(srv, batch=4, slot=16)
        c = clients[0]
        for i in range(6):
            c.sendto(bytes([i]) * (40 if i == 5 else 10), srv.getsockname())
        assert m.recv() == 4
        assert [m.data(i) for i in range(4)] == [bytes([i]) * 10 for i in range(4)]
        assert m.recv() == 2
        assert m.data(0) == bytes([4]) * 10 and not m.truncated(0)
        assert m.truncated(1) and m.length(1) == 16  # cut at the slot size, and flagged
        assert m.recv() == 0
    finally:
        _close(srv, clients)


def test_reply_larger_than_send_slot_is_refused():
    srv, clients = _pair(socket.AF_INET, "127.0.0.1", 1)
    try:
        m = mmsg.MMsgSocket(srv, batch=2, slot=64, send_slot=32)
        clients[0].sendto(b"q", srv.getsockname())
        assert m.recv() == 1
        assert not m.put(0, b"x" * 33)  # the caller sends it with sendto instead
        assert m.flush() == 0
    finally:
        _close(srv, clients)
