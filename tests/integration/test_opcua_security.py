"""OPC UA security against the simulated plant.

Basic256Sha256 Sign and SignAndEncrypt with a username, trust on first use of the server certificate, and
clear errors for a wrong password or a changed server certificate.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from connectors.sim import launch
from tests.conftest import wait_for
from tests.integration.readback import Topics
from tests.integration.test_opcua import NSU, Running, make_topology

pytestmark = pytest.mark.integration
CLIENT_URI = "urn:plantstream:client"


def make_cert(directory: Path, name: str, uri: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}-cert.der", directory / f"{name}-key.pem"
    asyncio.run(
        setup_self_signed_certificate(
            key, cert, uri, socket.gethostname(), [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": name}
        )
    )
    return cert, key


@pytest.fixture
def secure_plant(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    pki = tmp_path / "server-pki"
    proc = launch.start_opcua_plant(
        endpoint,
        args=[
            "--loops",
            "4",
            "--tanks",
            "2",
            "--security",
            "--no-none",
            "--user",
            "operator:s3cret",
            "--pki",
            str(pki),
        ],
        log=tmp_path / "plant.log",
    )
    yield endpoint, pki / "server-cert.der"
    launch.stop(proc)


def source(
    endpoint: str, cert: Path, key: Path, trusted: Path, *, mode: str, password: str, tofu: bool
) -> dict[str, Any]:
    return {
        "id": "secure",
        "type": "opcua",
        "endpoint": endpoint,
        "site": "s",
        "security": {
            "policy": "Basic256Sha256",
            "mode": mode,
            "certificate": str(cert),
            "private_key": str(key),
            "server_certificate": str(trusted),
            "trust_on_first_use": tofu,
            "application_uri": CLIENT_URI,
        },
        "username": "operator",
        "password": password,
        "nodes": [{"node_id": f"{NSU};s=Plant/Loops/FIC101/PV", "device": "FIC101", "point": "PV"}],
    }


def stream_once(namespace: dict[str, str], src: dict[str, Any]) -> Running:
    topo = make_topology(namespace, src)
    topics = Topics(topo)
    run = Running(topo)
    try:

        def arrived() -> bool:
            topics.poll()
            return len(topics.series().get("s/FIC101/PV", [])) >= 2

        wait_for(arrived, 30, f"readings over {src['security']['mode']}")
    finally:
        run.close()
        topics.close()
    assert run.runner.fatal is None
    return run


def test_sign_and_encrypt_with_username_and_trust_on_first_use(
    namespace: dict[str, str], tmp_path: Path, secure_plant: tuple[str, Path]
) -> None:
    endpoint, server_cert = secure_plant
    cert, key = make_cert(tmp_path, "client", CLIENT_URI)
    trusted = tmp_path / "trust" / "server.der"
    stream_once(
        namespace, source(endpoint, cert, key, trusted, mode="SignAndEncrypt", password="s3cret", tofu=True)
    )
    assert trusted.read_bytes() == server_cert.read_bytes(), (
        "TOFU must store the certificate the server presented"
    )
    # Second time: the stored certificate is the trusted one, now over Sign only and without TOFU.
    stream_once(namespace, source(endpoint, cert, key, trusted, mode="Sign", password="s3cret", tofu=False))


def test_wrong_password_stops_with_a_clear_error(
    namespace: dict[str, str], tmp_path: Path, secure_plant: tuple[str, Path]
) -> None:
    endpoint, _ = secure_plant
    cert, key = make_cert(tmp_path, "client", CLIENT_URI)
    topo = make_topology(
        namespace,
        source(
            endpoint, cert, key, tmp_path / "server.der", mode="SignAndEncrypt", password="wrong", tofu=True
        ),
    )
    run = Running(topo)
    run.thread.join(30)
    assert not run.thread.is_alive(), "a refused user must stop the source rather than retry forever"
    fatal = run.runner.fatal or ""
    assert "refused the user 'operator'" in fatal and "check username and password" in fatal, fatal
    assert "BadUserAccessDenied" in fatal and "wrong" not in fatal
    run.close()


def test_changed_server_certificate_is_refused(
    namespace: dict[str, str], tmp_path: Path, secure_plant: tuple[str, Path]
) -> None:
    endpoint, _ = secure_plant
    cert, key = make_cert(tmp_path, "client", CLIENT_URI)
    other, _ = make_cert(tmp_path, "impostor", "urn:someone:else")
    topo = make_topology(
        namespace, source(endpoint, cert, key, other, mode="SignAndEncrypt", password="s3cret", tofu=True)
    )
    run = Running(topo)
    run.thread.join(30)
    assert not run.thread.is_alive()
    fatal = run.runner.fatal or ""
    assert "different from the trusted one" in fatal and str(other) in fatal, fatal
    run.close()
