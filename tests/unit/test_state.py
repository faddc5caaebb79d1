"""PartitionedStore: the loop stage's state, logged per input partition and restored from its log."""

from __future__ import annotations

import random

import pytest

from pipeline.stages.state import PartitionedStore
from tests.unit.test_loops import Driver, differences, loop_def, messages, reference_kpis, scenario_samples


def test_writes_are_logged_in_order_under_the_partition_being_processed():
    s = PartitionedStore()
    s.partition = 0
    s["a"] = {"x": 1}
    s.partition = 1
    s["b"] = [1, 2]
    s["a"] = {"x": 2}  # a key moves with the partition that last wrote it
    del s["b"]
    assert s.take_log(0) == [(b"a", b'{"x":1}')]
    assert s.take_log(1) == [(b"b", b"[1,2]"), (b"a", b'{"x":2}'), (b"b", None)]
    assert s.take_log(1) == []  # taken once
    assert dict(s) == {"a": {"x": 2}}


def test_load_applies_tombstones_and_drop_forgets_one_partition_only():
    s = PartitionedStore()
    assert s.load(3, [(b"k", b"1"), (b"gone", b"2"), (b"k", b"3"), (b"gone", None), (None, b"x")]) == 1
    assert s.load(4, [(b"other", b'"v"')]) == 1
    assert dict(s) == {"k": 3, "other": "v"}
    s.partition = 3
    s["k"] = 4
    s.drop(3)
    assert dict(s) == {"other": "v"} and s.take_log(3) == []


@pytest.mark.parametrize("seed", range(4))
def test_a_checkpoint_cut_short_then_a_replay_gives_the_reference_records(seed):
    """The worker dies while a checkpoint is being produced: a prefix of the log is in the state topic."""
    d = loop_def()
    samples, _ = scenario_samples("sticky_valve", 1300, seed=seed)
    msgs = messages(samples, 23, shuffle_ms=3_000, seed=seed)
    expected = reference_kpis(d, samples)
    rng = random.Random(seed)
    for _ in range(8):
        run = Driver(d, PartitionedStore())
        committed_log: list[tuple[bytes, bytes | None]] = []
        committed = 0
        crash = rng.randrange(5, len(msgs))
        for off in range(crash):
            run.feed(msgs[: off + 1], start=off)
            if rng.random() < 0.2:  # a checkpoint: the log so far is durable, input committed through off
                committed_log += run.store.take_log(0)  # type: ignore[attr-defined]
                committed = off + 1
        pending = run.store.take_log(0)  # type: ignore[attr-defined]
        durable = committed_log + pending[: rng.randint(0, len(pending))]  # the crash cuts this checkpoint
        restored = PartitionedStore()
        restored.load(0, durable)
        again = Driver(d, restored)
        again.emitted = list(run.emitted)  # what reached loops.kpi before the crash stays there
        again.feed(msgs, start=committed)
        again.flush(10_000)
        for rec in again.emitted:
            ws = rec["window_start"]
            assert differences({ws: rec["kpis"]}, {ws: expected[ws]}) == []
        assert set(again.results()) == set(expected)
