"""MQTT topic and payload parsing: one message into readings for one device, or reasons to reject.

Pure functions, no network: unit-tested on their own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connectors.mqtt.config import TopicMapping
from pipeline.core import codec
from pipeline.core.records import (
    QUALITIES,
    TS_MAX_MS,
    TS_MIN_MS,
    BatchReading,
    InvalidRecord,
    check_value,
)

# Epoch seconds and milliseconds are told apart by magnitude: 1e11 s is the year 5138, 1e11 ms is 1973.
_SECONDS_LIMIT = 100_000_000_000
_FIELD = re.compile(r"\{(site|device|point)\}")
_NUMBER = (int, float)  # a tuple: ``int | float`` would build a union on every call of the hot path


def parse_ts(v: Any) -> int:
    """Epoch seconds or milliseconds (by magnitude) or an RFC 3339 string → epoch ms."""
    if isinstance(v, bool):
        raise InvalidRecord(f"ts must be a number or RFC 3339 string, got {v!r}")
    if isinstance(v, _NUMBER):
        if not math.isfinite(v):
            raise InvalidRecord(f"ts is not finite: {v!r}")
        ms = round(v * 1000) if abs(v) < _SECONDS_LIMIT else int(v)
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip().replace("z", "Z"))
        except ValueError:
            raise InvalidRecord(f"ts is not RFC 3339 nor epoch: {v!r:.60}") from None
        if dt.tzinfo is None:
            raise InvalidRecord(f"ts has no time zone offset: {v!r:.60}")
        ms = round(dt.timestamp() * 1000)
    else:
        raise InvalidRecord(f"ts must be a number or RFC 3339 string, got {type(v).__name__}")
    if not TS_MIN_MS <= ms < TS_MAX_MS:
        raise InvalidRecord(f"ts {v!r} is outside 2000-01-01..2100-01-01")
    return ms


@dataclass(frozen=True)
class Route:
    """A compiled topic mapping: which levels are site/device/point."""

    mapping: TopicMapping
    levels: tuple[str, ...]

    @classmethod
    def compile(cls, mapping: TopicMapping) -> Route:
        return cls(mapping, tuple(mapping.template.split("/")))

    def match(self, topic: str) -> dict[str, str] | None:
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        out: dict[str, str] = {}
        for lvl, part in zip(self.levels, parts, strict=True):
            m = _FIELD.fullmatch(lvl)
            if m:
                if not part:
                    return None
                out[m.group(1)] = part
            elif lvl not in ("+", part):
                return None
        for f in ("site", "device", "point"):
            fixed = getattr(self.mapping, f)
            if fixed is not None and f not in out:
                out[f] = fixed
        return out


def topic_matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, lvl in enumerate(f):
        if lvl == "#":
            return True
        if i >= len(t) or (lvl != "+" and lvl != t[i]):
            return False
    return len(f) == len(t)


@dataclass
class Parsed:
    site: str
    device: str
    readings: list[BatchReading]
    rejected: list[str]  # reasons for parts of the payload that could not become readings


def _reading(point: str, value: Any, ts: int, unit: str | None, quality: Any = "good") -> BatchReading:
    if quality.__hash__ is None or quality not in QUALITIES:  # a list or object is refused, not a TypeError
        raise InvalidRecord(f"quality must be one of good, uncertain, bad; got {quality!r:.40}")
    r: BatchReading = {"point": point, "ts": ts, "value": check_value(value), "quality": quality}
    if unit:
        r["unit"] = unit
    return r


def _flatten(obj: dict[str, Any], prefix: str, out: list[tuple[str, Any]]) -> None:
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            _flatten(v, name, out)
        else:
            out.append((name, v))


def _decode(payload: bytes) -> Any:
    """The payload as a JSON value or a bare number; InvalidRecord says why not."""
    try:
        # Valid UTF-8 JSON, surrounding JSON whitespace included: one call, no copies (the usual case).
        return codec.loads(payload)
    except codec.JSONDecodeError:
        pass
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidRecord("payload is not UTF-8") from None
    if not text:
        raise InvalidRecord("empty payload")
    try:
        return codec.loads(text)
    except codec.JSONDecodeError:
        # "NaN", "inf" and friends are not JSON; float() would take them, so they are refused explicitly.
        try:
            num = float(text)
        except ValueError:
            raise InvalidRecord(f"payload is neither a number nor JSON: {text[:60]!r}") from None
        if not math.isfinite(num):
            raise InvalidRecord(f"value is not finite: {text[:20]!r}") from None
        return num


def _point_reading(point: str, obj: Any, received_ms: int, unit: str | None) -> BatchReading:
    if isinstance(obj, dict):
        if "value" not in obj:
            raise InvalidRecord("JSON payload has no 'value'")
        ts = parse_ts(obj["ts"]) if obj.get("ts") is not None else received_ms
        u = obj.get("unit", unit)
        if u is not None and not isinstance(u, str):
            raise InvalidRecord(f"unit must be a string, got {u!r:.40}")
        return _reading(point, obj["value"], ts, u, obj.get("quality", "good"))
    return _reading(point, obj, received_ms, unit)


def point_reading(point: str, payload: bytes, received_ms: int, unit: str | None) -> BatchReading:
    """The reading of a message whose topic names its point: a bare number or ``{value, ts?, unit?,
    quality?}``. Raises InvalidRecord. The same as :func:`parse_message` for such topics, without the
    wrapping: the connector's per-message path."""
    return _point_reading(point, _decode(payload), received_ms, unit)


def parse_message(route: Route, ids: dict[str, str], payload: bytes, received_ms: int) -> Parsed:
    """Readings of one MQTT message. Raises InvalidRecord when nothing in it can be used."""
    site, device = ids["site"], ids["device"]
    unit = route.mapping.unit
    obj = _decode(payload)
    if "point" in ids:
        return Parsed(site, device, [_point_reading(ids["point"], obj, received_ms, unit)], [])
    # The template does not name the point: every numeric leaf of a JSON object is a point.
    if not isinstance(obj, dict):
        raise InvalidRecord("topic carries no point, so the payload must be a JSON object of points")
    ts = parse_ts(obj["ts"]) if obj.get("ts") is not None else received_ms
    leaves: list[tuple[str, Any]] = []
    _flatten({k: v for k, v in obj.items() if k != "ts"}, "", leaves)
    readings: list[BatchReading] = []
    rejected: list[str] = []
    for name, v in leaves:
        try:
            readings.append(_reading(name, v, ts, unit))
        except InvalidRecord as e:
            rejected.append(f"point {name}: {e.reason}")
    if not readings and not rejected:
        raise InvalidRecord("JSON object has no points")
    return Parsed(site, device, readings, rejected)
