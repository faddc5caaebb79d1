"""What every source connector produces with: ReadingBatches keyed ``site/device``, and dead letters.

Built on the project's one producer (:class:`pipeline.core.kafka.Outbox`). A connector acknowledges its
source (an MQTT PUBACK, say) only from the delivery callback.

Without a spool the callback comes from Kafka's delivery report, after the broker has the batch. With a
spool (:meth:`TelemetryProducer.use_spool`, store and forward) batches are written to the on-disk
:class:`connectors.common.spool.Spool` and a sender thread feeds Kafka from it; the callback then comes once
the batch is in the spool (``ack_durable``: once it is fsynced). Either way callbacks run on the source's
own thread, inside :meth:`TelemetryProducer.poll`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message

from connectors.common.spool import Record, Spool, SpoolConfig, SpoolFull, WhenFull, spool_dir
from pipeline.core import codec
from pipeline.core.kafka import Outbox
from pipeline.core.records import ReadingBatch, columns, now_ms

log = logging.getLogger("plantstream.producer")

Delivered = Callable[[KafkaError | None], None]

# librdkafka's default partitioner (consistent_random): devices stay on the partitions they have always
# used, so the aggregation state that follows them is not split.
_CONNECTOR_CONF = {
    "partitioner": "consistent_random",
    "queue.buffering.max.messages": 200_000,
    "message.max.bytes": 4_000_000,
}


# The sender's librdkafka settings: a record the broker has not taken within this long is reported as
# failed and sent again from the spool (instead of librdkafka's 5 minutes, after which it would be lost).
_SPOOL_CONF = {"message.timeout.ms": 30_000}
MAX_IN_FLIGHT = 2000  # records handed to librdkafka and not yet reported
MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
RETRY_PAUSE_S = (0.5, 10.0)  # after a failed delivery: first and longest pause before sending again
EXPIRE_EVERY_S = 1.0


class TelemetryProducer:
    def __init__(
        self,
        bootstrap: str,
        raw_topic: str,
        dlq_topic: str,
        *,
        client_id: str = "plantstream",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._extra = {**_CONNECTOR_CONF, **(extra or {})}
        self._out = Outbox(bootstrap, client_id, self._extra)
        self.raw_topic = raw_topic
        self.dlq_topic = dlq_topic
        self.sent_batches = 0
        self.sent_readings = 0
        self.dead_letters = 0
        self.errors = 0
        self.spool: Spool | None = None
        self._sender: _Sender | None = None

    # -- store and forward ---------------------------------------------------------------------------
    def use_spool(
        self, cfg: SpoolConfig, directory: Path, default_when_full: WhenFull, *, ack_durable: bool, name: str
    ) -> Spool:
        """Send every batch through an on-disk spool at ``directory`` from now on. ``ack_durable``: a batch's
        callback waits until it is fsynced (for sources that acknowledge upstream, like MQTT)."""
        if self.spool is not None:
            return self.spool
        when_full = cfg.when_full or default_when_full
        self.spool = Spool(
            directory,
            max_bytes=cfg.max_bytes,
            max_age_ms=cfg.max_age,
            when_full=when_full,
            name=name,
        )
        # The records are in the spool until the broker has them: librdkafka need not hold them long.
        self._out = Outbox(self._bootstrap, self._client_id, {**self._extra, **_SPOOL_CONF})
        self._sender = _Sender(self, self.spool, cfg.sync_interval / 1000, ack_durable)
        self._sender.start()
        log.info(
            "%s: store and forward in %s (max %d bytes, max age %d s, when full: %s)",
            name,
            directory,
            cfg.max_bytes,
            cfg.max_age // 1000,
            when_full,
        )
        return self.spool

    @property
    def room(self) -> bool:
        """False while a ``block`` spool is full: the source should stop reading until it is True again."""
        return self._sender is None or self._sender.room()

    async def wait_room(self, stop: threading.Event | None = None) -> None:
        """Until :attr:`room`: asyncio sources await this before taking more input; the loop keeps running."""
        while not self.room and not (stop is not None and stop.is_set()):
            await asyncio.sleep(0.05)

    def counters(self) -> dict[str, float | int]:
        """``spool_bytes``, ``spool_records``, ``spool_oldest_age_s`` (may overstate by one segment's time
        span), ``spool_dropped``, ``spool_resent`` (empty without a spool)."""
        if self._sender is None or self.spool is None:
            return {}
        return {**self.spool.counters(), "spool_resent": self._sender.resent}

    def update_stats(self, stats: Any) -> None:
        """Copy :meth:`counters` onto a source's stats object (whose fields have these names)."""
        for k, v in self.counters().items():
            setattr(stats, k, v)

    # -- producing -----------------------------------------------------------------------------------
    def send_batch(self, batch: ReadingBatch, on_delivery: Delivered) -> None:
        key = f"{batch['site']}/{batch['device']}"
        # The record timestamp is the event time: the batch's newest reading, but never ahead of the wall
        # clock (the broker refuses records stamped far in the future; the worker judges such readings).
        ts = max((r["ts"] for r in batch["readings"]), default=None)
        if ts is not None:
            ts = min(ts, now_ms())
        n = len(batch["readings"])
        # Version 2 on the wire (columns): a quarter of the worker's decoding time of version 1.
        value = codec.dumps(columns(batch))
        if self._sender is not None:
            self._sender.submit(key.encode(), value, ts, n, on_delivery)
            return

        def cb(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.sent_batches += 1
                self.sent_readings += n
            else:
                self.errors += 1
            on_delivery(err)

        self._out.produce(self.raw_topic, key.encode(), value, ts, on_delivery=cb)

    def send_dead_letter(
        self, source: str, reason: str, payload: bytes | str, topic: str | None, on_delivery: Delivered
    ) -> None:
        # Dead letters are rare: they go straight to Kafka, spool or not, and a failure reaches on_delivery.
        sender = self._sender

        def cb(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.dead_letters += 1
            else:
                self.errors += 1
                log.error("dead letter of %s not delivered (%s): %s", source, err, reason[:200])
            if sender is None:
                on_delivery(err)
            else:
                sender.callback(on_delivery, err)  # run on the source's thread, in poll()

        self._out.dead_letter(self.dlq_topic, source, reason, payload, topic=topic, on_delivery=cb)

    def poll(self, timeout: float = 0.0) -> int:
        if self._sender is None:
            return self._out.poll(timeout)
        return self._sender.serve(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Without a spool: until Kafka has everything (returns what is left). With one: hand what is held
        to the spool, make it durable, give Kafka up to ``timeout`` for the backlog, then stop the sender;
        what is left stays in the spool for the next start."""
        if self._sender is None:
            return self._out.flush_quietly(timeout)
        left = self._sender.stop(timeout)
        self._sender = None
        return left


class _Sender:
    """The spool's thread: fsyncs (group commit), expires, and feeds Kafka from the cursor on, with a bounded
    number of records in flight. A failed delivery rewinds to the cursor and sends again what Kafka has not
    confirmed (a record can reach Kafka twice, never zero times). Never runs on the source's event loop."""

    def __init__(self, producer: TelemetryProducer, spool: Spool, sync_s: float, ack_durable: bool) -> None:
        self.p = producer
        self.spool = spool
        self.sync_s = sync_s
        self.ack_durable = ack_durable
        self.resent = 0
        self._high = spool.next_seq  # records below it may have been sent before (by an earlier process)
        # Source thread only:
        self._held: collections.deque[tuple[bytes, bytes, int | None, int, Delivered]] = collections.deque()
        self._waiters: collections.deque[tuple[int, Delivered]] = collections.deque()
        # Either thread: callbacks to run on the source's thread (deque appends and pops are atomic).
        self._callbacks: collections.deque[tuple[Delivered, KafkaError | None]] = collections.deque()
        # Either thread: delivery reports of spooled records, handled on the sender thread only. librdkafka
        # runs a report on whichever thread polls, and the source's thread polls too (a dead letter's
        # produce serves reports every 10,000 records or when librdkafka's queue is full).
        self._reports: collections.deque[tuple[Record, KafkaError | None, int]] = collections.deque()
        self._wake = threading.Event()  # set when a callback is ready or durability advanced
        self._durable = spool.next_seq  # every record below it is fsynced
        self._want_sync = False
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._rewind = False
        self._pause_until = 0.0
        self._failures = 0
        self._gen = 0
        self._rebuild = False
        self._thread = threading.Thread(target=self._run, name=f"spool-{spool.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the source's side ---------------------------------------------------------------------------
    def room(self) -> bool:
        return not self._held and self.spool.fits(256 * 1024)

    def submit(self, key: bytes, value: bytes, ts: int | None, n: int, cb: Delivered) -> None:
        if self._held or not self._append(key, value, ts, n, cb):
            # block: held in memory until the sender makes room; the source stops reading (see room).
            self._held.append((key, value, ts, n, cb))

    def _append(
        self, key: bytes, value: bytes, ts: int | None, n: int, cb: Delivered, past_full: bool = False
    ) -> bool:
        try:
            seq = self.spool.append(key, value, ts, n, past_full=past_full)
        except SpoolFull:
            return False
        if self.ack_durable:
            self._waiters.append((seq, cb))
            self._want_sync = True
        else:
            self._callbacks.append((cb, None))
        return True

    def callback(self, cb: Delivered, err: KafkaError | None) -> None:
        self._callbacks.append((cb, err))
        self._wake.set()

    def serve(self, timeout: float) -> int:
        """Run what is due on the source's thread: held batches into the spool, callbacks of what is in it."""
        n = self._serve()
        if n == 0 and timeout > 0:
            self._wake.wait(timeout)
            n = self._serve()
        return n

    def _serve(self) -> int:
        self._wake.clear()
        while self._held:
            key, value, ts, n, cb = self._held[0]
            if not self._append(key, value, ts, n, cb):
                break
            self._held.popleft()
        done = 0
        durable = self._durable
        while self._waiters and self._waiters[0][0] < durable:
            self._waiters.popleft()[1](None)
            done += 1
        while self._callbacks:
            cb, err = self._callbacks.popleft()
            cb(err)
            done += 1
        return done

    def stop(self, timeout: float) -> int:
        self._serve()
        if self._held:
            # The source took these before the spool filled up (block): a stop must not lose them, so they
            # go past max_bytes, by at most what is held (the source stops reading while anything is).
            over = sum(len(h[1]) for h in self._held)
            log.warning(
                "spool %s: stopping with %d batch(es) of %d bytes held while the spool was full; spooled "
                "past max_bytes",
                self.spool.name,
                len(self._held),
                over,
            )
            while self._held:
                key, value, ts, n, cb = self._held.popleft()
                self._append(key, value, ts, n, cb, past_full=True)
        self._want_sync = True
        self._drain_until = time.monotonic() + timeout
        self._stop.set()
        with self.spool.changed:
            self.spool.changed.notify_all()
        self._thread.join(timeout + 10)
        self.p._out.flush_quietly(5)  # dead letters, and reports of records still in flight
        if not self._thread.is_alive():
            self._take_reports()  # the sender is gone: its reports move the cursor from this thread
        left = self.spool.pending
        self.spool.close()
        self._durable = self.spool.next_seq  # close fsyncs every record
        self._serve()
        if left:
            log.info("spool %s: %d record(s) stay spooled for the next start", self.spool.name, left)
        return left

    # -- the sender thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("spool %s: the sender failed; records stay spooled", self.spool.name)

    def _loop(self) -> None:
        spool = self.spool
        pos = spool.cursor
        next_sync = time.monotonic() + self.sync_s
        next_expire = 0.0
        while True:
            now = time.monotonic()
            stopping = self._stop.is_set()
            if stopping and (now >= self._drain_until or spool.pending == 0):
                break
            if self._want_sync or now >= next_sync:
                # Group commit: whatever was appended during the previous fsync rides on this one.
                self._want_sync = False
                self._durable = spool.sync()
                next_sync = now + self.sync_s
                self._wake.set()
            if now >= next_expire:
                spool.expire()
                next_expire = now + EXPIRE_EVERY_S
            if self._rebuild and (self._in_flight == 0 or now >= self._pause_until):
                self._rebuild_outbox()
            if self._rewind and self._in_flight == 0:
                self._rewind = False
                pos = spool.cursor
            sent = 0
            if not self._rewind and not self._rebuild and now >= self._pause_until:
                sent, pos = self._send(pos)
            self.p._out.poll(0.005 if self._in_flight else 0)
            self._take_reports()
            if not sent and not self._in_flight and not self._want_sync:
                with spool.changed:
                    if spool.next_seq <= pos and not self._stop.is_set():
                        spool.changed.wait(min(self.sync_s, 0.05))
            elif not sent and self._in_flight:
                time.sleep(0.001)

    def _send(self, pos: int) -> tuple[int, int]:
        room = MAX_IN_FLIGHT - self._in_flight
        if room <= 0 or self._in_flight_bytes >= MAX_IN_FLIGHT_BYTES:
            return 0, pos
        sent = 0
        for rec in self.spool.read(pos, room, MAX_IN_FLIGHT_BYTES - self._in_flight_bytes):
            pos = rec.seq + 1
            if self.spool.is_confirmed(rec.seq):
                continue
            if self.spool.too_old(rec):
                self.spool.drop_record(rec, "spooled longer than max_age")
                continue
            if rec.seq < self._high:
                self.resent += 1
            else:
                self._high = rec.seq + 1
            self._produce(rec)
            sent += 1
        return sent, pos

    def _produce(self, rec: Record) -> None:
        gen = self._gen

        def cb(err: KafkaError | None, _msg: Message) -> None:
            self._reports.append((rec, err, gen))  # handled by _take_reports, on the sender thread

        self._in_flight += 1
        self._in_flight_bytes += len(rec.value)
        self.p._out.produce(self.p.raw_topic, rec.key, rec.value, rec.ts_ms, on_delivery=cb)

    def _take_reports(self) -> None:
        while self._reports:
            rec, err, gen = self._reports.popleft()
            if gen == self._gen:  # reports of a producer replaced after a fatal error were written off
                self._in_flight -= 1
                self._in_flight_bytes -= len(rec.value)
            self._report(rec, err)

    def _report(self, rec: Record, err: KafkaError | None) -> None:
        p = self.p
        if err is None:
            self.spool.confirm(rec.seq)
            p.sent_batches += 1
            p.sent_readings += rec.weight
            self._failures = 0
            return
        p.errors += 1
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            # Sending it again would fail again: it goes to the dead-letter topic, and leaves the spool.
            log.error(
                "spool %s: Kafka refuses a batch of %d bytes as too large", self.spool.name, len(rec.value)
            )
            reason = (
                f"oversized for Kafka: {rec.weight} readings of {len(rec.value)} bytes ({rec.key.decode()})"
            )
            p._out.dead_letter(p.dlq_topic, self.spool.name, reason, rec.value[:1024], topic=p.raw_topic)
            self.spool.confirm(rec.seq)
            return
        self._failures += 1
        if err.fatal():
            self._rebuild = True
        if not self._rewind:
            pause = min(RETRY_PAUSE_S[1], RETRY_PAUSE_S[0] * 2 ** min(self._failures, 8))
            self._pause_until = time.monotonic() + pause
            log.warning(
                "spool %s: Kafka did not take a record (%s); %d record(s) spooled, sending again from the "
                "oldest in %.1fs",
                self.spool.name,
                err,
                self.spool.pending,
                pause,
            )
        self._rewind = True

    def _rebuild_outbox(self) -> None:
        """A fatal producer error (the idempotent producer fenced, say): a new producer, the old reports
        ignored; everything not confirmed is sent again."""
        log.warning("spool %s: new Kafka producer after a fatal error", self.spool.name)
        old = self.p._out
        self._gen += 1
        self.p._out = Outbox(self.p._bootstrap, self.p._client_id, {**self.p._extra, **_SPOOL_CONF})
        old.flush_quietly(0)
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._rebuild = False
        self._rewind = True


def attach_spool(
    producer: Any,
    setting: SpoolConfig | None,
    topology: Any,
    source_id: str,
    default_when_full: WhenFull,
    *,
    ack_durable: bool,
) -> bool:
    """Put the source's ``spool`` in front of Kafka when it is on and the runner was built by
    ``plantstream connect`` (which passes the topology, whose name places the default directory)."""
    if setting is None or topology is None or not isinstance(producer, TelemetryProducer):
        return False
    directory = spool_dir(setting, str(topology.name), source_id)
    producer.use_spool(setting, directory, default_when_full, ack_durable=ack_durable, name=source_id)
    return True
