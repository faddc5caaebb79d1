"""The MQTT source against a scripted broker on loopback and a producer whose deliveries the test releases.

What is checked is the delivery contract: a PUBACK leaves only after Kafka confirmed every record the
message became; a failed delivery is never acknowledged and the connection is renewed so the broker
redelivers; acknowledgements never go to a later connection than the one that received the message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

from connectors.mqtt import source, wire
from connectors.mqtt.source import MqttSourceRunner
from pipeline.core import codec
from pipeline.topology import MqttSource

MODE_REASON = "value must be a finite number or boolean, got str: 'auto'"


def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError("timed out")


class Conn:
    """One client connection as the broker sees it."""

    def __init__(self, sock: socket.socket, broker: Broker) -> None:
        self.sock = sock
        self.broker = broker
        self.level = 0
        self.connect_body = b""
        self.pubacks: list[int] = []
        self.kinds: list[int] = []  # every packet type received, in order
        self.subscribed = threading.Event()
        self.disconnected = False
        self.closed = threading.Event()
        # A TLS socket must not be read and written at the same time (OpenSSL's state is not thread-safe:
        # "bad record mac"): the serving thread reads and the test's thread writes under one lock.
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _write(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _serve(self) -> None:
        buf = b""
        pending = getattr(self.sock, "pending", lambda: 0)
        try:
            while True:
                if not pending() and not select.select([self.sock], [], [], 0.05)[0]:
                    continue
                with self.lock:
                    data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
                while (first := wire.first_packet(buf)) is not None:
                    (kind, _flags, body), used = first
                    buf = buf[used:]
                    self._handle(kind, body)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            return
        finally:
            self.closed.set()

    def _handle(self, kind: int, body: bytes) -> None:
        self.kinds.append(kind)
        if kind == wire.CONNECT:
            self.level, self.connect_body = body[6], body
            answer = self.broker.answer(self.level)
            self._write(answer)
            if answer[3] != 0:
                self.sock.close()
        elif kind == wire.SUBSCRIBE:
            suback = body[:2] + (b"\x00" if self.level == 5 else b"") + b"\x01"  # granted QoS 1
            self._write(bytes([0x90, len(suback)]) + suback)
            self.subscribed.set()
            if self.broker.drop_after_suback:
                self.close()
        elif kind == wire.PUBACK:
            self.pubacks.append(struct.unpack("!H", body[:2])[0])
        elif kind == wire.PINGREQ:
            if self.broker.answer_pings:
                self._write(b"\xd0\x00")
        elif kind == wire.DISCONNECT:
            self.disconnected = True
            self.sock.shutdown(socket.SHUT_RDWR)  # as a broker does

    def publish(self, topic: str, payload: bytes, mid: int, qos: int = 1) -> None:
        t = topic.encode()
        var = struct.pack("!H", len(t)) + t + (struct.pack("!H", mid) if qos else b"")
        if self.level == 5:
            var += b"\x00"
        body = var + payload
        self._write(bytes([0x30 | qos << 1]) + wire.varint(len(body)) + body)

    def send_raw(self, data: bytes) -> None:
        self._write(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Broker:
    """Accepts connections on 127.0.0.1 and answers CONNECT with ``answer(level)``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.tls = tls
        self.conns: list[Conn] = []
        self.refuse_v5 = False
        self.refuse_code = 0  # CONNACK code for every CONNECT
        self.connack_props = b""  # MQTT 5 CONNACK properties
        self.answer_pings = True
        self.drop_after_suback = False
        threading.Thread(target=self._accept, daemon=True).start()

    def answer(self, level: int) -> bytes:
        if level == 5 and self.refuse_v5:
            return b"\x20\x02\x00\x01"  # what a 3.1.1 broker says to an unknown protocol level
        if level == 5:
            body = bytes([0, self.refuse_code]) + wire.varint(len(self.connack_props)) + self.connack_props
            return bytes([0x20, len(body)]) + body
        return bytes([0x20, 2, 0, self.refuse_code])

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.srv.accept()
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True)
            except OSError:
                if self.srv.fileno() < 0:
                    return
                continue
            self.conns.append(Conn(sock, self))

    def conn(self, i: int = -1) -> Conn:
        c = wait_until(lambda: len(self.conns) > (i if i >= 0 else 0) and self.conns[i])
        wait_until(lambda: c.level)
        return c

    def close(self) -> None:
        self.srv.close()
        for c in self.conns:
            c.sock.close()


