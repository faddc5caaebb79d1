"""Line protocol for the InfluxDB sink: escaping, nulls left out, types strict."""

from __future__ import annotations

import pytest

from connectors.influx.lines import aggregate_lines, kpi_lines, reading_lines, tag
from pipeline.topology import TopologyError, validate_data

AGG = {
    "series": "s/d/p",
    "site": "s",
    "device": "d",
    "point": "p",
    "window_start": 1_767_225_600_000,
    "window_end": 1_767_225_660_000,
    "count": 3,
    "good_count": 2,
    "min": 1.0,
    "max": 2.0,
    "mean": 1.5,
    "sum": 3.0,
    "first": 1.0,
    "last": 2.0,
    "stddev": None,
}


def test_an_aggregate_is_one_point_without_its_nulls():
    (line,) = aggregate_lines({**AGG, "unit": "°C"})
    assert line == (
        "agg_1m,site=s,device=d,point=p,unit=°C count=3i,good_count=2i,min=1.0,max=2.0,mean=1.5,sum=3.0,"
        "first=1.0,last=2.0 1767225600000"
    )


def test_tags_are_escaped():
    assert tag("a b,c=d") == r"a\ b\,c\=d"
    assert tag("x\\") == "x\\ "
    with pytest.raises(TypeError):
        tag("")
    (line,) = reading_lines(
        {
            "site": "plant 1",
            "device": "d",
            "readings": [{"point": "t,1", "ts": 5, "value": 1, "quality": "good"}],
        }
    )
    assert line == r'readings,site=plant\ 1,device=d,point=t\,1 value=1.0,quality="good" 5'


@pytest.mark.parametrize(
    "bad", [{"count": 1.5}, {"min": "x"}, {"max": float("inf")}, {"window_start": "now"}]
)
def test_wrong_types_raise(bad):
    with pytest.raises(TypeError):
        aggregate_lines({**AGG, **bad})


def test_the_topology_accepts_an_influx_sink_and_names_mistakes():
    topo = validate_data(
        {"name": "t", "sinks": [{"id": "ifx", "type": "influx", "url": "http://127.0.0.1:8086"}]}
    )
    assert topo.sinks[0].database == "plantstream"
    with pytest.raises(TopologyError) as e:
        validate_data(
            {"name": "t", "sinks": [{"id": "ifx", "type": "influx", "url": "influx:8086", "nope": 1}]}
        )
    problems = "\n".join(e.value.problems)
    assert "sinks[0].url" in problems and "sinks[0].nope: unknown key" in problems


def test_the_api_decides_which_fields_belong():
    v2 = {"id": "i", "type": "influx", "api": "v2", "org": "-", "bucket": "db/rp", "token": "u:p"}
    assert validate_data({"name": "t", "sinks": [v2]}).sinks[0].bucket == "db/rp"
    with pytest.raises(TopologyError) as e:
        validate_data({"name": "t", "sinks": [{**v2, "database": "x"}]})
    assert "database belong(s) to api v1" in "\n".join(e.value.problems)
    with pytest.raises(TopologyError) as e:
        validate_data({"name": "t", "sinks": [{"id": "i", "type": "influx", "api": "v2", "org": "-"}]})
    assert "api: v2 needs bucket, token" in "\n".join(e.value.problems)
    with pytest.raises(TopologyError) as e:
        validate_data({"name": "t", "sinks": [{"id": "i", "type": "influx", "token": "x"}]})
    assert "token belong(s) to api v2" in "\n".join(e.value.problems)


def test_kpi_lines_are_long_format_with_loop_and_kpi_tags():
    rec = {
        "loop": "FIC 101",
        "window_start": 60_000,
        "window_end": 120_000,
        "samples": 60,
        "closed_by": "watermark",
        "kpis": {
            "iae": {"value": 1.5, "status": "ok", "coverage": 1.0, "horizon_s": 60, "reason": None},
            "harris": {
                "value": None,
                "status": "insufficient_data",
                "coverage": 0.1,
                "horizon_s": None,
                "reason": 'too "few"',
            },
        },
    }
    iae, harris = kpi_lines(rec)
    assert iae == (
        r'kpi_results,loop=FIC\ 101,kpi=iae status="ok",value=1.5,coverage=1.0,horizon_s=60.0,'
        'samples=60i,window_end=120000i,closed_by="watermark" 60000'
    )
    assert "value=" not in harris and r'reason="too \"few\""' in harris


