"""The connector's BACnet/IP application (bacpypes3) behind a small interface.

bacpypes3 reports a device's Error, Reject and Abort answers as exceptions deriving from BaseException;
here they become :class:`BacnetError` (an ordinary Exception) with the device's words in it, and every
request gets an overall timeout so a dead device costs its own task a bounded wait and nobody else anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bacpypes3.apdu import (
    AbortPDU,
    ErrorPDU,
    ErrorRejectAbortNack,
    RejectPDU,
    WhoIsRequest,
)
from bacpypes3.app import Application
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.pdu import Address, GlobalBroadcast
from bacpypes3.primitivedata import Null, ObjectIdentifier, ObjectType, Real, Unsigned
from bacpypes3.service.device import WhoIsFuture
from bacpypes3.vendor import get_vendor_info

Kind = Literal["error", "reject", "abort", "timeout"]


class BacnetError(Exception):
    """A device answered with an Error, Reject or Abort, or did not answer in time."""

    def __init__(self, kind: Kind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def rpm_unsupported(self) -> bool:
        """The device does not do ReadPropertyMultiple (or not this way)."""
        return (self.kind == "reject" and self.detail in ("unrecognized-service", "other")) or (
            self.kind == "error"
            and self.detail.endswith(("service-request-denied", "optional-functionality-not-supported"))
        )

    @property
    def too_big(self) -> bool:
        """The answer would not fit: ask for less at a time."""
        return self.kind == "abort" and self.detail in (
            "segmentation-not-supported",
            "buffer-overflow",
            "apdu-too-long",
        )


def as_error(exc: ErrorRejectAbortNack) -> BacnetError:
    if isinstance(exc, ErrorPDU):
        return BacnetError("error", f"{exc.errorClass}: {exc.errorCode}")
    if isinstance(exc, RejectPDU):
        return BacnetError("reject", str(exc.apduAbortRejectReason))
    if isinstance(exc, AbortPDU):
        return BacnetError("abort", str(exc.apduAbortRejectReason))
    return BacnetError("error", str(exc))


@dataclass(frozen=True)
class IAm:
    instance: int
    address: str
    max_apdu: int
    segmentation: str
    vendor: int


@dataclass(frozen=True)
class PropertyError:
    """One property an RPM could not read (the rest of the answer is fine)."""

    error_class: str
    error_code: str

    def __str__(self) -> str:
        return f"{self.error_class}: {self.error_code}"


def object_id(ref: str) -> ObjectIdentifier:
    return ObjectIdentifier(ref)


def value_for(ref: str, value: float | None) -> Any:
    """The BACnet datatype a presentValue write needs; None relinquishes (a Null at that priority)."""
    if value is None:
        return Null(())
    kind = ref.split(",", 1)[0]
    if kind.startswith("binary-"):
        return "active" if value else "inactive"
    if kind.startswith("multi-state-"):
        return Unsigned(int(value))
    return Real(value)


class CovSubscription:
    """An active SubscribeCOV; ``next()`` gives the properties of each notification."""

    def __init__(self, scm: Any, obj: ObjectIdentifier) -> None:
        self._scm = scm
        self._class = get_vendor_info(0).get_object_class(ObjectType(obj[0]))

    def _decode(self, pv: Any) -> tuple[str, Any]:
        prop = pv.propertyIdentifier
        ptype = self._class.get_property_type(prop) if self._class else None
        return str(prop), (pv.value.cast_out(ptype) if ptype else None)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next notification's values, or None after ``timeout`` seconds without one."""
        task = self._scm.refresh_subscription_task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:  # the renewal before the lifetime ended failed: the device is gone
                raise (
                    as_error(exc)
                    if isinstance(exc, ErrorRejectAbortNack)
                    else BacnetError("abort", repr(exc))
                )
        try:
            first = await asyncio.wait_for(self._scm.get(), timeout)
        except TimeoutError:
            return None
        items = [first]
        while not self._scm.queue.empty():  # the rest of the same notification
            items.append(self._scm.queue.get_nowait())
        return dict(self._decode(pv) for pv in items)


