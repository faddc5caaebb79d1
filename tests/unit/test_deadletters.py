"""The ledger of dead letters already sent, and the marks carried by commits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.core.records import dead_letter
from pipeline.stages.deadletters import Ledger, Marks, decode_mark, encode_mark, patiently


def test_a_mark_survives_the_commit_metadata_and_garbage_is_no_mark() -> None:
    assert decode_mark(encode_mark({0: 12, 2: 7})) == {0: 12, 2: 7}
    for junk in (None, "", "{}", "not json", '{"dlq": 3}', '{"dlq": {"a": 1}}'):
        assert decode_mark(junk) is None


def test_the_ledger_skips_each_dead_letter_as_often_as_it_was_sent() -> None:
    ledger = Ledger("raw")
    committed = {0: 100, 1: 50}
    twice = dead_letter("s", "invalid: x", {"r": 1}, topic="raw", partition=0, offset=120)
    other = dead_letter("s", "invalid: y", {"r": 2}, topic="raw", partition=0, offset=120)
    ledger.add(twice, committed)
    ledger.add(twice, committed)
    # Before the commit, another topic, a partition this member does not own: not learnt.
    ledger.add(dead_letter("s", "r", {"r": 1}, topic="raw", partition=0, offset=99), committed)
    ledger.add(dead_letter("s", "r", {"r": 1}, topic="agg", partition=0, offset=120), committed)
    ledger.add(dead_letter("s", "r", {"r": 1}, topic="raw", partition=3, offset=120), committed)
    assert sum(ledger.sent.values()) == 2
    assert not ledger.take(other)  # same origin, another payload: new
    assert ledger.take(twice) and ledger.take(twice)
    assert not ledger.take(twice)  # a third one is new
    assert ledger.skipped == 2


def test_a_revoked_partition_is_forgotten() -> None:
    ledger = Ledger("raw")
    dl = dead_letter("s", "r", b"x", topic="raw", partition=1, offset=60)
    ledger.add(dl, {1: 50})
    ledger.forget([1])
    assert not ledger.take(dl)


class FlakyConsumer:
    """Watermarks that fail ``failures`` times (a partition between leaders), then answer."""

    def __init__(self, failures: int) -> None:
        self.failures, self.high = failures, 5

    def list_topics(self, topic: str, timeout: float) -> Any:
        part = SimpleNamespace(error=None, partitions={0: None, 1: None})
        return SimpleNamespace(topics={topic: part})

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return 0, self.high


def test_a_mark_is_waited_for_once_and_later_an_earlier_one_stands(monkeypatch: Any) -> None:
    monkeypatch.setattr("pipeline.stages.deadletters.time.sleep", lambda s: None)
    c = FlakyConsumer(failures=3)
    marks = Marks(c, "dlq")  # type: ignore[arg-type]
    assert decode_mark(marks.take(0)) == {0: 5, 1: 5}  # the first mark: tried until it comes
    c.failures, c.high = 1, 9
    assert decode_mark(marks.take(1)) == {0: 5, 1: 5}  # a dead letter sent since, the broker busy
    assert decode_mark(marks.take(1)) == {0: 9, 1: 9}  # asked again at the next commit


def test_patiently_gives_up_after_its_time(monkeypatch: Any) -> None:
    monkeypatch.setattr("pipeline.stages.deadletters.time.sleep", lambda s: None)
    c = FlakyConsumer(failures=10**9)
    with pytest.raises(KafkaException):
        patiently(lambda: c.get_watermark_offsets(None, 1, False), timeout=0.05)
