"""Secure channel set-up: Basic256Sha256 Sign / SignAndEncrypt, the trusted server certificate, TOFU.

The server certificate the client trusts is a file. With ``trust_on_first_use`` the file is written from
the endpoint the server presents the first time and insisted on afterwards; otherwise it must exist.
Either way the certificate the server presents now is compared with the file before connecting, so a
replaced server certificate is reported as such rather than as an obscure decryption failure.
"""

from __future__ import annotations

import logging

from asyncua import Client, ua
from asyncua.crypto import security_policies, uacrypto
from cryptography.hazmat.primitives.serialization import Encoding

from connectors.common.errors import FatalError
from connectors.opcua.config import Security

log = logging.getLogger("plantstream.opcua")

_POLICIES = {"Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256}
_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}


def first_certificate(der: bytes) -> bytes:
    """The leaf of a DER certificate chain (a server may send its chain concatenated)."""
    if len(der) < 4:
        return der
    length = int.from_bytes(der[2:4], "big") + 4
    return der[:length]


async def _presented(client: Client, sec: Security) -> bytes:
    """The server certificate of the endpoint matching our policy and mode (over an unsecured channel)."""
    policy = _POLICIES[sec.policy]
    mode = _MODES[sec.mode]
    endpoints = await client.connect_and_get_server_endpoints()
    for ep in endpoints:
        if ep.SecurityPolicyUri == policy.URI and ep.SecurityMode == mode:
            if not ep.ServerCertificate:
                raise FatalError(f"the server's {sec.policy}/{sec.mode} endpoint carries no certificate")
            return first_certificate(ep.ServerCertificate)
    offered = sorted({f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints})
    raise FatalError(
        f"the server offers no {sec.policy}/{sec.mode} endpoint; it offers: {', '.join(offered)}"
        " (change security.policy/security.mode)"
    )


async def configure(client: Client, sec: Security, source_id: str) -> None:
    """Apply the configured security to a fresh client; raises FatalError with the fix in the message."""
    client.application_uri = sec.application_uri
    if sec.policy == "None":
        return
    assert sec.certificate is not None and sec.private_key is not None and sec.server_certificate is not None
    for what, path in (("certificate", sec.certificate), ("private_key", sec.private_key)):
        if not path.is_file():
            raise FatalError(f"security.{what}: {path} does not exist")
    presented = await _presented(client, sec)
    path = sec.server_certificate
    if path.is_file():
        trusted = (await uacrypto.load_certificate(str(path))).public_bytes(Encoding.DER)
        if trusted != presented:
            how = (
                f"delete {path} to trust the new one on the next connect"
                if sec.trust_on_first_use
                else f"replace {path} with the server's new certificate if the change is legitimate"
            )
            raise FatalError(
                f"the server presents a certificate different from the trusted one in {path}: {how}"
            )
    elif sec.trust_on_first_use:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(presented)
        log.warning("source %s: trusting the server certificate on first use; stored in %s", source_id, path)
    else:
        raise FatalError(
            f"security.server_certificate: {path} does not exist (copy the server's certificate "
            "there, or set trust_on_first_use: true)"
        )
    password = sec.private_key_password.get_secret_value() if sec.private_key_password else None
    try:
        await client.set_security(
            _POLICIES[sec.policy],
            str(sec.certificate),
            str(sec.private_key),
            password,
            str(path),
            _MODES[sec.mode],
        )
    except (ValueError, TypeError, OSError) as e:
        raise FatalError(
            f"cannot load the client certificate or key ({sec.certificate}, {sec.private_key}): {e}"
        ) from None
