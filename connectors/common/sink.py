"""The interface every database sink implements, and what the sink stage hands it.

A sink is a folder under ``connectors/`` (config model, row mapping, writer, README) and a line in
:mod:`connectors.registry`. The sink stage (``pipeline/stages/sinks.py``) consumes a table's topic, decodes
the records and calls :meth:`SinkWriter.write` with a batch; the writer stores the rows *and* the batch's
source offsets in one durable step, so that a replayed batch changes nothing, and hands back what the
database refused for good (those records go to the dead-letter topic, the rest is written). Only after
``write`` returned are the input offsets committed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """One decoded input record with its Kafka position.

    ``record`` is, by table: ``agg_1m`` an Aggregate, ``readings`` a validated ReadingBatch (one entry, many
    rows), ``kpi_results`` a LoopKpi, ``write_commands`` a CommandResult (schemas/ has them all).
    """

    partition: int
    offset: int
    record: Any
    source: bytes | None = None  # the original bytes, for the dead-letter topic


@dataclass(frozen=True, slots=True)
class Refused:
    partition: int
    offset: int
    payload: Any  # what the dead letter carries: the original bytes, or the refused row
    reason: str


@dataclass
class WriteResult:
    written: int = 0
    skipped: int = 0  # at or below the stored offsets: a replay
    refused: list[Refused] = field(default_factory=list)


class SinkWriter(Protocol):
    """One sink's connection to its database."""

    tables: frozenset[str]  # the tables this database can hold

    def deploy(self, tables: Sequence[str], say: Callable[[str], None]) -> dict[str, str]:
        """Create what the tables need (idempotent); returns table -> how it is stored."""
        ...

    async def write(self, table: str, topic: str, entries: Sequence[Entry]) -> WriteResult:
        """Rows and source offsets in one durable step; retries temporary errors itself."""
        ...

    def forget(self, partitions: Sequence[int]) -> None:
        """Input partitions were assigned or taken away: drop what the writer keeps in memory about them."""
        ...

    async def close(self) -> None: ...
