"""Record shapes on the topics (docs/contracts.md) and the validation of incoming readings.

Records travel as plain dicts encoded by :mod:`pipeline.core.codec`; the TypedDicts below document and type
them, and ``schemas/*.json`` state the same shapes language-neutrally (a unit test keeps them in step).
Validation is hand-written rather than a model library because it sits on the hot path: every reading
of every batch passes through :func:`validate_batch`.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any, Literal, NotRequired, TypedDict

from pipeline.core import codec

Quality = Literal["good", "uncertain", "bad"]
QUALITIES: frozenset[str] = frozenset(("good", "uncertain", "bad"))

# Plausible event-time bounds (epoch ms): 2000-01-01 .. 2100-01-01. Anything outside is a unit
# mistake (seconds sent as ms or µs) rather than a real measurement.
TS_MIN_MS = 946_684_800_000
TS_MAX_MS = 4_102_444_800_000


class Reading(TypedDict):
    site: str
    device: str
    point: str
    ts: int
    value: float
    quality: Quality
    unit: NotRequired[str]
    status: NotRequired[Any]


class BatchReading(TypedDict):
    point: str
    ts: int
    value: float
    quality: Quality
    unit: NotRequired[str]
    status: NotRequired[Any]


class ReadingBatch(TypedDict):
    v: int
    source: str
    site: str
    device: str
    readings: list[BatchReading]


class Aggregate(TypedDict):
    series: str
    site: str
    device: str
    point: str
    window_start: int
    window_end: int
    count: int
    good_count: int
    min: float | None
    max: float | None
    mean: float | None
    sum: float | None
    first: float | None
    last: float | None
    stddev: float | None
    unit: NotRequired[str]


class DeadLetter(TypedDict):
    source: str
    reason: str
    received_at: int
    payload: str
    payload_encoding: NotRequired[Literal["text", "base64"]]
    topic: NotRequired[str]
    partition: NotRequired[int]
    offset: NotRequired[int]


class InvalidRecord(ValueError):
    """A record that cannot become a valid reading; ``reason`` goes into the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Written by earlier versions on telemetry.raw and loops.samples to close quiet partitions; skipped.
HEARTBEAT_KEY = b"\x00heartbeat"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def series_id(site: str, device: str, point: str) -> str:
    return f"{site}/{device}/{point}"


def device_key(site: str, device: str) -> str:
    return f"{site}/{device}"


def check_value(value: Any) -> float:
    """A reading's value: a finite number; booleans become 1/0 (binary points)."""
    if value is True:
        return 1.0
    if value is False:
        return 0.0
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise InvalidRecord(f"value is not finite: {value!r}")
    raise InvalidRecord(
        f"value must be a finite number or boolean, got {type(value).__name__}: {value!r:.80}"
    )


def check_ts(ts: Any) -> int:
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise InvalidRecord(f"ts must be epoch milliseconds (integer), got {ts!r:.80}")
    if isinstance(ts, float):
        if not math.isfinite(ts):
            raise InvalidRecord(f"ts is not finite: {ts!r}")
        ts = int(ts)
    if not TS_MIN_MS <= ts < TS_MAX_MS:
        raise InvalidRecord(f"ts {ts} is outside 2000-01-01..2100-01-01 in epoch milliseconds")
    return ts


def _check_name(obj: dict[str, Any], field: str) -> str:
    v = obj.get(field)
    if not isinstance(v, str) or not v:
        raise InvalidRecord(f"{field} must be a non-empty string, got {v!r:.80}")
    if "/" in v and field != "point":
        raise InvalidRecord(f"{field} must not contain '/': {v!r:.80}")
    return v


def _check_reading_fields(r: Any) -> BatchReading:
    # Fast path for the common, already normal form {point, ts, value, quality}: checked field by field
    # and used as it is (no copy). `v - v == 0.0` is false for NaN and ±inf.
    if type(r) is dict and len(r) == 4:
        point, ts, value, q = r.get("point"), r.get("ts"), r.get("value"), r.get("quality")
        if (
            type(point) is str
            and point
            and type(ts) is int
            and TS_MIN_MS <= ts < TS_MAX_MS
            and type(value) is float
            and value - value == 0.0
            and type(q) is str
            and q in QUALITIES
        ):
            return r  # type: ignore[return-value]
    if not isinstance(r, dict):
        raise InvalidRecord(f"reading must be an object, got {type(r).__name__}")
    point = _check_name(r, "point")
    out: BatchReading = {
        "point": point,
        "ts": check_ts(r.get("ts")),
        "value": check_value(r.get("value")),
        "quality": "good",
    }
    q = r.get("quality", "good")
    if not isinstance(q, str) or q not in QUALITIES:
        raise InvalidRecord(f"quality must be one of good, uncertain, bad; got {q!r:.40}")
    out["quality"] = q  # type: ignore[typeddict-item]  # one of QUALITIES, checked above
    unit = r.get("unit")
    if unit is not None:
        if not isinstance(unit, str):
            raise InvalidRecord(f"unit must be a string, got {unit!r:.40}")
        out["unit"] = unit
    if "status" in r and r["status"] is not None:
        out["status"] = r["status"]
    return out


def validate_batch(obj: Any) -> tuple[ReadingBatch, list[tuple[Any, str]]]:
    """Normalise a decoded ReadingBatch or single Reading.

    Returns the batch with its valid readings and the rejected readings with their reasons, so one bad
    reading never costs its neighbours. Raises :class:`InvalidRecord` when the envelope itself is unusable.
    """
    if not isinstance(obj, dict):
        raise InvalidRecord(f"record must be a JSON object, got {type(obj).__name__}")
    site = _check_name(obj, "site")
    device = _check_name(obj, "device")
    if "readings" in obj:
        if obj.get("v", 1) != 1:
            raise InvalidRecord(f"unsupported ReadingBatch version v={obj.get('v')!r}")
        raw = obj["readings"]
        if not isinstance(raw, list):
            raise InvalidRecord("readings must be a list")
        source = obj.get("source")
        source = source if isinstance(source, str) else ""
    else:
        raw = [obj]
        source = ""
    good: list[BatchReading] = []
    bad: list[tuple[Any, str]] = []
    for r in raw:
        try:
            good.append(_check_reading_fields(r))
        except InvalidRecord as e:
            bad.append((r, e.reason))
    return {"v": 1, "source": source, "site": site, "device": device, "readings": good}, bad


def dead_letter(
    source: str,
    reason: str,
    payload: bytes | str | Any,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> DeadLetter:
    """Build a DeadLetter; bytes that are not UTF-8 travel base64-encoded."""
    enc: Literal["text", "base64"] = "text"
    if isinstance(payload, bytes | bytearray | memoryview):
        b = bytes(payload)
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            text = base64.b64encode(b).decode("ascii")
            enc = "base64"
    elif isinstance(payload, str):
        text = payload
    else:
        text = codec.dumps(payload).decode("utf-8") if _jsonable(payload) else repr(payload)
    dl: DeadLetter = {
        "source": source,
        "reason": reason,
        "received_at": now_ms(),
        "payload": text,
        "payload_encoding": enc,
    }
    if topic is not None:
        dl["topic"] = topic
    if partition is not None:
        dl["partition"] = partition
    if offset is not None:
        dl["offset"] = offset
    return dl


def _jsonable(obj: Any) -> bool:
    try:
        codec.dumps(obj)
    except TypeError:
        return False
    return True
