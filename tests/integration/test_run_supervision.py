"""``plantstream run`` supervises its children: a child killed is started again, and SIGTERM to ``run`` (as
systemd or a terminal sends) stops every child instead of leaving them orphaned."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import deploy_cli

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each child of ``pid``."""
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return {}
    out = {}
    for c in pids:
        try:
            out[int(c)] = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_run_restarts_a_dead_child_and_stops_all_on_sigterm(
    namespace: dict[str, str], tmp_path: Path
) -> None:
    root = namespace["mqtt_root"]
    topo = {
        "name": f"run{namespace['tag']}",
        "prefix": namespace["prefix"],
        "broker": {"bootstrap": namespace["PLANTSTREAM_KAFKA"], "partitions": 1},
        "sources": [
            {
                "id": "m",
                "type": "mqtt",
                "url": namespace["PLANTSTREAM_MQTT_URL"],
                "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
            }
        ],
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": namespace["PLANTSTREAM_PG_DSN"],
                "schema": namespace["schema"],
            }
        ],
    }
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(topo))
    deploy_cli(f)
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(f)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        kids = wait_for(lambda: (k := children(run.pid)) and len(k) == 2 and k, 30, "connect and worker")
        worker = next(pid for pid, cmd in kids.items() if " worker " in cmd)
        subprocess.run(["kill", "-9", str(worker)], check=True)
        again = wait_for(
            lambda: [p for p, cmd in children(run.pid).items() if " worker " in cmd and p != worker],
            30,
            "a new worker",
        )
        everyone = [*kids, *again]
        run.send_signal(signal.SIGTERM)
        assert run.wait(45) == 0
        wait_for(lambda: not any(alive(p) for p in everyone), 5, "no child left")
    finally:
        if run.poll() is None:
            run.kill()
        for p in children(run.pid):
            subprocess.run(["kill", "-9", str(p)], check=False)
        time.sleep(0.2)
