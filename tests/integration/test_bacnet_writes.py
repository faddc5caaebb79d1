"""BACnet writes end to end: WriteCommands on Kafka, the BACnet source executes them on the simulated unit,
CommandResults come back, the worker's audit sink writes write_commands rows in PostgreSQL.

Covers: a write at priority 8 lands in the priority array and presentValue; relinquish restores the
relinquish default; not-writable, above-max, priority-3 and unknown points are rejected; a device refusal
is reported failed; a redelivered command id is not executed twice (its earlier result is sent again); a
command claimed by an executor that then died is reported failed (interrupted) instead of being run again;
the CLI sends commands.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.bacnet.client import BacnetClient
from connectors.bacnet.commands import commands_group
from connectors.sim import launch
from pipeline.control import send_command
from pipeline.core import codec
from pipeline.core.commands import WriteCommand, make_command
from pipeline.deploy import deploy
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for
from tests.integration.readback import Topics
from tests.integration.test_bacnet import Ports, Running

pytestmark = pytest.mark.integration


def topology_data(ns: dict[str, str], ports: Ports) -> dict[str, Any]:
    return {
        "name": f"writes{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "aggregates": {"idle_timeout": "5s"},
        "sources": [
            {
                "id": "bms",
                "type": "bacnet",
                "local_address": f"127.0.0.3/24:{ports.client}",
                "site": "hq",
                "defaults": {"interval": "2s"},
                "priority_floor": 8,
                "devices": [
                    {
                        "instance": 1001,
                        "address": f"127.0.0.2:{ports.device}",
                        "name": "ahu1",
                        "points": [
                            {
                                "object": "analog-value,1",
                                "name": "sat_sp",
                                "writable": True,
                                "min": 10,
                                "max": 30,
                            },
                            {"object": "analog-value,7", "name": "tune", "writable": True},
                            {
                                "object": "analog-input,1",
                                "name": "sat",
                                "writable": True,
                            },  # the device refuses writes
                            {"object": "analog-input,100", "name": "zn_t1"},
                        ],
                    }
                ],
            }
        ],
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": ns["PLANTSTREAM_PG_DSN"],
                "schema": ns["schema"],
                "topics": ["agg_1m"],
                "batch_delay": "200ms",
            }
        ],
    }


async def _read(ports: Ports, ref: str, prop: str, index: int | None = None) -> Any:
    client = BacnetClient(f"127.0.0.5/24:{launch.free_udp_port('127.0.0.5')}", 599_002)
    try:
        return await client.read(f"127.0.0.2:{ports.device}", ref, prop, index)
    finally:
        client.close()


def read(ports: Ports, ref: str, prop: str = "present-value", index: int | None = None) -> Any:
    return asyncio.run(_read(ports, ref, prop, index))


def audit_rows(dsn: str, schema: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        try:
            cur = conn.execute(
                f"SELECT id, point, value, priority, requested_by, status, error, "
                f'requested_at, completed_at, source FROM "{schema}".write_commands'
            )
        except psycopg.errors.UndefinedTable:
            return {}
        cols = [d.name for d in cur.description or []]
        return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}


def claim_without_result(topo: Topology, cmd: WriteCommand) -> None:
    """What an executor leaves behind when it dies right after claiming a command."""
    p = Producer({"bootstrap.servers": topo.broker.bootstrap})
    delivered: list[Any] = []
    p.produce(
        topo.commands_topic,
        codec.dumps(cmd),
        cmd["point"].encode(),
        on_delivery=lambda err, msg: delivered.append((err, msg)),
    )
    p.flush(10)
    err, msg = delivered[0]
    assert err is None
    c = Consumer(
        {
            "bootstrap.servers": topo.broker.bootstrap,
            "enable.auto.commit": False,
            "group.id": commands_group(topo, topo.sources[0].network_id),
        }
    )
    c.commit(offsets=[TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)], asynchronous=False)
    c.close()


def test_writes_relinquish_rejections_and_audit(namespace: dict[str, str], tmp_path: Path) -> None:
    ns = namespace
    ports = Ports()
    data = topology_data(ns, ports)
    topo = validate_data(data)
    deploy(topo, say=lambda _m: None)
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(data))
    ahu = launch.start_bacnet_ahu(
        f"127.0.0.2/8:{ports.device}", 1001, args=["--zones", "5"], log=tmp_path / "ahu.log"
    )
    interrupted = make_command("hq/ahu1/tune", 99.0, 8, "crashed-optimiser")
    claim_without_result(topo, interrupted)
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker", str(topo_file), "--app-id", f"writes-{ns['tag']}"],
        stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115 - the child's log for its lifetime
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    topics = Topics(topo)
    run = Running(topo, with_commands=True)
    sent: dict[str, tuple[str, str | None]] = {}  # id -> (expected status, expected error fragment)
    try:
        executor = run.runner.executor
        assert executor is not None and executor.ready.wait(30)
        assert executor.stats.interrupted == 1
        assert read(ports, "analog-value,7") == 0.0, "an interrupted command must not run on a restart"
        sent[interrupted["id"]] = ("failed", "interrupted")

        def do(
            point: str, value: float | None, priority: int, status: str, error: str | None = None
        ) -> WriteCommand:
            cmd = make_command(point, value, priority, "pytest")
            result = send_command(topo, cmd, wait=20)
            assert result is not None, f"no result for {point} {value} @{priority}"
            assert (result["status"], result["id"], result["source"]) == (status, cmd["id"], "bms"), result
            if error is None:
                assert result["error"] is None
            else:
                assert error in (result["error"] or ""), result
            sent[cmd["id"]] = (status, error)
            return cmd

        # Priority 8 lands in the priority array and wins over the relinquish default.
        first = do("hq/ahu1/sat_sp", 15.5, 8, "accepted")
        assert read(ports, "analog-value,1") == 15.5
        slot = read(ports, "analog-value,1", "priority-array", 8)
        assert getattr(slot, slot._choice) == 15.5
        assert int(read(ports, "analog-value,1", "current-command-priority").unsigned) == 8

        def seen(value: float) -> bool:
            topics.poll()
            return any(r["value"] == value for r in topics.series().get("hq/ahu1/sat_sp", []))

        wait_for(lambda: seen(15.5), 10, "the written value in telemetry")

        # Redelivered: the same id again (with another value) is not executed; it gets the earlier result.
        again = dict(first, value=17.0)
        repeated = send_command(topo, again, wait=20)  # type: ignore[arg-type]
        assert repeated is not None and repeated["status"] == "accepted" and repeated["value"] == 15.5
        assert executor.stats.duplicates == 1
        assert read(ports, "analog-value,1") == 15.5

        # Relinquish restores the relinquish default.
        do("hq/ahu1/sat_sp", None, 8, "accepted")
        assert read(ports, "analog-value,1") == 13.0 == read(ports, "analog-value,1", "relinquish-default")
        # What the topology forbids never reaches the device.
        do("hq/ahu1/zn_t1", 25.0, 8, "rejected", "not writable")
        do("hq/ahu1/sat_sp", 35.0, 8, "rejected", "above the point's max 30")
        do("hq/ahu1/sat_sp", 20.0, 3, "rejected", "priority 3 is above the priority floor 8")
        do("hq/ahu1/nosuch", 1.0, 8, "rejected", "not writable")
        assert read(ports, "analog-value,1") == 13.0
        # What the device refuses is reported with its error.
        do("hq/ahu1/sat", 5.0, 8, "failed", "write-access-denied")

        # The CLI: write and relinquish, exit status from the result.
        cli = [sys.executable, "-m", "pipeline.cli"]
        ok = subprocess.run(
            [
                *cli,
                "write",
                "hq/ahu1/tune",
                "7.25",
                "--priority",
                "9",
                "-t",
                str(topo_file),
                "--by",
                "operator-cli",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0 and "accepted" in ok.stdout, ok.stdout + ok.stderr
        assert read(ports, "analog-value,7") == 7.25
        no = subprocess.run(
            [*cli, "relinquish", "hq/ahu1/sat_sp", "--priority", "3", "-t", str(topo_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert no.returncode == 1 and "rejected" in no.stderr and "priority floor" in no.stderr, no.stderr

        # One audit row per command, written by the worker's sink.
        def all_rows() -> dict[str, dict[str, Any]]:
            rows = audit_rows(ns["PLANTSTREAM_PG_DSN"], ns["schema"])
            return rows if set(sent) <= set(rows) and len(rows) >= len(sent) + 2 else {}

        rows = wait_for(all_rows, 60, "the write_commands rows")
    finally:
        worker.terminate()
        try:
            run.close()
            topics.close()
        finally:
            worker.wait(30)
            launch.stop(ahu)
    for cid, (status, error) in sent.items():
        row = rows[cid]
        assert row["status"] == status and row["source"] == "bms"
        assert (row["error"] is None) if error is None else (error in row["error"])
        assert row["completed_at"] >= row["requested_at"]
    assert len(rows) == len(sent) + 2  # the two CLI commands; the duplicate added nothing
    by_first = rows[first["id"]]
    assert (by_first["point"], by_first["value"], by_first["priority"], by_first["requested_by"]) == (
        "hq/ahu1/sat_sp",
        15.5,
        8,
        "pytest",
    )
    cli_rows = [r for r in rows.values() if r["requested_by"] == "operator-cli"]
    assert len(cli_rows) == 1 and cli_rows[0]["value"] == 7.25 and cli_rows[0]["priority"] == 9
    relinq = [r for r in rows.values() if r["value"] is None and r["status"] == "accepted"]
    assert len(relinq) == 1
    assert executor.stats.accepted == 3 and executor.stats.duplicates == 1
