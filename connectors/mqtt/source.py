"""MQTT source: subscribe, parse, batch per device, produce to Kafka, then PUBACK.

QoS 1 with a persistent session and manual acknowledgement: a message is acknowledged to the MQTT broker
(PUBACK) only from the Kafka delivery report of everything it became (its readings' batch and any dead
letters). A message that was never acknowledged is redelivered by the broker after a reconnect, so a crash
between receiving and producing loses nothing.

One thread does everything: it reads the socket, splits a whole read of packets at once (``wire.split``),
maps topics through a per-topic cache, parses, appends to the device's batch, produces full or due batches,
serves Kafka delivery reports and writes the PUBACKs they release in one ``sendall``. No locks, no
per-message callbacks, no per-message system calls. The paho-mqtt based source this replaces spent ~55 µs
of CPU per message (its network thread, a callback and a lock per message, one ``ack()`` call each) and
moved ~21,000 messages/s on the 2-core development machine; this one ~6 µs and ~50,000 (connectors/mqtt/
README.md has the figures).

Flow control. MQTT 5 is spoken when the broker does (3.1.1 otherwise): its CONNECT asks for at most
``max_inflight`` unacknowledged messages (Receive Maximum), so the window does not depend on the broker's
``max_inflight_messages`` (20 by default in Mosquitto, which acknowledging after Kafka would turn into a
throughput cap). Held messages count against the window, so batches are flushed before they could stall it:
when half the window is held, when the input pauses, and at the latest after ``batch.max_delay``. Past
``max_inflight`` unfinished messages the connector stops reading the socket: backpressure to the broker.

Acknowledgements go only to the connection that received the message. After a reconnect the broker
redelivers what was not acknowledged; batches of the old connection still complete in Kafka, so such a
message can reach Kafka twice (at-least-once; the sinks are idempotent), never zero times.

Bounds. No packet larger than ``max_packet_size`` is assembled: MQTT 5 asks the broker not to send one
(Maximum Packet Size), and a PUBLISH that comes anyway (MQTT 3.1.1 cannot ask) is read past as it streams in
(``wire.Reader``), dead-lettered with its topic and first payload bytes, and acknowledged once that is in
Kafka. A batch that Kafka refuses as too large is sent again split between messages; a message too large on
its own is dead-lettered. Every way a record can fail, including a refusal before it was queued, completes
its messages, so none stays counted against ``max_inflight``. A malformed packet closes the connection, and
the next one is made after a backoff.

Connection upkeep: PINGREQ after ``KEEPALIVE_S`` without sending (or the broker's Server Keep Alive), and a
new connection if its PINGRESP does not come within as long; reconnects with capped, jittered backoff (1 s
doubling to 30 s; at once after a connection that lasted), subscribing again every time. On stop (SIGTERM):
flush, wait for Kafka, write the PUBACKs, then a PINGREQ whose answer shows the broker has read them (so
that a connector restarted at once cannot make the broker drop them unread), then DISCONNECT.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from confluent_kafka import KafkaError, KafkaException

from connectors.common.backoff import delays
from connectors.common.producer import Delivered, TelemetryProducer, attach_spool
from connectors.mqtt import wire
from connectors.mqtt.config import MqttSource
from connectors.mqtt.parse import Route, parse_message, point_reading, topic_matches
from pipeline.core import codec
from pipeline.core.records import BatchReading, InvalidRecord, ReadingBatch, now_ms

log = logging.getLogger("plantstream.mqtt")

KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
READ_BYTES = 256 * 1024
# A connection that ends sooner than this after it was made does not reset the reconnect backoff: a broker
# that accepts and drops at once (a second client with the same client id, say) is not hammered.
STABLE_S = 10.0
# On stop: how long to wait for the PINGRESP that shows the broker has read every PUBACK sent before it.
SHUTDOWN_BARRIER_S = 5.0
# Nothing read for this long while batches are held: the burst is over, or the broker's window is full (a
# broker that sends fewer unacknowledged messages than the Receive Maximum asks, or a 3.1.1 broker's
# max_inflight_messages) and holding longer only delays the PUBACKs that let it send more. Longer than a
# Python publisher's usual pauses (the interpreter switches threads every 5 ms), so bursts stay one batch.
IDLE_FLUSH_S = 0.02
TOPIC_CACHE = 100_000  # topics remembered; past it the cache starts over
# A read shorter than this is followed by a pause of COALESCE_S: under a steady stream the broker writes each
# message on its own, and reading them a handful at a time spends the CPU on wake-ups (~10 messages a read
# against ~100 here; 15-20 % less CPU per message, and the broker shares the machine). Under a backlog every
# read is full and nothing waits; a single message is late by a millisecond.
COALESCE_BYTES = 16 * 1024
COALESCE_S = 0.001
# Payload bytes a dead letter keeps of a message too large to keep whole (over max_packet_size, or for Kafka).
HEAD_BYTES = wire.OVERSIZED_HEAD


class _Ack:
    """A message that became several Kafka records (readings and dead letters): acknowledged after all."""

    __slots__ = ("epoch", "failed", "mid", "remaining")

    def __init__(self, mid: int, epoch: int, remaining: int) -> None:
        self.mid = mid  # 0 for QoS 0: nothing to acknowledge
        self.epoch = epoch
        self.remaining = remaining
        self.failed = False


class _Pending:
    """A device's batch being filled, and the messages it completes."""

    __slots__ = ("device", "epoch", "mids", "parts", "plain", "readings", "site", "spans", "started")

    def __init__(self, site: str, device: str, started: float, epoch: int) -> None:
        self.site = site
        self.device = device
        self.started = started
        self.epoch = epoch
        self.readings: list[BatchReading] = []
        self.mids: list[int] = []  # QoS 1 messages wholly in this batch
        self.plain = 0  # QoS 0 messages wholly in this batch
        self.parts: list[_Ack] = []  # messages with other records besides this batch
        # Messages of several readings: (first, end, topic, payload head). Every other reading is a message
        # of its own. Only read when Kafka finds the batch too large and it is split between messages.
        self.spans: list[tuple[int, int, str, bytes]] = []


