"""I-Am answers cannot redirect a discovered BACnet device, over real UDP with the real Kafka.

A raw UDP socket keeps claiming the instance of the simulated unit from another address with crafted I-Am
datagrams. The source keeps reading the real unit, counts and logs the conflict, and a write command goes
to the real unit. When the unit truly moves (its old address gone, the new one answering with the same
identity) the source follows it, and not the claimant that never answers.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from connectors.sim import launch
from pipeline.control import send_command
from pipeline.core.commands import make_command
from tests.conftest import wait_for
from tests.integration.readback import Topics
from tests.integration.test_bacnet import Running, make_topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults


def i_am(instance: int, vendor: int = 999) -> bytes:
    """An I-Am as BACnet/IP carries it: BVLC original-unicast, NPDU, unconfirmed I-Am APDU."""
    apdu = (
        bytes([0x10, 0x00])  # unconfirmed request, I-Am
        + bytes([0xC4])
        + struct.pack(">I", (8 << 22) | instance)  # object identifier: device,<instance>
        + bytes([0x22])
        + struct.pack(">H", 1476)  # max APDU
        + bytes([0x91, 0x00])  # segmented-both
        + bytes([0x22])
        + struct.pack(">H", vendor)
    )
    npdu = bytes([0x01, 0x00])
    return bytes([0x81, 0x0A]) + struct.pack(">H", 4 + len(npdu) + len(apdu)) + npdu + apdu


class Claimant:
    """Sends an I-Am for ``instance`` to ``target`` every 50 ms from 127.0.0.4 (answers nothing else)."""

    def __init__(self, instance: int, target: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.4", 0))
        host, bound = self.sock.getsockname()
        self.address = f"{host}:{bound}"
        self.stop = threading.Event()
        self.datagram, self.target = i_am(instance), target
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.sock.sendto(self.datagram, self.target)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def port() -> int:
    return launch.free_udp_port("127.0.0.2")


def test_a_spoofed_i_am_is_ignored_and_a_real_move_is_followed(
    namespace: dict[str, str], port: int, tmp_path: Path
) -> None:
    client_port = launch.free_udp_port("127.0.0.3")
    log = tmp_path / "ahu.log"
    ahu = launch.start_bacnet_ahu(f"127.0.0.2/8:{port}", 1001, args=["--zones", "2"], log=log)
    topo = make_topology(
        namespace,
        {
            "id": "bms",
            "type": "bacnet",
            "local_address": f"127.0.0.3/24:{client_port}",
            "site": "hq",
            "discovery": {
                "low": 1001,
                "high": 1002,
                "target": f"127.255.255.255:{port}",
                "timeout": "500ms",
                "interval": "1s",
            },
            "defaults": {"interval": "500ms"},
            "devices": [
                {
                    "instance": 1001,
                    "name": "ahu1",
                    "points": [
                        {"object": "analog-input,4", "name": "oat"},
                        {"object": "analog-value,7", "name": "tune", "writable": True},
                    ],
                }
            ],
        },
    )
    topics = Topics(topo)
    claimant = Claimant(1001, ("127.0.0.3", client_port))
    run = Running(topo, with_commands=True)
    moved = None
    try:
        dev = wait_for(lambda: run.runner.devices.get(1001), 15, "the device")
        wait_for(lambda: dev.address == f"127.0.0.2:{port}", 15, "the real unit found")
        wait_for(lambda: run.runner.stats.iam_conflicts >= 2, 20, "the false claims counted")
        assert dev.address == f"127.0.0.2:{port}" and run.runner.stats.moves == 0

        def oat_readings() -> int:
            topics.poll()
            return len(topics.series().get("hq/ahu1/oat", []))

        n = oat_readings()
        wait_for(lambda: oat_readings() >= n + 3, 15, "readings going on from the real unit")
        assert run.runner.executor is not None and run.runner.executor.ready.wait(30)
        result = send_command(topo, make_command("hq/ahu1/tune", 3.25, 8, "pytest"), wait=20)
        assert result is not None and result["status"] == "accepted", result
        wait_for(lambda: "write TUNE presentValue=3.25" in log.read_text(), 10, "the write at the real unit")
        assert dev.address == f"127.0.0.2:{port}"

        # The unit moves: its old address goes silent, it answers from 127.0.0.6 with the same identity.
        launch.stop(ahu)
        moved = launch.start_bacnet_ahu(
            f"127.0.0.6/8:{port}", 1001, args=["--zones", "2"], log=tmp_path / "moved.log"
        )
        wait_for(lambda: dev.address == f"127.0.0.6:{port}", 60, "the move to be followed")
        n = oat_readings()
        wait_for(lambda: oat_readings() >= n + 3, 20, "readings from the new address")
    finally:
        claimant.close()
        run.close()
        topics.close()
        launch.stop(ahu)
        if moved is not None:
            launch.stop(moved)
    assert run.runner.stats.moves == 1
    assert claimant.address != dev.address
