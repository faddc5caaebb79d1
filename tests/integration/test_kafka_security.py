"""Kafka over SASL_SSL with SCRAM users and ACLs, on a private broker of the harness (its own directory and
ports, so the shared broker is never reconfigured): the pipeline end to end, refused clients, the ACL on
commands.bacnet, and passwords that appear in no output."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from connectors.common.producer import TelemetryProducer
from localservices import harness
from pipeline.control import send_command
from pipeline.core.commands import make_command
from pipeline.core.kafka import DeliveryFailed, Outbox, client_config
from pipeline.deploy import deploy
from pipeline.topology import Topology, load
from pipeline.worker import build_worker
from tests.integration.test_event_time import complete, minute_now, send, series_of
from tests.reference import compare, expected_aggregates

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults

PLANTSTREAM = str(Path(sys.executable).with_name("plantstream"))

TOPOLOGY = """
name: sec{tag}
prefix: "{prefix}"
broker:
  bootstrap: ${{PLANTSTREAM_KAFKA_SASL}}
  partitions: 2
  security:
    protocol: SASL_SSL
    sasl_mechanism: SCRAM-SHA-512
    username: ${{PLANTSTREAM_KAFKA_USERNAME}}
    password: ${{PLANTSTREAM_KAFKA_PASSWORD}}
    commands_username: ${{PLANTSTREAM_KAFKA_COMMANDS_USERNAME}}
    commands_password: ${{PLANTSTREAM_KAFKA_COMMANDS_PASSWORD}}
    admin_username: ${{PLANTSTREAM_KAFKA_ADMIN_USERNAME}}
    admin_password: ${{PLANTSTREAM_KAFKA_ADMIN_PASSWORD}}
    ca_file: ${{PLANTSTREAM_KAFKA_CA}}
aggregates: {{grace: 10s, idle_timeout: 2s, checkpoint_interval: 300ms}}
sources:
  - {{id: bms, type: bacnet, local_address: 127.0.0.1/8:47808, site: site, discovery: {{low: 1, high: 2}}}}
