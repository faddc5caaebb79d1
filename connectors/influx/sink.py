"""The InfluxDB sink: the :class:`connectors.common.sink.SinkWriter` of ``type: influx`` (1.x or 2.x API).

Points are written in batches of at most ``batch_size`` lines and 4 MB, with the precision of the topology.
InfluxDB has no transactions, but a point with the same measurement, tags and time overwrites the previous
one: a replayed batch rewrites the same points, so the sink stays idempotent without storing offsets, and the
stage commits its input only after InfluxDB acknowledged the batch. Network errors, 429 and 5xx are retried
with capped backoff; a 413 halves the batch; a 400/422 (a field-type conflict, say) halves it until the lines
the server refuses are alone, and those go to the dead-letter topic with the server's message.

After a batch of ``agg_1m`` points, the ``agg_1h`` points of the hours it touched are rewritten
(:mod:`connectors.influx.rollup`; hours not in memory are read back first), so a minute that changes late
reaches its hour; a crash in between is repaired by the replay of the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from connectors.common.backoff import delays
from connectors.common.sink import Entry, Refused, WriteResult
from connectors.influx.api import SERIES_FILTER_MAX, InfluxError, SeriesKey, open_api
from connectors.influx.config import InfluxSink
from connectors.influx.lines import LINES, hour_lines
from connectors.influx.rollup import HOUR_MS, Hour, hour_from, hour_of

log = logging.getLogger("plantstream.influx")

MAX_BODY = 4 * 2**20
# Hours read back per query when a batch touched many (a replay of days).
HOURS_PER_QUERY = 24
SCALE = {"ms": "", "us": "000", "ns": "000000"}
KEEP_HOURS = 2  # hours kept in memory behind the newest one of a partition
MAX_HOURS = 200_000  # (series, hour) pairs in memory, at most (about 40 MB)

__all__ = ["InfluxError", "InfluxSinkWriter"]


class InfluxSinkWriter:
    tables = frozenset(LINES)

    def __init__(self, cfg: InfluxSink) -> None:
        self.cfg = cfg
        self.api = open_api(cfg)
        self.scale = SCALE[cfg.precision]
        # input partition -> (series, hour) -> the hour combined so far (see _roll_up)
        self.hours: dict[int, dict[tuple[SeriesKey, int], Hour]] = {}

    # -- the interface ------------------------------------------------------------------------------
    def deploy(self, tables: Sequence[str], say: Callable[[str], None]) -> dict[str, str]:
        self.api.deploy(say)
        out = {t: "measurement" for t in tables}
        if "agg_1m" in tables:
            out["agg_1h"] = "measurement (rolled up by the sink)"
        return out

    async def write(self, table: str, topic: str, entries: Sequence[Entry]) -> WriteResult:
        to_lines, kind = LINES[table]
        lines: list[str] = []
        owners: list[tuple[Entry, bool]] = []  # per line: its entry, and whether the line is its payload
        out = WriteResult()
        expand = table == "readings"
        for e in entries:
            try:
                ls = to_lines(e.record)
            except Exception as exc:  # the mapping is pure: whatever it raises is about the record
                out.refused.append(Refused(e.partition, e.offset, e.source, f"invalid {kind}: {exc!r}"))
                continue
            lines.extend(ls)
            owners.extend((e, expand) for _ in ls)
        if not lines:
            return out
        started = time.perf_counter()
        refused = await asyncio.to_thread(self._write_all, lines)
        seen: set[tuple[int, int]] = set()
        for i, reason in refused:
            e, own = owners[i]
            if own:
                out.refused.append(Refused(e.partition, e.offset, lines[i], reason))
            elif (e.partition, e.offset) not in seen:
                seen.add((e.partition, e.offset))
                out.refused.append(Refused(e.partition, e.offset, e.source, reason))
        out.written = len(lines) - len(refused)
        if table == "agg_1m":
            bad = {(r.partition, r.offset) for r in out.refused}
            written = [e for e in entries if (e.partition, e.offset) not in bad]
            n, hour_refused = await asyncio.to_thread(self._roll_up, written)
            out.written += n
            out.refused += hour_refused
        log.debug("%s: wrote %d points in %.3fs", table, out.written, time.perf_counter() - started)
        return out

    async def close(self) -> None:
        self.api.close()

    # -- hourly rollup ------------------------------------------------------------------------------
    def forget(self, partitions: Sequence[int]) -> None:
        """Partitions assigned or taken away: what this writer knows of their hours may be stale."""
        for p in partitions:
            self.hours.pop(p, None)

    def _roll_up(self, minutes: list[Entry]) -> tuple[int, list[Refused]]:
        """Rewrites the ``agg_1h`` points of the (series, hour) pairs these minutes belong to; an hour the
        server refuses goes to the dead-letter topic under the offset of one of its minutes.

        Hours this writer has seen are combined in memory, per input partition (a series always arrives on
        the same one); an hour it does not know, or whose minute arrives a second time (a replay, a late
        change), is read back from the database after the minutes were written."""
        dirty: dict[tuple[SeriesKey, int], tuple[int, Entry]] = {}
        missing: dict[int, dict[SeriesKey, int]] = defaultdict(dict)  # hour -> series -> partition
        for e in minutes:
            m = e.record
            key: SeriesKey = (m["site"], m["device"], m["point"])
            h0 = hour_of(m["window_start"])
            cache = self.hours.setdefault(e.partition, {})
            known = cache.get((key, h0))
            if known is None or not known.add(m):
                cache.pop((key, h0), None)
                missing[h0][key] = e.partition
            dirty[(key, h0)] = (e.partition, e)
        if not dirty:
            return 0, []
        self._read_back(missing)
        lines: list[str] = []
        owners: list[Entry] = []
        refused: list[Refused] = []
        for (key, h0), (p, e) in dirty.items():
            hour = self.hours.get(p, {}).get((key, h0))
            if hour is None:  # read back nothing: the minutes were refused
                continue
            try:
                ls = hour_lines(hour.fields())
            except (TypeError, ValueError, KeyError) as exc:  # points written by someone else
                refused.append(Refused(e.partition, e.offset, e.source, f"agg_1h: {exc!r}"))
                continue
            lines.extend(ls)
            owners.extend(e for _ in ls)
        for k, reason in self._write_all(lines):
            e = owners[k]
            refused.append(Refused(e.partition, e.offset, lines[k], f"agg_1h: {reason}"))
        self._trim()
        return len(lines) - len(refused), refused

    def _read_back(self, missing: dict[int, dict[SeriesKey, int]]) -> None:
        hours = sorted(missing)
        i = 0
        while i < len(hours):
            j = i + 1  # a run of consecutive hours, at most HOURS_PER_QUERY long
            while j < len(hours) and hours[j] == hours[j - 1] + HOUR_MS and j - i < HOURS_PER_QUERY:
                j += 1
            wanted = set().union(*(missing[h] for h in hours[i:j]))
            names = sorted(wanted) if len(wanted) <= SERIES_FILTER_MAX else None
            groups: dict[tuple[SeriesKey, int], list[dict[str, Any]]] = defaultdict(list)
            for row in self.api.minutes(hours[i], hours[j - 1] + HOUR_MS, names):
                key = (row["site"], row["device"], row["point"])
                h0 = hour_of(row["window_start"])
                if key in missing.get(h0, {}):
                    groups[(key, h0)].append(row)
            for (key, h0), rows in groups.items():
                self.hours.setdefault(missing[h0][key], {})[(key, h0)] = hour_from(rows)
            i = j

    def _trim(self) -> None:
        """Keeps the hours of the last few hours of event time per partition, and at most MAX_HOURS."""
        total = 0
        for cache in self.hours.values():
            if cache:
                newest = max(h for _, h in cache)
                for k in [k for k in cache if k[1] < newest - KEEP_HOURS * HOUR_MS]:
                    del cache[k]
            total += len(cache)
        if total > MAX_HOURS:
            self.hours.clear()  # rare (very many series): read back again rather than grow

    # -- batches ------------------------------------------------------------------------------------
    def _write_all(self, lines: list[str]) -> list[tuple[int, str]]:
        refused: list[tuple[int, str]] = []
        start = 0
        while start < len(lines):
            end, size = start, 0
            while (
                end < len(lines) and end - start < self.cfg.batch_size and size + len(lines[end]) < MAX_BODY
            ):
                size += len(lines[end]) + 1
                end += 1
            end = max(end, start + 1)
            refused += self._write(lines, start, end)
            start = end
        return refused

    def _write(self, lines: list[str], start: int, end: int) -> list[tuple[int, str]]:
        """Lines ``start:end`` written, retrying what is temporary; returns the lines refused for good."""
        body = "\n".join(line + self.scale for line in lines[start:end]).encode()
        backoff = delays(0.2, 10.0)
        while True:
            status, text = self.api.write(body)
            if status in (200, 204):
                return []
            if status == 0 or status == 429 or status >= 500:
                delay = next(backoff)
                log.warning(
                    "InfluxDB write: %s %s; retrying in %.1fs", status or "no answer", text[:200], delay
                )
                time.sleep(delay)
                continue
            if status in (400, 413, 422) and end - start > 1:
                mid = (start + end) // 2
                return self._write(lines, start, mid) + self._write(lines, mid, end)
            if status in (400, 422):
                return [(start, f"InfluxDB refused the point: {text.strip()[:300]}")]
            raise InfluxError(f"InfluxDB write failed: HTTP {status}: {text[:300]} ({self.api.where})")
