"""Event-time 1-minute aggregation: pure logic, no Kafka (docs/semantics.md).

The state lives in memory, in plain Python objects, and is made durable by **checkpoints**: the stage calls
:meth:`MinuteAggregator.checkpoint` for a partition every few seconds, writes the records it returns to the
partition's state topic (compacted), and only then acknowledges the input messages handled since the last
checkpoint. Writing state per checkpoint instead of per message is what makes the worker fast: a series
that gets ten readings a second is written once per checkpoint, not ten times.

Records (keys and values are bytes; values are JSON):

* one record per **chunk**, ``site/device#k``: up to :data:`CHUNK_POINTS` series of one device, each with its
  open windows, its unit and the newest event time published to ``telemetry.latest``, plus the last input
  offset applied to the chunk. A device's series share records (one write per device, not per series), and a
  device with thousands of points is split so no record grows without bound (docs/semantics.md);
* one record per input partition, ``\x00wm/<partition>``: the event-time watermark, the highest event time
  seen and the last input offset fully applied.

After a crash the state is the last checkpoint, and the input is read again from the last committed offset,
which is never past that checkpoint (acks follow checkpoints). Replayed messages are skipped chunk by chunk by
their offsets, so a replay is idempotent even if the crash hit in the middle of writing a checkpoint.

Processing one input message is three steps, split so the stage can make the closed aggregates durable
in Kafka *before* the windows are deleted from the state:

1. :meth:`apply` folds the message's readings into their windows (late ones are returned, not applied);
2. :meth:`due` lists the windows the new watermark closes, with their final aggregates;
3. :meth:`finish` deletes those windows and records the message's offset as fully applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.core.records import Aggregate, BatchReading, Reading, ReadingBatch

WINDOW_MS = 60_000
WM_PREFIX = "\x00wm/"
CHUNK_POINTS = 256  # series per state record: bounds the record size for devices with thousands of points

# Layout of one window's state list (a list: compact in memory and in the checkpoint records).
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


class Series:
    """One series' state: its open windows (window start -> state list), unit and newest published time."""

    __slots__ = ("chunk", "latest", "latest_ts", "name", "unit", "windows")

    def __init__(self, name: str, chunk: Chunk) -> None:
        self.name = name
        self.chunk = chunk
        self.windows: dict[int, list[Any]] = {}
        self.unit: str | None = None
        self.latest_ts: int | None = None  # newest event time seen (published or about to be)
        self.latest: BatchReading | None = None  # that reading, until it is published


class Chunk:
    """The unit of checkpointing and of replay idempotence: some series of one device."""

    __slots__ = ("device", "index", "key", "offset", "partition", "series")

    def __init__(self, device: str, index: int, partition: int) -> None:
        self.device = device
        self.index = index
        self.key = f"{device}#{index}"
        self.partition = partition
        self.offset = -1  # last input offset applied to these series
        self.series: dict[str, Series] = {}  # point -> state

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "p": self.partition,
                "o": self.offset,
                "s": [
                    [point, s.latest_ts, s.unit, [[ws, *st] for ws, st in s.windows.items()]]
                    for point, s in self.series.items()
                ],
            }
        )


@dataclass
class PartitionState:
    watermark: int | None = None  # windows ending at or before it are closed
    max_ts: int | None = None
    offset: int = -1  # last input offset fully applied
    # window_end -> series with an open window ending there
    open: dict[int, dict[str, Series]] = field(default_factory=dict)
    dirty: set[Chunk] = field(default_factory=set)  # changed since the last checkpoint
    changed: bool = False  # the partition record changed since the last checkpoint
    latest: set[Series] = field(default_factory=set)  # series with a newer reading not yet published


@dataclass
class Applied:
    """What :meth:`MinuteAggregator.apply` did with one message."""

    skipped: bool = False  # the whole message had been applied before (replay)
    late: list[tuple[BatchReading, int]] = field(default_factory=list)  # reading, window_end it missed
    applied: int = 0


