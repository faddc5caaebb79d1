"""A simulated BACnet/IP air-handling unit (bacpypes3): the points a building controller exposes.

Objects (names are the objectName the device reports):

- analog inputs: SAT, RAT, MAT, OAT (°C), DSP (Pa), SF-SPD, RF-SPD, CHW-VLV, HW-VLV (%), OA-FLOW (l/s),
  SA-RH (%), FILT-DP (Pa, in alarm), OA-RH (%, fault / open-loop: bad), CO2-RA (ppm, overridden:
  uncertain) and ZN-T-001 ... zone temperatures;
- analog values: DSP-SP, ECON-MIN, SAT-SP-CALC, ...; commandable SAT-SP and ZN-SP with a real priority
  array and relinquish default;
- binary values SF-CMD, OCC, ...; binary inputs SF-STS, FILT-ALM; a multi-state value AHU-MODE.

Every tick the unit moves: supply air follows its set-point, zones drift towards theirs, pressure and
flows wander. Changes beyond an object's covIncrement are notified to COV subscribers by bacpypes3.
Analog inputs refuse writes to presentValue unless out of service, as the standard has it.

Run it: ``python -m connectors.sim.bacnet_ahu --address 127.0.0.2/8:47808 --instance 1001``. On loopback
give the device a /8 mask: its broadcast socket then binds 127.255.255.255, which every device on the
port receives (a /24 broadcast address on lo is an ordinary local address and reaches one socket only).
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
import sys
from typing import Any

from bacpypes3.app import Application
from bacpypes3.basetypes import EngineeringUnits, Reliability, StatusFlags
from bacpypes3.errors import ExecutionError
from bacpypes3.local.analog import AnalogInputObject, AnalogValueObject, AnalogValueObjectCmd
from bacpypes3.local.binary import BinaryInputObject, BinaryValueObject
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.multistate import MultiStateValueObject
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.local.object import Object as _LocalObject
from bacpypes3.pdu import Address

log = logging.getLogger("plantstream.sim.bacnet")

VENDOR_ID = 999  # the "sample application" vendor id bacpypes3 knows


class SensorInput(AnalogInputObject):
    """An analog input whose presentValue is written only by the device (or when out of service).

    bacpypes3 derives statusFlags from eventState, reliability and outOfService and never reports
    "overridden"; ``_overridden`` stands for a hand-operated override at the device (a HOA switch).
    """

    _overridden = False

    @property
    def statusFlags(self) -> StatusFlags:
        flags = list(_LocalObject.statusFlags.fget(self))
        flags[2] = int(self._overridden)
        return StatusFlags(flags)

    @statusFlags.setter
    def statusFlags(self, value: Any) -> None:
        pass  # computed, as in bacpypes3's local objects

    async def write_property(self, attr: Any, value: Any, index: Any = None, priority: Any = None) -> None:
        if attr in ("presentValue", "present-value", 85) and not self.outOfService:
            raise ExecutionError(errorClass="property", errorCode="writeAccessDenied")
        await super().write_property(attr, value, index, priority)


class _NotifyingWrites:
    """A remote WriteProperty of presentValue goes through the object's own setattr.

    bacpypes3 stores such a write below the local object's __setattr__ on objects without a priority
    array, so COV subscribers would not hear of it; a real device notifies them.
    """

    async def write_property(self, attr: Any, value: Any, index: Any = None, priority: Any = None) -> None:
        name = self._property_identifier_class(attr).attr if isinstance(attr, int) else attr  # type: ignore[attr-defined]
        if name in ("presentValue", "present-value") and index is None:
            self.presentValue = value
            # One line per write received, so tests can count what reached the device.
            log.info("write %s presentValue=%s", self.objectName, value)  # type: ignore[attr-defined]
            return
        await super().write_property(attr, value, index, priority)  # type: ignore[misc]


class SettableValue(_NotifyingWrites, AnalogValueObject):
    pass


class SettableBinary(_NotifyingWrites, BinaryValueObject):
    pass


def _flags(
    in_alarm: bool = False, fault: bool = False, overridden: bool = False, oos: bool = False
) -> StatusFlags:
    return StatusFlags([int(in_alarm), int(fault), int(overridden), int(oos)])


class AirHandlingUnit:
    def __init__(
        self,
        address: str,
        instance: int,
        *,
        name: str = "AHU-1",
        zones: int = 80,
        rate: float = 1.0,
        max_apdu: int = 1476,
        segmentation: str = "segmentedBoth",
        rpm: bool = True,
        seed: int = 1,
    ) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.ticks = 0
        device = DeviceObject(
            objectIdentifier=("device", instance),
            objectName=name,
            vendorIdentifier=VENDOR_ID,
            maxApduLengthAccepted=max_apdu,
            segmentationSupported=segmentation,
            modelName="plantstream simulated AHU",
        )
        port = NetworkPortObject(
            address,
            objectIdentifier=("network-port", 1),
            objectName="NetworkPort-1",
            networkNumber=0,
            networkNumberQuality="unknown",
        )
        self.objects: dict[str, Any] = {}
        objs: list[Any] = [device, port]

        def ai(
            n: int,
            obj_name: str,
            value: float,
            units: str,
            cov: float = 0.1,
            in_alarm: bool = False,
            fault: bool = False,
            overridden: bool = False,
        ) -> None:
            o = SensorInput(
                objectIdentifier=("analog-input", n),
                objectName=obj_name,
                presentValue=value,
                statusFlags=_flags(),
                eventState="high-limit" if in_alarm else "normal",
                outOfService=False,
                covIncrement=cov,
                units=EngineeringUnits(units),
                reliability=Reliability("open-loop" if fault else "no-fault-detected"),
            )
            o._overridden = overridden
            self.objects[obj_name] = o
            objs.append(o)

        def av(n: int, obj_name: str, value: float, units: str, commandable: bool = False) -> None:
            cls = AnalogValueObjectCmd if commandable else SettableValue
            kw: dict[str, Any] = {"relinquishDefault": value} if commandable else {}
            o = cls(
                objectIdentifier=("analog-value", n),
                objectName=obj_name,
                presentValue=value,
                statusFlags=_flags(),
                eventState="normal",
                outOfService=False,
                covIncrement=0.1,
                units=EngineeringUnits(units),
                **kw,
            )
            self.objects[obj_name] = o
            objs.append(o)

        def bv(n: int, obj_name: str, value: str, binary_input: bool = False) -> None:
            cls = BinaryInputObject if binary_input else SettableBinary
            kw: dict[str, Any] = {"polarity": "normal"} if binary_input else {}
            o = cls(
                objectIdentifier=("binary-input" if binary_input else "binary-value", n),
                objectName=obj_name,
                presentValue=value,
                statusFlags=_flags(),
                eventState="normal",
                outOfService=False,
                **kw,
            )
            self.objects[obj_name] = o
            objs.append(o)

        ai(1, "SAT", 13.2, "degreesCelsius")
        ai(2, "RAT", 22.5, "degreesCelsius")
        ai(3, "MAT", 18.0, "degreesCelsius")
        ai(4, "OAT", 8.0, "degreesCelsius")
        ai(5, "DSP", 250.0, "pascals", cov=5.0)
        ai(6, "SF-SPD", 65.0, "percent", cov=1.0)
        ai(7, "RF-SPD", 60.0, "percent", cov=1.0)
        ai(8, "CHW-VLV", 30.0, "percent", cov=1.0)
        ai(9, "HW-VLV", 0.0, "percent", cov=1.0)
        ai(10, "OA-FLOW", 1200.0, "litersPerSecond", cov=10.0)
        ai(11, "SA-RH", 55.0, "percentRelativeHumidity", cov=1.0)
        ai(12, "FILT-DP", 180.0, "pascals", cov=5.0, in_alarm=True)
        ai(13, "OA-RH", 0.0, "percentRelativeHumidity", cov=1.0, fault=True)
        ai(14, "CO2-RA", 650.0, "partsPerMillion", cov=10.0, overridden=True)
        for z in range(zones):
            ai(100 + z, f"ZN-T-{z + 1:03d}", 21.0 + self.rng.uniform(-1.5, 1.5), "degreesCelsius")
        av(1, "SAT-SP", 13.0, "degreesCelsius", commandable=True)
        av(2, "ZN-SP", 21.0, "degreesCelsius", commandable=True)
        av(3, "DSP-SP", 250.0, "pascals")
        av(4, "ECON-MIN", 20.0, "percent")
        av(5, "SAT-SP-CALC", 13.0, "degreesCelsius")
        av(6, "OA-FLOW-SP", 1200.0, "litersPerSecond")
        av(7, "TUNE", 0.0, "noUnits")  # freely writable, for tests and operators
        bv(1, "SF-CMD", "active")
        bv(2, "OCC", "active")
        bv(3, "ECON-ENA", "inactive")
        bv(4, "NIGHT-PURGE", "inactive")
        bv(1, "SF-STS", "active", binary_input=True)
        bv(2, "FILT-ALM", "inactive", binary_input=True)
        mode = MultiStateValueObject(
            objectIdentifier=("multi-state-value", 1),
            objectName="AHU-MODE",
            presentValue=2,
            numberOfStates=4,
            statusFlags=_flags(),
            eventState="normal",
            outOfService=False,
            stateText=["off", "occupied", "unoccupied", "purge"],
        )
        self.objects["AHU-MODE"] = mode
        objs.append(mode)
        self.app = Application.from_object_list(objs)
        if not rpm:
            # A device without ReadPropertyMultiple: bacpypes3 answers the request with a Reject.
            self.app.do_ReadPropertyMultipleRequest = None
        self.address = Address(address)
        self.points = len(objs) - 2

    def tick(self) -> None:
        """One step of the unit's physics; writes go through setattr so COV detection sees them."""
        o, r = self.objects, self.rng
        t = self.ticks / max(self.rate, 1e-6)
        sp = float(o["SAT-SP"].presentValue)
        oat = 8.0 + 3.0 * math.sin(t / 600.0) + r.gauss(0, 0.05)
        sat = float(o["SAT"].presentValue)
        o["OAT"].presentValue = oat
        o["SAT"].presentValue = sat + (sp - sat) * 0.2 + r.gauss(0, 0.05)
        o["MAT"].presentValue = 0.3 * oat + 0.7 * float(o["RAT"].presentValue) + r.gauss(0, 0.05)
        o["DSP"].presentValue = float(o["DSP-SP"].presentValue) + r.gauss(0, 4.0)
        o["CHW-VLV"].presentValue = max(0.0, min(100.0, 30.0 + (sat - sp) * 20.0 + r.gauss(0, 0.5)))
        o["OA-FLOW"].presentValue = float(o["OA-FLOW-SP"].presentValue) + r.gauss(0, 8.0)
        zsp = float(o["ZN-SP"].presentValue)
        for name, obj in o.items():
            if name.startswith("ZN-T-"):
                z = float(obj.presentValue)
                obj.presentValue = z + (zsp - z) * 0.01 + r.gauss(0, 0.03)
        self.ticks += 1

    async def serve(self, stop: asyncio.Event, ready: bool = False) -> None:
        await _bound(self.address)
        log.info(
            "BACnet AHU %s at %s: %d points",
            self.app.device_object.objectName if self.app.device_object else "?",
            self.address,
            self.points,
        )
        if ready:
            print(f"READY {self.address} {self.points}", flush=True)
        try:
            while not stop.is_set():
                self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0 / self.rate)
        finally:
            self.app.close()


