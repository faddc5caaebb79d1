"""MQTT source against the real Mosquitto and Kafka: delivery, dead letters, QoS 1 acknowledgement in MQTT 5
and 3.1.1, redelivery after a reconnect, a broker restart, and SIGTERM.

Whether a message was acknowledged is asked of Mosquitto itself: after the connector stops, a client
resumes its persistent session, and the broker redelivers exactly the messages that got no PUBACK.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from paho.mqtt.enums import CallbackAPIVersion

from connectors.common.producer import Delivered, TelemetryProducer
from connectors.mqtt import wire
from connectors.mqtt.source import MqttSourceRunner
from pipeline.core import codec
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for
from tests.integration.readback import Topics

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000


def broker(ns: dict[str, str]) -> tuple[str, int]:
    host, _, port = ns["PLANTSTREAM_MQTT_URL"].removeprefix("mqtt://").rstrip("/").partition(":")
    return host, int(port or 1883)


def topology_data(namespace: dict[str, str]) -> dict[str, Any]:
    root = namespace["mqtt_root"]
    return {
        "name": f"mqtt{namespace['tag']}",
        "prefix": namespace["prefix"],
        "broker": {"bootstrap": namespace["PLANTSTREAM_KAFKA"], "partitions": 2},
        "sources": [
            {
                "id": "mqtt-it",
                "type": "mqtt",
                "url": namespace["PLANTSTREAM_MQTT_URL"],
                "client_id": f"it-{namespace['tag']}",
                "topics": [
                    {"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"},
                    {
                        "filter": f"{root}-obj/+/data",
                        "template": f"{root}-obj/{{device}}/data",
                        "site": "o",
                    },
                ],
            }
        ],
    }


@pytest.fixture
def topo(namespace: dict[str, str]) -> Iterator[Topology]:
    t = validate_data(topology_data(namespace))
    ensure_topics(t, say=lambda _m: None)
    yield t
    host, port = broker(namespace)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"it-{namespace['tag']}", clean_session=True)
    with contextlib.suppress(OSError):
        c.connect(host, port)  # a clean session ends the persistent one
        c.loop(0.5)
        c.disconnect()
    admin = AdminClient({"bootstrap.servers": t.broker.bootstrap})
    names = [n for n in admin.list_topics(timeout=10).topics if n.startswith(t.prefix)]
    for fut in admin.delete_topics(names).values() if names else []:
        with contextlib.suppress(Exception):
            fut.result(30)


class Running:
    def __init__(self, topo: Topology, producer: TelemetryProducer, version: int = wire.V5) -> None:
        self.runner = MqttSourceRunner(topo.sources[0], producer)  # type: ignore[arg-type]
        self.runner.version = version
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.runner.wait_connected(15)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def publish(ns: dict[str, str], messages: list[tuple[str, bytes]], port: int | None = None) -> None:
    host, default_port = broker(ns)
    port = port or default_port
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"it-pub-{ns['tag']}", clean_session=True)
    c.max_inflight_messages_set(100)
    c.connect(host, port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in messages]
    for i in infos:
        i.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


def redelivered(ns: dict[str, str], wait: float = 2.0, take: bool = False) -> list[tuple[str, bytes]]:
    """Resume the connector's session and collect what Mosquitto sends again: the unacknowledged. Without
    ``take`` nothing is acknowledged (Mosquitto then sends at most its max_inflight_messages); with it, every
    message is, and the collection goes on until nothing came for ``wait`` seconds."""
    host, port = broker(ns)
    got: list[tuple[str, bytes]] = []
    present: list[bool] = []
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"it-{ns['tag']}", clean_session=False, manual_ack=not take
    )

    def on_connect(_c: Any, _u: Any, flags: Any, _rc: Any, _p: Any) -> None:
        present.append(flags.session_present)

    c.on_connect = on_connect
    c.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    c.connect(host, port)
    c.loop_start()
    wait_for(lambda: present, 10, "CONNACK")
    seen = -1
    while seen != len(got):
        seen = len(got)
        time.sleep(wait)
    c.disconnect()
    c.loop_stop()
    assert present == [True], "the connector's persistent session is gone"
    return got


def test_readings_dead_letters_and_every_message_acknowledged(namespace, topo):
    root = namespace["mqtt_root"]
    good = [
        (
            f"{root}/site1/dev{d}/p{p}",
            codec.dumps({"value": d * 10 + p + k / 10, "ts": 1_767_225_600_000 + k}),
        )
        for k in range(20)
        for d in range(5)
        for p in range(5)
    ]
    bad = [
        (f"{root}/site1/dev9/x", b"NaN"),
        (f"{root}/site1/dev9/x", b"not a number"),
        (f"{root}/site1/dev9/x", b'{"value": "12"}'),
    ]
    obj = [(f"{root}-obj/hp1/data", b'{"ts": 1767225600, "temp": {"supply": 21.5}, "mode": "auto"}')]
    topics = Topics(topo)
    run = Running(topo, TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic))
    try:
        publish(namespace, good + bad + obj)

        def complete() -> bool:
            topics.poll()
            return sum(len(b["readings"]) for b in topics.batches) >= len(good) + 1 and len(topics.dead) >= 4

        wait_for(complete, 60, "every reading and dead letter in Kafka")
    finally:
        run.close()
    series = topics.series()
    assert len(series) == 25 + 1
    assert [r["value"] for r in series["site1/dev1/p2"]] == [12 + k / 10 for k in range(20)]
    assert series["o/hp1/temp.supply"][0] == {
        "point": "temp.supply",
        "ts": T0,
        "value": 21.5,
        "quality": "good",
    }
    reasons = sorted(d["reason"] for d in topics.dead)
    assert reasons == sorted(
        [
            "value is not finite: 'NaN'",
            "payload is neither a number nor JSON: 'not a number'",
            "value must be a finite number or boolean, got str: '12'",
            "point mode: value must be a finite number or boolean, got str: 'auto'",
        ]
    )
    assert {d["source"] for d in topics.dead} == {"mqtt-it"}
    s = run.runner.stats
    assert (s.received, s.acked, s.delivery_errors) == (len(good) + 4, len(good) + 4, 0)
    topics.close()
    assert redelivered(namespace) == []


def test_nothing_is_acknowledged_that_kafka_did_not_confirm(namespace, topo):
    """Kafka unreachable: deliveries time out, and Mosquitto still holds every message afterwards."""
    root = namespace["mqtt_root"]
    msgs = [(f"{root}/site1/dev{i % 3}/p{i}", str(i).encode()) for i in range(40)]
    dead_kafka = TelemetryProducer(
        "127.0.0.1:1", topo.raw_topic, topo.dlq_topic, extra={"message.timeout.ms": 1500}
    )
    run = Running(topo, dead_kafka)
    try:
        publish(namespace, msgs)
        wait_for(lambda: run.runner.stats.delivery_errors > 0, 30, "failed deliveries")
    finally:
        run.close()
    assert run.runner.stats.acked == 0
    again = redelivered(namespace)
    assert sorted(set(again)) == sorted(msgs)


def producer(topo: Topology) -> TelemetryProducer:
    return TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)


def readings(namespace: dict[str, str], n: int, tag: str = "") -> list[tuple[str, bytes]]:
    root = namespace["mqtt_root"]
    return [(f"{root}/site1/dev{i % 4}/p{tag}{i}", codec.dumps({"value": i, "ts": T0 + i})) for i in range(n)]


def values(topics: Topics, poll: bool = False) -> list[float]:
    if poll:
        topics.poll()
    return sorted(r["value"] for b in topics.batches for r in b["readings"])


def test_mqtt_311_against_mosquitto(namespace, topo):
    msgs = readings(namespace, 300)
    topics = Topics(topo)
    run = Running(topo, producer(topo), version=wire.V311)
    try:
        publish(namespace, msgs)

        def complete() -> bool:
            topics.poll()
            return len(values(topics)) >= len(msgs)

        wait_for(complete, 60, "every reading in Kafka")
    finally:
        run.close()
    assert run.runner.version == wire.V311
    assert values(topics) == [float(i) for i in range(300)]
    assert (run.runner.stats.acked, run.runner.stats.reconnects) == (300, 0)
    topics.close()
    assert redelivered(namespace) == []


class FailingFirst(TelemetryProducer):
    """Reports the first batch as failed (it did reach Kafka): as a delivery timeout would."""

    def __init__(self, topo: Topology) -> None:
        super().__init__(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
        self.failed = False

    def send_batch(self, batch: Any, on_delivery: Delivered) -> None:
        if not self.failed:
            self.failed = True
            super().send_batch(batch, lambda _err: on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT)))
        else:
            super().send_batch(batch, on_delivery)


def settled(runner: MqttSourceRunner, quiet: float = 2.0) -> bool:
    """Nothing held by the connector and nothing new from the broker for ``quiet`` seconds."""
    before = runner.stats.received
    time.sleep(quiet)
    return runner.stats.received == before and runner._held == 0


def test_a_failed_delivery_is_redelivered_by_mosquitto_after_the_reconnect(namespace, topo):
    msgs = readings(namespace, 200)
    topics = Topics(topo)
    run = Running(topo, FailingFirst(topo))
    try:
        publish(namespace, msgs)
        wait_for(lambda: run.runner.stats.reconnects, 30, "the reconnect after the failed delivery")
        wait_for(lambda: settled(run.runner), 60, "the redelivered messages in Kafka")
        wait_for(lambda: len(set(values(topics, poll=True))) == 200, 30, "every reading in Kafka")
    finally:
        run.close()
    s = run.runner.stats
    assert s.delivery_errors == 1 and s.reconnects >= 1
    assert len(values(topics)) > 200  # the failed batch's readings twice: at least once, never zero times
    topics.close()
    assert redelivered(namespace) == []


class PrivateMosquitto:
    """A Mosquitto of the test's own, without persistence: stopping it loses every session."""

    def __init__(self, tmp: Path) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = tmp / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""  # as root it would switch to 'mosquitto'
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}"
        )
        self.log = tmp / "mosquitto.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=out)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, f"mosquitto on port {self.port}", interval=0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    m = PrivateMosquitto(tmp_path)
    if not Path(m.binary).exists():
        pytest.skip("needs the mosquitto binary")
    m.start()
    yield m
    m.stop()


