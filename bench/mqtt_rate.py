"""``mqtt-rate``: messages per second the MQTT connector alone moves from Mosquitto into Kafka, QoS 1.

Workload: ``--mqtt-messages`` single-value QoS 1 messages on ``<tag>/site1/devNNNNN/pNNN`` (``--mqtt-devices``
devices of ``--mqtt-points`` points, published device scan by device scan), each payload ``{"value": v, "ts":
ms}`` or, with ``--mqtt-payload number``, a bare number: one reading per message, as most devices publish.

The connector runs as ``plantstream connect`` in a child process, so its CPU time (librdkafka's threads
included) and peak RSS are its own, read from /proc. The publisher is a bare socket writing packets built
before the clock starts, so it costs the shared cores little: a Python MQTT client fast enough to outrun
the connector would take a core of its own and measure itself as much as the connector.

* ``--mqtt-mode live`` (default, 300,000 messages): the connector is connected and subscribed; the clock
  starts with the first publish and stops when Kafka holds every reading. Flow control is what it is in
  production: the broker sends at most the session's window of unacknowledged messages, and the connector
  acknowledges only after Kafka confirmed them. The publisher stays at most ``AHEAD`` (50,000) messages
  ahead of what reached Kafka, so what Mosquitto queues for the session never nears its
  ``max_queued_messages``, past which it would drop messages (still acknowledging them to the publisher).
* ``--mqtt-mode backlog`` (90,000 messages, at most 100,000): the connector starts once (its persistent
  session and subscription exist) and stops; the messages are published while it is offline and Mosquitto
  queues them (up to its ``max_queued_messages``, 100,000 in ``pipeline/services.py``); then the connector
  starts again and the clock runs from the first reading that reaches Kafka (start-up is not part of it)
  until the last. A site coming back after an outage. The drain takes well under a second here, so the
  figure is coarse (the consumer that counts polls every 50 ms).

Readings are counted by a consumer of ``telemetry.raw`` and ``telemetry.dlq``. Afterwards the connector
stops (SIGTERM: it flushes and waits for its acknowledgements) and a client resuming the same session
checks that Mosquitto redelivers nothing: every message was acknowledged (PUBACK), and the connector sends a
PUBACK only from the Kafka delivery report of what the message became. A run with anything left fails.

Mosquitto and Kafka share the machine's cores with the connector, so on a small machine the figure is a
lower bound of the connector's capacity, and in live mode often the broker's pace rather than the
connector's (compare the connector's CPU seconds per million messages).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from bench.proc import cpu_seconds, peak_rss_mb
from pipeline.core import codec
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data

T0 = 1_767_225_600_000
STALL_S = 20.0  # no new reading in Kafka for this long: the run failed
LIVE_MESSAGES = 300_000
# Mosquitto keeps at most max_queued_messages (100,000 in pipeline/services.py) for an offline session and
# drops the rest, still acknowledging them to the publisher: a backlog run stays below it.
BACKLOG_MESSAGES = 90_000
MAX_BACKLOG = 100_000
# Live: the publisher stays at most this many messages ahead of what reached Kafka, so the messages
# Mosquitto queues for the connector's session never approach max_queued_messages either.
AHEAD = 50_000


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--mqtt-messages",
        type=int,
        default=None,
        help=f"messages per mqtt-rate run (default {LIVE_MESSAGES:,} live, {BACKLOG_MESSAGES:,} backlog)",
    )
    ap.add_argument("--mqtt-devices", type=int, default=300, help="devices publishing in mqtt-rate")
    ap.add_argument("--mqtt-points", type=int, default=20, help="points (topics) per device in mqtt-rate")
    ap.add_argument("--mqtt-payload", choices=("json", "number"), default="json", help="mqtt-rate payload")
    ap.add_argument(
        "--mqtt-mode",
        choices=("live", "backlog"),
        default="live",
        help="mqtt-rate: publish to the running connector, or queue for it while it is offline",
    )


def _count(args: argparse.Namespace) -> int:
    if args.mqtt_messages is not None:
        return int(args.mqtt_messages)
    return LIVE_MESSAGES if args.mqtt_mode == "live" else BACKLOG_MESSAGES


def _broker(env: dict[str, str]) -> tuple[str, int]:
    host, _, port = env["PLANTSTREAM_MQTT_URL"].removeprefix("mqtt://").rstrip("/").partition(":")
    return host, int(port or 1883)


def _messages(args: argparse.Namespace, root: str) -> list[tuple[str, bytes]]:
    """Device scans in event-time order, one message per point."""
    out: list[tuple[str, bytes]] = []
    devices, points = max(1, args.mqtt_devices), max(1, args.mqtt_points)
    k = 0
    n = _count(args)
    while len(out) < n:
        ts = T0 + k * 1000
        for d in range(devices):
            for p in range(points):
                if len(out) == n:
                    break
                v = round((d * 31 + p * 7 + k) % 1000 / 10.0, 1)
                body = codec.dumps({"value": v, "ts": ts + d}) if args.mqtt_payload == "json" else b"%g" % v
                out.append((f"{root}/site1/dev{d:05d}/p{p:03d}", body))
        k += 1
    return out


class _Publisher:
    """A bare MQTT 3.1.1 publisher over a socket: packets are built before the clock starts and sent in large
    writes, so publishing costs the machine little next to the connector it feeds. QoS 1: Mosquitto has a
    message once it returned the PUBACK, which a reader thread counts."""

    WINDOW = 30_000  # unacknowledged at most, well under the 65,535 packet identifiers

    def __init__(self, env: dict[str, str], client_id: str) -> None:
        host, port = _broker(env)
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid  # clean session, 60 s
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._read(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"Mosquitto refused the bench publisher: {connack!r}")
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._count_acks, daemon=True)
        self._reader.start()

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("Mosquitto closed the bench publisher's connection")
            buf += chunk
        return buf

    def _count_acks(self) -> None:
        rest = 0  # PUBACKs are 4 bytes; nothing else is expected
        with contextlib.suppress(OSError):
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                rest += len(data)
                with self._cond:
                    self.acked += rest // 4
                    rest %= 4
                    self._cond.notify_all()

    @staticmethod
    def packets(msgs: list[tuple[str, bytes]]) -> list[bytes]:
        out = []
        for i, (topic, body) in enumerate(msgs):
            t = topic.encode()
            var = struct.pack("!H", len(t)) + t + struct.pack("!H", i % 65535 + 1)
            out.append(b"\x32" + _varint(len(var) + len(body)) + var + body)
        return out

    def send(
        self, packets: list[bytes], timeout: float = 300, limit: Callable[[], int] | None = None
    ) -> None:
        """Send every packet; returns once Mosquitto acknowledged them all. ``limit()``, if given, is how many
        packets may have been sent so far: the sender waits for it to grow."""
        deadline = time.monotonic() + timeout
        for i in range(0, len(packets), 1000):
            while limit is not None and i + 1000 > limit():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the publisher was held back at {i} messages until the timeout")
                time.sleep(0.005)
            with self._cond:
                while i - self.acked > self.WINDOW:
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise RuntimeError(f"Mosquitto acknowledged only {self.acked} of {i} messages")
            self.sock.sendall(b"".join(packets[i : i + 1000]))
        with self._cond:
            while self.acked < len(packets):
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"Mosquitto acknowledged only {self.acked} of {len(packets)} messages")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()
        self._reader.join(5)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _left_queued(env: dict[str, str], client_id: str, wait: float = 2.0) -> int:
    """Resume the connector's session and count what Mosquitto redelivers: unacknowledged messages."""
    host, port = _broker(env)
    got = 0
    present: list[bool] = []

    def on_connect(_c: mqtt.Client, _ud: Any, flags: Any, _rc: Any, _props: Any) -> None:
        present.append(bool(flags.session_present))

    def on_message(_c: mqtt.Client, _ud: Any, _m: mqtt.MQTTMessage) -> None:
        nonlocal got
        got += 1

    # No PUBACK from this client (manual ack, never sent): it only looks, and the session is dropped below.
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, manual_ack=True
    )
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not present and time.monotonic() < deadline:
            time.sleep(0.05)
        if not present or not present[0]:
            raise RuntimeError(f"the connector's MQTT session {client_id!r} was not found on the broker")
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def _drop_session(env: dict[str, str], client_id: str) -> None:
    host, port = _broker(env)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    with contextlib.suppress(OSError):
        client.connect(host, port)
        client.loop_start()
        time.sleep(0.3)
        client.disconnect()
        client.loop_stop()


