"""The live feed of ``plantstream serve``: one Kafka consumer per process, fanned out to bounded queues.

The consumer (a thread) reads ``telemetry.latest`` (from the start: it is compacted, so that is every series'
newest reading, kept in :attr:`Hub.latest` for the REST answers), ``telemetry.agg.1m`` and ``alerts.events``
(from the end). Each record becomes one Server-Sent-Events frame, serialised once, numbered
``<boot>.<seq>`` and kept in a ring of the newest :data:`RING` frames. The hub only ever puts into a
client's queue without waiting, so a client that does not read cannot slow the others. It is cut off when
it has :data:`QUEUE` frames pending and has taken none for :data:`STALL_S` seconds, or when it has ten times
that many pending whatever it does (a burst is absorbed by a client that keeps reading). When it comes back
with the last id it saw (``Last-Event-ID``, which browsers send by themselves) it gets everything since
from the ring, or a ``resync`` event when that is gone (the page then reloads its state over REST).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from pipeline.core import codec
from pipeline.core.kafka import Connection, connection_conf

log = logging.getLogger("plantstream.api")

RING = 50_000  # frames kept for clients that reconnect
QUEUE = 2_000  # frames a client may have pending while it takes none for STALL_S
STALL_S = 5.0
HEARTBEAT_S = 15.0


@dataclass(slots=True)
class Frame:
    seq: int
    kind: str  # latest | agg | alarm
    site: str
    series: str
    data: bytes  # the whole SSE frame


@dataclass(eq=False)
class Client:
    sites: frozenset[str]
    series: frozenset[str] | None
    kinds: frozenset[str]
    limit: int = QUEUE
    queue: asyncio.Queue[Frame | None] = field(default_factory=asyncio.Queue)  # bounded by the hub
    dropped: bool = False
    taken: float = field(default_factory=time.monotonic)  # when it last took a frame

    def wants(self, f: Frame) -> bool:
        return (
            f.kind in self.kinds and f.site in self.sites and (self.series is None or f.series in self.series)
        )


class Hub:
    def __init__(
        self,
        bootstrap: Connection,
        topics: dict[str, str],
        loop_sites: Callable[[], dict[str, str]],
        queue: int = QUEUE,
    ) -> None:
        """``topics``: kind (latest, agg, alarm) -> topic name; ``loop_sites``: loop id -> site."""
        self.bootstrap, self.topics, self.loop_sites = bootstrap, topics, loop_sites
        self.queue = queue  # frames a client may have pending
        self.boot = uuid.uuid4().hex[:8]
        self.seq = 0
        self.ring: deque[Frame] = deque(maxlen=RING)
        self.clients: dict[str, set[Client]] = {}  # site -> its clients
        self.latest: dict[str, dict[str, Any]] = {}  # series -> its newest reading
        self.devices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (site, device) -> point -> it
        self.ready = threading.Event()  # telemetry.latest read up to where it was at the start
        self.error: str | None = None
        self.received = 0
        self.dropped_clients = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the consumer thread -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.call_soon(self.sweep)
        self._thread = threading.Thread(target=self._run, name="live feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        c = Consumer(
            {
                **connection_conf(self.bootstrap),
                "group.id": f"plantstream-serve-{self.boot}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
            }
        )
        try:
            ends: dict[tuple[str, int], int] = {}
            assignment = []
            for kind, topic in self.topics.items():
                meta = c.list_topics(topic, timeout=10).topics.get(topic)
                if meta is None or meta.error is not None:
                    log.warning(
                        "live feed: no topic %s (%s): not followed", topic, meta.error if meta else ""
                    )
                    continue
                for p in meta.partitions:
                    start = OFFSET_BEGINNING if kind == "latest" else OFFSET_END
                    if kind == "latest":
                        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                        if hi > lo:
                            ends[(topic, p)] = hi
                    assignment.append(TopicPartition(topic, p, start))
            c.assign(assignment)
            kinds = {t: k for k, t in self.topics.items()}
            if not ends:
                self.ready.set()
            while not self._stop.is_set():
                msgs = c.consume(1000, 0.2)
                frames: list[Frame] = []
                for m in msgs:
                    if m.error() is not None or m.value() is None:
                        continue
                    what = kinds.get(m.topic() or "")
                    if what is None:
                        continue
                    self.received += 1
                    try:
                        frame = self._frame(what, codec.loads(m.value()))
                    except (codec.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # not ours to judge: the pipeline dead-letters bad records
                    key = (m.topic() or "", m.partition() or 0)
                    if key in ends and (m.offset() or 0) + 1 >= ends[key]:
                        del ends[key]
                        if not ends:
                            self.ready.set()
                    if frame is not None and self.ready.is_set():
                        frames.append(frame)
                if frames and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.publish, frames)
        except Exception as e:  # the feed is down; REST goes on, /api/health says so
            self.error = repr(e)
            log.exception("live feed stopped")
        finally:
            c.close()

    def _frame(self, kind: str, rec: dict[str, Any]) -> Frame | None:
        if kind == "latest":
            series = f"{rec['site']}/{rec['device']}/{rec['point']}"
            old = self.latest.get(series)
            if old is not None and old.get("ts", 0) > rec.get("ts", 0):
                return None
            self.latest[series] = rec
            self.devices.setdefault((rec["site"], rec["device"]), {})[rec["point"]] = rec
            site = rec["site"]
            body = {"series": series, **rec}
        elif kind == "agg":
            series, site, body = rec["series"], rec["site"], rec
        else:
            source = rec["source"]
            site = source.split("/", 1)[0] if "/" in source else self.loop_sites().get(source, "")
            series, body = source, rec
        self.seq += 1
        data = f"id: {self.boot}.{self.seq}\nevent: {kind}\ndata: ".encode() + codec.dumps(body) + b"\n\n"
        return Frame(self.seq, kind, site, series, data)

    # -- the event loop ------------------------------------------------------------------------------
    def publish(self, frames: Iterable[Frame]) -> None:
        """On the event loop: ring, then every client that wants a frame, without ever waiting."""
        now = time.monotonic()
        for f in frames:
            self.ring.append(f)
            for client in list(self.clients.get(f.site, ())):
                if client.dropped or not client.wants(f):
                    continue
                if client.queue.empty():
                    client.taken = now  # the stall clock runs while frames wait
                client.queue.put_nowait(f)
                if self._stuck(client, now):
                    self._drop(client)

    @staticmethod
    def _stuck(client: Client, now: float) -> bool:
        n = client.queue.qsize()
        return n >= 10 * client.limit or (n >= client.limit and now - client.taken >= STALL_S)

    def sweep(self) -> None:
        """On the event loop, every second: cut off stalled clients even when nothing new comes for them."""
        now = time.monotonic()
        for client in {c for cs in self.clients.values() for c in cs}:
            if not client.dropped and self._stuck(client, now):
                self._drop(client)
        if self._loop is not None and not self._stop.is_set():
            self._loop.call_later(1.0, self.sweep)

    def _drop(self, client: Client) -> None:
        """A client too slow for its queue: cut off (it reconnects with its last id and resumes)."""
        client.dropped = True
        self.dropped_clients += 1
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(None)

    def attach(self, client: Client) -> None:
        for site in client.sites:
            self.clients.setdefault(site, set()).add(client)

    def detach(self, client: Client) -> None:
        for site in client.sites:
            self.clients.get(site, set()).discard(client)

    def since(self, last_id: str | None) -> list[Frame] | None:
        """Frames after ``last_id`` still in the ring ([] for none or a new client; None: gone, resync)."""
        if not last_id:
            return []
        boot, _, seq = last_id.partition(".")
        if boot != self.boot or not seq.isdigit():
            return None
        n = int(seq)
        if self.ring and n < self.ring[0].seq - 1:
            return None
        return [f for f in self.ring if f.seq > n]

    @property
    def client_count(self) -> int:
        return len({c for cs in self.clients.values() for c in cs})

    async def stream(self, client: Client, last_id: str | None) -> AsyncIterator[bytes]:
        """The SSE body for ``client``: the frames it missed, then live ones, with a heartbeat comment."""
        self.attach(client)  # before the backlog: nothing published in between is missed
        try:
            backlog = self.since(last_id)
            skip = 0  # frames queued while the backlog goes out may repeat it
            if backlog is None:
                yield b"event: resync\ndata: {}\n\n"
            else:
                for f in backlog:
                    if client.wants(f):
                        yield f.data
                    skip = f.seq
            yield b": live\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                client.taken = time.monotonic()
                if item is None:
                    return  # dropped: the client reconnects
                if item.seq <= skip:
                    continue
                yield item.data
        finally:
            self.detach(client)


def wait_ready(hub: Hub, timeout: float) -> bool:
    """Whether the feed has read ``telemetry.latest`` through (False on an error or at the timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and hub.error is None:
        if hub.ready.wait(0.2):
            return True
    return hub.ready.is_set()
