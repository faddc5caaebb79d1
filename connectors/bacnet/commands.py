"""The BACnet write path: WriteCommands on ``commands.bacnet``, CommandResults on ``commands.results``.

A command names a point by its series id (``site/device/point``) and asks for a value at a priority, or
``null`` to relinquish that priority. :class:`WritePolicy` decides from the topology alone whether it may
run: the point must be marked ``writable``, the value inside its ``min``/``max`` and the priority no more
important than the source's ``priority_floor``. :class:`CommandExecutor` runs inside the BACnet source that
owns the point (it holds the BACnet socket) and answers every command with a CommandResult.

One executor per network: every process that executes commands for a BACnet network joins the network's
consumer group, so each command goes to one of them. Before a command reaches a device its Kafka offset is
committed synchronously (the claim); the group coordinator refuses that commit from a member that lost the
partition (a rebalance, a process paused past its session), so a replaced executor never sends a write its
successor runs. A claim older than ``CLAIM_WINDOW_S`` when the write is due is not sent either. A command id
answered before (the results topic, read at start and at every assignment) gets its earlier result again,
not a second write. A claimed command left without a result (its executor died) is reported ``failed`` as
interrupted by the partition's next executor, after waiting long enough for a paused one to have answered.

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

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

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
from pipeline.core.kafka import Connection, Outbox, client_config, connection_conf
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
        self.networks: dict[str, str] = {}  # source id -> its BACnet network
        self.executors: dict[str, str] = {}  # network -> the source that executes the network's commands
        bacnet = [s for s in topo.sources if isinstance(s, BacnetSource)]
        # A network's executor: its source with writable points (the topology allows one), else its first.
        for s in sorted(bacnet, key=lambda s: not s.writable_points()):
            self.executors.setdefault(s.network_id, s.id)
        for s in bacnet:
            self.bacnet_sources.append(s.id)
            self.networks[s.id] = s.network_id
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

    def network_of(self, point: str) -> str | None:
        """The BACnet network whose executor answers commands for ``point``."""
        owner = self.owner(point)
        return self.networks.get(owner) if owner is not None else None

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

#: Longest time from issuing a claim to sending the write. A claim that took longer (a paused process) is
#: not sent: by then the partition may belong to another executor, which waits this long (plus a write's
#: timeout) before it reports the claim as interrupted.
CLAIM_WINDOW_S = 2.0


class WriteRefused(Exception):
    """The source will not send this write (e.g. the device's address is in doubt): answered ``rejected``."""


def commands_group(topo: TopologyBase, network: str) -> str:
    """The consumer group of a network's executors: one group, so each command reaches one of them."""
    return f"{topo.prefix}plantstream-{topo.name}-commands-bacnet-{network}"


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
    fenced: int = 0
    late: int = 0


class CommandExecutor:
    """Consumes ``commands.bacnet`` for one BACnet network and runs its commands, each at most once.

    Every process executing commands for the network joins one consumer group, so each partition (and so
    each command) has one executor at a time. The claim (a synchronous commit of the command's offset
    before the write) is the fence: a member that lost the partition in a rebalance, or was paused past its
    session and replaced, gets its commit refused by the group coordinator and does not send the write.
    """

    def __init__(
        self,
        topo: TopologyBase,
        policy: WritePolicy,
        source_id: str,
        *,
        max_age_ms: int = MAX_AGE_MS,
        network: str | None = None,
        write_timeout: float = 5.0,
        claim_window: float = CLAIM_WINDOW_S,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.topo = topo
        self.source_id = source_id
        self.max_age_ms = max_age_ms
        self.policy = policy
        self.network = network if network is not None else policy.networks.get(source_id, source_id)
        self.group = commands_group(topo, self.network)
        self.claim_window = claim_window
        # How long a new owner waits for the old owner's result of a claimed command: the old owner sends
        # within claim_window of its claim (made before the new owner's assignment) and a write ends within
        # write_timeout.
        self.fence_s = claim_window + write_timeout + 1.0
        self.stats = ExecutorStats()
        self.answers: dict[str, CommandResult] = {}  # command id -> its result (the results topic and ours)
        self.ready = threading.Event()
        self._consumer_config = dict(consumer_config or {})
        self._producer: Outbox | None = None
        self._consumer: Consumer | None = None
        self._assigned: set[int] = set()
        self._to_recover: dict[int, float] = {}  # partition -> monotonic time of its assignment
        self._settled: dict[int, int] = {}  # partition -> committed offset known to be answered
        self._results_pos: dict[int, int] = {}  # results topic partition -> next offset to read
        self._joined = False
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
        conf = client_config(self.topo.broker)
        self._producer = Outbox(
            conf,
            f"plantstream-commands-{self.source_id}",
            {"linger.ms": 2, "partitioner": "consistent_random"},  # results keyed by point, as before
        )
        self._consumer = Consumer(
            {
                **conf,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **self._consumer_config,
            }
        )
        try:
            while not stop.is_set():
                try:
                    await self._blocking(self._prepare)
                    break
                except KafkaException as e:
                    code = e.args[0].code() if e.args and isinstance(e.args[0], KafkaError) else None
                    unreachable = code in (
                        KafkaError._TRANSPORT,
                        KafkaError._ALL_BROKERS_DOWN,
                        KafkaError._TIMED_OUT,
                    )
                    log.warning(
                        "source %s: command topics not ready (%s); %s; retrying",
                        self.source_id,
                        e,
                        "the broker is out of reach" if unreachable else "run `plantstream deploy`",
                    )
                    await asyncio.sleep(5)
            while not stop.is_set():
                msgs = await self._blocking(self._consumer.consume, 50, 0.2)
                if self._to_recover:
                    try:
                        await self._recover_assigned(stop)
                    except KafkaException as e:  # the coordinator moving, say: tried again next round
                        log.warning("source %s: checking claimed commands: %s", self.source_id, e)
                        continue
                if self._joined and not self._to_recover:
                    self.ready.set()
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
        """Learn the results given so far, then join the network's group."""
        assert self._consumer is not None
        self._read_results()
        topic = self.topo.commands_topic
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{topic} does not exist"))
        self._consumer.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # Rebalance callbacks run on the Kafka thread, inside consume().
    def _on_assign(self, _consumer: Any, parts: list[TopicPartition]) -> None:
        now = time.monotonic()
        for tp in parts:
            self._assigned.add(tp.partition)
            self._to_recover[tp.partition] = now
        self._joined = True
        log.info(
            "source %s: executing the commands of network %s from partitions %s",
            self.source_id,
            self.network,
            sorted(self._assigned),
        )

    def _on_revoke(self, _consumer: Any, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self._assigned.discard(tp.partition)
            self._to_recover.pop(tp.partition, None)

    def _on_lost(self, consumer: Any, parts: list[TopicPartition]) -> None:
        log.warning(
            "source %s: lost command partitions %s (this executor was replaced in its group)",
            self.source_id,
            sorted(tp.partition for tp in parts),
        )
        self._on_revoke(consumer, parts)

    def _read_results(self) -> None:
        for r in _read_from(client_config(self.topo.broker), self.topo.results_topic, self._results_pos):
            if isinstance(r, dict) and isinstance(r.get("id"), str):
                self.answers[r["id"]] = r  # type: ignore[assignment]

    def _unanswered_claims(self, partitions: list[int]) -> list[tuple[int, int, WriteCommand]]:
        """The last claimed command of each partition, where it has no result yet."""
        assert self._consumer is not None
        self._read_results()
        topic = self.topo.commands_topic
        out = []
        for tp in self._consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10):
            if tp.offset <= 0 or self._settled.get(tp.partition) == tp.offset:
                continue
            raw = _read_one(client_config(self.topo.broker), topic, tp.partition, tp.offset - 1)
            cmd = None
            if raw is not None:
                with contextlib.suppress(InvalidCommand, codec.JSONDecodeError):
                    cmd = parse_command(codec.loads(raw))
            if (
                cmd is None
                or cmd["id"] in self.answers
                or self.policy.network_of(cmd["point"]) != self.network
            ):
                self._settled[tp.partition] = tp.offset
                continue
            out.append((tp.partition, tp.offset, cmd))
        return out

    async def _recover_assigned(self, stop: threading.Event) -> None:
        """Answer the commands claimed by an earlier owner of the partitions just assigned, if it did not.

        The earlier owner may be a paused process that wakes up: it sends a claimed write within
        ``claim_window`` of its claim, which it made before this assignment, so after ``fence_s`` its
        result is either on the results topic or will never be a write made after ours.
        """
        parts = dict(self._to_recover)
        pending = await self._blocking(self._unanswered_claims, list(parts))
        for p, offset, cmd in pending:
            wait = parts[p] + self.fence_s - time.monotonic()
            if wait > 0:
                log.info(
                    "source %s: command %s was claimed by the partition's earlier executor without a result; "
                    "waiting %.1fs for it",
                    self.source_id,
                    cmd["id"],
                    wait,
                )
                end = time.monotonic() + wait
                while time.monotonic() < end and not stop.is_set():
                    await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))
                await self._blocking(self._read_results)
            if cmd["id"] not in self.answers:
                self.stats.interrupted += 1
                log.error(
                    "source %s: command %s on %s was claimed but never answered (its executor stopped); "
                    "reporting it failed, it is not run again",
                    self.source_id,
                    cmd["id"],
                    cmd["point"],
                )
                await self._answer(
                    result_for(
                        cmd,
                        "failed",
                        "interrupted: the executor stopped after claiming the command; "
                        "whether the device received it is unknown",
                        self.source_id,
                    )
                )
            self._settled[p] = offset
        for p in parts:
            self._to_recover.pop(p, None)

    async def _handle(self, msg: Any, execute: Execute) -> None:
        self.stats.received += 1
        try:
            cmd = parse_command(codec.loads(msg.value()))
        except (InvalidCommand, codec.JSONDecodeError) as e:
            await self._invalid(msg, e)
            return
        if self.policy.network_of(cmd["point"]) != self.network:
            self.stats.ignored += 1
            await self._commit(msg)
            return
        earlier = self.answers.get(cmd["id"])
        if earlier is not None:
            self.stats.duplicates += 1
            log.info(
                "source %s: command %s was handled before; its result is sent again, the write is not",
                self.source_id,
                cmd["id"],
            )
            if await self._claim(msg) is not None:
                await self._answer(earlier, msg)
            return
        reason = self.policy.check(cmd, now_ms(), self.max_age_ms)
        claimed_at = await self._claim(msg)
        if claimed_at is None:
            return
        if reason is not None:
            self.stats.rejected += 1
            log.warning(
                "source %s: command %s from %s rejected: %s",
                self.source_id,
                cmd["id"],
                cmd["requested_by"],
                reason,
            )
            await self._answer(result_for(cmd, "rejected", reason, self.source_id), msg)
            return
        what = "relinquish" if cmd["value"] is None else f"write {cmd['value']:g}"
        took = time.monotonic() - claimed_at
        if took > self.claim_window:
            # Paused between the claim and the write: the partition may have another executor by now.
            self.stats.late += 1
            log.warning(
                "source %s: %s on %s not sent: %.1fs passed since its claim (at most %.1fs)",
                self.source_id,
                what,
                cmd["point"],
                took,
                self.claim_window,
            )
            await self._answer(
                result_for(
                    cmd,
                    "failed",
                    f"not sent: {took:.1f}s passed between claiming the command and sending it (at most "
                    f"{self.claim_window:.1f}s); the executor was held up, send the command again",
                    self.source_id,
                ),
                msg,
            )
            return
        try:
            await execute(cmd["point"], cmd["value"], cmd["priority"])
        except WriteRefused as e:
            self.stats.rejected += 1
            log.warning("source %s: %s on %s refused: %s", self.source_id, what, cmd["point"], e)
            await self._answer(result_for(cmd, "rejected", str(e), self.source_id), msg)
            return
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
            await self._answer(result_for(cmd, "failed", str(e) or type(e).__name__, self.source_id), msg)
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
        await self._answer(result_for(cmd, "accepted", None, self.source_id), msg)

    async def _invalid(self, msg: Any, e: Exception) -> None:
        reason = e.reason if isinstance(e, InvalidCommand) else f"invalid: not JSON ({e})"
        raw = e.raw if isinstance(e, InvalidCommand) else {}
        point = raw.get("point")
        network = self.policy.network_of(point if isinstance(point, str) else "")
        if network != self.network:
            await self._commit(msg)
            return
        if await self._claim(msg) is None:
            return
        self.stats.invalid += 1
        cid = e.command_id if isinstance(e, InvalidCommand) else None
        if cid is not None and cid not in self.answers:
            await self._answer(result_for(raw, "rejected", reason, self.source_id), msg)
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

    def _publish(self, result: CommandResult) -> None:
        assert self._producer is not None
        self._producer.produce(
            self.topo.results_topic, result["point"].encode(), codec.dumps(result), result["completed_at"]
        )

    async def _answer(self, result: CommandResult, msg: Any = None) -> None:
        self.answers[result["id"]] = result
        self._publish(result)
        assert self._producer is not None
        await self._blocking(self._producer.flush_quietly, 10)
        if msg is not None:
            self._settled[msg.partition()] = msg.offset() + 1

    async def _claim(self, msg: Any) -> float | None:
        """Commit the command's offset while this executor still owns its partition: the fence.

        Returns when the claim was issued (monotonic), or None when it was refused: the partition belongs
        to another member of the group now (the coordinator answers UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION
        or REBALANCE_IN_PROGRESS), which runs the command from the last committed offset.
        """
        assert self._consumer is not None
        issued = time.monotonic()
        error: Any = None
        if msg.partition() not in self._assigned:
            error = "partition no longer assigned"
        else:
            tp = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
            try:
                done = await self._blocking(self._consumer.commit, offsets=[tp], asynchronous=False)
            except KafkaException as e:
                error = e.args[0] if e.args else e
            else:
                error = next((t.error for t in done or [] if t.error is not None), None)
        if error is None:
            return issued
        self.stats.fenced += 1
        log.warning(
            "source %s: command at %s[%d]@%d not claimed (%s): another executor of network %s has the "
            "partition and runs it; not executed here",
            self.source_id,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            error,
            self.network,
        )
        return None

    async def _commit(self, msg: Any) -> None:
        """Move past a message that is not ours to run (another network's, or unusable)."""
        assert self._consumer is not None
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
        try:
            await self._blocking(self._consumer.commit, offsets=[tp], asynchronous=False)
        except KafkaException as e:  # the new owner of the partition moves past it just the same
            log.debug("source %s: commit of %s[%d]: %s", self.source_id, tp.topic, tp.partition, e)


