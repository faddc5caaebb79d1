"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Iterator


def delays(initial: float = 0.2, cap: float = 10.0, factor: float = 2.0) -> Iterator[float]:
    d = initial
    while True:
        yield random.uniform(d / 2, d)
        d = min(cap, d * factor)
