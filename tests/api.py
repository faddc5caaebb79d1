"""``plantstream serve`` for tests: the real app on a real port (uvicorn in a thread), and SSE reading."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from pipeline.api.app import create_app
from pipeline.topology import Topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(topo: Topology, **options: Any) -> Iterator[str]:
    """The service for ``topo`` on 127.0.0.1; yields its base URL once it answers and its feed is ready."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(topo, **options), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                h = httpx.get(f"{base}/api/health", timeout=20).json()
                if h.get("live", {}).get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("plantstream serve did not come up within 30 s")
        yield base
    finally:
        server.should_exit = True
        thread.join(15)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class EventReader:
    """Reads an SSE stream in a thread: ``events`` holds (id, event, data) as they come."""

    def __init__(
        self, url: str, token: str, params: dict[str, Any] | None = None, last_id: str | None = None
    ):
        self.events: list[tuple[str | None, str, dict[str, Any]]] = []
        self.open = threading.Event()
        self.closed = threading.Event()
        self._stop = False
        headers = auth(token) | ({"Last-Event-ID": last_id} if last_id else {})
        self._thread = threading.Thread(target=self._run, args=(url, headers, params or {}), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str], params: dict[str, Any]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, params=params, timeout=None) as r:
                r.raise_for_status()
                self.open.set()
                ev: dict[str, str] = {}
                for line in r.iter_lines():
                    if self._stop:
                        return
                    if line.startswith(":"):
                        continue
                    if not line:
                        if "data" in ev:
                            self.events.append(
                                (ev.get("id"), ev.get("event", "message"), json.loads(ev["data"]))
                            )
                        ev = {}
                        continue
                    k, _, v = line.partition(": ")
                    ev[k] = v
        except httpx.HTTPError:
            pass
        finally:
            self.open.set()
            self.closed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for _, e, d in self.events if e == kind]

    def stop(self) -> None:
        self._stop = True
