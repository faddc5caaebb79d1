"""A worker SIGKILLed after it dead-lettered input and before it committed that input: the next owner reads
the input again and does not dead-letter it a second time (tests/faults/test_worker_kills.py covers the
same under a live stream; here the window is made certain by a 60 s checkpoint interval).

Both ways a partition's previous owner can leave it are covered: with nothing committed yet (the first
worker of the group) and with an earlier commit (a clean stop, then a crash)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.common.producer import TelemetryProducer
from pipeline.stages.deadletters import decode_mark
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import read_dlq
from tests.faults.services import child_env, deployed, spawn, terminate

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults


def test_dead_letters_are_not_sent_again_after_a_crash(namespace: dict[str, str], tmp_path: Path) -> None:
    ns = namespace
    topo: dict[str, Any] = {
        "name": f"dlq{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 1},
        # Nothing is committed for a minute: a kill within it always lands after dead letters were sent.
        "aggregates": {"checkpoint_interval": "60s"},
        "sinks": [],
    }
    env = child_env()
    topo_file, t = deployed(topo, tmp_path, env)
    producer = TelemetryProducer(ns["PLANTSTREAM_KAFKA"], t.raw_topic, t.dlq_topic)
    sent_bad = 0

    def send_bad(n: int) -> None:
        nonlocal sent_bad
        for _ in range(n):
            sent_bad += 1
            bad = {
                "point": "p",
                "ts": 1_700_000_000_000 + sent_bad,
                "value": "not a number",
                "quality": "good",
            }
            batch = {"v": 1, "source": "dlq", "site": "s", "device": f"d{sent_bad}", "readings": [bad]}
            producer.send_batch(batch, lambda err: None)  # type: ignore[arg-type]
        assert producer.flush(30) == 0

    procs: list[subprocess.Popen[bytes]] = []

    def worker(n: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker{n}.log"
        p = spawn(
            [
                "worker",
                str(topo_file),
                "--app-id",
                f"dlq-{ns['tag']}",
                "--metrics",
                "off",
                "--loglevel",
                "info",
            ],
            log,
            env,
        )
        procs.append(p)
        wait_for(lambda: "assigned input partitions [0]" in log.read_text(), 60, f"worker {n} assigned")
        return p

    def dead_letters(expect: int) -> list[dict[str, Any]]:
        """The DLQ once it holds ``expect`` records (and a little longer: more would be a finding)."""
        dead = read_dlq(ns["PLANTSTREAM_KAFKA"], t.dlq_topic, expect, 60)
        assert len(dead) >= expect, f"{len(dead)} dead letters, waiting for {expect}"
        return dead

    try:
        # 1. The group's first worker: nothing committed when it dies.
        w = worker(1)
        send_bad(5)
        dead_letters(5)
        w.kill()
        w.wait(10)
        w = worker(2)
        send_bad(1)  # read after the five again: once it is dead-lettered, the five were handled again
        dead = dead_letters(6)
        assert sorted(d["offset"] for d in dead) == list(range(6)), "a dead letter sent twice"
        assert "already sent after the last commit" in (tmp_path / "worker2.log").read_text()

        # 2. After a clean stop (a commit with a mark), a crash.
        terminate(w)
        assert w.returncode == 0, (tmp_path / "worker2.log").read_text()[-3000:]
        reader = Consumer(
            {"bootstrap.servers": ns["PLANTSTREAM_KAFKA"], "group.id": f"dlq-{ns['tag']}-aggregate"}
        )
        try:
            last = reader.committed([TopicPartition(t.raw_topic, 0)], timeout=10)[0]
        finally:
            reader.close()
        assert last.offset == 6 and decode_mark(last.metadata) is not None, last
        w = worker(3)
        send_bad(4)
        dead_letters(10)
        w.kill()
        w.wait(10)
        worker(4)
        send_bad(1)
        dead = dead_letters(11)
        assert sorted(d["offset"] for d in dead) == list(range(11)), "a dead letter sent twice"
        assert all(d["reason"].startswith("invalid") for d in dead)
    finally:
        for p in procs:
            terminate(p)
