"""The HTTP service of ``plantstream serve``: REST under ``/api``, the live stream, and the web page.

Every answer is limited to the caller's tenant: the token names the tenant, the database queries run as
the API role with the tenant set for the transaction (the tenant views of
:mod:`connectors.timescale.tenancy` filter the rows), and the live stream carries only the tenant's sites.
Errors are JSON ``{"error": ..., "detail": ...}``; a bad parameter is named in ``detail``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Annotated, Any, Literal

import psycopg
from confluent_kafka import Consumer, TopicPartition
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from connectors.timescale import tenancy
from pipeline.api.live import QUEUE, Client, Hub
from pipeline.core import codec
from pipeline.core.durations import parse_duration_ms
from pipeline.core.kafka import Outbox, client_config
from pipeline.core.metrics import (
    CONTENT_TYPE_LATEST,
    ApiMetrics,
    FnCollector,
    GaugeMetricFamily,
    RequestMetrics,
)
from pipeline.core.records import now_ms
from pipeline.topology import Topology

log = logging.getLogger("plantstream.api")

TOKEN_CACHE_S = 10.0  # a revoked token is refused within this long
LAG_EVERY_S = 5.0
MAX_ROWS = 10_000
KINDS = ("latest", "agg", "alarm")


@dataclass(frozen=True)
class Caller:
    tenant: str
    name: str  # the token's name: who acts (audited in alarm commands)
    sites: frozenset[str]


class ApiError(HTTPException):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(status, {"error": error, "detail": detail})


class Service:
    """What the routes share: the topology, the database pool, the live hub and a producer for commands."""

    def __init__(
        self, topo: Topology, sink_id: str | None = None, queue: int = QUEUE, app_id: str | None = None
    ) -> None:
        from connectors.timescale.config import PostgresSink

        pg = [s for s in topo.sinks if isinstance(s, PostgresSink) and (sink_id is None or s.id == sink_id)]
        if not pg:
            raise ValueError(
                "serve needs a postgres sink in the topology (sinks: - {type: postgres, ...})"
                if sink_id is None
                else f"no postgres sink {sink_id!r} in the topology"
            )
        self.topo, self.sink = topo, pg[0]
        self.app_id = app_id or topo.app_id  # the worker's (its consumer groups' prefix)
        self.schema = self.sink.schema_name
        self.views = tenancy.tenant_schema(self.schema)
        # The owner's: tokens are read as it, then each query runs SET LOCAL ROLE <schema>_api.
        self.pool = AsyncConnectionPool(self.sink.owner_dsn, min_size=1, max_size=8, open=False, timeout=10)
        self.hub = Hub(
            client_config(topo.broker),
            {"latest": topo.latest_topic, "agg": topo.agg_topic, "alarm": topo.alerts_events_topic},
            lambda: self.loop_sites,
            queue,
        )
        self.loop_sites = {lp.id: lp.pv.split("/", 1)[0] for lp in topo.loops}
        self._tokens: dict[str, tuple[float, Caller]] = {}
        self._outbox: Outbox | None = None
        self._lag: tuple[float, dict[str, int]] | None = None
        self.started = time.time()

    async def open(self) -> None:
        await self.pool.open(wait=False)
        self.hub.start(asyncio.get_running_loop())

    async def close(self) -> None:
        self.hub.stop()
        await self.pool.close()
        if self._outbox is not None:
            self._outbox.flush_quietly(5)

    # -- auth ------------------------------------------------------------------------------------------
    async def caller(self, token: str | None) -> Caller:
        now = time.monotonic()
        hit = self._tokens.get(token or "")
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self.pool.connection() as conn:
            try:
                token_id, secret = tenancy.split_token(token)
                cur = await conn.execute(
                    sql.SQL(tenancy.TOKEN_ROW).format(sql.Identifier(self.schema)), (token_id,)
                )
                tok = tenancy.judge_token(token_id, secret, await cur.fetchone())
            except tenancy.TokenError as e:
                raise ApiError(401, "unauthorized", str(e)) from None
            rows = await (
                await conn.execute(
                    sql.SQL("SELECT site FROM {}.tenant_sites WHERE tenant = %s").format(
                        sql.Identifier(self.schema)
                    ),
                    (tok.tenant,),
                )
            ).fetchall()
        who = Caller(tok.tenant, tok.name, frozenset(r[0] for r in rows))
        ttl = TOKEN_CACHE_S
        if tok.expires_at is not None:
            ttl = min(ttl, (tok.expires_at - datetime.now(UTC)).total_seconds())
        self._tokens[token or ""] = (now + ttl, who)
        return who

    # -- the database, as the tenant -------------------------------------------------------------------
    async def query(self, who: Caller, text: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """``text`` with ``{v}`` for the tenant views' schema, run as the API role for ``who``'s tenant."""
        q = sql.SQL(text).format(v=sql.Identifier(self.views))
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(tenancy.api_role(self.schema)))
                    )
                    await conn.execute("SELECT set_config('plantstream.tenant', %s, true)", (who.tenant,))
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(q, params)
                    return await cur.fetchall()
            except psycopg.errors.UndefinedTable as e:
                raise ApiError(
                    404, "no such data", f"{e.diag.message_primary} (is the sink deployed with it?)"
                ) from None

    # -- commands --------------------------------------------------------------------------------------
    def command(
        self, instance: str, action: str, by: str, comment: str | None, duration_ms: int | None
    ) -> dict[str, Any]:
        if self._outbox is None:
            self._outbox = Outbox(client_config(self.topo.broker), "plantstream-serve", {"linger.ms": 0})
        cmd: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "instance": instance,
            "action": action,
            "by": by,
            "at": now_ms(),
        }
        if comment:
            cmd["comment"] = comment
        if duration_ms is not None:
            cmd["duration_ms"] = duration_ms
        self._outbox.produce(self.topo.alerts_commands_topic, instance.encode(), codec.dumps(cmd), cmd["at"])
        if self._outbox.flush_quietly(10) != 0:
            raise ApiError(503, "broker unavailable", "the command was not delivered to Kafka; try again")
        return cmd

    # -- health ----------------------------------------------------------------------------------------
    def lag(self) -> dict[str, int]:
        """Consumer lag (messages) of the worker's consumer groups, per group; measured at most every
        :data:`LAG_EVERY_S` (health checks come often, and each measure asks the broker several times)."""
        now = time.monotonic()
        if self._lag is not None and now - self._lag[0] < LAG_EVERY_S:
            return self._lag[1]
        lag = self._measure_lag()
        self._lag = (now, lag)
        return lag

    def _measure_lag(self) -> dict[str, int]:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(client_config(self.topo.broker))
        prefix = self.app_id
        groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=5).result(10).valid]
        groups = [g for g in groups if g.startswith(prefix + "-")]
        out: dict[str, int] = {}
        c = Consumer(
            {
                **client_config(self.topo.broker),
                "group.id": f"plantstream-serve-lag-{uuid.uuid4().hex}",
            }
        )
        try:
            from confluent_kafka import ConsumerGroupTopicPartitions

            for g in sorted(groups):
                res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(g)])[g].result(10)
                total = 0
                for tp in res.topic_partitions or []:
                    if tp.offset < 0:
                        continue
                    _, hi = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
                    total += max(0, hi - tp.offset)
                out[g.removeprefix(prefix + "-")] = total
        finally:
            c.close()
        return out


def _live_metrics(svc: Service) -> list[GaugeMetricFamily]:
    """The live feed's figures at scrape time."""
    out = []
    for name, doc, value in (
        ("plantstream_api_stream_clients", "Clients of the live stream", svc.hub.client_count),
        (
            "plantstream_api_live_series",
            "Series whose newest reading the live feed holds",
            len(svc.hub.latest),
        ),
        ("plantstream_api_live_received", "Records the live feed has read from Kafka", svc.hub.received),
    ):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], float(value))
        out.append(g)
    return out