def test_hourly_combination_equals_pandas_over_the_readings():
    import random

    import pandas as pd

    from connectors.influx.rollup import combine
    from pipeline.stages.windows import MinuteAggregator

    rng = random.Random(3)
    t0 = 1_764_669_600_000
    raw = [
        (t0 + i * 5000 + rng.randint(0, 999), rng.gauss(20, 4), "bad" if rng.random() < 0.1 else "good")
        for i in range(720)
    ]
    agg = MinuteAggregator(grace_ms=0)
    closes = []
    for off, (ts, v, q) in enumerate(raw):
        batch = {
            "v": 1,
            "source": "t",
            "site": "s",
            "device": "d",
            "readings": [{"point": "p", "ts": ts, "value": v, "quality": q}],
        }
        agg.apply(0, off, batch)
        due = agg.due(0)
        closes += due
        agg.finish(0, off, due)
    closes += agg.due(0, flush_all=True)
    minutes = [c.aggregate for c in closes]
    assert len(minutes) == 60
    h = combine(minutes)
    good = pd.Series([v for _, v, q in raw if q == "good"])
    assert h["count"] == len(raw) and h["good_count"] == len(good)
    assert h["mean"] == pytest.approx(good.mean(), rel=1e-12)
    assert h["stddev"] == pytest.approx(good.std(ddof=1), rel=1e-9)


def test_an_hour_combined_minute_by_minute_equals_the_hour_read_back():
    import random

    from connectors.influx.rollup import combine, hour_from

    rng = random.Random(8)
    t0 = 1_764_669_600_000
    minutes = []
    for i in range(60):
        g = rng.choice([0, 1, 2, 5, 30])
        mean = rng.gauss(1000, 3) if g else None
        m = {
            "site": "s",
            "device": "d",
            "point": "p",
            "window_start": t0 + i * 60_000,
            "count": g + rng.randint(0, 2),
            "good_count": g,
            "mean": mean,
            "sum": mean * g if g else None,
            "min": mean - 1 if g else None,
            "max": mean + 1 if g else None,
            "first": mean - 0.5 if g else None,
            "last": mean + 0.5 if g else None,
            "stddev": abs(rng.gauss(2, 1)) if g >= 2 else None,
        }
        minutes.append(m)
    rng.shuffle(minutes)
    h = hour_from(minutes[:1])
    for m in minutes[1:]:
        assert h.add(m)
    assert not h.add(minutes[7])  # a minute seen before: the writer reads the hour back instead
    want, got = combine(minutes), h.fields()
    for f in ("count", "good_count", "min", "max", "first", "last"):
        assert got[f] == want[f], f
    for f in ("mean", "sum", "stddev"):
        assert got[f] == pytest.approx(want[f], rel=1e-9), f


def test_alarm_event_lines():
    from connectors.influx.lines import alarm_lines
    from pipeline.stages.alerts.config import AlertRule
    from pipeline.stages.alerts.engine import Engine

    r = AlertRule.model_validate(
        {"id": "hot", "match": "s/d/p", "levels": [{"severity": "high", "above": 1}]}
    )
    e = Engine([r])
    (raise_,) = e.sample(r, "s/d/p", 5000, 2.0)
    assert alarm_lines(raise_) == [
        'alarm_events,rule=hot,source=s/d/p,transition=raise id="hot/s/d/p#1",seq=1i,state="unack",'
        'active=true,notify=true,message="hot: s/d/p 2  (high, limit 1)",severity="high",value=2.0,'
        "limit=1.0 5000"
    ]
    (ack,) = e.command({"id": "c", "instance": "hot/s/d/p", "action": "ack", "by": "op", "at": 9000})
    assert alarm_lines(ack)[0].endswith('by="op" 9000')
