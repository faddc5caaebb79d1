"""Loop KPIs end to end on the real services: simulated loops, MQTT, connector, Kafka, worker, PostgreSQL.

Six scenario loops (connectors/sim/loops.py) publish PV/SP/OP/MODE with explicit timestamps through a real
MQTT client for 2,445 s of event time at 60x the wall clock (about 41 s), with 2-minute KPI windows and a
30-minute analysis horizon. The worker is stopped with SIGTERM while windows are open and started again.
Then ``kpi_results`` must show the verdicts the simulations were built for (oscillation period, stiction,
saturation, service factor, a clean well-tuned loop), and every row of every window must equal the
independent reference of tests/unit/test_loops_reference.py computed from exactly what was published.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import yaml

from connectors.sim.loop_publisher import LoopStep, connect, loop_steps, publish_steps, simulated_loops
from connectors.sim.loops import scenario
from pipeline.stages.loops.engine import TAGS, LoopDef
from pipeline.topology import load, validate_data
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import deploy_cli
from tests.e2e.test_mqtt_to_postgres import stop as stop_processes
from tests.unit.test_loops_reference import differences, reference_kpis

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event time, unrelated to the wall clock
W_MS = 120_000
RUN_MS = 2_445_000  # 20 windows closed by the watermark, then a partial one closed by the idle flush
SPEED = 60.0
# (loop id, scenario, offset s, Ti, dead time); offsets put the saturating load and mode changes in the run.
LOOPS = [
    ("well", "well_tuned", 0, "20s", "4s"),
    ("aggr", "aggressive", 0, "20s", "4s"),
    ("sticky", "sticky_valve", 0, "10s", "2s"),
    ("sat", "saturated", 1500, "20s", "4s"),
    ("manual", "mostly_manual", 3900, "20s", "4s"),
    ("ext", "external_disturbance", 0, "10s", "2s"),
]
N_WINDOWS = RUN_MS // W_MS + 1


def topology(ns: dict[str, str]) -> dict[str, Any]:
    root = ns["mqtt_root"]
    return {
        "name": f"loops{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "sources": [
            {
                "id": "mqtt-loops",
                "type": "mqtt",
                "url": ns["PLANTSTREAM_MQTT_URL"],
                "client_id": f"loops-{ns['tag']}",
                # One JSON object per loop sample: {"ts": ..., "pv": ..., "sp": ..., "op": ..., "mode": ...}
                "topics": [{"filter": f"{root}/+/+", "template": f"{root}/{{site}}/{{device}}"}],
            }
        ],
        "aggregates": {"grace": "30s", "idle_timeout": "15s"},
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": ns["PLANTSTREAM_PG_DSN"],
                "schema": ns["schema"],
                "topics": ["kpi_results"],
                "batch_delay": "200ms",
            }
        ],
        "loops": [
            {
                "id": lid,
                **{tag: f"plant/{lid}/{tag}" for tag in TAGS},
                "pv_lo": 0,
                "pv_hi": 100,
                "ti": ti,
                "dead_time": theta,
                "ts": "1s",
                "window": "2m",
                "horizon": "30m",
                "grace": "30s",
                "idle_timeout": "15s",
            }
            for lid, _, _, ti, theta in LOOPS
        ],
        "simulate": {
            "source": "mqtt-loops",
            "scenarios": [],
            "speed": SPEED,
            "loops": [{"loop": lid, "scenario": sc, "offset": off} for lid, sc, off, _, _ in LOOPS],
        },
    }


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def kpi_rows(dsn: str, schema: str) -> dict[str, dict[int, dict[str, dict[str, Any]]]]:
    """loop -> window start (epoch ms) -> kpi -> row."""
    out: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                "SELECT loop_id, (extract(epoch FROM window_start) * 1000)::bigint, kpi, value, status, "
                f'coverage, horizon_s, reason, extras, closed_by FROM "{schema}".kpi_results'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return out
    for loop, ws, kpi, value, status, cov, hs, reason, extras, closed_by in rows:
        out.setdefault(loop, {}).setdefault(int(ws), {})[kpi] = {
            "value": value,
            "status": status,
            "coverage": cov,
            "horizon_s": hs,
            "reason": reason,
            "extras": extras,
            "closed_by": closed_by,
        }
    return out


def n_windows(dsn: str, schema: str) -> int:
    return sum(len(w) for w in kpi_rows(dsn, schema).values())


def window_truth(steps: list[LoopStep]) -> dict[str, dict[int, dict[str, float]]]:
    """Per loop and window: the simulation's time at the OP high limit and time in AUTO."""
    acc: dict[str, dict[int, list[int]]] = {}
    for s in steps:
        ws = s.ts - s.ts % W_MS
        a = acc.setdefault(s.loop, {}).setdefault(ws, [0, 0, 0])
        a[0] += 1
        a[1] += s.sample.at_op_hi
        a[2] += s.sample.mode == "AUTO"
    return {
        lp: {ws: {"hi": 100.0 * a[1] / a[0], "auto": 100.0 * a[2] / a[0]} for ws, a in w.items()}
        for lp, w in acc.items()
    }