class Producer:
    """Records what the source produces; delivery reports run inside poll() once the test releases them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Callable[[KafkaError | None], None]]] = []
        self._released: queue.Queue[tuple[Callable[[KafkaError | None], None], KafkaError | None]] = (
            queue.Queue()
        )

    def send_batch(self, batch: Any, on_delivery: Callable[[KafkaError | None], None]) -> None:
        self.sent.append(("batch", batch, on_delivery))

    def send_dead_letter(
        self, source: str, reason: str, payload: bytes, topic: str | None, on_delivery: Any
    ) -> None:
        self.sent.append(("dlq", {"reason": reason, "payload": payload, "topic": topic}, on_delivery))

    def deliver(self, i: int, err: KafkaError | None = None) -> None:
        self._released.put((self.sent[i][2], err))

    def poll(self, timeout: float = 0.0) -> int:
        n = 0
        try:
            item = self._released.get(timeout=timeout) if timeout > 0 else self._released.get_nowait()
            while True:
                cb, err = item
                cb(err)
                n += 1
                item = self._released.get_nowait()
        except queue.Empty:
            return n


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.close()


Started = tuple[MqttSourceRunner, Producer, Broker]
THREADS: dict[int, tuple[threading.Event, threading.Thread]] = {}  # id(runner) -> its stop event and thread


def stop_runner(runner: MqttSourceRunner) -> threading.Thread:
    """Ask a runner started by the ``start`` fixture to stop (as SIGTERM does); its thread, to join."""
    stop, th = THREADS[id(runner)]
    stop.set()
    return th


@pytest.fixture
def start(broker: Broker) -> Iterator[Callable[..., Started]]:
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def go(connected: bool = True, producer: Producer | None = None, **cfg: Any) -> Started:
        conf = {
            "id": "t",
            "type": "mqtt",
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "client_id": "unit-1",
            "topics": [
                {"filter": "p/+/+/+", "template": "p/{site}/{device}/{point}"},
                {"filter": "o/+/data", "template": "o/{device}/data", "site": "s"},
            ],
            **cfg,
        }
        prod = producer or Producer()
        runner = MqttSourceRunner(MqttSource.model_validate(conf), prod)  # type: ignore[arg-type]
        stop = threading.Event()
        th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
        th.start()
        stops.append((stop, th))
        THREADS[id(runner)] = (stop, th)
        if connected:
            assert runner.wait_connected(5)
        return runner, prod, broker

    yield go
    for stop, th in stops:
        stop.set()
        th.join(10)


def test_connect_asks_for_a_persistent_session_and_a_receive_window(start):
    runner, _, broker = start(max_inflight=2500)
    c = broker.conn()
    assert c.level == 5
    body = c.connect_body
    assert body[7] & 0x02 == 0  # clean start off
    # properties: session expiry 0xFFFFFFFF, receive maximum 2500, maximum packet size 1 MiB
    assert body[10:24] == b"\x0d\x11\xff\xff\xff\xff\x21" + struct.pack("!H", 2500) + b"\x27\x00\x10\x00\x00"
    assert body[24:] == b"\x00\x06unit-1"
    assert runner.version == wire.V5


def test_puback_only_after_kafka_delivered_the_batch(start):
    runner, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/temp", b"21.5", 1)
    c.publish("p/s/d1/flow", b'{"value": 3, "ts": 1767225600000}', 2)
    c.publish("p/s/d2/temp", b"7", 3)
    wait_until(lambda: len(prod.sent) == 2)  # one batch per device once the input pauses
    batches = {b["device"]: b for _, b, _ in prod.sent}
    assert [(r["point"], r["value"]) for r in batches["d1"]["readings"]] == [("temp", 21.5), ("flow", 3.0)]
    assert batches["d1"]["readings"][1]["ts"] == 1_767_225_600_000
    time.sleep(0.3)
    assert c.pubacks == []  # nothing is acknowledged before Kafka has it
    first = next(i for i, (_, b, _) in enumerate(prod.sent) if b["device"] == "d1")
    prod.deliver(first)
    wait_until(lambda: sorted(c.pubacks) == [1, 2])
    prod.deliver(1 - first)
    wait_until(lambda: sorted(c.pubacks) == [1, 2, 3])
    assert runner.stats.acked == 3 and runner.stats.readings == 3


def test_failed_delivery_is_not_acknowledged_and_the_connection_is_renewed(start):
    runner, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/temp", b"1", 11)
    wait_until(lambda: prod.sent)
    prod.deliver(0, KafkaError(KafkaError._MSG_TIMED_OUT))
    wait_until(lambda: len(broker.conns) == 2)  # the broker will redeliver message 11
    assert c.closed.wait(5)
    assert c.pubacks == []
    assert runner.stats.delivery_errors == 1 and runner.stats.acked == 0


def test_dead_letters_are_acknowledged_after_their_delivery(start):
    _, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/temp", b"NaN", 5)
    c.publish("o/hp1/data", b'{"ts": 1767225600, "power": 4.5, "mode": "auto"}', 6)
    c.publish("elsewhere/x", b"1", 7)  # a topic no template fits cannot arrive here, but if it did
    wait_until(lambda: len(prod.sent) == 4)
    # Dead letters leave at once, the batch when the input pauses.
    assert [(k, x.get("reason") or x["device"]) for k, x, _ in prod.sent] == [
        ("dlq", "value is not finite: 'NaN'"),
        ("dlq", f"point mode: {MODE_REASON}"),
        ("dlq", "topic 'elsewhere/x' does not fit any template"),
        ("batch", "hp1"),
    ]
    nan, mode, other, batch = range(4)
    time.sleep(0.2)
    assert c.pubacks == []
    prod.deliver(nan)
    wait_until(lambda: c.pubacks == [5])
    prod.deliver(batch)  # message 6 also became a dead letter: not yet
    time.sleep(0.2)
    assert c.pubacks == [5]
    prod.deliver(mode)
    wait_until(lambda: c.pubacks == [5, 6])
    prod.deliver(other)
    wait_until(lambda: c.pubacks == [5, 6, 7])
    assert prod.sent[batch][1]["readings"][0]["ts"] == 1_767_225_600_000


def test_acknowledgements_never_go_to_a_later_connection(start):
    runner, prod, broker = start()
    c1 = broker.conn()
    c1.publish("p/s/d1/temp", b"1", 9)
    wait_until(lambda: prod.sent)
    c1.close()
    c2 = broker.conn(1)
    wait_until(lambda: runner.wait_connected(0))
    prod.deliver(0)  # the old connection's message reached Kafka ...
    time.sleep(0.3)
    assert c2.pubacks == []  # ... but packet id 9 on this connection may be another message
    c2.publish("p/s/d1/temp", b"1", 9)  # the broker's redelivery
    wait_until(lambda: len(prod.sent) == 2)
    prod.deliver(1)
    wait_until(lambda: c2.pubacks == [9])
    assert runner.stats.reconnects == 1


def test_falls_back_to_mqtt_311(start, broker):
    broker.refuse_v5 = True
    runner, prod, _ = start()
    c = broker.conn(1)
    assert [x.level for x in broker.conns] == [5, 4]
    assert runner.version == wire.V311
    c.publish("p/s/d1/temp", b"2", 4)
    wait_until(lambda: prod.sent)
    prod.deliver(0)
    wait_until(lambda: c.pubacks == [4])


def test_qos0_messages_need_no_acknowledgement(start):
    runner, prod, broker = start(qos=0)
    c = broker.conn()
    c.publish("p/s/d1/temp", b"2", 0, qos=0)
    wait_until(lambda: prod.sent)
    prod.deliver(0)
    wait_until(lambda: runner.stats.acked == 1)
    time.sleep(0.1)
    assert c.pubacks == []


def test_full_batches_go_at_once_and_stop_waits_for_their_acknowledgements(broker):
    prod = Producer()
    cfg = MqttSource.model_validate(
        {
            "id": "t",
            "type": "mqtt",
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "topics": [{"filter": "p/+/+/+", "template": "p/{site}/{device}/{point}"}],
            "batch": {"max_readings": 3, "max_delay": "200ms"},
        }
    )
    runner = MqttSourceRunner(cfg, prod)  # type: ignore[arg-type]
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()
    assert runner.wait_connected(5)
    c = broker.conn()
    for mid in range(1, 8):
        c.publish(f"p/s/d1/x{mid}", b"1", mid)
    wait_until(lambda: len(prod.sent) == 3)
    assert [len(b["readings"]) for _, b, _ in prod.sent] == [3, 3, 1]
    stop.set()
    time.sleep(0.2)
    assert th.is_alive()  # waiting for Kafka before it disconnects
    for i in range(3):
        prod.deliver(i)
    th.join(10)
    assert not th.is_alive()
    assert sorted(c.pubacks) == list(range(1, 8))
    wait_until(lambda: c.disconnected)


def test_every_connection_subscribes_again(start):
    """A broker that lost the session (restarted without persistence) only sends again after a SUBSCRIBE."""
    runner, prod, broker = start()
    c1 = broker.conn()
    assert c1.subscribed.wait(5)
    c1.close()
    c2 = broker.conn(1)
    assert c2.subscribed.wait(5)
    wait_until(lambda: runner.wait_connected(0))
    c2.publish("p/s/d1/temp", b"3", 1)
    wait_until(lambda: prod.sent)
    prod.deliver(0)
    wait_until(lambda: c2.pubacks == [1])
    assert runner.stats.reconnects == 1


def test_credentials_go_in_the_connect_packet(start, broker):
    start(username="plant", password="s3cret")
    body = broker.conn().connect_body
    assert body[7] & 0xC0 == 0xC0  # user name and password flags
    assert body.endswith(b"\x00\x06unit-1\x00\x05plant\x00\x06s3cret")


def test_refused_credentials_are_retried_with_backoff(start, broker, caplog):
    broker.refuse_code = 0x86  # bad user name or password
    caplog.set_level(logging.ERROR, "plantstream.mqtt")
    runner, _, _ = start(connected=False, username="plant", password="wrong")
    wait_until(lambda: len(broker.conns) >= 2, timeout=5)
    time.sleep(0.3)
    assert len(broker.conns) == 2  # the second attempt waited 0.5-1 s, the third waits 1-2 s
    assert not runner.wait_connected(0)
    assert "code 0x86 (bad user name or password)" in caplog.text


def test_flapping_connections_back_off(start, broker):
    """A broker that drops the connection right after subscribing (another client with the same client id
    taking the session over, say) is not redialled in a tight loop."""
    broker.drop_after_suback = True
    start(connected=False)
    wait_until(lambda: len(broker.conns) >= 3, timeout=10)
    t = time.monotonic()
    time.sleep(1.0)
    # after two short-lived connections the backoff is at 1-2 s: at most one more attempt in a second
    assert len(broker.conns) <= 4
    assert time.monotonic() - t >= 1.0


def test_keepalive_pings_and_a_silent_broker_is_left(start, broker, monkeypatch):
    monkeypatch.setattr(source, "KEEPALIVE_S", 1)
    runner, _, _ = start()
    c = broker.conn()
    assert c.connect_body[8:10] == b"\x00\x01"  # keepalive 1 s in the CONNECT
    wait_until(lambda: c.kinds.count(wire.PINGREQ) >= 2, timeout=5)  # answered, so the connection stays
    assert len(broker.conns) == 1
    broker.answer_pings = False
    wait_until(lambda: len(broker.conns) == 2, timeout=10)  # no PINGRESP within the keepalive: reconnect
    assert c.closed.wait(5)
    assert runner.stats.reconnects == 1
    broker.answer_pings = True  # so that stopping (after the monkeypatch is undone) is quick


def test_server_keepalive_overrides_ours(start, broker):
    broker.connack_props = b"\x13\x00\x01"  # MQTT 5 Server Keep Alive: 1 s
    start()
    c = broker.conn()
    assert c.connect_body[8:10] == b"\x00\x1e"  # we asked for 30 s
    wait_until(lambda: wire.PINGREQ in c.kinds, timeout=5)


def test_stop_makes_sure_the_broker_read_the_pubacks_before_disconnecting(start):
    """PUBACKs, then a PINGREQ whose answer shows the broker processed them, then DISCONNECT."""
    runner, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/temp", b"1", 1)
    c.publish("p/s/d2/temp", b"2", 2)
    wait_until(lambda: len(prod.sent) == 2)
    prod.deliver(0)
    wait_until(lambda: len(c.pubacks) == 1)
    th = stop_runner(runner)
    time.sleep(0.2)
    assert th.is_alive()  # message 2 is not in Kafka yet
    prod.deliver(1)
    th.join(10)
    assert not th.is_alive()
    assert sorted(c.pubacks) == [1, 2]
    assert c.kinds[-4:] == [wire.PUBACK, wire.PUBACK, wire.PINGREQ, wire.DISCONNECT]


def test_a_broker_that_never_answers_the_last_ping_does_not_block_stop(start, broker, monkeypatch):
    monkeypatch.setattr(source, "SHUTDOWN_BARRIER_S", 0.5)
    broker.answer_pings = False
    runner, _, _ = start()
    c = broker.conn()
    th = stop_runner(runner)
    th.join(5)
    assert not th.is_alive()
    wait_until(lambda: c.disconnected)


def test_past_max_inflight_the_socket_is_not_read(start):
    runner, prod, broker = start(max_inflight=2)
    c = broker.conn()
    c.publish("p/s/d1/a", b"1", 1)
    c.publish("p/s/d1/b", b"2", 2)
    wait_until(lambda: prod.sent)
    c.publish("p/s/d1/c", b"3", 3)
    time.sleep(0.3)
    assert runner.stats.received == 2  # two messages held: the third waits in the socket
    prod.deliver(0)
    wait_until(lambda: runner.stats.received == 3)
    wait_until(lambda: len(prod.sent) == 2)
    prod.deliver(1)
    wait_until(lambda: sorted(c.pubacks) == [1, 2, 3])


def test_mqtt5_publish_properties_and_protocol_errors(start):
    _, prod, broker = start()
    c = broker.conn()
    # a PUBLISH carrying message expiry and a user property
    props = b"\x02\x00\x00\x00\x3c" + b"\x26\x00\x01k\x00\x01v"
    t = b"p/s/d1/temp"
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", 7) + wire.varint(len(props)) + props + b"4.5"
    c.send_raw(bytes([0x32]) + wire.varint(len(body)) + body)
    wait_until(lambda: prod.sent)
    assert prod.sent[0][1]["readings"][0]["value"] == 4.5
    c.send_raw(b"\x36\x04\x00\x01t\x00")  # QoS 3 does not exist: the connection is not trusted any more
    wait_until(lambda: len(broker.conns) == 2, timeout=5)
    prod.deliver(0)
    time.sleep(0.2)
    assert c.pubacks == []  # message 7 belongs to the closed connection: the broker sends it again


def _certificate(tmp: Any) -> tuple[str, str]:
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", key, "-out", cert,
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mqtts_speaks_tls_and_checks_the_certificate(tmp_path, monkeypatch):
    cert, key = _certificate(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    broker = Broker(tls=ctx)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the connector trusts the system's CAs: here, this one
    cfg = MqttSource.model_validate(
        {
            "id": "t",
            "type": "mqtt",
            "url": f"mqtts://127.0.0.1:{broker.port}",
            "topics": [{"filter": "p/+/+/+", "template": "p/{site}/{device}/{point}"}],
        }
    )
    prod = Producer()
    runner = MqttSourceRunner(cfg, prod)  # type: ignore[arg-type]
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()
    try:
        assert runner.wait_connected(5)
        c = broker.conn()
        # more than one TLS record in one go: what the first recv leaves decrypted must not wait for poll()
        for mid in range(1, 51):
            c.publish(f"p/s/d1/x{mid}", b"%d" % mid + b" " * 1000, mid)
        wait_until(lambda: runner.stats.received == 50)
        wait_until(lambda: prod.sent)
        for i in range(len(prod.sent)):
            prod.deliver(i)
        wait_until(lambda: len(c.pubacks) == 50)
    finally:
        stop.set()
        th.join(10)
        broker.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mqtts_refuses_an_untrusted_certificate(tmp_path, caplog):
    cert, key = _certificate(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    broker = Broker(tls=ctx)
    caplog.set_level(logging.ERROR, "plantstream.mqtt")
    cfg = MqttSource.model_validate(
        {
            "id": "t",
            "type": "mqtt",
            "url": f"mqtts://127.0.0.1:{broker.port}",
            "topics": [{"filter": "p/+/+/+", "template": "p/{site}/{device}/{point}"}],
        }
    )
    runner = MqttSourceRunner(cfg, Producer())  # type: ignore[arg-type]
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()
    try:
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text)
        assert not runner.wait_connected(0)
    finally:
        stop.set()
        th.join(10)
        broker.close()


def test_a_payload_that_breaks_the_parser_is_a_dead_letter_not_a_stop(start, monkeypatch):
    real = source.point_reading

    def fragile(point: str, payload: bytes, received: int, unit: str | None) -> Any:
        if payload == b"boom":
            raise RuntimeError("parser bug")
        return real(point, payload, received, unit)

    monkeypatch.setattr(source, "point_reading", fragile)
    runner, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/a", b"boom", 1)
    c.publish("p/s/d1/b", b"2", 2)
    wait_until(lambda: len(prod.sent) == 2)
    assert prod.sent[0][1]["reason"] == "payload could not be parsed: RuntimeError: parser bug"
    prod.deliver(0)
    prod.deliver(1)
    wait_until(lambda: sorted(c.pubacks) == [1, 2])
    assert runner.stats.reconnects == 0 and runner._held == 0


def test_sample_config_is_valid_and_every_option_is_taken():
    from pathlib import Path

    from pipeline.topology import load

    topo = load(Path(__file__).resolve().parents[2] / "connectors" / "mqtt" / "sample.yaml", env={})
    cfg = topo.sources[0]
    assert isinstance(cfg, MqttSource)
    runner = MqttSourceRunner(cfg, Producer())  # type: ignore[arg-type]
    assert (runner._host, runner._port, runner._tls is not None) == ("broker.example.net", 8883, True)
    assert runner.client_id == "plantstream-site-mqtt" and runner.window == 10_000
    assert (cfg.username, cfg.password, cfg.qos) == ("plantstream", "change-me", 1)
    assert cfg.max_packet_size == 1_048_576
    assert [r.mapping.point for _, r in runner.routes] == [None, None, "energy"]


def test_a_backlog_without_timestamps_keeps_one_reading_per_message(start):
    """Messages that carry no ts take their arrival time; many of one topic read at once (a backlog after a
    reconnect) get one millisecond after another, in order, so no two share a (series, ts) and none is
    overwritten in `readings`. A message with its own ts keeps it."""
    _, prod, broker = start(batch={"max_readings": 500, "max_delay": "200ms"})
    c = broker.conn()
    for mid in range(1, 201):
        c.publish("p/s/d1/temp", str(mid).encode(), mid)
    c.publish("p/s/d1/temp", b'{"value": 0, "ts": 1767225600000}', 201)
    for mid in range(202, 212):  # objects of points: one stamp per message too
        c.publish("o/d2/data", json.dumps({"a": mid, "b": -mid}).encode(), mid)
    wait_until(lambda: sum(len(b["readings"]) for _, b, _ in prod.sent) == 221)
    temps = [r for _, b, _ in prod.sent for r in b["readings"] if b["device"] == "d1"]
    stamped = [r["ts"] for r in temps if r["ts"] != 1_767_225_600_000]
    assert len(stamped) == 200 and stamped == sorted(set(stamped))  # distinct, increasing, in message order
    assert [r["value"] for r in temps if r["ts"] != 1_767_225_600_000] == [float(i) for i in range(1, 201)]
    objs = [r for _, b, _ in prod.sent for r in b["readings"] if b["device"] == "d2"]
    for point in ("a", "b"):
        ts = [r["ts"] for r in objs if r["point"] == point]
        assert len(ts) == 10 and ts == sorted(set(ts))
    for i in range(len(prod.sent)):
        prod.deliver(i)


# -- what one message can cost --------------------------------------------------------------------------


def packet(topic: bytes, payload: bytes, mid: int, level: int, qos: int = 1) -> bytes:
    var = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    body = var + (b"\x00" if level == 5 else b"") + payload
    return bytes([0x30 | qos << 1]) + wire.varint(len(body)) + body


@pytest.mark.parametrize("level", [4, 5])
def test_an_oversized_publish_is_read_past_dead_lettered_and_acknowledged(start, broker, monkeypatch, level):
    """5 MB against the default 1 MiB limit. MQTT 3.1.1 cannot tell the broker the limit, and an MQTT 5
    broker may ignore it: either way the message is never assembled, its dead letter carries the topic and
    the first bytes, and the PUBACK follows it into Kafka so the broker's window does not fill up."""
    peak = [0]
    feed = wire.Reader.feed

    def watched(reader: wire.Reader, data: bytes) -> Any:
        out = feed(reader, data)
        peak[0] = max(peak[0], reader.buffered)
        return out

    monkeypatch.setattr(wire.Reader, "feed", watched)
    broker.refuse_v5 = level == 4
    runner, prod, _ = start()
    c = broker.conn(1 if level == 4 else 0)
    payload = b'{"value": ' + b"1" * 5_000_000 + b"}"
    c.send_raw(packet(b"p/s/d1/frame", payload, 21, level))
    c.publish("p/s/d1/temp", b"21.5", 22)  # what comes after it is read as usual
    wait_until(lambda: len(prod.sent) == 2, timeout=10)
    (kind, dead, _), (batch_kind, batch, _) = prod.sent
    size = len(packet(b"p/s/d1/frame", payload, 21, level))
    assert (kind, batch_kind) == ("dlq", "batch")
    assert dead == {
        "reason": f"oversized: MQTT packet of {size} bytes exceeds max_packet_size 1048576",
        "payload": payload[:256],
        "topic": "p/s/d1/frame",
    }
    assert [r["value"] for r in batch["readings"]] == [21.5]
    assert peak[0] <= 1 << 20  # in fact: the topic, packet identifier and 256 bytes
    time.sleep(0.2)
    assert c.pubacks == []  # not before the dead letter is in Kafka
    prod.deliver(0)
    wait_until(lambda: c.pubacks == [21])
    prod.deliver(1)
    wait_until(lambda: c.pubacks == [21, 22])
    s = runner.stats
    assert (s.received, s.oversized, s.dead_letters, s.acked, s.reconnects) == (2, 1, 1, 2, 0)
    assert runner._held == 0


