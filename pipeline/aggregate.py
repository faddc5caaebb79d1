"""Event-time 1-minute aggregation: pure logic, no Kafka (DESIGN.md §4).

``MinuteAggregator`` keeps its state in any ``MutableMapping`` — a Faust table in the worker, a dict in
unit tests — laid out so that replaying an input partition is idempotent:

* one record per series (``site/device/point``): its open windows, the last input offset applied and the
  newest event time published to ``telemetry.latest``;
* one record per input partition (``\\x00wm/<partition>``): the event-time watermark, the highest event time
  seen and the last input offset fully applied.

Processing one input message is three steps, split so the agent can make the closed aggregates durable
in Kafka *before* the windows are deleted from the state:

1. :meth:`apply` folds the message's readings into their windows (late ones are returned, not applied);
2. :meth:`due` lists the windows the new watermark closes, with their final aggregates;
3. :meth:`finish` deletes those windows and persists the watermark record with the message's offset.

A crash between the steps leaves state from which a replay of the same message reaches the same result:
series already applied are skipped by their offset, and windows not yet deleted are closed again with the
same content (the database upsert makes the repeat harmless).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import Aggregate, BatchReading, Reading, ReadingBatch

WINDOW_MS = 60_000
WM_PREFIX = "\x00wm/"

# Layout of one window's state list (a list, not a dict: it is serialised on every table write).
COUNT, GOOD, MEAN, M2, MIN, MAX, SUM, COMP, FIRST_TS, FIRST, LAST_TS, LAST = range(12)


def new_window() -> list[Any]:
    return [0, 0, 0.0, 0.0, None, None, 0.0, 0.0, None, None, None, None]


def add_reading(st: list[Any], ts: int, value: float, good: bool) -> None:
    """Fold one reading into a window's state.

    Mean and variance by Welford's method (Welford 1962; Knuth TAOCP vol. 2, 4.2.2), the sum with
    Neumaier's compensation so that long windows stay exact to the last bits, like pandas' Kahan sums.
    """
    st[COUNT] += 1
    if not good:
        return
    n = st[GOOD] + 1
    st[GOOD] = n
    delta = value - st[MEAN]
    st[MEAN] += delta / n
    st[M2] += delta * (value - st[MEAN])
    if n == 1:
        st[MIN] = st[MAX] = value
    else:
        if value < st[MIN]:
            st[MIN] = value
        if value > st[MAX]:
            st[MAX] = value
    s = st[SUM]
    t = s + value
    if abs(s) >= abs(value):
        st[COMP] += (s - t) + value
    else:
        st[COMP] += (value - t) + s
    st[SUM] = t
    # first/last follow event time, not arrival order; on equal timestamps the earlier arrival is first
    # and the later arrival is last, as a stable sort by time would have it.
    if st[FIRST_TS] is None or ts < st[FIRST_TS]:
        st[FIRST_TS] = ts
        st[FIRST] = value
    if st[LAST_TS] is None or ts >= st[LAST_TS]:
        st[LAST_TS] = ts
        st[LAST] = value


def window_result(
    series: str, window_start: int, st: list[Any], unit: str | None, window_ms: int = WINDOW_MS
) -> Aggregate:
    site, device, point = series.split("/", 2)
    n = st[GOOD]
    agg: Aggregate = {
        "series": series,
        "site": site,
        "device": device,
        "point": point,
        "window_start": window_start,
        "window_end": window_start + window_ms,
        "count": st[COUNT],
        "good_count": n,
        "min": st[MIN] if n else None,
        "max": st[MAX] if n else None,
        "mean": st[MEAN] if n else None,
        "sum": st[SUM] + st[COMP] if n else None,
        "first": st[FIRST] if n else None,
        "last": st[LAST] if n else None,
        "stddev": math.sqrt(max(st[M2], 0.0) / (n - 1)) if n >= 2 else None,
    }
    if unit:
        agg["unit"] = unit
    return agg


@dataclass
class PartitionState:
    watermark: int | None = None  # windows ending at or before it are closed
    max_ts: int | None = None
    offset: int = -1  # last input offset fully applied
    # window_end -> series with an open window ending there
    open: dict[int, set[str]] = field(default_factory=dict)


@dataclass
class Applied:
    """What :meth:`MinuteAggregator.apply` did with one message."""

    skipped: bool = False  # the whole message had been applied before (replay)
    late: list[tuple[BatchReading, int]] = field(default_factory=list)  # reading, window_end it missed
    latest: list[Reading] = field(default_factory=list)  # newest reading per series, for telemetry.latest
    applied: int = 0


@dataclass
class Close:
    series: str
    window_start: int
    aggregate: Aggregate


class MinuteAggregator:
    def __init__(
        self, store: MutableMapping[str, Any], grace_ms: int = 10_000, window_ms: int = WINDOW_MS
    ) -> None:
        if grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        self.store = store
        self.grace_ms = grace_ms
        self.window_ms = window_ms
        self.parts: dict[int, PartitionState] = {}
        self.late_count = 0
        self.closed_count = 0

    # -- state index -------------------------------------------------------------------------------
    def rebuild(self, partitions: Iterable[int] | None = None) -> None:
        """Rebuild the in-memory index from the store (after start-up, recovery or a rebalance)."""
        wanted = None if partitions is None else set(partitions)
        self.parts = {}
        for key, rec in list(self.store.items()):
            if not isinstance(rec, dict):
                continue
            if key.startswith(WM_PREFIX):
                p = int(key[len(WM_PREFIX) :])
                if wanted is not None and p not in wanted:
                    continue
                ps = self._part(p)
                ps.watermark, ps.max_ts, ps.offset = rec.get("wm"), rec.get("mx"), rec.get("o", -1)
            else:
                p = rec.get("p", -1)
                if wanted is not None and p not in wanted:
                    continue
                ps = self._part(p)
                for ws in rec.get("w", {}):
                    ps.open.setdefault(int(ws) + self.window_ms, set()).add(key)

    def _part(self, partition: int) -> PartitionState:
        ps = self.parts.get(partition)
        if ps is None:
            ps = self.parts[partition] = PartitionState()
        return ps

    def watermark(self, partition: int) -> int | None:
        ps = self.parts.get(partition)
        return None if ps is None else ps.watermark

    def open_windows(self, partition: int | None = None) -> int:
        parts = self.parts.values() if partition is None else [self._part(partition)]
        return sum(len(s) for ps in parts for s in ps.open.values())

    # -- step 1 ------------------------------------------------------------------------------------
    def apply(self, partition: int, offset: int, batch: ReadingBatch) -> Applied:
        ps = self._part(partition)
        out = Applied()
        if offset <= ps.offset:
            out.skipped = True
            return out
        wm = ps.watermark
        site, device = batch["site"], batch["device"]
        prefix = f"{site}/{device}/"
        window_ms = self.window_ms
        # Group by series first: one state read and one state write per series per message.
        by_series: dict[str, list[BatchReading]] = {}
        for r in batch["readings"]:
            by_series.setdefault(r["point"], []).append(r)
        max_ts = ps.max_ts
        for point, readings in by_series.items():
            series = prefix + point
            rec = self.store.get(series)
            if rec is None:
                rec = {"o": -1, "p": partition, "lt": None, "u": None, "w": {}}
            elif rec["o"] >= offset:
                continue  # this series was applied before a crash; the rest of the message was not
            windows: dict[str, list[Any]] = rec["w"]
            newest: BatchReading | None = None
            for r in readings:
                ts = r["ts"]
                ws = ts - ts % window_ms
                we = ws + window_ms
                if wm is not None and we <= wm:
                    out.late.append((r, we))
                    continue
                k = str(ws)
                st = windows.get(k)
                if st is None:
                    st = windows[k] = new_window()
                    ps.open.setdefault(we, set()).add(series)
                add_reading(st, ts, r["value"], r["quality"] == "good")
                out.applied += 1
                if max_ts is None or ts > max_ts:
                    max_ts = ts
                if newest is None or ts >= newest["ts"]:
                    newest = r
                if "unit" in r:
                    rec["u"] = r["unit"]
            if newest is not None and (rec["lt"] is None or newest["ts"] >= rec["lt"]):
                rec["lt"] = newest["ts"]
                latest: Reading = {
                    "site": site,
                    "device": device,
                    "point": point,
                    "ts": newest["ts"],
                    "value": newest["value"],
                    "quality": newest["quality"],
                }
                if rec["u"]:
                    latest["unit"] = rec["u"]
                if "status" in newest:
                    latest["status"] = newest["status"]
                out.latest.append(latest)
            rec["o"] = offset
            self.store[series] = rec
        ps.max_ts = max_ts
        self.late_count += len(out.late)
        return out

    # -- step 2 ------------------------------------------------------------------------------------
    def due(self, partition: int, flush_all: bool = False) -> list[Close]:
        """Windows the partition's watermark closes (all open ones when ``flush_all``)."""
        ps = self._part(partition)
        if ps.max_ts is not None:
            cand = ps.max_ts - self.grace_ms
            if ps.watermark is None or cand > ps.watermark:
                ps.watermark = cand
        closes: list[Close] = []
        if not ps.open:
            return closes
        wm = ps.watermark
        ends = sorted(ps.open) if flush_all else sorted(e for e in ps.open if wm is not None and e <= wm)
        for we in ends:
            ws = we - self.window_ms
            k = str(ws)
            for series in sorted(ps.open[we]):
                rec = self.store.get(series)
                st = None if rec is None else rec["w"].get(k)
                if rec is None or st is None:
                    continue
                closes.append(Close(series, ws, window_result(series, ws, st, rec["u"], self.window_ms)))
        if flush_all and ends:
            # An idle flush closes windows that the watermark has not reached yet; move the watermark
            # to their end so that a reading for them arriving later is judged late, like any other.
            last_end = ends[-1]
            if wm is None or last_end > wm:
                ps.watermark = last_end
        return closes

    # -- step 3 ------------------------------------------------------------------------------------
    def finish(self, partition: int, offset: int, closes: list[Close]) -> None:
        ps = self._part(partition)
        touched: dict[str, dict[str, Any]] = {}
        for c in closes:
            rec = touched.get(c.series) or self.store.get(c.series)
            if not rec:
                continue
            rec["w"].pop(str(c.window_start), None)
            touched[c.series] = rec
            we = c.window_start + self.window_ms
            members = ps.open.get(we)
            if members is not None:
                members.discard(c.series)
                if not members:
                    del ps.open[we]
        for series, rec in touched.items():
            self.store[series] = rec
        self.closed_count += len(closes)
        if offset > ps.offset:
            ps.offset = offset
        self.store[f"{WM_PREFIX}{partition}"] = {"wm": ps.watermark, "mx": ps.max_ts, "o": ps.offset}
