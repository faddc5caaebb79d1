"""Loop KPIs in the stream: routing, alignment, event-time KPI windows (pure logic, no Kafka).

The aggregation stage hands every batch of a device that carries loop tags to :class:`LoopRouter`, which picks
the loops' PV/SP/OP/MODE readings out (one dict lookup per batch for other devices) and produces one
``loops.samples`` message per loop, keyed by the loop id, so that all of a loop's samples meet in one
partition. There :class:`LoopEngine` keeps each loop's state in any ``MutableMapping`` — a
:class:`pipeline.stages.state.PartitionedStore` in the worker, a dict in unit tests — laid out so that
replaying ``loops.samples`` is idempotent and no record grows with the window:

* ``<loop>`` (head, small, rewritten per message): last input offset applied (``o``, with its partition
  ``p``), the loop's newest event time ``mx``, the end of the last closed window ``ct``, the sample buckets in
  use ``b``, and per source partition of ``telemetry.raw`` the last source offset routed (``src``), which
  drops the duplicates a restarted aggregation stage routes again;
* ``<loop>\\x00b<start>`` (bucket): the raw samples of a slice of event time (about 50 samples per tag, never
  more than a minute), with the last input offset applied to it;
* ``<loop>\\x00h`` (horizon, written once per closed window): the analysis horizon H as float32 arrays
  (base64), the last sample of each tag before the next window (for the hold), the KPI calculators' state
  (Hägglund detector, valve filter) and ``ct``. Writing it is the commit point of a window.

Closing windows is three steps, like :mod:`pipeline.stages.windows`, so that the LoopKpi records are durable
in Kafka before the state moves on: :meth:`LoopEngine.due` gathers what the due windows need (a
:class:`CloseJob`), :func:`run_job` computes their KPIs (pure, CPU-heavy numpy work), and
:meth:`LoopEngine.finish` writes the horizon record, then drops the used buckets and updates the head. A crash
anywhere in between leaves state from which a replay reaches the same records.

Windows follow the loop's own event time: ``[start, start + window)`` aligned to the epoch, closed when the
loop's newest sample is ``grace`` past the window's end, or by an idle flush (wall clock, while the loop's
partition is drained). A window without any sample of the loop gives no record; the horizon then holds invalid
samples for it. A sample older than the end of the last closed window is late: returned to be dead-lettered.
"""

from __future__ import annotations

import base64
import bisect
import logging
import math
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

from pipeline.core import codec
from pipeline.core.records import ReadingBatch
from pipeline.kpi import LoopConfig, LoopWindow, align, compute_all

log = logging.getLogger("plantstream.loops")

TAGS = ("pv", "sp", "op", "mode")
PV, SP, OP, MODE = range(4)
BUCKET_TARGET_SAMPLES = 50  # per tag, per bucket record
BUCKET_MAX_MS = 60_000
STATE_VERSION = 1
HORIZON_SUFFIX = "\x00h"
BUCKET_INFIX = "\x00b"

# One routed sample: [tag index, event time ms, value, 1 if good quality else 0].
Sample = list[Any]
F32 = np.dtype("<f4")


# -- records -----------------------------------------------------------------------------------------------


class KpiResultDict(TypedDict):
    value: float | None
    status: str
    coverage: float | None
    horizon_s: float | None
    reason: str | None
    extras: dict[str, Any]


class LoopKpi(TypedDict):
    """One record per loop per KPI window on ``loops.kpi`` (schemas/loop-kpi.json)."""

    loop: str
    window_start: int
    window_end: int
    ts_s: float
    samples: int
    horizon_start: int
    horizon_s: float
    closed_by: Literal["watermark", "idle"]
    kpis: dict[str, KpiResultDict]


