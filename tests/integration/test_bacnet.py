"""BACnet/IP source against simulated air-handling units over real UDP on loopback, into the real Kafka.

Each unit runs as a child process at 127.0.0.x/8 on a free port; the connector has its own address and
port (127.0.0.3/24) and sends Who-Is to 127.255.255.255 on the devices' port, which every unit hears.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.bacnet.client import BacnetClient
from connectors.bacnet.config import BacnetSource
from connectors.bacnet.source import BacnetSourceRunner
from connectors.common.producer import TelemetryProducer
from connectors.sim import launch
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for
from tests.integration.readback import Topics

pytestmark = pytest.mark.integration


def make_topology(ns: dict[str, str], source: dict[str, Any], **extra: Any) -> Topology:
    topo = validate_data(
        {
            "name": f"bacnet{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
            "sources": [source],
            **extra,
        }
    )
    ensure_topics(topo, say=lambda _m: None)
    return topo


class Running:
    def __init__(self, topo: Topology, with_commands: bool = False) -> None:
        self.producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
        src = topo.sources[0]
        assert isinstance(src, BacnetSource)
        self.runner = BacnetSourceRunner(src, self.producer, topology=topo if with_commands else None)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.runner.ready.wait(10), self.runner.fatal

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


class Ports:
    def __init__(self) -> None:
        self.device = launch.free_udp_port("127.0.0.2")
        self.client = launch.free_udp_port("127.0.0.3")


@pytest.fixture
def ports() -> Ports:
    return Ports()


@pytest.fixture
def ahu(ports: Ports, tmp_path: Path) -> Iterator[str]:
    proc = launch.start_bacnet_ahu(
        f"127.0.0.2/8:{ports.device}", 1001, args=["--zones", "90"], log=tmp_path / "ahu.log"
    )
    yield f"127.0.0.2:{ports.device}"
    launch.stop(proc)


def test_discovery_and_rpm_polling_of_100_points(
    namespace: dict[str, str], ports: Ports, ahu: str, tmp_path: Path
) -> None:
    second = launch.start_bacnet_ahu(
        f"127.0.0.4/8:{ports.device}",
        1002,
        args=["--zones", "3", "--name", "AHU-2"],
        log=tmp_path / "ahu2.log",
    )
    try:
        topo = make_topology(
            namespace,
            {
                "id": "bms",
                "type": "bacnet",
                "local_address": f"127.0.0.3/24:{ports.client}",
                "site": "hq",
                "discovery": {
                    "low": 1000,
                    "high": 1999,
                    "target": f"127.255.255.255:{ports.device}",
                    "timeout": "1s",
                    "interval": 0,
                },
                "defaults": {"interval": "1s"},
            },
        )
        topics = Topics(topo)
        run = Running(topo)
        try:

            def polled(n_polls: int) -> bool:
                topics.poll()
                s = topics.series()
                big = [k for k in s if k.startswith("hq/AHU-1/")]
                return len(big) >= 100 and all(len(s[k]) >= n_polls for k in big) and "hq/AHU-2/SAT" in s

            wait_for(lambda: polled(3), 30, "three polls of the 100+ points of AHU-1 and data from AHU-2")
        finally:
            run.close()
            topics.close()
    finally:
        launch.stop(second)
    r = run.runner
    assert set(r.discovered) == {1001, 1002}
    assert r.discovered[1001].address == ahu and r.discovered[1002].address == f"127.0.0.4:{ports.device}"
    s = topics.series()
    ahu1 = {k.split("/", 2)[2]: v for k, v in s.items() if k.startswith("hq/AHU-1/")}
    assert len(ahu1) == 118  # 14 inputs + 90 zones + 7 values + 4 binary values + 2 binary inputs + mode
    # ReadPropertyMultiple did the polling: far fewer requests than points.
    assert r.stats.rpm_requests >= 3 and r.stats.rp_requests <= 2 and r.stats.rpm_fallbacks == 0
    assert r.stats.rpm_requests < r.stats.readings / 10  # setup reads included
    # Values, units and quality from statusFlags and reliability.
    assert ahu1["SAT-SP"][0]["value"] == 13.0 and ahu1["SAT-SP"][0]["unit"] == "°C"
    assert ahu1["DSP"][0]["unit"] == "Pa" and 200 < ahu1["DSP"][0]["value"] < 300
    assert ahu1["SF-CMD"][0]["value"] == 1.0 and ahu1["ECON-ENA"][0]["value"] == 0.0
    assert ahu1["AHU-MODE"][0]["value"] == 2.0
    oa_rh = ahu1["OA-RH"][0]
    assert oa_rh["quality"] == "bad" and oa_rh["status"]["reliability"] == "open-loop"
    assert oa_rh["status"]["flags"] == ["fault"]
    co2 = ahu1["CO2-RA"][0]
    assert co2["quality"] == "uncertain" and co2["status"]["flags"] == ["overridden"]
    filt = ahu1["FILT-DP"][0]
    assert filt["quality"] == "good" and filt["status"]["in_alarm"] is True
    assert all(r["quality"] == "good" and "status" not in r for r in ahu1["ZN-T-001"])
    # The zones move between polls; each poll is one batch per device with one timestamp.
    assert len({r["value"] for r in ahu1["ZN-T-001"]}) >= 2
    for b in topics.batches:
        if b["device"] == "AHU-1" and len(b["readings"]) >= 100:
            assert len({x["ts"] for x in b["readings"]}) == 1


def test_readproperty_fallback_and_a_dead_device(
    namespace: dict[str, str], ports: Ports, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plantstream.bacnet")
    proc = launch.start_bacnet_ahu(
        f"127.0.0.2/8:{ports.device}", 1001, args=["--zones", "10", "--no-rpm"], log=tmp_path / "ahu.log"
    )
    try:
        topo = make_topology(
            namespace,
            {
                "id": "old",
                "type": "bacnet",
                "local_address": f"127.0.0.3/24:{ports.client}",
                "site": "s",
                "apdu_timeout": "500ms",
                "apdu_retries": 0,
                "defaults": {"interval": "1s", "timeout": "1s"},
                "devices": [
                    {"instance": 1001, "address": f"127.0.0.2:{ports.device}", "name": "legacy"},
                    {"instance": 1009, "address": f"127.0.0.9:{ports.device}", "name": "gone"},
                ],
            },
        )
        topics = Topics(topo)
        run = Running(topo)
        try:

            def three_polls() -> bool:
                topics.poll()
                sat = topics.series().get("s/legacy/SAT", [])
                return len(sat) >= 3

            wait_for(three_polls, 30, "three polls of the device that has no ReadPropertyMultiple")
        finally:
            run.close()
            topics.close()
    finally:
        launch.stop(proc)
    r = run.runner
    assert r.stats.rpm_fallbacks == 1 and r.stats.rp_requests > 3 * 38
    legacy = {k.split("/", 2)[2]: v for k, v in topics.series().items() if k.startswith("s/legacy/")}
    assert len(legacy) == 38
    assert (
        legacy["OA-RH"][0]["quality"] == "bad" and legacy["OA-RH"][0]["status"]["reliability"] == "open-loop"
    )
    assert not any(k.startswith("s/gone/") for k in topics.series())
    assert r.devices[1009].online is False and r.devices[1001].online is True
    assert "rejects ReadPropertyMultiple" in caplog.text and "(1009 at 127.0.0.9" in caplog.text


async def _write_tune(ports: Ports, value: float) -> None:
    client = BacnetClient(f"127.0.0.5/24:{launch.free_udp_port('127.0.0.5')}", 599_001)
    try:
        await client.write(f"127.0.0.2:{ports.device}", "analog-value,7", value, 16)
    finally:
        client.close()


@pytest.mark.parametrize("confirmed", [False, True], ids=["unconfirmed-renewed", "confirmed"])
def test_cov_delivers_a_change_without_a_poll(
    namespace: dict[str, str], ports: Ports, ahu: str, confirmed: bool
) -> None:
    lifetime = 10
    topo = make_topology(
        namespace,
        {
            "id": "cov",
            "type": "bacnet",
            "local_address": f"127.0.0.3/24:{ports.client}",
            "site": "s",
            "defaults": {"interval": "10m"},
            "cov": {"lifetime": f"{lifetime}s", "confirmed": confirmed},
            "devices": [
                {
                    "instance": 1001,
                    "address": ahu,
                    "name": "ahu",
                    "points": [
                        {"object": "analog-value,7", "name": "tune", "cov": True},
                        {"object": "analog-input,2", "name": "rat"},
                    ],
                }
            ],
        },
    )
    topics = Topics(topo)
    run = Running(topo)
    try:
        r = run.runner
        wait_for(
            lambda: r.stats.cov_subscriptions == 1 and r.stats.polls >= 1, 20, "subscribed and polled once"
        )

        def tune_is(v: float) -> bool:
            topics.poll()
            return any(x["value"] == v for x in topics.series().get("s/ahu/tune", []))

        wait_for(lambda: tune_is(0.0), 20, "the initial COV notification")
        subscribed = time.monotonic()
        polls = r.stats.polls
        asyncio.run(_write_tune(ports, 42.5))
        wait_for(lambda: tune_is(42.5), 10, "the change delivered by COV")
        assert r.stats.polls == polls, "the change must not have come from a poll"
        if not confirmed:
            # Past the lifetime: only a renewed subscription still hears of changes.
            time.sleep(max(0.0, lifetime + 2 - (time.monotonic() - subscribed)))
            asyncio.run(_write_tune(ports, 43.5))
            wait_for(lambda: tune_is(43.5), 10, "a change after the first lifetime ended")
            assert r.stats.polls == polls
        assert r.stats.cov_notifications >= 2 and r.stats.cov_failures == 0 and r.stats.cov_subscriptions == 1
    finally:
        run.close()
        topics.close()
    s = topics.series()
    assert len(s["s/ahu/rat"]) == 1  # polled once (interval 10 min); tune is not polled at all
    assert [x["value"] for x in s["s/ahu/tune"]][-1] == (42.5 if confirmed else 43.5)
