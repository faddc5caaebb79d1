"""Store and forward: a bounded on-disk log of the records a source produces, between it and Kafka.

Layout of a spool directory::

    seg-<first seq, 20 digits>.log   append-only segments of framed records
    cursor                           the lowest record not yet confirmed by Kafka (8 bytes + CRC-32)

A record is framed as ``<u32 length><u32 crc32(body)>`` followed by the body
``<u64 seq><i64 ts_ms or -1><i64 appended_ms><u32 weight><u16 key length> key value``; ``weight`` is the
number of readings it carries, so that what is dropped can be counted in readings.

Durability (group commit): appends go to the operating system at once (a crash of the process loses
nothing), and :meth:`Spool.sync` fsyncs the segments written since the last call; the caller runs it every
``sync_interval`` (100 ms), or at once when someone waits for durability (the MQTT source acknowledges a
message only once its record is fsynced). A power cut can therefore lose at most the last ``sync_interval``
of records that were not in Kafka yet, and can send again the records delivered since the cursor was last
written (it is written at the same cadence).

The cursor only moves from Kafka's delivery reports, and only over a contiguous run of delivered records:
reports that come out of order are remembered until the gap below them closes. On open, everything from the
cursor on is replayed; a torn record at the end of a segment (a crash mid-write) is found by its length or
CRC and cut off. Segments wholly below the cursor are deleted.

Bounds: ``max_bytes`` (the segments' total size) and ``max_age`` (time since a record was spooled). When
full, ``block`` refuses appends (:meth:`Spool.fits` says whether one would be taken) so the caller holds its
input, and ``drop_oldest`` deletes the oldest segments, delivered or not, counting the readings lost. A
stopping caller appends what it holds ``past_full``: beyond ``max_bytes`` by at most that, never lost.

The module imports no Kafka client: configuration models import :class:`SpoolConfig` from here.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from pipeline.core.durations import DurationMs
from pipeline.core.topology import Model

log = logging.getLogger("plantstream.spool")

WhenFull = Literal["block", "drop_oldest"]

MIB = 1024 * 1024
SEGMENT_BYTES = 8 * MIB
_FRAME = struct.Struct("<II")  # length of the body, CRC-32 of the body
_BODY = struct.Struct("<QqqIH")  # seq, ts_ms (-1: none), appended_ms, weight, key length
_CURSOR = struct.Struct("<QI")  # seq, CRC-32 of the seq
_SEGMENT = re.compile(r"^seg-(\d{20})\.log$")
_READ_CHUNK = MIB


class SpoolConfig(Model):
    """``spool:`` of a source: where and how much it keeps on disk while Kafka cannot take it."""

    dir: Path | None = Field(
        default=None, description="directory of the spool (default: <local dir>/spool/<topology>/<source id>)"
    )
    max_bytes: int = Field(
        default=1024 * MIB,
        ge=16 * MIB,
        description="size of the spool's segments at most, in bytes (at least 16 MiB; default 1 GiB)",
    )
    max_age: DurationMs = Field(
        default=7 * 86_400_000, ge=60_000, description="records spooled longer ago are dropped (default 7d)"
    )
    when_full: WhenFull | None = Field(
        default=None,
        description="block: stop taking input until Kafka catches up; drop_oldest: delete the oldest "
        "records (counted). Default: block for mqtt, drop_oldest for opcua and bacnet",
    )
    sync_interval: DurationMs = Field(
        default=100,
        ge=1,
        le=10_000,
        description="fsync at most this long after an append (what a power cut can lose); default 100ms",
    )


def _spool_setting(v: Any) -> Any:
    # YAML reads a bare `off` as false and `on` as true.
    if v is False or v is None or (isinstance(v, str) and v.strip().lower() in ("off", "false", "no")):
        return None
    if v is True or (isinstance(v, str) and v.strip().lower() in ("on", "true", "yes")):
        return {}
    if isinstance(v, str):
        raise ValueError(
            "expected 'off', 'on' or a mapping such as {max_bytes: 1073741824, when_full: block}"
        )
    return v


#: A source's ``spool`` field: ``off``, ``on`` or a :class:`SpoolConfig` mapping.
SpoolSetting = Annotated[
    SpoolConfig | None,
    BeforeValidator(_spool_setting, json_schema_input_type=SpoolConfig | Literal["off", "on"] | bool),
    Field(
        description="store and forward on local disk: off, on, or {dir, max_bytes, max_age, when_full, "
        "sync_interval}"
    ),
]


def default_local_dir() -> Path:
    """The local state directory, as ``plantstream services`` and ``run`` pick it (the connectors may not
    import the development harness, so its rule is repeated here)."""
    override = os.environ.get("PLANTSTREAM_LOCAL_DIR", "").strip()
    if override:
        return Path(override).expanduser().resolve()
    state_home = Path(os.environ.get("XDG_STATE_HOME", "").strip()).expanduser()
    if state_home.is_absolute():
        return state_home / "plantstream"
    return Path.home() / ".local" / "state" / "plantstream"


def spool_dir(cfg: SpoolConfig, topology: str, source_id: str) -> Path:
    return cfg.dir if cfg.dir is not None else default_local_dir() / "spool" / topology / source_id


@dataclass(frozen=True)
class Record:
    seq: int
    key: bytes
    value: bytes
    ts_ms: int | None
    appended_ms: int
    weight: int


def encode(seq: int, key: bytes, value: bytes, ts_ms: int | None, appended_ms: int, weight: int) -> bytes:
    body = _BODY.pack(seq, -1 if ts_ms is None else ts_ms, appended_ms, weight, len(key)) + key + value
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode(body: bytes) -> Record:
    seq, ts, appended, weight, klen = _BODY.unpack_from(body)
    start = _BODY.size
    return Record(
        seq, body[start : start + klen], body[start + klen :], None if ts < 0 else ts, appended, weight
    )


def _frames(data: bytes, base: int = 0) -> Iterator[tuple[int, int, Record]]:
    """(offset, frame length, record) of the whole, valid frames at the start of ``data``."""
    pos = 0
    n = len(data)
    while pos + _FRAME.size <= n:
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length < _BODY.size or end > n:
            return
        body = data[pos + _FRAME.size : end]
        if zlib.crc32(body) != crc:
            return
        yield base + pos, end - pos, _decode(body)
        pos = end


def scan(directory: Path) -> list[Record]:
    """The records of a spool directory from its cursor on, read without changing anything (to inspect a
    spool, stopped or in use: a record being written is not whole yet and is left out)."""
    path = directory / "cursor"
    raw = path.read_bytes() if path.exists() else b""
    cursor = 0
    if len(raw) == _CURSOR.size and zlib.crc32(raw[:8]) == _CURSOR.unpack(raw)[1]:
        cursor = _CURSOR.unpack(raw)[0]
    out: list[Record] = []
    for path in sorted(p for p in directory.glob("seg-*.log") if _SEGMENT.match(p.name)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted meanwhile: confirmed
            continue
        out += [rec for _, _, rec in _frames(data) if rec.seq >= cursor]
    return out


@dataclass
class _Segment:
    first: int  # seq of its first record
    path: Path
    count: int = 0
    size: int = 0
    first_ms: int = 0  # when its first and last records were spooled
    last_ms: int = 0
    fd: int = -1  # open for appending while it is the active segment
    dirty: bool = False  # written since the last fsync

    @property
    def end(self) -> int:
        return self.first + self.count


@dataclass
class SpoolStats:
    appended: int = 0
    dropped: int = 0  # readings dropped (full with drop_oldest, older than max_age, or cut off as torn)
    dropped_records: int = 0
    truncated_bytes: int = 0  # torn tails cut off when opening
    replayed: int = 0  # records found undelivered when opening
    syncs: int = 0


@dataclass
class _Reader:
    segment: int = -1  # first seq of the segment being read
    seq: int = -1  # the next record expected at ``offset``
    offset: int = 0
    fd: int = -1


class SpoolFull(Exception):
    """An append under ``block`` that would take the spool past ``max_bytes``."""


class Spool:
    """The segment log. Thread-safe: the source appends, the Kafka sender reads, syncs and confirms."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1024 * MIB,
        max_age_ms: int = 7 * 86_400_000,
        when_full: WhenFull = "block",
        segment_bytes: int | None = None,
        name: str = "",
        clock_ms: Any = None,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.when_full: WhenFull = when_full
        # At least four segments fit, so dropping the oldest never has to drop the one being written.
        self.segment_bytes = segment_bytes or max(64 * 1024, min(SEGMENT_BYTES, max_bytes // 4))
        self.name = name or str(directory)
        self.stats = SpoolStats()
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)  # notified on append, confirm and drop
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # first seq of each segment, for bisect
        self._delivered: set[int] = set()  # confirmed records above the cursor
        self._reader = _Reader()
        self._dir_dirty = False
        self._cursor_written = -1
        self._closed = False
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cursor = 0
        self.next_seq = 0
        self._open()

    # -- opening and recovery --------------------------------------------------------------------------
    def _open(self) -> None:
        cursor = self._read_cursor()
        found = sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := _SEGMENT.match(p.name)) is not None
        )
        for first, path in found:
            seg = _Segment(first, path)
            data = path.read_bytes()
            valid = 0
            for offset, length, rec in _frames(data):
                if rec.seq != first + seg.count:
                    break  # a frame that does not continue the sequence is garbage from an older file
                if seg.count == 0:
                    seg.first_ms = rec.appended_ms
                seg.last_ms = rec.appended_ms
                seg.count += 1
                valid = offset + length
            if valid < len(data):
                cut = len(data) - valid
                log.warning(
                    "spool %s: %s ends in %d byte(s) of a torn record (a crash while writing); cut off",
                    self.name,
                    path.name,
                    cut,
                )
                self.stats.truncated_bytes += cut
                with open(path, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
            seg.size = valid
            if seg.count == 0 or (cursor is not None and seg.end <= cursor):
                path.unlink()
                self._dir_dirty = True
                continue
            self._add_segment(seg)
        last_end = self._segments[-1].end if self._segments else 0
        first = self._segments[0].first if self._segments else last_end
        if cursor is None:
            cursor = first
        # Never below what is on disk (dropped segments), never above what was appended.
        self.cursor = max(cursor, first) if self._segments else max(cursor, last_end)
        self.next_seq = max(last_end, self.cursor)
        undelivered = self.next_seq - self.cursor
        self.stats.replayed = undelivered
        if undelivered:
            log.warning(
                "spool %s: %d record(s) not confirmed by Kafka before the last stop; sending them (again)",
                self.name,
                undelivered,
            )
        self._sync_dir()

    def _read_cursor(self) -> int | None:
        path = self.dir / "cursor"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) == _CURSOR.size:
            seq, crc = _CURSOR.unpack(raw)
            if zlib.crc32(raw[:8]) == crc:
                self._cursor_written = seq
                return int(seq)
        log.warning("spool %s: the cursor file is damaged; replaying every record kept", self.name)
        return None

    def _add_segment(self, seg: _Segment) -> None:
        self._segments.append(seg)
        self._firsts.append(seg.first)

    # -- appending -------------------------------------------------------------------------------------
    def fits(self, size: int) -> bool:
        """Whether a record of ``size`` body+key+value bytes would be taken now (always, with drop_oldest)."""
        with self._lock:
            return self.when_full == "drop_oldest" or self.size + size + 64 <= self.max_bytes

    @property
    def size(self) -> int:
        """Bytes of the segments on disk."""
        return sum(s.size for s in self._segments)

    def append(
        self, key: bytes, value: bytes, ts_ms: int | None, weight: int = 1, *, past_full: bool = False
    ) -> int:
        """Write one record (to the OS; :meth:`sync` makes it durable); returns its seq. Under ``block``
        raises :class:`SpoolFull` when it would not fit, unless ``past_full``: then it is written beyond
        ``max_bytes`` (a stopping source spools what it holds rather than lose it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"spool {self.name} is closed")
            now = self._clock_ms()
            seq = self.next_seq
            frame = encode(seq, key, value, ts_ms, now, weight)
            if self.size + len(frame) > self.max_bytes:
                if self.when_full == "drop_oldest":
                    self._drop_for(len(frame))
                elif not past_full:
                    raise SpoolFull(f"spool {self.name} is full ({self.size} of {self.max_bytes} bytes)")
            seg = self._segments[-1] if self._segments else None
            if seg is None or seg.fd < 0 or (seg.size and seg.size + len(frame) > self.segment_bytes):
                seg = self._roll(seq)
            written = os.write(seg.fd, frame)
            if written != len(frame):  # pragma: no cover - regular files write whole
                raise OSError(f"spool {self.name}: short write ({written} of {len(frame)} bytes)")
            if seg.count == 0:
                seg.first_ms = now
            seg.last_ms = now
            seg.count += 1
            seg.size += len(frame)
            seg.dirty = True
            self.next_seq = seq + 1
            self.stats.appended += 1
            self.changed.notify_all()
            return seq

    def _roll(self, seq: int) -> _Segment:
        if self._segments and self._segments[-1].fd >= 0:
            last = self._segments[-1]
            if last.dirty:
                os.fsync(last.fd)
                last.dirty = False
            os.close(last.fd)
            last.fd = -1
        path = self.dir / f"seg-{seq:020d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        seg = _Segment(seq, path, fd=fd)
        self._add_segment(seg)
        self._dir_dirty = True
        return seg

    # -- dropping --------------------------------------------------------------------------------------
    def _drop_for(self, size: int) -> None:
        while self.size + size > self.max_bytes and self._segments:
            if len(self._segments) == 1 and self._segments[0].fd >= 0:
                self._roll(self.next_seq)  # the segment being written goes too; a new one takes the record
            self._drop_segment(self._segments[0], "the spool is full (when_full: drop_oldest)")

    def _drop_segment(self, seg: _Segment, why: str) -> None:
        """Delete the oldest segment, counting its undelivered records as dropped."""
        assert seg is self._segments[0]
        lost = [r for r in self._scan(seg) if r.seq >= self.cursor and r.seq not in self._delivered]
        readings = sum(r.weight for r in lost)
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        seg.path.unlink(missing_ok=True)
        self._segments.pop(0)
        self._firsts.pop(0)
        self._dir_dirty = True
        if self._reader.segment == seg.first:
            self._close_reader()
        new_cursor = self._segments[0].first if self._segments else self.next_seq
        if new_cursor > self.cursor:
            self._delivered = {s for s in self._delivered if s >= new_cursor}
            self.cursor = new_cursor
            self._advance()
        if lost:
            self.stats.dropped += readings
            self.stats.dropped_records += len(lost)
            log.warning(
                "spool %s: dropped %d record(s) of %d reading(s) never sent to Kafka: %s",
                self.name,
                len(lost),
                readings,
                why,
            )
        self.changed.notify_all()

    def expire(self) -> int:
        """Drop segments whose newest record is older than ``max_age``; returns the readings dropped."""
        with self._lock:
            before = self.stats.dropped
            limit = self._clock_ms() - self.max_age_ms
            while self._segments and self._segments[0].last_ms < limit and self._segments[0].count:
                if self._segments[0].fd >= 0:
                    self._roll(self.next_seq)
                self._drop_segment(self._segments[0], f"spooled longer than max_age ({self.max_age_ms} ms)")
            return self.stats.dropped - before

    def too_old(self, rec: Record) -> bool:
        return rec.appended_ms < self._clock_ms() - self.max_age_ms

    def drop_record(self, rec: Record, why: str) -> None:
        """One record that will not be sent (older than max_age): counted, and confirmed like a delivery."""
        with self._lock:
            if rec.seq < self.cursor or rec.seq in self._delivered:
                return
            self.stats.dropped += rec.weight
            self.stats.dropped_records += 1
            n = self.stats.dropped_records
            if n == 1 or n % 1000 == 0:
                log.warning("spool %s: dropped a record of %d reading(s): %s", self.name, rec.weight, why)
            self.confirm(rec.seq)

    # -- confirming ------------------------------------------------------------------------------------
    def confirm(self, seq: int) -> None:
        """Kafka has the record ``seq``: the cursor moves past every contiguous confirmed record."""
        with self._lock:
            if seq < self.cursor or seq >= self.next_seq:
                return
            self._delivered.add(seq)
            if seq == self.cursor:
                self._advance()
                self.changed.notify_all()

    def is_confirmed(self, seq: int) -> bool:
        with self._lock:
            return seq < self.cursor or seq in self._delivered

    def _advance(self) -> None:
        while self.cursor in self._delivered:
            self._delivered.discard(self.cursor)
            self.cursor += 1
        # Skip gaps (records cut off as torn in a middle segment) up to the next segment that has records.
        i = bisect.bisect_right(self._firsts, self.cursor) - 1
        if i >= 0 and self.cursor >= self._segments[i].end and i + 1 < len(self._segments):
            self.cursor = self._segments[i + 1].first
            self._advance()
            return
        while len(self._segments) > 1 and self._segments[0].end <= self.cursor:
            seg = self._segments.pop(0)
            self._firsts.pop(0)
            if self._reader.segment == seg.first:
                self._close_reader()
            seg.path.unlink(missing_ok=True)
            self._dir_dirty = True

    # -- reading ---------------------------------------------------------------------------------------
    def read(self, seq: int, max_records: int = 1000, max_bytes: int = 4 * MIB) -> list[Record]:
        """Records from ``seq`` on (from the cursor, if ``seq`` is below it), in order."""
        out: list[Record] = []
        size = 0
        with self._lock:
            seq = max(seq, self.cursor)
            while len(out) < max_records and size < max_bytes and seq < self.next_seq:
                i = bisect.bisect_right(self._firsts, seq) - 1
                if i < 0:
                    seq = self._firsts[0] if self._firsts else self.next_seq
                    continue
                seg = self._segments[i]
                if seq >= seg.end:
                    if i + 1 >= len(self._segments):
                        break
                    seq = self._segments[i + 1].first
                    continue
                got = self._read_segment(seg, seq, max_records - len(out), max_bytes - size)
                if not got:
                    break
                out.extend(got)
                size += sum(len(r.value) for r in got)
                seq = got[-1].seq + 1
        return out

    def _read_segment(self, seg: _Segment, seq: int, max_records: int, max_bytes: int) -> list[Record]:
        r = self._reader
        if r.segment != seg.first or r.seq != seq:
            if r.segment != seg.first:
                self._close_reader()
                r.fd = os.open(seg.path, os.O_RDONLY)
                r.segment = seg.first
            r.seq, r.offset = seg.first, 0  # from the start of the segment: skip up to seq
        out: list[Record] = []
        size = 0
        while r.offset < seg.size and len(out) < max_records and size < max_bytes:
            data = os.pread(r.fd, min(_READ_CHUNK, seg.size - r.offset), r.offset)
            if len(data) < _FRAME.size:
                break
            length = _FRAME.unpack_from(data)[0]
            if _FRAME.size + length > len(data):  # one record larger than the chunk
                data = os.pread(r.fd, _FRAME.size + length, r.offset)
            moved = False
            for offset, flen, rec in _frames(data, r.offset):
                r.offset = offset + flen
                r.seq = rec.seq + 1
                moved = True
                if rec.seq >= seq:
                    out.append(rec)
                    size += len(rec.value)
                    if len(out) >= max_records or size >= max_bytes:
                        break
            if not moved:
                log.error("spool %s: %s is damaged at byte %d", self.name, seg.path.name, r.offset)
                break
        return out

    def _close_reader(self) -> None:
        if self._reader.fd >= 0:
            os.close(self._reader.fd)
        self._reader = _Reader()

    def _scan(self, seg: _Segment) -> list[Record]:
        try:
            data = seg.path.read_bytes()
        except FileNotFoundError:
            return []
        return [rec for _, _, rec in _frames(data[: seg.size])]

    # -- durability ------------------------------------------------------------------------------------
    def sync(self) -> int:
        """fsync what was appended since the last call, and the cursor if it moved. Returns the seq below
        which every record is durable. Runs outside the appender's way: the lock is not held over fsync."""
        with self._lock:
            durable = self.next_seq
            fds = [s.fd for s in self._segments if s.dirty and s.fd >= 0]
            for s in self._segments:
                s.dirty = False
            cursor = self.cursor
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            fds = [os.dup(fd) for fd in fds]  # a roll may close the original meanwhile
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        if cursor != self._cursor_written:
            self._write_cursor(cursor)
            dir_dirty = True
        if dir_dirty:
            self._sync_dir()
        self.stats.syncs += 1
        return durable

    def _write_cursor(self, seq: int) -> None:
        raw = seq.to_bytes(8, "little")
        tmp = self.dir / "cursor.tmp"
        with open(tmp, "wb") as f:
            f.write(_CURSOR.pack(seq, zlib.crc32(raw)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "cursor")
        self._cursor_written = seq

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
        self.sync()
        with self._lock:
            for s in self._segments:
                if s.fd >= 0:
                    os.close(s.fd)
                    s.fd = -1
            self._close_reader()
            self._closed = True

    # -- counters --------------------------------------------------------------------------------------
    def counters(self) -> dict[str, float | int]:
        """``spool_oldest_age_s`` counts from the first record of the cursor's segment, not the cursor's own
        record (which would take a read): it can overstate by up to one segment's time span."""
        with self._lock:
            oldest = self._oldest_ms()
            return {
                "spool_bytes": self.size,
                "spool_records": self.pending,
                "spool_oldest_age_s": 0.0 if oldest is None else round((self._clock_ms() - oldest) / 1000, 1),
                "spool_dropped": self.stats.dropped,
            }

    @property
    def pending(self) -> int:
        """Records not yet confirmed by Kafka."""
        with self._lock:
            gaps = sum(
                max(0, b.first - a.end) for a, b in zip(self._segments, self._segments[1:], strict=False)
            )
            return max(0, self.next_seq - self.cursor - len(self._delivered) - gaps)

    def _oldest_ms(self) -> int | None:
        if self.cursor >= self.next_seq:
            return None
        i = bisect.bisect_right(self._firsts, self.cursor) - 1
        seg = self._segments[max(i, 0)] if self._segments else None
        # The first record of the cursor's segment: at most one segment's worth older than the cursor's own.
        return None if seg is None else seg.first_ms
