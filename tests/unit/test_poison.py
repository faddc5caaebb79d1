"""No input, whatever its bytes, makes a stage raise: the aggregation step, the loop step and the sinks'
decoding and row mapping turn anything at all into dead letters or rows (fakes stand in for Kafka)."""

from __future__ import annotations

import json
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.common.sink import Entry
from connectors.timescale.sink import to_records
from pipeline.stages.aggregation import Aggregation
from pipeline.stages.loops.stage import LoopStats, LoopStep
from pipeline.stages.sinks import TABLES
from pipeline.topology import validate_data
from pipeline.worker import Counters

T0 = 1_767_225_600_000
MAX = sys.float_info.max


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.dead: list[str] = []

    def produce(self, topic: str, key: bytes, value: Any, ts_ms: Any = None, partition: Any = None) -> None:
        self.sent.append((topic, value))

    def dead_letter(self, dlq_topic: str, source: str, reason: str, payload: Any, **kw: Any) -> None:
        assert isinstance(reason, str) and reason
        self.dead.append(reason)

    def flush_sync(self, timeout: float = 60.0) -> None:
        pass


class FakeStage:
    def __init__(self) -> None:
        self.outbox = FakeOutbox()
        self.position: dict[int, int] = {}
        self.last_data: dict[int, float] = {}
        self.owned = {0}
        self.blind = False
        self.broker_back_at = 0.0

    def behind(self, p: int) -> bool:
        return False

    def deliver(self) -> None:
        self.outbox.flush_sync()


class Msg:
    def __init__(self, offset: int, value: bytes | None, key: bytes | None = b"s/d") -> None:
        self._o, self._v, self._k = offset, value, key

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def error(self) -> None:
        return None


TOPO = validate_data(
    {
        "name": "poison",
        "loops": [
            {
                "id": "L",
                "pv": "s/d/pv",
                "sp": "s/d/sp",
                "op": "s/d/op",
                "pv_lo": 0,
                "pv_hi": 100,
                "ti": 10,
                "ts": 1,
                "window": "1m",
            }
        ],
    }
)

floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([MAX, -MAX, sys.float_info.min, -0.0, 5e-324, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), floats, st.text(max_size=8))
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
reading = st.fixed_dictionaries(
    {},
    optional={
        "point": st.one_of(st.sampled_from(["pv", "sp", "op", "x"]), anything),
        "ts": st.one_of(st.integers(T0, T0 + 600_000), anything),
        "value": st.one_of(floats, anything),
        "quality": st.one_of(st.sampled_from(["good", "bad", "uncertain"]), anything),
        "unit": anything,
        "status": anything,
    },
)
batch = st.fixed_dictionaries(
    {"site": st.one_of(st.just("s"), anything), "device": st.one_of(st.just("d"), anything)},
    optional={
        "v": st.one_of(st.just(1), anything),
        "source": anything,
        "readings": st.lists(reading, max_size=6),
    },
)


def _column(items: Any) -> Any:
    return st.one_of(st.lists(items, min_size=3, max_size=3), anything)  # mostly as long as points


batch_v2 = st.fixed_dictionaries(
    {
        "v": st.just(2),
        "site": st.one_of(st.just("s"), anything),
        "device": st.one_of(st.just("d"), anything),
        "points": st.one_of(
            st.lists(st.sampled_from(["pv", "sp", "op", "x"]), min_size=3, max_size=3), anything
        ),
        "ts": st.one_of(st.integers(T0, T0 + 600_000), _column(st.integers(T0, T0 + 600_000)), anything),
        "values": _column(st.one_of(floats, scalars)),
    },
    optional={
        "source": anything,
        "quality": _column(st.one_of(st.sampled_from(["good", "bad", "uncertain"]), anything)),
        "units": _column(st.one_of(st.none(), st.text(max_size=3), anything)),
        "status": _column(anything),
    },
)


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


payloads = st.one_of(st.binary(max_size=64), anything.map(encode), batch.map(encode), batch_v2.map(encode))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, min_size=1, max_size=12))
def test_the_aggregation_step_never_raises(values):
    counters = Counters()
    step = Aggregation(TOPO, "app", counters)
    step.stage = FakeStage()  # type: ignore[assignment]
    step.process([Msg(i, v) for i, v in enumerate(values)] + [Msg(len(values), None, None)])
    step.tick(1e9)  # idle flush of whatever was applied
    step.durable([0])


loop_bodies = st.one_of(
    st.binary(max_size=32),
    anything.map(encode),
    st.fixed_dictionaries(
        {"loop": st.one_of(st.just("L"), anything), "s": st.one_of(st.lists(anything, max_size=5), anything)},
        optional={"src": anything},
    ).map(encode),
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(T0, T0 + 300_000), floats, st.sampled_from([0, 1])),
        max_size=20,
    ).map(lambda s: encode({"loop": "L", "src": [0, 1], "s": [list(x) for x in s]})),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(loop_bodies, min_size=1, max_size=10))
def test_the_loop_step_never_raises(values):
    step = LoopStep(TOPO, TOPO.loops, "app", Counters(), LoopStats())
    step.stage = FakeStage()  # type: ignore[assignment]
    step.process([Msg(i, v, b"L") for i, v in enumerate(values)])
    step.tick(1e9)
    step.durable([0])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(TABLES)), st.lists(payloads, min_size=1, max_size=8))
def test_sink_decoding_and_row_mapping_never_raise(table, values):
    decode = TABLES[table][1]
    entries = []
    for i, v in enumerate(values):
        try:
            record = decode(v)
        except Exception:
            continue  # the sink stage dead-letters it (pipeline/stages/sinks.py)
        if record is not None:
            entries.append(Entry(0, i, record, v))
    records, refused = to_records(table, entries)
    assert len(
        {(r.partition, r.offset) for r in records} | {(r.partition, r.offset) for r in refused}
    ) <= len(entries)
    for r in records:
        for value in r.row:
            assert value is None or isinstance(value, str | int | float) or hasattr(value, "tzinfo")