class _Group:
    """The records a batch became when Kafka refused it as too large; ``done`` once all are through, with
    the first failure if there was one."""

    __slots__ = ("done", "error", "remaining")

    def __init__(self, done: Delivered) -> None:
        self.done = done
        self.error: KafkaError | None = None
        self.remaining = 1  # held while the records are being sent, so that none completes the group early

    def part_done(self, err: KafkaError | None) -> None:
        if err is not None and self.error is None:
            self.error = err
        self.remaining -= 1
        if not self.remaining:
            self.done(self.error)


class _Target:
    """Where a topic's messages go, resolved once per topic string."""

    __slots__ = ("device", "ids", "key", "malformed", "point", "reason", "route", "site", "topic", "unit")

    def __init__(self, topic: str, route: Route | None, ids: dict[str, str] | None, reason: str = "") -> None:
        self.topic = topic
        self.route = route
        self.ids = ids or {}
        self.reason = reason
        self.site = self.ids.get("site", "")
        self.device = self.ids.get("device", "")
        self.point = self.ids.get("point")
        self.key = (self.site, self.device)
        self.unit = route.mapping.unit if route else None
        self.malformed = False


@dataclass
class Stats:
    received: int = 0
    readings: int = 0
    batches: int = 0
    dead_letters: int = 0
    acked: int = 0
    delivery_errors: int = 0
    reconnects: int = 0
    oversized: int = 0  # MQTT packets over max_packet_size, dead-lettered
    oversized_for_kafka: int = 0  # messages (or readings) Kafka refused as too large, dead-lettered
    malformed: int = 0  # connections closed over a malformed packet
    spool_bytes: int = 0
    spool_records: int = 0
    spool_oldest_age_s: float = 0.0
    spool_dropped: int = 0
    spool_resent: int = 0


def _unexpected(e: Exception) -> str:
    """The dead-letter reason for a payload that broke the parser instead of being refused by it: such a
    message must not stop the source (the broker would send it again and again)."""
    log.warning("payload the parser did not expect (%r): sent to the dead-letter topic", e)
    return f"payload could not be parsed: {type(e).__name__}: {e}"[:300]


def _head(payload: bytes) -> bytes:
    """The first HEAD_BYTES of a payload, not ending inside a UTF-8 character: a text payload stays text in
    the dead letter (a cut character would make it base64)."""
    head = payload[:HEAD_BYTES]
    if len(head) == len(payload):
        return head
    for k in range(1, min(4, len(head)) + 1):
        b = head[-k]
        if b & 0xC0 != 0x80:  # the last character's first byte: does the character fit?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            return head[:-k] if need > k else head
    return head


