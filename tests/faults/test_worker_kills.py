"""Two workers SIGKILLed again and again under a live stream: nothing lost, nothing twice, DLQ exact.

Two ``plantstream worker`` processes share the topology (4 partitions); a live stream of readings (600/s
here, 5,000/s in ``make faults``) runs for 30 s (ten minutes in ``make faults``) while one worker or the
other is SIGKILLed every 8-12 s (20-40 s in ``make faults``) and started again at once. A few readings in the
stream are invalid. Then ``readings`` equals every valid reading sent, ``agg_1m`` equals pandas over them,
no row is there twice, and the DLQ holds exactly the invalid readings, each once (a reading dead-lettered
after the last checkpoint of a killed worker is read again by the next owner, which does not send its dead
letter a second time).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.common.producer import TelemetryProducer
from pipeline.core import codec
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq, stop
from tests.faults.conftest import FULL, length
from tests.faults.services import child_env, deployed, readings_rows, spawn
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration
POINTS = ("t", "p", "f", "q")


def test_workers_killed_again_and_again_lose_and_double_nothing(
    namespace: dict[str, str], tmp_path: Path
) -> None:
    ns = namespace
    rate = 5000 if FULL else 600  # readings per second
    duration = length(30, 600)
    kill_every = (20.0, 40.0) if FULL else (8.0, 12.0)
    devices = rate // len(POINTS)  # each device: one reading per point per second
    topo: dict[str, Any] = {
        "name": f"kills{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 4},
        "aggregates": {"grace": "5s", "idle_timeout": "20s", "checkpoint_interval": "1s"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": ns["PLANTSTREAM_PG_DSN"], "schema": ns["schema"],
             "timescaledb": "off", "topics": ["agg_1m", "readings"], "batch_delay": "200ms"}
        ],
    }  # fmt: skip
    env = child_env()
    topo_file, t = deployed(topo, tmp_path, env)
    producer = TelemetryProducer(ns["PLANTSTREAM_KAFKA"], t.raw_topic, t.dlq_topic)
    app = f"kills-{ns['tag']}"

    def worker(i: int, n: int) -> Any:
        return spawn(
            ["worker", str(topo_file), "--app-id", app, "--metrics", "off", "--loglevel", "info"],
            tmp_path / f"worker{i}-{n}.log",
            env,
        )

    workers = [worker(0, 0), worker(1, 0)]
    procs = list(workers)
    sent: list[tuple[str, int, float, str]] = []
    bad: list[tuple[str, int]] = []
    failures: list[BaseException] = []
    start = int(time.time()) * 1000 - 3600_000  # an hour back: event time runs at the wall clock's pace

    def live() -> None:
        try:
            t0 = time.monotonic()
            for sec in range(int(duration)):
                time.sleep(max(0.0, t0 + sec - time.monotonic()))
                ts = start + sec * 1000
                for d in range(devices):
                    rs = [
                        {
                            "point": pt,
                            "ts": ts,
                            "value": float((sec * 7 + d * 3 + k) % 101) / 4,
                            "quality": "good",
                        }
                        for k, pt in enumerate(POINTS)
                    ]
                    if (sec * devices + d) % 997 == 0:  # now and then an invalid reading among good ones
                        rs.append({"point": "bad", "ts": ts, "value": "not a number", "quality": "good"})
                        bad.append((f"site/d{d}/bad", ts))
                    batch = {"v": 1, "source": "faults", "site": "site", "device": f"d{d}", "readings": rs}
                    producer.send_batch(batch, lambda err: None)  # type: ignore[arg-type]
                    for r in rs:
                        if r["point"] != "bad":
                            sent.append((f"site/d{d}/{r['point']}", ts, r["value"], "good"))
                producer.poll(0)
            assert producer.flush(60) == 0
        except BaseException as e:
            failures.append(e)

    stream = threading.Thread(target=live, daemon=True)
    kills = 0
    try:
        stream.start()
        rnd = random.Random(7)
        while stream.is_alive():
            stream.join(rnd.uniform(*kill_every))
            if not stream.is_alive():
                break
            i = rnd.randrange(2)
            workers[i].kill()
            workers[i].wait(30)
            kills += 1
            workers[i] = worker(i, kills)
            procs.append(workers[i])
        assert not failures, failures
        assert kills >= 2

        want = sorted((s, ts, v) for s, ts, v, _q in sent)
        dsn = ns["PLANTSTREAM_PG_DSN"]
        wait_for(lambda: len(readings_rows(dsn, ns["schema"])) >= len(want), 300, f"{len(want)} readings")
        assert sorted(readings_rows(dsn, ns["schema"])) == want  # exact, and the key forbids a second copy
        expected = expected_aggregates(sent)
        wait_for(lambda: len(agg_rows(dsn, ns["schema"])) >= len(expected), 180, f"{len(expected)} windows")
        assert compare(agg_rows(dsn, ns["schema"]), expected) == []
        dead = read_dlq(ns["PLANTSTREAM_KAFKA"], t.dlq_topic, len(bad), 60)
        origins = {(d["partition"], d["offset"]) for d in dead}
        assert len(origins) == len(dead) == len(bad), "a dead letter missing or sent twice"
        assert all(d["reason"].startswith("invalid") for d in dead)
        payloads = {(codec.loads(d["payload"])["device"], d["partition"], d["offset"]) for d in dead}
        assert sorted(p[0] for p in payloads) == sorted(s.split("/")[1] for s, _ts in bad)
    finally:
        stop(procs, 20)
