"""Event-time 1-minute aggregation: pure logic, no Kafka (docs/semantics.md).

**Clocks per device.** Each device (``site/device``) has its own event-time clock, the newest event time
applied from it, and its own watermark, the clock minus the grace: a reading is late when its window ended
at or before its device's watermark, and a device's windows close when its watermark passes their end.
Devices sharing a partition do not affect each other: a backfill, a replay faster than real time or a clock
running ahead moves only its own device. Readings stamped more than ``max_future`` ahead of the wall clock
are returned as ``future`` and move no clock. A reading whose (series, ts) was already applied to its
window is a duplicate (an MQTT redelivery, an OPC UA session restart) and changes nothing.

**Columns, folded a batch at a time.** Every open window's statistics live in numpy arrays, one per
statistic, one slot per window (:class:`Columns`); series, chunks and devices are small Python objects that
index them. :meth:`MinuteAggregator.apply_partitions` takes a whole consume batch: per message it judges
what the device's clock makes of it (skipped on replay, future, late) and gathers the rest; then one fold
groups the readings by window and updates all windows at once, one reading of each per numpy step, in
arrival order, with exactly the arithmetic of :func:`add_reading` (Welford, Neumaier, first/last by time,
one duplicate bit per second). The result does not depend on how messages were batched: a replay after a
crash gives the same bits. The few windows with many readings in one batch, and any whose statistics
leave the range of a double, finish one reading at a time.

The state is made durable by **checkpoints**: the stage calls
:meth:`MinuteAggregator.checkpoint` for a partition every few seconds, writes the records it returns to the
partition's state topic (compacted), and only then acknowledges the input messages handled since the last
checkpoint. Writing state per checkpoint instead of per message is what makes the worker fast: a series
that gets ten readings a second is written once per checkpoint, not ten times.

Records (keys and values are bytes; values are JSON), in this order within a checkpoint:

* per **chunk**, ``site/device#k``: up to :data:`CHUNK_POINTS` series of one device, each with its open
  windows, its unit and the newest event time published to ``telemetry.latest``, plus the last input offset
  applied to the chunk *per input partition* (a device moves when ``telemetry.raw`` gains partitions); the
  windows' statistics as one array per statistic (earlier versions wrote a list per window: still read);
* per **device**, ``\x00dev/site/device``, after its chunks: the device's clock and watermark. It commits the
  device's chunks: a checkpoint cut short leaves an older head, whose clock makes the replay judge every
  reading exactly as the first run did;
* per input partition, ``\x00wm/<partition>``, last: the last input offset fully applied.

After a crash the state is the last checkpoint, and the input is read again from the last committed offset,
which is never past that checkpoint (acks follow checkpoints). Replayed messages are skipped chunk by chunk by
their offsets, so a replay is idempotent even if the crash hit in the middle of writing a checkpoint.

Processing input is three steps, split so the stage can make the closed aggregates durable in Kafka
*before* the windows are deleted from the state:

1. :meth:`apply_partitions` (:meth:`apply` for one message) folds the readings into their windows (late and
   future readings are returned, duplicates counted, neither applied);
2. :meth:`due` lists the windows the device's new watermark closes, with their final aggregates;
3. :meth:`finish` deletes those windows and records the message's offset as fully applied.

Devices whose windows are all closed and that stayed quiet leave the state (:meth:`evict`); their clock stays
as a small head record, so that a reading for a window they already closed is still judged late.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from pipeline.core.records import Aggregate, BatchReading, Reading, ReadingBatch, Scan

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
C_OVF, C_PHASE = SEEN_MS, OVF  # in a chunk record's arrays, which leave SEEN_MS out
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
    """One series: its open windows (window start -> slot of the columns), unit and index in the arrays."""

    __slots__ = ("chunk", "head", "idx", "name", "unit", "windows")

    def __init__(self, name: str, chunk: Chunk, idx: int) -> None:
        self.name = name
        self.head: tuple[str | None, bytes] | None = None  # (unit, start of its telemetry.latest JSON)
        self.chunk = chunk
        self.idx = idx  # row of the per-series arrays (current window, newest reading)
        self.windows: dict[int, int] = {}
        self.unit: str | None = None


class Chunk:
    """The unit of checkpointing and of replay idempotence: some series of one device."""

    __slots__ = ("device", "index", "key", "offsets", "series")

    def __init__(self, device: str, index: int) -> None:
        self.device = device
        self.index = index
        self.key = f"{device}#{index}"
        self.offsets: dict[int, int] = {}  # input partition -> last offset applied to these series
        self.series: dict[str, Series] = {}  # point -> state


class Layout:
    """A device's list of points as a batch sends it, resolved once: series rows, series and chunks."""

    __slots__ = ("arr", "chunks", "idx", "points", "series", "units")

    def __init__(self, points: list[str], series: list[Series]) -> None:
        self.points = points
        self.series = series
        self.idx = [s.idx for s in series]
        self.arr = np.asarray(self.idx, np.int64)
        self.chunks = list(dict.fromkeys(s.chunk for s in series))
        self.units: list[str | None] | None = None  # the last units applied through it


