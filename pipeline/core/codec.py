"""The one JSON codec used on every topic: orjson (fast, strict about NaN/Infinity)."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    # OPT_SERIALIZE_NUMPY lets aggregates built from numpy scalars go out without conversion.
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)
