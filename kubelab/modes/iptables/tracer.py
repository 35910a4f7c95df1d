"""Parse iptables-restore text, model what it does to a table, and trace packets through it.

The idea is kube-proxy's (``pkg/util/iptables/testing/parse.go`` and the
``iptablesTracer`` of ``pkg/proxy/iptables/proxier_test.go``): rather than
comparing rule text alone, walk a packet (source, protocol, destination,
port) through the rendered nat and filter rules and report where it lands --
which endpoints it may be DNATed to, or ACCEPT/DROP/REJECT -- and whether it
was marked for masquerade.  Rules that depend on history (``--rcheck``,
``--mark``, ``--ctstate``) never match, as upstream.

:class:`FakeTables` applies restore input the way ``iptables-restore
--noflush`` does (a ``:CHAIN`` line creates or flushes, ``-X`` deletes and
fails while the chain is referenced, the whole input is atomic), so unit
tests of the proxier see the state a sequence of full and partial syncs
leaves behind, including the failures real restore would report.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field

_VALUE_PARAMS = {
    "-p": "protocol",
    "-s": "source",
    "--src-type": "src_type",
    "--sport": "sport",
    "-d": "destination",
    "--dst-type": "dst_type",
    "--dport": "dport",
    "--match-set": "match_set",
    "-j": "jump",
    "--probability": "probability",
    "--to-destination": "dnat_destination",
    "--mark": "mark",
    "--ctstate": "ctstate",
    "--comment": "comment",
    "--name": "affinity_name",
    "--seconds": "affinity_seconds",
    "--mode": "statistic_mode",
    "-i": "in_interface",
}
_FLAG_PARAMS = {"--rcheck": "rcheck", "--set": "affinity_set", "--reap": "reap", "--random-fully": "random_fully"}


@dataclass(frozen=True)
class Value:
    """A rule parameter's value and whether it was negated with ``!``."""

    value: str
    negated: bool = False

    def matches(self, other: str) -> bool:
        return (self.value == other) != self.negated


@dataclass
class Rule:
    """One ``-A CHAIN ...`` line, with the parameters kube-proxy's rules use."""

    raw: str
    chain: str
    params: dict[str, Value] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)

    def get(self, name: str) -> Value | None:
        return self.params.get(name)

    @property
    def jump(self) -> str | None:
        v = self.params.get("jump")
        return v.value if v else None

    @property
    def comment(self) -> str | None:
        v = self.params.get("comment")
        return v.value if v else None


class ParseError(ValueError):
    """Bad restore input; ``line`` is 1-based."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


def parse_rule(line: str) -> Rule:
    """Parse ``-A CHAIN args...``; unknown parameters are skipped, as upstream's non-strict parser."""
    words = shlex.split(line)
    if len(words) < 3 or words[0] != "-A":
        raise ParseError(f"bad rule {line!r} (expected -A CHAIN and at least one match)")
    rule = Rule(raw=line, chain=words[1])
    negated = False
    i = 2
    while i < len(words):
        w = words[i]
        if w == "-m" and i + 1 < len(words):
            i += 2
            continue
        if w == "!":
            negated = True
            i += 1
            continue
        if w in _VALUE_PARAMS:
            if i + 1 >= len(words):
                raise ParseError(f"parameter {w!r} of {line!r} needs a value")
            rule.params[_VALUE_PARAMS[w]] = Value(words[i + 1], negated)
            i += 2
        elif w in _FLAG_PARAMS:
            rule.flags[_FLAG_PARAMS[w]] = not negated
            i += 1
        else:
            i += 1
        negated = False
    return rule


@dataclass
class Chain:
    name: str
    rules: list[Rule] = field(default_factory=list)
    deleted: bool = False


@dataclass
class Table:
    name: str
    chains: list[Chain] = field(default_factory=list)

    def get(self, name: str) -> Chain | None:
        for c in self.chains:
            if c.name == name:
                return c
        return None


@dataclass
class Dump:
    """A parsed iptables-save / iptables-restore text (upstream's IPTablesDump)."""

    tables: list[Table] = field(default_factory=list)

    def table(self, name: str) -> Table | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    def chain(self, table: str, chain: str) -> Chain | None:
        t = self.table(table)
        return t.get(chain) if t else None

    def __str__(self) -> str:
        out: list[str] = []
        for t in self.tables:
            out.append(f"*{t.name}")
            out.extend(f":{c.name} - [0:0]" for c in t.chains)
            for c in t.chains:
                out.extend(r.raw for r in c.rules)
            out.extend(f"-X {c.name}" for c in t.chains if c.deleted)
            out.append("COMMIT")
        return "\n".join(out) + "\n"


