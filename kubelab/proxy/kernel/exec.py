"""Running kernel tools: one small seam every mode shares.

A :class:`Runner` runs an argv list and returns ``(returncode, stdout,
stderr)`` -- the shape of ``ModeDeps.run`` -- optionally inside a network
namespace, which is how the kernel tests and benchmarks drive a proxier
against a throwaway namespace instead of the host's tables.  Tests that need
no kernel pass a fake with the same call signature.

The namespace is entered by the spawning thread itself (``setns(2)`` on
``/run/netns/NAME``, then back), so the child starts in it: one exec
instead of two (``ip netns exec`` costs ~10-20 ms a call, as much as a small
``iptables-restore``).  Only the network namespace changes -- no
``/etc/netns`` bind mounts or ``/sys`` remount as ``ip netns exec`` does;
``netns_exec=True`` gives those back for tools that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


class CommandError(RuntimeError):
    """A tool exited non-zero; carries what it said."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        msg = (stderr or stdout).strip() or f"exit status {returncode}"
        super().__init__(f"{' '.join(self.argv[:3])}{' ...' if len(self.argv) > 3 else ''}: {msg}")


CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None
_libc_lock = threading.Lock()


def _setns(fd: int) -> None:
    global _libc  # noqa: PLW0603 - a loaded library handle, not state
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class _InNetns:
    """Context manager: this thread is in network namespace ``name`` inside the block."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._home)
            raise
        try:
            _setns(target)
        except OSError:
            os.close(self._home)
            raise
        finally:
            os.close(target)

    def __exit__(self, *exc) -> None:
        try:
            _setns(self._home)
        finally:
            os.close(self._home)


@dataclass(frozen=True)
class Runner:
    """Runs commands on the host, or in network namespace ``netns`` when set."""

    netns: str = ""
    timeout: float = 120.0
    # Extra environment for every command (e.g. XTABLES_LOCKFILE, so a test can hold
    # a lock of its own instead of the host's /run/xtables.lock).
    env: Mapping[str, str] = field(default_factory=dict)
    netns_exec: bool = False  # enter the namespace with `ip netns exec` (mounts included) instead of setns

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command as run (with ``ip netns exec`` when that is how the namespace is entered)."""
        if self.netns and self.netns_exec:
            return ["ip", "netns", "exec", self.netns, *argv]
        return list(argv)

    def __call__(self, argv: Sequence[str], input: str | None = None, timeout: float | None = None) -> tuple[int, str, str]:
        try:
            if self.netns and not self.netns_exec:
                with _InNetns(self.netns):
                    p = self._run(argv, input, timeout)
            else:
                p = self._run(argv, input, timeout)
        except FileNotFoundError as e:
            if self.netns and not os.path.exists(f"/run/netns/{self.netns}"):
                return 1, "", f"network namespace {self.netns!r} does not exist (ip netns add {self.netns})"
            return 127, "", f"{argv[0]}: not found ({e}); install it (see scripts/apt-packages.txt)"
        except subprocess.TimeoutExpired:
            return 124, "", f"{argv[0]}: timed out after {timeout or self.timeout:.0f}s"
        return p.returncode, p.stdout, p.stderr

    def _run(self, argv: Sequence[str], input: str | None, timeout: float | None) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            env={**os.environ, **self.env} if self.env else None,
        )

    def stream(self, argv: Sequence[str], chunks: Iterable[str], timeout: float | None = None,
               discard_stdout: bool = False) -> tuple[int, str, str]:
        """Run ``argv`` feeding it ``chunks`` as they are produced (the producer runs while the tool reads).

        For big inputs that are generated: the tool parses chunk k while
        Python renders chunk k+1.  If the tool exits early (an error), the
        rest of the input is dropped and its exit status and output returned.
        ``discard_stdout`` sends the tool's standard output to /dev/null (then
        returned as ""): for output nobody reads that could be megabytes.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        env = {**os.environ, **self.env} if self.env else None
        out_to = subprocess.DEVNULL if discard_stdout else subprocess.PIPE
        try:
            if self.netns and not self.netns_exec:
                with _InNetns(self.netns):
                    proc = subprocess.Popen(self.argv(argv), stdin=subprocess.PIPE, stdout=out_to,
                                            stderr=subprocess.PIPE, env=env)
            else:
                proc = subprocess.Popen(self.argv(argv), stdin=subprocess.PIPE, stdout=out_to,
                                        stderr=subprocess.PIPE, env=env)
        except FileNotFoundError as e:
            return 127, "", f"{argv[0]}: not found ({e}); install it (see scripts/apt-packages.txt)"
        # Drain the tool's output meanwhile, so it can never block us by filling a pipe.
        outs: dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda k=k, f=f: outs.__setitem__(k, f.read()), daemon=True)
                   for k, f in (("out", proc.stdout), ("err", proc.stderr)) if f is not None]
        for t in readers:
            t.start()
        try:
            try:
                for chunk in chunks:
                    proc.stdin.write(chunk.encode())
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(argv, timeout or self.timeout)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the tool gave up early; its status says why
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124, "", f"{argv[0]}: timed out after {timeout or self.timeout:.0f}s"
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            for t in readers:
                t.join(5)
        return proc.returncode, outs.get("out", b"").decode(errors="replace"), outs.get("err", b"").decode(errors="replace")

    def check(self, argv: Sequence[str], input: str | None = None) -> str:
        """Run and return stdout; raise :class:`CommandError` on failure."""
        rc, out, err = self(argv, input=input)
        if rc != 0:
            raise CommandError(argv, rc, out, err)
        return out
