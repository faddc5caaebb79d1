"""``plantstream serve`` on the real services: every endpoint, bad parameters, tokens, tenant isolation
through the API and the stream, resuming a stream, and a client that never reads.

Two tenants: A owns site a1, B owns b1; both sites have a device d1 whose temp crosses an alert rule, and a
control loop. The worker runs in-process, the service on a real port.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest

from connectors.common.producer import TelemetryProducer
from connectors.timescale import tenancy
from pipeline.deploy import deploy
from pipeline.topology import validate_data
from pipeline.worker import build_worker
from tests.api import EventReader, auth, serving
from tests.conftest import wait_for
from tests.integration.test_event_time import minute_now, send

pytestmark = pytest.mark.integration
S = 1000


def readings(start: int, seconds: int, hot_from: int | None = None) -> list[tuple[str, int, float, str]]:
    """Every 5 s, both sites: d1/temp (90 from ``hot_from`` on, else 70), d2/flow, and a loop's pv/sp/op."""
    out = []
    for t in range(start, start + seconds * S, 5 * S):
        for site in ("a1", "b1"):
            hot = hot_from is not None and t >= hot_from
            out.append((f"{site}/d1/temp", t, 90.0 if hot else 70.0 + (t // S) % 3, "good"))
            out.append((f"{site}/d2/flow", t, 12.5 + (t // S) % 5, "good"))
            for pt, v in (("pv", 50.0 + (t // S) % 4), ("sp", 50.0), ("op", 40.0)):
                out.append((f"{site}/fic/{pt}", t, v, "good"))
    return out


@pytest.fixture(scope="module")
def env(services_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    schema = f"t_{tag}"
    dsn = services_env["PLANTSTREAM_PG_DSN"]
    loops = [
        {"id": f"FIC_{site}", "pv": f"{site}/fic/pv", "sp": f"{site}/fic/sp", "op": f"{site}/fic/op",
         "pv_lo": 0, "pv_hi": 100, "ti": "30s", "ts": "5s", "window": "1m"}
        for site in ("a1", "b1")
    ]  # fmt: skip
    topo = validate_data(
        {
            "name": f"api{tag}",
            "prefix": f"t{tag}.",
            "broker": {"bootstrap": services_env["PLANTSTREAM_KAFKA"], "partitions": 2},
            "aggregates": {"grace": "5s", "idle_timeout": "2s", "checkpoint_interval": "300ms"},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": dsn,
                    "schema": schema,
                    "batch_delay": "100ms",
                    "topics": ["agg_1m", "kpi_results", "alarm_events", "alarms"],
                }
            ],
            "loops": loops,
            "alerts": {
                "rules": [{"id": "hot", "match": "*/d1/temp", "levels": [{"severity": "high", "above": 80}]}]
            },
        }
    )
    deploy(topo, say=lambda m: None)
    with psycopg.connect(dsn, autocommit=True) as conn:
        tenancy.add_tenant(conn, schema, "a", ["a1"], "Tenant A")
        tenancy.add_tenant(conn, schema, "b", ["b1"])
        tokens = {t: tenancy.create_token(conn, schema, t, f"{t}-test", None)[0] for t in ("a", "b")}
        tokens["expired"] = tenancy.create_token(conn, schema, "a", "old", timedelta(seconds=-1))[0]
        revoked, rec = tenancy.create_token(conn, schema, "a", "gone", None)
        tenancy.revoke_token(conn, schema, rec.id)
        tokens["revoked"] = revoked
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    start = minute_now() - 4 * 60 * S
    send(producer, readings(start, 4 * 60, hot_from=start + 3 * 60 * S), per=10)
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"api-{tag}")
    worker.start()

    def count(sql: str) -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(sql.format(s=schema)).fetchone()
            return int(row[0]) if row else 0

    try:
        # Every minute of both sites closed (4 each), so no test sees a minute close between two reads.
        wait_for(
            lambda: count("SELECT count(*) FROM {s}.agg_1m WHERE point = 'temp'") == 8,
            90,
            "the 4 minutes of d1/temp closed at both sites",
        )
        wait_for(lambda: count("SELECT count(*) FROM {s}.alarms WHERE active") == 2, 90, "an alarm per site")
        with serving(topo, app_id=f"api-{tag}") as base:
            yield {"base": base, "tokens": tokens, "topo": topo, "producer": producer, "dsn": dsn,
                   "schema": schema, "start": start, "count": count}  # fmt: skip
    finally:
        worker.stop()
        with psycopg.connect(dsn, autocommit=True) as conn:
            tenancy.drop(conn, schema)
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def get(env: dict[str, Any], path: str, who: str = "a", **params: Any) -> httpx.Response:
    return httpx.get(env["base"] + path, headers=auth(env["tokens"][who]), params=params, timeout=30)


def test_health_names_the_broker_the_database_and_the_lag(env: dict[str, Any]) -> None:
    r = httpx.get(env["base"] + "/api/health", timeout=30)
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["status"] == "ok" and h["broker"]["status"] == "ok" and h["database"]["status"] == "ok"
    assert "aggregate" in h["consumer_lag"] and all(v >= 0 for v in h["consumer_lag"].values())
    assert h["live"]["status"] == "ok" and h["live"]["series"] >= 10


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nonsense", "Basic abc", "Bearer pst_x_y"])
def test_missing_and_bad_tokens_are_refused_with_a_reason(env: dict[str, Any], header: str | None) -> None:
    r = httpx.get(env["base"] + "/api/sites", headers={"Authorization": header} if header else {}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized" and r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("which", ["expired", "revoked"])
def test_expired_and_revoked_tokens_are_refused(env: dict[str, Any], which: str) -> None:
    r = get(env, "/api/sites", which)
    assert r.status_code == 401 and which in r.json()["detail"]


def test_sites_and_series_are_the_tenants_own(env: dict[str, Any]) -> None:
    for who, site in (("a", "a1"), ("b", "b1")):
        sites = get(env, "/api/sites", who).json()
        assert [s["site"] for s in sites] == [site]
        assert sites[0]["devices"] == 3 and sites[0]["series"] == 5 and sites[0]["active_alarms"] == 1
        series = get(env, "/api/series", who).json()
        assert {s["site"] for s in series} == {site} and len(series) == 5
        temp = next(s for s in series if s["point"] == "temp")
        assert temp["latest"]["value"] == 90.0 and temp["latest"]["quality"] == "good"
    assert get(env, "/api/series", "a", site="b1").json() == []
    assert [s["device"] for s in get(env, "/api/series", "a", device="d2").json()] == ["d2"]


def test_aggregates_of_a_series_in_a_range(env: dict[str, Any]) -> None:
    start = env["start"]
    r = get(env, "/api/series/a1/d1/temp/aggregates", **{"from": start, "to": start + 10 * 60 * S})
    assert r.status_code == 200, r.text
    rows = r.json()
    with psycopg.connect(env["dsn"]) as conn:
        want = conn.execute(
            f"SELECT count(*), sum(count) FROM {env['schema']}.agg_1m WHERE series = 'a1/d1/temp'"
        ).fetchone()
    assert want is not None and len(rows) == want[0] == 4 and sum(r["count"] for r in rows) == want[1]
    assert rows == sorted(rows, key=lambda r: r["bucket"])
    hour = get(env, "/api/series/a1/d1/temp/aggregates", resolution="1h", **{"from": start - 3600 * S}).json()
    assert sum(h["count"] for h in hour) == want[1]
    # Another tenant's series: nothing (not an error: it may be a series with no data yet).
    assert get(env, "/api/series/b1/d1/temp/aggregates", **{"from": start}).json() == []
    assert len(get(env, "/api/series/b1/d1/temp/aggregates", "b", **{"from": start}).json()) == want[0]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "12:00"}, "to"),
        ({"resolution": "5m"}, "resolution"),
        ({"limit": 0}, "limit"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
    ],
)
def test_bad_parameters_are_named(env: dict[str, Any], params: dict[str, Any], param: str) -> None:
    r = get(env, "/api/series/a1/d1/temp/aggregates", **params)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "bad parameter" and [d["param"] for d in body["detail"]] == [param]


def test_loops_and_their_kpis(env: dict[str, Any]) -> None:
    assert [lp["loop"] for lp in get(env, "/api/loops").json()] == ["FIC_a1"]
    r = get(env, "/api/loops/FIC_a1/kpis", **{"from": env["start"] - 3600 * S})
    assert r.status_code == 200 and all(k["kpi"] for k in r.json())
    assert get(env, "/api/loops/FIC_b1/kpis").status_code == 404  # not this tenant's
    assert get(env, "/api/loops/nope/kpis").status_code == 404


def test_alarms_current_journal_and_an_audited_ack(env: dict[str, Any]) -> None:
    active = get(env, "/api/alarms").json()
    assert [(a["instance"], a["state"], a["site"]) for a in active] == [("hot/a1/d1/temp", "unack", "a1")]
    assert [a["instance"] for a in get(env, "/api/alarms", "b").json()] == ["hot/b1/d1/temp"]
    # Another tenant's alarm cannot be seen, so cannot be acknowledged.
    assert (
        httpx.post(
            env["base"] + "/api/alarms/hot/b1/d1/temp/ack", headers=auth(env["tokens"]["a"])
        ).status_code
        == 404
    )
    r = httpx.post(
        env["base"] + "/api/alarms/hot/a1/d1/temp/ack",
        headers=auth(env["tokens"]["a"]),
        json={"comment": "on it"},
    )
    assert r.status_code == 202 and r.json()["by"] == "a-test@a"

    def journal() -> list[dict[str, Any]]:
        return get(env, "/api/alarms/events", **{"from": env["start"]}).json()

    acked = wait_for(lambda: [e for e in journal() if e["transition"] == "ack"], 60, "the ack in the journal")
    assert acked[0]["by"] == "a-test@a" and acked[0]["comment"] == "on it" and acked[0]["state"] == "acked"
    assert {e["source"].split("/")[0] for e in journal()} == {"a1"}
    assert wait_for(lambda: get(env, "/api/alarms").json()[0]["state"] == "acked", 30, "acked")
    bad = httpx.post(env["base"] + "/api/alarms/hot/a1/d1/temp/shelve", headers=auth(env["tokens"]["a"]),
                     json={"duration": "soon"})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["detail"][0]["param"] == "duration"
    ok = httpx.post(env["base"] + "/api/alarms/hot/a1/d1/temp/shelve", headers=auth(env["tokens"]["a"]),
                    json={"duration": "1h"})  # fmt: skip
    assert ok.status_code == 202
    shelved = wait_for(lambda: [e for e in journal() if e["transition"] == "shelve"], 60, "the shelve")
    assert shelved[0]["shelved_until"] is not None
    back = httpx.post(env["base"] + "/api/alarms/hot/a1/d1/temp/unshelve", headers=auth(env["tokens"]["a"]))
    assert back.status_code == 202
    wait_for(lambda: [e for e in journal() if e["transition"] == "unshelve"], 60, "the unshelve")


def test_the_stream_carries_the_tenants_events_only_and_resumes(env: dict[str, Any]) -> None:
    a = EventReader(env["base"] + "/api/stream", env["tokens"]["a"])
    b = EventReader(env["base"] + "/api/stream", env["tokens"]["b"], {"kinds": ["agg"]})
    assert a.open.wait(10) and b.open.wait(10)
    start = env["start"] + 4 * 60 * S
    send(env["producer"], readings(start, 90), per=10)  # closes the next minute: aggregates, latest values
    assert env["producer"].flush(30) == 0
    wait_for(lambda: a.of("agg") and a.of("latest") and b.of("agg"), 60, "aggregates and latest values")
    assert {e["site"] for e in a.of("agg")} | {e["site"] for e in a.of("latest")} == {"a1"}
    assert {e["site"] for e in b.of("agg")} == {"b1"} and not b.of("latest")
    # A reconnecting client gets what it missed, after the last id it saw, once.
    seen = a.events[0][0]
    a.stop()
    again = EventReader(env["base"] + "/api/stream", env["tokens"]["a"], last_id=seen)
    wait_for(lambda: len(again.events) >= len(a.events) - 1, 30, "the missed events")
    assert [e[0] for e in again.events[: len(a.events) - 1]] == [e[0] for e in a.events[1:]]
    gone = EventReader(env["base"] + "/api/stream", env["tokens"]["a"], last_id="other-boot.1")
    wait_for(lambda: gone.events, 10, "a resync")
    assert gone.events[0][1] == "resync"


def test_a_client_that_never_reads_does_not_hold_up_another(env: dict[str, Any]) -> None:
    """The bound: with a stalled client on the same stream, the reading client gets every event of a burst
    of 6,000 within 10 s of it being produced. (That the stalled one is then cut off, and its memory freed,
    is tests/unit/test_live_feed.py's.)"""
    host, port = env["base"].removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    token = env["tokens"]["a"]
    stalled.sendall(
        f"GET /api/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    # ... and never reads
    reader = EventReader(env["base"] + "/api/stream", env["tokens"]["a"], {"kinds": ["latest"]})
    assert reader.open.wait(10)
    start = env["start"] + 6 * 60 * S
    burst = [
        (f"a1/burst/p{i:04d}", start + k * S, float(i + k), "good") for k in range(2) for i in range(6000)
    ]
    send(env["producer"], burst, per=100)
    assert env["producer"].flush(30) == 0
    t0 = time.monotonic()
    wait_for(
        lambda: len({e["series"] for e in reader.of("latest") if "/burst/" in e["series"]}) == 6000,
        10,
        "every burst series at the reading client",
    )
    assert time.monotonic() - t0 < 10 and not reader.closed.is_set()
    stalled.close()
    reader.stop()


def test_openapi_documents_every_endpoint(env: dict[str, Any]) -> None:
    paths = httpx.get(env["base"] + "/openapi.json", timeout=30).json()["paths"]
    for p in ("/api/health", "/api/sites", "/api/series", "/api/series/{series}/aggregates", "/api/loops",
              "/api/loops/{loop}/kpis", "/api/alarms", "/api/alarms/events", "/api/alarms/{instance}/ack",
              "/api/alarms/{instance}/shelve", "/api/stream"):  # fmt: skip
        assert p in paths, p
    page = httpx.get(env["base"] + "/", timeout=30)
    assert page.status_code == 200 and "plantstream" in page.text
