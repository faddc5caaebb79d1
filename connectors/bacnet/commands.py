"""The BACnet write path: WriteCommands on ``commands.bacnet``, CommandResults on ``commands.results``.

A command names a point by its series id (``site/device/point``) and asks for a value at a priority, or
``null`` to relinquish that priority. :class:`WritePolicy` decides from the topology alone whether it may
run: the point must be marked ``writable``, the value inside its ``min``/``max`` and the priority no more
important than the source's ``priority_floor``. :class:`CommandExecutor` runs inside the BACnet source that
owns the point (it holds the BACnet socket) and answers every command with exactly one CommandResult.

At most once: before a command reaches a device, its Kafka offset is committed (the claim). A redelivered
message therefore is never executed again, and a command id seen before (from the results topic, read at
start) is skipped. Should the executor die between the claim and the result, it finds the claimed command
without a result when it starts again and reports it ``failed`` as interrupted, without running it twice.

The sinks write each result as a row of their ``write_commands`` table (pipeline/stages/sinks.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.bacnet.config import BacnetSource
from pipeline.core import codec
from pipeline.core.commands import (
    MAX_AGE_MS,
    MAX_AHEAD_MS,
    CommandResult,
    InvalidCommand,
    WriteCommand,
    parse_command,
    result_for,
)
from pipeline.core.kafka import Outbox
from pipeline.core.records import now_ms
from pipeline.core.topology import TopologyBase

log = logging.getLogger("plantstream.commands")


class WithSources(Protocol):
    """A loaded topology, as far as the write path needs it."""

    @property
    def sources(self) -> Sequence[Any]: ...


def has_commands(topo: WithSources) -> bool:
    """Whether the topology has BACnet sources, and so the command topics and the write_commands table."""
    return any(isinstance(s, BacnetSource) for s in topo.sources)


# -- policy ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    source_id: str
    series: str
    object: str
    writable: bool
    min: float | None
    max: float | None
    priority_floor: int


class WritePolicy:
    """What the topology allows; the same answer in every process that loads the same topology."""

    def __init__(self, topo: WithSources) -> None:
        self.targets: dict[str, Target] = {}
        self.bacnet_sources: list[str] = []
        for s in topo.sources:
            if not isinstance(s, BacnetSource):
                continue
            self.bacnet_sources.append(s.id)
            for series, (_dev, p) in s.configured_points().items():
                self.targets[series] = Target(
                    s.id, series, p.object, p.writable, p.min, p.max, s.priority_floor
                )

    def owner(self, point: str) -> str | None:
        """The source that answers commands for ``point``: its own, or the first BACnet source."""
        t = self.targets.get(point)
        if t is not None:
            return t.source_id
        return self.bacnet_sources[0] if self.bacnet_sources else None

    def check(self, cmd: WriteCommand, now: int, max_age_ms: int = MAX_AGE_MS) -> str | None:
        """None when the command may run, else why not."""
        t = self.targets.get(cmd["point"])
        if t is None or not t.writable:
            return f"point {cmd['point']} is not writable: the topology does not mark it writable"
        if cmd["priority"] < t.priority_floor:
            return (
                f"priority {cmd['priority']} is above the priority floor {t.priority_floor}: priorities 1-7 "
                "are for life safety and manual operators; use a number from "
                f"{t.priority_floor} to 16"
            )
        v = cmd["value"]
        if v is not None:
            if t.min is not None and v < t.min:
                return f"value {v:g} is below the point's min {t.min:g}"
            if t.max is not None and v > t.max:
                return f"value {v:g} is above the point's max {t.max:g}"
            kind = t.object.split(",", 1)[0]
            if kind.startswith("binary-") and v not in (0.0, 1.0):
                return f"value {v:g} is not 0 or 1, as a binary point needs"
            if kind.startswith("multi-state-") and (v != int(v) or v < 1):
                return f"value {v:g} is not a state number (1, 2, ...), as a multi-state point needs"
        age = now - cmd["ts"]
        if -age > MAX_AHEAD_MS:
            return (
                f"stamped in the future: {-age / 1000:.0f}s ahead of this host's clock (at most "
                f"{MAX_AHEAD_MS / 1000:.0f}s allowed); a command must be meant for now, else it never expires"
            )
        if age > max_age_ms:
            return (
                f"expired: requested {age / 1000:.0f}s ago; commands older than {max_age_ms / 1000:.0f}s "
                "do not run"
            )
        return None


# -- executor ----------------------------------------------------------------------------------------------
Execute = Callable[[str, float | None, int], Awaitable[None]]


@dataclass
class ExecutorStats:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    duplicates: int = 0
    ignored: int = 0
    interrupted: int = 0
    invalid: int = 0


class CommandExecutor:
    """Consumes ``commands.bacnet`` for one BACnet source and runs its commands, each at most once."""

    def __init__(
        self, topo: TopologyBase, policy: WritePolicy, source_id: str, *, max_age_ms: int = MAX_AGE_MS
    ) -> None:
        self.topo = topo
        self.source_id = source_id
        self.max_age_ms = max_age_ms
        self.policy = policy
        self.group = f"{topo.prefix}plantstream-{topo.name}-commands-{source_id}"
        self.stats = ExecutorStats()
        self.executed: set[str] = set()
        self.ready = threading.Event()
        self._producer: Outbox | None = None
        self._consumer: Consumer | None = None
        # One thread for every blocking Kafka call: librdkafka aborts the process when a consumer is
        # closed while another thread is still inside consume(), which a cancelled await would allow.
        self._kafka_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"commands-{source_id}"
        )

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kafka_thread, functools.partial(fn, *args, **kwargs))

    # Blocking Kafka calls run on their own thread so the source's event loop (polls, COV) keeps going.
    async def run(self, stop: threading.Event, execute: Execute) -> None:
        bootstrap = self.topo.broker.bootstrap
        self._producer = Outbox(
            bootstrap,
            f"plantstream-commands-{self.source_id}",
            {"linger.ms": 2, "partitioner": "consistent_random"},  # results keyed by point, as before
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            while not stop.is_set():
                try:
                    await self._blocking(self._prepare)
                    break
                except KafkaException as e:
                    log.warning(
                        "source %s: command topics not ready (%s); run `plantstream deploy`; retrying",
                        self.source_id,
                        e,
                    )
                    await asyncio.sleep(5)
            self.ready.set()
            while not stop.is_set():
                msgs = await self._blocking(self._consumer.consume, 50, 0.2)
                for msg in msgs:
                    if msg.error() is None:
                        await self._handle(msg, execute)
                    elif msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("source %s: command consumer: %s", self.source_id, msg.error())
                self._producer.poll(0)
        finally:
            await self._blocking(self._producer.flush_quietly, 10)
            await self._blocking(self._consumer.close)
            self._kafka_thread.shutdown(wait=True)

    def _prepare(self) -> None:
        """Learn the ids already answered, report claims left without a result, then start consuming."""
        assert self._consumer is not None
        self.executed |= {
            r["id"]
            for r in _read_all(self.topo.broker.bootstrap, self.topo.results_topic)
            if isinstance(r, dict) and isinstance(r.get("id"), str)
        }
        topic = self.topo.commands_topic
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{topic} does not exist"))
        parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = self._consumer.committed(parts, timeout=10)
        for tp in committed:
            if tp.offset > 0:
                self._recover(tp)
        self._consumer.assign(
            [
                TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                for tp in committed
            ]
        )

    def _recover(self, tp: TopicPartition) -> None:
        """The last claimed command of a partition: was it answered? If not, it was interrupted."""
        raw = _read_one(self.topo.broker.bootstrap, tp.topic, tp.partition, tp.offset - 1)
        if raw is None:
            return
        try:
            cmd = parse_command(codec.loads(raw))
        except (InvalidCommand, codec.JSONDecodeError):
            return
        if cmd["id"] in self.executed or self.policy.owner(cmd["point"]) != self.source_id:
            return
        self.stats.interrupted += 1
        log.error(
            "source %s: command %s on %s was claimed but never answered (the executor stopped); "
            "reporting it failed, it is not run again",
            self.source_id,
            cmd["id"],
            cmd["point"],
        )
        self._publish(
            result_for(
                cmd,
                "failed",
                "interrupted: the executor stopped after claiming the command; "
                "whether the device received it is unknown",
                self.source_id,
            )
        )
        self.executed.add(cmd["id"])
        assert self._producer is not None
        self._producer.flush_quietly(10)

    async def _handle(self, msg: Any, execute: Execute) -> None:
        self.stats.received += 1
        try:
            cmd = parse_command(codec.loads(msg.value()))
        except (InvalidCommand, codec.JSONDecodeError) as e:
            await self._invalid(msg, e)
            return
        owner = self.policy.owner(cmd["point"])
        if owner != self.source_id:
            self.stats.ignored += 1
            await self._commit(msg)
            return
        if cmd["id"] in self.executed:
            self.stats.duplicates += 1
            log.info("source %s: command %s was handled before; not run again", self.source_id, cmd["id"])
            await self._commit(msg)
            return
        reason = self.policy.check(cmd, now_ms(), self.max_age_ms)
        if reason is not None:
            self.stats.rejected += 1
            log.warning(
                "source %s: command %s from %s rejected: %s",
                self.source_id,
                cmd["id"],
                cmd["requested_by"],
                reason,
            )
            await self._answer(result_for(cmd, "rejected", reason, self.source_id))
            await self._commit(msg)
            return
        await self._commit(msg)  # the claim: from here on this message is never delivered to us again
        self.executed.add(cmd["id"])
        what = "relinquish" if cmd["value"] is None else f"write {cmd['value']:g}"
        try:
            await execute(cmd["point"], cmd["value"], cmd["priority"])
        except Exception as e:
            self.stats.failed += 1
            log.warning(
                "source %s: %s at priority %d on %s failed: %s",
                self.source_id,
                what,
                cmd["priority"],
                cmd["point"],
                e,
            )
            await self._answer(result_for(cmd, "failed", str(e) or type(e).__name__, self.source_id))
            return
        self.stats.accepted += 1
        log.info(
            "source %s: %s at priority %d on %s for %s: accepted",
            self.source_id,
            what,
            cmd["priority"],
            cmd["point"],
            cmd["requested_by"],
        )
        await self._answer(result_for(cmd, "accepted", None, self.source_id))

    async def _invalid(self, msg: Any, e: Exception) -> None:
        reason = e.reason if isinstance(e, InvalidCommand) else f"invalid: not JSON ({e})"
        raw = e.raw if isinstance(e, InvalidCommand) else {}
        point = raw.get("point")
        owner = self.policy.owner(point) if isinstance(point, str) else self.policy.owner("")
        if owner == self.source_id:
            self.stats.invalid += 1
            cid = e.command_id if isinstance(e, InvalidCommand) else None
            if cid is not None and cid not in self.executed:
                await self._answer(result_for(raw, "rejected", reason, self.source_id))
            else:  # without an id there is nobody to answer: keep it where rejected input goes
                assert self._producer is not None
                self._producer.dead_letter(
                    self.topo.dlq_topic,
                    f"commands:{self.source_id}",
                    reason,
                    msg.value(),
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                )
        await self._commit(msg)

    def _publish(self, result: CommandResult) -> None:
        assert self._producer is not None
        self._producer.produce(
            self.topo.results_topic, result["point"].encode(), codec.dumps(result), result["completed_at"]
        )

    async def _answer(self, result: CommandResult) -> None:
        self.executed.add(result["id"])
        self._publish(result)
        assert self._producer is not None
        await self._blocking(self._producer.flush_quietly, 10)

    async def _commit(self, msg: Any) -> None:
        assert self._consumer is not None
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
        await self._blocking(self._consumer.commit, offsets=[tp], asynchronous=False)


def _read_all(bootstrap: str, topic: str, timeout: float = 15.0) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end (small topics: results)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plantstream-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{topic} does not exist"))
        ends = {}
        for p in meta.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return []
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out: list[Any] = []
        pending = dict(ends)
        end_at = time.monotonic() + timeout
        while pending and time.monotonic() < end_at:
            for m in c.consume(500, 0.5):
                if m.error() is not None:
                    continue
                with contextlib.suppress(codec.JSONDecodeError):
                    out.append(codec.loads(m.value()))
                if m.offset() + 1 >= pending.get(m.partition(), 0):
                    pending.pop(m.partition(), None)
        return out
    finally:
        c.close()


def _read_one(bootstrap: str, topic: str, partition: int, offset: int) -> bytes | None:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plantstream-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        c.assign([TopicPartition(topic, partition, offset)])
        for _ in range(20):
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                return m.value() if m.offset() == offset else None
        return None
    finally:
        c.close()
