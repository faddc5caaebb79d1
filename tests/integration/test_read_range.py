"""The direct reader the aggregation agent uses to recover input offsets its consumer skipped."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.core.kafka import read_range

pytestmark = pytest.mark.integration


def test_read_range_returns_exactly_the_asked_offsets_in_order(namespace):
    bootstrap = namespace["PLANTSTREAM_KAFKA"]
    topic = f"{namespace['prefix']}range"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(20):
        p.produce(topic, f"v{i}".encode(), f"k{i}".encode(), partition=1)
    p.flush(30)
    got = read_range(bootstrap, topic, 1, 5, 12)
    assert [m.offset for m in got] == list(range(5, 13))
    assert [m.value for m in got] == [f"v{i}".encode() for i in range(5, 13)]
    assert all(m.partition == 1 and m.topic == topic for m in got)
    assert read_range(bootstrap, topic, 0, 0, 3, timeout=2) == []  # an empty partition: nothing, no hang
    admin.delete_topics([topic])[topic].result(30)
