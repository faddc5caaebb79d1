"""The two ways of talking to InfluxDB, behind one small interface the writer uses.

:class:`V1Api` speaks the 1.x HTTP API with the standard library (``/write``, InfluxQL on ``/query``);
:class:`V2Api` the 2.x API through ``influxdb-client`` (writes to org/bucket, Flux to read back). Both answer
``write`` with (HTTP status, server message), status 0 for "no answer" (network trouble), so that the writer
classifies errors the same way for both; ``minutes`` reads ``agg_1m`` points back for the hourly rollup.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from connectors.influx.config import InfluxSink

STAT_COLUMNS = ("count", "good_count", "min", "max", "mean", "sum", "first", "last", "stddev")
SeriesKey = tuple[str, str, str]  # site, device, point
# Up to this many series the read-back names them; beyond, it reads every series of the hours.
SERIES_FILTER_MAX = 64


class InfluxError(RuntimeError):
    """Trouble that is not about the points (auth, missing database, a failing query): stops the worker."""


class Api(Protocol):
    where: str  # for messages: "database plantstream" / "bucket plantstream/autogen"

    def write(self, body: bytes) -> tuple[int, str]: ...

    def minutes(
        self, start_ms: int, stop_ms: int, series: Sequence[SeriesKey] | None
    ) -> list[dict[str, Any]]:
        """The ``agg_1m`` points in [start, stop) of the given series (all when None), each a dict with
        ``window_start`` (ms), tags and :data:`STAT_COLUMNS` (None where the field is absent)."""
        ...

    def deploy(self, say: Callable[[str], None]) -> None: ...

    def count(self, measurement: str, field: str) -> int:
        """How many points of ``measurement`` have ``field`` (for checks and the bench)."""
        ...

    def close(self) -> None: ...


def _influxql_str(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _flux_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class V1Api:
    def __init__(self, cfg: InfluxSink, database: str, rp: str, user: str | None, password: str | None):
        self.cfg, self.database, self.rp = cfg, database, rp
        self.auth = (
            "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            if user is not None
            else None
        )
        self.timeout = cfg.timeout / 1000
        self.where = f"database {database} (retention policy {rp})"

    def _request(self, path: str, params: dict[str, str], body: bytes | None = None) -> tuple[int, str]:
        url = f"{self.cfg.url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=body if body is not None else b"", method="POST")
        if self.auth is not None:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def query(self, q: str) -> list[dict[str, Any]]:
        """The series of an InfluxQL statement's result; InfluxError on any error."""
        status, text = self._request("/query", {"db": self.database, "q": q, "epoch": "ms"})
        if status != 200:
            raise InfluxError(f"InfluxDB query failed: HTTP {status or 'no answer'}: {text[:300]}")
        result = json.loads(text)["results"][0]
        if "error" in result:
            raise InfluxError(f"InfluxDB query failed: {result['error']} ({q[:120]})")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def write(self, body: bytes) -> tuple[int, str]:
        params = {"db": self.database, "rp": self.rp, "precision": self.cfg.precision.replace("us", "u")}
        return self._request("/write", params, body)

    def minutes(
        self, start_ms: int, stop_ms: int, series: Sequence[SeriesKey] | None
    ) -> list[dict[str, Any]]:
        where = f"time >= {start_ms}ms AND time < {stop_ms}ms"
        if series is not None:
            where += (
                " AND ("
                + " OR ".join(
                    f'("site" = {_influxql_str(s)} AND "device" = {_influxql_str(d)} '
                    f'AND "point" = {_influxql_str(p)})'
                    for s, d, p in series
                )
                + ")"
            )
        rows = []
        for s in self.query(f'SELECT * FROM "{self.rp}"."agg_1m" WHERE {where}'):
            cols = s["columns"]
            for v in s["values"]:
                row = dict(zip(cols, v, strict=True))
                row["window_start"] = int(row.pop("time"))
                rows.append(row)
        return rows

    def count(self, measurement: str, field: str) -> int:
        series = self.query(f'SELECT count("{field}") FROM "{self.rp}"."{measurement}"')
        return int(series[0]["values"][0][1]) if series else 0

    def deploy(self, say: Callable[[str], None]) -> None:
        db, rp = self.database, self.rp
        self.query(f'CREATE DATABASE "{db}"')
        duration = f"{self.cfg.retention // 3_600_000}h" if self.cfg.retention else "INF"
        existing = {row[0] for s in self.query(f'SHOW RETENTION POLICIES ON "{db}"') for row in s["values"]}
        verb = "ALTER" if rp in existing else "CREATE"
        tail = " REPLICATION 1" if verb == "CREATE" else ""
        self.query(f'{verb} RETENTION POLICY "{rp}" ON "{db}" DURATION {duration}{tail}')
        say(f"sink {self.cfg.id}: InfluxDB database {db}, retention policy {rp} ready (duration {duration})")

    def close(self) -> None:
        return None


