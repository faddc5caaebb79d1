"""Alert subscribers: one stage per subscriber, reading ``alerts.events`` in order (consumer group
``<app-id>-notify-<id>``) and committing only what was delivered.

* **webhook**: every event marked ``notify`` that passes the filter is POSTed as JSON, with its id as the
  ``Idempotency-Key`` header; network errors, 408, 429 and 5xx are retried with capped backoff, in place
  (the events behind it wait: order is kept); any other 4xx is the receiver refusing that event for good,
  which goes to the dead-letter topic with the receiver's answer. A receiver that is down gets every event
  when it is back, in order. An event the alerts stage sent twice (after a crash) has the same id:
  delivered once per process (and once at a receiver that honours the idempotency key).
* **mqtt**: every event passing the filter (notified or not: it is the state) is published under the topic
  template, retained by default, so a client subscribing later reads each instance's current state.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Any

from confluent_kafka import Message

from connectors.common.backoff import delays
from pipeline.core import codec
from pipeline.core.records import HEARTBEAT_KEY
from pipeline.core.topology import TopologyBase
from pipeline.stages.alerts.config import AlertRule, MqttSubscriber, WebhookSubscriber
from pipeline.stages.runtime import Step

log = logging.getLogger("plantstream.alerts")

REMEMBER = 10_000  # ids delivered, per subscriber, to recognise an event sent twice


class _Stopped(Exception):
    """The stage is stopping while an event waits for its subscriber."""


class Notify(Step):
    def __init__(
        self,
        topo: TopologyBase,
        sub: WebhookSubscriber | MqttSubscriber,
        rules: list[AlertRule],
        counters: Any,
    ):
        self.topo, self.sub, self.counters = topo, sub, counters
        self.rules = {r.id: r for r in rules}
        self.sent: OrderedDict[str, None] = OrderedDict()
        self.delivered = 0
        self.client: Any = None
        self.connected = threading.Event()

    def process(self, msgs: list[Message]) -> None:
        for i, m in enumerate(msgs):
            try:
                self._one(m)
            except _Stopped:
                # Stopping with events undelivered: commit only up to them, so the restart delivers them.
                for later in msgs[i:]:
                    p = later.partition()
                    self.stage.position[p] = min(self.stage.position.get(p, later.offset()), later.offset())
                return

    def _one(self, m: Message) -> None:
        if m.key() == HEARTBEAT_KEY or m.value() is None:
            return
        try:
            ev = codec.loads(m.value())
            eid = ev["id"]
        except (codec.JSONDecodeError, KeyError, TypeError) as e:
            self._dead(f"invalid: not an AlertEvent ({e!r})", m)
            return
        if eid in self.sent or not self.sub.filter.accepts(ev, self.rules.get(str(ev.get("rule")))):
            return
        if isinstance(self.sub, WebhookSubscriber):
            if not ev.get("notify"):
                return
            refused = self._post(m.value(), eid)
            if refused is not None:
                self._dead(refused, m)
                return
        else:
            self._publish(ev, m.value())
        self.delivered += 1
        self.sent[eid] = None
        if len(self.sent) > REMEMBER:
            self.sent.popitem(last=False)

    # -- webhook --------------------------------------------------------------------------------------
    def _post(self, body: bytes, eid: str) -> str | None:
        """Delivered: None; refused for good: the reason. Retries everything else until the stage stops."""
        assert isinstance(self.sub, WebhookSubscriber)
        backoff = delays(0.5, self.sub.max_backoff / 1000)
        while True:
            req = urllib.request.Request(self.sub.url, data=body, method="POST")
            req.add_header("Content-Type", "application/json")
            req.add_header("Idempotency-Key", eid)
            for k, v in self.sub.headers.items():
                req.add_header(k, v)
            try:
                with urllib.request.urlopen(req, timeout=self.sub.timeout / 1000) as resp:
                    if 200 <= resp.status < 300:
                        return None
                    status, text = resp.status, ""
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read()[:300].decode(errors="replace")
            except (urllib.error.URLError, OSError) as e:
                status, text = 0, str(e)
            if 400 <= status < 500 and status not in (408, 429):
                return f"webhook {self.sub.id}: HTTP {status} {text}".strip()
            delay = next(backoff)
            log.warning(
                "webhook %s: %s %s; retrying %s in %.1fs",
                self.sub.id,
                status or "no answer",
                text[:120],
                eid,
                delay,
            )
            if self.stage.stopping.wait(delay):
                raise _Stopped

    # -- mqtt -----------------------------------------------------------------------------------------
    def _mqtt(self) -> Any:
        if self.client is not None:
            return self.client
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        assert isinstance(self.sub, MqttSubscriber)
        host, _, port = self.sub.url.split("://", 1)[1].partition(":")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.topo.name}-notify-{self.sub.id}")
        if self.sub.username:
            client.username_pw_set(self.sub.username, self.sub.password)
        if self.sub.url.startswith("mqtts://"):
            client.tls_set()
        client.on_connect = lambda *a: self.connected.set()
        client.on_disconnect = lambda *a: self.connected.clear()
        client.connect_async(host, int(port or 1883))
        client.loop_start()
        self.client = client
        return client

    def _publish(self, ev: dict[str, Any], body: bytes) -> None:
        assert isinstance(self.sub, MqttSubscriber)
        client = self._mqtt()
        topic = self.sub.topic.format(
            instance=ev["instance"], rule=ev["rule"], source=ev["source"], state=ev["state"]
        )
        backoff = delays(0.5, 30.0)
        while True:
            if self.connected.wait(10):
                info = client.publish(topic, body, qos=self.sub.qos, retain=self.sub.retain)
                try:
                    info.wait_for_publish(30)
                    if info.is_published():
                        return
                except (RuntimeError, ValueError) as e:
                    log.warning("mqtt %s: publish of %s failed (%s)", self.sub.id, ev["id"], e)
            if self.stage.stopping.wait(next(backoff)):
                raise _Stopped

    def _dead(self, reason: str, m: Message) -> None:
        self.counters.rejected += 1
        self.stage.outbox.dead_letter(
            self.topo.dlq_topic,
            f"notify/{self.sub.id}",
            reason,
            m.value(),
            topic=self.topo.alerts_events_topic,
            partition=m.partition(),
            offset=m.offset(),
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
