"""The iptables adapter: the only code that knows iptables' command lines.

kube-proxy's ``pkg/util/iptables`` reduced to what the iptables mode uses:

* :meth:`IPTables.restore_all` -- one ``iptables-restore --noflush --counters
  -w 5 -W 100000`` for all tables of a sync.  Atomic per table: on failure
  the kernel keeps the previous rules; the error names the failing line.
  :meth:`IPTables.restore_stream` pipes generated chunks instead of a text.
* :meth:`IPTables.save` / :meth:`IPTables.chains` -- ``iptables-save -t T``.
* ``ensure_chain`` / ``ensure_rule`` / ``delete_rule`` / ``chain_exists`` --
  single ``iptables`` calls for the jump rules from built-in chains, which
  restore cannot own without flushing foreign rules (hence "--noflush").

:func:`detect_backend` picks ``nft`` or ``legacy`` the way kube-proxy's image
does (the iptables-wrapper script): follow the backend kubelet's hint chains
are in, else the one holding more rules, preferring nft.

python-iptables (libiptc) is not used: it only drives the legacy backend and
was 10x+ slower on rulesets this size (see DESIGN.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

RunFn = Callable[..., tuple[int, str, str]]

WAIT_SECONDS = "5"  # -w: how long to wait for the xtables lock
WAIT_INTERVAL_US = "100000"  # -W: how often to retry it
RESTORE_TIMEOUT = 1800.0  # seconds


class IPTablesError(RuntimeError):
    """An iptables command failed."""


class RestoreError(IPTablesError):
    """iptables-restore refused its input; ``line`` is the 1-based failing line when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


_LINE = re.compile(r"line:? (\d+)")


def extract_lines(text: str, line: int, context: int = 3) -> str:
    """The failing line of restore input with ``context`` lines around it, numbered (upstream's ExtractLines)."""
    lines = text.splitlines()
    lo, hi = max(1, line - context), min(len(lines), line + context)
    return "\n".join(f"{'>' if n == line else ' '}{n:6d}: {lines[n - 1]}" for n in range(lo, hi + 1))


