"""Alert rules in the worker, on the real Kafka: readings and aggregates → rules → alerts.events and
alerts.state, an operator's ack through alerts.commands, and the same input in a second namespace giving the
same events."""

from __future__ import annotations

import time
from typing import Any

import pytest

from connectors.common.producer import TelemetryProducer
from pipeline.control import alert_states, send_alert_command
from pipeline.core import codec
from pipeline.deploy import deploy
from pipeline.topology import validate_data
from pipeline.worker import build_worker
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import read_dlq
from tests.integration.test_event_time import minute_now, send

pytestmark = pytest.mark.integration
S = 1000


def topology(
    ns: dict[str, str], subscribers: list[dict[str, Any]] | None = None, influx: str | None = None
) -> Any:
    data = topology_data(ns)
    data["alerts"]["subscribers"] = subscribers or []
    if influx is not None:
        data["sinks"].append({"id": "ifx", "type": "influx", "url": influx, "database": f"t_{ns['tag']}"})
    return validate_data(data)


def topology_data(ns: dict[str, str]) -> dict[str, Any]:
    return dict(
        {
            "name": f"al{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
            "aggregates": {"grace": "10s", "idle_timeout": "2s", "checkpoint_interval": "300ms"},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": ns["PLANTSTREAM_PG_DSN"],
                    "schema": ns["schema"],
                    "batch_delay": "100ms",
                }
            ],
            "alerts": {
                "rules": [
                    {
                        "id": "hot",
                        "match": "site/*/temp",
                        "levels": [{"severity": "high", "above": 80}, {"severity": "critical", "above": 90}],
                        "deadband": 1.0,
                        "on_delay": "10s",
                        "message": "{series} at {value} over {limit}",
                        "labels": {"team": "hvac"},
                    },
                    {
                        "id": "peak",
                        "input": "agg_1m",
                        "match": "site/*/temp",
                        "field": "max",
                        "levels": [{"severity": "low", "above": 95}],
                    },
                ]
            },
        }
    )


