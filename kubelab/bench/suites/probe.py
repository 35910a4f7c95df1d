"""The in-pod measuring client of ``kubelab bench``: a small standalone script.

It runs inside a lab pod's network namespace (``lab.exec(pod, [python,
probe.py, ...])``, also inside a UML kernel), imports nothing from kubelab
(so it starts fast), and prints one JSON document on stdout.  Subcommands:

``rtt HOST PORT COUNT``
    COUNT sequential short TCP connections, each: connect, send one HTTP/1.0
    request, read the whole answer, close.  Prints every connection's time
    (connect + first answer, microseconds) measured client side -- the
    connection setup latency a client sees through the proxy.
``syn HOST PORT COUNT``
    COUNT sequential connect() calls only (SYN out, SYN-ACK back), each
    closed with a reset so no TIME_WAIT piles up.  Every connect is a new
    conntrack entry, so its SYN walks the NAT rules once: the first-packet
    latency that grows with the number of Services in iptables mode.
``udp HOST PORT COUNT``
    COUNT sequential UDP round trips (a DNS query for ``bench.test`` A),
    microseconds each; a lost datagram is retried and counted.
``until HOST PORT POD TIMEOUT READYFILE``
    Programming-latency watcher: touches READYFILE, then opens a short TCP
    connection every ~2 ms to HOST:PORT (a lab echo server answering
    ``pod=NAME ...``) until the answer names POD; prints the wall-clock time
    (``time.time()``) of that first answer and how many connections it took.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


def rtt(host: str, port: int, count: int) -> dict:
    out = []
    errors = 0
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(REQUEST)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
        except OSError:
            errors += 1
            if errors >= 5 and not out:
                break  # nothing answers: say so now, not after COUNT timeouts
            continue
        if not got.startswith(b"HTTP/1."):
            errors += 1
            continue
        out.append((time.perf_counter() - t0) * 1e6)
    return {"us": out, "errors": errors}


def syn(host: str, port: int, count: int) -> dict:
    out = []
    errors = 0
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.settimeout(2)
        t0 = time.perf_counter()
        try:
            s.connect((host, port))
            out.append((time.perf_counter() - t0) * 1e6)
        except OSError:
            errors += 1
            if errors >= 5 and not out:
                break  # nothing answers: say so now, not after COUNT timeouts
        finally:
            s.close()
    return {"us": out, "errors": errors}


def _dns_query(qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p for p in (b"bench", b"test")) + b"\0"
    return header + qname + struct.pack("!HH", 1, 1)


def udp(host: str, port: int, count: int) -> dict:
    out = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(1.0)
        for i in range(count):
            q = _dns_query(i & 0xFFFF)
            for _attempt in range(3):
                t0 = time.perf_counter()
                s.send(q)
                try:
                    while True:
                        r = s.recv(4096)
                        if r[:2] == q[:2]:
                            break
                except OSError:
                    lost += 1
                    continue
                out.append((time.perf_counter() - t0) * 1e6)
                break
    return {"us": out, "errors": lost}


def until(host: str, port: int, pod: str, timeout: float, ready_file: str) -> dict:
    want = f"pod={pod} ".encode()
    with open(ready_file, "w") as f:
        f.write(str(time.time()))
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.sendall(b"x\n")
                line = s.recv(256)
            if line.startswith(want):
                return {"seen": time.time(), "tries": tries}
        except OSError:
            pass
        time.sleep(0.002)
    return {"seen": None, "tries": tries}


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, host, port = argv[0], argv[1], int(argv[2])
    if cmd == "until":
        result = until(host, port, argv[3], float(argv[4]), argv[5])
    else:
        fn = {"rtt": rtt, "syn": syn, "udp": udp}.get(cmd)
        if fn is None:
            print(f"probe: unknown subcommand {cmd!r} (rtt, syn, udp, until)", file=sys.stderr)
            return 2
        result = fn(host, port, int(argv[3]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
