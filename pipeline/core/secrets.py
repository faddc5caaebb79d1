"""Secrets out of anything printed: connection strings and ``key=value`` settings lose their passwords."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]*@")
_KV_PASSWORD = re.compile(
    r"((?:password|passwd|sasl\.password|ssl\.key\.password)\s*[=:]\s*)('[^']*'|\S+)", re.I
)


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and ``password=...`` replaced."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
