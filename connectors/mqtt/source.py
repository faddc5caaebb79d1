"""MQTT source: subscribe, parse, batch per device, produce to Kafka, then PUBACK.

QoS 1 with a persistent session and manual acknowledgement (paho-mqtt 2.x): a message is acknowledged to
the MQTT broker only from the Kafka delivery report of everything it became (its readings' batch and any
dead letters). A message that was never acknowledged is redelivered by the broker after a reconnect, so a
crash between receiving and producing loses nothing. Unacknowledged messages are bounded by
``max_inflight``; past it the network thread waits, which is backpressure to the MQTT broker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError
from paho.mqtt.enums import CallbackAPIVersion

from connectors.common.producer import TelemetryProducer
from connectors.mqtt.parse import Route, parse_message, topic_matches
from pipeline.records import BatchReading, InvalidRecord, ReadingBatch, now_ms
from pipeline.topology import MqttSource

log = logging.getLogger("plantstream.mqtt")


class _Ack:
    """One MQTT message waiting for the Kafka deliveries it became."""

    __slots__ = ("mid", "qos", "remaining")

    def __init__(self, mid: int, qos: int) -> None:
        self.mid = mid
        self.qos = qos
        # Starts at 1: the parse-time hold, so an early delivery report cannot acknowledge a message
        # whose other parts are still being produced.
        self.remaining = 1


@dataclass
class _Pending:
    site: str
    device: str
    started: float
    readings: list[BatchReading] = field(default_factory=list)
    acks: list[_Ack] = field(default_factory=list)


@dataclass
class Stats:
    received: int = 0
    readings: int = 0
    batches: int = 0
    dead_letters: int = 0
    acked: int = 0
    delivery_errors: int = 0
    reconnects: int = 0


class MqttSourceRunner:
    def __init__(self, cfg: MqttSource, producer: TelemetryProducer) -> None:
        self.cfg = cfg
        self.producer = producer
        self.routes = [(m.filter, Route.compile(m)) for m in cfg.topics]
        self.stats = Stats()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._inflight = 0
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._reconnect_wanted = False
        url = urlparse(cfg.url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 1883
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"plantstream-{cfg.id}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 30)  # capped backoff; paho re-dials on its own
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # -- paho callbacks (network thread) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("source %s: MQTT connect refused: %s", self.cfg.id, reason)
            return
        # Subscribing again on every connect is harmless with a persistent session and needed without one.
        client.subscribe([(f, int(self.cfg.qos)) for f, _ in self.routes])
        log.info(
            "source %s: connected to %s:%d (session present: %s)",
            self.cfg.id,
            self._host,
            self._port,
            getattr(_flags, "session_present", "?"),
        )

    def _on_subscribe(self, _c: mqtt.Client, _ud: Any, _mid: int, reasons: Any, _props: Any) -> None:
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            log.error("source %s: subscription refused: %s", self.cfg.id, refused)
            return
        self._connected.set()
        log.info("source %s: subscribed to %s", self.cfg.id, ", ".join(f for f, _ in self.routes))

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self.stats.reconnects += 1
            log.warning("source %s: disconnected (%s); reconnecting", self.cfg.id, reason)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        received = now_ms()
        payload = bytes(msg.payload)
        ack = _Ack(msg.mid, msg.qos)
        with self._room:
            while self._inflight >= self.cfg.max_inflight and not self._stop.is_set():
                self._room.wait(0.1)
            self._inflight += 1
            self.stats.received += 1
        route = next((r for f, r in self.routes if topic_matches(f, msg.topic)), None)
        ids = route.match(msg.topic) if route else None
        if route is None or ids is None:
            self._dead_letter(ack, f"topic {msg.topic!r} does not fit any template", payload, msg.topic)
            self._release(ack)
            return
        try:
            parsed = parse_message(route, ids, payload, received)
        except InvalidRecord as e:
            self._dead_letter(ack, e.reason, payload, msg.topic)
            self._release(ack)
            return
        for reason in parsed.rejected:
            self._dead_letter(ack, reason, payload, msg.topic)
        if parsed.readings:
            full = None
            with self._lock:
                key = (parsed.site, parsed.device)
                pend = self._pending.get(key)
                if pend is None:
                    pend = self._pending[key] = _Pending(parsed.site, parsed.device, time.monotonic())
                pend.readings.extend(parsed.readings)
                ack.remaining += 1
                pend.acks.append(ack)
                if len(pend.readings) >= self.cfg.batch.max_readings:
                    full = self._pending.pop(key)
            if full is not None:
                self._produce(full)
        self._release(ack)

    # -- delivery ------------------------------------------------------------------------------------
    def _release(self, ack: _Ack) -> None:
        """Drop the parse-time hold on a message: it is acknowledged once nothing else holds it."""
        self._done(ack, None)

    def _done(self, ack: _Ack, err: KafkaError | None) -> None:
        with self._room:
            if err is not None:
                self.stats.delivery_errors += 1
                self._reconnect_wanted = True  # unacked messages are redelivered by the broker
                return
            ack.remaining -= 1
            if ack.remaining != 0:
                return
            self._inflight -= 1
            self._room.notify_all()
            self.stats.acked += 1
        if ack.qos > 0:
            self.client.ack(ack.mid, ack.qos)

    def _dead_letter(self, ack: _Ack, reason: str, payload: bytes, topic: str) -> None:
        with self._lock:
            ack.remaining += 1
            self.stats.dead_letters += 1
        self.producer.send_dead_letter(self.cfg.id, reason, payload, topic, lambda err: self._done(ack, err))

    def _produce(self, pend: _Pending) -> None:
        batch: ReadingBatch = {
            "v": 1,
            "source": self.cfg.id,
            "site": pend.site,
            "device": pend.device,
            "readings": pend.readings,
        }
        acks = pend.acks
        with self._lock:
            self.stats.batches += 1
            self.stats.readings += len(pend.readings)

        def delivered(err: KafkaError | None) -> None:
            for a in acks:
                self._done(a, err)

        self.producer.send_batch(batch, delivered)

    def flush_due(self, force: bool = False) -> None:
        limit = self.cfg.batch.max_delay / 1000.0
        now = time.monotonic()
        with self._lock:
            due = [k for k, p in self._pending.items() if force or now - p.started >= limit]
            batches = [self._pending.pop(k) for k in due]
        for b in batches:
            self._produce(b)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self._host, self._port, keepalive=30)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def step(self) -> None:
        """One turn of the main loop: flush due batches, serve delivery reports, reconnect if asked."""
        self.flush_due()
        self.producer.poll(0.01)
        if self._reconnect_wanted:
            self._reconnect_wanted = False
            log.warning(
                "source %s: Kafka delivery failed; reconnecting MQTT so the broker redelivers", self.cfg.id
            )
            self.client.reconnect()

    def stop(self, timeout: float = 30.0) -> None:
        """Flush what is buffered, wait for its acknowledgements, then disconnect."""
        self.flush_due(force=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.producer.poll(0.05)
            with self._lock:
                if self._inflight == 0:
                    break
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self.client.disconnect()
        self.client.loop_stop()

    def run(self, stop: threading.Event) -> None:
        self.start()
        while not stop.is_set():
            self.step()
        self.stop()