def test_oversized_messages_do_not_fill_the_window(start, broker):
    """max_inflight 2 and three oversized messages in a row, then a normal one: each is acknowledged once
    its dead letter is in Kafka, and reading goes on."""
    broker.refuse_v5 = True
    runner, prod, _ = start(max_inflight=2, max_packet_size=4096)
    c = broker.conn(1)
    for mid in (1, 2, 3):
        c.send_raw(packet(b"p/s/d1/x", b"x" * 10_000, mid, 4))
    c.publish("p/s/d1/y", b"1", 4)
    for i in range(1, 5):
        wait_until(lambda: len(prod.sent) >= i)  # noqa: B023 (called within this iteration)
        prod.deliver(i - 1)
    wait_until(lambda: sorted(c.pubacks) == [1, 2, 3, 4])
    assert runner.stats.oversized == 3 and runner._held == 0


def publish_body(topic: bytes, mid: int, props: bytes, payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + props + payload
    return b"\x32" + wire.varint(len(body)) + body


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x30\xff\xff\xff\xff\x01", id="remaining length of five bytes"),
        pytest.param(publish_body(b"p/s/\xff\xfe/t", 5, b"\x00", b"1"), id="topic not UTF-8"),
        pytest.param(publish_body(b"p/s/d1/t", 5, b"\x05\x02\x00", b""), id="truncated properties"),
        pytest.param(b"\x32\x03\x00\x09p", id="PUBLISH shorter than its topic"),
        pytest.param(b"\x00\x00", id="reserved packet type 0"),
        pytest.param(b"\xf0\x00", id="AUTH"),
        pytest.param(b"\x90" + wire.varint(2 << 20), id="SUBACK over max_packet_size"),
    ],
)
def test_a_malformed_packet_closes_the_connection_and_reconnects_with_backoff(
    start, monkeypatch, caplog, raw
):
    # Even a connection that lasted is not made again at once after a malformed packet.
    monkeypatch.setattr(source, "STABLE_S", 0.0)
    caplog.set_level(logging.WARNING, "plantstream.mqtt")
    runner, prod, broker = start()
    c = broker.conn()
    c.publish("p/s/d1/a", b"1", 1)
    wait_until(lambda: prod.sent)
    c.send_raw(raw)
    assert c.closed.wait(5)
    closed = time.monotonic()
    c2 = broker.conn(1)
    assert time.monotonic() - closed >= 0.4  # the first backoff is 0.5-1 s
    assert "malformed packet" in caplog.text
    assert runner.stats.malformed == 1 and runner.stats.reconnects == 1
    prod.deliver(0)
    wait_until(lambda: runner.wait_connected(0))
    c2.publish("p/s/d1/a", b"2", 1)
    wait_until(lambda: len(prod.sent) == 2)
    prod.deliver(1)
    wait_until(lambda: c2.pubacks == [1])
    assert c.pubacks == [] and runner._held == 0
    assert [k for k, _, _ in prod.sent] == ["batch", "batch"]  # no dead letter of a malformed packet


