"""Event-time 1-minute aggregation: pure logic, no Kafka (docs/semantics.md).

**Clocks per device.** Each device (``site/device``) has its own event-time clock, the newest event time
applied from it, and its own watermark, the clock minus the grace: a reading is late when its window ended
at or before its device's watermark, and a device's windows close when its watermark passes their end.
Devices sharing a partition do not affect each other: a backfill, a replay faster than real time or a clock
running ahead moves only its own device. Readings stamped more than ``max_future`` ahead of the wall clock
are returned as ``future`` and move no clock. A reading whose (series, ts) was already applied to its
window is a duplicate (an MQTT redelivery, an OPC UA session restart) and changes nothing.

The state lives in memory, in plain Python objects, and is made durable by **checkpoints**: the stage calls
:meth:`MinuteAggregator.checkpoint` for a partition every few seconds, writes the records it returns to the
partition's state topic (compacted), and only then acknowledges the input messages handled since the last
checkpoint. Writing state per checkpoint instead of per message is what makes the worker fast: a series
that gets ten readings a second is written once per checkpoint, not ten times.

Records (keys and values are bytes; values are JSON), in this order within a checkpoint:

* per **chunk**, ``site/device#k``: up to :data:`CHUNK_POINTS` series of one device, each with its open
  windows, its unit and the newest event time published to ``telemetry.latest``, plus the last input offset
  applied to the chunk *per input partition* (a device moves when ``telemetry.raw`` gains partitions);
* per **device**, ``\x00dev/site/device``, after its chunks: the device's clock and watermark. It commits the
  device's chunks: a checkpoint cut short leaves an older head, whose clock makes the replay judge every
  reading exactly as the first run did;
* per input partition, ``\x00wm/<partition>``, last: the last input offset fully applied.

After a crash the state is the last checkpoint, and the input is read again from the last committed offset,
which is never past that checkpoint (acks follow checkpoints). Replayed messages are skipped chunk by chunk by
their offsets, so a replay is idempotent even if the crash hit in the middle of writing a checkpoint.

Processing one input message is three steps, split so the stage can make the closed aggregates durable
in Kafka *before* the windows are deleted from the state:

1. :meth:`apply` folds the message's readings into their windows (late and future readings are returned,
   duplicates counted, neither applied);
2. :meth:`due` lists the windows the device's new watermark closes, with their final aggregates;
3. :meth:`finish` deletes those windows and records the message's offset as fully applied.

Devices whose windows are all closed and that stayed quiet leave the state (:meth:`evict`); their clock stays
as a small head record, so that a reading for a window they already closed is still judged late.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.core.records import Aggregate, BatchReading, Reading, ReadingBatch

WINDOW_MS = 60_000
WM_PREFIX = "\x00wm/"
DEV_PREFIX = "\x00dev/"
CHUNK_POINTS = 256  # series per state record: bounds the record size for devices with thousands of points

# Layout of one window's state list (a list: compact in memory and in the checkpoint records). Duplicates:
# PHASE is the sub-second part of the window's first timestamp, SEEN a bitmask of the seconds seen at that
# phase (a device sampling once a second costs one int per window), SEEN_MS a set of other offsets (ms) or
# None. OVF flags the statistics that left the range of a double (readings near ±1.8e308): reported null.
COUNT, GOOD, MEAN, M2, MIN, MAX, SUM, COMP, FIRST_TS, FIRST, LAST_TS, LAST, SEEN, SEEN_MS, OVF, PHASE = range(
    16
)
OVF_MEAN, OVF_M2, OVF_SUM = 1, 2, 4
_isfinite = math.isfinite


def new_window() -> list[Any]:
    return [0, 0, 0.0, 0.0, None, None, 0.0, 0.0, None, None, None, None, 0, None, 0, 0]


def add_reading(st: list[Any], ts: int, value: float, good: bool) -> None:
    """Fold one reading into a window's state.

    Mean and variance by Welford's method (Welford 1962; Knuth TAOCP vol. 2, 4.2.2), the sum with
    Neumaier's compensation so that long windows stay exact to the last bits, like pandas' Kahan sums.
    A statistic that would leave the range of a double keeps its last finite value and is flagged (reported
    null), so the state and the checkpoints stay finite, valid JSON.
    """
    st[COUNT] += 1
    if not good:
        return
    n = st[GOOD] + 1
    st[GOOD] = n
    delta = value - st[MEAN]
    mean = st[MEAN] + delta / n
    m2 = st[M2] + delta * (value - mean)
    s = st[SUM]
    t = s + value
    comp = st[COMP] + ((s - t) + value if abs(s) >= abs(value) else (value - t) + s)
    # One test for all four: x - x is NaN when x is infinite or NaN, i.e. when any term left the range (or
    # their sum did, which the slow path then sorts out term by term).
    x = m2 + t + comp + mean
    if st[OVF] or x - x != 0.0:
        _add_overflowing(st, mean, m2, t, comp)
    else:
        st[MEAN] = mean
        st[M2] = m2
        st[SUM] = t
        st[COMP] = comp
    if n == 1:
        st[MIN] = st[MAX] = value
    else:
        if value < st[MIN]:
            st[MIN] = value
        if value > st[MAX]:
            st[MAX] = value
    # first/last follow event time, not arrival order; on equal timestamps the earlier arrival is first
    # and the later arrival is last, as a stable sort by time would have it.
    if st[FIRST_TS] is None or ts < st[FIRST_TS]:
        st[FIRST_TS] = ts
        st[FIRST] = value
    if st[LAST_TS] is None or ts >= st[LAST_TS]:
        st[LAST_TS] = ts
        st[LAST] = value


def _add_overflowing(st: list[Any], mean: float, m2: float, t: float, comp: float) -> None:
    ovf = st[OVF]
    if ovf & OVF_MEAN or not _isfinite(mean):
        ovf |= OVF_MEAN | OVF_M2  # the variance needs the mean
    else:
        st[MEAN] = mean
    if ovf & OVF_M2 or not _isfinite(m2):
        ovf |= OVF_M2
    else:
        st[M2] = m2
    if ovf & OVF_SUM or not (_isfinite(t) and _isfinite(comp)):
        ovf |= OVF_SUM
    else:
        st[SUM] = t
        st[COMP] = comp
    st[OVF] = ovf


def seen_before(st: list[Any], off: int) -> bool:
    """Whether the window already holds a reading at ``off`` ms from its start; records it if not."""
    d = off - st[PHASE]
    if d >= 0 and d % 1000 == 0:
        bit = 1 << (d // 1000)
        if st[SEEN] & bit:
            return True
        st[SEEN] |= bit
        return False
    ms = st[SEEN_MS]
    if ms is None:
        st[SEEN_MS] = {off}
        return False
    if off in ms:
        return True
    ms.add(off)
    return False


def window_result(
    series: str, window_start: int, st: list[Any], unit: str | None, window_ms: int = WINDOW_MS
) -> Aggregate:
    site, device, point = series.split("/", 2)
    n = st[GOOD]
    ovf = st[OVF]
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
        "mean": st[MEAN] if n and not ovf & OVF_MEAN else None,
        "sum": st[SUM] + st[COMP] if n and not ovf & OVF_SUM else None,
        "first": st[FIRST] if n else None,
        "last": st[LAST] if n else None,
        "stddev": math.sqrt(max(st[M2], 0.0) / (n - 1)) if n >= 2 and not ovf & OVF_M2 else None,
    }
    if agg["sum"] is not None and not _isfinite(agg["sum"]):
        agg["sum"] = st[SUM]  # the compensation term can overflow where the sum itself did not
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

    __slots__ = ("device", "index", "key", "offsets", "series")

    def __init__(self, device: str, index: int) -> None:
        self.device = device
        self.index = index
        self.key = f"{device}#{index}"
        self.offsets: dict[int, int] = {}  # input partition -> last offset applied to these series
        self.series: dict[str, Series] = {}  # point -> state

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "o": {str(p): o for p, o in self.offsets.items()},
                "s": [
                    [point, s.latest_ts, s.unit, [[ws, *st] for ws, st in s.windows.items()]]
                    for point, s in self.series.items()
                ],
            },
            default=sorted,  # the set of sub-second offsets seen
        )


class Device:
    """One device's clock, watermark, chunks and open windows."""

    __slots__ = ("chunks", "key", "mx", "open", "partition", "points", "seq", "wm")

    def __init__(self, key: str, partition: int) -> None:
        self.key = key
        self.partition = partition  # the input partition its messages come from (and its state goes to)
        self.mx: int | None = None  # newest event time applied: the device's clock
        self.wm: int | None = None  # windows ending at or before it are closed
        self.chunks: list[Chunk] = []
        self.points: dict[str, Series] = {}  # point -> state (the hot path's index)
        self.open: dict[int, dict[str, Series]] = {}  # window_end -> series with an open window there
        self.seq = 0  # counts the device's checkpoints: the newest state wins when a device moved

    def head(self) -> bytes:
        self.seq += 1
        return orjson.dumps({"p": self.partition, "mx": self.mx, "wm": self.wm, "q": self.seq})


