"""BACnet write commands as records: WriteCommand (``commands.bacnet``), CommandResult (``commands.results``).

A command names a point by its series id (``site/device/point``) and asks for a value at a priority, or
``null`` to relinquish that priority. Parsing, building and answering commands lives here; what the
topology allows and the execution live in ``connectors/bacnet/commands.py``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal, TypedDict

from pipeline.core.records import now_ms

Status = Literal["accepted", "rejected", "failed"]
MAX_AGE_MS = 300_000  # older commands are rejected as expired rather than run late
MAX_AHEAD_MS = 60_000  # commands stamped further ahead are refused: they would never expire


class WriteCommand(TypedDict):
    id: str
    point: str
    value: float | None
    priority: int
    requested_by: str
    ts: int


class CommandResult(TypedDict):
    id: str
    point: str
    value: float | None
    priority: int
    requested_by: str
    requested_at: int
    status: Status
    error: str | None
    completed_at: int
    source: str | None


class InvalidCommand(ValueError):
    def __init__(self, reason: str, raw: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw or {}

    @property
    def command_id(self) -> str | None:
        v = self.raw.get("id")
        return v if isinstance(v, str) and v else None


def parse_command(obj: Any) -> WriteCommand:
    """Check a decoded WriteCommand; raises :class:`InvalidCommand` naming the field."""
    if not isinstance(obj, dict):
        raise InvalidCommand(f"invalid: a command must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("id")
    if not isinstance(cid, str) or not 1 <= len(cid) <= 128:
        raise InvalidCommand("invalid: id must be a string of 1-128 characters", obj)
    point = obj.get("point")
    if not isinstance(point, str) or point.count("/") < 2 or not all(point.split("/", 2)):
        raise InvalidCommand(f"invalid: point must be a series id site/device/point, got {point!r:.80}", obj)
    value = obj.get("value")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise InvalidCommand(
            f"invalid: value must be a finite number or null (relinquish), got {value!r:.40}", obj
        )
    prio = obj.get("priority")
    if isinstance(prio, bool) or not isinstance(prio, int) or not 1 <= prio <= 16:
        raise InvalidCommand(f"invalid: priority must be an integer 1-16, got {prio!r:.20}", obj)
    by = obj.get("requested_by")
    if not isinstance(by, str) or not by:
        raise InvalidCommand("invalid: requested_by must name who asks", obj)
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidCommand("invalid: ts must be epoch milliseconds", obj)
    return {
        "id": cid,
        "point": point,
        "value": None if value is None else float(value),
        "priority": prio,
        "requested_by": by,
        "ts": ts,
    }


def make_command(point: str, value: float | None, priority: int, requested_by: str) -> WriteCommand:
    return parse_command(
        {
            "id": uuid.uuid4().hex,
            "point": point,
            "value": value,
            "priority": priority,
            "requested_by": requested_by,
            "ts": now_ms(),
        }
    )


def result_for(
    cmd: WriteCommand | dict[str, Any], status: Status, error: str | None, source: str | None
) -> CommandResult:
    value = cmd.get("value")
    prio = cmd.get("priority")
    ts = cmd.get("ts")
    return {
        "id": str(cmd.get("id")),
        "point": str(cmd.get("point")),
        "value": float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
        "priority": prio if isinstance(prio, int) and not isinstance(prio, bool) else 0,
        "requested_by": str(cmd.get("requested_by") or "unknown"),
        "requested_at": ts if isinstance(ts, int) and not isinstance(ts, bool) else now_ms(),
        "status": status,
        "error": error,
        "completed_at": now_ms(),
        "source": source,
    }