class Device:
    """One device's clock, watermark, chunks and open windows."""

    __slots__ = ("chunks", "hi", "key", "last", "layouts", "mx", "open", "partition", "points", "seq", "wm")

    def __init__(self, key: str, partition: int) -> None:
        self.key = key
        self.partition = partition  # the input partition its messages come from (and its state goes to)
        self.mx: int | None = None  # newest event time applied: the device's clock
        self.wm: int | None = None  # windows ending at or before it are closed
        self.chunks: list[Chunk] = []
        self.points: dict[str, Series] = {}  # point -> state
        self.open: dict[int, dict[str, Series]] = {}  # window_end -> series with an open window there
        self.seq = 0  # counts the device's checkpoints: the newest state wins when a device moved
        self.layouts: dict[tuple[str, ...], Layout] = {}
        self.last: Layout | None = None  # the layout of its last message
        self.hi: dict[int, int] = {}  # input partition -> highest offset applied to any of its chunks

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


class Applied:
    """What :meth:`MinuteAggregator.apply` did with one message."""

    __slots__ = ("applied", "clock", "duplicates", "future", "late", "skipped", "watermark")

    def __init__(self, skipped: bool = False) -> None:
        self.skipped = skipped  # the whole message had been applied before (replay)
        self.late: list[tuple[BatchReading, int]] = []  # reading, window_end it missed
        self.future: list[BatchReading] = []  # stamped too far ahead of the wall clock
        self.duplicates = 0  # (series, ts) already applied
        self.applied = 0
        self.clock: int | None = None  # the device's clock and watermark when the message was judged
        self.watermark: int | None = None


@dataclass
class Close:
    series: str
    window_start: int
    aggregate: Aggregate


I64 = np.int64
F64 = np.float64
NO_TS_LO = np.iinfo(np.int64).max  # FIRST_TS of a window without good readings
NO_TS_HI = np.iinfo(np.int64).min  # LAST_TS, and the newest time of a series without readings
QUALITY_CODE = {"good": 0, "uncertain": 1, "bad": 2}
QUALITY_NAME = ("good", "uncertain", "bad")
_LATEST_TAIL = tuple(b',"quality":"%s"}' % q.encode() for q in QUALITY_NAME)
FOLD_MAX = 1 << 19  # readings per vectorised fold (the newest-reading key holds a position in 20 bits)
VECTOR_MIN = 8  # fewer windows than this still taking readings: the rest goes one by one (cheaper then)