class Limited(Producer):
    """A producer whose message.max.bytes is ``limit``: a larger record is refused when produced, as
    librdkafka does. ``fail``: the next batch is refused with that exception instead."""

    def __init__(self, limit: int = 1 << 30) -> None:
        super().__init__()
        self.limit = limit
        self.fail: Exception | None = None

    def send_batch(self, batch: Any, on_delivery: Callable[[KafkaError | None], None]) -> None:
        if self.fail is not None:
            e, self.fail = self.fail, None
            raise e
        if len(codec.dumps(batch)) > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        super().send_batch(batch, on_delivery)

    def send_dead_letter(
        self, source: str, reason: str, payload: bytes, topic: str | None, on_delivery: Any
    ) -> None:
        if len(payload) + len(reason) > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        super().send_dead_letter(source, reason, payload, topic, on_delivery)


def test_a_message_too_large_for_kafka_is_dead_lettered_and_acknowledged(start):
    prod = Limited(20_000)
    runner, _, broker = start(producer=prod, max_inflight=1)
    c = broker.conn()
    payload = json.dumps({f"p{i}": i for i in range(2000)}).encode()  # 2000 readings: ~100 kB of batch
    c.publish("o/hp1/data", payload, 1)
    wait_until(lambda: prod.sent)
    kind, dead, _ = prod.sent[0]
    assert kind == "dlq" and dead["topic"] == "o/hp1/data" and dead["payload"] == payload[:256]
    assert dead["reason"].startswith("oversized for Kafka: 2000 readings of ")
    prod.deliver(0)
    wait_until(lambda: c.pubacks == [1])
    c.publish("p/s/d1/t", b"5", 2)  # max_inflight 1: the slot is free again
    wait_until(lambda: len(prod.sent) == 2)
    prod.deliver(1)
    wait_until(lambda: c.pubacks == [1, 2])
    s = runner.stats
    assert (s.oversized_for_kafka, s.delivery_errors, s.reconnects, runner._held) == (1, 0, 0, 0)


