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
    if obj.get("v") == 2:
        scan, rejected = validate_scan(obj)
        return scan.batch(), rejected
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


class Scan:
    """A ReadingBatch in columns (schema version 2, ``docs/contracts.md``), as the aggregation consumes it.

    ``points``, ``ts``, ``values`` are parallel lists; ``quality`` is None when every reading is good,
    ``units`` and ``status`` None when the batch carries none (else parallel lists with nulls).
    """

    __slots__ = ("device", "points", "quality", "site", "source", "status", "ts", "ts0", "units", "values")

    def __init__(
        self,
        source: str,
        site: str,
        device: str,
        points: list[str],
        ts: list[int],
        values: list[float],
        quality: list[str] | None = None,
        units: list[str | None] | None = None,
        status: list[Any] | None = None,
    ) -> None:
        self.source, self.site, self.device = source, site, device
        self.points, self.ts, self.values = points, ts, values
        self.quality, self.units, self.status = quality, units, status
        self.ts0: int | None = None  # the one time of every reading, when the batch gave one

    def __len__(self) -> int:
        return len(self.points)

    def reading(self, i: int) -> BatchReading:
        r: BatchReading = {
            "point": self.points[i],
            "ts": self.ts[i],
            "value": float(self.values[i]),
            "quality": "good" if self.quality is None else self.quality[i],  # type: ignore[typeddict-item]
        }
        if self.units is not None and self.units[i] is not None:
            r["unit"] = self.units[i]  # type: ignore[typeddict-item]
        if self.status is not None and self.status[i] is not None:
            r["status"] = self.status[i]
        return r

    def readings(self) -> list[BatchReading]:
        if self.units is None and self.status is None:
            if self.quality is None:
                return [
                    {"point": p, "ts": t, "value": float(v), "quality": "good"}
                    for p, t, v in zip(self.points, self.ts, self.values, strict=True)
                ]
            return [
                {"point": p, "ts": t, "value": float(v), "quality": q}  # type: ignore[typeddict-item]
                for p, t, v, q in zip(self.points, self.ts, self.values, self.quality, strict=True)
            ]
        return [self.reading(i) for i in range(len(self.points))]

    def batch(self) -> ReadingBatch:
        """The same readings as a version-1 ReadingBatch (what the sinks and routings take)."""
        return {
            "v": 1,
            "source": self.source,
            "site": self.site,
            "device": self.device,
            "readings": self.readings(),
        }

    @classmethod
    def of_batch(cls, b: ReadingBatch) -> Scan:
        """A normalised version-1 batch (as :func:`validate_batch` returns it) in columns."""
        rs = b["readings"]
        quality: list[str] = [r["quality"] for r in rs]
        units: list[str | None] | None = None
        status: list[Any] | None = None
        for r in rs:
            if "unit" in r or "status" in r:
                units = [r.get("unit") for r in rs]
                status = [r.get("status") for r in rs]
                break
        return cls(
            b["source"],
            b["site"],
            b["device"],
            [r["point"] for r in rs],
            [r["ts"] for r in rs],
            [r["value"] for r in rs],
            None if quality.count("good") == len(quality) else quality,
            units,
            status,
        )


def columns(batch: ReadingBatch) -> dict[str, Any]:
    """A version-1 ReadingBatch as version 2 (columns), as connectors write it: one ``ts`` when the whole scan
    has one, ``quality``/``units``/``status`` only when a reading needs them."""
    rs = batch["readings"]
    out: dict[str, Any] = {
        "v": 2,
        "source": batch["source"],
        "site": batch["site"],
        "device": batch["device"],
        "points": [r["point"] for r in rs],
    }
    ts = [r["ts"] for r in rs]
    out["ts"] = ts[0] if ts and ts.count(ts[0]) == len(ts) else ts
    out["values"] = [r["value"] for r in rs]
    quality = [r["quality"] for r in rs]
    if quality.count("good") != len(quality):
        out["quality"] = quality
    if any("unit" in r for r in rs):
        out["units"] = [r.get("unit") for r in rs]
    if any("status" in r for r in rs):
        out["status"] = [r.get("status") for r in rs]
    return out


