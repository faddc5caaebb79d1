"""The ``plantstream`` command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.topology import PostgresSink, Topology, TopologyError, load

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Stream processing for operational-technology telemetry."
)
services_app = typer.Typer(
    no_args_is_help=True,
    help="Local Kafka, PostgreSQL, Mosquitto and InfluxDB under $PLANTSTREAM_LOCAL_DIR "
    "(default: ~/.local/state/plantstream).",
)
app.add_typer(services_app, name="services")
alerts_app = typer.Typer(
    help="Alarm instances: list their state; ack, shelve, unshelve, suppress, release, disable, enable.",
    no_args_is_help=True,
)
app.add_typer(alerts_app, name="alerts")
console = Console(stderr=True)
out = Console()

TopologyArg = Annotated[Path, typer.Argument(help="topology YAML file", exists=False)]


def _load(path: Path) -> Topology:
    try:
        return load(path)
    except TopologyError as e:
        console.print(f"[bold red]{e.source}[/]: {len(e.problems)} problem(s)")
        for p in e.problems:
            console.print(f"  [red]✗[/] {p}", highlight=False)
        raise typer.Exit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- services ----------------------------------------------------------------------------------------
@services_app.command("up")
def services_up(
    names: Annotated[list[str] | None, typer.Argument(help="services (default: all)")] = None,
    timeout: float = 120.0,
) -> None:
    """Install what is missing and start the local services; waits until each answers."""
    from localservices import harness as services

    try:
        result = services.up(
            names or services.SERVICE_NAMES,
            timeout=timeout,
            progress=lambda m: console.print(f"[dim]…[/] {m}", highlight=False),
        )
    except services.ServiceError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    t = Table(title="local services")
    t.add_column("service")
    t.add_column("endpoint")
    for k, v in result.items():
        t.add_row(k, v)
    out.print(t)


@services_app.command("down")
def services_down(names: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Stop the services that `services up` started."""
    from localservices import harness as services

    services.down(names or services.SERVICE_NAMES)
    console.print("stopped")


@services_app.command("status")
def services_status() -> None:
    """Show each local service: running, healthy, endpoint, log file."""
    from localservices import harness as services

    t = Table(title="local services")
    for col in ("service", "running", "healthy", "pid", "endpoint", "log"):
        t.add_column(col)
    for s in services.status():
        t.add_row(
            s.name,
            "yes" if s.running else "no",
            "[green]yes[/]" if s.healthy else "[red]no[/]",
            str(s.pid or ""),
            s.endpoint,
            str(s.log_file),
        )
    out.print(t)


# -- topology ----------------------------------------------------------------------------------------
@app.command()
def validate(topology: TopologyArg) -> None:
    """Check a topology file; every problem is reported with its path."""
    topo = _load(topology)
    out.print(
        f"[green]✓[/] {topology}: topology [bold]{topo.name}[/] is valid "
        f"({len(topo.sources)} source(s), {len(topo.sinks)} sink(s))"
    )


@app.command()
def deploy(
    topology: TopologyArg,
    app_id: Annotated[
        str | None, typer.Option(help="the worker's --app-id, if it runs with one (for growing partitions)")
    ] = None,
) -> None:
    """Create the topology's topics and database schema (idempotent)."""
    from pipeline.deploy import deploy as do_deploy

    topo = _load(topology)
    try:
        do_deploy(topo, say=lambda m: console.print(f"[dim]…[/] {m}", highlight=False), app_id=app_id)
    except Exception as e:
        console.print(f"[bold red]deploy failed:[/] {e}")
        raise typer.Exit(1) from None
    out.print(f"[green]✓[/] deployed {topo.name}")


MetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        help="HOST:PORT of /metrics and /health (port 0: a free port, logged; 'off': none); default: the "
        "topology's metrics section",
    ),
]


def _metrics_addr(value: str | None) -> str | None:
    """The --metrics value, checked (None: the topology's)."""
    from pipeline.core.metrics import parse_listen

    if value is None:
        return None
    try:
        parse_listen(value, "--metrics")
    except ValueError as e:
        console.print(f"[bold red]{e}[/]", highlight=False)
        raise typer.Exit(2) from None
    return value


