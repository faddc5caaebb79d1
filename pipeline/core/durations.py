"""Durations in configuration files: ``250ms``, ``10s``, ``1m``, ``2h``, ``90d`` or a bare number of seconds.

A leaf module, so that the topology and every connector's config model share one definition.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic.json_schema import WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def parse_duration_ms(v: Any) -> int:
    """``250ms``, ``10s``, ``1m``, ``2h``, ``90d`` or a bare number of seconds → milliseconds."""
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 1m, 7d or a number of seconds")
    if isinstance(v, int | float):
        return round(v * 1000)
    if isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            return round(float(m.group(1)) * _UNIT_MS[m.group(2)])
    raise ValueError("expected a duration such as 500ms, 10s, 1m, 7d or a number of seconds")


DurationMs = Annotated[
    int,
    BeforeValidator(parse_duration_ms),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration: 500ms, 10s, 1m, 2h, 7d, or a number of seconds",
        }
    ),
]