@dataclass
class IPTables:
    """One backend ("nft" or "legacy") and family (4 or 6) of iptables, driven through ``run``."""

    run: RunFn
    backend: str = "nft"
    ip_family: int = 4

    def _tool(self, suffix: str = "") -> str:
        base = "ip6tables" if self.ip_family == 6 else "iptables"
        return f"{base}-{self.backend}{suffix}"

    @property
    def protocol(self) -> str:
        return "IPv6" if self.ip_family == 6 else "IPv4"

    def _iptables(self, table: str, *args: str) -> tuple[int, str, str]:
        return self.run([self._tool(), "-w", WAIT_SECONDS, "-W", WAIT_INTERVAL_US, "-t", table, *args])

    # -- restore / save -------------------------------------------------------

    def restore_all(self, text: str) -> None:
        """Apply ``text`` with ``--noflush --counters``; raise :class:`RestoreError` naming the failing line."""
        argv = [self._tool("-restore"), "-w", WAIT_SECONDS, "-W", WAIT_INTERVAL_US, "--noflush", "--counters"]
        # No short timeout: a first sync of ~60k chains takes minutes on the nft backend.
        rc, out, err = self.run(argv, input=text, timeout=RESTORE_TIMEOUT)
        if rc != 0:
            msg = (err or out).strip() or f"exit status {rc}"
            m = _LINE.search(msg)
            raise RestoreError(f"{argv[0]} failed: {msg}", int(m.group(1)) if m else None)

    def restore_stream(self, chunks: Iterable[str]) -> None:
        """Like :meth:`restore_all`, piping ``chunks`` to the restore as they come (runner with ``stream``).

        With a runner that cannot stream (test fakes) the chunks are joined and
        handed over as one text.  The failing line number, when there is one,
        counts lines of the concatenated chunks.
        """
        stream = getattr(self.run, "stream", None)
        if stream is None:
            self.restore_all("".join(chunks))
            return
        argv = [self._tool("-restore"), "-w", WAIT_SECONDS, "-W", WAIT_INTERVAL_US, "--noflush", "--counters"]
        rc, out, err = stream(argv, chunks, timeout=RESTORE_TIMEOUT)
        if rc != 0:
            msg = (err or out).strip() or f"exit status {rc}"
            m = _LINE.search(msg)
            raise RestoreError(f"{argv[0]} failed: {msg}", int(m.group(1)) if m else None)

    def save(self, table: str) -> str:
        rc, out, err = self.run([self._tool("-save"), "-t", table])
        if rc != 0:
            raise IPTablesError(f"{self._tool('-save')} -t {table} failed: {(err or out).strip()}")
        return out

    def chains(self, table: str) -> set[str]:
        """Names of every chain in ``table`` (upstream's GetChainsFromTable over iptables-save)."""
        return {line[1:].split(" ", 1)[0] for line in self.save(table).splitlines() if line.startswith(":")}

    # -- single commands ------------------------------------------------------

    def chain_exists(self, table: str, chain: str) -> bool:
        rc, _, _ = self._iptables(table, "-S", chain, "1")
        return rc == 0

    def ensure_chain(self, table: str, chain: str) -> bool:
        """Create ``chain`` unless it exists; True if created."""
        rc, out, err = self._iptables(table, "-N", chain)
        if rc == 0:
            return True
        if "exists" in (err + out):
            return False
        raise IPTablesError(f"cannot create chain {chain} in {table}: {(err or out).strip()}")

    def ensure_rule(self, prepend: bool, table: str, chain: str, args: Sequence[str]) -> bool:
        """Insert (``prepend``) or append the rule unless ``-C`` finds it; True if added."""
        rc, _, _ = self._iptables(table, "-C", chain, *args)
        if rc == 0:
            return False
        rc, out, err = self._iptables(table, "-I" if prepend else "-A", chain, *args)
        if rc != 0:
            raise IPTablesError(f"cannot add rule to {table}/{chain} ({' '.join(args)}): {(err or out).strip()}")
        return True

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """Delete the rule if present; True if something was deleted."""
        if self._iptables(table, "-C", chain, *args)[0] != 0:
            return False
        rc, out, err = self._iptables(table, "-D", chain, *args)
        if rc != 0:
            raise IPTablesError(f"cannot delete rule from {table}/{chain}: {(err or out).strip()}")
        return True

    def delete_chain(self, table: str, chain: str) -> bool:
        """Flush and delete ``chain`` if present; True if deleted."""
        if not self.chain_exists(table, chain):
            return False
        self._iptables(table, "-F", chain)
        rc, out, err = self._iptables(table, "-X", chain)
        if rc != 0:
            raise IPTablesError(f"cannot delete chain {table}/{chain}: {(err or out).strip()}")
        return True

    def version(self) -> tuple[int, ...]:
        rc, out, err = self.run([self._tool(), "--version"])
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out + err)
        return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)

    def has_random_fully(self) -> bool:
        """MASQUERADE --random-fully exists from iptables 1.6.2 (kube-proxy's check)."""
        return self.version() >= (1, 6, 2)


_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) ", re.M)


def _saves(run: RunFn, tools: Sequence[str], *args: str) -> str:
    """The output of each ``tool *args`` that ran, concatenated (a missing backend adds nothing)."""
    out = []
    for tool in tools:
        rc, text, _ = run([tool, *args], timeout=30)
        if rc == 0:
            out.append(text)
    return "\n".join(out)


def detect_backend(run: RunFn) -> str:
    """"nft" or "legacy", decided as kube-proxy's image decides (the iptables-wrapper script).

    1. kubelet (1.17+) declares KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY in
       mangle of the backend it uses: look in nft's mangle first (IPv4 and IPv6),
       then in all of legacy's tables -- never ``iptables-legacy-save -t mangle``,
       which would make the kernel create a legacy mangle table.
    2. Otherwise the backend holding more rules; nft unless legacy has strictly more.
    """
    if _HINT.search(_saves(run, ["iptables-nft-save", "ip6tables-nft-save"], "-t", "mangle")):
        return "nft"
    legacy = _saves(run, ["iptables-legacy-save", "ip6tables-legacy-save"])
    if _HINT.search(legacy):
        return "legacy"
    nft = _saves(run, ["iptables-nft-save", "ip6tables-nft-save"])

    def count(text: str) -> int:
        return sum(1 for line in text.splitlines() if line.startswith("-"))

    return "legacy" if count(legacy) > count(nft) else "nft"
