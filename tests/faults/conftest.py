"""The fault-injection suite. ``make test`` runs each scenario short; ``make faults`` runs them at the
lengths of the operations figures (``PLANTSTREAM_FAULTS=full``): ten-minute outages, kills for ten minutes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.services import Private, private

FULL = os.environ.get("PLANTSTREAM_FAULTS", "").strip().lower() == "full"


def length(short: float, full: float) -> float:
    """Seconds of a fault: ``short`` in ``make test``, ``full`` in ``make faults``."""
    return full if FULL else short


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            if FULL:  # ten-minute faults, then the catch-up: past the suite's 10-minute bound per test
                item.add_marker(pytest.mark.timeout(45 * 60))


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[Private]:
    """A private Kafka the scenario may stop and start."""
    with private(tmp_path / "services", "kafka") as svc:
        yield svc