async def _bound(address: Address, timeout: float = 10.0) -> None:
    """Wait until bacpypes3 has bound the device's UDP socket (its endpoints are created by tasks)."""
    host, port = address.addrTuple
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))  # without SO_REUSEPORT: fails once the device holds the port
            except OSError:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the device did not bind {host}:{port}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.0.2/8:47808", help="the device's address/mask:port")
    ap.add_argument("--instance", type=int, default=1001)
    ap.add_argument("--name", default="AHU-1")
    ap.add_argument("--zones", type=int, default=80, help="zone temperature inputs")
    ap.add_argument("--rate", type=float, default=1.0, help="physics steps per second")
    ap.add_argument("--max-apdu", type=int, default=1476, choices=(50, 128, 206, 480, 1024, 1476))
    ap.add_argument(
        "--segmentation",
        default="segmentedBoth",
        choices=("segmentedBoth", "segmentedTransmit", "segmentedReceive", "noSegmentation"),
    )
    ap.add_argument("--no-rpm", action="store_true", help="reject ReadPropertyMultiple, as old devices do")
    ap.add_argument("--ready-line", action="store_true", help="print READY once the socket is bound")
    ap.add_argument("--loglevel", default="info")
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=a.loglevel.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ahu = AirHandlingUnit(
            a.address,
            a.instance,
            name=a.name,
            zones=a.zones,
            rate=a.rate,
            max_apdu=a.max_apdu,
            segmentation=a.segmentation,
            rpm=not a.no_rpm,
        )
        await ahu.serve(stop, ready=a.ready_line)

    asyncio.run(run())


if __name__ == "__main__":
    main()
