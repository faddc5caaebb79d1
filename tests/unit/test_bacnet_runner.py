"""The BACnet source's polling logic against fake devices: RPM splitting to the device's size, the
ReadProperty fallback, COV refused, and a slow device not delaying a fast one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

from connectors.bacnet.client import BacnetError, IAm, PropertyError
from connectors.bacnet.config import BacnetSource
from connectors.bacnet.source import BacnetSourceRunner
from tests.conftest import wait_for


class FakeDevice:
    def __init__(
        self,
        instance: int,
        zones: int,
        *,
        rpm: bool = True,
        max_objects: int = 1000,
        delay: float = 0.0,
        cov: bool = True,
    ) -> None:
        self.instance = instance
        self.rpm = rpm
        self.max_objects = max_objects
        self.delay = delay
        self.cov = cov
        self.objects: dict[str, dict[str, Any]] = {
            f"device,{instance}": {
                "object-identifier": ("device", instance),
                "object-name": f"DEV-{instance}",
                "max-apdu-length-accepted": 1476,
                "segmentation-supported": "segmented-both",
            }
        }
        for z in range(zones):
            self.objects[f"analog-input,{z + 1}"] = {
                "object-name": f"T{z + 1}",
                "present-value": 20.0 + z,
                "status-flags": [0, 0, 0, 0],
                "units": "degrees-celsius",
            }
        self.objects[f"analog-input,{zones + 1}"] = {
            "object-name": "BROKEN",
            "present-value": 0.0,
            "status-flags": [0, 1, 0, 0],
            "reliability": "shorted-loop",
            "units": "percent",
        }
        self.rpm_calls: list[int] = []
        self.rp_calls: list[tuple[str, str]] = []

    def value(self, ref: str, prop: str) -> Any:
        obj = self.objects.get(ref)
        if obj is None:
            return PropertyError("object", "unknown-object")
        if prop == "object-list":
            return [tuple(r.split(",")) for r in self.objects]
        if prop == "reliability" and prop not in obj and not ref.startswith("device"):
            return "no-fault-detected"
        return obj.get(prop, PropertyError("property", "unknown-property"))


class FakeClient:
    def __init__(self, devices: dict[str, FakeDevice]) -> None:
        self.devices = devices

    async def who_is(self, low: int, high: int, target: str | None, timeout: float) -> list[IAm]:
        return [
            IAm(d.instance, a, 1476, "segmented-both", 999)
            for a, d in self.devices.items()
            if low <= d.instance <= high
        ]

    async def read(self, address: str, ref: str, prop: str, index: int | None = None) -> Any:
        d = self.devices[address]
        await asyncio.sleep(d.delay)
        d.rp_calls.append((ref, prop))
        v = d.value(ref, prop)
        if isinstance(v, PropertyError):
            raise BacnetError("error", str(v))
        return v

    async def read_multiple(self, address: str, refs: Sequence[str], props: Sequence[str]) -> dict[Any, Any]:
        d = self.devices[address]
        await asyncio.sleep(d.delay)
        if not d.rpm:
            raise BacnetError("reject", "unrecognized-service")
        if len(refs) > d.max_objects:
            raise BacnetError("abort", "segmentation-not-supported")
        d.rpm_calls.append(len(refs))
        return {(r, p): d.value(r, p) for r in refs for p in props}

    async def write(self, address: str, ref: str, value: float | None, priority: int) -> None:
        raise BacnetError("error", "property: write-access-denied")

    def subscribe(self, address: str, ref: str, *, confirmed: bool, lifetime_s: int) -> Any:
        d = self.devices[address]

        class Ctx:
            async def __aenter__(self) -> Any:
                if not d.cov:
                    raise BacnetError("error", "services: cov-subscription-failed")
                raise AssertionError("not used")

            async def __aexit__(self, *exc: Any) -> None:
                return None

        return Ctx()

    def close(self) -> None:
        pass


class Producer:
    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.dead: list[tuple[str, bytes]] = []

    def send_batch(self, batch: dict[str, Any], cb: Any) -> None:
        self.batches.append(batch)
        cb(None)

    def send_dead_letter(self, source: str, reason: str, payload: bytes, topic: Any, cb: Any) -> None:
        self.dead.append((reason, payload))
        cb(None)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def run_with(devices: dict[str, FakeDevice], cfg: dict[str, Any]) -> tuple[BacnetSourceRunner, Producer, Any]:
    src = BacnetSource.model_validate(
        {"id": "t", "type": "bacnet", "local_address": "127.0.0.3/24:47809", "site": "s", **cfg}
    )
    producer = Producer()
    runner = BacnetSourceRunner(src, producer, client_factory=lambda _cfg: FakeClient(devices))  # type: ignore[arg-type,return-value]
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()

    def close() -> None:
        stop.set()
        th.join(10)
        assert not th.is_alive()

    return runner, producer, close


def points(producer: Producer, device: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for b in producer.batches:
        if b["device"] == device:
            for r in b["readings"]:
                out.setdefault(r["point"], []).append(r)
    return out


def test_rpm_is_split_until_the_answer_fits() -> None:
    dev = FakeDevice(7, 60, max_objects=10)
    runner, producer, close = run_with(
        {"10.0.0.7": dev},
        {"defaults": {"interval": "100ms"}, "devices": [{"instance": 7, "address": "10.0.0.7"}]},
    )
    try:
        wait_for(
            lambda: (
                all(len(v) >= 2 for v in points(producer, "DEV-7").values())
                and len(points(producer, "DEV-7")) == 61
            ),
            10,
            "two polls of 61 points",
        )
    finally:
        close()
    assert runner.stats.request_splits >= 1 and max(dev.rpm_calls[-5:]) <= 10
    assert runner.devices[7].chunk <= 10 and runner.stats.rpm_fallbacks == 0
    broken = points(producer, "DEV-7")["BROKEN"][0]
    assert broken["quality"] == "bad" and broken["status"]["reliability"] == "shorted-loop"
    assert points(producer, "DEV-7")["T3"][0] == {
        "point": "T3",
        "ts": broken["ts"],
        "value": 22.0,
        "quality": "good",
        "unit": "°C",
    }


def test_readproperty_fallback_reads_reliability_only_where_a_fault_shows() -> None:
    dev = FakeDevice(8, 5, rpm=False)
    runner, producer, close = run_with(
        {"10.0.0.8": dev},
        {"defaults": {"interval": "100ms"}, "devices": [{"instance": 8, "address": "10.0.0.8"}]},
    )
    try:
        wait_for(lambda: len(points(producer, "DEV-8").get("T1", [])) >= 2, 10, "two polls")
    finally:
        close()
    assert runner.stats.rpm_fallbacks == 1 and dev.rpm_calls == []
    rel = [c for c in dev.rp_calls if c[1] == "reliability"]
    assert rel and {ref for ref, _ in rel} == {"analog-input,6"}
    assert points(producer, "DEV-8")["BROKEN"][-1]["quality"] == "bad"


def test_refused_cov_falls_back_to_polling() -> None:
    dev = FakeDevice(9, 2, cov=False)
    runner, producer, close = run_with(
        {"10.0.0.9": dev},
        {
            "defaults": {"interval": "100ms"},
            "devices": [
                {"instance": 9, "address": "10.0.0.9", "points": [{"object": "analog-input,1", "cov": True}]}
            ],
        },
    )
    try:
        wait_for(lambda: len(points(producer, "DEV-9").get("T1", [])) >= 3, 10, "the COV point polled")
    finally:
        close()
    assert runner.stats.cov_failures >= 1 and runner.stats.cov_subscriptions == 0


def test_a_slow_device_does_not_delay_a_fast_one() -> None:
    slow, fast = FakeDevice(1, 3, delay=1.5), FakeDevice(2, 3)
    runner, producer, close = run_with(
        {"10.0.0.1": slow, "10.0.0.2": fast},
        {"defaults": {"interval": "100ms"}, "discovery": {"low": 0, "high": 10, "interval": 0}},
    )
    try:
        started = time.monotonic()
        wait_for(
            lambda: len(points(producer, "DEV-2").get("T1", [])) >= 10, 5, "ten polls of the fast device"
        )
        elapsed = time.monotonic() - started
    finally:
        close()
    assert elapsed < 3.0
    assert len(points(producer, "DEV-1").get("T1", [])) <= 1
    assert set(runner.discovered) == {1, 2}


def test_unknown_object_is_dead_lettered_once() -> None:
    dev = FakeDevice(3, 2)
    runner, producer, close = run_with(
        {"10.0.0.3": dev},
        {
            "defaults": {"interval": "100ms"},
            "devices": [
                {
                    "instance": 3,
                    "address": "10.0.0.3",
                    "name": "d3",
                    "points": [{"object": "analog-input,1"}, {"object": "analog-value,42", "name": "ghost"}],
                }
            ],
        },
    )
    try:
        wait_for(lambda: len(points(producer, "d3").get("T1", [])) >= 3, 10, "three polls")
    finally:
        close()
    assert (
        len(producer.dead) == 1 and "unknown-object" in producer.dead[0][0] and "ghost" in producer.dead[0][0]
    )
    assert runner.stats.point_errors == 1
