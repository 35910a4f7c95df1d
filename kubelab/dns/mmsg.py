"""Batched UDP I/O: Linux recvmmsg(2) / sendmmsg(2) through ctypes.

Python's socket module has no recvmmsg/sendmmsg, and on these machines a
system call is the expensive part of answering a DNS query (a ``recvfrom``
costs about 2 us of CPU and a ``sendto`` about 4.5 us, against well under
1 us of Python for a cached answer).  :class:`MMsgSocket` reads up to
``batch`` datagrams with one ``recvmmsg`` and sends the answers with one
``sendmmsg``.

Layout: every slot ``i`` has a fixed receive buffer, a fixed sender-address
buffer and a fixed send buffer inside three ``bytearray``s; the
``mmsghdr``/``iovec`` arrays point at them once, at construction.  Per
datagram Python then only touches memoryviews (read a length, copy bytes
in or out, write a length) -- no ctypes objects are made on the hot path.
The answer for slot ``i`` goes back to the address received in slot ``i``.

With ``echo=k`` an answer is sent as two pieces gathered by the kernel:
the first ``k`` bytes of the datagram received in the same slot (a DNS
answer starts with its query's ID), then the answer's remaining bytes --
either copied into the send slot (:meth:`MMsgSocket.put`) or read straight
from a ``bytes`` object the caller keeps alive until :meth:`flush`
(:meth:`MMsgSocket.refer`, no copy at all).

Nothing here is DNS-specific; the server (``kubelab.dns.server``) decides
what to answer.  Linux only: :func:`available` says whether it can be used.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
NAME_SIZE = 28  # sizeof(struct sockaddr_in6), which also holds a sockaddr_in


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc():
    try:
        # PyDLL keeps the GIL across the call: both calls are non-blocking
        # (MSG_DONTWAIT), so releasing and re-taking the GIL would only add
        # cost, and hand the interpreter to another thread mid-batch.
        libc = ctypes.PyDLL(None, use_errno=True)
        rf, sf = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    for f in (rf, sf):
        f.restype = ctypes.c_int
    rf.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    sf.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    return libc


def available() -> bool:
    """True on Linux with a libc that exports recvmmsg and sendmmsg."""
    return os.uname().sysname == "Linux" and _libc() is not None


def buffer_address(data: bytes) -> int:
    """Address of the bytes inside ``data`` (valid while ``data`` lives; CPython bytes never move)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _u32_view(arr) -> tuple[memoryview, int]:
    """A uint32 memoryview over a ctypes array of _MMsgHdr, and the stride in uint32s."""
    return memoryview(arr).cast("B").cast("I"), ctypes.sizeof(_MMsgHdr) // 4


