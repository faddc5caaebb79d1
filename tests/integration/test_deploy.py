"""`deploy` against the real broker and database: topics, their settings, idempotence."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.deploy import deploy
from pipeline.topology import validate_data

pytestmark = pytest.mark.integration


def test_deploy_is_idempotent_and_event_time_topics_keep_backfills(namespace):
    topo = validate_data(
        {
            "name": f"dep{namespace['tag']}",
            "prefix": namespace["prefix"],
            "broker": {"bootstrap": namespace["PLANTSTREAM_KAFKA"], "partitions": 3},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": namespace["PLANTSTREAM_PG_DSN"],
                    "schema": namespace["schema"],
                }
            ],
        }
    )
    first = deploy(topo, say=lambda _m: None)
    second = deploy(topo, say=lambda _m: None)
    assert first[f"topic {topo.raw_topic}"] == "created"
    assert second[f"topic {topo.raw_topic}"] == "exists"
    admin = AdminClient({"bootstrap.servers": namespace["PLANTSTREAM_KAFKA"]})
    meta = admin.list_topics(timeout=10).topics
    assert len(meta[topo.raw_topic].partitions) == 3
    res = [
        ConfigResource(ConfigResource.Type.TOPIC, t)
        for t in (topo.raw_topic, topo.agg_topic, topo.latest_topic)
    ]
    configs = {r.name: f.result(15) for r, f in admin.describe_configs(res).items()}
    # Records carry event time: time-based retention would delete a backfill of old data at once.
    for t in (topo.raw_topic, topo.agg_topic):
        assert configs[t]["retention.ms"].value == "-1"
        assert int(configs[t]["retention.bytes"].value) > 0
    assert configs[topo.latest_topic]["cleanup.policy"].value == "compact"
    for fut in admin.delete_topics([t for t in meta if t.startswith(namespace["prefix"])]).values():
        fut.result(30)
