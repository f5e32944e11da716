"""Typed cell values of a SQL result, read by the column's Databricks type (the result manifest's type_name).

Each result column gets a *kind*; two columns compare under the pair's kind:

| kind      | type_name                    | value        | equality                                        |
|-----------|------------------------------|--------------|-------------------------------------------------|
| exact     | BYTE SHORT INT LONG DECIMAL  | Decimal      | exact (no float conversion)                     |
| float     | FLOAT DOUBLE                 | float        | math.isclose(rel_tol, abs_tol); NaN equals NaN  |
| time      | DATE TIMESTAMP[_NTZ]         | datetime     | equal instants; a DATE is its day's midnight    |
| bool      | BOOLEAN                      | bool         | equal                                           |
| string    | STRING, CHAR and the rest    | str          | equal after trimming                            |

A numeric, time or bool column against a string column reads the strings as that kind (the answer cast the
column); a string that does not read so makes the pair unequal. Two string columns stay strings: "02134"
is not "2134". NULL equals only NULL: the string "NaN" or "null" is a string, never NULL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

Kind = Literal["exact", "float", "time", "bool", "string"]
NUMERIC = ("exact", "float")

_KINDS: dict[str, Kind] = {
    "BYTE": "exact",
    "SHORT": "exact",
    "INT": "exact",
    "LONG": "exact",
    "DECIMAL": "exact",
    "FLOAT": "float",
    "DOUBLE": "float",
    "DATE": "time",
    "TIMESTAMP": "time",
    "TIMESTAMP_NTZ": "time",
    "BOOLEAN": "bool",
}


class Unreadable(ValueError):
    """A cell that does not read as the kind its pair compares under."""


def kind_of(type_name: str | None, values: list[Any]) -> Kind:
    """The kind of a column: from its type name, or (no type known) from its Python values."""
    if type_name:
        return _KINDS.get(type_name.upper(), "string")
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "exact"
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def pair_kind(a: Kind, b: Kind) -> Kind:
    """The kind two columns compare under."""
    if a in NUMERIC and b in NUMERIC:
        return "float" if "float" in (a, b) else "exact"
    if a == b:
        return a
    if "string" in (a, b):
        return b if a == "string" else a
    return "string"  # e.g. a date against a number: compared as text, which will rarely agree


def _exact(value: Any) -> Decimal | int:
    if isinstance(value, bool):
        raise Unreadable(repr(value))
    if isinstance(value, int):
        return value  # equal to, and hashed as, the Decimal of the same value
    if isinstance(value, float):
        return Decimal(repr(value))
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise Unreadable(repr(value)) from exc
    if not number.is_finite():
        raise Unreadable(repr(value))
    return number


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise Unreadable(repr(value))
    try:
        return float(value) if isinstance(value, int | float | Decimal) else float(str(value).strip())
    except ValueError as exc:
        raise Unreadable(repr(value)) from exc


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise Unreadable(repr(value)) from exc
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise Unreadable(repr(value))
    return text == "true"


def _string(value: Any) -> str:
    return str(value).strip()


READERS: dict[Kind, Callable[[Any], Any]] = {
    "exact": _exact,
    "float": _float,
    "time": _time,
    "bool": _bool,
    "string": _string,
}


def read_column(values: list[Any], kind: Kind) -> list[Any]:
    """The column's values read as `kind` (None stays None).

    Raises:
        Unreadable: a value that does not read as `kind`.
    """
    read = READERS[kind]
    return [None if v is None else read(v) for v in values]


def decimals(value: Any) -> int:
    """Digits after the decimal point of a number as written: a DECIMAL's text keeps its scale ("0.50" -> 2),
    a float its shortest repr (2.675 -> 3, 1e-7 -> 7)."""
    if isinstance(value, bool | int):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return 0
        value = Decimal(repr(value)).normalize()
    try:
        exponent = Decimal(str(value).strip()).as_tuple().exponent
    except InvalidOperation:
        return 0
    return max(0, -exponent) if isinstance(exponent, int) else 0


def sort_key(value: Any) -> tuple[int, Any]:
    """Orders any one kind's values, with NaN and then NULL last."""
    if value is None:
        return (2, 0)
    if isinstance(value, float) and math.isnan(value):
        return (1, 0)
    return (0, value)