def test_loop_kpis_end_to_end_with_a_worker_restart(namespace, tmp_path):
    ns = namespace
    data = topology(ns)
    topo = validate_data(data)
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(data))
    deploy_cli(topo_file)

    # Exactly what will be published (the simulations are deterministic), for the truth and the reference.
    steps = list(loop_steps(simulated_loops(topo, T0), until_ms=T0 + RUN_MS))
    assert len(steps) == len(LOOPS) * RUN_MS // 1000
    defs = {lp.id: LoopDef.from_topology(lp) for lp in topo.loops}
    samples: dict[str, list[list[Any]]] = {lid: [] for lid in defs}
    for s in steps:
        for sid, ts, value in s.readings:
            samples[s.loop].append([TAGS.index(sid.rsplit("/", 1)[1]), ts, value, 1])
    expected = {lid: reference_kpis(defs[lid], samples[lid]) for lid in defs}
    assert all(len(w) == N_WINDOWS for w in expected.values())
    truth = window_truth(steps)

    dsn = ns["PLANTSTREAM_PG_DSN"]
    worker_args = ["worker", str(topo_file), "--app-id", f"loops-{ns['tag']}", "--loglevel", "info"]
    connector = spawn(["connect", str(topo_file)], tmp_path / "connect.log")
    worker = spawn(worker_args, tmp_path / "worker1.log")
    procs = [connector, worker]
    stop = threading.Event()
    client: mqtt.Client | None = None
    publisher: threading.Thread | None = None
    try:
        wait_for(lambda: "subscribed to" in (tmp_path / "connect.log").read_text(), 60, "the connector")
        client = connect(ns["PLANTSTREAM_MQTT_URL"], f"pub-{ns['tag']}")
        publisher = threading.Thread(
            target=publish_steps, args=(client, iter(steps), T0, SPEED, stop), daemon=True
        )
        publisher.start()
        # Mid-run, with windows open: stop the worker gracefully while the publishing goes on.
        wait_for(lambda: n_windows(dsn, ns["schema"]) >= 4 * len(LOOPS), 120, "the first KPI windows")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(90) is not None
        before = n_windows(dsn, ns["schema"])
        worker = spawn(worker_args, tmp_path / "worker2.log")
        procs.append(worker)
        publisher.join(120)
        assert not publisher.is_alive()
        total = N_WINDOWS * len(LOOPS)
        assert before < total
        wait_for(lambda: n_windows(dsn, ns["schema"]) >= total, 150, f"{total} loop windows in kpi_results")
        log2 = (tmp_path / "worker2.log").read_text()
        restored = [int(n) for n in re.findall(r"state restored: .* (\d+) sample\(s\) in", log2)]
        assert restored and max(restored) > 0, "the restart should find open windows with samples"
        rows = kpi_rows(dsn, ns["schema"])
    finally:
        stop.set()
        if client is not None:
            client.loop_stop()
            client.disconnect()
        stop_processes(procs)

    assert set(rows) == set(defs)
    for lid in defs:
        assert len(rows[lid]) == N_WINDOWS
        closed = [rows[lid][ws]["iae"]["closed_by"] for ws in sorted(rows[lid])]
        assert closed == ["watermark"] * (N_WINDOWS - 1) + ["idle"]
    full = [T0 + i * W_MS for i in range(N_WINDOWS - 1)]  # the last window holds 45 s: insufficient data

    def series(lid: str, kpi: str) -> list[dict[str, Any]]:
        return [rows[lid][ws][kpi] for ws in full]

    # The over-tuned loop and the external disturbance: flagged, at the simulated period within 5 %.
    aggr_period = scenario("aggressive").spec.facts["oscillation_period_s"]
    for lid, period in (("aggr", aggr_period), ("ext", 120.0)):
        tail = series(lid, "osc_period")[-10:]
        assert all(r["status"] == "ok" for r in tail), tail
        assert all(abs(r["value"] - period) <= 0.05 * period for r in tail), [r["value"] for r in tail]
        assert all(r["value"] == 1.0 for r in series(lid, "osc_flag")[-10:])
    assert all(r["value"] != 1.0 for r in series("ext", "stiction"))  # not the valve's fault
    assert all(r["value"] == 0.0 for r in series("aggr", "stiction")[-10:])  # tuning, not the valve

    # The sticky valve: the stiction verdict once the horizon holds enough cycles (period ~150 s).
    sticky = series("sticky", "stiction")
    assert all(r["status"] == "ok" and r["value"] == 1.0 for r in sticky[-10:]), [r["value"] for r in sticky]
    assert all(r["extras"]["ccf_verdict"] == "stiction" for r in sticky[-10:])

    # The saturated loop: % of the window at the OP limit, as simulated, within 2 points.
    sat = rows["sat"]
    hi_windows = [ws for ws in full if truth["sat"][ws]["hi"] > 50]
    assert len(hi_windows) >= 10 and any(0 < truth["sat"][ws]["hi"] < 90 for ws in full)
    for ws in full:
        assert sat[ws]["sat_hi"]["status"] == "ok"
        assert abs(sat[ws]["sat_hi"]["value"] - truth["sat"][ws]["hi"]) <= 2.0, ws

    # The manual loop: service factor = the simulated time in AUTO, in every window.
    man = rows["manual"]
    modes = {round(truth["manual"][ws]["auto"]) for ws in full}
    assert {0, 100} <= modes and any(0 < m < 100 for m in modes)
    for ws in full:
        assert man[ws]["service_factor"]["value"] == pytest.approx(truth["manual"][ws]["auto"], abs=1e-9), ws

    # The well-tuned loop: flagged for nothing.
    well = {ws: rows["well"][ws] for ws in full}
    for ws, k in well.items():
        assert (
            k["service_factor"]["value"] == 100.0
            and k["sat_hi"]["value"] == 0.0
            and k["sat_lo"]["value"] == 0.0
        )
        assert k["osc_flag"]["value"] != 1.0 and k["osc_hagglund"]["value"] != 1.0, ws
        assert k["stiction"]["value"] is None and k["stiction"]["status"] in (
            "not_applicable",
            "insufficient_data",
        )
        assert k["harris"]["status"] != "ok" or k["harris"]["extras"]["rating"] == "ok", ws
    assert sum(k["osc_flag"]["status"] == "ok" for k in well.values()) >= 15

    print(  # the figures, for the record (pytest -s)
        f"\noscillation period aggr {[round(r['value'], 2) for r in series('aggr', 'osc_period')[-10:]]} "
        f"(simulated {aggr_period:.2f} s); "
        f"ext {[round(r['value'], 2) for r in series('ext', 'osc_period')[-10:]]} "
        f"(simulated 120 s); stiction verdicts sticky {[r['value'] for r in sticky]}; sat_hi - simulated max "
        f"{max(abs(sat[ws]['sat_hi']['value'] - truth['sat'][ws]['hi']) for ws in full):.3f} points; "
        f"service factor - time in AUTO max "
        f"{max(abs(man[ws]['service_factor']['value'] - truth['manual'][ws]['auto']) for ws in full):.2e}; "
        f"restart found {max(restored)} samples in open windows"
    )

    # Through the restart, every row of every window equals the offline reference.
    problems = []
    for lid in defs:
        got = {
            ws: {kpi: {f: r[f] for f in r if f != "closed_by"} for kpi, r in k.items()}
            for ws, k in rows[lid].items()
        }
        problems += [f"{lid}: {p}" for p in differences(got, expected[lid])]
    assert problems == [], "\n".join(problems[:30])


