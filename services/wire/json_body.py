"""JSON from clients, parsed within limits: UTF-8 only, no NaN/Infinity, numbers of bounded length, and
bounded nesting. Every violation is an InvalidBody (400) naming the limit; nothing a client sends can
raise RecursionError or ValueError deep inside the parser."""

from __future__ import annotations

import json
from typing import Any

from luna_stack.wire.errors import InvalidBody

MAX_DEPTH = 32  # params are a few levels deep (encode_dual: params.positive.tokens.l[chunk][token])
MAX_NUMBER_CHARS = 64  # a float64 needs at most 24; anything longer is not a parameter


def _number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise InvalidBody(
                f"a JSON number of {len(text)} characters; at most {MAX_NUMBER_CHARS} are accepted"
            )
        return kind(text)

    return parse


def _constant(name: str) -> Any:
    raise InvalidBody(f"JSON {name} is not a number this service accepts", hint="send finite numbers")


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_json(data: bytes | str, what: str) -> Any:
    """`what` names the part of the request in error messages ("JSON body", "request parameters")."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidBody(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(data, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise InvalidBody(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidBody(f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    if not _depth_ok(value):
        raise InvalidBody(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return value


def parse_object(data: bytes | str, what: str) -> dict[str, Any]:
    value = parse_json(data, what)
    if not isinstance(value, dict):
        raise InvalidBody(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