def test_a_restarted_broker_is_reconnected_and_subscribed_again(namespace, topo, private_mosquitto, caplog):
    cfg = topo.sources[0].model_copy(update={"url": f"mqtt://127.0.0.1:{private_mosquitto.port}"})
    topo = topo.model_copy(update={"sources": [cfg]})
    first, second = readings(namespace, 40, "a"), readings(namespace, 40, "b")
    topics = Topics(topo)
    run = Running(topo, producer(topo))
    try:
        publish(namespace, first, port=private_mosquitto.port)
        wait_for(lambda: run.runner.stats.acked == 40, 30, "the first messages acknowledged")
        private_mosquitto.stop()
        wait_for(lambda: "cannot connect" in caplog.text, 30, "a refused reconnect")
        time.sleep(2.0)  # a few attempts with backoff while the broker is away
        private_mosquitto.start()  # a new broker: the session and its subscription are gone
        wait_for(lambda: run.runner.wait_connected(0), 60, "the connector back, subscribed")
        publish(namespace, second, port=private_mosquitto.port)

        def complete() -> bool:
            topics.poll()
            return len(values(topics)) >= 80

        wait_for(complete, 60, "the messages published after the restart in Kafka")
    finally:
        run.close()
    assert values(topics) == sorted([float(i) for i in range(40)] * 2)
    assert run.runner.stats.reconnects == 1
    assert caplog.text.count("cannot connect") <= 4  # backoff, not a tight loop
    topics.close()