class V2Api:
    def __init__(self, cfg: InfluxSink) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        assert cfg.org is not None and cfg.bucket is not None and cfg.token is not None
        self.cfg, self.org, self.bucket = cfg, cfg.org, cfg.bucket
        # retries=False: the writer retries with its own backoff and classification (as for the 1.x API).
        self.client = InfluxDBClient(
            url=cfg.url, token=cfg.token, org=cfg.org, timeout=cfg.timeout, retries=False
        )
        self.writer = self.client.write_api(write_options=SYNCHRONOUS)
        self.where = f"bucket {cfg.bucket} (org {cfg.org})"

    def write(self, body: bytes) -> tuple[int, str]:
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self.writer.write(
                bucket=self.bucket,
                org=self.org,
                record=body.decode(),
                write_precision=self.cfg.precision,  # type: ignore[arg-type]  # the enum's values are these
            )
        except ApiException as e:
            return int(e.status or 0), str(e.body or e.reason)
        except (HTTPError, OSError) as e:
            return 0, str(e)
        return 204, ""

    def _flux(self, flux: str) -> list[dict[str, Any]]:
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            tables = self.client.query_api().query(flux, org=self.org)
        except ApiException as e:
            raise InfluxError(f"InfluxDB Flux query failed: HTTP {e.status}: {str(e.body)[:300]}") from None
        except (HTTPError, OSError) as e:
            raise InfluxError(f"InfluxDB Flux query failed: {e}") from None
        return [dict(rec.values) for t in tables for rec in t.records]

    def minutes(
        self, start_ms: int, stop_ms: int, series: Sequence[SeriesKey] | None
    ) -> list[dict[str, Any]]:
        flux = (
            f"from(bucket: {_flux_str(self.bucket)})\n"
            f"  |> range(start: {_rfc3339(start_ms)}, stop: {_rfc3339(stop_ms)})\n"
            '  |> filter(fn: (r) => r._measurement == "agg_1m")\n'
        )
        if series is not None:
            cond = " or ".join(
                f"(r.site == {_flux_str(s)} and r.device == {_flux_str(d)} and r.point == {_flux_str(p)})"
                for s, d, p in series
            )
            flux += f"  |> filter(fn: (r) => {cond})\n"
        flux += '  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")\n'
        rows = []
        for v in self._flux(flux):
            t: datetime = v["_time"]
            row = {k: v.get(k) for k in ("site", "device", "point", "unit", *STAT_COLUMNS)}
            row["window_start"] = round(t.timestamp() * 1000)
            rows.append(row)
        return rows

    def count(self, measurement: str, field: str) -> int:
        rows = self._flux(
            f"from(bucket: {_flux_str(self.bucket)}) |> range(start: 0)"
            f" |> filter(fn: (r) => r._measurement == {_flux_str(measurement)})"
            f" |> filter(fn: (r) => r._field == {_flux_str(field)})"
            " |> group() |> count()"
        )
        return int(rows[0]["_value"]) if rows else 0

    def deploy(self, say: Callable[[str], None]) -> None:
        from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
        from influxdb_client.rest import ApiException

        every = self.cfg.retention // 1000 if self.cfg.retention else 0
        api = self.client.buckets_api()
        try:
            bucket = api.find_bucket_by_name(self.bucket)
        except ApiException as e:
            if e.status != 404:
                raise InfluxError(f"InfluxDB buckets API: HTTP {e.status}: {str(e.body)[:300]}") from None
            return self._deploy_18(say)
        rules = [BucketRetentionRules(type="expire", every_seconds=every)] if every else []
        if bucket is None:
            api.create_bucket(bucket_name=self.bucket, retention_rules=rules, org=self.org)
            say(
                f"sink {self.cfg.id}: InfluxDB bucket {self.bucket} created "
                f"(retention {every or 'infinite'} s)"
            )
        else:
            bucket.retention_rules = rules
            api.update_bucket(bucket)
            say(
                f"sink {self.cfg.id}: InfluxDB bucket {self.bucket} ready (retention {every or 'infinite'} s)"
            )

    def _deploy_18(self, say: Callable[[str], None]) -> None:
        """InfluxDB 1.8 serves the 2.x write and query API but has no buckets: the bucket is
        ``database/retention_policy``, made through the 1.x API with the token's ``user:password``."""
        db, _, rp = self.bucket.partition("/")
        user, _, password = self.cfg.token.partition(":") if self.cfg.token else ("", "", "")
        v1 = V1Api(self.cfg, db, rp or "autogen", user or None, password or None)
        say(
            f"sink {self.cfg.id}: the server has no buckets API (InfluxDB 1.8); "
            f"bucket {self.bucket} is database/retention policy"
        )
        v1.deploy(say)

    def close(self) -> None:
        self.client.close()


def open_api(cfg: InfluxSink) -> Api:
    if cfg.api == "v2":
        return V2Api(cfg)
    return V1Api(cfg, cfg.database, cfg.retention_policy, cfg.username, cfg.password)