def test_plantstream_simulate_publishes_the_shipped_loops_topology(namespace, tmp_path):
    """``plantstream simulate`` on topologies/loops.yaml publishes every loop tag with explicit timestamps.

    The file is used as shipped except for its MQTT topic root and name, so that nothing subscribed to the
    demo's ``plant/#`` on the shared broker sees the test.
    """
    root = namespace["mqtt_root"]
    text = (ROOT / "topologies" / "loops.yaml").read_text()
    assert text.count("plant/+/+/+") == 1 and text.count("plant/{site}/{device}/{point}") == 1
    text = text.replace("plant/+/+/+", f"{root}/+/+/+").replace("plant/{site}", f"{root}/{{site}}")
    text = text.replace("name: loops\n", f"name: loops{namespace['tag']}\n")
    topo_file = tmp_path / "loops.yaml"
    topo_file.write_text(text)
    topo = load(topo_file)
    wanted = {f"{root}/{s}" for lp in topo.loops for s in lp.series().values()}
    got: dict[str, list[dict[str, Any]]] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            got.setdefault(msg.topic, []).append(json.loads(msg.payload))

    sub = connect(namespace["PLANTSTREAM_MQTT_URL"], f"sub-{namespace['tag']}")
    sub.on_message = on_message
    sub.subscribe(f"{root}/+/+/+", qos=1)
    started = time.time()
    try:
        time.sleep(0.5)  # let the subscription settle before the simulator starts
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "simulate", str(topo_file), "--duration", "3"],
            capture_output=True,
            timeout=90,
            env=dict(os.environ),
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        wait_for(lambda: wanted <= set(got), 10, "every loop tag on MQTT")
    finally:
        sub.loop_stop()
        sub.disconnect()
    for topic in wanted:
        msgs = got[topic]
        ts = [m["ts"] for m in msgs]
        assert ts == sorted(ts) and len(set(ts)) == len(ts) and all(t % 1000 == 0 for t in ts)
        # speed 10: about ten samples per second, from the moment the simulator started
        assert len(msgs) >= 15 and started * 1000 - 2000 <= ts[0] <= started * 1000 + 30_000
    modes = {m["value"] for m in got[f"{root}/unit4/lic401/mode"]}
    assert modes <= {0.0, 1.0}
