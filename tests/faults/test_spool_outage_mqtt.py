"""Store and forward through a Kafka outage and a SIGKILL of the connector.

A private Kafka (the shared one is not touched) carries the topology; the MQTT source runs as
``plantstream connect`` in a child process against the shared Mosquitto, with its spool on. Kafka is stopped
while messages keep coming, the connector is killed with SIGKILL during the outage and started again, then
Kafka comes back: every (series, ts) published must be in telemetry.raw, and the spool must have stayed
within ``max_bytes``. The outage lasts 20 s in ``make test``, 10 minutes in ``make faults``.

QoS 1 alone would keep unacknowledged messages in Mosquitto without a spool; what this adds is that a
message is acknowledged from the spool during the outage, and still reaches Kafka after the kill.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.topology import load
from tests.conftest import wait_for
from tests.faults.conftest import FULL, length
from tests.faults.services import Private, child_env, deploy, spawn, spool_bytes, terminate
from tests.integration.readback import Topics

# make faults only: with QoS 1 the broker keeps what the connector did not acknowledge anyway; the OPC UA
# scenario is the one that needs the spool, and make test runs that one.
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not FULL, reason="make faults only")]

MAX_BYTES = 16 * 1024 * 1024


class Publisher:
    """QoS 1 messages, 40 a second, each a reading with its own timestamp; remembers what the broker took."""

    def __init__(self, url: str, root: str, spool: Path) -> None:
        host, _, port = url.removeprefix("mqtt://").rstrip("/").partition(":")
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{root}")
        self.c.connect(host, int(port or 1883))
        self.c.loop_start()
        self.root, self.spool = root, spool
        self.sent: set[tuple[str, int]] = set()
        self.max_spool = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ts = int(time.time() * 1000) - 60_000  # in the recent past: nothing is judged late or future
        while not self.stop.is_set():
            for dev in range(4):
                ts += 1
                info = self.c.publish(
                    f"{self.root}/site/dev{dev}/temp", f'{{"value": {ts % 1000}, "ts": {ts}}}', 1
                )
                info.wait_for_publish(10)
                self.sent.add((f"site/dev{dev}/temp", ts))
            self.max_spool = max(self.max_spool, spool_bytes(self.spool))
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.c.loop_stop()
        self.c.disconnect()


def test_nothing_is_lost_across_a_kafka_outage_and_a_kill(
    kafka: Private, services_env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    root = f"sp{tag}"
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    spool = tmp_path / "spool"
    topo: dict[str, Any] = {
        "name": f"spool{tag}",
        "prefix": f"t{tag}.",
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        "sources": [
            {"id": "mq", "type": "mqtt", "url": services_env["PLANTSTREAM_MQTT_URL"], "client_id": f"c-{tag}",
             "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
             "spool": {"dir": str(spool), "max_bytes": MAX_BYTES}}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_KAFKA=bootstrap, PLANTSTREAM_MQTT_URL=services_env["PLANTSTREAM_MQTT_URL"])
    deploy(topo_file, env)
    topology = load(topo_file, env)
    args = ["connect", str(topo_file), "--source", "mq", "--metrics", "127.0.0.1:0"]
    log, log2 = tmp_path / "connect1.log", tmp_path / "connect2.log"
    proc = spawn(args, log, env)
    pub: Publisher | None = None
    try:
        # The connector subscribes before anything is published: QoS 1 then keeps every message for it.
        wait_for(lambda: "subscribed" in log.read_text(), 30, "connector up")
        pub = Publisher(services_env["PLANTSTREAM_MQTT_URL"], root, spool)
        before = Topics(topology)

        def some() -> bool:
            before.poll()
            return bool(before.batches)

        wait_for(some, 30, "readings in Kafka before the outage")
        before.close()

        kafka.down("kafka")
        # Kafka is gone and messages keep coming: the connector acknowledges them from the spool.
        wait_for(
            lambda: spool_bytes(spool) > 0 and len(pub.sent) > 0, 30, "records spooled during the outage"
        )
        outage = length(12, 600)
        stop_at = time.monotonic() + outage
        time.sleep(outage / 2)  # the outage itself, half before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        spooled_at_kill = spool_bytes(spool)
        assert spooled_at_kill > 0
        proc = spawn(args, log2, env)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        pub.close()
        sent = set(pub.sent)
        kafka.up("kafka")

        after = Topics(topology)

        def missing() -> set[tuple[str, int]]:
            after.poll()
            got = {(s, r["ts"]) for s, rs in after.series().items() for r in rs}
            return sent - got

        wait_for(lambda: not missing(), 90, "every published reading in telemetry.raw")
        after.close()
        assert pub.max_spool <= MAX_BYTES
        assert "sending them (again)" in log2.read_text()  # the restarted connector replayed the spool
    finally:
        if pub is not None and not pub.stop.is_set():
            pub.close()
        terminate(proc)