def script(start: int) -> list[tuple[str, int, float, str]]:
    """d1: 2 min at 70, 1 min at 85, 1 min at 96, 30 s at 89.5, 30 s at 85, 2 min at 70; d2: 70 all along."""
    out = []
    plan = [(120, 70.0), (60, 85.0), (60, 96.0), (30, 89.5), (30, 85.0), (120, 70.0)]
    t = start
    for secs, v in plan:
        for _ in range(secs // 5):
            out.append(("site/d1/temp", t, v, "good"))
            out.append(("site/d2/temp", t, 70.0, "good"))
            t += 5 * S
    return out


def expected(start: int) -> list[tuple[str, int, str, str, str | None]]:
    m = 60 * S
    return [
        ("hot/site/d1/temp", start + 2 * m + 10 * S, "raise", "unack", "high"),  # 10 s on-delay
        ("hot/site/d1/temp", start + 3 * m + 10 * S, "escalate", "unack", "critical"),
        # 89.5 stays critical (deadband 1); 85 lowers it at once (no off-delay)
        ("hot/site/d1/temp", start + 4 * m + 30 * S, "deescalate", "unack", "high"),
        ("hot/site/d1/temp", start + 5 * m, "clear", "rtn_unack", None),
        ("peak/site/d1/temp", start + 3 * m, "raise", "unack", "low"),  # the minute whose max is 96
        ("peak/site/d1/temp", start + 4 * m, "clear", "rtn_unack", None),
    ]


def read_events(bootstrap: str, topic: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """Every record on ``topic`` (JSON), once ``n`` are there or the time is up, then 2 s more."""
    return read_dlq(bootstrap, topic, n, timeout)  # reads any topic of JSON records, not only the DLQ


def run_scenario(
    ns: dict[str, str], start: int, ack: dict[str, Any] | None, check: Any = None, influx: str | None = None
) -> list[dict[str, Any]]:
    topo = topology(ns, influx=influx)
    deploy(topo, say=lambda m: None)
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    send(producer, script(start), per=2)
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"al-{ns['tag']}")
    worker.start()
    try:
        want = expected(start)
        events = read_events(topo.broker.bootstrap, topo.alerts_events_topic, len(want), 90)
        if ack is not None:
            from pipeline.core.kafka import Outbox

            out = Outbox(topo.broker.bootstrap, "t")
            out.produce(topo.alerts_commands_topic, ack["instance"].encode(), codec.dumps(ack), ack["at"])
            out.produce(topo.alerts_commands_topic, ack["instance"].encode(), codec.dumps(ack), ack["at"])
            assert out.flush_quietly(10) == 0
            events = read_events(topo.broker.bootstrap, topo.alerts_events_topic, len(want) + 1, 60)
        if check is not None:
            check(events)  # while the worker runs: its sinks are still writing
        return events
    finally:
        worker.stop()


def test_rules_on_readings_and_aggregates_raise_escalate_clear_and_take_an_ack(namespace, influx_urls):
    start = minute_now() - 20 * 60 * S
    ack = {
        "id": "ack-1",
        "instance": "hot/site/d1/temp",
        "action": "ack",
        "by": "op",
        "at": start,
        "comment": "seen",
    }
    import psycopg

    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]

    def journal() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(
                f'SELECT id, transition, state, "by" FROM "{schema}".alarm_events ORDER BY id'
            ).fetchall()

    def in_the_database(events: list[dict[str, Any]]) -> None:
        # The sink keeps the journal (a row per event id: the ack sent twice is one) and the current state.
        wait_for(lambda: len(journal()) >= len(events), 60, f"{len(events)} rows in alarm_events")
        assert sorted(r[0] for r in journal()) == sorted(e["id"] for e in events)

        def current() -> dict[str, str]:
            with psycopg.connect(dsn) as conn:
                return dict(conn.execute(f'SELECT instance, state FROM "{schema}".alarms').fetchall())

        want = {"hot/site/d1/temp": "normal", "peak/site/d1/temp": "rtn_unack"}
        wait_for(lambda: current() == want, 60, f"alarms {want}")
        # ... and InfluxDB the journal as the alarm_events measurement, a point per event.
        from tests import influxdb

        db = f"t_{namespace['tag']}"
        wait_for(
            lambda: influxdb.count_v1(str(influx_urls["v1"]), db, "alarm_events", "seq") >= len(events),
            60,
            "alarm_events in InfluxDB",
        )
        assert influxdb.count_v1(str(influx_urls["v1"]), db, "alarm_events", "seq") == len(events)
        influxdb.drop(str(influx_urls["v1"]), db)

    events = run_scenario(namespace, start, ack, in_the_database, influx=influx_urls["v1"])
    got = sorted((e["instance"], e["ts"], e["transition"], e["state"], e["severity"]) for e in events)
    # A command's event carries the instance's newest event time (d1's last reading) and, as `at`, its own.
    want = sorted([*expected(start), ("hot/site/d1/temp", start + 415 * S, "ack", "normal", None)])
    assert got == want  # the ack sent twice is applied once
    raise_ = next(e for e in events if e["transition"] == "raise" and e["rule"] == "hot")
    assert raise_["message"] == "site/d1/temp at 85 over 80" and raise_["labels"] == {"team": "hvac"}
    assert raise_["id"] == "hot/site/d1/temp#1" and raise_["notify"] is True
    acked = next(e for e in events if e["transition"] == "ack")
    assert (acked["by"], acked["comment"], acked["command"]) == ("op", "seen", "ack-1")
    topo = topology(namespace)
    states = alert_states(topo)
    assert states["hot/site/d1/temp"]["state"] == "normal"
    assert states["peak/site/d1/temp"]["state"] == "rtn_unack"
    assert not any(k.endswith("d2/temp") for k in states)


def test_the_same_input_gives_the_same_events(namespace, services_env):
    import uuid

    start = minute_now() - 20 * 60 * S
    first = run_scenario(namespace, start, None)
    other = {**namespace, "tag": uuid.uuid4().hex[:8]}
    other["prefix"] = f"t{other['tag']}."
    second = run_scenario(other, start, None)
    key = lambda e: e["id"]  # noqa: E731
    assert sorted(first, key=key) == sorted(second, key=key)
    assert len({e["id"] for e in first}) == len(first) == len(expected(start))


