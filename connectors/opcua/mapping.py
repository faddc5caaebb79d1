"""From OPC UA data values to readings: quality, timestamps, deadband and duplicate filtering.

Pure functions and small classes, no network: the runner feeds them, unit tests exercise them alone.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.core.records import BatchReading, InvalidRecord, Quality, check_ts, check_value

# The two top bits of a StatusCode give its severity (OPC UA Part 4, 7.39).
_SEVERITY: dict[int, Quality] = {0: "good", 1: "uncertain", 2: "bad", 3: "bad"}


def quality_of(code: int) -> Quality:
    return _SEVERITY[(code >> 30) & 0x3]


def ms(t: datetime | None) -> int | None:
    """A DataValue timestamp as epoch milliseconds; None when the server left it out."""
    if t is None:
        return None
    if t.tzinfo is None:  # asyncua 1.x hands out naive UTC datetimes
        t = t.replace(tzinfo=UTC)
    v = int(t.timestamp() * 1000)
    return v if v > 0 else None  # DateTime.MinValue means "not set"


def status_name(code: int) -> str:
    from asyncua import ua

    try:
        sc: Any = ua.StatusCode
        return str(sc(code).name)
    except Exception:
        return f"0x{code:08X}"


@dataclass
class Deadband:
    kind: Literal["absolute", "percent"]
    value: float
    span: float | None = None  # EURange high - low, for percent

    @property
    def threshold(self) -> float:
        if self.kind == "absolute":
            return self.value
        assert self.span is not None
        return abs(self.span) * self.value / 100.0


@dataclass
class FilterState:
    """What was last emitted for a series; kept across reconnects so nothing is sent twice."""

    ts: int | None = None
    value: float | None = None
    quality: str | None = None


@dataclass
class NodeSpec:
    """One monitored node and where its readings go."""

    node_id: str  # as configured (or as browsed), for messages and dead letters
    site: str
    device: str
    point: str
    unit: str | None = None
    sampling_interval: int = 1000
    queue_size: int = 10
    deadband: Deadband | None = None
    state: FilterState = field(default_factory=FilterState, repr=False)


class Skip(Exception):
    """A notification deliberately not turned into a reading (duplicate or within the deadband)."""

    def __init__(self, why: Literal["duplicate", "deadband"]) -> None:
        super().__init__(why)
        self.why = why


def to_reading(
    spec: NodeSpec,
    value: Any,
    code: int,
    source_ts: datetime | None,
    server_ts: datetime | None,
    use: Literal["source", "server"],
    received_ms: int,
) -> BatchReading:
    """Turn one monitored-item notification into a reading, or raise InvalidRecord / Skip.

    ``ts`` is the chosen timestamp, falling back to the other one and then to the arrival time; both
    timestamps travel in ``status``. A notification whose ts is not newer than the last one
    emitted for the node is a duplicate (a subscription recreated after a reconnect re-sends the
    current values) and is skipped, so (point, ts) stays unique.
    """
    src, srv = ms(source_ts), ms(server_ts)
    ts = (src if use == "source" else srv) or src or srv or received_ms
    quality = quality_of(code)
    last = spec.state
    held = False
    if value is None:
        # A Bad status comes without a value (Part 4, 7.7.1). Carrying the last value with quality bad keeps
        # the outage visible downstream (the latest value turns bad); statistics ignore bad readings.
        if quality != "bad" or last.value is None:
            raise InvalidRecord(f"invalid: no value with status {status_name(code)}")
        value, held = last.value, True
    v = check_value(value)
    ts = check_ts(ts)
    if last.ts is not None and ts <= last.ts:
        raise Skip("duplicate")
    db = spec.deadband
    if (
        db is not None
        and last.value is not None
        and quality == last.quality
        and abs(v - last.value) <= db.threshold
    ):
        # Checked here too, against the last value sent: servers that ignore the filter (or compare with
        # the previous sample rather than the last reported value) still honour the deadband.
        raise Skip("deadband")
    last.ts, last.value, last.quality = ts, v, quality
    status: dict[str, Any] = {"code": code, "source_ts": src, "server_ts": srv}
    if code:
        status["name"] = status_name(code)
    if held:
        status["held"] = True  # the value is the last one received, not a measurement
    r: BatchReading = {"point": spec.point, "ts": ts, "value": v, "quality": quality, "status": status}
    if spec.unit:
        r["unit"] = spec.unit
    return r


def render(template: str, name: str, parent: str, path: str) -> str:
    return template.replace("{name}", name).replace("{parent}", parent).replace("{path}", path)


def matches(name: str, include: str, exclude: str | None) -> bool:
    return fnmatch.fnmatchcase(name, include) and not (exclude and fnmatch.fnmatchcase(name, exclude))
