"""Read back what a connector delivered to telemetry.raw and telemetry.dlq (shared by connector tests)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer

from pipeline.core import codec
from pipeline.core.records import now_ms, validate_batch
from pipeline.topology import Topology


class Topics:
    """Everything that reaches telemetry.raw and telemetry.dlq, read back from Kafka."""

    def __init__(self, topo: Topology) -> None:
        self.raw_topic, self.dlq_topic = topo.raw_topic, topo.dlq_topic
        self.c = Consumer(
            {
                "bootstrap.servers": topo.broker.bootstrap,
                "group.id": f"t-{topo.prefix}{now_ms()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.c.subscribe([self.raw_topic, self.dlq_topic])
        self.batches: list[dict[str, Any]] = []
        self.dead: list[dict[str, Any]] = []

    def poll(self) -> None:
        for msg in self.c.consume(1000, 0.2):
            if msg.error() is None:
                if msg.topic() == self.raw_topic:
                    # Connectors write version 2 (columns); the tests read readings as version 1 has them.
                    self.batches.append(validate_batch(codec.loads(msg.value()))[0])
                else:
                    self.dead.append(codec.loads(msg.value()))

    def series(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for b in self.batches:
            for r in b["readings"]:
                out.setdefault(f"{b['site']}/{b['device']}/{r['point']}", []).append(r)
        return out

    def close(self) -> None:
        self.c.close()
