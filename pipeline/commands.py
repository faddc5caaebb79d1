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

The audit sink (:func:`attach_command_sink`) writes each result as a row of ``write_commands``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from connectors.bacnet.config import BacnetSource
from pipeline import codec
from pipeline.records import dead_letter, now_ms
from pipeline.topology import Topology

log = logging.getLogger("plantstream.commands")

Status = Literal["accepted", "rejected", "failed"]
MAX_AGE_MS = 300_000  # older commands are rejected as expired rather than run late


class WriteCommand(TypedDict):
    id: str
    point: str
    value: float | None
    priority: int
    requested_by: str
    ts: int


class CommandResult(TypedDict):
    id: str
    point: str
    value: float | None
    priority: int
    requested_by: str
    requested_at: int
    status: Status
    error: str | None
    completed_at: int
    source: str | None


class InvalidCommand(ValueError):
    def __init__(self, reason: str, raw: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw or {}

    @property
    def command_id(self) -> str | None:
        v = self.raw.get("id")
        return v if isinstance(v, str) and v else None


def parse_command(obj: Any) -> WriteCommand:
    """Check a decoded WriteCommand; raises :class:`InvalidCommand` naming the field."""
    if not isinstance(obj, dict):
        raise InvalidCommand(f"invalid: a command must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("id")
    if not isinstance(cid, str) or not 1 <= len(cid) <= 128:
        raise InvalidCommand("invalid: id must be a string of 1-128 characters", obj)
    point = obj.get("point")
    if not isinstance(point, str) or point.count("/") < 2 or not all(point.split("/", 2)):
        raise InvalidCommand(f"invalid: point must be a series id site/device/point, got {point!r:.80}", obj)
    value = obj.get("value")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise InvalidCommand(
            f"invalid: value must be a finite number or null (relinquish), got {value!r:.40}", obj
        )
    prio = obj.get("priority")
    if isinstance(prio, bool) or not isinstance(prio, int) or not 1 <= prio <= 16:
        raise InvalidCommand(f"invalid: priority must be an integer 1-16, got {prio!r:.20}", obj)
    by = obj.get("requested_by")
    if not isinstance(by, str) or not by:
        raise InvalidCommand("invalid: requested_by must name who asks", obj)
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidCommand("invalid: ts must be epoch milliseconds", obj)
    return {
        "id": cid,
        "point": point,
        "value": None if value is None else float(value),
        "priority": prio,
        "requested_by": by,
        "ts": ts,
    }


def make_command(point: str, value: float | None, priority: int, requested_by: str) -> WriteCommand:
    return parse_command(
        {
            "id": uuid.uuid4().hex,
            "point": point,
            "value": value,
            "priority": priority,
            "requested_by": requested_by,
            "ts": now_ms(),
        }
    )


def result_for(
    cmd: WriteCommand | dict[str, Any], status: Status, error: str | None, source: str | None
) -> CommandResult:
    value = cmd.get("value")
    prio = cmd.get("priority")
    ts = cmd.get("ts")
    return {
        "id": str(cmd.get("id")),
        "point": str(cmd.get("point")),
        "value": float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
        "priority": prio if isinstance(prio, int) and not isinstance(prio, bool) else 0,
        "requested_by": str(cmd.get("requested_by") or "unknown"),
        "requested_at": ts if isinstance(ts, int) and not isinstance(ts, bool) else now_ms(),
        "status": status,
        "error": error,
        "completed_at": now_ms(),
        "source": source,
    }


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

    def __init__(self, topo: Topology) -> None:
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

    def __init__(self, topo: Topology, source_id: str, *, max_age_ms: int = MAX_AGE_MS) -> None:
        self.topo = topo
        self.source_id = source_id
        self.max_age_ms = max_age_ms
        self.policy = WritePolicy(topo)
        self.group = f"{topo.prefix}plantstream-{topo.name}-commands-{source_id}"
        self.stats = ExecutorStats()
        self.executed: set[str] = set()
        self.ready = threading.Event()
        self._producer: Producer | None = None
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
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 2,
                "client.id": f"plantstream-commands-{self.source_id}",
            }
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
            await self._blocking(self._producer.flush, 10)
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
        self._producer.flush(10)

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
                dl = dead_letter(
                    f"commands:{self.source_id}",
                    reason,
                    msg.value(),
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                )
                self._producer.produce(self.topo.dlq_topic, codec.dumps(dl), self.source_id.encode())
        await self._commit(msg)

    def _publish(self, result: CommandResult) -> None:
        assert self._producer is not None
        self._producer.produce(
            self.topo.results_topic,
            codec.dumps(result),
            result["point"].encode(),
            timestamp=result["completed_at"],
        )

    async def _answer(self, result: CommandResult) -> None:
        self.executed.add(result["id"])
        self._publish(result)
        assert self._producer is not None
        await self._blocking(self._producer.flush, 10)

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


# -- sending (the CLI) -------------------------------------------------------------------------------------
def send_command(topo: Topology, cmd: WriteCommand, wait: float | None = 30.0) -> CommandResult | None:
    """Put ``cmd`` on commands.bacnet; with ``wait``, return its result (None if none came in time)."""
    bootstrap = topo.broker.bootstrap
    watcher = None
    if wait:
        watcher = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"plantstream-cli-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        meta = watcher.list_topics(topo.results_topic, timeout=10).topics.get(topo.results_topic)
        if meta is None or meta.error is not None:
            watcher.close()
            raise KafkaException(
                KafkaError(
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    f"{topo.results_topic} does not exist: run `plantstream deploy` first",
                )
            )
        starts = []
        for p in meta.partitions:
            _lo, hi = watcher.get_watermark_offsets(TopicPartition(topo.results_topic, p), timeout=10)
            starts.append(TopicPartition(topo.results_topic, p, hi))
        watcher.assign(starts)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topo.commands_topic, codec.dumps(cmd), cmd["point"].encode(), timestamp=cmd["ts"])
    if producer.flush(15) != 0:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the command was not delivered to Kafka"))
    if watcher is None:
        return None
    try:
        end = time.monotonic() + (wait or 0)
        while time.monotonic() < end:
            for m in watcher.consume(100, 0.5):
                if m.error() is None:
                    r = codec.loads(m.value())
                    if isinstance(r, dict) and r.get("id") == cmd["id"]:
                        return r  # type: ignore[return-value]
        return None
    finally:
        watcher.close()


