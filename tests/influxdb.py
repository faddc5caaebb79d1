"""Read what the InfluxDB sink wrote back from the server: InfluxQL (1.x API) or Flux (2.x API)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

from tests.reference import FIELDS


def influxql(url: str, db: str, query: str) -> Any:
    body = urllib.parse.urlencode({"db": db, "q": query, "epoch": "ms"}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/query", data=body), timeout=30) as r:
        return json.loads(r.read())


def _key(row: dict[str, Any]) -> str:
    return f"{row['site']}/{row['device']}/{row['point']}"


def aggs_v1(url: str, db: str, measurement: str = "agg_1m") -> dict[tuple[str, int], dict[str, Any]]:
    """{(series, window_start): fields} of an aggregate measurement, through InfluxQL."""
    res = influxql(url, db, f'SELECT * FROM "{measurement}"')["results"][0]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for s in res.get("series", []):
        for v in s["values"]:
            row = dict(zip(s["columns"], v, strict=True))
            out[(_key(row), int(row["time"]))] = {f: row.get(f) for f in FIELDS}
    return out


def count_v1(url: str, db: str, measurement: str, field: str) -> int:
    res = influxql(url, db, f'SELECT count("{field}") FROM "{measurement}"')["results"][0]
    return int(res["series"][0]["values"][0][1]) if res.get("series") else 0


def _flux(url: str, token: str, org: str, flux: str) -> list[dict[str, Any]]:
    from influxdb_client import InfluxDBClient

    with InfluxDBClient(url=url, token=token, org=org, timeout=30_000) as client:
        return [dict(r.values) for t in client.query_api().query(flux) for r in t.records]


def aggs_v2(
    url: str, bucket: str, measurement: str = "agg_1m", token: str = "u:p", org: str = "-"
) -> dict[tuple[str, int], dict[str, Any]]:
    """{(series, window_start): fields} of an aggregate measurement, through Flux."""
    rows = _flux(
        url,
        token,
        org,
        f'from(bucket: "{bucket}") |> range(start: 2000-01-01T00:00:00Z, stop: 2100-01-01T00:00:00Z)'
        f' |> filter(fn: (r) => r._measurement == "{measurement}")'
        ' |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")',
    )
    return {(_key(r), round(r["_time"].timestamp() * 1000)): {f: r.get(f) for f in FIELDS} for r in rows}


def count_v2(url: str, bucket: str, measurement: str, field: str, token: str = "u:p", org: str = "-") -> int:
    rows = _flux(
        url,
        token,
        org,
        f'from(bucket: "{bucket}") |> range(start: 2000-01-01T00:00:00Z, stop: 2100-01-01T00:00:00Z)'
        f' |> filter(fn: (r) => r._measurement == "{measurement}" and r._field == "{field}")'
        " |> group() |> count()",
    )
    return int(rows[0]["_value"]) if rows else 0


def drop(url: str, db: str) -> None:
    influxql(url, db, f'DROP DATABASE "{db}"')