class Columns:
    """Every open window's statistics, one slot per window, one numpy array per statistic.

    The hot path updates whole batches of windows at once; a slot is taken when a window opens and given
    back when it closes. Sub-second duplicate sets (rare) live in a dict by slot.
    """

    def __init__(self, cap: int = 1024) -> None:
        self.cap = 0
        self.free: list[int] = []
        self.count = np.zeros(0, I64)
        self.good = np.zeros(0, I64)
        self.mean = np.zeros(0, F64)
        self.m2 = np.zeros(0, F64)
        self.min = np.zeros(0, F64)
        self.max = np.zeros(0, F64)
        self.sum = np.zeros(0, F64)
        self.comp = np.zeros(0, F64)
        self.first_ts = np.zeros(0, I64)
        self.first = np.zeros(0, F64)
        self.last_ts = np.zeros(0, I64)
        self.last = np.zeros(0, F64)
        self.seen = np.zeros(0, np.uint64)
        self.ovf = np.zeros(0, I64)
        self.phase = np.zeros(0, I64)
        self.seen_ms: dict[int, set[int]] = {}
        self._grow(cap)

    NAMES = (
        "count",
        "good",
        "mean",
        "m2",
        "min",
        "max",
        "sum",
        "comp",
        "first_ts",
        "first",
        "last_ts",
        "last",
    )

    def _grow(self, cap: int) -> None:
        for name in (*self.NAMES, "seen", "ovf", "phase"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.free.extend(range(cap - 1, self.cap - 1, -1))
        self.cap = cap

    def take_many(self, phases: list[int]) -> list[int]:
        """Slots for new windows, initialised at once."""
        n = len(phases)
        if not n:
            return []  # (free[-0:] would be all of it)
        while len(self.free) < n:
            self._grow(self.cap * 2)
        got = self.free[-n:][::-1]
        del self.free[-n:]
        ix = np.asarray(got, I64)
        for a in (self.count, self.good, self.seen, self.ovf):
            a[ix] = 0
        for b in (self.mean, self.m2, self.sum, self.comp, self.first, self.last):
            b[ix] = 0.0
        self.min[ix], self.max[ix] = np.inf, -np.inf
        self.first_ts[ix], self.last_ts[ix] = NO_TS_LO, NO_TS_HI
        self.phase[ix] = phases
        for i in got:
            self.seen_ms.pop(i, None)
        return got

    def give(self, i: int) -> None:
        self.seen_ms.pop(i, None)
        self.free.append(i)

    def get(self, i: int) -> list[Any]:
        """A window's state as a list in the checkpoint's layout (COUNT ... PHASE)."""
        return self.rows([i])[0]

    def rows(self, slots: list[int]) -> list[list[Any]]:
        if not slots:
            return []
        ix = np.asarray(slots, I64)
        cols = [getattr(self, n)[ix].tolist() for n in self.NAMES]
        seen = self.seen[ix].tolist()
        ovf = self.ovf[ix].tolist()
        phase = self.phase[ix].tolist()
        out = []
        for k, i in enumerate(slots):
            st: list[Any] = [c[k] for c in cols]
            if not st[GOOD]:
                st[MIN] = st[MAX] = st[FIRST_TS] = st[FIRST] = st[LAST_TS] = st[LAST] = None
            st.append(seen[k])
            st.append(self.seen_ms.get(i))
            st.append(ovf[k])
            st.append(phase[k])
            out.append(st)
        return out

    def put(self, i: int, st: list[Any]) -> None:
        """Write a window's state given as a list in the checkpoint's layout."""
        n = st[GOOD]
        self.count[i], self.good[i] = st[COUNT], n
        self.mean[i], self.m2[i], self.sum[i], self.comp[i] = st[MEAN], st[M2], st[SUM], st[COMP]
        self.min[i] = st[MIN] if n else np.inf
        self.max[i] = st[MAX] if n else -np.inf
        self.first_ts[i] = st[FIRST_TS] if n else NO_TS_LO
        self.last_ts[i] = st[LAST_TS] if n else NO_TS_HI
        self.first[i] = st[FIRST] if n else 0.0
        self.last[i] = st[LAST] if n else 0.0
        self.seen[i] = st[SEEN]
        if st[SEEN_MS]:
            self.seen_ms[i] = set(st[SEEN_MS])
        else:
            self.seen_ms.pop(i, None)
        self.ovf[i] = st[OVF]
        self.phase[i] = st[PHASE]


class _Fold:
    """The readings of consecutive messages, gathered for one vectorised fold (arrival order)."""

    __slots__ = ("idx", "n", "qual", "seg", "status", "t_cnt", "t_val", "vals")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.idx: list[np.ndarray] = []  # series rows, per message
        self.t_val: list[int] = []  # times, run-length: a scan with one time is one run
        self.t_cnt: list[int] = []
        self.vals: list[float] = []
        self.qual: list[int] | None = None  # quality codes, once a reading is not good
        self.status: dict[int, Any] = {}  # position -> status of the readings that carry one
        self.seg: list[Applied] = []  # the messages whose readings are here
        self.n = 0

    def add(self, scan: Scan, lay: Layout, keep: list[int] | None) -> int:
        base = self.n
        if keep is None:
            n = len(scan.points)
            self.idx.append(lay.arr)
            if scan.ts0 is not None:
                self.t_val.append(scan.ts0)
                self.t_cnt.append(n)
            else:
                self.t_val.extend(scan.ts)
                self.t_cnt.extend(_ONES[:n] if n <= len(_ONES) else [1] * n)
            self.vals.extend(scan.values)
            if scan.quality is not None or self.qual is not None:
                if self.qual is None:
                    self.qual = [0] * base
                if scan.quality is None:
                    self.qual.extend([0] * n)
                else:
                    self.qual.extend([QUALITY_CODE[q] for q in scan.quality])
            if scan.units is not None and scan.units != lay.units:
                for s, u in zip(lay.series, scan.units, strict=True):
                    if u is not None:
                        s.unit = u
                lay.units = scan.units
            if scan.status is not None:
                for i, stt in enumerate(scan.status):
                    if stt is not None:
                        self.status[base + i] = stt
        else:
            n = len(keep)
            li, ts, vs = lay.idx, scan.ts, scan.values
            self.idx.append(np.asarray([li[i] for i in keep], I64))
            self.t_val.extend([ts[i] for i in keep])
            self.t_cnt.extend([1] * n)
            self.vals.extend([vs[i] for i in keep])
            if scan.quality is not None or self.qual is not None:
                if self.qual is None:
                    self.qual = [0] * base
                q = scan.quality
                self.qual.extend([0] * n if q is None else [QUALITY_CODE[q[i]] for i in keep])
            for k, i in enumerate(keep):
                if scan.units is not None and scan.units[i] is not None:
                    lay.series[i].unit = scan.units[i]
                if scan.status is not None and scan.status[i] is not None:
                    self.status[base + k] = scan.status[i]
        self.n = base + n
        return n


_ONES = [1] * 1024


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
        self.cols = Columns()
        # Per series row: the newest window (its start and slot, for the hot path's one comparison) and the
        # newest reading, until telemetry.latest has it.
        self.rows: list[Series | None] = []
        self.free_rows: list[int] = []
        self.cur_ws = np.zeros(0, I64)
        self.cur_slot = np.zeros(0, I64)
        self.lat_ts = np.zeros(0, I64)
        self.lat_val = np.zeros(0, F64)
        self.lat_q = np.zeros(0, np.int8)
        self.lat_new = np.zeros(0, np.bool_)  # a newer reading not yet published
        self.row_part = np.zeros(0, I64)  # the input partition of the series' device
        self.lat_status: dict[int, Any] = {}
        self.late_count = 0
        self.closed_count = 0
        self.duplicate_count = 0

    # -- state -------------------------------------------------------------------------------------
    def _part(self, partition: int) -> PartitionState:
        ps = self.parts.get(partition)
        if ps is None:
            ps = self.parts[partition] = PartitionState()
        return ps

    def _row(self, s: Series | None) -> int:
        if self.free_rows:
            i = self.free_rows.pop()
            self.rows[i] = s
        else:
            i = len(self.rows)
            self.rows.append(s)
            if i >= len(self.cur_ws):
                cap = max(1024, 2 * len(self.cur_ws))
                for name in ("cur_ws", "cur_slot", "lat_ts", "lat_val", "lat_q", "lat_new", "row_part"):
                    old = getattr(self, name)
                    new = np.zeros(cap, old.dtype)
                    new[: len(old)] = old
                    setattr(self, name, new)
        self.cur_ws[i] = -1
        self.cur_slot[i] = -1
        self.lat_ts[i] = NO_TS_HI
        self.lat_new[i] = False
        self.row_part[i] = -1
        return i

    def _new_series(self, dev: Device, point: str) -> Series:
        chunks = dev.chunks
        if not chunks or len(chunks[-1].series) >= self.chunk_points:
            chunks.append(Chunk(dev.key, len(chunks)))
        chunk = chunks[-1]
        s = Series(f"{dev.key}/{point}", chunk, -1)
        s.idx = self._row(s)
        self.row_part[s.idx] = dev.partition
        chunk.series[point] = s
        self.series[s.name] = s
        dev.points[point] = s
        return s

    def _release(self, s: Series) -> None:
        """A series leaves the memory: its windows' slots and its row are given back."""
        for slot in s.windows.values():
            self.cols.give(slot)
        s.windows = {}
        self.rows[s.idx] = None
        self.lat_status.pop(s.idx, None)
        self.lat_new[s.idx] = False
        self.free_rows.append(s.idx)
        if self.series.get(s.name) is s:
            del self.series[s.name]

    def _open(self, dev: Device, s: Series, ws: int, slot: int) -> None:
        s.windows[ws] = slot
        we = ws + self.window_ms
        members = dev.open.get(we)
        if members is None:
            members = dev.open[we] = {}
        members[s.name] = s
        if ws > self.cur_ws[s.idx]:
            self.cur_ws[s.idx] = ws
            self.cur_slot[s.idx] = slot

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
            for c in dev.chunks:
                for s in c.series.values():
                    self.row_part[s.idx] = partition
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
                self._release(s)
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
                        self._release(s)

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
        chunks: dict[str, list[tuple[Chunk, dict[str, Any]]]] = {}
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
            chunks.setdefault(device, []).append((chunk, rec))
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
            for chunk, rows in sorted(chunks.get(dkey, []), key=lambda c: c[0].index):
                dev.chunks.append(chunk)
                for p, o in chunk.offsets.items():
                    dev.hi[p] = max(dev.hi.get(p, -1), o)
                if "c" in rows:
                    self._restore_columns(dev, chunk, rows, partition)
                    continue
                for point, latest_ts, unit, windows in rows["s"]:  # a list per window: older versions
                    s = self._restored_series(dev, chunk, point, latest_ts, unit, partition)
                    for w in windows:
                        st = w[1:]
                        if len(st) < PHASE + 1:
                            st.extend(new_window()[len(st) :])  # written by an older version
                        slot = self.cols.take_many([0])[0]
                        self.cols.put(slot, st)
                        self._open(dev, s, w[0], slot)
            self.devices[dkey] = dev
            if dev.chunks:
                ps.devices[dkey] = dev
            else:
                ps.retired[dkey] = dev

    def _encode(self, chunk: Chunk) -> bytes:
        """A chunk's record: its series (points, newest times, units, window starts) and its windows'
        statistics as one array per statistic (``c``, in the order COUNT ... PHASE without SEEN_MS; the
        sub-second sets apart in ``ms``): a few numpy gathers, not a list per window."""
        series = list(chunk.series.values())
        wss = [ws for x in series for ws in x.windows]
        slots = np.fromiter((sl for x in series for sl in x.windows.values()), I64, len(wss))
        cols = self.cols
        lat = self.lat_ts[np.fromiter((x.idx for x in series), I64, len(series))].tolist()
        good = cols.good[slots] > 0
        arrays = [
            cols.count[slots],
            cols.good[slots],
            cols.mean[slots],
            cols.m2[slots],
            np.where(good, cols.min[slots], 0.0),  # ±inf stand for "none" in memory; JSON has no inf
            np.where(good, cols.max[slots], 0.0),
            cols.sum[slots],
            cols.comp[slots],
            np.where(good, cols.first_ts[slots], 0),
            cols.first[slots],
            np.where(good, cols.last_ts[slots], 0),
            cols.last[slots],
            cols.seen[slots],
            cols.ovf[slots],
            cols.phase[slots],
        ]
        rec: dict[str, Any] = {
            "o": {str(p): o for p, o in chunk.offsets.items()},
            "p": list(chunk.series),
            "l": [None if t == NO_TS_HI else t for t in lat],
            "u": [x.unit for x in series],
            "n": [len(x.windows) for x in series],
            "ws": wss,
            "c": arrays,
        }
        if cols.seen_ms:
            ms = cols.seen_ms
            rec["ms"] = {str(k): sorted(ms[sl]) for k, sl in enumerate(slots.tolist()) if sl in ms}
        return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)

    def _restore_columns(self, dev: Device, chunk: Chunk, rec: dict[str, Any], partition: int) -> None:
        """A chunk written by :meth:`_encode`."""
        wss: list[int] = rec["ws"]
        cols = self.cols
        slots = cols.take_many([0] * len(wss))
        ix = np.asarray(slots, I64)
        c = rec["c"]
        good = np.asarray(c[GOOD], I64) > 0
        cols.count[ix], cols.good[ix] = c[COUNT], c[GOOD]
        cols.mean[ix], cols.m2[ix], cols.sum[ix], cols.comp[ix] = c[MEAN], c[M2], c[SUM], c[COMP]
        cols.min[ix] = np.where(good, np.asarray(c[MIN], F64), np.inf)
        cols.max[ix] = np.where(good, np.asarray(c[MAX], F64), -np.inf)
        cols.first_ts[ix] = np.where(good, np.asarray(c[FIRST_TS], I64), NO_TS_LO)
        cols.last_ts[ix] = np.where(good, np.asarray(c[LAST_TS], I64), NO_TS_HI)
        cols.first[ix], cols.last[ix] = c[FIRST], c[LAST]
        cols.seen[ix] = np.asarray(c[SEEN], np.uint64)
        cols.ovf[ix], cols.phase[ix] = c[C_OVF], c[C_PHASE]
        for k, offs in rec.get("ms", {}).items():
            cols.seen_ms[slots[int(k)]] = set(offs)
        k = 0
        for point, latest_ts, unit, n in zip(rec["p"], rec["l"], rec["u"], rec["n"], strict=True):
            x = self._restored_series(dev, chunk, point, latest_ts, unit, partition)
            for j in range(k, k + n):
                self._open(dev, x, wss[j], slots[j])
            k += n

    def _restored_series(
        self, dev: Device, chunk: Chunk, point: str, latest_ts: int | None, unit: str | None, partition: int
    ) -> Series:
        x = Series(f"{dev.key}/{point}", chunk, -1)
        x.idx = self._row(x)
        self.row_part[x.idx] = partition
        x.unit = unit
        if latest_ts is not None:
            self.lat_ts[x.idx] = latest_ts
        chunk.series[point] = x
        dev.points[point] = x
        self.series[x.name] = x
        return x

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
                out.append((c.key.encode(), self._encode(c)))
            out.append(((DEV_PREFIX + key).encode(), dev.head()))
        ps.dirty.clear()
        ps.heads.clear()
        ps.gone = []
        ps.changed = False
        out.append((f"{WM_PREFIX}{partition}".encode(), orjson.dumps({"o": ps.offset})))
        return out

    def take_latest(self, partition: int) -> list[Reading]:
        """Newest reading of each series changed since the last call (coalesced for telemetry.latest)."""
        return [orjson.loads(value) for _key, value, _ts in self.latest_records(partition)]

    def latest_records(self, partition: int) -> Iterator[tuple[bytes, bytes, int]]:
        """:meth:`take_latest` as (key, JSON value, ts) records for telemetry.latest, written without a
        dict per reading and without holding them all (a generator): a series' site/device/point/unit part is
        encoded once (at 100,000 series the
        latest values of a checkpoint were a tenth of the worker's time)."""
        n = len(self.rows)
        ix = np.flatnonzero(self.lat_new[:n] & (self.row_part[:n] == partition))
        self.lat_new[ix] = False
        rows, status = self.rows, self.lat_status
        for i, ts, v, q in zip(
            ix.tolist(),
            self.lat_ts[ix].tolist(),
            self.lat_val[ix].tolist(),
            self.lat_q[ix].tolist(),
            strict=True,
        ):
            s = rows[i]
            if s is None:
                continue
            key = s.name.encode()
            if i in status:
                site, device, point = s.name.split("/", 2)
                rd: dict[str, Any] = {"site": site, "device": device, "point": point, "ts": ts, "value": v}
                rd["quality"] = QUALITY_NAME[q]
                if s.unit:
                    rd["unit"] = s.unit
                rd["status"] = status[i]
                yield key, orjson.dumps(rd), ts
                continue
            head = s.head
            if head is None or head[0] != s.unit:
                site, device, point = s.name.split("/", 2)
                head = s.head = (s.unit, orjson.dumps({"site": site, "device": device, "point": point})[:-1])
            tail = (
                _LATEST_TAIL[q]
                if not s.unit
                else b',"quality":"%s","unit":%s}'
                % (
                    QUALITY_NAME[q].encode(),
                    orjson.dumps(s.unit),
                )
            )
            # repr of a finite float is JSON (values are finite by validation)
            yield key, b'%s,"ts":%d,"value":%s%s' % (head[1], ts, repr(v).encode(), tail), ts

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
    def apply(
        self, partition: int, offset: int, batch: ReadingBatch | Scan, wall_ms: int | None = None
    ) -> Applied:
        """One message (see :meth:`apply_many`)."""
        scan = batch if isinstance(batch, Scan) else Scan.of_batch(batch)
        return self.apply_many(partition, [(offset, scan)], wall_ms)[0]

    def _layout(self, dev: Device, points: list[str]) -> Layout:
        get = dev.points.get
        series = [get(p) or self._new_series(dev, p) for p in points]
        lay = Layout(points, series)
        if len(dev.layouts) >= 16:
            dev.layouts.clear()  # a device whose point lists vary: the cache stays small
        dev.layouts[tuple(points)] = lay
        return lay

    def apply_many(
        self, partition: int, items: list[tuple[int, Scan]], wall_ms: int | None = None
    ) -> list[Applied]:
        """Fold the readings of consecutive messages of one partition (offset order) into their windows.

        The same as applying them one by one with :meth:`due` after each: a message's readings are judged
        late against its device's watermark as the messages before it left it, so a window that those
        messages close takes nothing from the later ones. Each window folds its readings in arrival order,
        with the same arithmetic as one at a time, so the aggregates do not depend on how messages were
        batched (a replay after a crash gives the same bits).
        """
        f = _Fold()
        results = self._gather(partition, items, wall_ms, f)
        self._fold_rest(f, [results])
        return results

    def apply_partitions(
        self, runs: dict[int, list[tuple[int, Scan]]], wall_ms: int | None = None
    ) -> dict[int, list[Applied]]:
        """:meth:`apply_many` for several partitions at once: one fold for all (their series differ), so the
        vector steps work on more windows at a time."""
        f = _Fold()
        out = {p: self._gather(p, items, wall_ms, f) for p, items in runs.items()}
        self._fold_rest(f, list(out.values()))
        return out

    def _fold_rest(self, f: _Fold, results: list[list[Applied]]) -> None:
        if f.n:
            self._fold_segment(f)
        for res in results:
            for out in res:
                self.duplicate_count += out.duplicates
                self.late_count += len(out.late)

    def _gather(
        self, partition: int, items: list[tuple[int, Scan]], wall_ms: int | None, f: _Fold
    ) -> list[Applied]:
        """Judge one partition's messages (skipped, future, late, the device clocks) and gather the rest into
        ``f``, folding it whenever it is full."""
        ps = self._part(partition)
        results: list[Applied] = []
        future = None if wall_ms is None or self.max_future_ms is None else wall_ms + self.max_future_ms
        window_ms, grace = self.window_ms, self.grace_ms
        wms: dict[Device, int | None] = {}  # device -> watermark as the messages so far left it
        dirty = ps.dirty
        for offset, scan in items:
            if offset <= ps.offset:
                results.append(Applied(skipped=True))
                continue
            out = Applied()
            results.append(out)
            points = scan.points
            if not points:
                continue
            dev = self._device(ps, partition, scan.site + "/" + scan.device)
            lay = dev.last
            if lay is None or points != lay.points:  # a device usually sends the same points each time
                lay = dev.layouts.get(tuple(points)) or self._layout(dev, points)
                dev.last = lay
            wm = wms.get(dev, dev.wm)
            mx = dev.mx
            out.clock, out.watermark = mx, wm
            ts = scan.ts
            ts0 = scan.ts0
            if ts0 is None:
                top, lo = max(ts), min(ts)
            else:
                top = lo = ts0
            keep: list[int] | None = None  # positions applied, when not all are
            hi_ts: int | None = top
            lo_ts: int | None = lo
            if future is not None and top > future:
                keep = []
                for i, t in enumerate(ts):
                    if t > future:
                        out.future.append(scan.reading(i))  # moves no clock
                    else:
                        keep.append(i)
                hi_ts = max((ts[i] for i in keep), default=None)
                lo_ts = min((ts[i] for i in keep), default=None)
            chunks = lay.chunks
            if offset <= dev.hi.get(partition, -1):
                # Applied before a crash (the rest of the message was not): skip what its chunks hold, but
                # let it move the clock as it did then, so the rest is judged as it was the first time.
                done = {c for c in chunks if c.offsets.get(partition, -1) >= offset}
                if done:
                    chunks = [c for c in chunks if c not in done]
                    series = lay.series
                    keep = [
                        i for i in (range(len(ts)) if keep is None else keep) if series[i].chunk not in done
                    ]
                    lo_ts = min((ts[i] for i in keep), default=None)
            if hi_ts is not None and (mx is None or hi_ts > mx):
                mx = hi_ts
            if wm is not None and lo_ts is not None and lo_ts - lo_ts % window_ms + window_ms <= wm:
                kept = []
                for i in range(len(ts)) if keep is None else keep:
                    we = ts[i] - ts[i] % window_ms + window_ms
                    if we <= wm:
                        out.late.append((scan.reading(i), we))
                    else:
                        kept.append(i)
                keep = kept
            for c in chunks:
                c.offsets[partition] = offset
            dirty.update(chunks)
            if chunks and offset > dev.hi.get(partition, -1):
                dev.hi[partition] = offset
            if mx != dev.mx:
                dev.mx = mx
                ps.heads.add(dev.key)
            wms[dev] = wm if mx is None or (wm is not None and wm >= mx - grace) else mx - grace
            out.applied = f.add(scan, lay, keep)  # less the duplicates, after the fold
            f.seg.append(out)
            if f.n >= FOLD_MAX:
                self._fold_segment(f)
                f.clear()
        return results

    def _fold_segment(self, f: _Fold) -> None:
        dups = self._fold(f)
        if dups is None:
            return
        pos = 0
        for out in f.seg:  # duplicates are counted against the message that carried them
            n = out.applied
            d = int(dups[pos : pos + n].sum())
            out.duplicates, out.applied = d, n - d
            pos += n

    def _fold(self, f: _Fold) -> np.ndarray | None:
        """The vectorised core: readings (in arrival order) into their windows' slots. Returns the
        duplicate mask (by position), or None when there was none."""
        cols = self.cols
        window_ms = self.window_ms
        sidx = np.concatenate(f.idx) if len(f.idx) > 1 else f.idx[0]
        ts = np.repeat(np.asarray(f.t_val, I64), f.t_cnt)
        val = np.asarray(f.vals, F64)
        qual_l, status = f.qual, f.status
        ws = ts - ts % window_ms
        slot = self.cur_slot[sidx]
        miss = self.cur_ws[sidx] != ws
        missed = bool(miss.any())
        if missed:
            # A window other than the series' newest: found or opened one by one per (series, window).
            mi = np.flatnonzero(miss)
            keys = sidx[mi] * (1 << 31) + ws[mi] // window_ms
            uk, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            found: list[int] = []
            opening: list[tuple[int, Series, int]] = []  # position in found, series, window start
            phases: list[int] = []
            rows = self.rows
            mil = mi.tolist()
            for j, (k, fi) in enumerate(zip(uk.tolist(), first.tolist(), strict=True)):
                r, wn = divmod(k, 1 << 31)
                w = wn * window_ms
                s = rows[r]
                assert s is not None
                sl = s.windows.get(w)
                if sl is None:
                    opening.append((j, s, w))
                    phases.append((int(ts[mil[fi]]) - w) % 1000)  # the first reading fixes the phase
                    sl = -1
                found.append(sl)
            if opening:
                devices = self.devices
                for (j, s, w), sl in zip(opening, cols.take_many(phases), strict=True):
                    self._open(devices[s.chunk.device], s, w, sl)
                    found[j] = sl
            slot[mi] = np.asarray(found, I64)[inv.ravel()]
        n = len(ts)
        # Duplicates: a reading a whole number of seconds after its window's phase is one bit of SEEN;
        # others go through the window's set. Grouped by slot, arrival order kept.
        order = np.argsort(slot, kind="stable")
        s_slot = slot[order]
        s_ts = ts[order]
        s_ws = ws[order]
        d = s_ts - s_ws - cols.phase[s_slot]
        regular = (d >= 0) & (d % 1000 == 0) & (d < 64_000)
        dup_s = np.zeros(n, np.bool_)
        allreg = bool(regular.all())
        r_at = None if allreg else np.flatnonzero(regular)
        r_slot = s_slot if r_at is None else s_slot[r_at]
        if len(r_slot):
            r_bits = np.left_shift(np.uint64(1), ((d if r_at is None else d[r_at]) // 1000).astype(np.uint64))
            r_starts = np.flatnonzero(np.concatenate(([True], r_slot[1:] != r_slot[:-1])))
            r_sizes = np.diff(np.append(r_starts, len(r_slot)))
            gslot = r_slot[r_starts]
            seen = cols.seen[gslot]
            r_dup = np.zeros(len(r_slot), np.bool_)
            if r_sizes.max() == 1:
                r_dup = (seen & r_bits) != 0
                seen |= r_bits
            else:
                # Across windows at once, one reading of each per step, in arrival order.
                by = np.argsort(-r_sizes, kind="stable")
                g_start, g_size = r_starts[by], r_sizes[by]
                seen = seen[by]
                neg = -g_size
                for k in range(int(g_size[0])):
                    m = int(np.searchsorted(neg, -k, side="left"))
                    at = g_start[:m] + k
                    b = r_bits[at]
                    sm = seen[:m]
                    r_dup[at] = (sm & b) != 0
                    sm |= b
                gslot = gslot[by]
            cols.seen[gslot] = seen
            if r_at is None:
                dup_s = r_dup
            else:
                dup_s[r_at] = r_dup
        if r_at is not None:
            # Readings off the phase of their window: through its set of offsets, one by one.
            seen_ms = cols.seen_ms
            for k, sl, off in zip(
                np.flatnonzero(~regular).tolist(),
                s_slot[~regular].tolist(),
                (s_ts - s_ws)[~regular].tolist(),
                strict=True,
            ):
                ms = seen_ms.get(sl)
                if ms is None:
                    seen_ms[sl] = {off}
                elif off in ms:
                    dup_s[k] = True
                else:
                    ms.add(off)
        anydup = bool(dup_s.any())
        if anydup:
            fresh = ~dup_s
            order, s_slot, s_ts = order[fresh], s_slot[fresh], s_ts[fresh]
        s_val = val[order]
        s_good = None if qual_l is None else np.asarray(qual_l, np.int8)[order] == 0
        n = len(order)
        if n:
            # count: every reading applied; the statistics: the good ones.
            starts = np.flatnonzero(np.concatenate(([True], s_slot[1:] != s_slot[:-1])))
            gslot = s_slot[starts]
            cols.count[gslot] += np.diff(np.append(starts, n))
            if s_good is None:
                self._stats(s_slot, s_ts, s_val)
            elif s_good.any():
                self._stats(s_slot[s_good], s_ts[s_good], s_val[s_good])
            # Newest reading per series (ties: the later arrival), for telemetry.latest.
            s_sidx = sidx[order]
            key = (s_ts << 20) | order  # time, then arrival (a fold takes at most 2**20 readings)
            best = np.maximum.reduceat(key, starts)
            g_sidx = s_sidx[starts]
            if missed:  # then a series can have readings in two windows
                u, inv = np.unique(g_sidx, return_inverse=True)
                if len(u) != len(g_sidx):
                    top = np.full(len(u), np.iinfo(np.int64).min, I64)
                    np.maximum.at(top, inv.ravel(), best)
                    g_sidx, best = u, top
            b_ts = best >> 20
            newer = b_ts >= self.lat_ts[g_sidx]
            if newer.any():
                g_sidx, b_pos = g_sidx[newer], best[newer] & ((1 << 20) - 1)
                self.lat_ts[g_sidx] = b_ts[newer]
                self.lat_val[g_sidx] = val[b_pos]
                self.lat_q[g_sidx] = 0 if qual_l is None else np.asarray(qual_l, np.int8)[b_pos]
                if status or self.lat_status:
                    for r, p in zip(g_sidx.tolist(), b_pos.tolist(), strict=True):
                        stt = status.get(p)
                        if stt is None:
                            self.lat_status.pop(r, None)
                        else:
                            self.lat_status[r] = stt
                self.lat_new[g_sidx] = True
        if not anydup:
            return None
        dup = np.zeros(len(ts), np.bool_)
        dup[np.argsort(slot, kind="stable")[dup_s]] = True
        return dup

    def _stats(self, s_slot: np.ndarray, s_ts: np.ndarray, s_val: np.ndarray) -> None:
        """Welford mean/M2, Neumaier sum, min/max and first/last of good readings grouped by slot (arrival
        order within a slot): the arithmetic of :func:`add_reading`, across windows at once."""
        cols = self.cols
        n = len(s_slot)
        starts = np.flatnonzero(np.concatenate(([True], s_slot[1:] != s_slot[:-1])))
        sizes = np.diff(np.append(starts, n))
        gslot = s_slot[starts]
        ovf = cols.ovf[gslot] != 0
        by = np.argsort(-sizes, kind="stable")
        g_start, g_size, g_slot = starts[by], sizes[by], gslot[by]
        ovf = ovf[by]
        w_n = cols.good[g_slot]
        w_mean, w_m2 = cols.mean[g_slot], cols.m2[g_slot]
        w_s, w_c = cols.sum[g_slot], cols.comp[g_slot]
        w_min, w_max = cols.min[g_slot], cols.max[g_slot]
        w_fts, w_first = cols.first_ts[g_slot], cols.first[g_slot]
        w_lts, w_last = cols.last_ts[g_slot], cols.last[g_slot]
        neg = -g_size
        top = int(g_size[0])
        k = 0
        with np.errstate(over="ignore", invalid="ignore"):  # overflows are found below and redone
            while k < top:
                m = int(np.searchsorted(neg, -k, side="left"))
                if m < VECTOR_MIN and k:
                    break
                at = g_start[:m] + k
                v = s_val[at]
                t = s_ts[at]
                nn = w_n[:m]
                nn += 1
                mean0 = w_mean[:m]
                delta = v - mean0
                mean = mean0 + delta / nn
                w_m2[:m] += delta * (v - mean)
                w_mean[:m] = mean
                s0 = w_s[:m]
                tt = s0 + v
                w_c[:m] += np.where(np.abs(s0) >= np.abs(v), (s0 - tt) + v, (v - tt) + s0)
                w_s[:m] = tt
                np.minimum(w_min[:m], v, out=w_min[:m])
                np.maximum(w_max[:m], v, out=w_max[:m])
                up = t < w_fts[:m]
                w_fts[:m] = np.where(up, t, w_fts[:m])
                w_first[:m] = np.where(up, v, w_first[:m])
                up = t >= w_lts[:m]
                w_lts[:m] = np.where(up, t, w_lts[:m])
                w_last[:m] = np.where(up, v, w_last[:m])
                k += 1
            bad = ovf | ~np.isfinite(w_mean + w_m2 + w_s + w_c)
        # Overflowed (now or before) and the long tail of the few windows with many readings: one by one.
        slow = np.flatnonzero(bad | (g_size > k))
        for g in slow.tolist():
            sl = int(g_slot[g])
            if bad[g]:
                st = cols.get(sl)
                begin = 0
            else:
                st = cols.get(sl)
                st[GOOD], st[MEAN], st[M2], st[SUM], st[COMP] = (
                    int(w_n[g]),
                    float(w_mean[g]),
                    float(w_m2[g]),
                    float(w_s[g]),
                    float(w_c[g]),
                )
                if st[GOOD]:
                    st[MIN], st[MAX] = float(w_min[g]), float(w_max[g])
                    st[FIRST_TS], st[FIRST], st[LAST_TS], st[LAST] = (
                        int(w_fts[g]),
                        float(w_first[g]),
                        int(w_lts[g]),
                        float(w_last[g]),
                    )
                begin = k
            a = int(g_start[g])
            count = st[COUNT]
            for j in range(a + begin, a + int(g_size[g])):
                add_reading(st, int(s_ts[j]), float(s_val[j]), True)
            st[COUNT] = count
            w_n[g], w_mean[g], w_m2[g], w_s[g], w_c[g] = st[GOOD], st[MEAN], st[M2], st[SUM], st[COMP]
            if st[GOOD]:
                w_min[g], w_max[g] = st[MIN], st[MAX]
                w_fts[g], w_first[g], w_lts[g], w_last[g] = st[FIRST_TS], st[FIRST], st[LAST_TS], st[LAST]
            cols.ovf[sl] = st[OVF]
        cols.good[g_slot] = w_n
        cols.mean[g_slot], cols.m2[g_slot] = w_mean, w_m2
        cols.sum[g_slot], cols.comp[g_slot] = w_s, w_c
        cols.min[g_slot], cols.max[g_slot] = w_min, w_max
        cols.first_ts[g_slot], cols.first[g_slot] = w_fts, w_first
        cols.last_ts[g_slot], cols.last[g_slot] = w_lts, w_last

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
        found: list[tuple[Series, int, int]] = []
        for dev in devices:
            self._due(ps, dev, flush_all, found)
        return self._results(found)

    def _results(self, found: list[tuple[Series, int, int]]) -> list[Close]:
        if not found:
            return []
        states = self.cols.rows([slot for _, _, slot in found])
        return [
            Close(s.name, ws, window_result(s.name, ws, st, s.unit, self.window_ms))
            for (s, ws, _), st in zip(found, states, strict=True)
        ]

    def _due(
        self, ps: PartitionState, dev: Device, flush_all: bool, found: list[tuple[Series, int, int]]
    ) -> None:
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
                slot = s.windows.get(ws)
                if slot is not None:
                    found.append((s, ws, slot))
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
            if s is None:
                continue
            slot = s.windows.pop(c.window_start, None)
            if slot is None:
                continue
            self.cols.give(slot)
            if self.cur_slot[s.idx] == slot:
                self.cur_ws[s.idx] = -1
                self.cur_slot[s.idx] = -1
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
                self._release(s)
        dev.chunks = []
        dev.points = {}
        dev.layouts = {}
        dev.last = None
        dev.hi = {}
        del ps.devices[device]
        ps.retired[device] = dev
        ps.heads.add(device)
        return True
