"""The OPC UA source survives a server restart: stopped for 15 s, data flows again within 10 s of its return.

The restarted plant has one control loop fewer, so a node mapped by NodeId becomes unknown: it is reported
(dead letter and counter) while everything else keeps flowing. A network cut (a relay that stops carrying
bytes without closing anything) is noticed by the health probe and recovered from the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import pytest

from connectors.sim import launch
from pipeline.core.records import now_ms
from tests.conftest import wait_for
from tests.integration.readback import Topics
from tests.integration.test_opcua import NSU, Running, make_topology

pytestmark = pytest.mark.integration

OUTAGE_S = 15
RECOVERY_S = 10


def test_server_restart_recovers_without_duplicates(
    namespace: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plantstream.opcua")
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    plant = launch.start_opcua_plant(
        endpoint, args=["--loops", "50", "--tanks", "15"], log=tmp_path / "plant1.log"
    )
    # Loop 50 is TIC150 (kinds cycle FIC, TIC, PIC, LIC); the second plant has 49 loops and no TIC150.
    topo = make_topology(
        namespace,
        {
            "id": "plant",
            "type": "opcua",
            "endpoint": endpoint,
            "site": "s",
            "browse": [{"root": f"{NSU};s=Plant/Loops"}, {"root": f"{NSU};s=Plant/Tanks"}],
            "nodes": [{"node_id": f"{NSU};s=Plant/Loops/TIC150/PV", "device": "extra", "point": "tic150"}],
        },
    )
    topics = Topics(topo)
    run = Running(topo)
    try:

        def fresh(since: int, n: int) -> bool:
            topics.poll()
            return len({k for k, rs in topics.series().items() if any(r["ts"] > since for r in rs)}) >= n

        wait_for(lambda: fresh(0, 200), 30, "data from 200 series before the restart")
        assert run.runner.stats.monitored >= 200

        launch.stop(plant)
        stopped = now_ms()
        wait_for(lambda: not run.runner.connected.is_set(), 10, "the connector to notice the server is gone")
        time.sleep(OUTAGE_S)  # the outage itself: the server stays down this long
        plant = launch.start_opcua_plant(
            endpoint, args=["--loops", "49", "--tanks", "15"], log=tmp_path / "plant2.log"
        )
        back = time.monotonic()
        back_ms = now_ms()
        wait_for(
            lambda: fresh(back_ms, 150),
            RECOVERY_S,
            f"data flowing within {RECOVERY_S}s of the server's return",
        )
        recovered_in = time.monotonic() - back
        wait_for(
            lambda: run.runner.stats.node_errors >= 1 and len(topics.dead) >= 1,
            10,
            "the vanished node to be reported",
        )
    finally:
        run.close()
        launch.stop(plant)
        topics.close()
    stats = run.runner.stats
    print(f"recovered {recovered_in:.2f}s after the server returned")
    assert recovered_in <= RECOVERY_S
    assert stats.reconnects == 1 and stats.sessions == 2 and stats.connect_failures >= 2
    series = topics.series()
    # No reading is sent twice, and no reading claims a time inside the outage.
    for key, rs in series.items():
        stamps = [r["ts"] for r in rs]
        assert len(stamps) == len(set(stamps)), f"duplicated (point, ts) in {key}"
    assert not any(stopped + 500 < r["ts"] < back_ms - 500 for rs in series.values() for r in rs)
    # The vanished node: reported once, with its mapping; the rest kept going after the restart.
    reasons = [d["reason"] for d in topics.dead]
    assert any("Plant/Loops/TIC150/PV" in r and r.startswith("node unknown") for r in reasons), reasons
    assert any(r["ts"] > back_ms for r in series["s/FIC101/PV"])
    assert not any(r["ts"] > back_ms for r in series.get("s/extra/tic150", []))
    logged = caplog.text
    assert "connection to" in logged and "lost" in logged
    assert "reconnected to" in logged and "subscription recreated" in logged


class CuttableLink:
    """A TCP relay that can stop carrying bytes without closing anything: a network cut, as both ends see it.

    While cut, bytes vanish in both directions and no connection is closed or refused.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        self._server_task: asyncio.Task[None] | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._server_task = self.loop.create_task(serve())
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(self._server_task)
            rest = asyncio.all_tasks(self.loop)
            for t in rest:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.cut.is_set():  # while cut, bytes vanish; nobody is told
                        dst.write(data)
                        await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        if self._server_task is not None:
            self.loop.call_soon_threadsafe(self._server_task.cancel)
        self.thread.join(10)


def test_network_cut_is_detected_and_recovered(
    namespace: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plantstream.opcua")
    plant_port = launch.free_tcp_port()
    plant = launch.start_opcua_plant(
        f"opc.tcp://127.0.0.1:{plant_port}/plant",
        args=["--loops", "10", "--tanks", "2"],
        log=tmp_path / "plant.log",
    )
    link = CuttableLink(plant_port)
    topo = make_topology(
        namespace,
        {
            "id": "plant",
            "type": "opcua",
            "endpoint": f"opc.tcp://127.0.0.1:{link.port}/plant",
            "site": "s",
            "request_timeout": "2s",
            "browse": [{"root": f"{NSU};s=Plant/Loops"}],
        },
    )
    topics = Topics(topo)
    run = Running(topo)
    try:

        def fresh(since: int) -> bool:
            topics.poll()
            return any(r["ts"] > since for r in topics.series().get("s/FIC101/PV", []))

        wait_for(lambda: fresh(0), 30, "data before the cut")
        link.cut.set()
        cut_at = time.monotonic()
        wait_for(
            lambda: not run.runner.connected.is_set(), 10, "the cut to be noticed without any socket closing"
        )
        noticed = time.monotonic() - cut_at
        time.sleep(max(0.0, 8 - (time.monotonic() - cut_at)))  # the cut lasts 8 s
        link.cut.clear()
        back_ms = now_ms()
        wait_for(lambda: fresh(back_ms), RECOVERY_S, f"data within {RECOVERY_S}s of the link's return")
    finally:
        run.close()
        topics.close()
        link.close()
        launch.stop(plant)
    assert noticed < 6, f"the cut took {noticed:.1f}s to notice"
    assert run.runner.stats.reconnects >= 1
    for key, rs in topics.series().items():
        assert len({r["ts"] for r in rs}) == len(rs), f"duplicated (point, ts) in {key}"
    assert "lost" in caplog.text and "reconnected to" in caplog.text