def _refused(e: Exception) -> KafkaError:
    """The error of a record the producer refused before queueing it (``MSG_SIZE_TOO_LARGE`` past its
    message.max.bytes, say), to be handled as its failed delivery."""
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        return e.args[0]
    log.exception("producing failed")
    return KafkaError(KafkaError._FAIL, f"{type(e).__name__}: {e}")


def _too_large(err: KafkaError | None) -> bool:
    return err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE


class _Lost(Exception):
    """The MQTT connection is gone or unusable; the reason is the message."""


class _Malformed(_Lost):
    """The broker sent something that is not MQTT as this client speaks it: reconnect after a backoff."""


class _Fallback(_Lost):
    """The broker does not speak MQTT 5: connect again at once with 3.1.1."""


class MqttSourceRunner:
    wants_topology = True  # the spool's default directory is named after the topology

    def __init__(self, cfg: MqttSource, producer: TelemetryProducer, *, topology: Any = None) -> None:
        self.cfg = cfg
        self.producer = producer
        # With a spool a message is acknowledged once its batch is fsynced there, not once Kafka has it.
        self._spooled = attach_spool(producer, cfg.spool, topology, cfg.id, "block", ack_durable=True)
        self._next_stats = 0.0
        self.routes = [(m.filter, Route.compile(m)) for m in cfg.topics]
        self.stats = Stats()
        url = urlparse(cfg.url)
        self._host = url.hostname or "127.0.0.1"
        # mqtts://: TLS, the broker's certificate checked against the system's CAs and the host name.
        self._tls = ssl.create_default_context() if url.scheme == "mqtts" else None
        self._port = url.port or (8883 if self._tls else 1883)
        self.client_id = cfg.client_id or f"plantstream-{cfg.id}"
        self.window = min(cfg.max_inflight, 65535)
        self.version = wire.V5  # falls back to 3.1.1 if the broker refuses 5
        self._connected = threading.Event()
        self._sock: socket.socket | None = None
        self._poller: Any = None
        self._reader = wire.Reader(self.version, cfg.max_packet_size)
        self._early = b""  # what came with the CONNACK, for the first turn
        self._epoch = 0  # one per connection: PUBACKs only go to the connection that received the message
        self._keepalive = KEEPALIVE_S
        self._last_rx = self._last_tx = 0.0
        self._ping_at: float | None = None  # when the unanswered keepalive PINGREQ went
        self._pings = 0  # PINGREQs without their PINGRESP
        self._up_since = 0.0
        self._sub_id = 0
        self._pending: dict[tuple[str, str], _Pending] = {}  # in creation order: oldest first
        self._targets: dict[bytes, _Target] = {}
        # topic -> the arrival time last given to its readings that carry no ts: the next is at least 1 ms
        # later, so a backlog read at once keeps one reading per message (not one per series and read).
        self._stamped: dict[bytes, int] = {}
        self._held = 0  # messages received and not yet completely in Kafka (any connection)
        self._acks: list[int] = []  # PUBACKs released by Kafka, to write
        self._reconnect: _Lost | None = None  # raised at the end of the turn

    # -- connection ----------------------------------------------------------------------------------
    def _connect(self) -> None:
        sock = socket.create_connection((self._host, self._port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # PUBACKs go out at once
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            sock.sendall(
                wire.connect(
                    self.client_id,
                    keepalive=KEEPALIVE_S,
                    version=self.version,
                    username=self.cfg.username,
                    password=self.cfg.password if self.cfg.username else None,
                    receive_maximum=self.window,
                    maximum_packet_size=self.cfg.max_packet_size,
                )
            )
            buf = b""
            while (first := wire.first_packet(buf, self.cfg.max_packet_size)) is None:
                data = sock.recv(READ_BYTES)
                if not data:
                    raise _Lost("the broker closed the connection before CONNACK")
                buf += data
            (kind, _flags, body), used = first
            if kind != wire.CONNACK:
                raise _Lost(f"expected CONNACK, got packet type {kind}")
            ack = wire.parse_connack(body, self.version)
            if ack.code:
                if ack.unsupported_version and self.version == wire.V5:
                    log.info("source %s: the broker does not speak MQTT 5; using 3.1.1", self.cfg.id)
                    self.version = wire.V311
                    raise _Fallback("retrying with MQTT 3.1.1")
                raise _Lost(f"MQTT connect refused: {ack.describe()}")
            sock.settimeout(CONNECT_TIMEOUT_S)  # bounds sendall; reads only follow poll()
        except BaseException:
            sock.close()
            raise
        # Batches of the previous connection go to Kafka now, and none of their PUBACKs to this connection:
        # the broker redelivers those messages with packet identifiers of its own choosing.
        self._flush_all()
        self._epoch += 1
        self._acks.clear()
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._reader = wire.Reader(self.version, self.cfg.max_packet_size)
        self._early = buf[used:]  # packets that came with the CONNACK
        self._keepalive = KEEPALIVE_S if ack.server_keepalive is None else ack.server_keepalive
        self._last_rx = self._last_tx = self._up_since = time.monotonic()
        self._ping_at = None
        self._pings = 0
        # Subscribing again on every connect is harmless with a persistent session and needed without one.
        self._sub_id = self._sub_id % 65535 + 1
        filters = [(f, int(self.cfg.qos)) for f, _ in self.routes]
        self._send(wire.subscribe(self._sub_id, filters, self.version))
        log.info(
            "source %s: connected to %s:%d (MQTT %s, session present: %s)",
            self.cfg.id,
            self._host,
            self._port,
            "5" if self.version == wire.V5 else "3.1.1",
            ack.session_present,
        )
        if self._epoch > 1 and not ack.session_present:
            log.warning(
                "source %s: the broker no longer had this client's session (restarted without persistence?): "
                "what was published for it while disconnected is lost, and unacknowledged messages are not "
                "sent again",
                self.cfg.id,
            )

    def _close(self, reason: str) -> None:
        self._connected.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.stats.reconnects += 1
            log.warning("source %s: disconnected (%s); reconnecting", self.cfg.id, reason)
        self._acks.clear()  # they belong to the connection that is gone
        self._early = b""

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise _Lost(f"write failed: {e}") from None
        self._last_tx = time.monotonic()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- receiving -----------------------------------------------------------------------------------
    def _recv(self) -> bytes:
        """What the socket has (after poll() said it has something); raises _Lost at its end."""
        assert self._sock is not None
        try:
            data = self._sock.recv(READ_BYTES)
            if self._tls is not None:
                # TLS hands out one record per recv; what it decrypted beyond that is invisible to poll().
                while n := self._sock.pending():  # type: ignore[attr-defined]
                    data += self._sock.recv(n)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return b""
        except OSError as e:
            raise _Lost(f"read failed: {e}") from None
        if not data:
            raise _Lost("closed by the broker")
        return data

    def _read(self) -> None:
        if data := self._recv():
            self._feed(data)
            if len(data) < COALESCE_BYTES:
                time.sleep(COALESCE_S)

    def _feed(self, data: bytes) -> None:
        try:
            pubs, ctrl, over = self._reader.feed(data)
        except (wire.ProtocolError, IndexError) as e:
            raise _Malformed(f"malformed packet: {e}") from None
        self._last_rx = time.monotonic()
        self._ping_at = None  # anything from the broker shows it is alive
        if pubs:
            self._on_publishes(pubs)
        if over:
            self._on_oversized(over)
        try:
            for kind, flags, body in ctrl:
                self._on_control(kind, flags, body)
        except wire.ProtocolError as e:
            raise _Malformed(f"malformed packet: {e}") from None

    def _on_oversized(self, over: list[wire.Oversized]) -> None:
        """PUBLISH packets over max_packet_size, read past without being assembled: a dead letter each, and
        the PUBACK once it is in Kafka. Left unacknowledged they would fill the broker's window, and come
        again after every reconnect."""
        limit = self.cfg.max_packet_size
        self.stats.received += len(over)
        self.stats.oversized += len(over)
        self._held += len(over)
        for o in over:
            topic = o.topic.decode("utf-8", "replace")
            log.warning(
                "source %s: MQTT packet of %d bytes on %r exceeds max_packet_size (%d): sent to the "
                "dead-letter topic",
                self.cfg.id,
                o.size,
                topic[:200],
                limit,
            )
            reason = f"oversized: MQTT packet of {o.size} bytes exceeds max_packet_size {limit}"
            self._dead_letter(_Ack(o.mid, self._epoch, 1), reason, _head(o.head), topic)

    def _on_control(self, kind: int, _flags: int, body: bytes) -> None:
        if kind == wire.SUBACK:
            _, codes = wire.parse_suback(body, self.version)
            if any(c >= 0x80 for c in codes):
                log.error("source %s: subscription refused: %s", self.cfg.id, codes)
                return
            if any(c < self.cfg.qos for c in codes):
                log.warning(
                    "source %s: the broker granted QoS %s instead of %d: messages it sends at QoS 0 are "
                    "not redelivered if lost",
                    self.cfg.id,
                    codes,
                    self.cfg.qos,
                )
            self._connected.set()
            log.info("source %s: subscribed to %s", self.cfg.id, ", ".join(f for f, _ in self.routes))
        elif kind == wire.PINGRESP:
            self._pings = max(0, self._pings - 1)
        elif kind == wire.DISCONNECT:
            code, reason = wire.parse_disconnect(body, self.version)
            raise _Lost(f"the broker disconnected: code 0x{code:02x} {reason or ''}".rstrip())
        else:
            # QoS 2 and the rest cannot come on a QoS 0/1 subscription.
            raise _Malformed(f"malformed packet: unexpected packet type {kind}")

    def _target(self, topic: bytes) -> _Target:
        try:
            name = topic.decode("utf-8")
        except UnicodeDecodeError:
            # Ill-formed UTF-8 makes the packet malformed (MQTT 3.1.1 1.5.3, 5.0 1.5.4): see _general.
            t = _Target(topic.decode("utf-8", "replace"), None, None, "PUBLISH topic is not valid UTF-8")
            t.malformed = True
        else:
            route = next((r for f, r in self.routes if topic_matches(f, name)), None)
            ids = route.match(name) if route else None
            if route is None or ids is None:
                t = _Target(name, None, None, f"topic {name!r} does not fit any template")
            else:
                t = _Target(name, route, ids)
        if len(self._targets) >= TOPIC_CACHE:
            self._targets.clear()
        self._targets[topic] = t
        return t

    def _on_publishes(self, pubs: list[wire.Publish]) -> None:
        """The hot path: a whole read of messages, one reading each for the usual topic-per-point device."""
        received = now_ms()  # the arrival time of the read: the ts of readings that carry none
        now = time.monotonic()
        epoch = self._epoch
        targets, pending = self._targets, self._pending
        max_readings = self.cfg.batch.max_readings
        self.stats.received += len(pubs)
        self._held += len(pubs)
        stamped = self._stamped
        for topic, payload, mid, _qos in pubs:
            t = targets.get(topic) or self._target(topic)
            last = stamped.get(topic)
            arrival = received if last is None or last < received else last + 1
            if t.point is None or t.route is None:
                if self._general(t, payload, mid, arrival, now):
                    self._stamp(topic, arrival)
                continue
            try:
                reading = point_reading(t.point, payload, arrival, t.unit)
            except InvalidRecord as e:
                self._dead_letter(_Ack(mid, epoch, 1), e.reason, payload, t.topic)
                continue
            except Exception as e:
                self._dead_letter(_Ack(mid, epoch, 1), _unexpected(e), payload, t.topic)
                continue
            if reading["ts"] == arrival:
                self._stamp(topic, arrival)
            pend = pending.get(t.key)
            if pend is None:
                pend = pending[t.key] = _Pending(t.site, t.device, now, epoch)
            pend.readings.append(reading)
            if mid:
                pend.mids.append(mid)
            else:
                pend.plain += 1
            if len(pend.readings) >= max_readings:
                self._produce(pending.pop(t.key))

    def _stamp(self, topic: bytes, arrival: int) -> None:
        if len(self._stamped) >= TOPIC_CACHE:
            self._stamped.clear()
        self._stamped[topic] = arrival

    def _general(self, t: _Target, payload: bytes, mid: int, received: int, now: float) -> bool:
        """Unroutable topics and objects of points: a message may become readings and dead letters. Whether
        a reading took ``received`` as its time."""
        if t.malformed:
            # Not acknowledged, and the connection is closed at the end of this turn: the protocol's answer to
            # a malformed packet. The messages read with it are handled as usual.
            self._held -= 1
            if not isinstance(self._reconnect, _Malformed):
                self._reconnect = _Malformed(f"malformed packet: {t.reason}: {t.topic[:200]!r}")
            return False
        # Starts at 1, held until every part is on its way, so a delivery report served while a dead letter
        # waits for queue room cannot acknowledge the message early. A message refused whole is one part.
        ack = _Ack(mid, self._epoch, 1)
        try:
            if t.route is None:
                raise InvalidRecord(t.reason)
            parsed = parse_message(t.route, t.ids, payload, received)
        except InvalidRecord as e:
            self._dead_letter(ack, e.reason, payload, t.topic)
            return False
        except Exception as e:
            self._dead_letter(ack, _unexpected(e), payload, t.topic)
            return False
        ack.remaining += len(parsed.rejected) + (1 if parsed.readings else 0)
        for reason in parsed.rejected:
            self._dead_letter(ack, reason, payload, t.topic)
        if parsed.readings:
            key = (parsed.site, parsed.device)
            pend = self._pending.get(key)
            if pend is None:
                pend = self._pending[key] = _Pending(parsed.site, parsed.device, now, self._epoch)
            first = len(pend.readings)
            pend.readings.extend(parsed.readings)
            pend.spans.append((first, len(pend.readings), t.topic, _head(payload)))
            pend.parts.append(ack)
            if len(pend.readings) >= self.cfg.batch.max_readings:
                self._produce(self._pending.pop(key))
        self._part_done(ack, None)  # the parse-time hold
        return any(r["ts"] == received for r in parsed.readings)

    # -- producing and acknowledging -----------------------------------------------------------------
    def _dead_letter(self, ack: _Ack, reason: str, payload: bytes, topic: str) -> None:
        self.stats.dead_letters += 1
        self._send_dead_letter(reason, payload, topic, lambda err: self._part_done(ack, err))

    def _send_dead_letter(
        self, reason: str, payload: bytes, topic: str | None, done: Delivered, cut: bool = False
    ) -> None:
        """A dead letter that Kafka refuses as too large goes again, once, with the payload cut to its first
        bytes and the reason to its first 1,000 characters: refused for good, its message would never be
        acknowledged."""

        def delivered(err: KafkaError | None) -> None:
            if _too_large(err) and not cut:
                shorter = f"{reason[:1000]} (payload cut to its first bytes, of {len(payload)})"
                self._send_dead_letter(shorter, _head(payload), topic, done, cut=True)
            else:
                done(err)

        try:
            self.producer.send_dead_letter(self.cfg.id, reason, payload, topic, delivered)
            return
        except Exception as e:
            err = _refused(e)
        delivered(err)

    def _part_done(self, ack: _Ack, err: KafkaError | None) -> None:
        if err is not None:
            self._failed(err)
            ack.failed = True
        ack.remaining -= 1
        if ack.remaining:
            return
        self._held -= 1
        if ack.failed:
            return  # not acknowledged: the broker redelivers it after the reconnect
        self.stats.acked += 1
        if ack.mid and ack.epoch == self._epoch:
            self._acks.append(ack.mid)

    def _failed(self, err: KafkaError) -> None:
        self.stats.delivery_errors += 1
        log.error("source %s: Kafka delivery failed: %s", self.cfg.id, err)
        if self._reconnect is None:
            self._reconnect = _Lost("Kafka delivery failed; reconnecting so the broker redelivers")

    def _produce(self, pend: _Pending) -> None:
        self.stats.batches += 1
        self.stats.readings += len(pend.readings)
        mids, plain, parts, epoch = pend.mids, pend.plain, pend.parts, pend.epoch

        def delivered(err: KafkaError | None) -> None:
            if _too_large(err):
                # Sending it again as it is would fail again, after every redelivery: split it.
                self._split(pend, done)
            else:
                done(err)

        def done(err: KafkaError | None) -> None:
            self._held -= len(mids) + plain
            if err is not None:
                self._failed(err)
            else:
                self.stats.acked += len(mids) + plain
                if epoch == self._epoch:
                    self._acks.extend(mids)
            for a in parts:
                self._part_done(a, err)

        self._send_batch(pend.site, pend.device, pend.readings, delivered)

    def _send_batch(self, site: str, device: str, readings: list[BatchReading], delivered: Delivered) -> None:
        batch: ReadingBatch = {
            "v": 1,
            "source": self.cfg.id,
            "site": site,
            "device": device,
            "readings": readings,
        }
        try:
            self.producer.send_batch(batch, delivered)
            return
        except Exception as e:
            # Refused before it was queued: a delivery report that will not come, so it is given here (the
            # messages are released from max_inflight either way).
            err = _refused(e)
        delivered(err)

    # -- batches too large for Kafka -----------------------------------------------------------------
    def _split(self, pend: _Pending, done: Delivered) -> None:
        """Kafka refused the batch as too large: its halves go as batches of their own, cut between
        messages, and halves of those if need be; a message refused on its own becomes a dead letter.
        ``done`` once all are through."""
        units: list[tuple[int, int, str | None, bytes]] = []  # (first, end, topic, payload head) a message
        i = 0
        for first, end, topic, head in pend.spans:
            units.extend((k, k + 1, None, b"") for k in range(i, first))
            units.append((first, end, topic, head))
            i = end
        units.extend((k, k + 1, None, b"") for k in range(i, len(pend.readings)))
        group = _Group(done)
        self._halve(pend, units, group)
        group.part_done(None)

    def _halve(self, pend: _Pending, units: list[tuple[int, int, str | None, bytes]], group: _Group) -> None:
        if len(units) == 1:
            self._oversized_for_kafka(pend, units[0], group)
            return
        half = len(units) // 2
        for part in (units[:half], units[half:]):
            self._send_units(pend, part, group)

    def _send_units(
        self, pend: _Pending, units: list[tuple[int, int, str | None, bytes]], group: _Group
    ) -> None:
        group.remaining += 1
        self.stats.batches += 1

        def delivered(err: KafkaError | None) -> None:
            if _too_large(err):
                self._halve(pend, units, group)  # adds its records to the group before this one leaves it
                err = None
            group.part_done(err)

        self._send_batch(pend.site, pend.device, pend.readings[units[0][0] : units[-1][1]], delivered)

    def _oversized_for_kafka(
        self, pend: _Pending, unit: tuple[int, int, str | None, bytes], group: _Group
    ) -> None:
        first, end, topic, head = unit
        readings = pend.readings[first:end]
        size = len(codec.dumps(readings))
        if topic is None:  # a message of one reading, whose topic is not kept: the reading tells what it was
            what = f"reading {pend.site}/{pend.device}/{readings[0]['point']}"
            head = _head(codec.dumps(readings[0]))
        else:
            what = f"message on {topic!r}"
        self.stats.oversized_for_kafka += 1
        self.stats.readings -= end - first
        self.stats.dead_letters += 1
        log.warning(
            "source %s: %s is too large for Kafka (%d readings, %d bytes): sent to the dead-letter topic",
            self.cfg.id,
            what[:300],
            end - first,
            size,
        )
        group.remaining += 1
        reason = f"oversized for Kafka: {end - first} readings of {size} bytes, refused by Kafka as too large"
        if topic is None:
            reason += f" ({what})"
        self._send_dead_letter(reason, head, topic, group.part_done)

    def _flush_all(self) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            self._produce(p)

    def _flush_due(self, now: float) -> None:
        if not self._pending:
            return
        if self._held >= self.window // 2 or now - self._last_rx >= IDLE_FLUSH_S:
            self._flush_all()
            return
        limit = self.cfg.batch.max_delay / 1000.0
        due = []
        for key, p in self._pending.items():  # oldest first: stop at the first that is not due
            if now - p.started < limit:
                break
            due.append(key)
        for key in due:
            self._produce(self._pending.pop(key))

    def _send_acks(self) -> None:
        if self._acks and self._sock is not None:
            acks, self._acks = self._acks, []
            self._send(wire.pubacks(acks))

    # -- the loop ------------------------------------------------------------------------------------
    def _turn(self) -> None:
        """Read what the socket has, serve delivery reports, flush, acknowledge, keep the connection alive."""
        # While messages are held, delivery reports and due batches are looked at every 2 ms (the producer
        # lingers 5 ms); an idle connection wakes 10 times a second to notice a stop.
        timeout = 0.002 if self._held else 0.1
        if self._early:
            data, self._early = self._early, b""
            self._feed(data)
        # A full `block` spool stops reading too: the broker keeps the messages.
        reading = self._held < self.cfg.max_inflight and (not self._spooled or self.producer.room)
        if reading:
            if self._poller.poll(int(timeout * 1000 + 0.999)):
                self._read()
        else:
            # Stop reading: the broker's window fills and TCP pushes back.
            self.producer.poll(timeout)
        self.producer.poll(0)
        now = time.monotonic()
        self._flush_due(now)
        self._send_acks()
        if self._spooled and now >= self._next_stats:
            self._next_stats = now + 1.0
            self.producer.update_stats(self.stats)
        if self._ping_at is None:
            if now - self._last_tx >= self._keepalive > 0:
                self._ping()
                self._ping_at = now
        elif not reading:
            self._ping_at = now  # the answer waits unread behind the messages: not the broker's fault
        elif now - self._ping_at > self._keepalive:
            raise _Lost(f"no answer to PINGREQ in {self._keepalive} s")
        if self._reconnect is not None:
            lost, self._reconnect = self._reconnect, None
            raise lost

    def _ping(self) -> None:
        self._send(wire.PINGREQ_PACKET)
        self._pings += 1

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        """Sleep between connection attempts, still serving delivery reports."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.producer.poll(min(0.1, left))
            self._flush_due(time.monotonic())

    def run(self, stop: threading.Event) -> None:
        backoff: Iterator[float] | None = None
        try:
            while not stop.is_set():
                if self._sock is None:
                    try:
                        self._connect()
                    except _Fallback:
                        continue
                    except Exception as e:
                        if not isinstance(e, OSError | _Lost | wire.ProtocolError):
                            log.exception("source %s: unexpected error while connecting", self.cfg.id)
                        backoff = backoff or delays(1.0, 30.0)
                        delay = next(backoff)
                        log.error(
                            "source %s: cannot connect to %s:%d (%s); retrying in %.1fs",
                            self.cfg.id,
                            self._host,
                            self._port,
                            e,
                            delay,
                        )
                        self._wait(delay, stop)
                        continue
                malformed = False
                try:
                    self._turn()
                    continue
                except _Lost as e:
                    self._close(str(e))
                    if malformed := isinstance(e, _Malformed):
                        self.stats.malformed += 1
                except Exception as e:
                    # A bug must not end the source quietly: what was not acknowledged comes again.
                    log.exception("source %s: unexpected error", self.cfg.id)
                    self._close(f"unexpected error: {e!r}")
                # After a malformed packet always with a backoff: a broker that sends it again after every
                # reconnect is not redialled in a loop.
                if not malformed and time.monotonic() - self._up_since >= STABLE_S:
                    backoff = None  # a connection that lasted: reconnect at once
                else:
                    backoff = backoff or delays(1.0, 30.0)
                    self._wait(next(backoff), stop)
        finally:
            self._shutdown()

    def _shutdown(self, timeout: float = 30.0) -> None:
        """Flush what is buffered, acknowledge what Kafka confirms, make sure the broker read the PUBACKs,
        then disconnect."""
        self._flush_all()
        deadline = time.monotonic() + timeout
        try:
            while self._held > 0 and time.monotonic() < deadline:
                self.producer.poll(0.05)
                self._send_acks()
            if self._sock is not None:
                self._send_acks()
                self._barrier(time.monotonic() + SHUTDOWN_BARRIER_S)
                self._send(wire.DISCONNECT_PACKET)
                self._sock.shutdown(socket.SHUT_WR)
                # Read until the broker closes its side too: closing with unread data would reset the
                # connection, and the broker could miss the DISCONNECT.
                end = time.monotonic() + 1.0
                with contextlib.suppress(_Lost):
                    while (left := end - time.monotonic()) > 0 and self._poller.poll(int(left * 1000) + 1):
                        self._recv()
        except (_Lost, OSError, wire.ProtocolError) as e:
            log.warning("source %s: connection lost while stopping (%s)", self.cfg.id, e)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._connected.clear()
        if self._spooled:
            self.producer.flush(10)  # the backlog gets a moment; what Kafka has not taken stays spooled
        if self._held > 0:
            log.warning(
                "source %s: stopped with %d messages not yet in Kafka: the broker sends them again",
                self.cfg.id,
                self._held,
            )
        log.info("source %s: stopped; %s", self.cfg.id, self.stats)

    def _barrier(self, deadline: float) -> None:
        """PINGREQ, then read until every PINGREQ is answered. The broker handles a connection's packets in
        order, so the PUBACKs written before are then processed: a client resuming the session at once (this
        connector restarted) cannot make the broker drop them unread. Messages that arrive meanwhile are
        left unacknowledged; the broker sends them again to the next connection."""
        assert self._sock is not None
        self._ping()
        data, self._early = self._early, b""
        while self._pings > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("source %s: no PINGRESP from the broker before disconnecting", self.cfg.id)
                return
            if data or self._poller.poll(int(left * 1000) + 1):
                _pubs, ctrl, _over = self._reader.feed(data or self._recv())
                data = b""
                for kind, _flags, _body in ctrl:
                    if kind == wire.PINGRESP:
                        self._pings -= 1
                    elif kind == wire.DISCONNECT:
                        raise _Lost("the broker disconnected")