@dataclass
class PartitionState:
    offset: int = -1  # last input offset fully applied
    devices: OrderedDict[str, Device] = field(default_factory=OrderedDict)  # least recently active first
    retired: dict[str, Device] = field(default_factory=dict)  # evicted: clock and watermark only
    dirty: set[Chunk] = field(default_factory=set)  # changed since the last checkpoint
    heads: set[str] = field(default_factory=set)  # devices whose clock changed since the last checkpoint
    gone: list[bytes] = field(default_factory=list)  # keys of evicted chunks: tombstones at the checkpoint
    changed: bool = False  # the partition record changed since the last checkpoint
    latest: set[Series] = field(default_factory=set)  # series with a newer reading not yet published


@dataclass
class Applied:
    """What :meth:`MinuteAggregator.apply` did with one message."""

    skipped: bool = False  # the whole message had been applied before (replay)
    late: list[tuple[BatchReading, int]] = field(default_factory=list)  # reading, window_end it missed
    future: list[BatchReading] = field(default_factory=list)  # stamped too far ahead of the wall clock
    duplicates: int = 0  # (series, ts) already applied
    applied: int = 0
    clock: int | None = None  # the device's clock and watermark when the message was judged
    watermark: int | None = None


@dataclass
class Close:
    series: str
    window_start: int
    aggregate: Aggregate


