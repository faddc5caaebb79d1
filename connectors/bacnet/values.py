"""From BACnet property values to readings: quality, status, units, request sizing. Pure, no network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.core.records import InvalidRecord, Quality, check_value

FLAG_NAMES = ("in-alarm", "fault", "overridden", "out-of-service")
NO_FAULT = "no-fault-detected"

# Symbols for the common units; any other unit keeps its BACnet name (e.g. "kilovolt-amperes").
UNIT_SYMBOLS = {
    "degrees-celsius": "°C",
    "degrees-fahrenheit": "°F",
    "degrees-kelvin": "K",
    "pascals": "Pa",
    "kilopascals": "kPa",
    "bars": "bar",
    "percent": "%",
    "percent-relative-humidity": "%RH",
    "liters-per-second": "l/s",
    "cubic-meters-per-hour": "m³/h",
    "cubic-meters-per-second": "m³/s",
    "parts-per-million": "ppm",
    "watts": "W",
    "kilowatts": "kW",
    "kilowatt-hours": "kWh",
    "volts": "V",
    "amperes": "A",
    "hertz": "Hz",
    "revolutions-per-minute": "rpm",
    "seconds": "s",
    "minutes": "min",
    "hours": "h",
    "liters-per-minute": "l/min",
    "meters-per-second": "m/s",
    "lux": "lx",
}


def unit_symbol(units: Any) -> str | None:
    if units is None:
        return None
    name = str(units)
    if name in ("no-units", ""):
        return None
    return UNIT_SYMBOLS.get(name, name)


def flags_of(status_flags: Any) -> tuple[int, int, int, int]:
    """statusFlags as (in-alarm, fault, overridden, out-of-service); missing means all clear."""
    if status_flags is None:
        return (0, 0, 0, 0)
    bits = [int(b) for b in list(status_flags)[:4]]
    bits += [0] * (4 - len(bits))
    return (bits[0], bits[1], bits[2], bits[3])


def quality_of(flags: Sequence[int], reliability: str | None) -> Quality:
    """fault or out-of-service (or a reliability problem) is bad, overridden is uncertain."""
    if flags[1] or flags[3] or (reliability is not None and reliability != NO_FAULT):
        return "bad"
    if flags[2]:
        return "uncertain"
    return "good"


def status_of(flags: Sequence[int], reliability: str | None) -> dict[str, Any] | None:
    """What to keep of the raw status; None when everything is normal (most readings)."""
    raised = [name for bit, name in zip(flags, FLAG_NAMES, strict=True) if bit]
    bad_reliability = reliability is not None and reliability != NO_FAULT
    if not raised and not bad_reliability:
        return None
    out: dict[str, Any] = {"status_flags": list(flags)}
    if raised:
        out["flags"] = raised
    if flags[0]:
        out["in_alarm"] = True
    if bad_reliability:
        out["reliability"] = reliability
    return out


def numeric(value: Any) -> float:
    """presentValue as a number: Real and Unsigned as they are, binary active/inactive as 1/0."""
    if value is None:
        raise InvalidRecord("invalid: no presentValue")
    text = str(value)
    if text in ("active", "inactive"):
        return 1.0 if text == "active" else 0.0
    if isinstance(value, bool | int | float):
        return check_value(float(value) if not isinstance(value, bool) else value)
    raise InvalidRecord(f"invalid: presentValue is {type(value).__name__}: {text[:60]}")


# Bytes an RPM answer spends on one object with these properties: object identifier and the
# opening/closing tags (~7), then per property its identifier and tags (~4) and the value.
_VALUE_BYTES = {
    "present-value": 6,
    "status-flags": 4,
    "reliability": 3,
    "units": 3,
    "object-name": 40,
    "out-of-service": 2,
    "priority-array": 60,
}


def objects_per_request(max_apdu: int, props: Sequence[str]) -> int:
    """How many objects fit one ReadPropertyMultiple answer of ``max_apdu`` bytes, without segmentation."""
    per_object = 7 + sum(4 + _VALUE_BYTES.get(p, 8) for p in props)
    return max(1, (max_apdu - 12) // per_object)