_CHAIN_LINE = re.compile(r"^:(\S+) (\S+) \[(\d+):(\d+)\]$")


def parse_dump(text: str) -> Dump:
    """Parse restore input (or save output) into tables, chains and rules."""
    dump = Dump()
    table: Table | None = None
    declaring = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if table is None:
            if not line.startswith("*"):
                raise ParseError(f"expected a table (*name), got {line!r}", n)
            table = Table(line[1:])
            dump.tables.append(table)
            declaring = True
            continue
        m = _CHAIN_LINE.match(line)
        if declaring and m:
            table.chains.append(Chain(m.group(1)))
            continue
        declaring = False
        if line == "COMMIT":
            table = None
        elif line.startswith("-A "):
            rule = parse_rule(line)
            chain = table.get(rule.chain)
            if chain is None:
                raise ParseError(f"rule for undeclared chain {rule.chain!r}", n)
            if chain.deleted:
                raise ParseError(f"rule for deleted chain {rule.chain!r}", n)
            chain.rules.append(rule)
        elif line.startswith("-X "):
            name = line[3:].strip()
            chain = table.get(name)
            if chain is None:
                raise ParseError(f"-X of undeclared chain {name!r}", n)
            if chain.rules:
                raise ParseError(f"-X of chain {name!r} after adding rules to it", n)
            chain.deleted = True
        elif m:
            raise ParseError(f"chain declaration {line!r} after rules", n)
        else:
            raise ParseError(f"cannot parse {line!r}", n)
    if table is not None:
        raise ParseError("no COMMIT at the end of the last table")
    return dump


# --------------------------------------------------------------------------
# kube-proxy's golden-test normalisation (sortIPTablesRules)
# --------------------------------------------------------------------------


def _comment_service(rule: Rule) -> str | None:
    c = rule.comment
    if c is None:
        return None
    m = re.search(r"[ :]", c)
    return c[: m.start()] if m else c


def _stable_sort_by_service(rules: list[Rule], keep_last: str | None = None) -> list[Rule]:
    # Upstream sorts with a comparator that is not a total order when comments
    # are missing; a stable merge of "comparable" runs gives the same result on
    # kube-proxy's own output (every rule in these chains has a comment).
    import functools

    def cmp(a: Rule, b: Rule) -> int:
        if keep_last is not None:
            a_last = a.comment is not None and keep_last in a.comment
            b_last = b.comment is not None and keep_last in b.comment
            if a_last != b_last:
                return 1 if a_last else -1
        na, nb = _comment_service(a), _comment_service(b)
        if na is None or nb is None:
            return 0
        return -1 if na < nb else (1 if na > nb else 0)

    return sorted(rules, key=functools.cmp_to_key(cmp))


def sort_rules(text: str) -> str:
    """Normalise restore text exactly as kube-proxy's tests do before comparing (sortIPTablesRules).

    Tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-*
    alphabetically, then the rest; rules of KUBE-NODEPORTS and KUBE-SERVICES
    stably by the service named in their comment (keeping the nodeports
    tail rule last); every other chain keeps its order.
    """
    dump = parse_dump(text)
    dump.tables.sort(key=lambda t: t.name)

    def chain_key(c: Chain) -> tuple[int, str]:
        if c.name == "KUBE-NODEPORTS":
            return (0, "")
        if c.name == "KUBE-SERVICES":
            return (1, "")
        if c.name.startswith("KUBE-"):
            return (2, c.name)
        return (3, c.name)

    for t in dump.tables:
        t.chains.sort(key=chain_key)
        for name in ("KUBE-NODEPORTS", "KUBE-SERVICES"):
            c = t.get(name)
            if c is not None:
                keep_last = "must be the last rule" if (t.name == "nat" and name == "KUBE-SERVICES") else None
                c.rules = _stable_sort_by_service(c.rules, keep_last)
    return str(dump)