def _read_from(
    bootstrap: Connection, topic: str, positions: dict[int, int], timeout: float = 15.0
) -> list[Any]:
    """The records of ``topic`` from ``positions`` (partition -> offset; the beginning where absent) to its
    current end; ``positions`` is moved to that end. For small topics: the results."""
    c = Consumer(
        {
            **connection_conf(bootstrap),
            "group.id": f"plantstream-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{topic} does not exist"))
        starts, ends = {}, {}
        for p in meta.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            start = max(lo, positions.get(p, lo))
            if hi > start:
                starts[p], ends[p] = start, hi
            else:
                positions[p] = max(start, hi)
        if not ends:
            return []
        c.assign([TopicPartition(topic, p, off) for p, off in starts.items()])
        out: list[Any] = []
        pending = dict(ends)
        end_at = time.monotonic() + timeout
        while pending and time.monotonic() < end_at:
            for m in c.consume(500, 0.5):
                if m.error() is not None:
                    continue
                with contextlib.suppress(codec.JSONDecodeError):
                    out.append(codec.loads(m.value()))
                positions[m.partition()] = m.offset() + 1
                if m.offset() + 1 >= pending.get(m.partition(), 0):
                    pending.pop(m.partition(), None)
        if pending:
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, f"{topic} not read to its end in {timeout:.0f}s")
            )
        return out
    finally:
        c.close()


def _read_one(bootstrap: Connection, topic: str, partition: int, offset: int) -> bytes | None:
    c = Consumer(
        {
            **connection_conf(bootstrap),
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
