"""A simulated process plant served over OPC UA (asyncua): tanks, flows and PID control loops.

Address space (namespace ``urn:plantstream:sim:plant``, string NodeIds equal to the browse path)::

    Objects/Plant/Tanks/TK101/{Level, Temperature, InletFlow, OutletFlow}
    Objects/Plant/Loops/FIC101/{PV, SP, OP, MODE}      (MODE: 0 manual, 1 auto, 2 cascade)
    Objects/Plant/Test/...                             (fixed values and writable nodes for tests)

Analog variables carry the standard ``EURange`` and ``EngineeringUnits`` properties. Every tick
(``rate`` per second) each loop runs one step of a first-order process under PI control, each tank
integrates its flows, and the new values are written with the tick time as source timestamp.

Run it on its own: ``python -m connectors.sim.opcua_plant --endpoint opc.tcp://127.0.0.1:4840/plant``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import signal
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.node import Node
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger("plantstream.sim.opcua")

NAMESPACE = "urn:plantstream:sim:plant"
APPLICATION_URI = "urn:plantstream:sim:plant:server"
# Fixed-value test nodes: value i * 1.25, source timestamp CONST_T0 + i seconds.
CONST_T0 = datetime(2026, 1, 1, tzinfo=UTC)
CONSTANTS = 10
GUID_ID = uuid.UUID("6f1c1d2e-3b4a-4c5d-8e9f-a0b1c2d3e4f5")
OPAQUE_ID = b"plant-opaque-1"
NUMERIC_ID = 5001


@dataclass
class PlantOptions:
    endpoint: str = "opc.tcp://127.0.0.1:4840/plantstream/"
    loops: int = 50
    tanks: int = 15
    rate: float = 1.0
    seed: int = 1
    security: bool = False  # offer Basic256Sha256 Sign and SignAndEncrypt endpoints
    allow_none: bool = True  # also offer the unsecured endpoint
    users: dict[str, str] = field(default_factory=dict)  # username -> password; set: anonymous refused
    pki_dir: Path = Path(".local/sim/opcua-pki")


class _Users:
    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass
class _Loop:
    name: str
    pv: float
    sp: float
    op: float
    mode: int
    gain: float
    tau: float
    span: float
    integral: float = 0.0
    nodes: dict[str, Node] = field(default_factory=dict)


@dataclass
class _Tank:
    name: str
    level: float
    temperature: float
    inflow: float
    outflow: float
    area: float
    nodes: dict[str, Node] = field(default_factory=dict)


# asyncua annotates its constructors with its own NewTypes (Int32, UInt32, DateTime, ...); these take plain
# Python values, which is what asyncua accepts at run time.
def _nid(identifier: Any, namespace: Any, kind: Any = None) -> ua.NodeId:
    return ua.NodeId(identifier, namespace) if kind is None else ua.NodeId(identifier, namespace, kind)


def _sc(code: Any) -> ua.StatusCode:
    return ua.StatusCode(code)


def _dv(value: ua.Variant, status: ua.StatusCode, source: Any, server: Any) -> ua.DataValue:
    # Positional: the status field is StatusCode in asyncua 2, StatusCode_ in 1.x.
    return ua.DataValue(value, status, source, server)


class PlantServer:
    def __init__(self, options: PlantOptions) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        users: Any = _Users(options.users) if options.users else None
        self.server = Server(user_manager=users)
        self.ns = 0
        self.loops: list[_Loop] = []
        self.tanks: list[_Tank] = []
        self.variables = 0
        self.ticks = 0
        self.certificate: Path | None = None
        self.flaky: Node | None = None

    # -- building ------------------------------------------------------------------------------------
    def node_id(self, path: str) -> ua.NodeId:
        return _nid(path, self.ns)

    async def _var(
        self,
        parent: Node,
        path: str,
        name: str,
        value: Any,
        vtype: ua.VariantType,
        unit: str | None = None,
        eurange: tuple[float, float] | None = None,
        writable: bool = False,
        nodeid: ua.NodeId | None = None,
    ) -> Node:
        var = await parent.add_variable(
            nodeid or self.node_id(f"{path}/{name}"),
            ua.QualifiedName(name, self.ns),
            ua.Variant(value, vtype),
        )
        if eurange is not None:
            await var.add_property(
                self.node_id(f"{path}/{name}/EURange"),
                ua.QualifiedName("EURange", 0),
                ua.Range(Low=eurange[0], High=eurange[1]),
            )
        if unit is not None:
            await var.add_property(
                self.node_id(f"{path}/{name}/EngineeringUnits"),
                ua.QualifiedName("EngineeringUnits", 0),
                ua.EUInformation(
                    NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
                    DisplayName=ua.LocalizedText(unit),
                    Description=ua.LocalizedText(unit),
                ),
            )
        if writable:
            await var.set_writable()
        self.variables += 1
        return var

    async def _build(self) -> None:
        objects = self.server.nodes.objects
        plant = await objects.add_folder(self.node_id("Plant"), ua.QualifiedName("Plant", self.ns))
        tanks = await plant.add_folder(self.node_id("Plant/Tanks"), ua.QualifiedName("Tanks", self.ns))
        loops = await plant.add_folder(self.node_id("Plant/Loops"), ua.QualifiedName("Loops", self.ns))
        for i in range(self.o.tanks):
            name = f"TK{101 + i}"
            path = f"Plant/Tanks/{name}"
            obj = await tanks.add_object(self.node_id(path), ua.QualifiedName(name, self.ns))
            t = _Tank(
                name,
                level=40 + self.rng.uniform(-10, 10),
                temperature=20 + self.rng.uniform(0, 40),
                inflow=20 + self.rng.uniform(-5, 5),
                outflow=20.0,
                area=2.0 + self.rng.random(),
            )
            t.nodes["Level"] = await self._var(
                obj, path, "Level", t.level, ua.VariantType.Double, "%", (0, 100)
            )
            t.nodes["Temperature"] = await self._var(
                obj, path, "Temperature", t.temperature, ua.VariantType.Double, "°C", (0, 150)
            )
            t.nodes["InletFlow"] = await self._var(
                obj, path, "InletFlow", t.inflow, ua.VariantType.Double, "m³/h", (0, 50)
            )
            t.nodes["OutletFlow"] = await self._var(
                obj, path, "OutletFlow", t.outflow, ua.VariantType.Double, "m³/h", (0, 50)
            )
            self.tanks.append(t)
        kinds = (("FIC", "m³/h", 100.0), ("TIC", "°C", 200.0), ("PIC", "bar", 16.0), ("LIC", "%", 100.0))
        for i in range(self.o.loops):
            prefix, unit, span = kinds[i % len(kinds)]
            name = f"{prefix}{101 + i}"
            path = f"Plant/Loops/{name}"
            obj = await loops.add_object(self.node_id(path), ua.QualifiedName(name, self.ns))
            sp = span * self.rng.uniform(0.3, 0.7)
            lp = _Loop(
                name,
                pv=sp * self.rng.uniform(0.9, 1.1),
                sp=sp,
                op=50.0,
                mode=0 if i % 17 == 16 else (2 if i % 11 == 10 else 1),
                gain=span / 100.0 * self.rng.uniform(0.8, 1.2),
                tau=self.rng.uniform(5, 20),
                span=span,
            )
            lp.nodes["PV"] = await self._var(obj, path, "PV", lp.pv, ua.VariantType.Double, unit, (0, span))
            lp.nodes["SP"] = await self._var(
                obj, path, "SP", lp.sp, ua.VariantType.Double, unit, (0, span), writable=True
            )
            lp.nodes["OP"] = await self._var(
                obj, path, "OP", lp.op, ua.VariantType.Double, "%", (0, 100), writable=True
            )
            lp.nodes["MODE"] = await self._var(
                obj, path, "MODE", lp.mode, ua.VariantType.Int32, writable=True
            )
            self.loops.append(lp)
        await self._build_test(plant)

    async def _build_test(self, plant: Node) -> None:
        path = "Plant/Test"
        test = await plant.add_folder(self.node_id(path), ua.QualifiedName("Test", self.ns))
        for i in range(1, CONSTANTS + 1):
            var = await self._var(test, path, f"Const{i:02d}", i * 1.25, ua.VariantType.Double, "kW")
            await self._write(var, i * 1.25, ua.VariantType.Double, CONST_T0 + timedelta(seconds=i))
        unc = await self._var(test, path, "Uncertain", 5.0, ua.VariantType.Double)
        await self._write(
            unc, 5.0, ua.VariantType.Double, CONST_T0, _sc(ua.StatusCodes.UncertainLastUsableValue)
        )
        bad = await self._var(test, path, "Bad", 0.0, ua.VariantType.Double)
        await self._write(bad, 0.0, ua.VariantType.Double, CONST_T0, _sc(ua.StatusCodes.BadSensorFailure))
        # Flaky: good for three ticks, then Bad (no value, as the specification wants) for two.
        self.flaky = await self._var(test, path, "Flaky", 0.0, ua.VariantType.Double)
        await self._var(test, path, "Flag", True, ua.VariantType.Boolean, writable=True)
        await self._var(test, path, "Text", "not a number", ua.VariantType.String)
        await self._var(test, path, "Tunable", 50.0, ua.VariantType.Double, "bar", (0, 200), writable=True)
        await self._var(test, path, "NoRange", 1.0, ua.VariantType.Double, writable=True)
        await self._var(test, path, "Numeric", 11.0, ua.VariantType.Double, nodeid=_nid(NUMERIC_ID, self.ns))
        await self._var(
            test, path, "Guid", 12.0, ua.VariantType.Double, nodeid=_nid(GUID_ID, self.ns, ua.NodeIdType.Guid)
        )
        await self._var(
            test,
            path,
            "Opaque",
            13.0,
            ua.VariantType.Double,
            nodeid=_nid(OPAQUE_ID, self.ns, ua.NodeIdType.ByteString),
        )

    async def _write(
        self,
        node: Node,
        value: Any,
        vtype: ua.VariantType,
        source_ts: datetime,
        status: ua.StatusCode | None = None,
    ) -> None:
        dv = _dv(
            ua.Variant(value, vtype),
            status or _sc(ua.StatusCodes.Good),
            source_ts.astimezone(UTC),
            datetime.now(UTC),
        )
        await self.server.write_attribute_value(node.nodeid, dv)

    async def _certificates(self) -> tuple[Path, Path]:
        self.o.pki_dir.mkdir(parents=True, exist_ok=True)
        cert, key = self.o.pki_dir / "server-cert.der", self.o.pki_dir / "server-key.pem"
        await setup_self_signed_certificate(
            key,
            cert,
            APPLICATION_URI,
            socket.gethostname(),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"commonName": "plantstream simulated plant"},
        )
        return cert, key

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.server.init()
        self.server.set_endpoint(self.o.endpoint)
        self.server.set_server_name("plantstream simulated plant")
        await self.server.set_application_uri(APPLICATION_URI)
        policies = [ua.SecurityPolicyType.NoSecurity] if self.o.allow_none or not self.o.security else []
        if self.o.security:
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
            cert, key = await self._certificates()
            await self.server.load_certificate(str(cert))
            await self.server.load_private_key(str(key))
            self.certificate = cert
        self.server.set_security_policy(policies)
        if self.o.users:
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
        self.ns = await self.server.register_namespace(NAMESPACE)
        await self._build()
        await self.server.start()
        log.info(
            "OPC UA plant at %s: %d loops, %d tanks, %d variables, %.1f updates/s",
            self.o.endpoint,
            len(self.loops),
            len(self.tanks),
            self.variables,
            self.o.rate,
        )

    async def stop(self) -> None:
        await self.server.stop()

    async def tick(self, now: datetime) -> None:
        dt = 1.0 / self.o.rate
        writes: list[tuple[Node, float | int, ua.VariantType]] = []
        for lp in self.loops:
            if self.rng.random() < dt / 60.0:  # a set-point step about once a minute
                lp.sp = min(lp.span * 0.9, max(lp.span * 0.1, lp.sp * self.rng.uniform(0.9, 1.1)))
                writes.append((lp.nodes["SP"], lp.sp, ua.VariantType.Double))
            if lp.mode != 0:
                err = (lp.sp - lp.pv) / lp.span * 100.0
                lp.integral = min(100.0, max(-100.0, lp.integral + err * dt / max(lp.tau, 1.0)))
                lp.op = min(100.0, max(0.0, 50.0 + 1.2 * err + lp.integral))
            target = lp.op * lp.gain
            lp.pv += (target - lp.pv) * min(1.0, dt / lp.tau) + self.rng.gauss(0, lp.span * 0.002)
            writes.append((lp.nodes["PV"], lp.pv, ua.VariantType.Double))
            writes.append((lp.nodes["OP"], lp.op, ua.VariantType.Double))
        for t in self.tanks:
            t.inflow = min(50.0, max(0.0, t.inflow + self.rng.gauss(0, 0.3)))
            t.outflow = min(50.0, max(0.0, t.outflow + (t.level - 50.0) * 0.02 + self.rng.gauss(0, 0.1)))
            t.level = min(100.0, max(0.0, t.level + (t.inflow - t.outflow) * dt / 3600.0 * 100 / t.area))
            t.temperature += self.rng.gauss(0, 0.05) + math.sin(self.ticks / 300.0) * 0.01
            for name, v in (
                ("Level", t.level),
                ("Temperature", t.temperature),
                ("InletFlow", t.inflow),
                ("OutletFlow", t.outflow),
            ):
                writes.append((t.nodes[name], v, ua.VariantType.Double))
        for node, value, vtype in writes:
            await self._write(node, value, vtype, now)
        if self.flaky is not None and self.ticks % 5 < 3:
            await self._write(self.flaky, float(self.ticks), ua.VariantType.Double, now)
        elif self.flaky is not None:
            await self._write(
                self.flaky, 0.0, ua.VariantType.Double, now, _sc(ua.StatusCodes.BadCommunicationError)
            )
        self.ticks += 1

    async def serve(self, stop: asyncio.Event) -> None:
        await self.start()
        period = 1.0 / self.o.rate
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        try:
            while not stop.is_set():
                await self.tick(datetime.now(UTC))
                next_t += period
                delay = next_t - loop.time()
                if delay < 0:  # fell behind: skip the missed ticks rather than burst
                    next_t = loop.time()
                    delay = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            await self.stop()


def _parse_users(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, password = item.partition(":")
        if not sep or not name:
            raise SystemExit(f"--user expects name:password, got {item!r}")
        out[name] = password
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=PlantOptions.endpoint)
    ap.add_argument("--loops", type=int, default=PlantOptions.loops)
    ap.add_argument("--tanks", type=int, default=PlantOptions.tanks)
    ap.add_argument("--rate", type=float, default=PlantOptions.rate, help="updates per second")
    ap.add_argument("--seed", type=int, default=PlantOptions.seed)
    ap.add_argument("--security", action="store_true", help="offer Basic256Sha256 Sign and SignAndEncrypt")
    ap.add_argument("--no-none", action="store_true", help="with --security: no unsecured endpoint")
    ap.add_argument(
        "--user",
        action="append",
        default=[],
        help="name:password (repeatable); anonymous access is then refused",
    )
    ap.add_argument(
        "--pki", type=Path, default=PlantOptions.pki_dir, help="where the server certificate lives"
    )
    ap.add_argument("--loglevel", default="info")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("asyncua", "asyncua.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    opts = PlantOptions(
        endpoint=a.endpoint,
        loops=a.loops,
        tanks=a.tanks,
        rate=a.rate,
        seed=a.seed,
        security=a.security,
        allow_none=not a.no_none,
        users=_parse_users(a.user),
        pki_dir=a.pki,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await PlantServer(opts).serve(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
