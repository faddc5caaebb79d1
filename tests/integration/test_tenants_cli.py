"""The tenant and token verbs of the CLI on the real PostgreSQL: what they print and what they refuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.e2e.test_mqtt_to_postgres import deploy_cli

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_tenants_roles_and_tokens_from_the_command_line(namespace: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": f"cli{namespace['tag']}",
                "prefix": namespace["prefix"],
                "broker": {"bootstrap": namespace["PLANTSTREAM_KAFKA"], "partitions": 1},
                "sinks": [
                    {
                        "id": "pg",
                        "type": "postgres",
                        "dsn": namespace["PLANTSTREAM_PG_DSN"],
                        "schema": namespace["schema"],
                    }
                ],
            }
        )
    )
    deploy_cli(f)
    t = ["-t", str(f)]
    assert cli("tenants", "add", "acme", "--site", "hq", "--site", "depot", *t).returncode == 0
    refused = cli("tenants", "add", "other", "--site", "hq", *t)
    assert refused.returncode == 2 and "site 'hq' belongs to tenant 'acme'" in refused.stderr
    role = f"{namespace['schema']}_grafana"
    done = cli("tenants", "role", "acme", role, *t, env={"PLANTSTREAM_ROLE_PASSWORD": "pw-secret"})
    assert done.returncode == 0 and f"{namespace['schema']}_tenant" in done.stdout
    assert "pw-secret" not in done.stdout + done.stderr
    listed = cli("tenants", "list", *t).stdout
    assert "acme" in listed and "depot, hq" in listed and role in listed
    assert cli("tokens", "create", "nobody", *t).returncode == 2
    made = cli("tokens", "create", "acme", "--name", "ops", "--expires", "90d", *t)
    token = made.stdout.strip()
    assert made.returncode == 0 and token.startswith("pst_") and "expires" in made.stderr
    token_id = token.split("_")[1]
    tokens = cli("tokens", "list", *t).stdout
    assert token_id in tokens and token.split("_", 2)[2] not in tokens  # never the secret
    assert cli("tokens", "revoke", token_id, *t).stdout.strip() == f"token {token_id} revoked"
    assert cli("tokens", "revoke", token_id, *t).stdout.strip() == f"no active token {token_id}"
    with psycopg.connect(namespace["PLANTSTREAM_PG_DSN"]) as conn:
        row = conn.execute(
            f'SELECT revoked_at IS NOT NULL FROM "{namespace["schema"]}".api_tokens'
        ).fetchone()
    assert row == (True,)
