"""Running kernel tools: one small seam every mode shares.

A :class:`Runner` runs an argv list and returns ``(returncode, stdout,
stderr)`` -- the shape of ``ModeDeps.run`` -- optionally inside a network
namespace (``ip netns exec NAME``), which is how the kernel tests drive a
proxier against a throwaway namespace instead of the host's tables.  Tests
that need no kernel pass a fake with the same call signature.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
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


@dataclass(frozen=True)
class Runner:
    """Runs commands on the host, or in network namespace ``netns`` when set."""

    netns: str = ""
    timeout: float = 120.0
    # Extra environment for every command (e.g. XTABLES_LOCKFILE, so a test can hold
    # a lock of its own instead of the host's /run/xtables.lock).
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, argv: Sequence[str]) -> list[str]:
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *argv]
        return list(argv)

    def __call__(self, argv: Sequence[str], input: str | None = None, timeout: float | None = None) -> tuple[int, str, str]:
        try:
            p = subprocess.run(
                self.argv(argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                env={**os.environ, **self.env} if self.env else None,
            )
        except FileNotFoundError as e:
            return 127, "", f"{argv[0]}: not found ({e}); install it (see scripts/apt-packages.txt)"
        except subprocess.TimeoutExpired:
            return 124, "", f"{argv[0]}: timed out after {timeout or self.timeout:.0f}s"
        return p.returncode, p.stdout, p.stderr

    def check(self, argv: Sequence[str], input: str | None = None) -> str:
        """Run and return stdout; raise :class:`CommandError` on failure."""
        rc, out, err = self(argv, input=input)
        if rc != 0:
            raise CommandError(argv, rc, out, err)
        return out
