"""The SQL that Grafana sends to PostgreSQL for a dashboard panel, without Grafana.

What the tests of ``grafana/dashboards`` need, done the way Grafana does it:

1. the panel's template variables, as the frontend replaces them (``$site``, ``${site}``, ``[[site]]``,
   ``${site:sqlstring}`` and the other formats below; the PostgreSQL datasource's default quotes the values
   of multi-value and include-all variables and only escapes the others), and ``$__interval``,
   ``$__interval_ms``, ``$__from``, ``$__to``;
2. ``$__unixEpochFrom()`` and ``$__unixEpochTo()`` (the backend's global substitutions);
3. the macros of the PostgreSQL datasource (``pkg/tsdb/grafana-postgresql-datasource/macros.go``):
   ``$__time``, ``$__timeEpoch``, ``$__timeFilter``, ``$__timeFrom()``, ``$__timeTo()``, ``$__timeGroup``
   and ``$__timeGroupAlias`` (``floor(extract(epoch from col)/secs)*secs``, or ``time_bucket('Ns',col)``
   when the datasource has its TimescaleDB option on), ``$__unixEpochFilter``, ``$__unixEpochNanoFilter``,
   ``$__unixEpochNanoFrom()``, ``$__unixEpochNanoTo()``, ``$__unixEpochGroup`` and
   ``$__unixEpochGroupAlias``. An unknown macro is an error, as in Grafana.

Plus reading the dashboards: every SQL target of every panel (rows and their nested panels included) and
every SQL template variable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Variable:
    """A template variable with its current value: a list for a multi-value or "All" selection."""

    name: str
    value: str | list[str]
    multi: bool = False
    include_all: bool = False


@dataclass(frozen=True)
class VariableQuery:
    """A template variable of type ``query`` (its options come from SQL)."""

    name: str
    sql: str
    multi: bool
    include_all: bool
    current: str | list[str] | None


@dataclass(frozen=True)
class Target:
    """One SQL query of one panel, with what the panel expects of its result."""

    dashboard: str
    panel: str
    panel_type: str
    ref_id: str
    sql: str
    format: str  # "time_series" or "table"
    columns: tuple[str, ...] = field(default=())  # named by the panel (organize transformation, overrides)
    interval: str | None = None  # the panel's minimum interval

    @property
    def label(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


# ---- reading dashboards -------------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("dashboard", data)  # an export wrapped for the HTTP API, or the dashboard itself


def iter_panels(container: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first: a row's nested panels (a collapsed row keeps them) after the row."""
    for panel in container.get("panels") or ():
        yield panel
        yield from iter_panels(panel)