class MMsgSocket:
    """recvmmsg/sendmmsg over one bound, non-blocking UDP socket, ``batch`` slots.

    ``recv()`` returns how many datagrams arrived (0 when none); datagram
    ``i`` is ``data(i)`` and came from ``name(i)`` (raw sockaddr bytes) /
    ``address(i)`` (Python-style tuple).  ``put(i, reply)`` stages the
    answer for slot ``i``; ``flush()`` sends what was staged, in runs of
    consecutive slots, and returns how many could not be sent.
    """

    def __init__(self, sock: socket.socket, batch: int = 64, slot: int = 4096, send_slot: int = 4096, echo: int = 0) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available")
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.batch = batch
        self.slot = slot
        self.send_slot = send_slot
        self.rbuf = bytearray(batch * slot)
        self.names = bytearray(batch * NAME_SIZE)
        self.sbuf = bytearray(batch * send_slot)
        self.rview = memoryview(self.rbuf)
        self.sview = memoryview(self.sbuf)
        self.nview = memoryview(self.names)
        rb = (ctypes.c_char * len(self.rbuf)).from_buffer(self.rbuf)
        nb = (ctypes.c_char * len(self.names)).from_buffer(self.names)
        sb = (ctypes.c_char * len(self.sbuf)).from_buffer(self.sbuf)
        self._keep = (rb, nb, sb)
        r_base, n_base, s_base = ctypes.addressof(rb), ctypes.addressof(nb), ctypes.addressof(sb)
        self.echo = echo
        per = 2 if echo else 1  # send iovecs per message: [echoed prefix,] answer
        self.riov = (_IOVec * batch)()
        self.siov = (_IOVec * (batch * per))()
        self.rmsgs = (_MMsgHdr * batch)()
        self.smsgs = (_MMsgHdr * batch)()
        for i in range(batch):
            self.riov[i].iov_base = r_base + i * slot
            self.riov[i].iov_len = slot
            if echo:
                self.siov[i * per].iov_base = r_base + i * slot
                self.siov[i * per].iov_len = echo
            self.siov[i * per + per - 1].iov_base = s_base + i * send_slot
            self.siov[i * per + per - 1].iov_len = 0
            for msgs, iov, k, cnt in ((self.rmsgs, self.riov, i, 1), (self.smsgs, self.siov, i * per, per)):
                h = msgs[i].msg_hdr
                h.msg_name = n_base + i * NAME_SIZE
                h.msg_namelen = NAME_SIZE
                h.msg_iov = ctypes.addressof(iov) + k * ctypes.sizeof(_IOVec)
                h.msg_iovlen = cnt
        self._s_base = s_base
        # The kernel overwrites msg_namelen and msg_flags on receive: restore them from this copy before each call.
        self._pristine = bytes(memoryview(self.rmsgs).cast("B"))
        self._rmsgs_addr = ctypes.addressof(self.rmsgs)
        self._smsgs_addr = ctypes.addressof(self.smsgs)
        self._hsize = ctypes.sizeof(_MMsgHdr)
        self._rhdr = memoryview(self.rmsgs).cast("B")
        self.rmeta, self.stride = _u32_view(self.rmsgs)
        self._len_at = _MMsgHdr.msg_len.offset // 4
        self._flags_at = (_MMsgHdr.msg_hdr.offset + _MsgHdr.msg_flags.offset) // 4
        # The send iovecs as size_t words: the answer iovec of slot i has its
        # base at word i * iov_stride + iov_at and its length in the next word.
        self.slen = memoryview(self.siov).cast("B").cast("Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I")
        words = ctypes.sizeof(_IOVec) // ctypes.sizeof(ctypes.c_size_t)
        self.iov_stride = per * words
        self.iov_at = (per - 1) * words + _IOVec.iov_base.offset // ctypes.sizeof(ctypes.c_size_t)
        self._slen_stride = self.iov_stride
        self._slen_at = (per - 1) * words + _IOVec.iov_len.offset // ctypes.sizeof(ctypes.c_size_t)
        self.staged = [False] * batch
        self._unstaged = [False] * batch
        # Per slot, the indexes a hot loop needs: (slot, msg_len word, receive offset, answer iovec word).
        self.slots = [(i, i * self.stride + self._len_at, i * slot, i * self.iov_stride + self.iov_at) for i in range(batch)]
        self.n = 0

    def recv(self) -> int:
        """Read up to ``batch`` datagrams without blocking; 0 when there are none."""
        self._rhdr[:] = self._pristine
        while True:
            n = self._recvmmsg(self.fd, self._rmsgs_addr, self.batch, MSG_DONTWAIT, None)
            if n >= 0:
                self.n = n
                return n
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            if e in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.n = 0
                return 0
            raise OSError(e, os.strerror(e))

    def length(self, i: int) -> int:
        return self.rmeta[i * self.stride + self._len_at]

    def truncated(self, i: int) -> bool:
        """The datagram in slot ``i`` was longer than the slot (and is cut)."""
        return bool(self.rmeta[i * self.stride + self._flags_at] & MSG_TRUNC)

    def data(self, i: int) -> bytes:
        o = i * self.slot
        return self.rview[o : o + self.rmeta[i * self.stride + self._len_at]].tobytes()

    def name(self, i: int) -> bytes:
        o = i * NAME_SIZE
        return self.names[o : o + NAME_SIZE]

    def address(self, i: int) -> tuple:
        """The sender of slot ``i`` as ``socket.recvfrom`` would report it."""
        o = i * NAME_SIZE
        raw = self.names
        port = (raw[o + 2] << 8) | raw[o + 3]
        if self.family == socket.AF_INET6 and int.from_bytes(raw[o : o + 2], "little") == socket.AF_INET6:
            ip = socket.inet_ntop(socket.AF_INET6, bytes(raw[o + 8 : o + 24]))
            if ip.startswith("::ffff:") and "." in ip:
                ip = ip[7:]
            return (ip, port, 0, int.from_bytes(raw[o + 24 : o + 28], "little"))
        return (socket.inet_ntop(socket.AF_INET, bytes(raw[o + 4 : o + 8])), port)

    def put(self, i: int, reply: bytes) -> bool:
        """Stage ``reply`` for slot ``i``; False when it does not fit the send slot (send it yourself).

        With ``echo=k`` the first ``k`` bytes of ``reply`` are not copied: the
        received datagram's first ``k`` bytes go out instead (they must be equal).
        """
        e = self.echo
        n = len(reply) - e
        if n > self.send_slot:
            return False
        o = i * self.send_slot
        self.sview[o : o + n] = reply[e:] if e else reply
        w = i * self.iov_stride + self.iov_at
        self.slen[w] = self._s_base + o
        self.slen[w + 1] = n
        self.staged[i] = True
        return True

    def refer(self, i: int, address: int, n: int) -> None:
        """Stage ``n`` bytes at ``address`` (see :func:`buffer_address`) as slot ``i``'s answer, after the echoed prefix.

        Nothing is copied: the memory must stay alive and unchanged until :meth:`flush`.
        """
        w = i * self.iov_stride + self.iov_at
        self.slen[w] = address
        self.slen[w + 1] = n
        self.staged[i] = True

    def flush(self) -> int:
        """Send every staged reply (runs of consecutive slots, one sendmmsg each); returns how many were dropped."""
        staged = self.staged
        n = self.n
        if staged.count(True) == n:  # the usual case: every datagram answered here, one run
            staged[:n] = self._unstaged[:n]
            return self._send_run(0, n) if n else 0
        dropped = 0
        i = 0
        while i < n:
            if not staged[i]:
                i += 1
                continue
            j = i
            while j < n and staged[j]:
                staged[j] = False
                j += 1
            dropped += self._send_run(i, j)
            i = j
        return dropped

    def _send_run(self, i: int, j: int) -> int:
        dropped = 0
        while i < j:
            sent = self._sendmmsg(self.fd, self._smsgs_addr + i * self._hsize, j - i, MSG_DONTWAIT)
            if sent > 0:
                i += sent
                continue
            if sent < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            # EAGAIN (send queue full) or an error for this one destination: drop it, go on with the rest.
            dropped += 1
            i += 1
        return dropped
