"""BACnet/IP source: discover devices, poll each at its own pace, subscribe to COV, execute writes.

One asyncio loop on the runner's thread owns the bacpypes3 application. Every device has its own task:
it reads the device's description once (name, max APDU, segmentation, points and units), then polls its
points with ReadPropertyMultiple, split so that each answer fits the device's max APDU (halved again if
the device still aborts for size), and falls back to ReadProperty for devices that reject RPM. A device
that is slow or silent only delays its own task: requests have timeouts and the tasks do not wait on
each other. Points marked ``cov`` are subscribed with SubscribeCOV (renewed before the lifetime ends) and
left out of polling while the subscription delivers; when it fails they are polled until it is back.

With the topology at hand the runner also executes the BACnet write commands for its points
(``connectors/bacnet/commands.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError

from connectors.bacnet.client import BacnetClient, BacnetError, IAm, PropertyError
from connectors.bacnet.commands import CommandExecutor, WritePolicy, WriteRefused
from connectors.bacnet.config import BacnetSource, DeviceConfig
from connectors.bacnet.values import (
    flags_of,
    numeric,
    objects_per_request,
    quality_of,
    status_of,
    unit_symbol,
)
from connectors.common.backoff import delays
from connectors.common.batcher import LoopBatcher
from connectors.common.producer import TelemetryProducer, attach_spool
from pipeline.core import codec
from pipeline.core.records import BatchReading, InvalidRecord, now_ms

log = logging.getLogger("plantstream.bacnet")

POLL_PROPS = ("present-value", "status-flags", "reliability")
RP_PROPS = ("present-value", "status-flags")  # one request each: reliability only where a fault shows
ClientFactory = Callable[[BacnetSource], BacnetClient]


@dataclass
class Point:
    ref: str
    name: str
    unit: str | None = None
    cov: bool = False
    cov_active: bool = False
    failing: str | None = None
    last_flags: Any = None


@dataclass
class Device:
    instance: int
    cfg: DeviceConfig | None
    site: str
    interval: float
    address: str | None = None
    name: str | None = None
    max_apdu: int = 1476
    segmentation: str = "unknown"
    rpm: bool | None = None
    chunk: int = 0
    points: list[Point] = field(default_factory=list)
    vendor: int | None = None  # identity read at setup; a new address must show the same
    model: str | None = None
    doubt: str | None = None  # why the address is in doubt (a conflicting I-Am): writes are refused
    warned: set[str] = field(default_factory=set)  # claimants already logged (pinned devices)
    ready: bool = False
    online: bool = False
    polls: int = 0
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sem: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


@dataclass
class Stats:
    devices: int = 0
    discovered: int = 0
    points: int = 0
    polls: int = 0
    poll_errors: int = 0
    rpm_requests: int = 0
    rp_requests: int = 0
    rpm_fallbacks: int = 0
    request_splits: int = 0
    readings: int = 0
    batches: int = 0
    dead_letters: int = 0
    point_errors: int = 0
    cov_subscriptions: int = 0
    cov_notifications: int = 0
    cov_failures: int = 0
    writes: int = 0
    iam_conflicts: int = 0
    moves: int = 0
    delivery_errors: int = 0
    spool_bytes: int = 0
    spool_records: int = 0
    spool_oldest_age_s: float = 0.0
    spool_dropped: int = 0
    spool_resent: int = 0
    polls_held: int = 0  # polls put off because a `block` spool was full


class BacnetSourceRunner:
    wants_topology = True  # the write path needs the whole topology (cli.connect passes it)

    def __init__(
        self,
        cfg: BacnetSource,
        producer: TelemetryProducer,
        *,
        topology: Any = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.producer = producer
        self.stats = Stats()
        # A device keeps nothing for a client that missed it: store and forward on by default.
        self._spooled = attach_spool(producer, cfg.spool, topology, cfg.id, "drop_oldest", ack_durable=False)
        self.fatal: str | None = None
        self.ready = threading.Event()
        self.devices: dict[int, Device] = {}
        self.discovered: dict[int, IAm] = {}
        self._client_factory = client_factory or _default_client
        self._client: BacnetClient | None = None
        self._batcher = LoopBatcher(cfg.id, producer, cfg.max_batch, self.stats, log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._points = cfg.configured_points()
        self.executor: Any = None
        if topology is not None:
            policy = WritePolicy(topology)
            # One source per network executes its commands; the others on the network leave them to it.
            if policy.executors.get(cfg.network_id) == cfg.id:
                self.executor = CommandExecutor(
                    topology,
                    policy,
                    cfg.id,
                    network=cfg.network_id,
                    write_timeout=cfg.defaults.timeout / 1000,
                )

    # -- entry point ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    @property
    def client(self) -> BacnetClient:
        assert self._client is not None
        return self._client

    async def _main(self, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._batcher.loop = self._loop
        try:
            self._client = self._client_factory(self.cfg)
        except (OSError, ValueError, RuntimeError) as e:
            self.fatal = f"cannot open the BACnet/IP socket at {self.cfg.local_address}: {e}"
            log.error("source %s: %s", self.cfg.id, self.fatal)
            return
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(self._serve_producer())]
        try:
            for dc in self.cfg.devices:
                dev = self._device(dc.instance, dc)
                if dc.address:
                    dev.address = dc.address
                    self._start(dev)
            if self.cfg.discovery is not None:
                tasks.append(asyncio.create_task(self._discover_loop()))
            if self.executor is not None:
                tasks.append(asyncio.create_task(self.executor.run(stop, self.write)))
            self.ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)
        finally:
            for dev in self.devices.values():
                tasks.extend(dev.tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._flush()
            self.client.close()
            self.producer.flush(10)

    async def _serve_producer(self) -> None:
        next_stats = 0.0
        while True:
            self.producer.poll(0)
            if self._spooled and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + 1.0
                self.producer.update_stats(self.stats)
            await asyncio.sleep(0.05)

    # -- devices -------------------------------------------------------------------------------------
    def _device(self, instance: int, dc: DeviceConfig | None) -> Device:
        d = self.cfg.defaults
        interval = (dc.interval if dc and dc.interval else d.interval) / 1000.0
        dev = Device(
            instance=instance,
            cfg=dc,
            site=(dc.site if dc and dc.site else self.cfg.site),
            interval=interval,
            sem=asyncio.Semaphore(d.max_concurrent),
        )
        self.devices[instance] = dev
        self.stats.devices = len(self.devices)
        return dev

    def _start(self, dev: Device) -> None:
        dev.tasks.append(asyncio.create_task(self._device_loop(dev), name=f"bacnet-device-{dev.instance}"))

    async def _discover_loop(self) -> None:
        disc = self.cfg.discovery
        assert disc is not None
        while True:
            try:
                found = await self.client.who_is(disc.low, disc.high, disc.target, disc.timeout / 1000)
            except (BacnetError, OSError) as e:
                log.warning("source %s: Who-Is failed: %s", self.cfg.id, e)
                found = []
            claims: dict[int, list[IAm]] = {}
            for iam in found:
                if all(c.address != iam.address for c in claims.get(iam.instance, [])):
                    claims.setdefault(iam.instance, []).append(iam)
            await asyncio.gather(*(self._claimed(i, c) for i, c in claims.items()))
            if disc.interval == 0:
                return
            await asyncio.sleep(disc.interval / 1000)

    async def _claimed(self, instance: int, iams: list[IAm]) -> None:
        """Act on the I-Am answers of one Who-Is round for ``instance``.

        Anyone on the network can send an I-Am, so an address is taken or changed only when verified: a
        new device's claimant must answer a ReadProperty of its device object with that instance, and a
        known device moves only when its address stops answering as it and the new one answers with the
        same identity (instance, vendor, model). Otherwise the known address stays; while a conflict is
        being checked or stays unresolved, writes to the device are refused.
        """
        known = instance in self.discovered
        self.discovered[instance] = iams[0]
        self.stats.discovered = len(self.discovered)
        dev = self.devices.get(instance)
        if dev is None:
            dev = self._device(instance, None)
        addresses = [i.address for i in iams]
        if dev.cfg is not None and dev.cfg.address is not None:  # pinned: I-Am answers change nothing
            for a in addresses:
                if not _same_address(a, dev.address) and a not in dev.warned:
                    dev.warned.add(a)
                    self.stats.iam_conflicts += 1
                    log.warning(
                        "source %s: device %d is claimed from %s by an I-Am; its address is pinned to %s, "
                        "which stays",
                        self.cfg.id,
                        instance,
                        a,
                        dev.address,
                    )
            return
        if dev.address is None:
            why = await asyncio.gather(*(self._answers_as(dev, a) for a in addresses))
            verified = [a for a, w in zip(addresses, why, strict=True) if w is None]
            if len(addresses) > 1:
                self.stats.iam_conflicts += 1
            if len(verified) != 1:
                log.warning(
                    "source %s: device %d claimed from %s: %s; not read until one address answers as it",
                    self.cfg.id,
                    instance,
                    ", ".join(addresses),
                    "more than one answers as it (pin the right one with 'address')"
                    if verified
                    else "; ".join(w for w in why if w),
                )
                return
            iam = next(i for i in iams if i.address == verified[0])
            dev.address = iam.address
            dev.max_apdu = iam.max_apdu
            log.info(
                "source %s: found device %d at %s (max APDU %d, %s)",
                self.cfg.id,
                instance,
                iam.address,
                iam.max_apdu,
                iam.segmentation,
            )
            self._start(dev)
            return
        others = [a for a in addresses if a != dev.address]
        if not others:
            if dev.doubt is not None and await self._answers_as(dev, dev.address) is None:
                log.info(
                    "source %s: device %d answers at %s again and nobody else claims it: writes resume",
                    self.cfg.id,
                    instance,
                    dev.address,
                )
                dev.doubt = None
            elif not known:
                log.info("source %s: device %d answers Who-Is at %s", self.cfg.id, instance, dev.address)
            return
        for new in others:
            await self._verify_move(dev, new)

    async def _verify_move(self, dev: Device, new: str) -> None:
        old = dev.address
        assert old is not None
        earlier_doubt = dev.doubt
        dev.doubt = f"device {dev.instance} is claimed from {new} as well as from {old}; being verified"
        stale = await self._answers_as(dev, old)
        if stale is None:  # the known address still answers as the device: the other claim is false
            dev.doubt = None
            self.stats.iam_conflicts += 1
            first = new not in dev.warned  # said once per claimant; counted every time
            dev.warned.add(new)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "source %s: device %d is claimed from %s by an I-Am, but it still answers at %s: keeping %s",
                self.cfg.id,
                dev.instance,
                new,
                old,
                old,
            )
            return
        wrong = await self._answers_as(dev, new, identity=True)
        if wrong is None:
            self.stats.moves += 1
            log.warning(
                "source %s: device %d moved from %s to %s (%s; %s answers with the same identity)",
                self.cfg.id,
                dev.instance,
                old,
                new,
                stale,
                new,
            )
            dev.address = new
            dev.doubt = None
            dev.ready = False  # set up again at the new address: points, COV subscriptions
            dev.wake.set()
            return
        self.stats.iam_conflicts += 1
        dev.doubt = (
            f"the address of device {dev.instance} is in doubt: {stale}, and {new} claims the device "
            f"but {wrong}"
        )
        if dev.doubt != earlier_doubt:
            log.warning("source %s: %s; keeping %s", self.cfg.id, dev.doubt, old)

    async def _answers_as(self, dev: Device, address: str, identity: bool = False) -> str | None:
        """None when ``address`` answers as ``dev`` (and, with ``identity``, shows its vendor and model);
        else what it does instead."""
        dref = f"device,{dev.instance}"
        try:
            oid = await self.client.read(address, dref, "object-identifier")
        except BacnetError as e:
            return f"{address} does not answer as device {dev.instance} ({e})"
        try:
            instance = int(oid[1])
        except (TypeError, ValueError, IndexError):
            return f"{address} answers with an object identifier {oid!r}"
        if instance != dev.instance:
            return f"{address} answers as device {instance}"
        if identity:
            for prop, had in (("vendor-identifier", dev.vendor), ("model-name", dev.model)):
                if had is None:
                    continue
                try:
                    value = await self.client.read(address, dref, prop)
                except BacnetError as e:
                    return f"{address} does not tell its {prop} ({e})"
                if str(value) != str(had):
                    return f"{address} has {prop} {str(value)!r}, the device had {str(had)!r}"
        return None

    async def _device_loop(self, dev: Device) -> None:
        backoff = delays(1.0, max(5.0, dev.interval))
        while True:
            try:
                if not dev.ready:
                    await self._setup(dev)
                started = time.monotonic()
                if self._spooled and not self.producer.room:
                    # when_full: block. The next poll waits for room (the event loop keeps serving
                    # COV, keepalives and commands meanwhile).
                    self.stats.polls_held += 1
                    await self.producer.wait_room()
                await self._poll(dev)
                dev.failures = 0
                if not dev.online:
                    dev.online = True
                    log.info(
                        "source %s: device %s (%d) answering at %s",
                        self.cfg.id,
                        dev.name,
                        dev.instance,
                        dev.address,
                    )
                backoff = delays(1.0, max(5.0, dev.interval))
                dev.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        dev.wake.wait(), max(0.0, dev.interval - (time.monotonic() - started))
                    )
            except asyncio.CancelledError:
                raise
            except BacnetError as e:
                self.stats.poll_errors += 1
                dev.failures += 1
                delay = next(backoff)
                # Said when the device stops answering, then every tenth failed attempt, not every retry.
                if dev.online or dev.failures % 10 == 1:
                    log.warning(
                        "source %s: device %s (%d at %s) %s: %s; retrying in %.1fs",
                        self.cfg.id,
                        dev.name or "?",
                        dev.instance,
                        dev.address,
                        "not answering" if e.kind in ("timeout", "abort") else "refused",
                        e,
                        delay,
                    )
                dev.online = False
                await asyncio.sleep(delay)
            except Exception:
                log.exception("source %s: device %d: unexpected error", self.cfg.id, dev.instance)
                dev.online = False
                await asyncio.sleep(next(backoff))

    async def _setup(self, dev: Device) -> None:
        """Read what the device is and which points it has; once, then after it was lost."""
        assert dev.address is not None
        dref = f"device,{dev.instance}"
        info = await self._read_props(
            dev,
            [dref],
            (
                "object-name",
                "max-apdu-length-accepted",
                "segmentation-supported",
                "vendor-identifier",
                "model-name",
            ),
        )
        vendor, model = info.get((dref, "vendor-identifier")), info.get((dref, "model-name"))
        if vendor is not None and not isinstance(vendor, PropertyError):
            dev.vendor = int(vendor)
        if model is not None and not isinstance(model, PropertyError):
            dev.model = str(model)
        name = info.get((dref, "object-name"))
        cfg_name = dev.cfg.name if dev.cfg else None
        dev.name = cfg_name or (
            str(name).replace("/", "-")
            if name and not isinstance(name, PropertyError)
            else f"device-{dev.instance}"
        )
        apdu = info.get((dref, "max-apdu-length-accepted"))
        if dev.cfg and dev.cfg.max_apdu:
            dev.max_apdu = dev.cfg.max_apdu
        elif isinstance(apdu, int):
            dev.max_apdu = int(apdu)
        seg = info.get((dref, "segmentation-supported"))
        dev.segmentation = str(seg) if seg is not None and not isinstance(seg, PropertyError) else "unknown"
        dev.chunk = objects_per_request(dev.max_apdu, POLL_PROPS)
        points = await self._points_of(dev)
        analog = [p.ref for p in points if p.ref.startswith("analog-") and p.unit is None]
        if analog:
            units = await self._read_props(dev, analog, ("units",))
            for p in points:
                u = units.get((p.ref, "units"))
                if p.unit is None and u is not None and not isinstance(u, PropertyError):
                    p.unit = unit_symbol(u)
        for old in dev.tasks[1:]:  # COV tasks of an earlier setup
            old.cancel()
        del dev.tasks[1:]
        dev.points = points
        dev.ready = True
        self.stats.points = sum(len(d.points) for d in self.devices.values())
        log.info(
            "source %s: device %s (%d at %s): %d points, max APDU %d, %s, %d objects per RPM",
            self.cfg.id,
            dev.name,
            dev.instance,
            dev.address,
            len(points),
            dev.max_apdu,
            dev.segmentation,
            dev.chunk,
        )
        for p in points:
            if p.cov:
                dev.tasks.append(
                    asyncio.create_task(self._cov_loop(dev, p), name=f"cov-{dev.instance}-{p.ref}")
                )

    async def _points_of(self, dev: Device) -> list[Point]:
        d, dc = self.cfg.defaults, dev.cfg
        cov_pattern = (dc.cov_pattern if dc and dc.cov_pattern else None) or d.cov_pattern
        explicit = [Point(p.object, p.name or "", unit=p.unit, cov=p.cov) for p in (dc.points if dc else [])]
        use_list = dc.object_list if dc and dc.object_list is not None else not explicit
        listed: list[str] = []
        if use_list:
            types = set((dc.object_types if dc and dc.object_types else None) or d.object_types)
            given = {p.ref for p in explicit}
            listed = [
                r for r in await self._object_list(dev) if r.split(",", 1)[0] in types and r not in given
            ]
        unnamed = [p.ref for p in explicit if not p.name] + listed
        names = await self._read_props(dev, unnamed, ("object-name",)) if unnamed else {}

        def name_of(ref: str) -> str:
            n = names.get((ref, "object-name"))
            return str(n) if n is not None and not isinstance(n, PropertyError) else ref

        for p in explicit:
            p.name = p.name or name_of(p.ref)
        pattern = (dc.name_pattern if dc and dc.name_pattern else None) or d.name_pattern
        taken = {p.name for p in explicit}
        points = list(explicit)
        for ref in listed:
            name = name_of(ref)
            if fnmatch.fnmatchcase(name, pattern) and name not in taken:
                taken.add(name)
                points.append(
                    Point(ref, name, cov=bool(cov_pattern and fnmatch.fnmatchcase(name, cov_pattern)))
                )
        return points

    async def _object_list(self, dev: Device) -> list[str]:
        assert dev.address is not None
        dref = f"device,{dev.instance}"
        try:
            async with dev.sem:
                items = await self.client.read(dev.address, dref, "object-list")
            self.stats.rp_requests += 1
        except BacnetError as e:
            if not e.too_big:
                raise
            # Too long for one answer without segmentation: its length, then element by element.
            async with dev.sem:
                count = int(await self.client.read(dev.address, dref, "object-list", 0))

            async def one(i: int) -> Any:
                async with dev.sem:
                    return await self.client.read(dev.address or "", dref, "object-list", i)

            items = await asyncio.gather(*(one(i) for i in range(1, count + 1)))
            self.stats.rp_requests += count + 1
        return [f"{o[0]},{o[1]}" for o in items]

    # -- reading -------------------------------------------------------------------------------------
    async def _read_props(
        self, dev: Device, refs: Sequence[str], props: Sequence[str], rp_props: Sequence[str] | None = None
    ) -> dict[tuple[str, str], Any]:
        forced = dev.cfg.read_multiple if dev.cfg else None
        if forced is not False and dev.rpm is not False:
            try:
                return await self._rpm(dev, refs, props)
            except BacnetError as e:
                if not e.rpm_unsupported or forced is True:
                    raise
                dev.rpm = False
                self.stats.rpm_fallbacks += 1
                log.warning(
                    "source %s: device %s (%d) rejects ReadPropertyMultiple (%s); using ReadProperty",
                    self.cfg.id,
                    dev.name or "?",
                    dev.instance,
                    e,
                )
        return await self._rp(dev, refs, rp_props or props)

    async def _rpm(
        self, dev: Device, refs: Sequence[str], props: Sequence[str]
    ) -> dict[tuple[str, str], Any]:
        size = max(
            1,
            min(
                dev.chunk or objects_per_request(dev.max_apdu, props),
                objects_per_request(dev.max_apdu, props),
            ),
        )
        parts = [list(refs[i : i + size]) for i in range(0, len(refs), size)]
        results = await asyncio.gather(*(self._rpm_part(dev, part, props) for part in parts))
        out: dict[tuple[str, str], Any] = {}
        for r in results:
            out.update(r)
        return out

    async def _rpm_part(
        self, dev: Device, refs: list[str], props: Sequence[str]
    ) -> dict[tuple[str, str], Any]:
        assert dev.address is not None
        try:
            async with dev.sem:
                res = await self.client.read_multiple(dev.address, refs, props)
            self.stats.rpm_requests += 1
            dev.rpm = True
            return res
        except BacnetError as e:
            if not e.too_big:
                raise
            if len(refs) == 1:
                return await self._rp(dev, refs, props)
            half = len(refs) // 2
            dev.chunk = max(1, half)
            self.stats.request_splits += 1
            log.info(
                "source %s: device %s aborts an RPM of %d objects (%s); asking for %d at a time",
                self.cfg.id,
                dev.name or dev.instance,
                len(refs),
                e.detail,
                dev.chunk,
            )
            a = await self._rpm_part(dev, refs[:half], props)
            b = await self._rpm_part(dev, refs[half:], props)
            return {**a, **b}

    async def _rp(self, dev: Device, refs: Sequence[str], props: Sequence[str]) -> dict[tuple[str, str], Any]:
        async def one(ref: str, prop: str) -> tuple[tuple[str, str], Any]:
            assert dev.address is not None
            async with dev.sem:
                try:
                    value = await self.client.read(dev.address, ref, prop)
                except BacnetError as e:
                    if e.kind != "error":
                        raise
                    cls, _, code = e.detail.partition(": ")
                    value = PropertyError(cls, code)
            self.stats.rp_requests += 1
            return (ref, prop), value

        pairs = await asyncio.gather(*(one(r, p) for r in refs for p in props))
        return dict(pairs)

    async def _poll(self, dev: Device) -> None:
        polled = [p for p in dev.points if not p.cov_active]
        dev.polls += 1
        self.stats.polls += 1
        if not polled:
            return
        vals = await self._read_props(dev, [p.ref for p in polled], POLL_PROPS, RP_PROPS)
        if dev.rpm is False:  # ReadProperty: reliability only where statusFlags show a fault
            faulty = [p.ref for p in polled if flags_of(_ok(vals.get((p.ref, "status-flags"))))[1]]
            if faulty:
                vals.update(await self._rp(dev, faulty, ("reliability",)))
        ts = now_ms()
        for p in polled:
            r = self._reading(
                dev,
                p,
                vals.get((p.ref, "present-value")),
                vals.get((p.ref, "status-flags")),
                vals.get((p.ref, "reliability")),
                ts,
            )
            if r is not None:
                self._queue(dev, r)
        self._flush()

    def _reading(
        self, dev: Device, p: Point, pv: Any, flags: Any, reliability: Any, ts: int
    ) -> BatchReading | None:
        if pv is None or isinstance(pv, PropertyError):
            self._point_error(
                dev, p, f"read error: {pv}" if pv is not None else "read error: no presentValue"
            )
            return None
        try:
            value = numeric(pv)
        except InvalidRecord as e:
            self._point_error(dev, p, e.reason, repr(pv))
            return None
        if p.failing is not None:
            log.info("source %s: %s/%s readable again", self.cfg.id, dev.name, p.name)
            p.failing = None
        f = flags_of(_ok(flags))
        rel = _ok(reliability)
        rel_s = str(rel) if rel is not None else None
        r: BatchReading = {"point": p.name, "ts": ts, "value": value, "quality": quality_of(f, rel_s)}
        if p.unit:
            r["unit"] = p.unit
        st = status_of(f, rel_s)
        if st is not None:
            r["status"] = st
        return r

    def _point_error(self, dev: Device, p: Point, reason: str, value: str | None = None) -> None:
        """Dead-letter a point that stops being readable, once per episode rather than every poll."""
        if p.failing == reason:
            return
        p.failing = reason
        self.stats.point_errors += 1
        log.warning("source %s: %s/%s (%s): %s", self.cfg.id, dev.name, p.name, p.ref, reason)
        payload = {
            "device": dev.name,
            "instance": dev.instance,
            "address": dev.address,
            "object": p.ref,
            "point": p.name,
            "value": value,
        }
        self._dead_letter(f"{reason} ({dev.name}/{p.name}, {p.ref})", payload)

    # -- COV -----------------------------------------------------------------------------------------
    async def _cov_loop(self, dev: Device, p: Point) -> None:
        backoff = delays(1.0, 60.0)
        lifetime = max(10, self.cfg.cov.lifetime // 1000)
        while True:
            try:
                assert dev.address is not None
                async with self.client.subscribe(
                    dev.address, p.ref, confirmed=self.cfg.cov.confirmed, lifetime_s=lifetime
                ) as sub:
                    p.cov_active = True
                    self.stats.cov_subscriptions += 1
                    backoff = delays(1.0, 60.0)
                    log.info(
                        "source %s: %s/%s by COV (lifetime %ds, renewed before it ends)",
                        self.cfg.id,
                        dev.name,
                        p.name,
                        lifetime,
                    )
                    while True:
                        values = await sub.next(1.0)
                        if values is None:
                            continue
                        self.stats.cov_notifications += 1
                        if "status-flags" in values:
                            p.last_flags = values["status-flags"]
                        if "present-value" not in values:
                            continue
                        r = self._reading(dev, p, values["present-value"], p.last_flags, None, now_ms())
                        if r is not None:
                            self._queue(dev, r)
            except asyncio.CancelledError:
                raise
            except (BacnetError, OSError, ValueError) as e:
                self.stats.cov_failures += 1
                delay = next(backoff)
                log.warning(
                    "source %s: COV of %s/%s %s (%s); polling it, subscribing again in %.0fs",
                    self.cfg.id,
                    dev.name,
                    p.name,
                    "lost" if p.cov_active else "refused",
                    e,
                    delay,
                )
                p.cov_active = False
                await asyncio.sleep(delay)

    # -- writes (called by the command executor) -----------------------------------------------------
    async def write(self, series: str, value: float | None, priority: int) -> None:
        """WriteProperty presentValue at ``priority``; None relinquishes. Raises BacnetError on refusal."""
        dc, pc = self._points[series]
        dev = self.devices.get(dc.instance)
        if dev is None or dev.address is None:
            raise BacnetError("timeout", f"device {dc.instance} has not been found on the network")
        if dev.doubt is not None:
            raise WriteRefused(
                f"not sent: {dev.doubt}; pinning the device's 'address' in the topology rules this out"
            )
        await self.client.write(dev.address, pc.object, value, priority)
        self.stats.writes += 1
        dev.wake.set()  # poll now, so the new value is on its way at once

    # -- output --------------------------------------------------------------------------------------
    def _queue(self, dev: Device, r: BatchReading) -> None:
        self._batcher.add(dev.site, dev.name or f"device-{dev.instance}", r)

    def _flush(self) -> None:
        self._batcher.flush()

    def _delivered(self, err: KafkaError | None) -> None:
        self._batcher.delivered(err)

    def _dead_letter(self, reason: str, payload: dict[str, Any]) -> None:
        self.stats.dead_letters += 1
        self.producer.send_dead_letter(self.cfg.id, reason, codec.dumps(payload), None, self._delivered)


def _same_address(a: str, b: str | None) -> bool:
    """Whether two BACnet/IP addresses are the same, with or without the default port."""

    def norm(x: str) -> str:
        return x[: -len(":47808")] if x.endswith(":47808") else x

    return b is not None and norm(a) == norm(b)


def _ok(v: Any) -> Any:
    return None if isinstance(v, PropertyError) else v


def _default_client(cfg: BacnetSource) -> BacnetClient:
    return BacnetClient(
        cfg.local_address,
        cfg.device_instance,
        apdu_timeout_ms=cfg.apdu_timeout,
        apdu_retries=cfg.apdu_retries,
        request_timeout=cfg.defaults.timeout / 1000,
    )