def test_a_batch_too_large_for_kafka_is_split_between_messages(start):
    prod = Limited(3000)
    runner, _, broker = start(producer=prod)
    c = broker.conn()
    for mid in range(1, 21):
        c.publish(f"p/s/d1/x{mid}", json.dumps({"value": mid, "unit": "u" * 400}).encode(), mid)
        if mid == 10:  # a message of three readings, which stays in one batch
            c.publish("o/d1/data", json.dumps({"a": 1, "b": 2, "c": 3}).encode(), 100)
    wait_until(lambda: sum(len(b["readings"]) for _, b, _ in prod.sent) == 23)
    assert all(k == "batch" for k, _, _ in prod.sent) and len(prod.sent) >= 4  # ~9 kB in 3 kB records
    objs = [[r["point"] for r in b["readings"] if r["point"] in "abc"] for _, b, _ in prod.sent]
    assert ["a", "b", "c"] in objs
    values = sorted(r["value"] for _, b, _ in prod.sent for r in b["readings"] if r["point"][0] == "x")
    assert values == [float(i) for i in range(1, 21)]
    for i in range(len(prod.sent) - 1):
        prod.deliver(i)
    time.sleep(0.2)
    assert c.pubacks == []  # the messages wait for every part of their batch
    prod.deliver(len(prod.sent) - 1)
    wait_until(lambda: sorted(c.pubacks) == [*range(1, 21), 100])
    assert runner.stats.oversized_for_kafka == 0 and runner._held == 0


