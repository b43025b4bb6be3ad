"""ComfyUI's prompt syntax: `(x:1.2)`, `((x))` = 1.21, `\\(` escapes, `embedding:name` words.

The rules are ComfyUI's (comfy/sd1_clip.py token_weights / parse_parentheses), including its
behaviour on unbalanced input: an unclosed `(` stays literal text, and `[x]` has no meaning (the
brackets are tokenized as text). Nesting deeper than MAX_NESTING is refused instead of recursing
without bound.
"""

from __future__ import annotations

import re

from luna_stack.wire.errors import BadRequest

EMBEDDING_PREFIX = "embedding:"
MAX_NESTING = 128
# Escaped parentheses are hidden behind control characters while the groups are parsed.
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")


def _escape(text: str) -> str:
    for escaped, hidden in _ESCAPES:
        text = text.replace(escaped, hidden)
    return text


def _unescape(text: str) -> str:
    for escaped, hidden in _ESCAPES:
        text = text.replace(hidden, escaped[1])
    return text


def _top_level_groups(text: str) -> list[str]:
    """Split into plain runs and top-level `( ... )` groups, with ComfyUI's depth counter."""
    groups: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    groups.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                groups.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        groups.append(current)
    return groups


def _weighted(text: str, weight: float, level: int) -> list[tuple[str, float]]:
    if level > MAX_NESTING:
        raise BadRequest(f"prompt parentheses are nested deeper than {MAX_NESTING} levels")
    out: list[tuple[str, float]] = []
    for group in _top_level_groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner = group[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                # An explicit weight replaces the nesting factor; Python's float() decides what parses.
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out.extend(_weighted(inner, inner_weight, level + 1))
        else:
            out.append((group, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(segment, weight) pairs in prompt order, escapes resolved."""
    return [(_unescape(segment), weight) for segment, weight in _weighted(_escape(text), 1.0, 0)]


def split_embedding_words(segment: str) -> list[str]:
    """Cut a segment before every ` embedding:` / newline `embedding:` (ComfyUI's rule), dropping empties."""
    first, *rest = _EMBEDDING_SPLIT.split(segment)
    return [w for w in [first, *(EMBEDDING_PREFIX + r for r in rest)] if w]