def test_sigterm_flushes_and_acknowledges_before_exit(namespace, topo, tmp_path):
    """``plantstream connect`` stopped with SIGTERM while messages stream in: what reached Kafka is
    acknowledged, the rest stays with Mosquitto for the next start, and nothing is both."""
    f = tmp_path / "topology.yaml"
    f.write_text(yaml.safe_dump(topology_data(namespace)))
    log = tmp_path / "connect.log"
    msgs = readings(namespace, 20_000)
    topics = Topics(topo)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "connect", str(f)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 60, "the connector subscribed")
        sender = threading.Thread(target=publish, args=(namespace, msgs))
        sender.start()

        def some() -> bool:
            topics.poll()
            return len(values(topics)) >= 1000

        wait_for(some, 60, "the first readings in Kafka")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        sender.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped;" in log.read_text()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        topics.poll()
    in_kafka = set(values(topics))
    topics.close()
    left = {codec.loads(p)["value"] for _, p in redelivered(namespace, take=True)}
    assert in_kafka | left == {float(i) for i in range(20_000)}
    assert not in_kafka & left, "acknowledged messages were redelivered, or delivered ones not acknowledged"
    assert in_kafka and left, "the stop did not come while messages were streaming in"


# -- what one message can cost --------------------------------------------------------------------------


class RawClient:
    """A plain socket speaking MQTT 3.1.1: sends what a client library would refuse to."""

    def __init__(self, ns: dict[str, str], name: str) -> None:
        self.sock = socket.create_connection(broker(ns), timeout=30)
        self.buf = b""
        self.sock.sendall(
            wire.connect(f"it-raw-{name}-{ns['tag']}", keepalive=60, version=wire.V311, clean=True)
        )
        kind, _flags, body = self.packet()
        assert (kind, body[1]) == (wire.CONNACK, 0)

    def packet(self) -> wire.Control:
        while (first := wire.first_packet(self.buf)) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.buf += data
        got, used = first
        self.buf = self.buf[used:]
        return got

    def publish(self, topic: str, payload: bytes, mid: int) -> None:
        """QoS 1, streamed to the broker in one write, and its PUBACK awaited."""
        t = topic.encode()
        body = len(t).to_bytes(2, "big") + t + mid.to_bytes(2, "big") + payload
        self.sock.sendall(b"\x32" + wire.varint(len(body)) + body)
        assert self.packet() == (wire.PUBACK, 0, mid.to_bytes(2, "big"))

    def closed_by_broker(self) -> bool:
        try:
            self.packet()
        except (ConnectionError, OSError):
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(wire.DISCONNECT_PACKET)
        self.sock.close()