# -- request and answer shapes --------------------------------------------------------------------------


class AckBody(BaseModel):
    comment: str | None = Field(None, max_length=1000)


class ShelveBody(BaseModel):
    duration: str = Field(description="how long, e.g. 30m, 8h", examples=["8h"])
    comment: str | None = Field(None, max_length=1000)


def _time(value: str | None, name: str, default: datetime) -> datetime:
    """ISO 8601 or epoch milliseconds."""
    if value is None or value == "":
        return default
    try:
        if value.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(value) / 1000, UTC)
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise ApiError(
            422,
            "bad parameter",
            [{"param": name, "message": "expected ISO 8601 (2026-01-01T00:00:00Z) or epoch ms"}],
        ) from None


def _range(
    frm: str | None, to: str | None, default: timedelta = timedelta(hours=1)
) -> tuple[datetime, datetime]:
    end = _time(to, "to", datetime.now(UTC))
    start = _time(frm, "from", end - default)
    if start >= end:
        raise ApiError(422, "bad parameter", [{"param": "from", "message": "must be before 'to'"}])
    return start, end


def _site_of(svc: Service, source: str) -> str:
    return source.split("/", 1)[0] if "/" in source else svc.loop_sites.get(source, "")


async def current_caller(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
    access_token: Annotated[
        str | None, Query(description="the token, where no header can be sent (EventSource)")
    ] = None,
) -> Caller:
    token = access_token
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        token = value.strip()
    service: Service = request.app.state.service
    return await service.caller(token)


