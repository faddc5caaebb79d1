"""``plantstream deploy``: the topology's topics and database schema, idempotently."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from connectors.timescale import tenancy
from connectors.timescale.config import PostgresSink
from pipeline.core.kafka import client_config
from pipeline.repartition import check_drained, migrate
from pipeline.topology import Topology

DAY_MS = 86_400_000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def event_time_retention(max_bytes: int) -> dict[str, str]:
    """Retention by size only, for topics whose record timestamps are event times.

    Kafka's time retention compares the record timestamps with the wall clock: a backfill of data measured
    last month, written today, would be deleted at the next retention check. So these topics keep a
    bounded number of bytes per partition instead.
    """
    return {"retention.ms": "-1", "retention.bytes": str(max_bytes)}


def topic_specs(topo: Topology) -> list[TopicSpec]:
    n = topo.broker.partitions
    return [
        TopicSpec(
            topo.raw_topic,
            n,
            {**event_time_retention(topo.broker.raw_retention_bytes), "compression.type": "producer"},
        ),
        TopicSpec(topo.dlq_topic, 1, {"retention.ms": str(30 * DAY_MS)}),
        TopicSpec(topo.agg_topic, n, event_time_retention(topo.broker.agg_retention_bytes)),
        TopicSpec(
            topo.latest_topic,
            n,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3_600_000)},
        ),
        *_command_topics(topo),
        *_loop_topics(topo),
        *_alert_topics(topo),
    ]


def _alert_topics(topo: Topology) -> list[TopicSpec]:
    """alerts.samples (what the rules watch, keyed by device or loop), alerts.events (transitions),
    alerts.state (compacted current state) and alerts.commands, where the topology has alert rules."""
    if not topo.alerts.rules:
        return []
    n = topo.broker.partitions
    return [
        TopicSpec(topo.alert_samples_topic, n, event_time_retention(topo.broker.raw_retention_bytes)),
        TopicSpec(topo.alerts_events_topic, n, {"retention.ms": str(365 * DAY_MS)}),
        TopicSpec(
            topo.alerts_state_topic,
            n,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3_600_000)},
        ),
        TopicSpec(topo.alerts_commands_topic, n, {"retention.ms": str(365 * DAY_MS)}),
    ]


def _loop_topics(topo: Topology) -> list[TopicSpec]:
    """loops.samples (loop tags keyed by loop id) and loops.kpi, where the topology has loops."""
    if not topo.loops:
        return []
    n = topo.broker.partitions
    return [
        TopicSpec(topo.loop_samples_topic, n, event_time_retention(topo.broker.raw_retention_bytes)),
        TopicSpec(topo.loop_kpi_topic, n, event_time_retention(topo.broker.agg_retention_bytes)),
    ]


def _command_topics(topo: Topology) -> list[TopicSpec]:
    """commands.bacnet and commands.results, where the topology has BACnet sources to write through."""
    if not topo.has_commands:
        return []
    return [
        TopicSpec(topo.commands_topic, topo.broker.partitions, {"retention.ms": str(7 * DAY_MS)}),
        TopicSpec(topo.results_topic, topo.broker.partitions, {"retention.ms": str(365 * DAY_MS)}),
    ]


def ensure_topics(
    topo: Topology, say: Callable[[str], None] = print, app_id: str | None = None
) -> dict[str, str]:
    """Create missing topics, grow partition counts that are too small; never shrink or delete.

    Growing ``telemetry.raw`` or ``loops.samples`` moves keys, so it is done only with the worker stopped
    and drained, and the keyed state is moved after them (:mod:`pipeline.repartition`).
    """
    app_id = app_id or topo.app_id
    admin = AdminClient(client_config(topo.broker, "admin"))
    existing = admin.list_topics(timeout=15).topics
    outcome: dict[str, str] = {}
    new = []
    specs = topic_specs(topo)
    grown = {
        s.name: len(existing[s.name].partitions)
        for s in specs
        if s.name in existing and len(existing[s.name].partitions) < s.partitions
    }
    keyed = {topo.raw_topic, topo.loop_samples_topic, topo.alert_samples_topic} & set(grown)
    if keyed:
        check_drained(topo, app_id, {t: grown[t] for t in keyed})
    for spec in specs:
        if spec.name not in existing:
            new.append(
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=topo.broker.replication,
                    config=spec.config,
                )
            )
            continue
        have = len(existing[spec.name].partitions)
        # Bring the settings of an existing topic to the spec too (retention, compaction).
        resource = ConfigResource(
            ConfigResource.Type.TOPIC,
            spec.name,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in spec.config.items()
            ],
        )
        admin.incremental_alter_configs([resource])[resource].result(15)
        if have < spec.partitions:
            admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result(15)
            outcome[spec.name] = f"grown from {have} to {spec.partitions} partitions"
        else:
            outcome[spec.name] = "exists"
    for name, fut in admin.create_topics(new, operation_timeout=15).items() if new else []:
        fut.result(30)
        outcome[name] = "created"
    for name, what in outcome.items():
        say(f"topic {name}: {what}")
    if keyed:
        migrate(topo, app_id, grown, say)
    return outcome


def acl_bindings(topo: Topology, app_id: str | None = None) -> list[AclBinding]:
    """What each principal of a SASL topology may do (Kafka denies everything else).

    The pipeline's principal has every right on the topology's topics and its consumer groups, but may only
    read ``commands.bacnet``: a BACnet write reaches a field device, so only the commands principal
    (``broker.security.commands_username``) may produce there. Without one, only the broker's super users can.
    """
    sec = topo.broker.security
    creds = sec.credentials("pipeline")
    if creds is None:
        return []
    app_id = app_id or topo.app_id
    allow = AclPermissionType.ALLOW
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    prefixed, literal = ResourcePatternType.PREFIXED, ResourcePatternType.LITERAL

    def bind(
        kind: ResourceType, name: str, pattern: ResourcePatternType, who: str, op: AclOperation
    ) -> AclBinding:
        return AclBinding(kind, name, pattern, f"User:{who}", "*", op, allow)

    pipe = creds[0]
    families = [topo.topic(f) for f in ("telemetry.", "loops.", "alerts.")] + [app_id]
    out = [bind(topic, name, prefixed, pipe, AclOperation.ALL) for name in families]
    out.append(bind(topic, topo.results_topic, literal, pipe, AclOperation.ALL))
    out += [
        bind(topic, topo.commands_topic, literal, pipe, op)
        for op in (AclOperation.READ, AclOperation.DESCRIBE)
    ]
    # The worker's groups start with the app id; the CLI's, the API's and the readers' with plantstream-.
    for name in dict.fromkeys([app_id, "plantstream-", topo.topic("plantstream-")]):
        out.append(bind(group, name, prefixed, pipe, AclOperation.ALL))
    cmd = sec.credentials("commands")
    if cmd is not None and cmd[0] != pipe:
        who = cmd[0]
        out += [
            bind(topic, topo.commands_topic, literal, who, op)
            for op in (AclOperation.WRITE, AclOperation.DESCRIBE)
        ]
        out += [
            bind(topic, topo.results_topic, literal, who, op)
            for op in (AclOperation.READ, AclOperation.DESCRIBE)
        ]
        out.append(bind(group, "plantstream-cli-", prefixed, who, AclOperation.READ))
    return out


def ensure_acls(topo: Topology, say: Callable[[str], None] = print, app_id: str | None = None) -> int:
    """Create the ACLs of :func:`acl_bindings` (idempotent: an existing binding is left as it is)."""
    bindings = acl_bindings(topo, app_id)
    if not bindings:
        return 0
    admin = AdminClient(client_config(topo.broker, "admin"))
    for fut in admin.create_acls(bindings, request_timeout=15).values():
        fut.result(30)
    sec = topo.broker.security
    say(f"acls: User:{sec.username}: the topology's topics and groups, read-only on {topo.commands_topic}")
    cmd = sec.credentials("commands")
    if cmd is not None and cmd[0] != sec.username:
        say(f"acls: User:{cmd[0]}: write {topo.commands_topic}, read {topo.results_topic}")
    elif topo.has_commands:
        say(f"acls: no commands_username: only the broker's super users may write {topo.commands_topic}")
    return len(bindings)


def deploy(topo: Topology, say: Callable[[str], None] = print, app_id: str | None = None) -> dict[str, str]:
    """Topics, the ACLs of a SASL topology, then every sink's tables (through the sink's own writer).
    ``app_id`` names the worker's consumer groups and state topics when it runs with ``--app-id`` (default
    ``plantstream-<name>``)."""
    out = {f"topic {k}": v for k, v in ensure_topics(topo, say, app_id).items()}
    if ensure_acls(topo, say, app_id):
        out["acls"] = "ensured"
    for sink in topo.sinks:
        writer = sink.open_writer(f"{topo.app_id}/{sink.id}")
        for table, kind in writer.deploy(topo.sink_tables(sink, writer.tables), say).items():
            out[f"sink {sink.id} table {table}"] = kind
        if isinstance(sink, PostgresSink):
            # Tenancy reads a loop's site (its PV's) from the database: the topology is not there.
            with psycopg.connect(sink.owner_dsn, autocommit=True) as conn:
                tenancy.set_loop_sites(
                    conn, sink.schema_name, {lp.id: lp.pv.split("/", 1)[0] for lp in topo.loops}
                )
    return out
