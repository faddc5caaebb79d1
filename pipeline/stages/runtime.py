"""The stage runtime: every stateful stage of the worker is a :class:`Step` driven by a :class:`Stage`.

A stage is one thread with librdkafka's consumer and the project's producer (:class:`Outbox`). It

1. consumes its input topic in batches (up to ``batch_size`` messages or ``batch_wait`` seconds),
2. hands them to :meth:`Step.process`, which does the pure work and produces its output,
3. every ``checkpoint_interval`` makes the work durable: delivers what was produced, lets the step write its
   state (:meth:`Step.durable`: checkpoint records to a compacted topic, or nothing when ``process`` already
   committed to a database), delivers that, and only then commits the input offsets it covers,
4. at a rebalance makes the revoked partitions durable and commits them inside the revoke callback, so the
   next owner starts exactly there; newly assigned partitions load their state (:meth:`Step.assigned`).

A broker outage is waited out: produced records are retried until the broker takes them (no delivery
timeout), checkpoints wait for them, and the consumer rejoins its group when the broker is back. Any other
error that is not about the input (a record the broker refuses, database or state trouble) stops the worker
at once without committing (``fatal``): the input is then read again from the last commit, which idempotent
state and writes absorb. Bad input is the step's business: dead-lettered, counted, never raised.

Why not Faust agents: a Faust agent spent ~200 µs of Python per message before any work was done (a plain
agent handled ~5,000 messages/s here against ~300,000/s for the raw client), and faust-streaming 0.15 can
skip a run of input offsets when an agent starts on a backlog. This loop pays its per-message cost once
per batch and never acknowledges input it has not made durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.core.kafka import Connection, Outbox, connection_conf
from pipeline.stages.deadletters import Ledger, Marks, decode_mark, patiently, read_sent

log = logging.getLogger("plantstream.worker")

Fatal = Callable[[str, BaseException], None]

# A stage blocked this long (a broker or database outage) keeps its partitions: the group does not move them
# to another worker while this one waits to finish the batch in hand.
MAX_POLL_INTERVAL_S = 900.0
SESSION_TIMEOUT_MS = 10_000
# How long a stop waits for the broker to take what was produced before leaving without committing (the
# input is then read again): a stop stays within a service manager's usual 10 s grace.
STOP_DELIVERY_GRACE_S = 5.0
# A warning about the broker at most this often per kind, not one per consume call.
WARN_EVERY_S = 30.0


class StopUndelivered(RuntimeError):
    """The stage was asked to stop while the broker could not take what it produced."""


class Step:
    """What a stage does; the runtime calls these on the stage's thread. Override what you need."""

    stage: Stage  # set by the Stage that drives the step

    def assigned(self, partitions: list[int]) -> None:
        """Load the state of newly assigned partitions."""

    def process(self, msgs: list[Message]) -> None:
        """Handle a batch of input messages (no error messages among them), in offset order per partition."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Called a few times a second with the monotonic time: wall-clock work such as idle flushes."""

    def durable(self, partitions: list[int]) -> None:
        """Produce the state of ``partitions`` up to what was processed (the runtime delivers it)."""

    def revoked(self, partitions: list[int]) -> None:
        """Drop the state of partitions that were made durable and committed and are now gone."""

    def lost(self, partitions: list[int]) -> None:
        """Drop the state of partitions another member may own already (nothing may be committed)."""
        self.revoked(partitions)

    def close(self) -> None:
        """After the last checkpoint of a clean stop."""