def test_a_command_for_an_unknown_instance_goes_to_the_dlq(namespace):
    topo = topology(namespace)
    deploy(topo, say=lambda m: None)
    worker = build_worker(topo, f"al-{namespace['tag']}")
    worker.start()
    try:
        send_alert_command(topo, "hot/site/nowhere/temp", "ack", "op")
        out_bad = {"id": "x", "instance": "hot/site/d/p", "action": "mute", "by": "op", "at": 1}
        from pipeline.core.kafka import Outbox

        o = Outbox(topo.broker.bootstrap, "t")
        o.produce(topo.alerts_commands_topic, b"k", codec.dumps(out_bad), None)
        assert o.flush_quietly(10) == 0
        dl = read_dlq(topo.broker.bootstrap, topo.dlq_topic, 2, 60)
        reasons = sorted(x["reason"] for x in dl)
        assert any("no alarm instance 'hot/site/nowhere/temp'" in r for r in reasons), reasons
        assert any("action must be one of" in r for r in reasons), reasons
        wait_for(lambda: worker.alive(), 5, "the worker to stay up")
    finally:
        worker.stop()


def test_a_webhook_down_for_a_while_gets_every_transition_once_in_order_and_mqtt_keeps_the_state(namespace):
    import json
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ns = namespace
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    received: list[tuple[str, dict[str, Any]]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Idempotency-Key"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    subscribers = [
        {"id": "ops", "type": "webhook", "url": f"http://127.0.0.1:{port}/hook", "max_backoff": "1s"},
        {
            "id": "scada",
            "type": "mqtt",
            "url": ns["PLANTSTREAM_MQTT_URL"],
            "topic": f"{ns['mqtt_root']}/{{instance}}",
        },
    ]
    topo = topology(ns, subscribers)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 20 * 60 * S
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    send(producer, script(start), per=2)
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"al-{ns['tag']}")
    worker.start()
    server = None
    try:
        want = expected(start)
        assert len(read_events(topo.broker.bootstrap, topo.alerts_events_topic, len(want), 90)) == len(want)
        time.sleep(3)  # the receiver stays down while the subscriber retries (capped at 1 s)
        assert received == []
        server = ThreadingHTTPServer(("127.0.0.1", port), Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        wait_for(lambda: len(received) >= len(want), 60, f"{len(want)} webhook deliveries")
        time.sleep(1)  # nothing more may come
        ids = [k for k, _ in received]
        assert len(ids) == len(set(ids)) == len(want)
        assert all(k == ev["id"] for k, ev in received)
        for inst in {ev["instance"] for _, ev in received}:
            seqs = [ev["seq"] for _, ev in received if ev["instance"] == inst]
            assert seqs == sorted(seqs) == list(range(1, len(seqs) + 1))
        # A client that subscribes now reads each instance's current state, retained by the broker.
        host, p = ns["PLANTSTREAM_MQTT_URL"].removeprefix("mqtt://").split(":")
        retained: dict[str, dict[str, Any]] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{ns['tag']}")
        client.on_message = lambda c, u, msg: retained.__setitem__(msg.topic, json.loads(msg.payload))
        client.on_connect = lambda c, u, f, rc, props=None: c.subscribe(f"{ns['mqtt_root']}/#", qos=1)
        client.connect(host, int(p))
        client.loop_start()
        try:
            wait_for(lambda: len(retained) >= 2, 30, "the retained states")
        finally:
            client.loop_stop()
            client.disconnect()
        assert {k: v["state"] for k, v in retained.items()} == {
            f"{ns['mqtt_root']}/hot/site/d1/temp": "rtn_unack",
            f"{ns['mqtt_root']}/peak/site/d1/temp": "rtn_unack",
        }
    finally:
        worker.stop()
        if server is not None:
            server.shutdown()