# -- configuration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopDef:
    """What the stream needs to know about one loop (built from a topology ``Loop``)."""

    id: str
    series: Mapping[str, str]  # tag -> series id (no "mode" key: always in the first normal mode)
    ts_ms: int
    window_ms: int
    horizon_ms: int
    grace_ms: int
    idle_ms: int
    cfg: LoopConfig
    mode_names: Mapping[float, str] = field(default_factory=dict)  # MODE code -> name
    default_mode: str = "AUTO"  # the mode of a loop without a MODE series
    hold_ms: Mapping[str, int] = field(default_factory=dict)  # per-tag hold beyond the default 3·ts

    @property
    def pv_lo(self) -> float:
        return self.cfg.pv_lo

    @property
    def op_lo(self) -> float:
        return self.cfg.op_lo

    @property
    def capacity(self) -> int:
        """Samples the horizon keeps."""
        return max(1, self.horizon_ms // self.ts_ms)

    @property
    def bucket_ms(self) -> int:
        """A divisor of the window of about BUCKET_TARGET_SAMPLES samples, at most a minute."""
        target = max(self.ts_ms, min(BUCKET_MAX_MS, BUCKET_TARGET_SAMPLES * self.ts_ms))
        n = max(1, math.ceil(self.window_ms / target))
        while self.window_ms % n:
            n += 1
        return self.window_ms // n

    @classmethod
    def from_topology(cls, loop: Any) -> LoopDef:
        """From a ``pipeline.topology.Loop``."""
        cfg = loop.kpi_config()
        return cls(
            id=loop.id,
            series=loop.series(),
            ts_ms=loop.ts,
            window_ms=loop.window,
            horizon_ms=loop.horizon_ms,
            grace_ms=loop.grace,
            idle_ms=loop.idle_timeout,
            cfg=cfg,
            mode_names={float(code): name for name, code in loop.mode_codes.items()},
            default_mode=loop.normal_modes[0],
            hold_ms=loop.hold.items(),
        )


# -- routing -----------------------------------------------------------------------------------------------


class LoopRouter:
    """Picks the loops' readings out of device batches.

    ``devices`` maps (site, device) to the device's loop points; a batch of any other device costs the
    caller one dict lookup. A series may belong to several loops (a cascade master's OP is its slave's SP).
    """

    def __init__(self, loops: Iterable[LoopDef]) -> None:
        self.devices: dict[tuple[str, str], dict[str, list[tuple[str, int]]]] = {}
        for d in loops:
            for tag, series in d.series.items():
                site, device, point = series.split("/", 2)
                self.devices.setdefault((site, device), {}).setdefault(point, []).append(
                    (d.id, TAGS.index(tag))
                )

    def split(self, batch: ReadingBatch) -> dict[str, list[Sample]]:
        """loop id -> its samples in this batch (empty for devices without loop tags)."""
        points = self.devices.get((batch["site"], batch["device"]))
        out: dict[str, list[Sample]] = {}
        if points is None:
            return out
        for r in batch["readings"]:
            targets = points.get(r["point"])
            if targets:
                good = 1 if r["quality"] == "good" else 0
                for loop_id, tag in targets:
                    out.setdefault(loop_id, []).append([tag, r["ts"], r["value"], good])
        return out


def check_sample(s: Any) -> Sample | None:
    """A routed sample in its exact shape, or None."""
    if not isinstance(s, list) or len(s) != 4:
        return None
    tag, ts, v, g = s
    if not (isinstance(tag, int) and 0 <= tag < 4 and isinstance(ts, int) and not isinstance(ts, bool)):
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or g not in (0, 1):
        return None
    return s


# -- horizon -----------------------------------------------------------------------------------------------


def quantize(x: npt.NDArray[np.float64], lo: float) -> npt.NDArray[np.float32]:
    """The stored form of PV/SP (lo = pv_lo) and OP (lo = op_lo): float32 offsets from the range's low end.

    Offsets keep the resolution at about 6e-8 of the value's range whatever its engineering offset.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x - lo, dtype=F32)


def restore(q: npt.NDArray[np.float32], lo: float) -> npt.NDArray[np.float64]:
    return np.asarray(q, dtype=np.float64) + lo


@dataclass
class Grid:
    """Samples of one loop on its grid t0, t0 + ts, …: the horizon, or one window before it joins it."""

    t0: int  # ms
    ts_ms: int
    pv: npt.NDArray[np.float32]
    sp: npt.NDArray[np.float32]
    op: npt.NDArray[np.float32]
    mode: npt.NDArray[np.float32]  # MODE codes; NaN where missing
    valid: npt.NDArray[np.bool_]
    stale: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.valid.size)

    @property
    def end(self) -> int:
        return self.t0 + self.n * self.ts_ms

    @classmethod
    def empty(cls, t0: int, ts_ms: int) -> Grid:
        z = np.zeros(0, dtype=F32)
        return cls(t0, ts_ms, z, z.copy(), z.copy(), z.copy(), np.zeros(0, dtype=bool))

    def then(self, other: Grid, capacity: int) -> Grid:
        """``other`` appended (it must start where this ends), keeping the last ``capacity`` samples."""
        if other.t0 != self.end or other.ts_ms != self.ts_ms:
            raise ValueError(f"grid {other.t0} does not continue {self.t0}+{self.n}·{self.ts_ms}")
        cut = max(0, self.n + other.n - capacity)
        cat = np.concatenate
        return Grid(
            self.t0 + cut * self.ts_ms,
            self.ts_ms,
            cat([self.pv, other.pv])[cut:],
            cat([self.sp, other.sp])[cut:],
            cat([self.op, other.op])[cut:],
            cat([self.mode, other.mode])[cut:],
            cat([self.valid, other.valid])[cut:],
        )

    def window(self, d: LoopDef) -> LoopWindow:
        t = (self.t0 + self.ts_ms * np.arange(self.n, dtype=np.int64)) / 1000.0
        return LoopWindow(
            t,
            restore(self.pv, d.pv_lo),
            restore(self.sp, d.pv_lo),
            restore(self.op, d.op_lo),
            mode_labels(self.mode, d),
            self.valid,
            self.ts_ms / 1000.0,
            self.stale,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "ts": self.ts_ms,
            "n": self.n,
            "pv": _b64(self.pv),
            "sp": _b64(self.sp),
            "op": _b64(self.op),
            "mode": _b64(self.mode),
            "ok": base64.b64encode(np.packbits(self.valid).tobytes()).decode("ascii"),
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Grid:
        n = int(rec["n"])
        valid = np.unpackbits(np.frombuffer(base64.b64decode(rec["ok"]), dtype=np.uint8), count=n).astype(
            bool
        )
        g = cls(
            int(rec["t0"]),
            int(rec["ts"]),
            _unb64(rec["pv"]),
            _unb64(rec["sp"]),
            _unb64(rec["op"]),
            _unb64(rec["mode"]),
            valid,
        )
        if not (g.pv.size == g.sp.size == g.op.size == g.mode.size == n):
            raise ValueError("horizon arrays of unequal length")
        return g


def _b64(a: npt.NDArray[np.float32]) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=F32).tobytes()).decode("ascii")


def _unb64(s: str) -> npt.NDArray[np.float32]:
    return np.frombuffer(base64.b64decode(s), dtype=F32).copy()


def mode_labels(codes: npt.NDArray[np.float32], d: LoopDef) -> npt.NDArray[Any]:
    """MODE codes as names (mode_codes of the topology); unknown codes as their number, missing as None."""
    out = np.full(codes.size, None, dtype=object)
    if "mode" not in d.series:
        out[:] = d.default_mode
        return out
    present = ~np.isnan(codes)
    for u in np.unique(codes[present]).tolist():
        out[codes == u] = d.mode_names.get(float(u), f"{u:g}")
    return out


def align_grid(d: LoopDef, samples: Sequence[Sample], t0: int, t1: int) -> Grid:
    """The loop's samples on the grid t0, t0 + ts, … < t1 (docs/loop-kpis.md §0; :func:`pipeline.kpi.align`).

    ``samples`` must include the last sample of each tag before t0 (the hold covers the window start).
    Times stay integer milliseconds, so a sample exactly on a grid point is found there. A tag with a
    longer hold (``hold`` in the topology: SP and MODE are often reported on change only) is aligned
    separately with it.
    """
    by_tag: dict[str, list[tuple[float, Any, bool]]] = {t: [] for t in TAGS}
    for tag, ts, v, g in samples:
        by_tag[TAGS[tag]].append((float(ts), v, bool(g)))
    if "mode" not in d.series:
        by_tag["mode"] = [(t, 0.0, True) for t, _, _ in by_tag["pv"]]  # present wherever PV is
    w = align(by_tag, float(t0), float(t1), float(d.ts_ms))
    cols: dict[str, npt.NDArray[Any]] = {"pv": w.pv, "sp": w.sp, "op": w.op, "mode": w.mode}
    for tag, hold in d.hold_ms.items():
        if hold > 3 * d.ts_ms:
            other = align(by_tag, float(t0), float(t1), float(d.ts_ms), hold=float(hold))
            cols[tag] = getattr(other, tag)
    mode = np.array([math.nan if m is None else float(m) for m in cols["mode"].tolist()], dtype=F32)
    pv, sp, op = (np.asarray(cols[t], dtype=np.float64) for t in ("pv", "sp", "op"))
    valid = np.isfinite(pv) & np.isfinite(sp) & np.isfinite(op) & ~np.isnan(mode)
    return Grid(
        t0,
        d.ts_ms,
        quantize(pv, d.pv_lo),
        quantize(sp, d.pv_lo),
        quantize(op, d.op_lo),
        mode,
        np.asarray(valid, dtype=bool),
        w.stale_tags,
    )


def last_before(carry: Sequence[Sample], samples: Sequence[Sample], t: int) -> list[Sample]:
    """Per tag, the newest sample before ``t`` (on equal times the later arrival, as align does)."""
    best: dict[int, Sample] = {}
    for s in (*carry, *samples):
        if s[1] < t and (s[0] not in best or s[1] >= best[s[0]][1]):
            best[s[0]] = s
    return [best[k] for k in sorted(best)]


# -- window closing ----------------------------------------------------------------------------------------


@dataclass
class CloseJob:
    """Everything :func:`run_job` needs to close some windows of one loop (plain data, thread-safe)."""

    loop: LoopDef
    horizon: Mapping[str, Any] | None  # the horizon record before these windows
    windows: list[tuple[int, list[Sample]]]  # (window start, its samples), in time order
    closed_through: int  # the new ct: every window ending at or before it is closed
    watermark: int | None  # windows ending at or before it close by watermark, the others by idle flush
    buckets: list[int]  # bucket starts to drop after the close


@dataclass
class CloseResult:
    records: list[LoopKpi]
    horizon: dict[str, Any]


def run_job(job: CloseJob) -> CloseResult:
    """Compute the KPIs of the job's windows in order, carrying the horizon and the calculators' state."""
    d = job.loop
    hrec = job.horizon
    h: Grid | None = None
    state: Mapping[str, Any] | None = None
    carry: list[Sample] = []
    if hrec is not None:
        carry = [list(s) for s in hrec.get("carry", [])]
        state = hrec.get("state")
        g = hrec.get("grid")
        if g is not None and int(g["ts"]) == d.ts_ms:
            try:
                h = Grid.from_record(g)
            except (KeyError, ValueError, TypeError) as e:
                log.warning("loop %s: horizon state unreadable (%r); starting a new horizon", d.id, e)
    records: list[LoopKpi] = []
    for ws, samples in job.windows:
        we = ws + d.window_ms
        if h is None or h.end > ws:  # the first window (or a changed window length)
            h = Grid.empty(ws, d.ts_ms)
        elif h.end < ws:  # windows without samples: hold what the carry allows, invalid after that
            start = max(h.end, ws - d.capacity * d.ts_ms)
            if start > h.end:
                h = Grid.empty(start, d.ts_ms)
            h = h.then(align_grid(d, carry, start, ws), d.capacity)
        w = align_grid(d, [*carry, *samples], ws, we)
        h = h.then(w, d.capacity)
        window = w.window(d)
        horizon = h.window(d)
        results, state = compute_all(window, horizon, d.cfg, state)
        uniq = {(s[0], s[1]) for s in samples}
        closed_by: Literal["watermark", "idle"] = (
            "watermark" if job.watermark is not None and we <= job.watermark else "idle"
        )
        records.append(
            {
                "loop": d.id,
                "window_start": ws,
                "window_end": we,
                "ts_s": d.ts_ms / 1000.0,
                "samples": len(uniq),
                "horizon_start": h.t0,
                "horizon_s": h.n * d.ts_ms / 1000.0,
                "closed_by": closed_by,
                "kpis": results,  # type: ignore[typeddict-item]
            }
        )
        carry = last_before(carry, samples, we)
    out: dict[str, Any] = {
        "v": STATE_VERSION,
        "ct": job.closed_through,
        "carry": carry,
        "state": state,
        "grid": None if h is None else h.to_record(),
    }
    # Exactly what a restored changelog will hold (NaN becomes null, tuples lists): a restart then computes
    # the next windows from the same state as an uninterrupted run.
    return CloseResult(records, codec.loads(codec.dumps(out)))


# -- the engine --------------------------------------------------------------------------------------------


@dataclass
class Applied:
    """What :meth:`LoopEngine.apply` did with one loops.samples message."""

    skipped: bool = False  # applied before (replay of loops.samples)
    duplicate: bool = False  # routed again after a restart of the aggregation stage
    applied: int = 0
    late: list[Sample] = field(default_factory=list)
    invalid: int = 0


def bucket_key(loop_id: str, start: int) -> str:
    return f"{loop_id}{BUCKET_INFIX}{start}"


def horizon_key(loop_id: str) -> str:
    return f"{loop_id}{HORIZON_SUFFIX}"


def new_head(partition: int) -> dict[str, Any]:
    return {"p": partition, "o": -1, "mx": None, "ct": None, "b": [], "src": {}}


class LoopEngine:
    def __init__(self, store: MutableMapping[str, Any], loops: Mapping[str, LoopDef]) -> None:
        self.store = store
        self.loops = dict(loops)

    def head(self, loop_id: str) -> dict[str, Any] | None:
        rec = self.store.get(loop_id)
        return rec if isinstance(rec, dict) else None

    # -- step 1 ----------------------------------------------------------------------------------------
    def apply(
        self,
        loop_id: str,
        partition: int,
        offset: int,
        samples: Sequence[Any],
        src: Sequence[int] | None = None,
    ) -> Applied:
        d = self.loops[loop_id]
        out = Applied()
        head = self.head(loop_id)
        if head is None:
            head = new_head(partition)
        elif head["p"] == partition and offset <= head["o"]:
            out.skipped = True
            return out
        src_key = str(src[0]) if src else None
        if src and src_key is not None and src[1] <= head["src"].get(src_key, -1):
            out.duplicate = True
            head["p"], head["o"] = partition, offset
            self.store[loop_id] = head
            return out
        ct, mx = head["ct"], head["mx"]
        bucket_ms = d.bucket_ms
        by_bucket: dict[int, list[Sample]] = {}
        for raw in samples:
            s = check_sample(raw)
            if s is None:
                out.invalid += 1
                continue
            ts = s[1]
            if ct is not None and ts < ct:
                out.late.append(s)
                continue
            by_bucket.setdefault(ts - ts % bucket_ms, []).append(s)
            if mx is None or ts > mx:
                mx = ts
        buckets: list[int] = head["b"]
        for start, ss in by_bucket.items():
            key = bucket_key(loop_id, start)
            rec = self.store.get(key)
            if rec is None:
                rec = {"o": -1, "s": []}
            elif rec["o"] >= offset:
                continue  # applied before a crash; the head was not written then
            rec["s"].extend(ss)
            rec["o"] = offset
            self.store[key] = rec
            out.applied += len(ss)
            i = bisect.bisect_left(buckets, start)
            if i == len(buckets) or buckets[i] != start:
                buckets.insert(i, start)
        head["mx"] = mx
        head["p"], head["o"] = partition, offset
        if src and src_key is not None:
            head["src"][src_key] = src[1]
        self.store[loop_id] = head
        return out

    # -- step 2 ----------------------------------------------------------------------------------------
    def due(self, loop_id: str, flush_all: bool = False) -> CloseJob | None:
        """The windows of the loop that are due (all open ones when ``flush_all``), or None."""
        d = self.loops[loop_id]
        head = self.head(loop_id)
        if head is None or not head["b"] or head["mx"] is None:
            return None
        w_ms = d.window_ms
        mx = head["mx"]
        watermark = mx - d.grace_ms
        last_end = mx - mx % w_ms + w_ms if flush_all else watermark - watermark % w_ms
        if head["b"][0] >= last_end:
            return None
        hrec = self.store.get(horizon_key(loop_id))
        if not isinstance(hrec, dict) or hrec.get("v") != STATE_VERSION:
            hrec = None
        if (
            hrec is not None
            and hrec.get("ct") is not None
            and (head["ct"] is None or hrec["ct"] > head["ct"])
        ):
            # A crash after the horizon record was written and before the head was: finish the job now.
            self._forget(loop_id, head, int(hrec["ct"]), head["o"], head["p"])
            if not head["b"] or head["b"][0] >= last_end:
                return None
        ct = head["ct"]
        first = ct if ct is not None else head["b"][0] - head["b"][0] % w_ms
        first += -first % w_ms  # a changed window length: start at the next boundary
        windows: dict[int, list[Sample]] = {}
        used = [b for b in head["b"] if b < last_end]
        for start in used:
            rec = self.store.get(bucket_key(loop_id, start))
            if rec is None:
                continue
            for s in rec["s"]:
                ts = s[1]
                if first <= ts < last_end:
                    windows.setdefault(ts - ts % w_ms, []).append(s)
        return CloseJob(d, hrec, sorted(windows.items()), last_end, watermark, used)

    # -- step 3 ----------------------------------------------------------------------------------------
    def finish(self, loop_id: str, partition: int, offset: int, job: CloseJob, result: CloseResult) -> None:
        """Commit a computed job: the horizon record first, then the buckets and the head."""
        self.store[horizon_key(loop_id)] = result.horizon
        head = self.head(loop_id) or new_head(partition)
        self._forget(loop_id, head, job.closed_through, offset, partition)

    def _forget(self, loop_id: str, head: dict[str, Any], ct: int, offset: int, partition: int) -> None:
        keep = []
        for start in head["b"]:
            if start < ct:
                key = bucket_key(loop_id, start)
                if key in self.store:
                    del self.store[key]
            else:
                keep.append(start)
        head["b"] = keep
        head["ct"] = ct if head["ct"] is None else max(head["ct"], ct)
        if head["p"] == partition and offset > head["o"]:
            head["o"] = offset
        self.store[loop_id] = head

    # -- idle flush ------------------------------------------------------------------------------------
    def open_loops(self, partition: int) -> list[str]:
        """Loops of this input partition with samples in open windows."""
        out = []
        for loop_id in self.loops:
            head = self.head(loop_id)
            if head is not None and head["p"] == partition and head["b"]:
                out.append(loop_id)
        return out

    def describe(self, loop_id: str) -> str | None:
        """A line about the loop's restored state (for the log at start-up), None if it has none."""
        head = self.head(loop_id)
        if head is None:
            return None
        n = 0
        for start in head["b"]:
            rec = self.store.get(bucket_key(loop_id, start))
            n += len(rec["s"]) if rec else 0
        return (
            f"windows closed through {head['ct']}, newest sample {head['mx']}, {n} sample(s) in "
            f"{len(head['b'])} open bucket(s)"
        )