class Stage(threading.Thread):
    def __init__(
        self,
        name: str,
        *,
        bootstrap: Connection,
        group: str,
        topic: str,
        step: Step,
        fatal: Fatal,
        checkpoint_interval: float,
        batch_size: int = 1000,
        batch_wait: float = 0.1,
        tick_interval: float = 0.25,
        consumer_conf: dict[str, Any] | None = None,
        dlq_topic: str | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.bootstrap = bootstrap
        self.group, self.topic, self.step, self.fatal = group, topic, step, fatal
        self.checkpoint_interval = checkpoint_interval
        self.batch_size, self.batch_wait, self.tick_interval = batch_size, batch_wait, tick_interval
        # Stages confirm delivery with a flush, never per record: librdkafka reports failures only. No
        # delivery timeout: through a broker outage records wait in librdkafka's queue and are retried, in
        # order (idempotent producer), until the broker is back.
        self.outbox = Outbox(bootstrap, group, {"delivery.report.only.error": True, "message.timeout.ms": 0})
        conf: dict[str, Any] = {
            **connection_conf(bootstrap),
            "group.id": group,
            "client.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Prefetched input is bounded (librdkafka's default, 64 MiB, is per partition): memory.
            "queued.max.messages.kbytes": 16 * 1024,
            # Partitions added to the input topic are noticed (and assigned) within seconds, not 5 minutes.
            "topic.metadata.refresh.interval.ms": 10_000,
            "max.poll.interval.ms": int(MAX_POLL_INTERVAL_S * 1000),
            # A worker that dies (SIGKILL, a lost host) hands its partitions on after 10 s, not librdkafka's
            # 45 s: the heartbeats come from librdkafka's own thread, so a busy stage does not miss them.
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "on_commit": self._committed,
            "error_cb": self._on_error,
        }
        conf.update(consumer_conf or {})
        self.consumer = Consumer(conf)
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.owned: set[int] = set()
        # Per owned partition: next offset to commit, last committed, wall time of the last input and of
        # the last checkpoint.
        self.position: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.last_data: dict[int, float] = {}
        self.last_checkpoint: dict[int, float] = {}
        self.last_poll = time.monotonic()
        self._warned: dict[int, float] = {}  # error code → when it was last logged
        self._stop_seen: float | None = None
        # The broker out of reach (blind) and when it was last back: input that did not come meanwhile was
        # not the devices' silence, so steps count quiet time from ``broker_back_at`` (idle closes).
        self.blind = False
        self.broker_back_at = 0.0
        self._probed = 0.0
        # Dead letters sent once across a crash: commits carry the dead-letter topic's end offsets (marks)
        # and a new owner skips what its predecessor sent after the last commit (see deadletters.py).
        self.dlq_topic = dlq_topic
        self.ledger = Ledger(topic)
        self.marks = Marks(self.consumer, dlq_topic) if dlq_topic else None
        if dlq_topic:
            self.outbox.already_sent = self.ledger.take
        step.stage = self

    # -- lifecycle -------------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            self.consumer.subscribe(
                [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
            self.ready.set()
            next_tick = time.monotonic()
            while not self.stopping.is_set():
                msgs = self.consumer.consume(self.batch_size, self.batch_wait)
                self.last_poll = time.monotonic()
                if msgs:
                    if self.blind and any(m.error() is None for m in msgs):
                        self._sighted()
                    self._process(msgs)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_interval
                    if self.blind:
                        self._probe(now)
                    self.step.tick(now)
                    due = [
                        p
                        for p in self.position
                        if now - self.last_checkpoint.get(p, 0.0) >= self.checkpoint_interval
                    ]
                    if due:
                        self.checkpoint(due)
            # Clean stop: what was handled is made durable and committed, so a restart resumes here.
            try:
                self.checkpoint(sorted(self.owned), asynchronous=False)
            except KafkaException as exc:  # the broker away at the last commit: read again on restart
                raise StopUndelivered(f"the last commit failed ({exc})") from exc
            self.step.close()
            self.consumer.close()
        except StopUndelivered as exc:
            # Nothing is committed past what the broker has: the next owner reads the input again.
            log.warning(
                "%s: stopping without committing: %s; the input is read again on restart", self.name, exc
            )
        except Exception as exc:
            self.fatal(f"stage {self.name} failed", exc)

    def deliver(self) -> None:
        """Until the broker has everything produced so far, however long an outage lasts.

        Raises :class:`DeliveryFailed` if the broker refused a record, :class:`StopUndelivered` if a stop
        was asked for and the broker has not taken everything within :data:`STOP_DELIVERY_GRACE_S`.
        """
        left = self.outbox.flush_some(1.0)  # returns as soon as the queue is empty
        if not left:
            return
        started = warned = time.monotonic()
        while left:
            now = time.monotonic()
            if self.stopping.is_set():
                self._stop_seen = self._stop_seen or now
                if now - self._stop_seen >= STOP_DELIVERY_GRACE_S:
                    raise StopUndelivered(f"{left} produced record(s) not acknowledged by the broker")
            elif now - started >= 1.0 and not self.blind:
                self.blind = True  # produced records wait: the broker is out of reach
            elif now - warned >= WARN_EVERY_S:
                warned = now
                log.warning(
                    "%s: waiting for the broker: %d record(s) not acknowledged for %.0f s",
                    self.name,
                    left,
                    now - started,
                )
            left = self.outbox.flush_some(1.0)
        if self.blind:
            self._sighted()
        if time.monotonic() - started >= WARN_EVERY_S:
            log.warning(
                "%s: the broker took the waiting records after %.0f s", self.name, time.monotonic() - started
            )

    def _process(self, msgs: list[Message]) -> None:
        good = [m for m in msgs if m.error() is None]
        if len(good) != len(msgs):
            for m in msgs:
                err = m.error()
                if err is None or err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                self._warn(err.code(), f"{self.name}: consumer error {err}")
        if not good:
            return
        now = time.monotonic()
        position, last_data = self.position, self.last_data
        # Offsets rise within a partition: its last message gives the position (one pass, from the end).
        seen: set[int] = set()
        for m in reversed(good):
            p = m.partition()
            if p not in seen:
                seen.add(p)
                position[p] = m.offset() + 1
                last_data[p] = now
        self.step.process(good)

    # -- durability ------------------------------------------------------------------------------------
    def checkpoint(self, partitions: list[int], asynchronous: bool = True) -> None:
        """Make the partitions' work durable, then commit the input offsets it covers."""
        if not partitions:
            return
        # What processing produced (aggregates, dead letters, routed samples) is delivered before state
        # that skips its input is saved, and before that input is committed.
        self.deliver()
        if time.monotonic() - self.last_poll > 0.8 * MAX_POLL_INTERVAL_S:
            # Blocked past the group's patience: the partitions may have another owner by now, so this
            # member writes no state and commits nothing; it rejoins and loads the state again.
            gone = sorted(self.owned)
            log.warning(
                "%s: blocked longer than the group waits; giving up partitions %s to reload", self.name, gone
            )
            self.step.lost(gone)
            self._forget(gone)
            return
        self.step.durable(partitions)
        self.deliver()
        now = time.monotonic()
        offsets = []
        for p in partitions:
            self.last_checkpoint[p] = now
            pos = self.position.get(p)
            if pos is not None and pos != self.committed.get(p):
                offsets.append(TopicPartition(self.topic, p, pos))
                self.committed[p] = pos
        if offsets and self.marks is not None:
            mark = self.marks.take(self.outbox.dead_letters)
            offsets = [TopicPartition(tp.topic, tp.partition, tp.offset, metadata=mark) for tp in offsets]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit that failed (the broker away, a rebalance) is made again at the next
        checkpoint instead of being taken for done."""
        failed = partitions if err is not None else [tp for tp in partitions if tp.error is not None]
        for tp in failed:
            if tp.topic == self.topic and self.committed.get(tp.partition) == tp.offset:
                del self.committed[tp.partition]
        if failed:
            self._warn(
                err.code() if err is not None else -1,
                f"{self.name}: commit of partitions {sorted(tp.partition for tp in failed)} failed ({err}); "
                "made again at the next checkpoint",
            )

    # -- the broker out of reach ---------------------------------------------------------------------
    _UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT})

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors (served inside consume(), on this thread)."""
        if err.code() in self._UNREACHABLE:
            if not self.blind:
                log.warning("%s: the broker is out of reach (%s); waiting for it", self.name, err)
            self.blind = True
        else:
            self._warn(err.code(), f"{self.name}: Kafka client error {err}")

    def _probe(self, now: float) -> None:
        """Whether the broker answers again: a watermark query, at most once a second."""
        if now - self._probed < 1.0:
            return
        self._probed = now
        p = min(self.owned, default=0)
        try:
            self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=0.5, cached=False)
        except KafkaException:
            return
        self._sighted()

    def _sighted(self) -> None:
        self.blind = False
        self.broker_back_at = time.monotonic()
        log.warning("%s: the broker is back", self.name)

    def _warn(self, code: int, message: str) -> None:
        now = time.monotonic()
        last = self._warned.get(code)
        if last is None or now - last >= WARN_EVERY_S:
            self._warned[code] = now
            log.warning("%s", message)

    def behind(self, p: int) -> bool:
        """Input is waiting in partition ``p``: quiet is then the consumer's doing, not the devices'."""
        try:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
        except KafkaException:
            return True
        if p in self.position:
            return high < 0 or self.position[p] < high
        tp = self.consumer.position([TopicPartition(self.topic, p)])[0]
        if tp.offset >= 0:
            return high < 0 or tp.offset < high
        # Nothing consumed since the assignment and nothing committed: behind unless the partition is empty.
        return high < 0 or _low < high

    # -- rebalance callbacks (called inside consume(), on this thread) ---------------------------------
    def _forget(self, partitions: list[int]) -> None:
        self.ledger.forget(partitions)
        for p in partitions:
            self.owned.discard(p)
            for d in (self.position, self.committed, self.last_data, self.last_checkpoint):
                d.pop(p, None)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            ps = sorted(tp.partition for tp in partitions)
            self._forget(ps)
            self.step.assigned(ps)
            now = time.monotonic()
            for p in ps:
                self.owned.add(p)
                self.last_checkpoint[p] = now
                self.last_data[p] = now
            # Where the input resumes: a partition the previous owner read to its end gives this member no
            # message, so without it the partition would look behind for good and hold its idle closes.
            committed = self.consumer.committed(list(partitions), timeout=30)
            for tp in committed:
                if tp.offset >= 0:
                    self.position[tp.partition] = self.committed[tp.partition] = tp.offset
            if self.marks is not None:
                self._read_sent(committed)
            log.info("%s: assigned input partitions %s", self.name, ps)
        except Exception as exc:
            self.fatal(f"stage {self.name}: loading the state of assigned partitions failed", exc)

    def _read_sent(self, committed: list[TopicPartition]) -> None:
        """Learn which dead letters the previous owners sent for input past the committed offsets (tried
        again while the broker answers with passing errors, as right after an outage)."""
        ps = [tp.partition for tp in committed]

        def attempt() -> None:
            self.ledger.forget(ps)  # a failed attempt may have learnt part of it
            self._read_sent_once(committed)

        patiently(attempt)

    def _read_sent_once(self, committed: list[TopicPartition]) -> None:
        assert self.marks is not None and self.dlq_topic is not None
        fresh = [tp.partition for tp in committed if tp.offset < 0]
        if fresh:
            # Nothing committed yet: commit where reading starts, with a mark, before reading anything, so
            # that a crash before the first checkpoint is covered like any other.
            mark = self.marks.take(self.outbox.dead_letters)
            starts = []
            for p in fresh:
                low, _high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=10, cached=False
                )
                starts.append(TopicPartition(self.topic, p, max(low, 0), metadata=mark))
            self.consumer.commit(offsets=starts, asynchronous=False)
            for tp in starts:
                self.position[tp.partition] = self.committed[tp.partition] = tp.offset
        dlq_starts: dict[int, int] = {}
        past: dict[int, int] = {}
        for tp in committed:
            ends = decode_mark(tp.metadata) if tp.offset >= 0 else None
            if ends is None:
                continue  # nothing committed (above), or a commit without a mark: nothing to learn
            past[tp.partition] = tp.offset
            for q, o in ends.items():
                dlq_starts[q] = min(o, dlq_starts.get(q, o))
        if not past:
            return
        for q in self.marks.partitions():
            dlq_starts.setdefault(q, -1)  # added to the topic after the mark: all of it
        read = read_sent(self.bootstrap, self.group, self.dlq_topic, dlq_starts, self.ledger, past)
        if self.ledger.sent:
            log.info(
                "%s: %d dead letter(s) already sent after the last commit (of %d read): not sent again",
                self.name,
                sum(self.ledger.sent.values()),
                read,
            )

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            mine = sorted(tp.partition for tp in partitions if tp.partition in self.owned)
            self.checkpoint(mine, asynchronous=False)
            self.step.revoked(mine)
            self._forget(mine)
            log.info("%s: revoked input partitions %s (made durable and committed)", self.name, mine)
        except Exception as exc:
            self.fatal(f"stage {self.name}: checkpoint at the rebalance failed", exc)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = sorted(tp.partition for tp in partitions)
        self.step.lost(lost)
        self._forget(lost)
        log.warning("%s: lost input partitions %s (their new owner reads them again)", self.name, lost)