sinks:
  - {{id: pg, type: postgres, dsn: "{dsn}", schema: "{schema}", topics: [agg_1m], batch_delay: 100ms}}
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private Kafka with the SASL_SSL listener; its :func:`harness.kafka_security_env` variables."""
    root = tmp_path_factory.mktemp("kafka-sasl")
    (root / "kafka").mkdir()
    # The broker jars of the shared services, so the private instance needs no download.
    (root / "kafka" / "libs").symlink_to(harness.local_dir() / "kafka" / "libs")
    kafka, controller, sasl = _free_ports(3)
    ports = harness.Ports(kafka=kafka, kafka_controller=controller, kafka_sasl=sasl)
    env = {
        **os.environ,
        "PLANTSTREAM_LOCAL_DIR": str(root),
        "PLANTSTREAM_KAFKA_PORT": str(kafka),
        "PLANTSTREAM_KAFKA_CONTROLLER_PORT": str(controller),
        "PLANTSTREAM_KAFKA_SASL_PORT": str(sasl),
    }
    up = subprocess.run(
        [PLANTSTREAM, "services", "up", "kafka"], env=env, capture_output=True, text=True, timeout=240
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield harness.kafka_security_env(ports, root)
    finally:
        subprocess.run([PLANTSTREAM, "services", "down", "kafka"], env=env, capture_output=True, timeout=120)


def _secrets(sec: dict[str, str]) -> list[str]:
    return [v for k, v in sec.items() if k.endswith("_PASSWORD")]


@pytest.fixture
def secured(namespace: dict[str, str], secure_kafka: dict[str, str], tmp_path: Path) -> Path:
    """The topology file of this test, every credential a reference to the environment."""
    path = tmp_path / "secured.yaml"
    text = TOPOLOGY.format(
        tag=namespace["tag"],
        prefix=namespace["prefix"],
        dsn=namespace["PLANTSTREAM_PG_DSN"],
        schema=namespace["schema"],
    )
    path.write_text(text)
    return path


def _load(path: Path, sec: dict[str, str], **changes: str) -> Topology:
    env = {k: v for k, v in os.environ.items() if k != "PLANTSTREAM_KAFKA"}  # the file names the broker
    return load(path, env={**env, **sec, **changes})


def test_the_pipeline_end_to_end_over_sasl_ssl(
    secured: Path,
    secure_kafka: dict[str, str],
    namespace: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    topo = _load(secured, secure_kafka)
    assert topo.broker.bootstrap == secure_kafka["PLANTSTREAM_KAFKA_SASL"]
    said: list[str] = []
    deploy(topo, say=said.append)
    assert any("acls: User:plantstream" in m for m in said), said
    assert any("acls: User:commander" in m for m in said), said
    start = minute_now() - 120_000
    readings = series_of("d1", start, 120) + series_of("d2", start, 120)
    producer = TelemetryProducer(
        topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic, extra=client_config(topo.broker)
    )
    send(producer, readings)
    assert producer.flush(30) == 0
    worker = build_worker(topo)  # the app id deploy granted the ACLs for
    worker.start()
    try:
        expected = expected_aggregates(readings)
        assert compare(complete(namespace, expected), expected) == []
    finally:
        worker.stop()
    out, err = capfd.readouterr()
    for secret in _secrets(secure_kafka):
        assert secret not in caplog.text and secret not in out and secret not in err


def _error_of(conf: dict[str, Any], timeout: float = 8.0) -> tuple[KafkaException | None, list[KafkaError]]:
    """What a metadata request with ``conf`` raises, and the errors librdkafka reported meanwhile."""
    errors: list[KafkaError] = []
    admin = AdminClient({**conf, "error_cb": errors.append, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as e:
        admin.poll(1)  # serves error_cb
        return e, errors
    return None, errors


def test_clients_without_the_right_credentials_are_refused(
    secured: Path, secure_kafka: dict[str, str], tmp_path: Path
) -> None:
    topo = _load(secured, secure_kafka)
    good = client_config(topo.broker)
    assert _error_of(good)[0] is None
    # No SASL and no TLS on the SASL_SSL port: the broker never answers a metadata request.
    raised, _ = _error_of({"bootstrap.servers": secure_kafka["PLANTSTREAM_KAFKA_SASL"]})
    assert raised is not None
    # TLS without SASL: the same.
    raised, _ = _error_of({**good, "security.protocol": "SSL"})
    assert raised is not None
    wrong = client_config(_load(secured, secure_kafka, PLANTSTREAM_KAFKA_PASSWORD="not-the-password").broker)
    raised, errors = _error_of(wrong)
    assert raised is not None
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    # Another CA than the broker's: the broker is not trusted, TLS fails before any password is sent.
    other = tmp_path / "other-ca.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other"),
            *("-keyout", str(tmp_path / "k.pem"), "-out", str(other)),
        ],
        check=True,
        capture_output=True,
    )
    raised, errors = _error_of({**good, "ssl.ca.location": str(other)})
    assert raised is not None
    assert any(e.code() == KafkaError._SSL for e in errors), errors


def test_only_the_commands_principal_may_write_commands(secured: Path, secure_kafka: dict[str, str]) -> None:
    topo = _load(secured, secure_kafka)
    deploy(topo, say=lambda m: None)
    cmd = make_command("site/ahu1/SAT-SP", 18.5, 8, "test")
    pipeline = Outbox(client_config(topo.broker), "t-pipeline", {"linger.ms": 0})
    pipeline.produce(topo.commands_topic, b"site/ahu1/SAT-SP", b"{}")
    with pytest.raises(DeliveryFailed, match=r"TOPIC_AUTHORIZATION_FAILED|Topic authorization failed"):
        pipeline.flush_sync(30)
    # The pipeline principal may still read commands (the BACnet executor does) and write everything else.
    ok = Outbox(client_config(topo.broker), "t-pipeline-raw", {"linger.ms": 0})
    ok.produce(topo.raw_topic, b"k", b"{}")
    ok.flush_sync(30)
    assert send_command(topo, cmd, wait=None) is None  # as the commands principal: delivered


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLANTSTREAM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_no_password_is_printed_by_the_cli_even_on_errors(
    secured: Path, secure_kafka: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PLANTSTREAM_KAFKA"}
    env.update(secure_kafka)
    secrets = _secrets(secure_kafka)
    outputs = []
    ok = _run(["validate", str(secured)], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    outputs.append(ok.stdout + ok.stderr)
    deployed = _run(["deploy", str(secured)], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    outputs.append(deployed.stdout + deployed.stderr)
    # Wrong admin password: deploy fails with the broker's reason.
    wrong = _run(["deploy", str(secured)], {**env, "PLANTSTREAM_KAFKA_ADMIN_PASSWORD": "wr0ng-" + secrets[0]})
    assert wrong.returncode != 0
    outputs.append(wrong.stdout + wrong.stderr)
    secrets.append("wr0ng-" + secrets[0])
    # A literal password in the file: refused, naming the field and the fix, without repeating it.
    literal = tmp_path / "literal.yaml"
    literal.write_text(secured.read_text().replace("${PLANTSTREAM_KAFKA_PASSWORD}", secrets[0]))
    refused = _run(["validate", str(literal)], env)
    assert refused.returncode != 0
    assert "broker.security.password" in refused.stdout + refused.stderr
    outputs.append(refused.stdout + refused.stderr)
    # A bad value beside the secrets (protocol): the error shows the value found, never a password.
    bad = tmp_path / "bad.yaml"
    bad.write_text(secured.read_text().replace("protocol: SASL_SSL", "protocol: SASL_TLS"))
    invalid = _run(["validate", str(bad)], env)
    assert invalid.returncode != 0 and "SASL_TLS" in invalid.stdout + invalid.stderr
    outputs.append(invalid.stdout + invalid.stderr)
    # A worker at DEBUG with a wrong password, until its first authentication error is reported.
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [PLANTSTREAM, "worker", str(secured), "--loglevel", "debug"],
            env={**env, "PLANTSTREAM_KAFKA_PASSWORD": secrets[-1]},
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "uthentication" not in log.read_text():
                if proc.poll() is not None:
                    break
                time.sleep(0.3)
        finally:
            proc.terminate()
            proc.wait(30)
    text = log.read_text()
    assert "uthentication" in text, text[-2000:]
    outputs.append(text)
    for secret in secrets:
        for out in outputs:
            assert secret not in out