@pytest.mark.faults  # also in make faults
@pytest.mark.parametrize("level", [wire.V311, wire.V5], ids=["mqtt311", "mqtt5"])
def test_a_3_mb_message_and_malformed_bytes_leave_the_source_running(namespace, topo, level):
    """A publisher sends 3 MB (over the 1 MiB max_packet_size) to the real Mosquitto, whose own
    message_size_limit is not set here, then bytes that are not MQTT; messages published afterwards still
    arrive. MQTT 3.1.1: the connector reads past the 3 MB, dead-letters it and acknowledges it. MQTT 5: the
    Maximum Packet Size of its CONNECT makes Mosquitto drop the message instead of sending it. Either way
    nothing is left unacknowledged in the session."""
    root = namespace["mqtt_root"]
    big = b'{"value": ' + b"7" * 3_000_000 + b"}"
    topics = Topics(topo)
    run = Running(topo, producer(topo), version=level)
    try:
        pub = RawClient(namespace, "big")
        pub.publish(f"{root}/site1/big/frame", big, 1)
        pub.publish(f"{root}/site1/big/p0", b"0.5", 2)
        pub.close()
        bad = RawClient(namespace, "bad")
        bad.sock.sendall(b"\x30\xff\xff\xff\xff\x01")  # a remaining length of five bytes
        assert bad.closed_by_broker()
        bad.close()
        after = readings(namespace, 50, "after")
        publish(namespace, after)

        def complete() -> bool:
            topics.poll()
            return len(values(topics)) >= 51 and len(topics.dead) >= (level == wire.V311)

        wait_for(complete, 60, "the messages published after the 3 MB one in Kafka")
        wait_for(lambda: settled(run.runner), 30, "everything acknowledged")
    finally:
        run.close()
    assert values(topics) == sorted([0.5] + [float(i) for i in range(50)])
    s = run.runner.stats
    assert (s.reconnects, s.malformed, s.delivery_errors) == (0, 0, 0)
    if level == wire.V311:
        (dead,) = topics.dead
        size = 1 + 4 + 2 + len(f"{root}/site1/big/frame") + 2 + len(big)
        assert dead["reason"] == f"oversized: MQTT packet of {size} bytes exceeds max_packet_size 1048576"
        assert (dead["topic"], dead["payload"]) == (f"{root}/site1/big/frame", big[:256].decode())
        assert (s.oversized, s.received, s.acked) == (1, 52, 52)
    else:
        assert topics.dead == []
        assert (s.oversized, s.received, s.acked) == (0, 51, 51)
    topics.close()
    assert redelivered(namespace) == []


@pytest.mark.faults  # also in make faults
def test_a_message_too_large_for_kafka_is_dead_lettered_and_acknowledged(namespace, topo):
    """Under max_packet_size (raised to 8 MiB here) but 150,000 points: its batch would be ~10 MB, more than
    the producer's message.max.bytes. Dead-lettered, acknowledged, and the source goes on."""
    cfg = topo.sources[0].model_copy(update={"max_packet_size": 8 << 20, "max_inflight": 1})
    topo = topo.model_copy(update={"sources": [cfg]})
    root = namespace["mqtt_root"]
    payload = codec.dumps({f"p{i}": i for i in range(150_000)})
    topics = Topics(topo)
    run = Running(topo, producer(topo))
    try:
        publish(namespace, [(f"{root}-obj/huge/data", payload)])
        wait_for(lambda: run.runner.stats.oversized_for_kafka == 1, 60, "the message refused as too large")
        publish(namespace, readings(namespace, 20))

        def complete() -> bool:
            topics.poll()
            return len(values(topics)) >= 20 and len(topics.dead) >= 1

        wait_for(complete, 60, "the dead letter and the messages published after it in Kafka")
        wait_for(lambda: settled(run.runner), 30, "everything acknowledged")
    finally:
        run.close()
    (dead,) = topics.dead
    assert dead["reason"].startswith("oversized for Kafka: 150000 readings of ")
    assert (dead["topic"], dead["payload"]) == (f"{root}-obj/huge/data", payload[:256].decode())
    assert values(topics) == [float(i) for i in range(20)]
    s = run.runner.stats
    assert (s.received, s.acked, s.reconnects, s.delivery_errors) == (21, 21, 0, 0)
    topics.close()
    assert redelivered(namespace) == []