# -- the audit sink -------------------------------------------------------------------------------------
def has_commands(topo: Topology) -> bool:
    return any(isinstance(s, BacnetSource) for s in topo.sources)


def attach_command_sink(
    app: Any, topo: Topology, counters: Any, fatal: Callable[[str, BaseException], None]
) -> None:
    """For every PostgreSQL sink: commands.results into write_commands, acked after the commit."""
    if not has_commands(topo):
        return
    from connectors.timescale.commands import CommandAuditWriter, row_of

    for sink in topo.sinks:
        if getattr(sink, "type", None) != "postgres":
            continue
        _attach_one(app, topo, sink, counters, fatal, CommandAuditWriter(sink.dsn, sink.schema_name), row_of)


def _attach_one(
    app: Any,
    topo: Topology,
    sink: Any,
    counters: Any,
    fatal: Callable[[str, BaseException], None],
    writer: Any,
    row_of: Callable[[dict[str, Any]], tuple[Any, ...]],
) -> None:
    topic = app.topic(
        topo.results_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    async def dlq(reason: str, value: bytes, msg: Any) -> None:
        dl = dead_letter(
            sink.id, reason, value, topic=topo.results_topic, partition=msg.partition, offset=msg.offset
        )
        await app.producer.send(topo.dlq_topic, sink.id.encode(), codec.dumps(dl), None, None, None)

    @app.agent(topic, name=f"sink-{sink.id}-write_commands", concurrency=1)
    async def audit(stream: Any) -> None:
        async for events in stream.noack_take(500, within=sink.batch_delay / 1000.0):
            try:
                rows, sources = [], []
                for ev in events:
                    msg = ev.message
                    try:
                        rows.append(row_of(codec.loads(msg.value)))
                        sources.append(msg)
                    except (codec.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                        await dlq(f"invalid command result: {e!r}", msg.value, msg)
                refused = await writer.write(rows) if rows else []
                by_row = {id(r): m for r, m in zip(rows, sources, strict=True)}
                for row, reason in refused:
                    m = by_row.get(id(row))
                    await dlq(reason, m.value if m is not None else repr(row).encode(), m)
                counters.sink_rows["write_commands"] = counters.sink_rows.get("write_commands", 0) + len(rows)
                for ev in events:
                    await stream.ack(ev)
            except Exception as exc:
                fatal(f"sink {sink.id} (write_commands) failed", exc)