class _EveryIAm(WhoIsFuture):
    """A Who-Is future that keeps every matching I-Am, one per (instance, address)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.every: dict[tuple[int, str], Any] = {}

    def match(self, apdu: Any) -> None:
        instance = apdu.iAmDeviceIdentifier[1]
        if (self.low_limit is None or instance >= self.low_limit) and (
            self.high_limit is None or instance <= self.high_limit
        ):
            self.every[(int(instance), str(apdu.pduSource))] = apdu
        super().match(apdu)


class BacnetClient:
    def __init__(
        self,
        local_address: str,
        device_instance: int,
        *,
        apdu_timeout_ms: int = 2000,
        apdu_retries: int = 1,
        request_timeout: float = 5.0,
    ) -> None:
        device = DeviceObject(
            objectIdentifier=("device", device_instance),
            objectName=f"plantstream-{device_instance}",
            vendorIdentifier=999,
            apduTimeout=apdu_timeout_ms,
            numberOfApduRetries=apdu_retries,
            maxApduLengthAccepted=1476,
            segmentationSupported="segmented-both",
        )
        port = NetworkPortObject(
            local_address,
            objectIdentifier=("network-port", 1),
            objectName="NetworkPort-1",
            networkNumber=0,
            networkNumberQuality="unknown",
        )
        self.app = Application.from_object_list([device, port])
        self.request_timeout = request_timeout
        self._next_process_id = 1

    def close(self) -> None:
        self.app.close()

    async def _call(self, coro: Any, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout or self.request_timeout)
        except ErrorRejectAbortNack as e:
            raise as_error(e) from None
        except TimeoutError:
            raise BacnetError("timeout", f"no answer in {timeout or self.request_timeout:.1f}s") from None

    async def who_is(self, low: int, high: int, target: str | None, timeout: float) -> list[IAm]:
        """Who-Is over the instance range; ``target`` is where it goes (default: the local broadcast)."""
        app = self.app
        # bacpypes3's own future keeps one I-Am per instance (the last): two addresses claiming one
        # instance must both be seen, so every answer is collected, from anyone, also for a directed target.
        if not hasattr(app, "_who_is_futures"):
            app._who_is_futures = []
        fut = _EveryIAm(app, None, low, high, timeout)
        app._who_is_futures.append(fut)
        app.request(
            WhoIsRequest(
                destination=Address(target) if target is not None else GlobalBroadcast(),
                deviceInstanceRangeLowLimit=low,
                deviceInstanceRangeHighLimit=high,
            )
        )
        await fut.future
        found = list(fut.every.values())
        return [
            IAm(
                int(i.iAmDeviceIdentifier[1]),
                str(i.pduSource),
                int(i.maxAPDULengthAccepted),
                str(i.segmentationSupported),
                int(i.vendorID),
            )
            for i in found
        ]

    async def read(self, address: str, ref: str, prop: str, index: int | None = None) -> Any:
        return await self._call(self.app.read_property(Address(address), object_id(ref), prop, index))

    async def read_multiple(
        self, address: str, refs: Sequence[str], props: Sequence[str]
    ) -> dict[tuple[str, str], Any]:
        """One ReadPropertyMultiple; per-property failures come back as :class:`PropertyError`."""
        params: list[Any] = []
        for ref in refs:
            params.extend((object_id(ref), list(props)))
        result = await self._call(self.app.read_property_multiple(Address(address), params))
        out: dict[tuple[str, str], Any] = {}
        for obj, prop, _index, value in result or []:
            key = (f"{obj[0]},{obj[1]}", str(prop))
            if value is not None and hasattr(value, "errorClass") and hasattr(value, "errorCode"):
                out[key] = PropertyError(str(value.errorClass), str(value.errorCode))
            else:
                out[key] = value
        return out

    async def write(self, address: str, ref: str, value: float | None, priority: int) -> None:
        await self._call(
            self.app.write_property(
                Address(address), object_id(ref), "present-value", value_for(ref, value), priority=priority
            )
        )

    def subscribe(self, address: str, ref: str, *, confirmed: bool, lifetime_s: int) -> Any:
        """An async context manager yielding a :class:`CovSubscription`."""
        client = self

        class _Ctx:
            async def __aenter__(self) -> CovSubscription:
                obj = object_id(ref)
                self.scm = client.app.change_of_value(Address(address), obj, None, confirmed, lifetime_s)
                await client._call(self.scm.__aenter__())
                return CovSubscription(self.scm, obj)

            async def __aexit__(self, *exc: Any) -> None:
                if exc[0] is None:
                    # Cancelling the subscription of a device that stopped answering may fail; that is fine.
                    with contextlib.suppress(BacnetError):
                        await client._call(self.scm.__aexit__(None, None, None), 2.0)
                else:
                    await self.scm.__aexit__(*exc)

        return _Ctx()
