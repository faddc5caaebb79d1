"""Addresses from I-Am answers, against fake devices: a claim from another address does not redirect a
device that still answers; a device that really moved (old address silent, new one with the same identity)
is followed; a claimant that cannot prove the identity leaves the address in doubt and writes refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from connectors.bacnet.client import BacnetError, IAm
from connectors.bacnet.commands import WriteRefused
from connectors.bacnet.config import BacnetSource
from connectors.bacnet.source import BacnetSourceRunner
from tests.conftest import wait_for
from tests.unit.test_bacnet_runner import FakeClient, FakeDevice, Producer, points


class Network(FakeClient):
    """Devices by address, plus I-Am claims from addresses where nothing answers."""

    def __init__(self, devices: dict[str, FakeDevice]) -> None:
        super().__init__(devices)
        self.spoofed: list[IAm] = []
        self.writes: list[tuple[str, str, float | None]] = []

    async def who_is(self, low: int, high: int, target: str | None, timeout: float) -> list[IAm]:
        return [*await super().who_is(low, high, target, timeout), *self.spoofed]

    def _device(self, address: str) -> FakeDevice:
        if address not in self.devices:
            raise BacnetError("timeout", "no answer in 0.1s")
        return self.devices[address]

    async def read(self, address: str, ref: str, prop: str, index: int | None = None) -> Any:
        self._device(address)
        return await super().read(address, ref, prop, index)

    async def read_multiple(self, address: str, refs: Sequence[str], props: Sequence[str]) -> dict[Any, Any]:
        self._device(address)
        return await super().read_multiple(address, refs, props)

    async def write(self, address: str, ref: str, value: float | None, priority: int) -> None:
        self._device(address)
        self.writes.append((address, ref, value))


def device(instance: int, model: str = "AHU-X", t1: float = 20.0) -> FakeDevice:
    d = FakeDevice(instance, 2)
    d.objects[f"device,{instance}"].update({"vendor-identifier": 999, "model-name": model})
    d.objects["analog-input,1"]["present-value"] = t1
    return d


CFG = {
    "defaults": {"interval": "50ms"},
    "discovery": {"low": 0, "high": 2000, "interval": "100ms"},
    "devices": [
        {
            "instance": 1001,
            "name": "ahu1",
            "points": [
                {"object": "analog-input,1", "name": "t1"},
                {"object": "analog-value,1", "name": "sp"},
            ],
        }
    ],
}


def run_with_network(net: Network, cfg: dict[str, Any] = CFG) -> tuple[BacnetSourceRunner, Any, Any]:
    """run_with, but on ``net`` (which also answers for addresses nobody holds)."""
    src = BacnetSource.model_validate(
        {"id": "t", "type": "bacnet", "local_address": "127.0.0.3/24:47809", "site": "s", **cfg}
    )
    producer = Producer()
    runner = BacnetSourceRunner(src, producer, client_factory=lambda _cfg: net)  # type: ignore[arg-type,return-value]
    stop = threading.Event()
    th = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    th.start()

    def close() -> None:
        stop.set()
        th.join(10)
        assert not th.is_alive()

    return runner, producer, close


def write(runner: BacnetSourceRunner, value: float) -> None:
    assert runner._loop is not None
    asyncio.run_coroutine_threadsafe(runner.write("s/ahu1/sp", value, 8), runner._loop).result(5)


def t1_values(producer: Any) -> list[float]:
    return [r["value"] for r in points(producer, "ahu1").get("t1", [])]


def spoof(address: str) -> IAm:
    return IAm(1001, address, 1476, "segmented-both", 999)


def test_a_spoofed_i_am_does_not_redirect_a_device_that_answers() -> None:
    net = Network({"10.0.0.2": device(1001, t1=20.0)})
    runner, producer, close = run_with_network(net)
    try:
        wait_for(lambda: len(t1_values(producer)) >= 2, 10, "polls of the real device")
        net.spoofed = [spoof("10.0.0.66")]
        wait_for(lambda: runner.stats.iam_conflicts >= 3, 10, "three rounds with the false claim")
        n = len(t1_values(producer))
        wait_for(lambda: len(t1_values(producer)) >= n + 3, 10, "more polls")
        write(runner, 15.0)
    finally:
        close()
    dev = runner.devices[1001]
    assert dev.address == "10.0.0.2" and dev.doubt is None and runner.stats.moves == 0
    assert set(t1_values(producer)) == {20.0}
    assert net.writes == [("10.0.0.2", "analog-value,1", 15.0)]


def test_a_device_that_really_moved_is_followed_and_an_impostor_is_not() -> None:
    real = device(1001, t1=20.0)
    net = Network({"10.0.0.2": real})
    runner, producer, close = run_with_network(net)
    try:
        wait_for(lambda: len(t1_values(producer)) >= 2, 10, "polls at the first address")
        # The old address goes silent; an impostor with another model claims the device.
        del net.devices["10.0.0.2"]
        net.devices["10.0.0.66"] = device(1001, model="something else", t1=99.0)
        wait_for(lambda: runner.devices[1001].doubt is not None, 10, "the address in doubt")
        with pytest.raises(WriteRefused, match="in doubt"):
            write(runner, 15.0)
        assert runner.devices[1001].address == "10.0.0.2" and runner.stats.moves == 0
        # The real device comes back at a new address, the same identity: followed.
        del net.devices["10.0.0.66"]
        moved = device(1001, t1=21.0)
        net.devices["10.0.0.3"] = moved
        wait_for(lambda: runner.devices[1001].address == "10.0.0.3", 10, "the move to be followed")
        wait_for(lambda: 21.0 in t1_values(producer), 10, "readings from the new address")
        write(runner, 16.0)
    finally:
        close()
    assert runner.stats.moves == 1 and runner.devices[1001].doubt is None
    assert 99.0 not in t1_values(producer), "nothing was read from the impostor"
    assert net.writes == [("10.0.0.3", "analog-value,1", 16.0)]


def test_a_new_device_is_taken_only_from_a_claimant_that_answers_as_it() -> None:
    net = Network({"10.0.0.2": device(1001)})
    net.spoofed = [spoof("10.0.0.66")]
    runner, producer, close = run_with_network(net)
    try:
        wait_for(lambda: len(t1_values(producer)) >= 2, 10, "polls of the device")
    finally:
        close()
    assert runner.devices[1001].address == "10.0.0.2" and runner.stats.iam_conflicts >= 1


def test_a_pinned_address_ignores_i_am_claims() -> None:
    cfg = {**CFG, "devices": [{**CFG["devices"][0], "address": "10.0.0.2"}]}  # type: ignore[dict-item]
    net = Network({"10.0.0.2": device(1001), "10.0.0.3": device(1001, t1=99.0)})
    runner, producer, close = run_with_network(net, cfg)
    try:
        wait_for(lambda: runner.stats.iam_conflicts == 1 and len(t1_values(producer)) >= 3, 10, "polls")
    finally:
        close()
    assert runner.devices[1001].address == "10.0.0.2" and set(t1_values(producer)) == {20.0}
