"""broker.security: secrets only from the environment and never echoed, the librdkafka settings per role,
and the ACLs deploy grants."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AclOperation

from pipeline import topology as t
from pipeline.core.kafka import client_config
from pipeline.core.secrets import redact_text
from pipeline.deploy import acl_bindings

PASSWORD = "s3cr3t-Pa55word"

SECURED = """
name: sec
broker:
  bootstrap: kafka:9094
  security:
    protocol: SASL_SSL
    sasl_mechanism: SCRAM-SHA-256
    username: plantstream
    password: {password}
    commands_username: commander
    commands_password: ${{CMD_PW}}
    ca_file: {ca}
sources:
  - {{id: bms, type: bacnet, local_address: 127.0.0.1/8:47808, site: s, discovery: {{low: 1, high: 2}}}}
"""


def write(tmp_path: Path, password: str = "${KAFKA_PW}", **replace: str) -> Path:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    text = SECURED.format(password=password, ca=ca)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


ENV = {"KAFKA_PW": PASSWORD, "CMD_PW": "cmd-" + PASSWORD}


def test_a_literal_password_is_refused_naming_the_field_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(t.TopologyError) as e:
        t.load(write(tmp_path, password=PASSWORD), env=ENV)
    text = str(e.value)
    assert "broker.security.password" in text and "${" in text and "environment variable" in text
    assert PASSWORD not in text


def test_a_default_in_the_reference_is_a_literal_too(tmp_path: Path) -> None:
    with pytest.raises(t.TopologyError, match=r"broker\.security\.password"):
        t.load(write(tmp_path, password="${KAFKA_PW:-" + PASSWORD + "}"), env=ENV)


def test_a_reference_is_expanded_and_never_shown(tmp_path: Path) -> None:
    topo = t.load(write(tmp_path), env=ENV)
    sec = topo.broker.security
    assert sec.password is not None and sec.password.get_secret_value() == PASSWORD
    for shown in (repr(topo), str(topo), topo.model_dump_json(), repr(client_config(topo.broker))):
        assert PASSWORD not in shown


def test_a_missing_variable_names_it(tmp_path: Path) -> None:
    with pytest.raises(t.TopologyError, match="KAFKA_PW is not set"):
        t.load(write(tmp_path), env={"CMD_PW": "x"})


def test_client_config_per_role(tmp_path: Path) -> None:
    topo = t.load(write(tmp_path), env=ENV)
    pipe = client_config(topo.broker)
    assert pipe == {
        "bootstrap.servers": "kafka:9094",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "plantstream",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.endpoint.identification.algorithm": "https",
    }
    cmd = client_config(topo.broker, "commands")
    assert (cmd["sasl.username"], cmd["sasl.password"]) == ("commander", "cmd-" + PASSWORD)
    # No admin credentials of its own: deploy uses the pipeline's.
    assert client_config(topo.broker, "admin")["sasl.username"] == "plantstream"


def test_plaintext_is_the_default() -> None:
    topo = t.validate_data({"name": "x"})
    assert client_config(topo.broker) == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "PLAINTEXT",
    }
    assert acl_bindings(topo) == []


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ({"protocol: SASL_SSL": "protocol: SASL_TLS"}, "broker.security.protocol"),
        ({"protocol: SASL_SSL": "protocol: SASL_PLAINTEXT"}, "ca_file need protocol SSL or SASL_SSL"),
        ({"    username: plantstream\n": ""}, "needs username and password"),
        ({"    commands_password: ${CMD_PW}\n": ""}, "commands_username and commands_password go together"),
        ({"ca.pem": "nowhere.pem"}, "ca_file: no such file"),
        ({"ssl_check_hostname": "x", "    ca_file": "    ssl_verify: false\n    ca_file"}, "unknown key"),
    ],
)
def test_bad_security_settings_name_the_field(tmp_path: Path, replace: dict[str, str], expected: str) -> None:
    with pytest.raises(t.TopologyError) as e:
        t.load(write(tmp_path, **replace), env=ENV)
    assert expected in str(e.value)
    assert PASSWORD not in str(e.value)


def test_a_wrong_type_for_a_secret_is_not_echoed() -> None:
    data = {
        "name": "x",
        "broker": {"security": {"protocol": "SASL_SSL", "username": "u", "password": 12345678987654321}},
    }
    with pytest.raises(t.TopologyError) as e:
        t.validate_data(data)
    assert "broker.security.password" in str(e.value) and "12345678987654321" not in str(e.value)


def test_acls_keep_commands_to_the_commands_principal(tmp_path: Path) -> None:
    topo = t.load(write(tmp_path), env=ENV)
    acls = acl_bindings(topo)
    on_commands = {(a.principal, a.operation) for a in acls if a.name == "commands.bacnet"}
    assert ("User:commander", AclOperation.WRITE) in on_commands
    assert ("User:plantstream", AclOperation.READ) in on_commands
    assert not {op for who, op in on_commands if who == "User:plantstream"} & {
        AclOperation.WRITE,
        AclOperation.ALL,
    }
    # No prefixed pattern of the pipeline's covers commands.bacnet.
    prefixes = [
        a.name
        for a in acls
        if a.principal == "User:plantstream" and a.resource_pattern_type.name == "PREFIXED"
    ]
    assert not any("commands.bacnet".startswith(p) for p in prefixes if not p.startswith("plantstream-"))


def test_redact_text() -> None:
    assert redact_text("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_text("host=h password=pw user=u") == "host=h password=*** user=u"
    assert redact_text("postgresql://u@h/db") == "postgresql://u@h/db"