def _spawn(topology: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "connect", str(topology)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _wait_subscribed(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "subscribed to" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the MQTT connector did not subscribe; see {log}")
        time.sleep(0.1)


def _cleanup(topo: Topology) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": topo.broker.bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(topo.prefix)]
    for fut in admin.delete_topics(names).values() if names else []:
        with contextlib.suppress(Exception):
            fut.result(30)


class _Counter:
    """Readings and dead letters that reached Kafka, read from the beginning of both topics."""

    def __init__(self, topo: Topology) -> None:
        self.c = Consumer(
            {
                "bootstrap.servers": topo.broker.bootstrap,
                "group.id": f"bench-count-{topo.prefix}",
                "enable.auto.commit": False,
            }
        )
        meta = self.c.list_topics(timeout=10).topics
        self.raw_topic = topo.raw_topic
        self.c.assign(
            [
                TopicPartition(t, p, OFFSET_BEGINNING)
                for t in (topo.raw_topic, topo.dlq_topic)
                for p in meta[t].partitions
            ]
        )
        self.readings = 0
        self.dead = 0

    def poll(self, timeout: float) -> None:
        for m in self.c.consume(10_000, timeout):
            if m.error() is not None:
                continue
            if m.topic() == self.raw_topic:
                self.readings += len(codec.loads(m.value())["readings"])
            else:
                self.dead += 1

    def close(self) -> None:
        self.c.close()


def run_mqtt_rate(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    if args.mqtt_mode == "backlog" and _count(args) > MAX_BACKLOG:
        raise ValueError(
            f"a backlog of {_count(args):,} messages exceeds Mosquitto's max_queued_messages "
            f"({MAX_BACKLOG:,})"
        )
    tag = uuid.uuid4().hex[:6]
    client_id = f"bench-rate-{tag}"
    root = f"r{tag}"
    data = {
        "name": f"benchrate{tag}",
        "prefix": f"b{tag}.",
        "broker": {"bootstrap": env["PLANTSTREAM_KAFKA"], "partitions": 4},
        "sources": [
            {
                "id": "bench-mqtt-rate",
                "type": "mqtt",
                "url": env["PLANTSTREAM_MQTT_URL"],
                "client_id": client_id,
                "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
            }
        ],
    }
    topo = validate_data(data)
    ensure_topics(topo, say=lambda _m: None)
    f = logs / f"topology-rate-{tag}.yaml"
    f.write_text(yaml.safe_dump(data))
    log = logs / f"connect-rate-{tag}.log"
    msgs = _messages(args, root)
    packets = _Publisher.packets(msgs)
    n = len(msgs)
    live = args.mqtt_mode == "live"
    counter: _Counter | None = None
    proc: subprocess.Popen[bytes] | None = None
    pub: _Publisher | None = None
    failed: list[Exception] = []
    try:
        # The connector's persistent session and subscription.
        proc = _spawn(f, log)
        _wait_subscribed(proc, log)
        counter = _Counter(topo)
        pub = _Publisher(env, f"bench-pub-{tag}")
        if live:
            start: float | None = time.monotonic()
            cpu0, first = cpu_seconds(proc.pid), 0
            ahead = counter  # the publisher's pace: AHEAD messages past what Kafka holds
            live_pub = pub

            def publish() -> None:
                try:
                    live_pub.send(packets, limit=lambda: ahead.readings + ahead.dead + AHEAD)
                except Exception as e:  # reported by the loop below
                    failed.append(e)

            sender = threading.Thread(target=publish, daemon=True)
            sender.start()
        else:
            _stop(proc)
            pub.send(packets)  # queued by Mosquitto for the offline session
            proc = _spawn(f, log)
            start, cpu0, first = None, 0.0, 0
        last_change, seen = time.monotonic(), 0
        while counter.readings + counter.dead < n:
            counter.poll(0.05)
            now = time.monotonic()
            got = counter.readings + counter.dead
            if got and start is None:  # backlog: the clock starts with the first readings, not counted
                start, cpu0, first = now, cpu_seconds(proc.pid), got
            if got != seen:
                seen, last_change = got, now
            elif now - last_change > STALL_S + (30 if not got else 0):
                raise RuntimeError(
                    f"Kafka holds {counter.readings} readings and {counter.dead} dead letters of {n} "
                    f"messages and nothing moved for {STALL_S:.0f}s; see {log}"
                )
            if proc.poll() is not None:
                raise RuntimeError(f"the MQTT connector exited during the run; see {log}")
            if failed:
                raise RuntimeError(f"the publisher failed: {failed[0]}")
        done = time.monotonic()
        if live:
            sender.join(30)
        cpu = cpu_seconds(proc.pid) - cpu0
        rss = peak_rss_mb(proc.pid)
        # Every message acknowledged to Mosquitto?
        _stop(proc)
        left = _left_queued(env, client_id)
    finally:
        if pub is not None:
            pub.close()
        if proc is not None:
            _stop(proc)
        if counter is not None:
            counter.close()
        _drop_session(env, client_id)
        _cleanup(topo)
    if left:
        raise RuntimeError(f"Mosquitto redelivered {left} messages after the connector stopped: not acked")
    assert start is not None
    secs, timed = done - start, n - first
    return {
        "scenario": "mqtt-rate",
        "mode": args.mqtt_mode,
        "payload": args.mqtt_payload,
        "readings": counter.readings,
        "messages": n,
        "dead_letters": counter.dead,
        "seconds": secs,
        "readings_per_s": timed * counter.readings / n / secs,
        "messages_per_s": timed / secs,
        "connector_cpu_s_per_million_messages": cpu / timed * 1e6,
        "connector_peak_rss_mb": rss,
        "left_queued_after_stop": left,
        "worker_cpu_s_per_million": float("nan"),
    }
