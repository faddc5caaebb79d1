"""The local services answer real requests, and ``up()`` is idempotent.

down() is deliberately not exercised here: other tests share the running services.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from localservices import harness as services

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoints() -> dict[str, str]:
    return services.up(progress=lambda _message: None)


@pytest.fixture()
def run_id() -> str:
    return uuid.uuid4().hex[:12]


def test_up_returns_connection_strings(endpoints: dict[str, str]) -> None:
    env = services.connection_env()
    assert set(endpoints) == set(services.SERVICE_NAMES)
    assert endpoints["kafka"] == env["PLANTSTREAM_KAFKA"]
    assert endpoints["postgres"] == env["PLANTSTREAM_PG_DSN"]
    assert endpoints["mosquitto"] == env["PLANTSTREAM_MQTT_URL"]
    assert endpoints["influxdb"] == env["PLANTSTREAM_INFLUX_URL"]


def test_kafka_create_list_produce_consume(endpoints: dict[str, str], run_id: str) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap = endpoints["kafka"]
    topic = f"plantstream-selftest-{run_id}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)]).values():
        future.result(timeout=30)
    try:
        deadline = time.monotonic() + 30
        while topic not in admin.list_topics(timeout=10).topics:
            assert time.monotonic() < deadline, f"{topic} never appeared in the metadata"
            time.sleep(0.2)
        assert len(admin.list_topics(topic=topic, timeout=10).topics[topic].partitions) == 2

        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        producer.produce(topic, key=b"k", value=run_id.encode())
        assert producer.flush(30) == 0

        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"plantstream-selftest-{run_id}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            received = None
            deadline = time.monotonic() + 60
            while received is None and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is not None and message.error() is None:
                    received = message.value()
            assert received == run_id.encode()
        finally:
            consumer.close()
    finally:
        for future in admin.delete_topics([topic]).values():
            future.result(timeout=30)


def test_postgres_query(endpoints: dict[str, str], run_id: str) -> None:
    import psycopg

    with psycopg.connect(endpoints["postgres"], connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), current_setting('server_version_num')"
        ).fetchone()
        assert row is not None
        user, database, version = row
        assert (user, database) == ("plantstream", "plantstream")
        assert int(version) >= 150000
        # It may create the sinks' and tenants' roles; that it is no superuser is checked on a fresh cluster
        # (tests/integration/test_pg_security.py): one started by an earlier version keeps it until restarted.
        createrole = conn.execute(
            "SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert createrole == (True,)
        conn.execute("CREATE TEMP TABLE selftest (id text PRIMARY KEY, value double precision)")
        conn.execute("INSERT INTO selftest VALUES (%s, %s)", (run_id, 1.5))
        assert conn.execute("SELECT value FROM selftest WHERE id = %s", (run_id,)).fetchone() == (1.5,)


def test_mqtt_publish_subscribe_qos1(endpoints: dict[str, str], run_id: str) -> None:
    import paho.mqtt.client as mqtt

    url = urllib.parse.urlparse(endpoints["mosquitto"])
    host, port = url.hostname or "127.0.0.1", url.port or 1883
    topic = f"plantstream/selftest/{run_id}"
    subscribed = threading.Event()
    received: list[mqtt.MQTTMessage] = []
    got_message = threading.Event()

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason_code: object, props: object
    ) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: object, mid: int, codes: object, props: object) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received.append(message)
        got_message.set()

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"selftest-sub-{run_id}")
    subscriber.on_connect = on_connect
    subscriber.on_subscribe = on_subscribe
    subscriber.on_message = on_message
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"selftest-pub-{run_id}")
    subscriber.connect(host, port)
    subscriber.loop_start()
    publisher.connect(host, port)
    publisher.loop_start()
    try:
        assert subscribed.wait(10), "SUBACK not received"
        info = publisher.publish(topic, payload=run_id.encode(), qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "PUBACK not received"
        assert got_message.wait(10), "message not delivered to the subscriber"
        assert received[0].payload == run_id.encode()
        assert received[0].qos == 1
    finally:
        for client in (publisher, subscriber):
            client.disconnect()
            client.loop_stop()


def test_influx_write_and_query(endpoints: dict[str, str], run_id: str) -> None:
    base = endpoints["influxdb"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    timestamp = time.time_ns()
    line = f"plantstream_selftest,run={run_id} value=1.5 {timestamp}".encode()
    write = urllib.request.Request(f"{base}/write?db=plantstream&precision=ns", data=line, method="POST")
    with opener.open(write, timeout=10) as response:
        assert response.status == 204

    query = urllib.parse.urlencode(
        {"db": "plantstream", "q": f"SELECT value FROM plantstream_selftest WHERE run = '{run_id}'"}
    )
    with opener.open(f"{base}/query?{query}", timeout=10) as response:
        payload = json.load(response)
    values = payload["results"][0]["series"][0]["values"]
    assert [row[1] for row in values] == [1.5]

    drop = urllib.parse.urlencode({"db": "plantstream", "q": f"DROP SERIES WHERE run = '{run_id}'"})
    with opener.open(urllib.request.Request(f"{base}/query", data=drop.encode(), method="POST"), timeout=10):
        pass


def test_second_up_is_idempotent(endpoints: dict[str, str]) -> None:
    before = {s.name: s for s in services.status()}
    assert all(s.running and s.healthy for s in before.values()), before
    messages: list[str] = []
    started = time.monotonic()
    again = services.up(progress=messages.append)
    elapsed = time.monotonic() - started
    assert again == endpoints
    assert elapsed < 15, f"a second up() took {elapsed:.1f}s"
    assert all("already healthy" in m for m in messages), messages
    after = {s.name: s for s in services.status()}
    assert {n: s.pid for n, s in after.items()} == {n: s.pid for n, s in before.items()}
    assert all(s.running and s.healthy for s in after.values()), after
