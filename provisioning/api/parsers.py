"""The API's one request parser: DRF's JSON parser, with a nesting limit.

Python's json module parses nesting by recursion: a body of 50,000 `[` raised RecursionError
inside DRF's parser and answered 500. The API's bodies are flat objects, so a body nested deeper
than MAX_NESTING is refused as a parse error (400) before any view runs. `nesting_depth` also
serves the Stripe webhook's own body check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

MAX_NESTING = 32


def nesting_depth(value: object) -> int:
    """How deeply containers nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth + 1)
        pending.extend((child, depth + 1) for child in children)
    return deepest


class JSONParser(parsers.JSONParser):
    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(
                f"JSON parse error - nested deeper than {MAX_NESTING} levels"
            ) from None
        if nesting_depth(data) > MAX_NESTING:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_NESTING} levels")
        return data