Who = Annotated[Caller, Depends(current_caller)]


def create_app(
    topo: Topology, sink_id: str | None = None, queue: int = QUEUE, app_id: str | None = None
) -> FastAPI:
    """The app for ``topo``; ``queue``: frames a stream client may have pending before it is cut off;
    ``app_id``: the worker's, if it runs with ``--app-id`` (for the consumer lag)."""
    svc = Service(topo, sink_id, queue, app_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.open()
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="plantstream",
        summary="Live values, aggregates, loop KPIs and alarms of a plantstream topology",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = svc
    metrics = ApiMetrics()
    metrics.registry.register(FnCollector(lambda: _live_metrics(svc)))
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus metrics of this process (docs/operations.md#monitoring)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"param": ".".join(str(x) for x in e["loc"][1:]) or str(e["loc"][0]), "message": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse({"error": "bad parameter", "detail": detail}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail), "detail": None}
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    # -- health ---------------------------------------------------------------------------------------
    @app.get("/api/health", tags=["health"])
    async def health() -> JSONResponse:
        """Broker, database and consumer lag; 503 when the broker or the database does not answer."""
        out: dict[str, Any] = {"status": "ok", "uptime_s": round(time.time() - svc.started)}
        try:
            lag = await asyncio.wait_for(asyncio.to_thread(svc.lag), 15)
            out["broker"] = {"status": "ok", "bootstrap": topo.broker.bootstrap}
            out["consumer_lag"] = lag
        except Exception as e:
            out["broker"] = {"status": "down", "error": str(e) or repr(e)}
            out["status"] = "degraded"
        try:
            async with svc.pool.connection(timeout=5) as conn:
                await conn.execute("SELECT 1")
            out["database"] = {"status": "ok", "schema": svc.schema}
        except Exception as e:
            out["database"] = {"status": "down", "error": str(e) or repr(e)}
            out["status"] = "degraded"
        out["live"] = {
            "status": "down" if svc.hub.error else ("ok" if svc.hub.ready.is_set() else "starting"),
            "clients": svc.hub.client_count,
            "series": len(svc.hub.latest),
            "received": svc.hub.received,
            "error": svc.hub.error,
        }
        return JSONResponse(out, status_code=200 if out["status"] == "ok" else 503)

    app.add_api_route("/health", health, include_in_schema=False)  # where the other processes have it

    # -- sites and series -----------------------------------------------------------------------------
    @app.get("/api/sites", tags=["series"])
    async def sites(who: Who) -> list[dict[str, Any]]:
        """The tenant's sites, with their devices, series and active alarms."""
        devices = [(k, len(points)) for k, points in list(svc.hub.devices.items()) if k[0] in who.sites]
        try:
            alarms = await svc.query(who, "SELECT source FROM {v}.alarms WHERE active")
        except ApiError:
            alarms = []  # a topology without alert rules has no alarms table
        return [
            {
                "site": site,
                "devices": sum(1 for (st, _), _n in devices if st == site),
                "series": sum(n for (st, _), n in devices if st == site),
                "active_alarms": sum(1 for a in alarms if _site_of(svc, a["source"]) == site),
            }
            for site in sorted(who.sites)
        ]

    @app.get("/api/series", tags=["series"])
    async def series(
        who: Who,
        site: Annotated[str | None, Query(description="one site")] = None,
        device: Annotated[str | None, Query(description="one device")] = None,
    ) -> list[dict[str, Any]]:
        """Series with their newest reading (from telemetry.latest)."""
        if site is not None and site not in who.sites:
            return []
        keys = sorted(k for k in list(svc.hub.devices) if k[0] in who.sites)
        out = []
        for st, dev in keys:
            if (site and st != site) or (device and dev != device):
                continue
            for point, rd in sorted(list(svc.hub.devices[(st, dev)].items())):
                out.append(
                    {
                        "series": f"{st}/{dev}/{point}",
                        "site": st,
                        "device": dev,
                        "point": point,
                        "latest": {k: rd.get(k) for k in ("ts", "value", "quality", "unit")},
                    }
                )
        return out

    @app.get("/api/series/{series:path}/aggregates", tags=["series"])
    async def aggregates(
        who: Who,
        series: Annotated[str, Path(description="site/device/point")],
        resolution: Annotated[Literal["1m", "1h"], Query()] = "1m",
        frm: Annotated[
            str | None, Query(alias="from", description="ISO 8601 or epoch ms (default: to - 1 h)")
        ] = None,
        to: Annotated[str | None, Query(description="ISO 8601 or epoch ms (default: now)")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ROWS)] = 1440,
    ) -> list[dict[str, Any]]:
        """Closed aggregates of one series: 1-minute from agg_1m, 1-hour from agg_1h."""
        if series.count("/") != 2:
            raise ApiError(
                422, "bad parameter", [{"param": "series", "message": "expected site/device/point"}]
            )
        start, end = _range(frm, to, timedelta(hours=1) if resolution == "1m" else timedelta(days=2))
        table = "agg_1m" if resolution == "1m" else "agg_1h"
        return await svc.query(
            who,
            f"SELECT bucket, count, good_count, min, max, mean, sum, first, last, stddev, unit, window_end "
            f"FROM {{v}}.{table} WHERE series = %s AND bucket >= %s AND bucket < %s ORDER BY bucket LIMIT %s",
            (series, start, end, limit),
        )

    # -- loops ----------------------------------------------------------------------------------------
    @app.get("/api/loops", tags=["loops"])
    async def loops(who: Who) -> list[dict[str, Any]]:
        """The topology's control loops on the tenant's sites."""
        return [
            {"loop": lp.id, "site": svc.loop_sites[lp.id], "pv": lp.pv, "sp": lp.sp, "op": lp.op}
            for lp in topo.loops
            if svc.loop_sites[lp.id] in who.sites
        ]

    @app.get("/api/loops/{loop}/kpis", tags=["loops"])
    async def kpis(
        who: Who,
        loop: str,
        kpi: Annotated[str | None, Query(description="one KPI, e.g. iae")] = None,
        frm: Annotated[str | None, Query(alias="from")] = None,
        to: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ROWS)] = 1000,
    ) -> list[dict[str, Any]]:
        """KPI results of one loop (kpi_results), newest last."""
        if loop not in svc.loop_sites or svc.loop_sites[loop] not in who.sites:
            raise ApiError(404, "not found", f"no loop {loop!r}")
        start, end = _range(frm, to, timedelta(days=1))
        return await svc.query(
            who,
            "SELECT window_start, window_end, kpi, value, status, coverage, reason FROM {v}.kpi_results "
            "WHERE loop_id = %s AND (%s::text IS NULL OR kpi = %s) "
            "AND window_start >= %s AND window_start < %s ORDER BY window_start, kpi LIMIT %s",
            (loop, kpi, kpi, start, end, limit),
        )

    # -- alarms ---------------------------------------------------------------------------------------
    @app.get("/api/alarms", tags=["alarms"])
    async def alarms(
        who: Who,
        state: Annotated[Literal["active", "unacknowledged", "all"], Query()] = "active",
        site: Annotated[str | None, Query()] = None,
    ) -> list[dict[str, Any]]:
        """Each alarm instance's current state (table alarms)."""
        where = {
            "active": "active OR state = 'rtn_unack'",
            "unacknowledged": "state IN ('unack', 'rtn_unack')",
            "all": "true",
        }[state]
        rows = await svc.query(
            who, f"SELECT * FROM {{v}}.alarms WHERE {where} ORDER BY ts DESC LIMIT {MAX_ROWS}"
        )
        for r in rows:
            r["site"] = _site_of(svc, r["source"])
        return [r for r in rows if site is None or r["site"] == site]

    @app.get("/api/alarms/events", tags=["alarms"])
    async def alarm_events(
        who: Who,
        instance: Annotated[str | None, Query()] = None,
        frm: Annotated[str | None, Query(alias="from")] = None,
        to: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ROWS)] = 500,
    ) -> list[dict[str, Any]]:
        """The alarm journal (alarm_events), newest first: every transition and operator action."""
        start, end = _range(frm, to, timedelta(days=1))
        return await svc.query(
            who,
            "SELECT * FROM {v}.alarm_events WHERE (%s::text IS NULL OR instance = %s) "
            "AND coalesce(at, ts) >= %s AND coalesce(at, ts) < %s "
            "ORDER BY coalesce(at, ts) DESC, seq DESC LIMIT %s",
            (instance, instance, start, end, limit),
        )

    async def _act(
        who: Caller, instance: str, action: str, comment: str | None, duration_ms: int | None = None
    ) -> JSONResponse:
        rows = await svc.query(who, "SELECT instance FROM {v}.alarms WHERE instance = %s", (instance,))
        if not rows:
            raise ApiError(404, "not found", f"no alarm instance {instance!r}")
        by = f"{who.name}@{who.tenant}"
        cmd = await asyncio.to_thread(svc.command, instance, action, by, comment, duration_ms)
        return JSONResponse(
            {"command": cmd["id"], "instance": instance, "action": action, "by": by}, status_code=202
        )

    @app.post("/api/alarms/{instance:path}/ack", tags=["alarms"], status_code=202)
    async def ack(who: Who, instance: str, body: AckBody | None = None) -> JSONResponse:
        """Acknowledge (audited: the token's name, the time, the comment; applied once by the worker)."""
        return await _act(who, instance, "ack", body.comment if body else None)

    @app.post("/api/alarms/{instance:path}/shelve", tags=["alarms"], status_code=202)
    async def shelve(who: Who, instance: str, body: ShelveBody) -> JSONResponse:
        """Shelve for a while (it ends by itself)."""
        try:
            ms = parse_duration_ms(body.duration)
        except ValueError as e:
            raise ApiError(422, "bad parameter", [{"param": "duration", "message": str(e)}]) from None
        if ms <= 0:
            raise ApiError(422, "bad parameter", [{"param": "duration", "message": "must be > 0"}])
        return await _act(who, instance, "shelve", body.comment, ms)

    @app.post("/api/alarms/{instance:path}/unshelve", tags=["alarms"], status_code=202)
    async def unshelve(who: Who, instance: str, body: AckBody | None = None) -> JSONResponse:
        return await _act(who, instance, "unshelve", body.comment if body else None)

    # -- the live stream ------------------------------------------------------------------------------
    @app.get("/api/stream", tags=["live"])
    async def stream(
        who: Who,
        site: Annotated[list[str] | None, Query(description="sites (default: all of the tenant's)")] = None,
        series: Annotated[list[str] | None, Query(description="series ids (default: all)")] = None,
        kinds: Annotated[list[Literal["latest", "agg", "alarm"]] | None, Query()] = None,
        last_event_id: Annotated[str | None, Header()] = None,
        resume: Annotated[str | None, Query(description="the last event id seen (as Last-Event-ID)")] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: ``latest`` (newest readings), ``agg`` (closed 1-minute aggregates), ``alarm``
        (alarm transitions), each ``id: <boot>.<seq>``. Reconnect with ``Last-Event-ID`` to resume; an
        ``resync`` event means the gap is gone: reload over REST."""
        sites = who.sites if not site else who.sites & set(site)
        client = Client(
            frozenset(sites), frozenset(series) if series else None, frozenset(kinds or KINDS), svc.hub.queue
        )
        return StreamingResponse(
            svc.hub.stream(client, last_event_id or resume),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- the page -------------------------------------------------------------------------------------
    static = resources.files("pipeline.api") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    return app
