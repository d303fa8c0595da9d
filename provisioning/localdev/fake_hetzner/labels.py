"""Hetzner label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`."""

from __future__ import annotations

import re


def _parse_label_selector(selector: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Split `a=b,c in (d,e),!f` into (key, operator, values) terms."""
    terms: list[str] = []
    depth, current = 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    parsed: list[tuple[str, str, tuple[str, ...]]] = []
    for raw in (t.strip() for t in terms):
        if not raw:
            continue
        set_match = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", raw)
        if set_match:
            values = tuple(v.strip() for v in set_match.group(3).split(",") if v.strip())
            parsed.append((set_match.group(1), set_match.group(2), values))
        elif "!=" in raw:
            key, value = raw.split("!=", 1)
            parsed.append((key.strip(), "!=", (value.strip(),)))
        elif "==" in raw:
            key, value = raw.split("==", 1)
            parsed.append((key.strip(), "=", (value.strip(),)))
        elif "=" in raw:
            key, value = raw.split("=", 1)
            parsed.append((key.strip(), "=", (value.strip(),)))
        elif raw.startswith("!"):
            parsed.append((raw[1:].strip(), "absent", ()))
        else:
            parsed.append((raw, "present", ()))
    return parsed


def labels_match(labels: dict[str, str], selector: str) -> bool:
    """True if `labels` satisfy every term of a Hetzner label selector."""
    for key, op, values in _parse_label_selector(selector):
        present = key in labels
        value = labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = value not in values
        else:
            ok = present if op == "present" else not present
        if not ok:
            return False
    return True