def test_a_batch_the_kafka_broker_refuses_as_too_large_is_sent_again_in_parts(start):
    """The broker's own limit (its message.max.bytes) shows in the delivery report, not when producing."""
    too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    runner, prod, broker = start()
    c = broker.conn()
    for mid in range(1, 5):
        c.publish(f"p/s/d1/p{mid}", str(mid).encode(), mid)
    wait_until(lambda: prod.sent)
    prod.deliver(0, too_large)
    wait_until(lambda: len(prod.sent) == 3)
    assert [[r["point"] for r in b["readings"]] for _, b, _ in prod.sent[1:]] == [["p1", "p2"], ["p3", "p4"]]
    prod.deliver(1)
    prod.deliver(2, too_large)
    wait_until(lambda: len(prod.sent) == 5)
    prod.deliver(3)
    prod.deliver(4, too_large)
    wait_until(lambda: len(prod.sent) == 6)
    kind, dead, _ = prod.sent[5]
    assert kind == "dlq" and dead["topic"] is None
    assert dead["reason"].startswith("oversized for Kafka: 1 readings of ")
    assert dead["reason"].endswith("(reading s/d1/p4)")
    assert json.loads(dead["payload"])["value"] == 4.0
    time.sleep(0.2)
    assert c.pubacks == []
    prod.deliver(5)
    wait_until(lambda: sorted(c.pubacks) == [1, 2, 3, 4])
    s = runner.stats
    assert (s.oversized_for_kafka, s.delivery_errors, s.reconnects, runner._held) == (1, 0, 0, 0)