_UNIT_TYPES = {str, type(None)}


def validate_scan(obj: Any) -> tuple[Scan, list[tuple[Any, str]]]:
    """Normalise a decoded ReadingBatch (version 2 or 1) or single Reading into a :class:`Scan`.

    Version 2 costs a few C-level passes per column for a well-formed batch (types, finiteness, range);
    only a batch that fails one of them is looked at reading by reading, to dead-letter exactly the bad ones.
    """
    if type(obj) is not dict or obj.get("v") != 2:
        batch, bad = validate_batch(obj)
        return Scan.of_batch(batch), bad
    site = _check_name(obj, "site")
    device = _check_name(obj, "device")
    source = obj.get("source")
    source = source if type(source) is str else ""
    points = obj.get("points")
    if type(points) is not list:
        raise InvalidRecord(f"points must be a list, got {points!r:.80}")
    n = len(points)
    ts = obj.get("ts")
    one_ts = type(ts) is int
    if type(ts) is int:
        if not TS_MIN_MS <= ts < TS_MAX_MS:
            raise InvalidRecord(f"ts {ts} is outside 2000-01-01..2100-01-01 in epoch milliseconds")
        ts = [ts] * n  # one timestamp for the whole scan
    elif type(ts) is not list or len(ts) != n:
        raise InvalidRecord(f"ts must be an integer or a list as long as points ({n}), got {ts!r:.80}")
    values = obj.get("values")
    if type(values) is not list or len(values) != n:
        raise InvalidRecord(f"values must be a list as long as points ({n}), got {values!r:.80}")
    quality = obj.get("quality")
    units = obj.get("units")
    status = obj.get("status")
    for name, col in (("quality", quality), ("units", units), ("status", status)):
        if col is not None and (type(col) is not list or len(col) != n):
            raise InvalidRecord(f"{name} must be a list as long as points ({n}), got {col!r:.80}")
    if quality is not None and quality.count("good") == n:
        quality = None
    if not n:
        return Scan(source, site, device, [], [], [], None, None, None), []
    try:
        # One C-level pass each: join fails on a point that is not a string; sum on a value that is not a
        # number, and it is NaN or infinite when one is (or when finite ones overflow: then we look closer).
        # Integers and booleans stay as they are here; they are numbers (1/0), made floats where used.
        "".join(points)
        total = sum(values)
        fine = (
            "" not in points
            and total - total == 0.0
            and (one_ts or (type(sum(ts)) is int and min(ts) >= TS_MIN_MS and max(ts) < TS_MAX_MS))
            and (quality is None or set(quality) <= QUALITIES)
            and (units is None or set(map(type, units)) <= _UNIT_TYPES)
        )
    except TypeError:
        fine = False
    if fine:
        scan = Scan(source, site, device, points, ts, values, quality, units, status)
        if one_ts:
            scan.ts0 = ts[0]
        return scan, []
    # Reading by reading: the good ones stay, the bad ones go back with their reason.
    good: list[BatchReading] = []
    rejected: list[tuple[Any, str]] = []
    for i in range(n):
        r: dict[str, Any] = {"point": points[i], "ts": ts[i], "value": values[i]}
        r["quality"] = "good" if quality is None else quality[i]
        if units is not None and units[i] is not None:
            r["unit"] = units[i]
        if status is not None and status[i] is not None:
            r["status"] = status[i]
        try:
            good.append(_check_reading_fields(r))
        except InvalidRecord as e:
            rejected.append((r, e.reason))
    return Scan.of_batch(
        {"v": 1, "source": source, "site": site, "device": device, "readings": good}
    ), rejected


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