@app.command()
def worker(
    topology: TopologyArg,
    app_id: Annotated[
        str | None, typer.Option(help="names the consumer groups and state topics (default plantstream-NAME)")
    ] = None,
    loglevel: str = "warning",
    metrics: MetricsOpt = None,
) -> None:
    """Run the stream stages: aggregates, latest values, loop KPIs, sinks."""
    from pipeline.worker import run as run_worker

    listen = _metrics_addr(metrics)
    topo = _load(topology)
    _logging(loglevel)
    run_worker(topo, app_id=app_id, metrics=listen)


@app.command()
def connect(
    topology: TopologyArg,
    source: Annotated[list[str] | None, typer.Option("--source", help="source id (default: all)")] = None,
    loglevel: str = "info",
    metrics: MetricsOpt = None,
) -> None:
    """Run the source connectors: field protocols into telemetry.raw."""
    from pipeline.core.metrics import SourceMetrics, start_server

    listen = _metrics_addr(metrics)
    from connectors.common.producer import TelemetryProducer
    from connectors.registry import runner_for
    from pipeline.core.kafka import client_config

    _logging(loglevel)
    topo = _load(topology)
    chosen = [topo.source(s) for s in source] if source else list(topo.sources)
    if not chosen:
        console.print("[yellow]the topology has no sources[/]")
        raise typer.Exit(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = []
    runners = []
    for cfg in chosen:
        prod = TelemetryProducer(
            topo.broker.bootstrap,
            topo.raw_topic,
            topo.dlq_topic,
            client_id=f"plantstream-{cfg.id}",
            extra=client_config(topo.broker),
        )
        cls = runner_for(cfg.type)
        # BACnet runners also execute write commands, which needs the whole topology.
        runner = cls(cfg, prod, topology=topo) if getattr(cls, "wants_topology", False) else cls(cfg, prod)
        runners.append(runner)
        th = threading.Thread(target=runner.run, args=(stop,), name=f"source-{cfg.id}", daemon=True)
        th.start()
        threads.append(th)
    observed = SourceMetrics(runners, {r.cfg.id: th for r, th in zip(runners, threads, strict=True)})
    server = start_server(
        listen or topo.metrics.connect.listen, observed.registry, observed.health, "connect"
    )
    last = time.monotonic()
    while not stop.wait(1.0):
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            for r in runners:
                logging.getLogger("plantstream.connect").info("source %s: %s", r.cfg.id, r.stats)
    for th in threads:
        th.join(60)
    if server is not None:
        server.close()


@app.command()
def simulate(
    topology: TopologyArg, duration: Annotated[float | None, typer.Option(help="seconds")] = None
) -> None:
    """Simulated devices: the OPC UA plant and BACnet units the sources need, and MQTT publishing."""
    from connectors.sim import devices
    from connectors.sim.mqtt_publisher import run_simulation
    from localservices.harness import local_dir

    topo = _load(topology)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        servers = devices.start(list(topo.sources), local_dir() / "sim")
    except (RuntimeError, OSError) as e:
        console.print(f"[bold red]simulate failed:[/] {e}")
        raise typer.Exit(1) from None
    for kind, address, _ in devices.plan(list(topo.sources)):
        console.print(f"simulated {'OPC UA plant' if kind == 'opcua' else 'BACnet AHU'} at {address}")
    if topo.simulate is None:
        if not servers:
            console.print(
                "[bold red]simulate failed:[/] the topology has no 'simulate' section and no "
                "OPC UA or BACnet source on this machine"
            )
            raise typer.Exit(1)
        stop.wait(duration)
        devices.stop(servers)
        return
    last = [time.monotonic()]

    def tick(n: int) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            console.print(f"[dim]simulator: {n} messages published[/]")

    loop_sim = None
    if topo.simulate.loops:  # simulated control loops beside the devices (connectors/sim/loop_publisher.py)
        from connectors.sim.loop_publisher import run_loop_simulation

        last_loops = [time.monotonic()]

        def tick_loops(n: int) -> None:
            if time.monotonic() - last_loops[0] >= 10:
                last_loops[0] = time.monotonic()
                console.print(f"[dim]loop simulator: {n} loop samples published[/]")

        loop_sim = threading.Thread(
            target=run_loop_simulation,
            args=(topo, stop, duration),
            kwargs={"on_tick": tick_loops},
            daemon=True,
        )
        loop_sim.start()
    try:
        n = run_simulation(topo, stop, duration, on_tick=tick)
    except (ValueError, OSError) as e:
        console.print(f"[bold red]simulate failed:[/] {e}")
        raise typer.Exit(1) from None
    finally:
        devices.stop(servers)
        if loop_sim is not None:
            stop.set()
            loop_sim.join(60)
    console.print(f"simulator: {n} messages published")


def _default_topology() -> Path:
    return Path(os.environ.get("PLANTSTREAM_TOPOLOGY", "topologies/building.yaml"))


def _command(
    topology: Path, point: str, value: float | None, priority: int, by: str | None, wait: float
) -> None:
    from confluent_kafka import KafkaException

    from pipeline.control import send_command
    from pipeline.core.commands import make_command

    topo = _load(topology)
    requested_by = by or f"{os.environ.get('USER', 'operator')}@{os.uname().nodename}"
    cmd = make_command(point, value, priority, requested_by)
    try:
        result = send_command(topo, cmd, wait=wait or None)
    except KafkaException as e:
        console.print(f"[bold red]not sent:[/] {e.args[0].str() if e.args else e}")
        raise typer.Exit(2) from None
    what = "relinquish" if value is None else f"write {value:g}"
    if not wait:
        out.print(f"sent {cmd['id']}: {what} on {point} at priority {priority}")
        return
    if result is None:
        console.print(
            f"[yellow]no result for {cmd['id']} within {wait:g}s[/] (is `plantstream connect` running?)"
        )
        raise typer.Exit(2)
    if result["status"] == "accepted":
        out.print(f"[green]accepted[/] {cmd['id']}: {what} on {point} at priority {priority}", soft_wrap=True)
        return
    console.print(
        f"[bold red]{result['status']}[/] {cmd['id']}: {result['error']}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(1)


PriorityOpt = Annotated[int, typer.Option("--priority", min=1, max=16, help="BACnet priority 1-16")]
TopologyOpt = Annotated[
    Path | None,
    typer.Option(
        "--topology", "-t", help="topology file (default: $PLANTSTREAM_TOPOLOGY or topologies/building.yaml)"
    ),
]
ByOpt = Annotated[str | None, typer.Option("--by", help="who asks (default: user@host)")]
WaitOpt = Annotated[float, typer.Option("--wait", help="seconds to wait for the result; 0: do not wait")]


@app.command()
def write(
    point: Annotated[str, typer.Argument(help="series id site/device/point")],
    value: Annotated[float, typer.Argument(help="the value to write")],
    priority: PriorityOpt = 8,
    topology: TopologyOpt = None,
    by: ByOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Write a BACnet point's presentValue at a priority (a WriteCommand on commands.bacnet)."""
    _command(topology or _default_topology(), point, value, priority, by, wait)


@app.command()
def relinquish(
    point: Annotated[str, typer.Argument(help="series id site/device/point")],
    priority: PriorityOpt = 8,
    topology: TopologyOpt = None,
    by: ByOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Relinquish a BACnet point's command at a priority (write null there)."""
    _command(topology or _default_topology(), point, None, priority, by, wait)


InstanceArg = Annotated[str, typer.Argument(help="alarm instance rule/site/device/point (or rule/loop)")]
CommentOpt = Annotated[str | None, typer.Option("--comment", help="why (kept in the alarm's journal)")]


def _alert(
    topology: Path | None, instance: str, action: str, by: str | None, comment: str | None, **kw: Any
) -> None:
    from confluent_kafka import KafkaException

    from pipeline.control import send_alert_command

    topo = _load(topology or _default_topology())
    if not topo.alerts.rules:
        console.print(f"[bold red]{topology or _default_topology()} has no alert rules[/]")
        raise typer.Exit(2)
    rule = instance.split("/", 1)[0]
    if rule not in {r.id for r in topo.alerts.rules}:
        console.print(f"[bold red]no rule {rule!r}[/]; rules: {', '.join(r.id for r in topo.alerts.rules)}")
        raise typer.Exit(2)
    who = by or f"{os.environ.get('USER', 'operator')}@{os.uname().nodename}"
    try:
        cmd = send_alert_command(topo, instance, action, who, comment, **kw)
    except KafkaException as e:
        console.print(f"[bold red]not sent:[/] {e.args[0].str() if e.args else e}")
        raise typer.Exit(2) from None
    out.print(f"sent {action} {instance} ({cmd['id']}); the worker applies it once")


def _alert_command(action: str, doc: str) -> None:
    def command(
        instance: InstanceArg, topology: TopologyOpt = None, by: ByOpt = None, comment: CommentOpt = None
    ) -> None:
        _alert(topology, instance, action, by, comment)

    command.__doc__ = doc
    alerts_app.command(action)(command)


for _action, _doc in (
    ("ack", "Acknowledge an alarm (unack -> acked, returned-unacknowledged -> normal)."),
    ("unshelve", "End a shelve before its time."),
    ("suppress", "Suppress by design: transitions are recorded, not annunciated."),
    ("release", "End a suppression."),
    ("disable", "Take the alarm out of service."),
    ("enable", "Return it to service."),
):
    _alert_command(_action, _doc)


@alerts_app.command("shelve")
def alerts_shelve(
    instance: InstanceArg,
    duration: Annotated[str, typer.Argument(help="how long, e.g. 30m, 8h")],
    topology: TopologyOpt = None,
    by: ByOpt = None,
    comment: CommentOpt = None,
) -> None:
    """Shelve an alarm for a time: recorded, not annunciated; it ends by itself."""
    from pipeline.core.durations import parse_duration_ms

    try:
        ms = parse_duration_ms(duration)
    except ValueError as e:
        console.print(f"[bold red]{e}[/]")
        raise typer.Exit(2) from None
    _alert(topology, instance, "shelve", by, comment, duration_ms=ms)


@alerts_app.command("list")
def alerts_list(
    topology: TopologyOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="also the instances in normal state")] = False,
) -> None:
    """The alarm instances and their state (from alerts.state)."""
    from confluent_kafka import KafkaException

    from pipeline.control import alert_states

    topo = _load(topology or _default_topology())
    try:
        states = alert_states(topo)
    except KafkaException as e:
        console.print(f"[bold red]{e.args[0].str() if e.args else e}[/]")
        raise typer.Exit(2) from None
    table = Table(title=f"alarms of {topo.name}")
    for col in ("instance", "state", "severity", "value", "since", "flags", "message"):
        table.add_column(col)
    for key, ev in sorted(states.items()):
        if ev["state"] == "normal" and not all_:
            continue
        flags = [f for f in ("suppressed", "out_of_service", "chattering") if ev.get(f)]
        if ev.get("shelved_until"):
            flags.append("shelved")
        since = datetime.fromtimestamp(int(str(ev["ts"])) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            key,
            str(ev["state"]),
            str(ev["severity"] or ""),
            _fmt(ev.get("value")),
            since,
            " ".join(flags),
            str(ev["message"]),
        )
    out.print(table)


# -- the HTTP service and its tenants ------------------------------------------------------------------
tenants_app = typer.Typer(
    help="Tenants: who owns which sites, and their database roles.", no_args_is_help=True
)
app.add_typer(tenants_app, name="tenants")
tokens_app = typer.Typer(help="API tokens of tenants (for plantstream serve).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
SinkOpt = Annotated[str | None, typer.Option("--sink", help="the postgres sink's id (default: the first)")]


def _pg(topology: Path | None, sink: str | None) -> tuple[Any, str]:
    """(dsn, schema) of the topology's postgres sink."""
    topo = _load(topology or _default_topology())
    sinks = [s for s in topo.sinks if isinstance(s, PostgresSink) and (sink is None or s.id == sink)]
    if not sinks:
        console.print("[bold red]the topology has no postgres sink" + (f" {sink!r}" if sink else "") + "[/]")
        raise typer.Exit(2)
    return sinks[0].owner_dsn, sinks[0].schema_name


T = TypeVar("T")


def _in_db(topology: Path | None, sink: str | None, action: Callable[[Any, str], T]) -> tuple[T, str]:
    """``action(connection, schema)`` on the postgres sink's database, and the schema; a database error or
    a refused input ends the command with its message."""
    import psycopg

    dsn, schema = _pg(topology, sink)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return action(conn, schema), schema
    except (psycopg.Error, ValueError) as e:
        _db_error(e)


def _db_error(e: Exception) -> NoReturn:
    console.print(f"[bold red]{e}[/]")
    raise typer.Exit(2) from None


@app.command()
def serve(
    topology: TopologyArg,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8800,
    sink: SinkOpt = None,
    app_id: Annotated[str | None, typer.Option(help="the worker's --app-id, if it runs with one")] = None,
) -> None:
    """REST API, live stream and web page over the topology's topics and its postgres sink's tables."""
    import uvicorn

    from pipeline.api.app import create_app

    topo = _load(topology)
    try:
        api = create_app(topo, sink, app_id=app_id)
    except ValueError as e:
        _db_error(e)
    console.print(
        f"plantstream serve: http://{host}:{port}/ (API docs: http://{host}:{port}/docs)", soft_wrap=True
    )
    uvicorn.run(api, host=host, port=port, log_level="warning", access_log=False)


@tenants_app.command("add")
def tenants_add(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    site: Annotated[list[str], typer.Option("--site", help="a site it owns (repeat for more)")],
    name: Annotated[str | None, typer.Option(help="display name")] = None,
    topology: TopologyOpt = None,
    sink: SinkOpt = None,
) -> None:
    """Create a tenant (or give it more sites). A site belongs to one tenant."""
    from connectors.timescale import tenancy

    _in_db(topology, sink, lambda conn, schema: tenancy.add_tenant(conn, schema, tenant, site, name))
    out.print(f"tenant {tenant}: sites {', '.join(site)}")


@tenants_app.command("list")
def tenants_list(topology: TopologyOpt = None, sink: SinkOpt = None) -> None:
    """Tenants, their sites and their database roles."""
    from connectors.timescale import tenancy

    rows, schema = _in_db(topology, sink, tenancy.tenants)
    table = Table(title=f"tenants in {schema}")
    for col in ("tenant", "name", "sites", "database roles"):
        table.add_column(col)
    for tid, tname, sites, roles in rows:
        table.add_row(tid, tname, ", ".join(sites), ", ".join(roles))
    out.print(table)


@tenants_app.command("role")
def tenants_role(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    role: Annotated[str, typer.Argument(help="a database login role (created if missing)")],
    topology: TopologyOpt = None,
    sink: SinkOpt = None,
) -> None:
    """A database login role that reads the tenant's rows only (for Grafana or SQL). The password is read
    from PLANTSTREAM_ROLE_PASSWORD or asked for; it is never printed."""
    from connectors.timescale import tenancy

    _pg(topology, sink)  # the topology's problems before the password is asked for
    password = os.environ.get("PLANTSTREAM_ROLE_PASSWORD") or typer.prompt(
        f"password for {role}", hide_input=True, confirmation_prompt=True
    )
    _, schema = _in_db(
        topology, sink, lambda conn, schema: tenancy.grant_role(conn, schema, tenant, role, password)
    )
    views = tenancy.tenant_schema(schema)
    out.print(f"role {role} reads tenant {tenant}'s rows in schema {views} (set search_path = {views})")


@tokens_app.command("create")
def tokens_create(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    name: Annotated[str, typer.Option(help="who or what uses it (audited in alarm commands)")] = "api",
    expires: Annotated[
        str | None, typer.Option(help="valid for, e.g. 90d, 12h (default: until revoked)")
    ] = None,
    topology: TopologyOpt = None,
    sink: SinkOpt = None,
) -> None:
    """Create an API token: printed once, stored only as a hash."""
    from connectors.timescale import tenancy
    from pipeline.core.durations import parse_duration_ms

    try:
        valid = timedelta(milliseconds=parse_duration_ms(expires)) if expires else None
    except ValueError as e:
        _db_error(e)
    (token, rec), _ = _in_db(
        topology, sink, lambda conn, schema: tenancy.create_token(conn, schema, tenant, name, valid)
    )
    console.print(
        f"token {rec.id} for tenant {tenant} ({name})"
        + (f", expires {rec.expires_at:%Y-%m-%d %H:%M} UTC" if rec.expires_at else "")
    )
    out.print(token)


@tokens_app.command("list")
def tokens_list(topology: TopologyOpt = None, sink: SinkOpt = None) -> None:
    """Tokens (never their secret)."""
    from connectors.timescale import tenancy

    rows, schema = _in_db(topology, sink, tenancy.list_tokens)
    table = Table(title=f"API tokens in {schema}")
    for col in ("id", "tenant", "name", "created", "expires", "revoked"):
        table.add_column(col)
    for tid, tenant, name, created, expires_at, revoked in rows:
        table.add_row(
            tid,
            tenant,
            name,
            f"{created:%Y-%m-%d %H:%M}",
            f"{expires_at:%Y-%m-%d %H:%M}" if expires_at else "never",
            f"{revoked:%Y-%m-%d %H:%M}" if revoked else "",
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="the token's id (see tokens list)")],
    topology: TopologyOpt = None,
    sink: SinkOpt = None,
) -> None:
    """Revoke a token (refused by serve within 10 s)."""
    from connectors.timescale import tenancy

    done, _ = _in_db(topology, sink, lambda conn, schema: tenancy.revoke_token(conn, schema, token_id))
    out.print(f"token {token_id} revoked" if done else f"no active token {token_id}")


db_app = typer.Typer(help="The postgres sink's runtime database roles.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("roles")
def db_roles(topology: TopologyOpt = None, sink: SinkOpt = None) -> None:
    """The runtime roles deploy made for the sink's schema (passwords: ``db password``)."""
    from connectors.timescale import tenancy

    def look(conn: Any, schema: str) -> list[tuple[str, str, bool]]:
        got = []
        for kind, role in tenancy.runtime_roles(schema).items():
            row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            got.append((kind, role, row is not None))
        return got

    rows, _ = _in_db(topology, sink, look)
    what = {"writer": "the sink's dsn: upserts rows and offsets, no DDL", "readonly": "reads every row"}
    for kind, role, exists in rows:
        state = "" if exists else " (missing: run plantstream deploy)"
        out.print(f"{kind}: {role}{state} — {what[kind]}")


@db_app.command("password")
def db_password(
    kind: Annotated[str, typer.Argument(help="writer or readonly")],
    topology: TopologyOpt = None,
    sink: SinkOpt = None,
) -> None:
    """Set the password of the sink's writer or read-only role (from PLANTSTREAM_ROLE_PASSWORD, or asked
    for); it is never printed, and libpq hashes it before it is sent."""
    from connectors.timescale import tenancy

    _, schema = _pg(topology, sink)  # the topology's problems before the password is asked for
    roles = tenancy.runtime_roles(schema)
    if kind not in roles:
        console.print(f"[bold red]role kind {kind!r}: expected one of {', '.join(roles)}[/]")
        raise typer.Exit(2)
    role = roles[kind]
    password = os.environ.get("PLANTSTREAM_ROLE_PASSWORD") or typer.prompt(
        f"password for {role}", hide_input=True, confirmation_prompt=True
    )
    _in_db(topology, sink, lambda conn, _schema: tenancy.set_password(conn, role, password))
    out.print(f"password of {role} set; the sink's dsn: postgresql://{role}:<password>@<host>:<port>/<db>")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT
    )


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def _child_metrics(listen: str | None) -> dict[str, list[str]]:
    """``run --metrics HOST:PORT``: the worker listens there, the connectors on the next port (port 0: each
    a free port of its own; off: neither)."""
    from pipeline.core.metrics import parse_listen

    if listen is None:
        return {"worker": [], "connect": []}
    addr = parse_listen(listen)
    if addr is None:
        return {"worker": ["--metrics", "off"], "connect": ["--metrics", "off"]}
    host, port = addr
    h = f"[{host}]" if ":" in host else host
    return {
        "worker": ["--metrics", f"{h}:{port}"],
        "connect": ["--metrics", f"{h}:{port + 1 if 0 < port < 65535 else 0}"],
    }


@app.command()
def run(topology: TopologyArg, metrics: MetricsOpt = None) -> None:
    """Connectors and worker together, supervised: a child that dies is started again (after 1 s, doubling
    up to 60 s while it keeps dying); Ctrl-C, SIGTERM or SIGHUP stop both (SIGTERM to each, SIGKILL after
    30 s). --metrics HOST:PORT: the worker's /metrics there, the connectors' on the next port."""
    from localservices.harness import local_dir

    ports = _child_metrics(_metrics_addr(metrics))
    _load(topology)
    logs = local_dir() / "run"
    _stop_on_signals()
    children = {
        "connect": ["connect", str(topology), *ports["connect"]],
        "worker": ["worker", str(topology), *ports["worker"]],
    }
    procs = {name: _spawn(args, logs / f"{name}.log") for name, args in children.items()}
    started = dict.fromkeys(procs, time.monotonic())
    backoff = dict.fromkeys(procs, RESTART_FIRST_S)
    due: dict[str, float] = {}  # child -> when to start it again
    console.print(f"connectors and worker running; logs in {logs}/ — Ctrl-C to stop")
    try:
        while True:
            now = time.monotonic()
            for name, p in procs.items():
                if name in due or p.poll() is None:
                    continue
                if now - started[name] >= RESTART_RESET_S:
                    backoff[name] = RESTART_FIRST_S  # it had been running well: start over
                console.print(
                    f"[red]{name} exited with code {p.returncode}[/]; starting it again in "
                    f"{backoff[name]:.0f} s (log: {logs / (name + '.log')})"
                )
                due[name] = now + backoff[name]
                backoff[name] = min(RESTART_MAX_S, backoff[name] * 2)
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    procs[name] = _spawn(children[name], logs / f"{name}.log")
                    started[name] = now
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_all(list(procs.values()))


RESTART_FIRST_S, RESTART_MAX_S, RESTART_RESET_S = 1.0, 60.0, 60.0


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (systemd, a closing terminal) stop like Ctrl-C: the children are stopped, not
    orphaned."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def _redact(dsn: str) -> str:
    """A connection string without its password (for printing)."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", re.sub(r"(password=)\S+", r"\1***", dsn))


def _demo_token(topo: Topology, pg: PostgresSink) -> str:
    """A tenant ``demo`` owning the simulated sites, and a new API token for the page (valid for a day)."""
    import psycopg

    from connectors.timescale import tenancy

    sites = sorted({sc.site for sc in (topo.simulate.scenarios if topo.simulate else [])})
    for src in topo.sources:
        sites += [
            m.site for m in getattr(src, "topics", []) if getattr(m, "site", None) and m.site not in sites
        ]
    with psycopg.connect(pg.owner_dsn, autocommit=True) as conn:
        tenancy.add_tenant(conn, pg.schema_name, "demo", sites, "Demo plant")
        token, _ = tenancy.create_token(conn, pg.schema_name, "demo", "demo page", timedelta(days=1))
    return token


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


@app.command()
def demo(
    topology: TopologyArg = Path("topologies/demo.yaml"),
    minutes: Annotated[float | None, typer.Option(help="stop after this many minutes")] = None,
    port: Annotated[int, typer.Option(help="the web page's port")] = 8800,
) -> None:
    """Services up, deploy, then simulator + connector + worker + web page, with a live table of 1-minute
    aggregates and alarms in the terminal."""
    from confluent_kafka import Consumer

    from localservices import harness as services
    from pipeline.core import codec
    from pipeline.core.kafka import client_config
    from pipeline.deploy import deploy as do_deploy

    try:
        env = services.up(progress=lambda m: console.print(f"[dim]…[/] {m}", highlight=False))
    except services.ServiceError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    del env
    topo = _load(topology)
    do_deploy(topo, say=lambda m: console.print(f"[dim]…[/] {m}", highlight=False))
    logs = services.local_dir() / "demo"
    _stop_on_signals()
    procs = [
        _spawn(["simulate", str(topology)], logs / "simulate.log"),
        _spawn(["connect", str(topology)], logs / "connect.log"),
        _spawn(["worker", str(topology)], logs / "worker.log"),
    ]
    pg = next((s for s in topo.sinks if isinstance(s, PostgresSink)), None)
    page = ""
    if pg is not None:
        procs.append(_spawn(["serve", str(topology), "--port", str(port)], logs / "serve.log"))
        page = f"\nThe page: http://127.0.0.1:{port}/#token={_demo_token(topo, pg)}"
    dsn = _redact(pg.dsn) if pg is not None else ""
    console.print(
        f"simulator, connector, worker and web service started (logs in {logs}/). Aggregates appear once the "
        f"first minute closes.{page}\nIn PostgreSQL:\n  psql '{dsn}' -c 'SELECT bucket, series, count, mean, "
        f"min, max FROM agg_1m ORDER BY bucket DESC, series LIMIT 20'\nCtrl-C stops everything.",
        soft_wrap=True,
    )
    consumer = Consumer(
        {
            **client_config(topo.broker),
            "group.id": f"plantstream-demo-{os.getpid()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topo.agg_topic] + ([topo.alerts_events_topic] if topo.alerts.rules else []))
    latest: dict[str, dict[str, Any]] = {}
    alarms: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    def render() -> Any:
        from rich.console import Group

        if not topo.alerts.rules:
            return aggregates()
        # Every column fits 140 characters; narrower, the instance keeps its full name and the time,
        # transition and message give way.
        wide = out.width >= 140
        cols = ["time (UTC)", "instance", "transition", "state", "severity", "value", "message"]
        cols = cols if wide else ["instance", "state", "severity", "value"]
        t = Table(title=f"alarms ({sum(1 for a in alarms.values() if a['state'] != 'normal')} not normal)")
        for col in cols:
            t.add_column(col, no_wrap=col == "instance")
        for key in sorted(alarms, key=lambda k: -int(alarms[k]["ts"]))[:10]:
            a = alarms[key]
            style = {"unack": "bold red", "acked": "yellow", "rtn_unack": "cyan"}.get(a["state"], "green")
            cells = {
                "time (UTC)": datetime.fromtimestamp(a["ts"] / 1000, UTC).strftime("%H:%M:%S"),
                "instance": key,
                "transition": a["transition"],
                "state": f"[{style}]{a['state']}[/]",
                "severity": a["severity"] or "",
                "value": _fmt(a.get("value")),
                "message": a["message"],
            }
            t.add_row(*(cells[c] for c in cols))
        return Group(aggregates(), t)

    def aggregates() -> Table:
        wide = out.width >= 120
        cols = ["minute (UTC)", "series", "count", "mean", "min", "max", "last", "stddev", "unit"]
        cols = cols if wide else ["minute (UTC)", "series", "mean", "min", "max"]
        t = Table(
            title=f"plantstream demo — latest 1-minute aggregates ({len(latest)} series)",
            caption=f"running {int(time.monotonic() - started)} s · Ctrl-C to stop",
        )
        for col in cols:
            # The series name is what tells one row from another: never cut.
            t.add_column(col, justify="left" if col in ("minute (UTC)", "series", "unit") else "right",
                         no_wrap=col == "series")  # fmt: skip
        for s in sorted(latest)[:30]:
            a = latest[s]
            cells = {
                "minute (UTC)": datetime.fromtimestamp(a["window_start"] / 1000, UTC).strftime("%H:%M"),
                "series": s,
                "count": str(a["count"]),
                "mean": _fmt(a["mean"]),
                "min": _fmt(a["min"]),
                "max": _fmt(a["max"]),
                "last": _fmt(a["last"]),
                "stddev": _fmt(a["stddev"]),
                "unit": a.get("unit") or "",
            }
            t.add_row(*(cells[c] for c in cols))
        return t

    try:
        with Live(render(), console=out, refresh_per_second=2) as live:
            while minutes is None or time.monotonic() - started < minutes * 60:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    a = codec.loads(msg.value())
                    if msg.topic() == topo.agg_topic:
                        latest[a["series"]] = a
                    else:
                        alarms[a["instance"]] = a
                live.update(render())
                if any(p.poll() is not None for p in procs):
                    console.print(f"[red]a demo process exited; see its log in {logs}/[/]")
                    break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        _stop_all(procs)
        console.print("demo stopped")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