class MinuteAggregator:
    def __init__(
        self,
        grace_ms: int = 10_000,
        window_ms: int = WINDOW_MS,
        chunk_points: int = CHUNK_POINTS,
        max_future_ms: int | None = None,
    ) -> None:
        if grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        self.grace_ms = grace_ms
        self.window_ms = window_ms
        self.chunk_points = chunk_points
        self.max_future_ms = max_future_ms
        self.parts: dict[int, PartitionState] = {}
        self.devices: dict[str, Device] = {}  # site/device -> state
        self.series: dict[str, Series] = {}  # site/device/point -> state
        self.late_count = 0
        self.closed_count = 0
        self.duplicate_count = 0

    # -- state -------------------------------------------------------------------------------------
    def _part(self, partition: int) -> PartitionState:
        ps = self.parts.get(partition)
        if ps is None:
            ps = self.parts[partition] = PartitionState()
        return ps

    def _new_series(self, dev: Device, point: str) -> Series:
        chunks = dev.chunks
        if not chunks or len(chunks[-1].series) >= self.chunk_points:
            chunks.append(Chunk(dev.key, len(chunks)))
        chunk = chunks[-1]
        s = Series(f"{dev.key}/{point}", chunk)
        chunk.series[point] = s
        self.series[s.name] = s
        dev.points[point] = s
        return s

    def _device(self, ps: PartitionState, partition: int, key: str) -> Device:
        dev = ps.devices.get(key)
        if dev is not None:
            ps.devices.move_to_end(key)
            return dev
        dev = ps.retired.pop(key, None) or self.devices.get(key)
        if dev is None:
            dev = self.devices[key] = Device(key, partition)
        elif dev.partition != partition:
            # telemetry.raw gained partitions and the device's key now lands here: its state follows it
            # (its chunks keep the offsets applied per partition, so nothing is skipped or applied twice).
            old = self.parts.get(dev.partition)
            if old is not None:
                old.devices.pop(key, None)
                old.retired.pop(key, None)
                old.heads.discard(key)
                old.dirty -= set(dev.chunks)
                # Its records leave the old partition's state (the newer copy, by seq, wins meanwhile).
                old.gone.extend(c.key.encode() for c in dev.chunks)
                old.gone.append((DEV_PREFIX + key).encode())
            dev.partition = partition
            ps.dirty.update(dev.chunks)
        ps.heads.add(key)
        ps.devices[key] = dev
        return dev

    def _forget_device(self, dev: Device) -> None:
        ps = self.parts.get(dev.partition)
        if ps is not None:
            ps.devices.pop(dev.key, None)
            ps.retired.pop(dev.key, None)
            ps.gone.extend(c.key.encode() for c in dev.chunks)
            ps.gone.append((DEV_PREFIX + dev.key).encode())
        for c in dev.chunks:
            for s in c.series.values():
                self.series.pop(s.name, None)
        self.devices.pop(dev.key, None)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions this worker no longer owns (after a rebalance)."""
        for p in set(partitions):
            ps = self.parts.pop(p, None)
            if ps is None:
                continue
            for key in ps.retired:
                self.devices.pop(key, None)
            for dev in ps.devices.values():
                self.devices.pop(dev.key, None)
                for c in dev.chunks:
                    for s in c.series.values():
                        self.series.pop(s.name, None)

    def restore(self, partition: int, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Load a partition's state from its checkpoint records (the last value of each key wins)."""
        self.drop([partition])
        last: dict[bytes, bytes | None] = {}
        for key, value in records:
            last[key] = value
        ps = self._part(partition)
        wm_key = f"{WM_PREFIX}{partition}".encode()
        legacy: tuple[int | None, int | None] = (None, None)  # a partition clock written by older versions
        heads: dict[str, dict[str, Any]] = {}
        chunks: dict[str, list[Chunk]] = {}
        for key, value in last.items():
            if value is None:
                continue
            rec = orjson.loads(value)
            if key == wm_key:
                ps.offset = rec["o"]
                legacy = (rec.get("mx"), rec.get("wm"))
                continue
            if key.startswith(WM_PREFIX.encode()):
                continue
            if key.startswith(DEV_PREFIX.encode()):
                heads[key.decode()[len(DEV_PREFIX) :]] = rec
                continue
            device, index = key.decode().rsplit("#", 1)
            chunk = Chunk(device, int(index))
            o = rec["o"]
            # Older versions kept one offset, of the partition named by "p".
            chunk.offsets = {int(p): v for p, v in o.items()} if isinstance(o, dict) else {rec["p"]: o}
            for point, latest_ts, unit, windows in rec["s"]:
                s = Series(f"{device}/{point}", chunk)
                s.latest_ts, s.unit = latest_ts, unit
                for w in windows:
                    st = w[1:]
                    if len(st) < PHASE + 1:
                        st.extend(new_window()[len(st) :])  # written by an older version
                    if st[SEEN_MS] is not None:
                        st[SEEN_MS] = set(st[SEEN_MS])
                    s.windows[w[0]] = st
                chunk.series[point] = s
            chunks.setdefault(device, []).append(chunk)
        for dkey in sorted(set(heads) | set(chunks)):
            head = heads.get(dkey)
            seq = head.get("q", 0) if head is not None else 0
            known = self.devices.get(dkey)
            if known is not None and known.seq >= seq:
                continue  # a device that moved partitions: this is its older copy
            if known is not None:
                self._forget_device(known)
            dev = Device(dkey, partition)
            dev.seq = seq
            dev.mx, dev.wm = (head["mx"], head["wm"]) if head is not None else legacy
            dev.chunks = sorted(chunks.get(dkey, []), key=lambda c: c.index)
            for c in dev.chunks:
                for point, s in c.series.items():
                    dev.points[point] = s
                    self.series[s.name] = s
                    for ws in s.windows:
                        dev.open.setdefault(ws + self.window_ms, {})[s.name] = s
            self.devices[dkey] = dev
            if dev.chunks:
                ps.devices[dkey] = dev
            else:
                ps.retired[dkey] = dev

    def checkpoint(self, partition: int) -> list[tuple[bytes, bytes | None]]:
        """The records that make the partition's state since the last checkpoint durable."""
        ps = self.parts.get(partition)
        if ps is None or (not ps.dirty and not ps.heads and not ps.changed and not ps.gone):
            return []
        # Per device its chunks in order, then its head; the partition record last. Records of one partition
        # arrive in the order they were sent, so a checkpoint cut short never leaves a device's head newer
        # than its chunks, nor a later chunk newer than an earlier one (new series go to the last chunk).
        out: list[tuple[bytes, bytes | None]] = [(k, None) for k in ps.gone]
        by_device: dict[str, list[Chunk]] = {}
        for c in ps.dirty:
            by_device.setdefault(c.device, []).append(c)
        for key in sorted(set(by_device) | ps.heads):
            dev = ps.devices.get(key) or ps.retired.get(key)
            if dev is None:
                continue
            for c in sorted(by_device.get(key, []), key=lambda c: c.index):
                out.append((c.key.encode(), c.encode()))
            out.append(((DEV_PREFIX + key).encode(), dev.head()))
        ps.dirty.clear()
        ps.heads.clear()
        ps.gone = []
        ps.changed = False
        out.append((f"{WM_PREFIX}{partition}".encode(), orjson.dumps({"o": ps.offset})))
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

    def watermark(self, device: str) -> int | None:
        """The device's watermark (``site/device``): windows ending at or before it are closed."""
        dev = self.devices.get(device)
        return None if dev is None else dev.wm

    def open_windows(self, partition: int | None = None) -> int:
        parts = self.parts.values() if partition is None else [self._part(partition)]
        return sum(len(m) for ps in parts for dev in ps.devices.values() for m in dev.open.values())

    def quiet_devices(self, partition: int) -> list[str]:
        """The partition's devices, least recently active first."""
        ps = self.parts.get(partition)
        return [] if ps is None else list(ps.devices)

    def has_open(self, device: str) -> bool:
        dev = self.devices.get(device)
        return dev is not None and bool(dev.open)

    # -- step 1 ------------------------------------------------------------------------------------
    def apply(self, partition: int, offset: int, batch: ReadingBatch, wall_ms: int | None = None) -> Applied:
        ps = self._part(partition)
        out = Applied()
        if offset <= ps.offset:
            out.skipped = True
            return out
        dev = self._device(ps, partition, f"{batch['site']}/{batch['device']}")
        wm = dev.wm
        out.clock, out.watermark = dev.mx, wm
        future = None if wall_ms is None or self.max_future_ms is None else wall_ms + self.max_future_ms
        window_ms = self.window_ms
        points = dev.points
        open_index = dev.open
        latest = ps.latest
        touched: set[Chunk] = set()
        last_chunk: Chunk | None = None
        skip = False
        mx = dev.mx
        applied = duplicates = 0
        for r in batch["readings"]:
            ts = r["ts"]
            if future is not None and ts > future:
                out.future.append(r)  # moves no clock
                continue
            point = r["point"]
            s = points.get(point)
            if s is None:
                s = self._new_series(dev, point)
            chunk = s.chunk
            if chunk is not last_chunk:
                # Applied before a crash (the rest of the message was not): skip, but let it move the clock
                # as it did then, so the other chunks' readings are judged as they were the first time.
                skip = chunk.offsets.get(partition, -1) >= offset
                if not skip:
                    touched.add(chunk)
                last_chunk = chunk
            if mx is None or ts > mx:
                mx = ts
            if skip:
                continue
            ws = ts - ts % window_ms
            if wm is not None and ws + window_ms <= wm:
                out.late.append((r, ws + window_ms))
                continue
            st = s.windows.get(ws)
            if st is None:
                st = s.windows[ws] = new_window()
                st[PHASE] = (ts - ws) % 1000
                we = ws + window_ms
                members = open_index.get(we)
                if members is None:
                    members = open_index[we] = {}
                members[s.name] = s
            d = ts - ws - st[PHASE]
            if d >= 0 and d % 1000 == 0:  # a whole number of seconds after the first: one bit (inlined)
                bit = 1 << (d // 1000)
                if st[SEEN] & bit:
                    duplicates += 1
                    continue
                st[SEEN] |= bit
            elif seen_before(st, ts - ws):
                duplicates += 1
                continue
            add_reading(st, ts, r["value"], r["quality"] == "good")
            applied += 1
            if "unit" in r:
                s.unit = r["unit"]
            if s.latest_ts is None or ts >= s.latest_ts:
                s.latest_ts = ts
                s.latest = r
                latest.add(s)
        for chunk in touched:
            chunk.offsets[partition] = offset
        ps.dirty.update(touched)
        if mx != dev.mx:
            dev.mx = mx
            ps.heads.add(dev.key)
        out.applied = applied
        out.duplicates = duplicates
        self.duplicate_count += duplicates
        self.late_count += len(out.late)
        return out

    # -- step 2 ------------------------------------------------------------------------------------
    def due(self, partition: int, flush_all: bool = False, device: str | None = None) -> list[Close]:
        """Windows that the watermarks close, of one device or of every device of the partition (all open
        windows when ``flush_all``)."""
        ps = self._part(partition)
        if device is not None:
            dev = ps.devices.get(device)
            devices = [] if dev is None else [dev]
        else:
            devices = sorted(ps.devices.values(), key=lambda d: d.key)
        closes: list[Close] = []
        for dev in devices:
            self._due(ps, dev, flush_all, closes)
        return closes

    def _due(self, ps: PartitionState, dev: Device, flush_all: bool, closes: list[Close]) -> None:
        if dev.mx is not None:
            cand = dev.mx - self.grace_ms
            if dev.wm is None or cand > dev.wm:
                dev.wm = cand
                ps.heads.add(dev.key)
        if not dev.open:
            return
        wm = dev.wm
        ends = sorted(dev.open) if flush_all else sorted(e for e in dev.open if wm is not None and e <= wm)
        for we in ends:
            ws = we - self.window_ms
            members = dev.open[we]
            for name in sorted(members):
                s = members[name]
                st = s.windows.get(ws)
                if st is not None:
                    closes.append(Close(name, ws, window_result(name, ws, st, s.unit, self.window_ms)))
        if flush_all and ends:
            # An idle flush closes windows that the watermark has not reached yet; move the watermark
            # to their end so that a reading for them arriving later is judged late, like any other.
            last_end = ends[-1]
            if wm is None or last_end > wm:
                dev.wm = last_end
                ps.heads.add(dev.key)

    # -- step 3 ------------------------------------------------------------------------------------
    def finish(self, partition: int, offset: int, closes: list[Close]) -> None:
        ps = self._part(partition)
        for c in closes:
            s = self.series.get(c.series)
            if s is None or s.windows.pop(c.window_start, None) is None:
                continue
            ps.dirty.add(s.chunk)
            dev = self.devices.get(s.chunk.device)
            if dev is None:
                continue
            we = c.window_start + self.window_ms
            members = dev.open.get(we)
            if members is not None:
                members.pop(c.series, None)
                if not members:
                    del dev.open[we]
        self.closed_count += len(closes)
        if offset > ps.offset:
            ps.offset = offset
            ps.changed = True

    # -- bounded state -----------------------------------------------------------------------------
    def evict(self, partition: int, device: str) -> bool:
        """Drop a device's series (its windows all closed): its chunk records become tombstones and only
        its head (clock and watermark) stays, in memory and in the state topic.

        False if it still has open windows.
        """
        ps = self.parts.get(partition)
        dev = None if ps is None else ps.devices.get(device)
        if ps is None or dev is None or dev.open or not dev.chunks:
            return False
        for c in dev.chunks:
            ps.dirty.discard(c)
            ps.gone.append(c.key.encode())
            for s in c.series.values():
                self.series.pop(s.name, None)
                ps.latest.discard(s)
        dev.chunks = []
        dev.points = {}
        del ps.devices[device]
        ps.retired[device] = dev
        ps.heads.add(device)
        return True