@dataclass
class Close:
    series: str
    window_start: int
    aggregate: Aggregate


class MinuteAggregator:
    def __init__(
        self, grace_ms: int = 10_000, window_ms: int = WINDOW_MS, chunk_points: int = CHUNK_POINTS
    ) -> None:
        if grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        self.grace_ms = grace_ms
        self.window_ms = window_ms
        self.chunk_points = chunk_points
        self.parts: dict[int, PartitionState] = {}
        self.series: dict[str, Series] = {}  # site/device/point -> state
        self.points: dict[str, dict[str, Series]] = {}  # site/device -> point -> state (the hot path's index)
        self.devices: dict[str, list[Chunk]] = {}  # site/device -> its chunks, in order
        self.late_count = 0
        self.closed_count = 0

    # -- state -------------------------------------------------------------------------------------
    def _part(self, partition: int) -> PartitionState:
        ps = self.parts.get(partition)
        if ps is None:
            ps = self.parts[partition] = PartitionState()
        return ps

    def _new_series(self, device: str, point: str, partition: int) -> Series:
        chunks = self.devices.setdefault(device, [])
        if not chunks or len(chunks[-1].series) >= self.chunk_points:
            chunks.append(Chunk(device, len(chunks), partition))
        chunk = chunks[-1]
        s = Series(f"{device}/{point}", chunk)
        chunk.series[point] = s
        self.series[s.name] = s
        self.points.setdefault(device, {})[point] = s
        return s

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions this worker no longer owns (after a rebalance)."""
        gone = set(partitions)
        for p in gone:
            self.parts.pop(p, None)
        for device, chunks in list(self.devices.items()):
            if any(c.partition in gone for c in chunks):
                for c in chunks:
                    for s in c.series.values():
                        self.series.pop(s.name, None)
                del self.devices[device]
                self.points.pop(device, None)

    def restore(self, partition: int, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Load a partition's state from its checkpoint records (the last value of each key wins)."""
        self.drop([partition])
        last: dict[bytes, bytes | None] = {}
        for key, value in records:
            last[key] = value
        ps = self._part(partition)
        wm_key = f"{WM_PREFIX}{partition}".encode()
        for key, value in last.items():
            if value is None:
                continue
            rec = orjson.loads(value)
            if key == wm_key:
                ps.watermark, ps.max_ts, ps.offset = rec["wm"], rec["mx"], rec["o"]
                continue
            if key.startswith(WM_PREFIX.encode()):
                continue
            device, index = key.decode().rsplit("#", 1)
            chunk = Chunk(device, int(index), partition)
            chunk.offset = rec["o"]
            for point, latest_ts, unit, windows in rec["s"]:
                s = Series(f"{device}/{point}", chunk)
                s.latest_ts, s.unit = latest_ts, unit
                for w in windows:
                    ws = w[0]
                    s.windows[ws] = w[1:]
                    ps.open.setdefault(ws + self.window_ms, {})[s.name] = s
                chunk.series[point] = s
                self.series[s.name] = s
                self.points.setdefault(device, {})[point] = s
            chunks = self.devices.setdefault(device, [])
            chunks.append(chunk)
        for chunks in self.devices.values():
            chunks.sort(key=lambda c: c.index)

    def checkpoint(self, partition: int) -> list[tuple[bytes, bytes]]:
        """The records that make the partition's state since the last checkpoint durable."""
        ps = self.parts.get(partition)
        if ps is None or (not ps.dirty and not ps.changed):
            return []
        # In chunk order, and the partition record last: records of one partition arrive in the order they
        # were sent, so if a crash cuts a checkpoint short, a device's later chunk is never newer than an
        # earlier one (new series go to a device's last chunk; see _new_series).
        dirty = sorted((c for c in ps.dirty if c.partition == partition), key=lambda c: (c.device, c.index))
        out = [(c.key.encode(), c.encode()) for c in dirty]
        ps.dirty.clear()
        ps.changed = False
        wm = {"wm": ps.watermark, "mx": ps.max_ts, "o": ps.offset}
        out.append((f"{WM_PREFIX}{partition}".encode(), orjson.dumps(wm)))
        return out

    def take_latest(self, partition: int) -> list[Reading]:
        """Newest reading of each series changed since the last call (coalesced for telemetry.latest)."""
        ps = self.parts.get(partition)
        if ps is None or not ps.latest:
            return []
        out: list[Reading] = []
        for s in ps.latest:
            r = s.latest
            if r is None:
                continue
            site, device, point = s.name.split("/", 2)
            rd: Reading = {
                "site": site,
                "device": device,
                "point": point,
                "ts": r["ts"],
                "value": r["value"],
                "quality": r["quality"],
            }
            if s.unit:
                rd["unit"] = s.unit
            if "status" in r:
                rd["status"] = r["status"]
            out.append(rd)
            s.latest = None
        ps.latest = set()
        return out

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
        dkey = f"{site}/{device}"
        window_ms = self.window_ms
        points = self.points.get(dkey) or {}
        open_index = ps.open
        latest = ps.latest
        touched: set[Chunk] = set()
        last_chunk: Chunk | None = None
        max_ts = ps.max_ts
        applied = 0
        for r in batch["readings"]:
            point = r["point"]
            s = points.get(point)
            if s is None:
                s = self._new_series(dkey, point, partition)
                points = self.points[dkey]
            chunk = s.chunk
            if chunk is not last_chunk:
                if chunk.offset >= offset:
                    continue  # this chunk was applied before a crash; the rest of the message was not
                touched.add(chunk)
                last_chunk = chunk
            ts = r["ts"]
            ws = ts - ts % window_ms
            if wm is not None and ws + window_ms <= wm:
                out.late.append((r, ws + window_ms))
                continue
            st = s.windows.get(ws)
            if st is None:
                st = s.windows[ws] = new_window()
                we = ws + window_ms
                members = open_index.get(we)
                if members is None:
                    members = open_index[we] = {}
                members[s.name] = s
            add_reading(st, ts, r["value"], r["quality"] == "good")
            applied += 1
            if max_ts is None or ts > max_ts:
                max_ts = ts
            if "unit" in r:
                s.unit = r["unit"]
            if s.latest_ts is None or ts >= s.latest_ts:
                s.latest_ts = ts
                s.latest = r
                latest.add(s)
        for chunk in touched:
            chunk.offset = offset
            chunk.partition = partition
        ps.dirty.update(touched)
        if max_ts != ps.max_ts:
            ps.max_ts = max_ts
            ps.changed = True
        out.applied = applied
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
                ps.changed = True
        closes: list[Close] = []
        if not ps.open:
            return closes
        wm = ps.watermark
        ends = sorted(ps.open) if flush_all else sorted(e for e in ps.open if wm is not None and e <= wm)
        for we in ends:
            ws = we - self.window_ms
            for name in sorted(ps.open[we]):
                s = ps.open[we][name]
                st = s.windows.get(ws)
                if st is not None:
                    closes.append(Close(name, ws, window_result(name, ws, st, s.unit, self.window_ms)))
        if flush_all and ends:
            # An idle flush closes windows that the watermark has not reached yet; move the watermark
            # to their end so that a reading for them arriving later is judged late, like any other.
            last_end = ends[-1]
            if wm is None or last_end > wm:
                ps.watermark = last_end
                ps.changed = True
        return closes

    # -- step 3 ------------------------------------------------------------------------------------
    def finish(self, partition: int, offset: int, closes: list[Close]) -> None:
        ps = self._part(partition)
        for c in closes:
            s = self.series.get(c.series)
            if s is None or s.windows.pop(c.window_start, None) is None:
                continue
            ps.dirty.add(s.chunk)
            we = c.window_start + self.window_ms
            members = ps.open.get(we)
            if members is not None:
                members.pop(c.series, None)
                if not members:
                    del ps.open[we]
        self.closed_count += len(closes)
        if offset > ps.offset:
            ps.offset = offset
            ps.changed = True
