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


# iptables-nft (1.8.x) keeps the chain names a restore mentions in a sorted linked
# list (nft-cache.c, cache_chain_list_insert), walked once per line: a full sync
# naming 60k chains spends O(chains^2) there -- over half an hour for 10,000
# services x 5 endpoints, most of a restore's time from ~2,000 chains on.  One
# command naming no chain makes it cache the whole table with one dump and skip
# the list.  "-S" (list rules) is that command without side effects ("-Z" would
# zero other programs' counters; "-F" and "-X" would delete their rules); it
# prints the table as it was before this restore, to /dev/null.  In such a
# batch iptables-nft takes built-in chains missing from the kernel as present
# (listings show them), so rules for them fail with ENOENT: those few lines
# (the jumps into KUBE-SERVICES etc.) go in a second nat batch of the same
# restore, committed right after the first.
WHOLE_TABLE_CACHE = "-S"
_BUILTIN_RULE = re.compile(r"^-[AIDR] (?:PREROUTING|INPUT|OUTPUT|POSTROUTING) .*\n", re.M)


class WholeTableCache:
    """Restore text ``chunks`` with :data:`WHOLE_TABLE_CACHE` in the nat table and its built-in-chain
    rules moved to a second nat batch right after it (see above); other tables pass unchanged.

    After iteration, :meth:`input_line` maps a line number of the produced text
    back to the given text's (None for the lines added here).
    """

    def __init__(self, chunks: Iterable[str]) -> None:
        self._chunks = chunks
        self.at: int | None = None  # the -S line, in the produced text
        self._moved: list[int] = []  # input line numbers of the moved rules
        self._second: int | None = None  # the second batch's "*nat" line, in the produced text

    def __iter__(self):
        lines_in = 0  # complete input lines before the current chunk
        lines_out = 0
        state = "before"  # before the nat table, in it, after it
        held: list[str] = []
        for chunk in self._chunks:
            out = chunk
            if state == "before":
                i = 0 if chunk.startswith("*nat\n") else chunk.find("\n*nat\n") + 1
                if chunk.startswith("*nat\n") or i > 0:
                    head = i + len("*nat\n")
                    self.at = lines_out + chunk.count("\n", 0, head) + 1
                    out = chunk = f"{chunk[:head]}{WHOLE_TABLE_CACHE}\n{chunk[head:]}"
                    lines_in -= 1  # the added line is no input line
                    state = "nat"
            if state == "nat":
                start = chunk.find("*nat\n") + 1 if self.at is not None and "*nat\n" in chunk else 0
                if start == 0 and chunk.startswith("COMMIT\n"):
                    commit = 0
                else:
                    end = chunk.find("\nCOMMIT\n", start)
                    commit = end + 1 if end >= 0 else -1
                body, tail = (chunk, "") if commit < 0 else (chunk[:commit], chunk[commit:])
                kept, pos = [], 0
                for m in _BUILTIN_RULE.finditer(body):
                    self._moved.append(lines_in + body.count("\n", 0, m.start()) + 1)
                    held.append(m.group())
                    kept.append(body[pos:m.start()])
                    pos = m.end()
                if pos:
                    kept.append(body[pos:])
                    body = "".join(kept)
                if commit >= 0:
                    # tail starts with the nat table's COMMIT line.
                    second = f"*nat\n{''.join(held)}COMMIT\n" if held else ""
                    if second:
                        self._second = lines_out + body.count("\n") + 2
                    tail = tail[:len("COMMIT\n")] + second + tail[len("COMMIT\n"):]
                    state = "after"
                out = body + tail
            lines_in += chunk.count("\n")
            lines_out += out.count("\n")
            yield out

    def input_line(self, line: int) -> int | None:
        """The given text's line number for ``line`` of the produced text (None: a line added here)."""
        if self.at is None or line < self.at:
            return line
        if line == self.at:
            return None
        if self._second is not None and line >= self._second:
            k = line - self._second - 1
            if 0 <= k < len(self._moved):
                return self._moved[k]
            if line <= self._second + len(self._moved) + 1:
                return None  # the second batch's *nat / COMMIT
            return line - 3  # after the second batch: -S, *nat and COMMIT were added
        n = line - 1
        moved = sorted(self._moved)
        shift = 0
        while shift < len(moved) and moved[shift] <= n + shift:
            shift += 1
        return n + shift


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
        # No short timeout: a first sync of ~60k chains takes tens of seconds on a loaded box.
        rc, out, err = self.run(argv, input=text, timeout=RESTORE_TIMEOUT)
        if rc != 0:
            msg = (err or out).strip() or f"exit status {rc}"
            m = _LINE.search(msg)
            raise RestoreError(f"{argv[0]} failed: {msg}", int(m.group(1)) if m else None)

    def restore_stream(self, chunks: Iterable[str]) -> None:
        """Like :meth:`restore_all`, piping ``chunks`` to the restore as they come (runner with ``stream``).

        For full syncs.  With a runner that cannot stream (test fakes) the
        chunks are joined and handed over as one text.  On the nft backend the
        nat table gets :data:`WHOLE_TABLE_CACHE` (see :class:`WholeTableCache`).
        The failing line number, when there is one, counts lines of the
        concatenated chunks as given (the added line is not counted).
        """
        stream = getattr(self.run, "stream", None)
        if stream is None:
            self.restore_all("".join(chunks))
            return
        argv = [self._tool("-restore"), "-w", WAIT_SECONDS, "-W", WAIT_INTERVAL_US, "--noflush", "--counters"]
        hint = WholeTableCache(chunks) if self.backend == "nft" else None
        rc, out, err = stream(argv, hint if hint is not None else chunks, timeout=RESTORE_TIMEOUT,
                              discard_stdout=hint is not None)
        if rc != 0:
            msg = (err or out).strip() or f"exit status {rc}"
            m = _LINE.search(msg)
            line = int(m.group(1)) if m else None
            if line is not None and hint is not None:
                line = hint.input_line(line)
                if line is None:
                    msg += " (at a line kubelab adds on the nft backend: see WholeTableCache)"
            raise RestoreError(f"{argv[0]} failed: {msg}", line)

    def save(self, table: str) -> str:
        rc, out, err = self.run([self._tool("-save"), "-t", table])
        if rc != 0:
            raise IPTablesError(f"{self._tool('-save')} -t {table} failed: {(err or out).strip()}")
        return out

    def chains(self, table: str) -> set[str]:
        """Names of every chain in ``table`` (upstream's GetChainsFromTable over iptables-save)."""
        return {line[1:].split(" ", 1)[0] for line in self.save(table).splitlines() if line.startswith(":")}

    def unavailable(self) -> str | None:
        """Why this backend cannot be used in this kernel (None when it can).

        A kernel without nf_tables (UML's module set, for one) answers every
        iptables-nft command with "Could not fetch rule set generation id"; a
        missing binary is as final.  Nothing of ours can be programmed there.
        """
        try:
            rc, out, err = self._iptables("filter", "-S", "INPUT", "1")
        except OSError as e:
            return f"{self._tool()}: {e}"
        msg = (err or out).strip()
        if rc != 0 and ("generation id" in msg or "not found" in msg or rc == 127):
            return msg or f"{self._tool()} exited {rc}"
        return None

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
