"""Mosquitto restarted five times mid-stream and the MQTT connector SIGKILLed once: nothing lost.

A private Mosquitto (persistence on, as the local service has it) takes QoS 1 messages from a publisher that
publishes again what the broker did not acknowledge; ``plantstream connect`` reads them into the shared Kafka.
The broker is restarted five times while messages flow, and the connector is SIGKILLed once and started
again. Every message the broker acknowledged to the publisher must reach telemetry.raw (at least once: the
worker drops identical repeats), and nothing else.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.topology import load
from tests.conftest import wait_for
from tests.faults.conftest import length
from tests.faults.services import Private, Publisher, child_env, deploy, private, spawn, terminate
from tests.integration.readback import Topics

pytestmark = pytest.mark.integration


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Private]:
    with private(tmp_path / "services", "mosquitto") as svc:
        yield svc


def test_broker_restarts_and_a_connector_kill_lose_nothing(
    mosquitto: Private, services_env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    root = f"mr{tag}"
    url = mosquitto.connection()["PLANTSTREAM_MQTT_URL"]
    topo: dict[str, Any] = {
        "name": f"mqr{tag}",
        "prefix": f"t{tag}.",
        "broker": {"bootstrap": services_env["PLANTSTREAM_KAFKA"], "partitions": 2},
        "sources": [
            {"id": "mq", "type": "mqtt", "url": url, "client_id": f"c-{tag}",
             "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
             "spool": {"dir": str(tmp_path / "spool")}}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_MQTT_URL=url)
    deploy(topo_file, env)
    topology = load(topo_file, env)
    args = ["connect", str(topo_file), "--source", "mq", "--metrics", "off"]
    procs = [spawn(args, tmp_path / "connect0.log", env)]
    pub: Publisher | None = None
    try:
        wait_for(lambda: "subscribed" in (tmp_path / "connect0.log").read_text(), 30, "connector subscribed")
        pub = Publisher(url, root)
        gap = length(4, 20)  # between restarts
        for i in range(5):
            time.sleep(gap)
            mosquitto.down("mosquitto")
            mosquitto.up("mosquitto")
            if i == 2:  # mid-stream, between two restarts
                time.sleep(gap / 2)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(10)
                procs.append(spawn(args, tmp_path / "connect1.log", env))
        time.sleep(gap)
        pub.close()
        accepted = set(pub.accepted)
        assert len(accepted) > 100

        topics = Topics(topology)
        got: set[tuple[str, int]] = set()

        def missing() -> set[tuple[str, int]]:
            topics.poll()
            got.update((s, r["ts"]) for s, rs in topics.series().items() for r in rs)
            return accepted - got

        wait_for(lambda: not missing(), 120, "every accepted message in telemetry.raw")
        topics.close()
        # Nothing else: what arrived was published (a message whose acknowledgement was lost in a restart is
        # published again, so arrivals beyond the accepted ones are only such, within the stream's range).
        assert {s for s, _ in got} == {s for s, _ in accepted}
        assert max(ts for _, ts in got) <= max(ts for _, ts in accepted) + 4
        assert topics.dead == []
    finally:
        if pub is not None and not pub.stop.is_set():
            pub.close()
        for p in procs:
            terminate(p)
