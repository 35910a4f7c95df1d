"""Label and field selectors, parsed and matched as the API server does.

Grammar from apimachinery's ``labels.Parse`` (pkg/labels/selector.go):
comma-separated requirements, each ``key``, ``!key``, ``key=value``,
``key==value``, ``key!=value``, ``key in (v1,v2)`` or ``key notin (v1,v2)``.
Field selectors (``fields.ParseSelector``) allow only ``=``, ``==`` and
``!=``, and each resource supports a fixed set of field labels; anything else
is a 400 ``field label not supported`` on a real server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A label key: an optional DNS-subdomain prefix and "/", then a name of at
# most 63 characters (apimachinery validation.IsQualifiedName).
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


class SelectorError(ValueError):
    """A selector the API server would reject with 400 Bad Request."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # exists | !exists | = | != | in | notin
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and labels[self.key] in self.values
        # != and notin match objects without the label too, as upstream.
        return not has or labels[self.key] not in self.values


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _check_key(key: str, text: str) -> str:
    if not _KEY_RE.match(key):
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r} in {text!r}")
    return key


def _check_value(value: str, text: str) -> str:
    if not _VALUE_RE.match(value):
        raise SelectorError(f"unable to parse requirement: invalid label value {value!r} in {text!r}")
    return value


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a labelSelector query parameter; "" selects everything."""
    text = text.strip()
    if not text:
        return ()
    reqs = []
    for raw in _split_top(text):
        part = raw.strip()
        if not part:
            raise SelectorError(f"unable to parse requirement: empty requirement in {text!r}")
        m = re.match(r"^(\S+?)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            key = _check_key(m.group(1), text)
            values = tuple(_check_value(v.strip(), text) for v in m.group(3).split(","))
            reqs.append(Requirement(key, m.group(2), values))
            continue
        m = re.match(r"^([^=!\s]+)\s*(==|=|!=)\s*(\S*)$", part)
        if m:
            op = "=" if m.group(2) in ("=", "==") else "!="
            reqs.append(Requirement(_check_key(m.group(1), text), op, (_check_value(m.group(3), text),)))
            continue
        if part.startswith("!"):
            reqs.append(Requirement(_check_key(part[1:].strip(), text), "!exists"))
            continue
        reqs.append(Requirement(_check_key(part, text), "exists"))
    return tuple(reqs)


def labels_match(reqs: tuple[Requirement, ...], labels: dict[str, str]) -> bool:
    return all(r.matches(labels) for r in reqs)


def parse_field_selector(text: str, supported: frozenset[str]) -> tuple[tuple[str, str, str], ...]:
    """Parse a fieldSelector into (field, op, value) terms, rejecting unsupported fields."""
    text = text.strip()
    if not text:
        return ()
    terms = []
    for part in text.split(","):
        m = re.match(r"^([^=!]+)(==|=|!=)(.*)$", part.strip())
        if not m:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {part!r}")
        field, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
        if field not in supported:
            raise SelectorError(f'field label not supported: {field}')
        terms.append((field, "=" if op in ("=", "==") else "!=", value))
    return tuple(terms)


def _field_value(obj: dict, path: str) -> str:
    cur = obj
    for step in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(step, "")
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(terms: tuple[tuple[str, str, str], ...], obj: dict) -> bool:
    for field, op, value in terms:
        got = _field_value(obj, field)
        if (got == value) != (op == "="):
            return False
    return True