def check_rule_jumps(text: str) -> list[str]:
    """kube-proxy's checkIPTablesRuleJumps: every jump targets a created, filled chain; no unused chains."""
    problems = []
    builtin = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
    exempt = {
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-FORWARD",
        "KUBE-MARK-MASQ",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    }
    for t in parse_dump(text).tables:
        created = {c.name for c in t.chains if not c.deleted}
        filled = {c.name for c in t.chains if c.rules}
        jumped = {r.jump for c in t.chains for r in c.rules if r.jump} - builtin
        missing = (jumped - created) | (filled - created)
        if missing:
            problems.append(f"chains in {t.name} used but not created: {sorted(missing)}")
        empty = jumped - filled - {"KUBE-NODEPORTS"}
        if empty:
            problems.append(f"chains in {t.name} jumped to but without rules: {sorted(empty)}")
        extra = created - jumped - exempt
        if extra:
            problems.append(f"chains in {t.name} created but not used: {sorted(extra)}")
    return problems


# --------------------------------------------------------------------------
# A stateful fake of the tables (iptables-restore --noflush semantics)
# --------------------------------------------------------------------------


class RestoreError(RuntimeError):
    """What iptables-restore would refuse (the whole input is then not applied)."""


class FakeTables:
    """The nat and filter tables as a sequence of restores leaves them."""

    BUILTIN = {
        "filter": ("INPUT", "FORWARD", "OUTPUT"),
        "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
        "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    }

    def __init__(self) -> None:
        self.dump = Dump([Table(name, [Chain(c) for c in chains]) for name, chains in self.BUILTIN.items()])

    def restore(self, text: str) -> None:
        """Apply restore input atomically, as ``iptables-restore --noflush`` does.

        Line by line: ``:CHAIN`` creates or flushes a chain, ``-A`` appends to
        a declared *or existing* chain, ``-I CHAIN [n]`` inserts, ``-D CHAIN
        rule`` deletes the rule with exactly that text (an error if none),
        ``-X`` deletes an empty, unreferenced chain; at COMMIT every jump must
        lead to a chain that exists.  Any error: :class:`RestoreError` or
        :class:`ParseError` (with the line) and nothing changes.
        """
        import copy

        new = copy.deepcopy(self.dump)
        table: Table | None = None
        builtin_targets = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if table is None:
                if not line.startswith("*"):
                    raise ParseError(f"expected a table (*name), got {line!r}", n)
                table = new.table(line[1:])
                if table is None:
                    table = Table(line[1:])
                    new.tables.append(table)
                continue
            m = _CHAIN_LINE.match(line)
            if m:
                chain = table.get(m.group(1))
                if chain is None:
                    table.chains.append(Chain(m.group(1)))
                elif m.group(1) not in self.BUILTIN.get(table.name, ()):
                    chain.rules = []
                continue
            if line == "COMMIT":
                names = {c.name for c in table.chains}
                for c in table.chains:
                    for r in c.rules:
                        if r.jump and r.jump not in builtin_targets and r.jump not in names:
                            raise RestoreError(f"rule {r.raw!r} jumps to missing chain {r.jump}")
                table = None
                continue
            op, _, rest = line.partition(" ")
            name, _, spec = rest.strip().partition(" ")
            chain = table.get(name)
            if op in ("-A", "-I", "-D", "-X") and chain is None:
                raise RestoreError(f"line {n}: no chain {name!r} in {table.name}")
            if op == "-A":
                chain.rules.append(parse_rule(line))
            elif op == "-I":
                pos, _, tail = spec.partition(" ")
                index = int(pos) - 1 if pos.isdigit() else 0
                if not pos.isdigit():
                    tail = spec
                if index > len(chain.rules):
                    raise RestoreError(f"line {n}: index of insertion too big")
                chain.rules.insert(index, parse_rule(f"-A {name} {tail}"))
            elif op == "-D":
                want = f"-A {name} {spec}"
                for i, r in enumerate(chain.rules):
                    if r.raw == want:
                        del chain.rules[i]
                        break
                else:
                    raise RestoreError(f"line {n}: no rule {want!r} to delete (Bad rule: does a matching rule exist in that chain?)")
            elif op == "-X":
                referenced = [r.raw for c in table.chains if c.name != name for r in c.rules if r.jump == name]
                if referenced:
                    raise RestoreError(f"line {n}: cannot delete chain {name} in {table.name}: still referenced by {referenced[0]!r}")
                if chain.rules:
                    raise RestoreError(f"line {n}: cannot delete chain {name}: not empty")
                table.chains = [c for c in table.chains if c.name != name]
            else:
                raise ParseError(f"cannot parse {line!r}", n)
        if table is not None:
            raise ParseError("no COMMIT at the end of the last table")
        self.dump = new

    def append(self, table: str, chain: str, args: str) -> None:
        """Add one rule (``iptables -A``), for tests that tamper with the tables."""
        t = self.dump.table(table)
        c = t.get(chain) if t else None
        if c is None:
            raise RestoreError(f"no chain {chain} in {table}")
        c.rules.append(parse_rule(f"-A {chain} {args}"))

    def save(self, table: str) -> str:
        t = self.dump.table(table)
        return str(Dump([t])) if t else ""

    def chains(self, table: str) -> list[str]:
        t = self.dump.table(table)
        return [c.name for c in t.chains] if t else []


# --------------------------------------------------------------------------
# The packet tracer
# --------------------------------------------------------------------------


def _address_matches(v: Value, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if "/" in v.value:
        net = ipaddress.ip_network(v.value, strict=False)
        m = addr.version == net.version and addr in net
    else:
        m = addr == ipaddress.ip_address(v.value)
    return m != v.negated


@dataclass
class Trace:
    """Where a packet went: the rules it matched, its final targets, whether it is masqueraded."""

    matches: list[str]
    outputs: list[str]
    masquerade: bool

    @property
    def output(self) -> str:
        """Comma-joined destinations ("ip:port, ip:port") or ACCEPT/DROP/REJECT, "" for no match."""
        return ", ".join(self.outputs)


class Tracer:
    """Walks packets through nat PREROUTING/OUTPUT and the filter service chains of a :class:`Dump`."""

    def __init__(self, dump: Dump, local_ips: set[str] | frozenset[str] = frozenset()) -> None:
        self.dump = dump
        self.local_ips = {"127.0.0.1", "::1", *local_ips}

    def _matches(self, rule: Rule, src: str, proto: str, dst: str, dport: str, in_iface: str) -> bool:
        p = rule.params
        v = p.get("source")
        if v is not None and not _address_matches(v, src):
            return False
        v = p.get("src_type")
        if v is not None and not v.matches("LOCAL" if src in self.local_ips else "not-matched"):
            return False
        v = p.get("protocol")
        if v is not None and not v.matches(proto):
            return False
        v = p.get("destination")
        if v is not None and not _address_matches(v, dst):
            return False
        v = p.get("dst_type")
        if v is not None and not v.matches("LOCAL" if dst in self.local_ips else "not-matched"):
            return False
        v = p.get("dport")
        if v is not None and not v.matches(dport):
            return False
        v = p.get("in_interface")
        if v is not None:
            name = v.value
            hit = in_iface.startswith(name[:-1]) if name.endswith("+") else in_iface == name
            if hit == v.negated:
                return False
        # Anything that checks past state/history does not match.
        if "rcheck" in rule.flags or "mark" in p or "ctstate" in p:
            return False
        return True

    def _run(self, table: str, chain: str, pkt: tuple, st: Trace) -> bool:
        c = self.dump.chain(table, chain)
        if c is None:
            return False
        for rule in c.rules:
            target = rule.jump
            if target is None or not self._matches(rule, *pkt):
                continue
            st.matches.append(rule.raw)
            if target == "KUBE-MARK-MASQ":
                st.masquerade = True
                continue
            if target in ("ACCEPT", "REJECT", "DROP"):
                st.outputs.append(target)
                return True
            if target == "DNAT":
                st.outputs.append(rule.params["dnat_destination"].value)
                return True
            if target in ("RETURN", "MARK", "MASQUERADE", "SNAT"):
                continue
            terminated = self._run(table, target, pkt, st)
            # Through a --probability rule the chain keeps going: collect every possible endpoint.
            if terminated and "probability" not in rule.params:
                return True
        return False

    def trace(self, src: str, proto: str, dst: str, dport: int | str, in_iface: str = "eth0") -> Trace:
        """Trace one packet (``proto`` lower case)."""
        st = Trace([], [], False)
        pkt = (src, proto.lower(), dst, str(dport), in_iface)
        self._run("nat", "PREROUTING", pkt, st)
        if not st.outputs:
            # kube-proxy's fake test tables have no PREROUTING jump: start at the service chain.
            if self.dump.chain("nat", "PREROUTING") is None or not self.dump.chain("nat", "PREROUTING").rules:
                self._run("nat", "KUBE-SERVICES", pkt, st)
        if st.outputs:
            host = st.outputs[0]
            dst = host[1 : host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            pkt = (src, proto.lower(), dst, str(dport), in_iface)
        for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
            self._run("filter", chain, pkt, st)
        return st
