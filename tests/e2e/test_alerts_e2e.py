"""End to end: MQTT readings → connector → Kafka → worker (rules) → alerts.events → alarm_events rows and a
webhook, with the worker SIGKILLed twice at random points mid-stream and restarted.

The reference is a crash-free run of the same rules over the same readings: the pure alarm engine, offline.
The transitions on ``alerts.events`` (one per id) and the rows of ``alarm_events`` equal it event for event,
field for field: no duplicate raise, no lost return, on-delay timers resumed from the saved state.
"""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
import yaml

from pipeline.core import codec
from pipeline.stages.alerts.config import AlertRule
from pipeline.stages.alerts.engine import Engine
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import deploy_cli, publish, spawn, stop
from tests.integration.test_alerts import read_events

pytestmark = pytest.mark.e2e

T0 = 1_767_225_600_000
RULES: list[dict[str, Any]] = [
    {
        "id": "hot",
        "match": "site1/*/temp",
        "levels": [{"severity": "high", "above": 25}, {"severity": "critical", "above": 28}],
        "deadband": 0.5,
        "on_delay": "5s",
        "off_delay": "5s",
        "chatter": {"activations": 3, "within": "10m"},
        "labels": {"area": "boilers"},
    },
    {
        "id": "lowp",
        "match": "site1/*/pressure",
        "levels": [{"severity": "medium", "below": 1.0}],
        "on_delay": "3s",
    },
    {"id": "badq", "kind": "quality", "span": "10s", "match": "site1/*/*", "severity": "low"},
]


def traffic(root: str) -> tuple[list[tuple[str, bytes, int | None]], list[tuple[str, int, float, str]]]:
    """3 devices, temp and pressure once a second for 20 minutes of event time, wandering across the limits,
    with bursts of bad quality."""
    rng = random.Random(5)
    events: list[tuple[int, str, bytes, tuple[str, int, float, str]]] = []
    for dev in ("b1", "b2", "b3"):
        temp, pres = 22.0, 1.5
        bad_until = -1
        for i in range(1200):
            ts = T0 + i * 1000 + rng.randint(0, 200)
            temp += rng.gauss(0, 0.4) + (0.05 if (i // 200) % 2 == 0 else -0.05)
            pres = max(0.2, pres + rng.gauss(0, 0.05))
            if rng.random() < 0.004:
                bad_until = i + rng.randint(5, 30)
            q = "bad" if i <= bad_until else "good"
            for point, v in (("temp", round(temp, 4)), ("pressure", round(pres, 4))):
                body: dict[str, Any] = {"value": v, "ts": ts}
                if q != "good":
                    body["quality"] = q
                events.append(
                    (ts, f"{root}/site1/{dev}/{point}", codec.dumps(body), (f"site1/{dev}/{point}", ts, v, q))
                )
    events.sort(key=lambda e: e[0])
    return [(t, p, ts) for ts, t, p, _ in events], [e[3] for e in events]


def offline(readings: list[tuple[str, int, float, str]]) -> list[dict[str, Any]]:
    rules = [AlertRule.model_validate(r) for r in RULES]
    engine = Engine(rules)
    out: list[dict[str, Any]] = []
    for series, ts, v, q in readings:
        for r in rules:
            if r.matches(series):
                out += engine.sample(r, series, ts, v, q)
    return out


def test_alerts_end_to_end_with_sigkills(namespace, tmp_path, monkeypatch):
    import tests.e2e.test_mqtt_to_postgres as mqtt_e2e

    ns = namespace
    monkeypatch.setattr(mqtt_e2e, "SPEED", 30.0)  # 20 min of event time in 40 s
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    received: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.headers["Idempotency-Key"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    topo = {
        "name": f"ae{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "sources": [
            {
                "id": "mqtt-ae",
                "type": "mqtt",
                "url": ns["PLANTSTREAM_MQTT_URL"],
                "client_id": f"ae-{ns['tag']}",
                "topics": [
                    {
                        "filter": f"{ns['mqtt_root']}/+/+/+",
                        "template": f"{ns['mqtt_root']}/{{site}}/{{device}}/{{point}}",
                    }
                ],
            }
        ],
        "aggregates": {"grace": "10s", "idle_timeout": "4s"},
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": ns["PLANTSTREAM_PG_DSN"],
                "schema": ns["schema"],
                "batch_delay": "200ms",
            }
        ],
        "alerts": {
            "rules": RULES,
            "subscribers": [
                {"id": "ops", "type": "webhook", "url": f"http://127.0.0.1:{port}/", "max_backoff": "1s"}
            ],
        },
    }
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    deploy_cli(topo_file)
    messages, readings = traffic(ns["mqtt_root"])
    want = offline(readings)
    assert len(want) >= 20 and {"raise", "clear", "escalate", "chatter"} <= {e["transition"] for e in want}

    connector = spawn(["connect", str(topo_file)], tmp_path / "connect.log")
    args = ["worker", str(topo_file), "--app-id", f"ae-{ns['tag']}", "--loglevel", "info"]
    procs = [connector, spawn(args, tmp_path / "worker0.log")]
    try:
        wait_for(lambda: "subscribed to" in (tmp_path / "connect.log").read_text(), 60, "the connector")
        sender = threading.Thread(
            target=publish, args=(ns["PLANTSTREAM_MQTT_URL"], messages, f"p-{ns['tag']}")
        )
        sender.start()
        rng = random.Random(ns["tag"])
        time.sleep(rng.uniform(6, 14))  # a random point of the stream
        for k in (1, 2):
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait(30)
            log = tmp_path / f"worker{k}.log"
            procs.append(spawn(args, log))
            # The killed member leaves the group only when its session times out: wait for the take-over, so
            # that the second kill hits a worker that has restored alarm state and is working.
            wait_for(lambda log=log: "alarm instance(s) restored" in log.read_text(), 120, "the restart")
            if k == 1:
                time.sleep(rng.uniform(0.5, 4))
        sender.join(120)
        assert not sender.is_alive()
        prefix = f"{ns['prefix']}alerts.events"
        got: dict[str, dict[str, Any]] = {}

        def complete() -> bool:
            for ev in read_events(ns["PLANTSTREAM_KAFKA"], prefix, len(want), 5):
                got[ev["id"]] = ev
            return len(got) >= len(want)

        wait_for(complete, 180, f"{len(want)} distinct events on alerts.events")
        assert sorted(got.values(), key=lambda e: e["id"]) == sorted(want, key=lambda e: e["id"])

        def journal() -> set[str]:
            with psycopg.connect(ns["PLANTSTREAM_PG_DSN"]) as conn:
                return {
                    r[0] for r in conn.execute(f'SELECT id FROM "{ns["schema"]}".alarm_events').fetchall()
                }

        wait_for(lambda: len(journal()) >= len(want), 60, f"{len(want)} rows in alarm_events")
        assert journal() == {e["id"] for e in want}
        notified = {e["id"] for e in want if e["notify"]}
        wait_for(lambda: set(received) >= notified, 60, f"{len(notified)} webhook deliveries")
        assert set(received) == notified  # redelivered after a kill: with the same Idempotency-Key
    finally:
        stop(procs)
        server.shutdown()
