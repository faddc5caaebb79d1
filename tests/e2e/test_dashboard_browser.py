"""The web page in a real browser (Debian's Chromium, headless, driven by Playwright), end to end: the
simulator over MQTT, the connector, the worker and ``plantstream serve`` as processes, on the real services.

It opens the page with a tenant's token, sees a live value change and a closed minute appear, acknowledges
an active alarm and sees the acknowledgement in the journal. The screenshot is saved in the test's output
(and in ``$PLANTSTREAM_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from connectors.timescale import tenancy
from tests.api import free_port
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import deploy_cli, spawn, stop

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SERIES = "hq/ahu01/supply.temperature"
ALARM = f"always/{SERIES}"


def topology(ns: dict[str, str]) -> dict[str, Any]:
    root = f"t{ns['tag']}"
    return {
        "name": f"web{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "sources": [
            {
                "id": "site-mqtt",
                "type": "mqtt",
                "url": ns["PLANTSTREAM_MQTT_URL"],
                "qos": 1,
                "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
                "batch": {"max_readings": 200, "max_delay": "200ms"},
            }
        ],
        "aggregates": {"grace": "2s", "idle_timeout": "30s", "checkpoint_interval": "500ms"},
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": ns["PLANTSTREAM_PG_DSN"],
                "schema": ns["schema"],
                "batch_delay": "200ms",
                "topics": ["agg_1m", "readings"],
            }
        ],
        "alerts": {
            "rules": [
                # Active from the first reading, so the test has an alarm to acknowledge.
                {"id": "always", "match": SERIES, "levels": [{"severity": "medium", "above": -1000}]}
            ]
        },
        "simulate": {
            "source": "site-mqtt",
            "rate": 1,
            "scenarios": [{"kind": "ahu", "site": "hq", "devices": 1}],
        },
    }


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make setup installs it)"
)
def test_the_page_shows_live_values_closed_minutes_and_takes_an_ack(
    namespace: dict[str, str], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    topo_file = tmp_path / "web.yaml"
    topo_file.write_text(yaml.safe_dump(topology(namespace)))
    deploy_cli(topo_file)
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        tenancy.add_tenant(conn, schema, "hq-ops", ["hq"])
        token, _ = tenancy.create_token(conn, schema, "hq-ops", "browser-test", None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = [
        spawn(["simulate", str(topo_file)], tmp_path / "simulate.log"),
        spawn(["connect", str(topo_file)], tmp_path / "connect.log"),
        spawn(["worker", str(topo_file)], tmp_path / "worker.log"),
        spawn(["serve", str(topo_file), "--port", str(port)], tmp_path / "serve.log"),
    ]
    try:

        def live() -> bool:
            try:
                return httpx.get(f"{base}/api/health", timeout=10).json()["live"]["status"] == "ok"
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_for(live, 60, "plantstream serve")
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(
            lambda: httpx.get(f"{base}/api/alarms", headers=auth, timeout=10).json(), 90, "the alarm, active"
        )
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: d.accept("seen in the browser test"))
            page.goto(f"{base}/#token={token}")
            # A live value: the row shows one, then another.
            cell = page.locator(f'tr[data-series="{SERIES}"] td.value')
            cell.wait_for(timeout=30_000)
            page.wait_for_function(
                's => { const c = document.querySelector(`tr[data-series="${s}"] td.value`);'
                " return c && c.textContent !== ''; }",
                arg=SERIES,
                timeout=30_000,
            )
            first = cell.text_content()
            first_ts = page.locator(f'tr[data-series="{SERIES}"]').get_attribute("data-ts")
            page.wait_for_function(
                '([s, ts]) => document.querySelector(`tr[data-series="${s}"]`).dataset.ts !== ts',
                arg=[SERIES, first_ts],
                timeout=30_000,
            )
            assert page.locator("#status").text_content() == "live"
            # A closed minute arrives on the stream.
            page.locator("#aggs tbody tr").first.wait_for(timeout=100_000)
            assert page.locator("#aggs tbody tr").count() >= 1
            # Acknowledge the alarm; the journal shows who and why.
            button = page.locator(f'#alarms tr[data-instance="{ALARM}"] button.ack')
            button.wait_for(timeout=30_000)
            assert button.is_enabled()
            button.click()
            acked = page.locator(f'#journal tbody tr[data-transition="ack"]:has-text("{ALARM}")')
            acked.first.wait_for(timeout=60_000)
            row = acked.first.text_content() or ""
            assert "browser-test@hq-ops" in row and "seen in the browser test" in row
            page.locator(f'#alarms tr[data-instance="{ALARM}"][data-state="acked"]').wait_for(timeout=30_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("PLANTSTREAM_SCREENSHOTS"):
            shutil.copy(shot, Path(os.environ["PLANTSTREAM_SCREENSHOTS"]) / "dashboard.png")
        print(f"screenshot: {shot}; first value {first}", file=sys.stderr)
        assert errors == []
    finally:
        stop(procs)
        time.sleep(0.5)
