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


def test_echo_prefix_and_answers_read_in_place():
    """echo=2: each answer is the query's first two bytes (a DNS ID) then a tail, copied (put) or read in place (refer)."""
    srv, clients = _pair(socket.AF_INET, "127.0.0.1", 3)
    try:
        m = mmsg.MMsgSocket(srv, batch=4, slot=64, send_slot=8, echo=2)
        for i, c in enumerate(clients):
            c.sendto(bytes([0xA0 + i, 0xB0 + i]) + b"query", srv.getsockname())
        assert m.recv() == 3
        tails = {}
        for i in range(3):
            who = m.address(i)[:2]
            data = m.data(i)
            if i == 1:
                assert m.put(i, b"??" + b"copied")  # the first two bytes are replaced by the query's own
                tails[who] = data[:2] + b"copied"
            else:
                tail = b"in place, longer than the send slot %d" % i
                tails[who] = data[:2] + tail
                m.refer(i, mmsg.buffer_address(tail), len(tail))
                tails[who, "keep"] = tail  # alive until flush
        assert not m.put(0, b"xx" + b"y" * 9)  # 9 bytes after the echoed prefix do not fit 8
        assert m.flush() == 0
        for c in clients:
            assert c.recv(200) == tails[c.getsockname()[:2]]
    finally:
        _close(srv, clients)


def test_reuseport_group_spreads_one_client_over_every_socket():
    """kubelab dns --workers: datagrams of one client port are dealt at random, not hashed to one socket."""
    from kubelab.dns.server import spread_reuseport, udp_socket

    first = udp_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    spread_reuseport(first, 2)
    second = udp_socket("127.0.0.1", port, reuse_port=True)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind(("127.0.0.1", 0))  # one source port: the kernel's hash alone would pick one socket
        for _ in range(400):
            client.sendto(b"q", ("127.0.0.1", port))
        counts = []
        for s in (first, second):
            s.settimeout(0.5)
            n = 0
            try:
                while True:
                    s.recv(16)
                    n += 1
                    s.settimeout(0.05)
            except TimeoutError:
                pass
            counts.append(n)
        assert sum(counts) == 400 and min(counts) > 100, counts
    finally:
        for s in (first, second, client):
            s.close()
