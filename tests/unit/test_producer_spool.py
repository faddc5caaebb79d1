"""The spool's sender (connectors/common/producer.py) against a stand-in for the Kafka producer.

The stand-in keeps what is produced and runs delivery reports only inside ``poll``, on the polling thread,
as librdkafka does; a test decides which records are reported and with which error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from connectors.common import producer as producer_mod
from connectors.common.producer import TelemetryProducer
from connectors.common.spool import MIB, Spool, SpoolConfig
from tests.conftest import wait_for

Report = Callable[[KafkaError | None, Any], None]


class FakeOutbox:
    def __init__(self, bootstrap: Any, client_id: str, extra: dict[str, Any] | None = None) -> None:
        self.conf = dict(extra or {})
        self.lock = threading.Lock()
        self.produced: list[tuple[str, bytes]] = []  # (topic, value) in produce order
        self.outstanding: list[tuple[bytes, Report]] = []  # produced, not yet reported
        self.ready: list[tuple[Report, KafkaError | None]] = []  # reports the next poll runs
        self.max_outstanding = 0
        self.dead: list[tuple[str, str]] = []  # (topic, reason)

    def produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        ts_ms: int | None = None,
        partition: int | None = None,
        on_delivery: Report | None = None,
    ) -> None:
        with self.lock:
            self.produced.append((topic, value or b""))
            if on_delivery is not None:
                self.outstanding.append((value or b"", on_delivery))
                self.max_outstanding = max(self.max_outstanding, len(self.outstanding))

    def dead_letter(self, dlq_topic: str, source: str, reason: str, payload: Any, **kw: Any) -> None:
        with self.lock:
            self.dead.append((dlq_topic, reason))
        cb = kw.get("on_delivery")
        if cb is not None:
            with self.lock:
                self.ready.append((cb, None))

    def poll(self, timeout: float = 0.0) -> int:
        with self.lock:
            ready, self.ready = self.ready, []
        for cb, err in ready:
            cb(err, None)
        return len(ready)

    def flush_quietly(self, timeout: float = 30.0) -> int:
        self.poll()
        with self.lock:
            return len(self.outstanding)

    # -- the test's side -----------------------------------------------------------------------------
    def resolve(self, which: Callable[[bytes], bool], err: KafkaError | None = None) -> int:
        """Report the outstanding records whose value ``which`` picks, at the next poll."""
        with self.lock:
            picked = [o for o in self.outstanding if which(o[0])]
            self.outstanding = [o for o in self.outstanding if not which(o[0])]
            self.ready += [(cb, err) for _, cb in picked]
        return len(picked)

    def run_here(self) -> int:
        """Report every outstanding record on the calling thread, as a poll from that thread would."""
        with self.lock:
            picked, self.outstanding = self.outstanding, []
        for _, cb in picked:
            cb(None, None)
        return len(picked)

    def sent(self, value: bytes) -> int:
        with self.lock:
            return sum(1 for t, v in self.produced if v == value and t == "raw")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_mod, "Outbox", FakeOutbox)
    monkeypatch.setattr(producer_mod, "RETRY_PAUSE_S", (0.01, 0.05))


@pytest.fixture
def spooled(fake: None, tmp_path: Path) -> Iterator[TelemetryProducer]:
    p = TelemetryProducer("127.0.0.1:1", "raw", "dlq")
    p.use_spool(SpoolConfig(), tmp_path / "spool", "block", ack_durable=False, name="t")
    yield p
    if p._sender is not None:
        p.flush(0)


def out(p: TelemetryProducer) -> FakeOutbox:
    o = p._out
    assert isinstance(o, FakeOutbox)
    return o


def val(i: int) -> bytes:
    return f"record-{i:05d}".encode()


def submit(p: TelemetryProducer, values: list[bytes], done: list[KafkaError | None] | None = None) -> None:
    assert p._sender is not None
    for v in values:
        p._sender.submit(b"site/dev", v, 1_700_000_000_000, 1, (done if done is not None else []).append)


def test_a_failed_delivery_rewinds_and_sends_again_what_kafka_has_not_confirmed(
    spooled: TelemetryProducer,
) -> None:
    p, o = spooled, out(spooled)
    assert p.spool is not None and p._sender is not None
    values = [val(i) for i in range(3)]
    submit(p, values)
    wait_for(lambda: len(o.produced) == 3, 5, "three records sent")
    o.resolve(lambda v: v == values[1], KafkaError(KafkaError._MSG_TIMED_OUT))
    o.resolve(lambda v: v in (values[0], values[2]))
    # The cursor stops below the failed record; it alone is sent again (record 2 is already confirmed).
    wait_for(lambda: o.sent(values[1]) == 2, 5, "the failed record sent again")
    assert p.spool.cursor == 1
    assert o.sent(values[0]) == 1 and o.sent(values[2]) == 1
    assert p._sender.resent == 1 and p.errors == 1
    o.resolve(lambda v: True)
    wait_for(lambda: p.spool is not None and p.spool.pending == 0, 5, "everything confirmed")
    assert p.spool.cursor == 3 and p.sent_batches == 3


def test_a_record_too_large_for_kafka_is_dead_lettered_and_not_sent_again(
    spooled: TelemetryProducer,
) -> None:
    p, o = spooled, out(spooled)
    assert p.spool is not None
    values = [val(i) for i in range(3)]
    submit(p, values)
    wait_for(lambda: len(o.produced) == 3, 5, "three records sent")
    o.resolve(lambda v: v == values[1], KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    o.resolve(lambda v: True)
    wait_for(lambda: p.spool is not None and p.spool.pending == 0, 5, "the spool emptied")
    assert o.sent(values[1]) == 1  # never retried
    assert len(o.dead) == 1 and o.dead[0][0] == "dlq" and "oversized" in o.dead[0][1]


def test_out_of_order_reports_move_the_cursor_over_contiguous_records_only(
    spooled: TelemetryProducer,
) -> None:
    p, o = spooled, out(spooled)
    assert p.spool is not None
    values = [val(i) for i in range(5)]
    submit(p, values)
    wait_for(lambda: len(o.produced) == 5, 5, "five records sent")
    spool = p.spool
    o.resolve(lambda v: v in (values[3], values[1], values[4]))
    wait_for(lambda: p.sent_batches == 3, 5, "three reports taken")
    assert spool.cursor == 0 and spool.pending == 2
    o.resolve(lambda v: v == values[0])
    wait_for(lambda: spool.cursor == 2, 5, "the cursor past records 0 and 1")
    o.resolve(lambda v: v == values[2])
    wait_for(lambda: spool.cursor == 5, 5, "the cursor past every record")
    assert len(o.produced) == 5  # nothing sent twice


def test_no_more_than_max_in_flight_records_are_handed_to_kafka(
    spooled: TelemetryProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer_mod, "MAX_IN_FLIGHT", 7)
    p, o = spooled, out(spooled)
    assert p.spool is not None
    values = [val(i) for i in range(40)]
    submit(p, values)
    while p.spool.pending:
        wait_for(lambda: len(o.outstanding) == min(7, p.spool.pending if p.spool else 0), 5, "a full window")
        o.resolve(lambda v: True)
        wait_for(lambda: not o.ready, 5, "the reports taken")
    assert o.max_outstanding == 7
    assert len(o.produced) == 40


def test_reports_run_on_the_sender_thread_whoever_polls(spooled: TelemetryProducer) -> None:
    """librdkafka runs a report on the thread that polls; the source's thread polls too (the Outbox serves
    reports every 10,000th record it produces, dead letters included). The in-flight counters and the cursor
    must still be changed by the sender thread alone."""
    p, o = spooled, out(spooled)
    assert p.spool is not None and p._sender is not None
    sender = p._sender
    seen: list[str] = []
    report = sender._report

    def traced(rec: Any, err: KafkaError | None) -> None:
        seen.append(threading.current_thread().name)
        report(rec, err)

    sender._report = traced  # type: ignore[method-assign]
    values = [val(i) for i in range(50)]
    submit(p, values)
    wait_for(lambda: len(o.produced) == 50, 5, "fifty records sent")
    assert o.run_here() == 50  # as the source's thread does inside a dead letter's produce
    wait_for(lambda: p.spool is not None and p.spool.pending == 0, 5, "everything confirmed")
    assert len(seen) == 50 and set(seen) == {sender._thread.name}
    assert sender._in_flight == 0 and sender._in_flight_bytes == 0


def test_a_stop_with_a_full_block_spool_keeps_what_is_held(
    fake: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = TelemetryProducer("127.0.0.1:1", "raw", "dlq")
    cfg = SpoolConfig(max_bytes=16 * MIB, when_full="block")
    spool = p.use_spool(cfg, tmp_path / "spool", "block", ack_durable=True, name="t")
    assert p._sender is not None
    big = [bytes([i]) * (MIB - 1024) for i in range(20)]  # Kafka is away: none of them is confirmed
    done: list[KafkaError | None] = []
    submit(p, big, done)
    held = len(p._sender._held)
    assert held >= 3 and not p.room
    assert p.flush(0.2) == 20  # stopped: everything stays spooled, past max_bytes by what was held
    assert done == [None] * 20  # every batch accepted was acknowledged as kept, none refused
    assert spool.size > cfg.max_bytes
    assert spool.size <= cfg.max_bytes + held * MIB
    again = Spool(tmp_path / "spool", max_bytes=cfg.max_bytes, when_full="block")
    try:
        assert [r.value for r in again.read(0, 100, 1 << 30)] == big
    finally:
        again.close()