def test_a_dead_letter_too_large_for_kafka_goes_with_its_payload_cut(start):
    prod = Limited(50_000)
    _, _, broker = start(producer=prod)
    c = broker.conn()
    c.publish("p/s/d1/t", "é".encode() + b"x" * 100_000, 1)  # neither a number nor JSON
    wait_until(lambda: prod.sent)
    kind, dead, _ = prod.sent[0]
    assert kind == "dlq" and dead["payload"] == "é".encode() + b"x" * 254
    assert dead["reason"].endswith("(payload cut to its first bytes, of 100002)")
    prod.deliver(0)
    wait_until(lambda: c.pubacks == [1])


@pytest.mark.parametrize(
    "error",
    [KafkaException(KafkaError(KafkaError._INVALID_ARG)), RuntimeError("producer bug")],
    ids=["KafkaException", "RuntimeError"],
)
def test_a_record_refused_when_produced_releases_its_messages(start, error):
    """Not acknowledged, a new connection for the broker to send it again, and its max_inflight slot free."""
    prod = Limited()
    prod.fail = error
    runner, _, broker = start(producer=prod, max_inflight=1)
    c = broker.conn()
    c.publish("p/s/d1/t", b"1", 1)
    c2 = broker.conn(1)
    assert runner._held == 0 and runner.stats.delivery_errors == 1
    wait_until(lambda: runner.wait_connected(0))
    c2.publish("p/s/d1/t", b"1", 1)
    wait_until(lambda: prod.sent)
    prod.deliver(0)
    wait_until(lambda: c2.pubacks == [1])
    assert c.pubacks == []


def test_max_packet_size_is_validated():
    conf = {"id": "t", "type": "mqtt", "topics": [{"filter": "a/+", "template": "a/{device}", "site": "s"}]}
    assert MqttSource.model_validate(conf).max_packet_size == 1 << 20
    with pytest.raises(ValidationError) as e:
        MqttSource.model_validate({**conf, "max_packet_size": 100})
    assert "max_packet_size must be between 1024 and 268435460 bytes" in str(e.value)
