"""Deterministic comparison of two result sets: decides most benchmarks without an LLM.

Rules: column names are ignored (aliases differ); columns are matched by their values, so column order
does not matter; row order matters only when the expected SQL has a top-level ORDER BY; numbers are
equal within a relative tolerance; NULL equals NULL; numeric strings compare as numbers.
Anything these rules cannot settle (extra columns, a truncated result) is left to the judge.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import sqlglot

Decision = Literal["correct", "incorrect", "undecided"]


def order_matters(sql: str) -> bool:
    """Whether `sql` sorts its final result (a top-level ORDER BY)."""
    try:
        tree = sqlglot.parse_one(sql, read="databricks")
    except sqlglot.errors.ParseError:
        return False
    return tree is not None and tree.args.get("order") is not None


def _cell(value: Any, tolerance: float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    if math.isnan(number):
        return None
    digits = max(0, -math.floor(math.log10(tolerance))) if tolerance > 0 else 12
    return round(number, digits) if abs(number) < 1 else float(f"{number:.{digits}g}")


def _column(rows: list[list[Any]], i: int, tolerance: float, ordered: bool) -> tuple[Any, ...]:
    values = [_cell(r[i], tolerance) for r in rows]
    return tuple(values) if ordered else tuple(sorted(values, key=lambda v: (v is None, str(type(v)), str(v))))


def compare(
    expected: dict[str, Any], actual: dict[str, Any], ordered: bool, tolerance: float = 1e-6
) -> tuple[Decision, str]:
    """Compare two results of `tasks.calls.run_sql`. Returns (decision, reason)."""
    if actual.get("truncated"):
        return "undecided", "the answer's result was truncated at the row cap; it cannot be compared as complete"
    exp_rows, act_rows = expected["rows"], actual["rows"]
    if len(exp_rows) != len(act_rows):
        return "incorrect", f"expected {len(exp_rows)} rows, got {len(act_rows)}"
    n_exp, n_act = len(expected["columns"]), len(actual["columns"])
    if n_act < n_exp:
        return "incorrect", f"expected {n_exp} columns, got {n_act}"
    act_columns = [_column(act_rows, i, tolerance, ordered) for i in range(n_act)]
    unmatched = []
    used: set[int] = set()
    for i, name in enumerate(expected["columns"]):
        column = _column(exp_rows, i, tolerance, ordered)
        match = next((j for j, c in enumerate(act_columns) if j not in used and c == column), None)
        if match is None:
            unmatched.append(name)
        else:
            used.add(match)
    if unmatched:
        if n_act == n_exp:
            return "incorrect", f"values differ in column(s) {', '.join(unmatched)}"
        return "undecided", f"column(s) {', '.join(unmatched)} not found; the answer has other columns"
    if not ordered and n_exp > 1 and not _rows_match(exp_rows, act_rows, n_exp, tolerance):
        return "incorrect", "each column has the expected values, but they are combined into different rows"
    if n_act > n_exp:
        return "undecided", f"all {n_exp} expected columns match; the answer adds {n_act - n_exp} column(s)"
    return "correct", "same rows" + (" in the same order" if ordered else " (row order ignored)")


def _rows_match(exp_rows: list[list[Any]], act_rows: list[list[Any]], n: int, tolerance: float) -> bool:
    """Columns matched one by one; check that whole rows of the first `n` columns also match (as multisets)."""
    exp_set = sorted(str(tuple(_cell(r[i], tolerance) for i in range(n))) for r in exp_rows)
    for perm in _candidate_mappings(exp_rows, act_rows, n, tolerance):
        act_set = sorted(str(tuple(_cell(r[j], tolerance) for j in perm)) for r in act_rows)
        if act_set == exp_set:
            return True
    return False


def _candidate_mappings(
    exp_rows: list[list[Any]], act_rows: list[list[Any]], n: int, tolerance: float
) -> list[list[int]]:
    """Expected column i -> the actual columns with the same multiset of values (first consistent pick)."""
    n_act = len(act_rows[0]) if act_rows else n
    options = []
    for i in range(n):
        col = sorted(str(_cell(r[i], tolerance)) for r in exp_rows)
        options.append([j for j in range(n_act) if sorted(str(_cell(r[j], tolerance)) for r in act_rows) == col])
    mappings: list[list[int]] = []

    def walk(i: int, chosen: list[int]) -> None:
        if len(mappings) >= 24:
            return
        if i == n:
            mappings.append(list(chosen))
            return
        for j in options[i]:
            if j not in chosen:
                walk(i + 1, [*chosen, j])

    walk(0, [])
    return mappings
