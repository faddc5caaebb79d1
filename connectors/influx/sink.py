"""The InfluxDB sink: the :class:`connectors.common.sink.SinkWriter` of ``type: influx`` (the 1.x HTTP API).

Points are written with ``POST /write?precision=ms`` in batches of at most ``batch_size`` lines and 4 MB.
InfluxDB has no transactions, but a point with the same measurement, tags and time overwrites the previous
one: a replayed batch rewrites the same points, so the sink stays idempotent without storing offsets, and the
stage commits its input only after InfluxDB acknowledged the batch. Network errors, 429 and 5xx are retried
with capped backoff; a 413 halves the batch; a 400 (a field-type conflict, say) halves it until the lines the
server refuses are alone, and those go to the dead-letter topic with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from connectors.common.backoff import delays
from connectors.common.sink import Entry, Refused, WriteResult
from connectors.influx.config import InfluxSink
from connectors.influx.lines import LINES

log = logging.getLogger("plantstream.influx")

MAX_BODY = 4 * 2**20


class InfluxError(RuntimeError):
    """Trouble that is not about the points (auth, missing database): stops the worker."""


class InfluxSinkWriter:
    tables = frozenset(LINES)

    def __init__(self, cfg: InfluxSink) -> None:
        self.cfg = cfg
        self.timeout = cfg.timeout / 1000

    # -- HTTP ---------------------------------------------------------------------------------------
    def _request(self, path: str, params: dict[str, str], body: bytes | None = None) -> tuple[int, str]:
        url = f"{self.cfg.url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=body if body is not None else b"", method="POST")
        if self.cfg.username is not None:
            token = base64.b64encode(f"{self.cfg.username}:{self.cfg.password or ''}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def query(self, q: str) -> str:
        status, text = self._request("/query", {"db": self.cfg.database, "q": q})
        if status >= 300:
            raise InfluxError(f"InfluxDB query failed: HTTP {status}: {text[:300]}")
        return text

    # -- the interface ------------------------------------------------------------------------------
    def deploy(self, tables: Sequence[str], say: Callable[[str], None]) -> dict[str, str]:
        db = self.cfg.database
        self.query(f'CREATE DATABASE "{db}"')
        hours = f"{self.cfg.retention // 3_600_000}h" if self.cfg.retention else "INF"
        self.query(f'ALTER RETENTION POLICY "autogen" ON "{db}" DURATION {hours} DEFAULT')
        say(f"sink {self.cfg.id}: InfluxDB database {db} ready (retention {hours})")
        return {t: "measurement" for t in tables}

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
        log.debug("%s: wrote %d points in %.3fs", table, out.written, time.perf_counter() - started)
        return out

    async def close(self) -> None:
        return None

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
        body = "\n".join(lines[start:end]).encode()
        backoff = delays(0.2, 10.0)
        while True:
            try:
                status, text = self._request("/write", {"db": self.cfg.database, "precision": "ms"}, body)
            except (urllib.error.URLError, OSError) as e:
                status, text = 0, str(e)
            if status in (200, 204):
                return []
            if status == 0 or status == 429 or status >= 500:
                delay = next(backoff)
                log.warning(
                    "InfluxDB write: %s %s; retrying in %.1fs", status or "no answer", text[:200], delay
                )
                time.sleep(delay)
                continue
            if status in (400, 413) and end - start > 1:
                mid = (start + end) // 2
                return self._write(lines, start, mid) + self._write(lines, mid, end)
            if status == 400:
                return [(start, f"InfluxDB refused the point: {text.strip()[:300]}")]
            raise InfluxError(
                f"InfluxDB write failed: HTTP {status}: {text[:300]} (database {self.cfg.database})"
            )