def named_columns(panel: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields a panel refers to by name: its organize transformation and its byName overrides."""
    names: list[str] = []
    for t in panel.get("transformations") or ():
        if t.get("id") == "organize":
            opts = t.get("options") or {}
            for key in ("indexByName", "renameByName", "excludeByName"):
                names += [n for n in opts.get(key) or {} if n not in names]
    for o in (panel.get("fieldConfig") or {}).get("overrides") or ():
        matcher = o.get("matcher") or {}
        if matcher.get("id") == "byName" and matcher.get("options") not in names:
            names.append(matcher["options"])
    return tuple(names)


def targets(dashboard: Mapping[str, Any]) -> list[Target]:
    out = []
    for panel in iter_panels(dashboard):
        if panel.get("type") == "row":
            continue
        for t in panel.get("targets") or ():
            sql = t.get("rawSql")
            if not sql:
                continue
            out.append(
                Target(
                    dashboard=str(dashboard.get("uid") or dashboard.get("title")),
                    panel=str(panel.get("title", "")),
                    panel_type=str(panel.get("type", "")),
                    ref_id=str(t.get("refId", "")),
                    sql=sql,
                    format=str(t.get("format", "time_series")),
                    columns=named_columns(panel),
                    interval=panel.get("interval") or None,
                )
            )
    return out


def variable_queries(dashboard: Mapping[str, Any]) -> list[VariableQuery]:
    out = []
    for v in (dashboard.get("templating") or {}).get("list") or ():
        if v.get("type") != "query":
            continue
        q = v.get("query")
        sql = q.get("rawSql") or q.get("query") if isinstance(q, dict) else q
        current = (v.get("current") or {}).get("value")
        out.append(
            VariableQuery(v["name"], str(sql), bool(v.get("multi")), bool(v.get("includeAll")), current)
        )
    return out


# ---- durations as Grafana writes and reads them (grafana-plugin-sdk-go backend/gtime) ------------------

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DATE_UNIT = re.compile(r"^(\d+)([dwMy])$")
_YEAR_S = 365.25 * 86400  # gtime's year for d/w/M/y intervals (a month is a twelfth of it)
_DATE_UNITS = {"d": 86400.0, "w": 7 * 86400.0, "M": _YEAR_S / 12, "y": _YEAR_S}


def parse_interval(text: str) -> timedelta:
    """gtime.ParseInterval: ``5m``, ``10s``, ``1h30m``, ``500ms``, ``2d``, ``1w``, ``1M``, ``1y``."""
    m = _DATE_UNIT.match(text)
    if m:
        return timedelta(seconds=int(m.group(1)) * _DATE_UNITS[m.group(2)])
    pos, seconds = 0, 0.0
    for part in _GO_PART.finditer(text):
        if part.start() != pos:
            break
        seconds += float(part.group(1)) * _GO_UNITS[part.group(2)]
        pos = part.end()
    if text in ("0",):
        return timedelta(0)
    if not text or pos != len(text):
        raise ValueError(f"error parsing interval {text}")
    return timedelta(seconds=seconds)


def format_interval(d: timedelta) -> str:
    """gtime.FormatInterval: the largest whole unit (``1m``, ``10s``, ``2h``), as ``$__interval`` reads."""
    ms = round(d.total_seconds() * 1000)
    for unit, size in (("y", 365 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    if ms >= 1000:
        return f"{ms // 1000}s"
    return f"{ms}ms" if ms >= 1 else "1ms"


def rfc3339nano(t: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds without trailing zeros, ``Z``."""
    t = t.astimezone(UTC)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _epoch(t: datetime) -> int:
    return int(t.timestamp() // 1)


def _epoch_ns(t: datetime) -> int:
    delta = t.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _go_float(x: float) -> str:
    """Go's %v of a float64, for the values Grafana writes here (whole seconds, or fractions of one)."""
    return str(int(x)) if x == int(x) else repr(x)


# ---- 1. template variables (the frontend) ------------------------------------------------------------

# Grafana's variableRegex: $name | [[name:format]] | ${name.fieldPath:format}
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


def _quote_literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _format(value: str | list[str], fmt: str | None, var: Variable | None) -> str:
    values = value if isinstance(value, list) else [value]
    if fmt is None:  # the PostgreSQL datasource's interpolateVariable
        if isinstance(value, list):
            return ",".join(_quote_literal(v) for v in value)
        if var is not None and (var.multi or var.include_all):
            return _quote_literal(value)
        return value.replace("'", "''")
    if fmt == "sqlstring":
        return ",".join(_quote_literal(v) for v in values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt in ("csv", "raw"):
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    raise ValueError(f"variable format {fmt!r} is not supported here")


def interpolate_variables(
    sql: str, variables: Mapping[str, Variable], time_range: TimeRange, interval: timedelta
) -> str:
    builtins = {
        "__interval": format_interval(interval),
        "__interval_ms": str(round(interval.total_seconds() * 1000)),
        "__from": str(round(time_range.start.timestamp() * 1000)),
        "__to": str(round(time_range.end.timestamp() * 1000)),
    }

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name in builtins:
            if fmt is not None:
                raise ValueError(f"format {fmt!r} of ${name} is not supported here")
            return builtins[name]
        var = variables.get(name)
        if var is None:
            return m.group(0)  # not a variable (a macro, say): left as it is, as Grafana does
        if m.group(5):
            raise ValueError(f"field paths (${{{name}.{m.group(5)}}}) are not supported here")
        return _format(var.value, fmt, var)

    return _VARIABLE.sub(replace, sql)


# ---- 2. and 3. the backend: global substitutions and the PostgreSQL macros ----------------------------

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")


def _fill_mode(arg: str) -> None:
    """sqleng.SetupFillmode accepts NULL, previous or a number (the fill happens after the query)."""
    if arg in ("NULL", "previous"):
        return
    try:
        float(arg)
    except ValueError:
        raise ValueError(f"error parsing fill value {arg}") from None


def _macro(name: str, args: list[str], time_range: TimeRange, timescaledb: bool) -> str:
    start, end = time_range.start, time_range.end
    needs_column = (
        "__time",
        "__timeEpoch",
        "__timeFilter",
        "__unixEpochFilter",
        "__unixEpochNanoFilter",
    )
    if name in needs_column and (not args or not args[0]):
        raise ValueError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{rfc3339nano(start)}' AND '{rfc3339nano(end)}'"
    if name == "__timeFrom":
        return f"'{rfc3339nano(start)}'"
    if name == "__timeTo":
        return f"'{rfc3339nano(end)}'"
    if name in ("__timeGroup", "__timeGroupAlias", "__unixEpochGroup", "__unixEpochGroupAlias"):
        if len(args) < 2:
            raise ValueError(f"macro {name} needs time column and interval and optional fill value")
        secs = parse_interval(args[1].strip("'")).total_seconds()
        if len(args) == 3:
            _fill_mode(args[2])
        if name.startswith("__unixEpoch"):
            expr = f"floor(({args[0]})/{_go_float(secs)})*{_go_float(secs)}"
        elif timescaledb:
            expr = f"time_bucket('{secs:.3f}s',{args[0]})"
        else:
            expr = f"floor(extract(epoch from {args[0]})/{_go_float(secs)})*{_go_float(secs)}"
        return expr + ' AS "time"' if name.endswith("Alias") else expr
    if name == "__unixEpochFilter":
        return f"{args[0]} >= {_epoch(start)} AND {args[0]} <= {_epoch(end)}"
    if name == "__unixEpochNanoFilter":
        return f"{args[0]} >= {_epoch_ns(start)} AND {args[0]} <= {_epoch_ns(end)}"
    if name == "__unixEpochNanoFrom":
        return str(_epoch_ns(start))
    if name == "__unixEpochNanoTo":
        return str(_epoch_ns(end))
    raise ValueError(f"unknown macro {name!r}")


def expand_macros(sql: str, time_range: TimeRange, timescaledb: bool = False) -> str:
    """What the PostgreSQL datasource's backend makes of a query whose variables are already replaced."""
    sql = sql.replace("$__unixEpochFrom()", str(_epoch(time_range.start)))
    sql = sql.replace("$__unixEpochTo()", str(_epoch(time_range.end)))
    original = sql

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "__timeGroup":
            # Before Grafana 5.3 $__timeGroup added AS "time"; a comma right after the macro (at its first
            # occurrence) keeps that meaning.
            i = original.find(m.group(0)) + len(m.group(0))
            if i < len(original) and original[i] == ",":
                name = "__timeGroupAlias"
        args = [a.strip(" ") for a in m.group(2).split(",")]
        return _macro(name, args, time_range, timescaledb)

    return _MACRO.sub(replace, sql)


def expand(
    sql: str,
    time_range: TimeRange,
    interval: timedelta,
    variables: Mapping[str, Variable] | None = None,
    timescaledb: bool = False,
) -> str:
    """The SQL the database receives for ``sql`` of a panel: variables, then the backend's macros."""
    sql = interpolate_variables(sql, variables or {}, time_range, interval)
    return expand_macros(sql, time_range, timescaledb)
