"""Load on ``plantstream serve`` for ``make bench`` (the ``api`` scenario), run as a process of its own.

``--clients`` stream clients, each a dashboard of one device, read ``/api/stream`` (the device's latest
values and closed minutes) while ``--rest``
workers send REST queries back to back (a mix: one series' last hour of 1-minute aggregates, the active
alarms, a device's series with their latest values, health), for ``--seconds``. Prints one JSON object: stream
events received per second (all clients), the lag of latest values (arrival minus the reading's event time,
which is wall time in the live run), REST queries per second and latency per endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import httpx


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (None for none)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


async def stream_client(base: str, token: str, series: list[str], end: float, out: dict[str, Any]) -> None:
    """A dashboard of one device: its series' latest values and closed minutes."""
    params = {"access_token": token, "kinds": ["latest", "agg"], "series": series}
    try:
        async with (
            httpx.AsyncClient(timeout=None) as c,
            c.stream("GET", f"{base}/api/stream", params=params) as r,
        ):
            kind = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    out["events"] += 1
                    if kind == "latest" and random.random() < 0.01:  # sample the lag
                        out["lag_ms"].append(time.time() * 1000 - json.loads(line[6:])["ts"])
                if time.monotonic() >= end:
                    return
    except httpx.HTTPError as e:
        out["errors"].append(repr(e))


PROBES = {
    "aggregates": "/api/series/site1/d00000/p000/aggregates",
    "alarms": "/api/alarms",
    "series": "/api/series?site=site1&device=d00000",
    "health": "/api/health",
}


async def rest_worker(
    base: str,
    token: str,
    kinds: list[str],
    series: list[str],
    devices: list[str],
    end: float,
    out: dict[str, Any],
) -> None:
    rng = random.Random()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:
        while time.monotonic() < end:
            kind = rng.choice(["aggregates", *kinds])
            path = {
                "aggregates": f"/api/series/{rng.choice(series)}/aggregates",
                "alarms": "/api/alarms",
                "series": f"/api/series?site=site1&device={rng.choice(devices)}",
                "health": "/api/health",
            }[kind]
            t0 = time.perf_counter()
            try:
                r = await c.get(path)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            ms = (time.perf_counter() - t0) * 1000
            if ok:
                out.setdefault(kind, []).append(ms)
            else:
                out["errors"] += 1


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    await asyncio.sleep(a.delay)
    headers = {"Authorization": f"Bearer {a.token}"}
    async with httpx.AsyncClient(base_url=a.base, headers=headers, timeout=60) as c:
        listed = (await c.get("/api/series", params={"site": "site1"})).json()
    series = [s["series"] for s in listed] or ["site1/d00000/p000"]
    devices = sorted({s["device"] for s in listed}) or ["d00000"]
    by_device: dict[str, list[str]] = {}
    for s in listed:
        by_device.setdefault(s["device"], []).append(s["series"])
    rng = random.Random(7)
    # The mix: what answers here (a topology without alert rules has no alarms).
    async with httpx.AsyncClient(base_url=a.base, headers=headers, timeout=60) as c:
        kinds = [k for k, path in PROBES.items() if (await c.get(path)).status_code == 200]
    end = time.monotonic() + a.seconds
    streams: dict[str, Any] = {"events": 0, "lag_ms": [], "errors": []}
    rest: dict[str, Any] = {"errors": 0}
    t0 = time.monotonic()
    await asyncio.gather(
        *(
            stream_client(a.base, a.token, by_device.get(rng.choice(devices), series), end, streams)
            for _ in range(a.clients)
        ),
        *(rest_worker(a.base, a.token, kinds, series, devices, end, rest) for _ in range(a.rest)),
    )
    took = time.monotonic() - t0
    per: dict[str, dict[str, Any]] = {
        k: {"queries": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)}
        for k, v in rest.items()
        if k != "errors"
    }
    total = sum(int(p["queries"]) for p in per.values())
    return {
        "seconds": took,
        "stream_clients": a.clients,
        "stream_events_per_s": streams["events"] / took,
        "stream_lag_p50_ms": pct(streams["lag_ms"], 0.5),
        "stream_lag_p99_ms": pct(streams["lag_ms"], 0.99),
        "stream_errors": len(streams["errors"]),
        "rest_workers": a.rest,
        "rest_queries_per_s": total / took,
        "rest_errors": rest["errors"],
        "rest": per,
        "rest_p50_ms": pct([x for k, v in rest.items() if k != "errors" for x in v], 0.5),
        "rest_p99_ms": pct([x for k, v in rest.items() if k != "errors" for x in v], 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rest", type=int, default=8, help="concurrent REST workers")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--delay", type=float, default=0, help="seconds to wait before starting")
    print(json.dumps(asyncio.run(main_async(ap.parse_args()))))


if __name__ == "__main__":
    main()
