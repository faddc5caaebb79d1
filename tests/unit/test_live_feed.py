"""The live feed's fan-out (pipeline/api/live.py) on a real event loop, without Kafka: bounded queues, a
stalled client cut off without slowing the others, resuming from the ring."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.api import live
from pipeline.api.live import Client, Frame, Hub


def hub() -> Hub:
    return Hub("127.0.0.1:1", {}, dict)


def frames(h: Hub, n: int, site: str = "a1") -> list[Frame]:
    out = []
    for _ in range(n):
        h.seq += 1
        out.append(Frame(h.seq, "latest", site, f"{site}/d/p", f"id: {h.boot}.{h.seq}\n\n".encode()))
    return out


async def test_a_stalled_client_is_cut_off_and_the_others_get_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "STALL_S", 0.2)
    h = hub()
    stalled = Client(frozenset({"a1"}), None, frozenset({"latest"}), limit=50)
    reading = Client(frozenset({"a1"}), None, frozenset({"latest"}), limit=50)
    other_site = Client(frozenset({"b1"}), None, frozenset({"latest"}), limit=50)
    got: list[int] = []

    async def read() -> None:
        async for chunk in h.stream(reading, None):
            if chunk.startswith(b"id:"):
                got.append(int(chunk.split(b".")[1].split(b"\n")[0]))

    task = asyncio.create_task(read())
    h.attach(stalled)
    h.attach(other_site)
    await asyncio.sleep(0)
    for _ in range(10):  # bursts of 40, each within what a reading client absorbs
        h.publish(frames(h, 40))
        await asyncio.sleep(0.05)
    assert got == list(range(1, 401))  # every frame, in order, to the client that reads
    assert stalled.dropped and stalled.queue.qsize() == 1  # cut off: its frames freed, the end mark left
    assert other_site.queue.qsize() == 0  # another site's client saw nothing
    assert h.dropped_clients == 1 and not reading.dropped
    task.cancel()


async def test_a_burst_beyond_ten_times_the_limit_cuts_off_even_a_reader() -> None:
    h = hub()
    c = Client(frozenset({"a1"}), None, frozenset({"latest"}), limit=10)
    h.attach(c)
    h.publish(frames(h, 100))
    assert c.dropped


async def test_a_client_resumes_after_its_last_id_or_is_told_to_resync() -> None:
    h = hub()
    h.publish(frames(h, 5))
    assert [f.seq for f in h.since(f"{h.boot}.2") or []] == [3, 4, 5]
    assert h.since(None) == []
    assert h.since("another-boot.2") is None
    c = Client(frozenset({"a1"}), None, frozenset({"latest"}))
    chunks = []
    async for chunk in h.stream(c, "another-boot.1"):
        chunks.append(chunk)
        if len(chunks) == 2:
            break
    assert chunks[0].startswith(b"event: resync")
