"""OPC UA source: subscribe to nodes, turn each publish into ReadingBatches per device, survive restarts.

One asyncio loop on the runner's thread owns the client, the subscription and the Kafka producer's
delivery reports. A session runs until it is lost (server restart, network cut, session or subscription
timeout); then the client is torn down and a new one connects with capped exponential backoff, resolves
the nodes again, and recreates the subscription. Every loss and every recovery is logged and counted.

Notifications of one publish response are buffered and flushed once the response has been dispatched,
so a publish becomes one ReadingBatch per device. A reading whose timestamp is not newer than the last
one sent for its node is dropped: the initial notifications of a recreated subscription repeat values
already sent, and (point, ts) must stay unique downstream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua
from confluent_kafka import KafkaError

from connectors.common.backoff import delays
from connectors.common.batcher import LoopBatcher
from connectors.common.errors import FatalError
from connectors.common.producer import TelemetryProducer, attach_spool
from connectors.opcua import security
from connectors.opcua.config import BrowseMapping, Monitoring, OpcUaSource
from connectors.opcua.mapping import (
    Deadband,
    FilterState,
    NodeSpec,
    Skip,
    matches,
    render,
    status_name,
    to_reading,
)
from pipeline.core import codec
from pipeline.core.records import InvalidRecord, now_ms

log = logging.getLogger("plantstream.opcua")

ClientFactory = Callable[[str, float], Client]

# Refusals that retrying will not fix: wrong credentials, certificates, policies.
_FATAL_CODES = {
    ua.StatusCodes.BadUserAccessDenied: "the server refused the user {user!r}: check username and password",
    ua.StatusCodes.BadIdentityTokenInvalid: "the server does not accept this kind of identity ({auth}); "
    "check username/password or allow anonymous access on the server",
    ua.StatusCodes.BadIdentityTokenRejected: "the server rejected the identity token ({auth}); "
    "check username and password",
    ua.StatusCodes.BadSecurityPolicyRejected: "the server rejected security policy {policy}/{mode}",
    ua.StatusCodes.BadCertificateUntrusted: "the server does not trust the client certificate: add it to "
    "the server's trusted certificates",
    ua.StatusCodes.BadCertificateInvalid: "the server finds the client certificate invalid",
    ua.StatusCodes.BadCertificateUriInvalid: "the client certificate's URI does not match "
    "security.application_uri",
}
_NODE_GONE = {
    ua.StatusCodes.BadNodeIdUnknown,
    ua.StatusCodes.BadNodeIdInvalid,
    ua.StatusCodes.BadAttributeIdInvalid,
    ua.StatusCodes.BadNotReadable,
}
_FILTER_REFUSED = {
    ua.StatusCodes.BadMonitoredItemFilterUnsupported,
    ua.StatusCodes.BadFilterNotAllowed,
    ua.StatusCodes.BadDeadbandFilterInvalid,
    ua.StatusCodes.BadMonitoredItemFilterInvalid,
}
_CHUNK = 1000  # items per CreateMonitoredItems / Read / TranslateBrowsePaths request


def _nid(identifier: Any, namespace: Any, kind: Any = None) -> ua.NodeId:
    # asyncua annotates NodeId with its own NewTypes (Int32, Int16, ...); plain values are what it takes.
    return ua.NodeId(identifier, namespace) if kind is None else ua.NodeId(identifier, namespace, kind)


_HAS_PROPERTY = _nid(ua.ObjectIds.HasProperty, 0)


class _Lost(Exception):
    """The session or its subscription is gone; reconnect."""


@dataclass
class Stats:
    notifications: int = 0
    readings: int = 0
    batches: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    deadband_suppressed: int = 0
    node_errors: int = 0
    monitored: int = 0
    sessions: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    delivery_errors: int = 0
    spool_bytes: int = 0
    spool_records: int = 0
    spool_oldest_age_s: float = 0.0
    spool_dropped: int = 0
    spool_resent: int = 0
    publishing_paused: int = 0  # times the subscription was paused because a `block` spool was full


def _status_code(dv: ua.DataValue) -> int:
    sc = getattr(dv, "StatusCode", None) or getattr(dv, "StatusCode_", None)
    return int(sc.value) if sc is not None else 0


class _Handler:
    """asyncua subscription callbacks, forwarded to the runner."""

    def __init__(self, runner: OpcUaSourceRunner) -> None:
        self.runner = runner

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        item = data.monitored_item
        self.runner.on_value(item.ClientHandle, val, item.Value)

    def status_change_notification(self, status: Any) -> None:
        self.runner.on_status(status)


class OpcUaSourceRunner:
    wants_topology = True  # the spool's default directory is named after the topology

    def __init__(
        self,
        cfg: OpcUaSource,
        producer: TelemetryProducer,
        *,
        topology: Any = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.producer = producer
        self.stats = Stats()
        # The server keeps nothing for a client that missed it: store and forward on by default.
        self._spooled = attach_spool(producer, cfg.spool, topology, cfg.id, "drop_oldest", ack_durable=False)
        self.fatal: str | None = None
        self.connected = threading.Event()
        self._client_factory = client_factory or (lambda url, timeout: Client(url, timeout=timeout))
        self._states: dict[tuple[str, str, str], FilterState] = {}
        self._specs: dict[int, NodeSpec] = {}
        self._batcher = LoopBatcher(cfg.id, producer, cfg.max_batch, self.stats, log)
        self._lost: asyncio.Event | None = None
        self._lost_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ns_cache: dict[str, int] = {}
        quiet = logging.getLogger("asyncua")
        if quiet.level == logging.NOTSET:  # asyncua logs every publish response at INFO
            quiet.setLevel(logging.WARNING)

    # -- entry point ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    async def _main(self, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._batcher.loop = self._loop
        pump = asyncio.create_task(self._serve_producer(stop))
        backoff = delays(self.cfg.reconnect.initial / 1000, self.cfg.reconnect.max / 1000)
        lost_at: float | None = None
        attempt = 0
        try:
            while not stop.is_set():
                started = self.stats.sessions
                try:
                    await self._session(stop, lost_at)
                except FatalError as e:
                    self.fatal = str(e)
                    log.error("source %s: %s; this source stops", self.cfg.id, e)
                    return
                except (_Lost, OSError, TimeoutError, ua.UaError, ConnectionError) as e:
                    reason = str(e) or type(e).__name__
                except Exception as e:
                    log.exception("source %s: unexpected error", self.cfg.id)
                    reason = repr(e)
                else:
                    return  # stop was set
                if stop.is_set():
                    return
                if self.stats.sessions > started:  # there was a session, and it was lost
                    lost_at = time.monotonic()
                    attempt = 0
                    backoff = delays(self.cfg.reconnect.initial / 1000, self.cfg.reconnect.max / 1000)
                    delay = next(backoff)
                    log.warning(
                        "source %s: connection to %s lost (%s); reconnecting in %.1fs",
                        self.cfg.id,
                        self.cfg.endpoint,
                        reason,
                        delay,
                    )
                else:
                    self.stats.connect_failures += 1
                    attempt += 1
                    delay = next(backoff)
                    log.warning(
                        "source %s: cannot connect to %s (%s); attempt %d failed, next in %.1fs",
                        self.cfg.id,
                        self.cfg.endpoint,
                        reason,
                        attempt,
                        delay,
                    )
                await _sleep(stop, delay)
        finally:
            self._flush()
            pump.cancel()
            self.producer.flush(10)

    async def _serve_producer(self, stop: threading.Event) -> None:
        next_stats = 0.0
        while True:
            self.producer.poll(0)
            if self._spooled and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + 1.0
                self.producer.update_stats(self.stats)
            await asyncio.sleep(0.05)

    # -- one session ---------------------------------------------------------------------------------
    async def _session(self, stop: threading.Event, lost_at: float | None) -> None:
        cfg = self.cfg
        client = self._client_factory(cfg.endpoint, cfg.request_timeout / 1000)
        self._lost = lost = asyncio.Event()
        self._lost_reason = ""
        self._ns_cache = {}

        async def on_lost(exc: Exception) -> None:
            self._lost_reason = str(exc) or type(exc).__name__
            lost.set()

        if hasattr(client, "connection_lost_callback"):
            client.connection_lost_callback = on_lost
        connected = False
        try:
            await security.configure(client, cfg.security, cfg.id)
            if cfg.username is not None and cfg.password is not None:
                client.set_user(cfg.username)
                client.set_password(cfg.password.get_secret_value())
            await self._connect(client)
            connected = True
            specs = await self._resolve(client)
            sub = await client.create_subscription(float(cfg.publishing_interval), _Handler(self))
            await self._monitor(sub, specs)
            self.stats.sessions += 1
            self.connected.set()
            if lost_at is None:
                log.info(
                    "source %s: connected to %s, subscribed to %d node(s)",
                    cfg.id,
                    cfg.endpoint,
                    self.stats.monitored,
                )
            else:
                self.stats.reconnects += 1
                log.warning(
                    "source %s: reconnected to %s after %.1fs; subscription recreated with %d "
                    "node(s) (reconnect #%d)",
                    cfg.id,
                    cfg.endpoint,
                    time.monotonic() - lost_at,
                    self.stats.monitored,
                    self.stats.reconnects,
                )
            next_check = time.monotonic() + 1.0
            publishing = True
            while not stop.is_set() and not lost.is_set():
                await asyncio.sleep(0.1)
                if self._spooled and publishing != self.producer.room:
                    # when_full: block. The server keeps sampling into each item's queue (queue_size,
                    # oldest discarded) while publishing is off, and sends what it kept when it is on again.
                    publishing = not publishing
                    await sub.set_publishing_mode(publishing)
                    if not publishing:
                        self.stats.publishing_paused += 1
                    log.warning(
                        "source %s: spool %s; publishing %s",
                        cfg.id,
                        "full" if not publishing else "has room again",
                        "paused" if not publishing else "resumed",
                    )
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    await asyncio.wait_for(client.check_connection(), cfg.request_timeout / 1000)
            if lost.is_set():
                raise _Lost(self._lost_reason or "connection lost")
        finally:
            self.connected.clear()
            self._flush()
            self._specs = {}
            await self._close(client, graceful=connected and not lost.is_set())

    async def _connect(self, client: Client) -> None:
        cfg = self.cfg
        try:
            await client.connect()
        except ua.UaStatusCodeError as e:
            hint = _FATAL_CODES.get(e.code)
            if hint is None:
                raise
            auth = f"user {cfg.username!r}" if cfg.username else "anonymous"
            msg = hint.format(
                user=cfg.username, auth=auth, policy=cfg.security.policy, mode=cfg.security.mode
            )
            raise FatalError(f"{msg} ({status_name(e.code)} from {cfg.endpoint})") from None

    async def _close(self, client: Client, graceful: bool) -> None:
        try:
            if graceful:
                await asyncio.wait_for(client.disconnect(), self.cfg.request_timeout / 1000 + 1)
            else:
                # The transport is gone: closing the session politely would only wait for timeouts.
                if hasattr(client, "close_session"):
                    client.uaclient.pre_request_hook = None
                    await asyncio.wait_for(client.close_session(), 1.0)
        except Exception:
            log.debug("source %s: error while closing the client", self.cfg.id, exc_info=True)
        finally:
            client.disconnect_socket()

    # -- resolving nodes -----------------------------------------------------------------------------
    async def _node_id(self, client: Client, text: str) -> ua.NodeId:
        nid = ua.NodeId.from_string(text)
        uri = getattr(nid, "NamespaceUri", None)
        if uri:
            if uri not in self._ns_cache:
                try:
                    self._ns_cache[uri] = await client.get_namespace_index(uri)
                except ValueError:
                    raise _UnknownNode(f"namespace {uri!r} is not on the server") from None
            return _nid(nid.Identifier, self._ns_cache[uri], nid.NodeIdType)
        return _nid(nid.Identifier, nid.NamespaceIndex, nid.NodeIdType)

    def _spec(
        self, node_id: str, site: str | None, device: str, point: str, unit: str | None, mon: Monitoring
    ) -> NodeSpec:
        d = self.cfg.defaults
        db_cfg = mon.deadband or d.deadband
        key = (site or self.cfg.site, device, point)
        state = self._states.setdefault(key, FilterState())
        return NodeSpec(
            node_id=node_id,
            site=key[0],
            device=device,
            point=point,
            unit=unit,
            sampling_interval=mon.sampling_interval or d.sampling_interval,
            queue_size=mon.queue_size or d.queue_size,
            deadband=Deadband(db_cfg.type, db_cfg.value) if db_cfg else None,
            state=state,
        )

    async def _resolve(self, client: Client) -> list[tuple[NodeSpec, ua.NodeId]]:
        out: list[tuple[NodeSpec, ua.NodeId]] = []
        for n in self.cfg.nodes:
            spec = self._spec(n.node_id, n.site, n.device, n.point, n.unit, n)
            try:
                out.append((spec, await self._node_id(client, n.node_id)))
            except _UnknownNode as e:
                self._report_node(spec, str(e))
        for b in self.cfg.browse:
            out.extend(await self._browse(client, b))
        seen: set[tuple[str, str, str]] = set()
        unique = []
        for spec, nid in out:
            key = (spec.site, spec.device, spec.point)
            if key in seen:
                log.warning(
                    "source %s: %s maps to %s, which another node already has; ignored",
                    self.cfg.id,
                    spec.node_id,
                    "/".join(key),
                )
                continue
            seen.add(key)
            unique.append((spec, nid))
        return await self._properties(client, unique)

    async def _browse(self, client: Client, b: BrowseMapping) -> list[tuple[NodeSpec, ua.NodeId]]:
        try:
            if b.root.startswith("/"):  # a browse path from the Root folder
                root = await client.nodes.root.get_child(b.root.strip("/").split("/"))
            else:
                root = client.get_node(await self._node_id(client, b.root))
            root_name = (await root.read_browse_name()).Name
        except (_UnknownNode, ua.UaStatusCodeError) as e:
            self.stats.node_errors += 1
            self._dead_letter(f"node unknown: browse root {b.root}: {e}", {"node_id": b.root})
            return []
        found: list[tuple[NodeSpec, ua.NodeId]] = []

        async def walk(node: Any, parent: str, rel: str, depth: int) -> None:
            refs = await node.get_references(
                refs=ua.ObjectIds.HierarchicalReferences,
                direction=ua.BrowseDirection.Forward,
                includesubtypes=True,
            )
            for ref in refs:
                if ref.ReferenceTypeId == _HAS_PROPERTY:
                    continue  # EURange, EngineeringUnits and the like describe a node; they are not points
                name = ref.BrowseName.Name
                nid = _nid(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex, ref.NodeId.NodeIdType)
                if ref.NodeClass == ua.NodeClass.Variable:
                    if matches(name, b.include, b.exclude):
                        spec = self._spec(
                            nid.to_string(),
                            b.site,
                            render(b.device, name, parent, rel + name),
                            render(b.point, name, parent, rel + name),
                            b.unit,
                            b,
                        )
                        found.append((spec, nid))
                elif ref.NodeClass == ua.NodeClass.Object and b.recursive and depth < b.max_depth:
                    await walk(client.get_node(nid), name, f"{rel}{name}/", depth + 1)

        await walk(root, root_name, "", 1)
        if not found:
            log.warning("source %s: no Variable under %s matches %r", self.cfg.id, b.root, b.include)
        return found

    async def _properties(
        self, client: Client, specs: list[tuple[NodeSpec, ua.NodeId]]
    ) -> list[tuple[NodeSpec, ua.NodeId]]:
        """Read EngineeringUnits (for units) and EURange (for percent deadbands) in a few batched requests.

        Also where an unknown node shows up first: its browse paths fail with BadNodeIdUnknown.
        """
        paths = []
        for _, nid in specs:
            for prop in ("EURange", "EngineeringUnits"):
                bp = ua.BrowsePath()
                bp.StartingNode = nid
                bp.RelativePath = ua.RelativePath.from_string(f"/0:{prop}")
                paths.append(bp)
        results: list[Any] = []
        for i in range(0, len(paths), _CHUNK):
            results.extend(await client.uaclient.translate_browsepaths_to_nodeids(paths[i : i + _CHUNK]))
        targets: list[tuple[int, str, ua.NodeId]] = []
        kept = []
        for i, (spec, nid) in enumerate(specs):
            rng, eu = results[2 * i], results[2 * i + 1]
            if rng.StatusCode.value in _NODE_GONE:
                self._report_node(spec, status_name(rng.StatusCode.value))
                continue
            kept.append((spec, nid))
            for what, res in (("EURange", rng), ("EngineeringUnits", eu)):
                if res.StatusCode.is_good() and res.Targets:
                    t = res.Targets[0].TargetId
                    targets.append((len(kept) - 1, what, _nid(t.Identifier, t.NamespaceIndex, t.NodeIdType)))
        values: list[Any] = []
        for i in range(0, len(targets), _CHUNK):
            chunk = targets[i : i + _CHUNK]
            values.extend(await client.read_values([client.get_node(t[2]) for t in chunk]))
        ranges: dict[int, Any] = {}
        for (idx, what, _), v in zip(targets, values, strict=True):
            spec = kept[idx][0]
            if what == "EURange" and v is not None:
                ranges[idx] = v
            elif what == "EngineeringUnits" and v is not None and spec.unit is None:
                text = getattr(getattr(v, "DisplayName", None), "Text", None)
                if text:
                    spec.unit = text
        for idx, (spec, _) in enumerate(kept):
            db = spec.deadband
            if db is not None and db.kind == "percent":
                rng = ranges.get(idx)
                if rng is None:
                    raise FatalError(
                        f"node {spec.node_id} ({spec.site}/{spec.device}/{spec.point}) has a percent "
                        "deadband, which needs the node's EURange property, and the server has none for it: "
                        "use 'deadband: {type: absolute, value: ...}' for this node"
                    )
                db.span = float(rng.High) - float(rng.Low)
        return kept

    # -- subscription --------------------------------------------------------------------------------
    async def _monitor(self, sub: Any, specs: list[tuple[NodeSpec, ua.NodeId]]) -> None:
        handles = {h: s for h, (s, _) in enumerate(specs, start=1)}
        self._specs = handles  # before the request: the first notifications may beat its response
        reqs = [_request(h, nid, spec, with_filter=True) for h, (spec, nid) in enumerate(specs, start=1)]
        ok = 0
        retry = []
        for i in range(0, len(reqs), _CHUNK):
            chunk = reqs[i : i + _CHUNK]
            for req, res in zip(chunk, await sub.create_monitored_items(chunk), strict=True):
                h = req.RequestedParameters.ClientHandle
                if isinstance(res, int):
                    ok += 1
                elif res.value in _FILTER_REFUSED and req.RequestedParameters.Filter is not None:
                    retry.append(h)  # the deadband is still applied here, on the client side
                else:
                    self._report_node(handles[h], status_name(res.value))
        if retry:
            log.info(
                "source %s: the server refuses deadband filters on %d node(s); filtering on the client",
                self.cfg.id,
                len(retry),
            )
            by_handle = {h: nid for h, (_, nid) in enumerate(specs, start=1)}
            again = [_request(h, by_handle[h], handles[h], with_filter=False) for h in retry]
            for req, res in zip(again, await sub.create_monitored_items(again), strict=True):
                if isinstance(res, int):
                    ok += 1
                else:
                    self._report_node(handles[req.RequestedParameters.ClientHandle], status_name(res.value))
        self.stats.monitored = ok

    def on_status(self, status: Any) -> None:
        code = int(status.Status.value)
        if code & 0x80000000 and self._lost is not None:
            self._lost_reason = f"subscription status {status_name(code)}"
            self._lost.set()

    def on_value(self, handle: int, value: Any, dv: ua.DataValue) -> None:
        spec = self._specs.get(handle)
        if spec is None:
            return  # a late notification of a subscription being torn down
        self.stats.notifications += 1
        code = _status_code(dv)
        try:
            r = to_reading(
                spec, value, code, dv.SourceTimestamp, dv.ServerTimestamp, self.cfg.timestamp, now_ms()
            )
        except Skip as s:
            if s.why == "duplicate":
                self.stats.duplicates += 1
            else:
                self.stats.deadband_suppressed += 1
            return
        except InvalidRecord as e:
            if code in _NODE_GONE:
                self._report_node(spec, status_name(code))
            else:
                self._dead_letter(
                    e.reason,
                    {
                        "node_id": spec.node_id,
                        "site": spec.site,
                        "device": spec.device,
                        "point": spec.point,
                        "value": repr(value)[:200],
                        "status": code,
                    },
                )
            return
        self._batcher.add(spec.site, spec.device, r)

    # -- output --------------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._batcher.flush()

    def _delivered(self, err: KafkaError | None) -> None:
        self._batcher.delivered(err)

    def _report_node(self, spec: NodeSpec, why: str) -> None:
        self.stats.node_errors += 1
        log.warning(
            "source %s: node %s (%s/%s/%s) is not monitored: %s",
            self.cfg.id,
            spec.node_id,
            spec.site,
            spec.device,
            spec.point,
            why,
        )
        self._dead_letter(
            f"node unknown: {spec.node_id}: {why}",
            {
                "node_id": spec.node_id,
                "site": spec.site,
                "device": spec.device,
                "point": spec.point,
                "status": why,
            },
        )

    def _dead_letter(self, reason: str, payload: dict[str, Any]) -> None:
        self.stats.dead_letters += 1
        self.producer.send_dead_letter(self.cfg.id, reason, codec.dumps(payload), None, self._delivered)


class _UnknownNode(Exception):
    pass


def _request(handle: int, nid: ua.NodeId, spec: NodeSpec, with_filter: bool) -> ua.MonitoredItemCreateRequest:
    rv = ua.ReadValueId()
    rv.NodeId = nid
    rv.AttributeId = ua.AttributeIds.Value
    mp = ua.MonitoringParameters()
    mp.ClientHandle = handle
    mp.SamplingInterval = float(spec.sampling_interval)
    mp.QueueSize = spec.queue_size
    mp.DiscardOldest = True
    db = spec.deadband
    if db is not None and with_filter:
        flt = ua.DataChangeFilter()
        flt.Trigger = ua.DataChangeTrigger.StatusValue
        flt.DeadbandType = ua.DeadbandType.Absolute if db.kind == "absolute" else ua.DeadbandType.Percent
        flt.DeadbandValue = db.value
        mp.Filter = flt
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor = rv
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters = mp
    return req


async def _sleep(stop: threading.Event, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
