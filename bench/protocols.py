"""Bench scenarios for the field protocols, on real sockets against the simulated devices.

* ``opcua``: the simulated plant changes ``--opcua-values`` variables ``--opcua-rate`` times a second; the
  OPC UA source subscribes to all of them (publishing interval 100 ms) and produces ReadingBatches to Kafka.
  Measures value changes/s acknowledged by Kafka, next to the rate the server offered.
* ``bacnet``: a simulated air-handling unit with ``--bacnet-points`` points, polled back to back (interval 0)
  with ReadPropertyMultiple into Kafka. Measures points/s polled and acknowledged by Kafka.
* ``bacnet-rp``: the same unit rejecting ReadPropertyMultiple, so every value costs two ReadProperty requests.
* ``mqtt-rate``: the MQTT connector alone (``plantstream connect`` in a child process) moving single-value
  QoS 1 messages from Mosquitto into Kafka, every message acknowledged after Kafka has it
  (``bench/mqtt_rate.py``): published while it runs (``--mqtt-mode live``) or queued while it was offline
  (``backlog``). Measures messages/s, connector CPU per million messages and RSS, and checks that Mosquitto
  redelivers nothing after the connector stopped.

The source runs in this process (its CPU time is the process's, librdkafka's threads included); the simulated
device runs in a child process. Both share the machine, so on a small machine the figures are lower bounds of
what the connector does against a real device.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.mqtt_rate import add_arguments as add_mqtt_rate_arguments
from bench.mqtt_rate import run_mqtt_rate
from connectors.common.producer import TelemetryProducer
from connectors.sim import launch
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data

WARMUP_S = 5.0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured per protocol run")
    ap.add_argument("--opcua-values", type=int, default=2000, help="changing OPC UA variables")
    ap.add_argument("--opcua-rate", type=float, default=10.0, help="server updates per second")
    ap.add_argument("--bacnet-points", type=int, default=500, help="points of the simulated AHU")
    add_mqtt_rate_arguments(ap)


def _topology(env: dict[str, str], source: dict[str, Any]) -> Topology:
    tag = uuid.uuid4().hex[:6]
    topo = validate_data(
        {
            "name": f"bench{tag}",
            "prefix": f"b{tag}.",
            "broker": {"bootstrap": env["PLANTSTREAM_KAFKA"], "partitions": 4},
            "sources": [source],
        }
    )
    ensure_topics(topo, say=lambda _m: None)
    return topo


def _cleanup(topo: Topology) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": topo.broker.bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(topo.prefix)]
    for fut in admin.delete_topics(names).values() if names else []:
        with contextlib.suppress(Exception):
            fut.result(30)


def _measure(runner: Any, producer: TelemetryProducer, window: float) -> tuple[float, float, int]:
    """(readings acknowledged per second, CPU seconds per million readings, readings) over ``window``."""
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()
    try:
        time.sleep(WARMUP_S)  # connect, browse/discover, first publish: not part of the steady state
        n0, c0, t0 = producer.sent_readings, time.process_time(), time.monotonic()
        time.sleep(window)
        n1, c1, t1 = producer.sent_readings, time.process_time(), time.monotonic()
    finally:
        stop.set()
        th.join(60)
    n = n1 - n0
    if n <= 0:
        raise RuntimeError(f"no readings reached Kafka in {window:.0f}s (source stats: {runner.stats})")
    return n / (t1 - t0), (c1 - c0) / n * 1e6, n


def run_opcua(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    from connectors.opcua.source import OpcUaSourceRunner

    loops = max(1, args.opcua_values * 3 // 10)  # PV and OP of each loop change every update,
    tanks = max(1, (args.opcua_values - 2 * loops) // 4)  # and the four values of each tank
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/bench"
    plant = launch.start_opcua_plant(
        endpoint,
        args=["--loops", str(loops), "--tanks", str(tanks), "--rate", str(args.opcua_rate)],
        log=logs / "opcua-plant.log",
    )
    topo = _topology(
        env,
        {
            "id": "bench-opcua",
            "type": "opcua",
            "endpoint": endpoint,
            "site": "bench",
            "publishing_interval": "100ms",
            "defaults": {"sampling_interval": "100ms", "queue_size": 50},
            "browse": [
                {"root": "nsu=urn:plantstream:sim:plant;s=Plant/Loops"},
                {"root": "nsu=urn:plantstream:sim:plant;s=Plant/Tanks"},
            ],
        },
    )
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    runner = OpcUaSourceRunner(topo.sources[0], producer)  # type: ignore[arg-type]
    try:
        rate, cpu, n = _measure(runner, producer, args.window)
    finally:
        launch.stop(plant)
        _cleanup(topo)
    offered = (2 * loops + 4 * tanks) * args.opcua_rate
    return {
        "scenario": "opcua",
        "readings": n,
        "seconds": args.window,
        "readings_per_s": rate,
        "value_changes_per_s": rate,
        "offered_changes_per_s": offered,
        "monitored": runner.stats.monitored,
        "connector_cpu_s_per_million": cpu,
        "worker_cpu_s_per_million": float("nan"),
    }


def _run_bacnet(args: argparse.Namespace, env: dict[str, str], logs: Path, rpm: bool) -> dict[str, Any]:
    from connectors.bacnet.source import BacnetSourceRunner

    device_port = launch.free_udp_port("127.0.0.2")
    client_port = launch.free_udp_port("127.0.0.3")
    zones = max(1, args.bacnet_points - 28)
    ahu = launch.start_bacnet_ahu(
        f"127.0.0.2/8:{device_port}",
        1001,
        args=["--zones", str(zones), *([] if rpm else ["--no-rpm"])],
        log=logs / "bacnet-ahu.log",
    )
    topo = _topology(
        env,
        {
            "id": "bench-bacnet",
            "type": "bacnet",
            "local_address": f"127.0.0.3/24:{client_port}",
            "site": "bench",
            "defaults": {"interval": "0s", "max_concurrent": 4},
            "devices": [{"instance": 1001, "address": f"127.0.0.2:{device_port}", "name": "ahu"}],
        },
    )
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    runner = BacnetSourceRunner(topo.sources[0], producer)  # type: ignore[arg-type]
    try:
        rate, cpu, n = _measure(runner, producer, args.window)
    finally:
        launch.stop(ahu)
        _cleanup(topo)
    s = runner.stats
    return {
        "scenario": "bacnet" if rpm else "bacnet-rp",
        "readings": n,
        "seconds": args.window,
        "readings_per_s": rate,
        "points_per_s": rate,
        "points": s.points,
        "polls": s.polls,
        "rpm_requests": s.rpm_requests,
        "rp_requests": s.rp_requests,
        "connector_cpu_s_per_million": cpu,
        "worker_cpu_s_per_million": float("nan"),
    }


def run_bacnet(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    return _run_bacnet(args, env, logs, rpm=True)


def run_bacnet_rp(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    return _run_bacnet(args, env, logs, rpm=False)


RUNNERS = {"opcua": run_opcua, "bacnet": run_bacnet, "bacnet-rp": run_bacnet_rp, "mqtt-rate": run_mqtt_rate}
