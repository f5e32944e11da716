"""The result comparator, rule by rule: a table of cases (two typed results, the verdict, the reason), the
same rules on results the sandbox warehouse returns, and properties that no rewrite of an answer may change."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.calls import run_sql
from tasks.compare import Rounding, Rules, Sorting, compare, rounding, sorting


def R(spec: str, *rows: Any, truncated: bool = False) -> dict[str, Any]:
    """A result: spec 'name:TYPE, ...' and rows as tuples."""
    columns = [c.strip().split(":") for c in spec.split(",")]
    return {
        "columns": [c[0] for c in columns],
        "types": [c[1] for c in columns],
        "rows": [list(r) for r in rows],
        "truncated": truncated,
    }


UNORDERED = "SELECT a FROM t"
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str | tuple[str, str], str, str]] = [
    # (case, expected, actual, expected SQL, decision, words the reason holds)
    # types: integers and decimals exact
    (
        "ids differ in the 8th digit",
        R("id:LONG", (10000001,), (10000002,), (10000003,)),
        R("id:LONG", (10000041,), (10000042,), (10000043,)),
        UNORDERED,
        "incorrect",
        "expected 10000001",
    ),
    (
        "same ids",
        R("id:LONG", (10000001,), (10000002,)),
        R("x:LONG", (10000002,), (10000001,)),
        UNORDERED,
        "correct",
        "row order ignored",
    ),
    (
        "BIGINT beyond 2^53 differs by one",
        R("n:LONG", (2**53 + 1,)),
        R("n:LONG", (2**53,)),
        UNORDERED,
        "incorrect",
        "values differ",
    ),
    (
        "DECIMAL(38,10) differs in the last digit",
        R("v:DECIMAL", ("1234567890123456789012345678.1234567890",)),
        R("v:DECIMAL", ("1234567890123456789012345678.1234567891",)),
        UNORDERED,
        "incorrect",
        "values differ",
    ),
    (
        "DECIMAL scales differ, values equal",
        R("v:DECIMAL", ("10.50",)),
        R("v:DECIMAL", ("10.5",)),
        UNORDERED,
        "correct",
        "same rows",
    ),
    ("LONG against DOUBLE", R("n:LONG", (3,)), R("n:DOUBLE", (3.0,)), UNORDERED, "correct", "same rows"),
    ("DECIMAL against DOUBLE", R("v:DECIMAL", ("2.50",)), R("v:DOUBLE", (2.5,)), UNORDERED, "correct", ""),
    # floating values with a tolerance
    (
        "doubles within the relative tolerance",
        R("r:DOUBLE", (0.12345649,)),
        R("r:DOUBLE", (0.12345651,)),
        UNORDERED,
        "correct",
        "same rows",
    ),
    (
        "doubles beyond the tolerance",
        R("r:DOUBLE", (1.0,)),
        R("r:DOUBLE", (1.001,)),
        UNORDERED,
        "incorrect",
        "expected 1.0, the answer has 1.001",
    ),
    (
        "large doubles far apart relatively",
        R("r:DOUBLE", (10000001.0,)),
        R("r:DOUBLE", (10000041.0,)),
        UNORDERED,
        "incorrect",
        "",
    ),
    (
        "tiny doubles within the absolute tolerance",
        R("r:DOUBLE", (1e-12,)),
        R("r:DOUBLE", (0.0,)),
        UNORDERED,
        "correct",
        "",
    ),
    ("NaN equals NaN", R("r:DOUBLE", (float("nan"),)), R("r:DOUBLE", (float("nan"),)), UNORDERED, "correct", ""),
    # strings
    (
        "zip codes are strings",
        R("zip:STRING", ("02134",)),
        R("zip:STRING", ("2134",)),
        UNORDERED,
        "incorrect",
        "'02134'",
    ),
    (
        "numeric string against a number column is read as a number",
        R("n:LONG", (2134,)),
        R("n:STRING", ("02134",)),
        UNORDERED,
        "correct",
        "",
    ),
    ("trimmed strings", R("s:STRING", (" north ",)), R("s:STRING", ("north",)), UNORDERED, "correct", ""),
    ("case matters", R("s:STRING", ("North",)), R("s:STRING", ("north",)), UNORDERED, "incorrect", ""),
    (
        "a non-numeric string is not a number",
        R("n:LONG", (1,)),
        R("n:STRING", ("one",)),
        UNORDERED,
        "incorrect",
        "another type",
    ),
    ("boolean against its text", R("b:BOOLEAN", (True,)), R("b:STRING", ("true",)), UNORDERED, "correct", ""),
    # NULL
    (
        "the string NaN is not NULL",
        R("s:STRING", ("NaN",), ("x",)),
        R("s:STRING", (None,), ("x",)),
        UNORDERED,
        "incorrect",
        "NULL",
    ),
    ("NULL equals NULL", R("s:STRING", (None,), ("x",)), R("s:STRING", ("x",), (None,)), UNORDERED, "correct", ""),
    ("NULL is not zero", R("n:LONG", (None,), (1,)), R("n:LONG", (0,), (1,)), UNORDERED, "incorrect", ""),
    # dates and times
    (
        "DATE equals TIMESTAMP at midnight",
        R("d:DATE", ("2024-03-01",)),
        R("d:TIMESTAMP", ("2024-03-01T00:00:00.000Z",)),
        UNORDERED,
        "correct",
        "",
    ),
    (
        "DATE is not TIMESTAMP at 10:00",
        R("d:DATE", ("2024-03-01",)),
        R("d:TIMESTAMP", ("2024-03-01 10:00:00",)),
        UNORDERED,
        "incorrect",
        "",
    ),
    (
        "the same instant in two offsets",
        R("t:TIMESTAMP", ("2024-03-01T10:00:00+02:00",)),
        R("t:TIMESTAMP", ("2024-03-01T08:00:00Z",)),
        UNORDERED,
        "correct",
        "",
    ),
    ("a date as text", R("d:DATE", ("2024-03-01",)), R("d:STRING", ("2024-03-01",)), UNORDERED, "correct", ""),
    # rounding
    (
        "the answer rounds to 2 decimals",
        R("avg:DOUBLE", (12.3456,), (7.1234,)),
        R("avg:DOUBLE", (12.35,), (7.12,)),
        (UNORDERED, "SELECT ROUND(AVG(x), 2) FROM t"),
        "correct",
        "same values at 2 decimals in avg",
    ),
    (
        "the expected SQL rounds to 2 decimals",
        R("avg:DECIMAL", ("12.35",)),
        R("avg:DOUBLE", (12.3456,)),
        ("SELECT CAST(AVG(x) AS DECIMAL(10, 2)) FROM t", UNORDERED),
        "correct",
        "same values at 2 decimals",
    ),
    (
        "a rounded value shows fewer decimals",
        R("avg:DOUBLE", (12.4961,)),
        R("avg:DOUBLE", (12.5,)),
        (UNORDERED, "SELECT ROUND(AVG(x), 2) FROM t"),
        "correct",
        "same values at 2 decimals",
    ),
    (
        "rounded, but to another value",
        R("avg:DOUBLE", (12.3456,)),
        R("avg:DOUBLE", (12.36,)),
        (UNORDERED, "SELECT ROUND(AVG(x), 2) FROM t"),
        "incorrect",
        "",
    ),
    (
        "fewer decimals without a ROUND are just another value",
        R("avg:DOUBLE", (1.515,)),
        R("avg:DOUBLE", (1.5,)),
        UNORDERED,
        "incorrect",
        "expected 1.515",
    ),
    (
        "three values rounded to 2 decimals, no ROUND in the SQL",
        R("avg:DOUBLE", (12.3456,), (7.1234,), (3.14159,)),
        R("avg:DECIMAL", ("12.35",), ("7.12",), ("3.14",)),
        UNORDERED,
        "correct",
        "same values at 2 decimals in avg",
    ),
    (
        "one rounded-looking value among unrounded ones is another value",
        R("avg:DOUBLE", (12.3456,), (7.1234,), (3.14159,)),
        R("avg:DOUBLE", (12.35,), (7.1234,), (3.14159,)),
        UNORDERED,
        "incorrect",
        "expected 12.3456",
    ),
    (
        "same number of decimals, different values",
        R("p:DECIMAL", ("12.34",)),
        R("p:DECIMAL", ("12.35",)),
        (UNORDERED, "SELECT ROUND(p, 2) FROM t"),
        "incorrect",
        "",
    ),
    (
        "ROUND(x) compares at 0 decimals",
        R("n:DOUBLE", (12.4,)),
        R("n:DOUBLE", (12.0,)),
        (UNORDERED, "SELECT ROUND(AVG(x)) FROM t"),
        "correct",
        "at 0 decimals",
    ),
    # order
    (
        "ORDER BY, same order",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        "SELECT k, n FROM t ORDER BY n DESC",
        "correct",
        "same order",
    ),
    (
        "ORDER BY, other order",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("k:STRING,n:LONG", ("b", 2), ("a", 3)),
        "SELECT k, n FROM t ORDER BY n DESC",
        "incorrect",
        "not in the order",
    ),
    (
        "no ORDER BY, other order",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("k:STRING,n:LONG", ("b", 2), ("a", 3)),
        "SELECT k, n FROM t",
        "correct",
        "row order ignored",
    ),
    (
        "rows tied on the sort key in another order",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2), ("c", 2)),
        R("k:STRING,n:LONG", ("a", 3), ("c", 2), ("b", 2)),
        "SELECT k, n FROM t ORDER BY n DESC",
        "correct",
        "tied",
    ),
    (
        "a tie at the LIMIT cut broken the other way",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("k:STRING,n:LONG", ("a", 3), ("c", 2)),
        "SELECT k, n FROM t ORDER BY n DESC LIMIT 2",
        "correct",
        "tied at the LIMIT cut",
    ),
    (
        "every row tied at the LIMIT cut",
        R("k:STRING,n:LONG", ("a", 2), ("b", 2)),
        R("k:STRING,n:LONG", ("c", 2), ("d", 2)),
        "SELECT k, n FROM t ORDER BY n DESC LIMIT 2",
        "undecided",
        "any of the tied rows",
    ),
    (
        "LIMIT 1: another top row with a lower count",
        R("k:STRING,n:LONG", ("a", 3)),
        R("k:STRING,n:LONG", ("b", 2)),
        "SELECT k, n FROM t ORDER BY n DESC LIMIT 1",
        "incorrect",
        "values differ",
    ),
    (
        "LIMIT 1: another top row with the same count",
        R("k:STRING,n:LONG", ("a", 3)),
        R("k:STRING,n:LONG", ("b", 3)),
        "SELECT k, n FROM t ORDER BY n DESC LIMIT 1",
        "undecided",
        "any of the tied rows",
    ),
    (
        "another row at the cut, not tied",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("k:STRING,n:LONG", ("a", 3), ("c", 1)),
        "SELECT k, n FROM t ORDER BY n DESC LIMIT 2",
        "incorrect",
        "",
    ),
    (
        "sorted on a column the result does not show",
        R("k:STRING", ("a",), ("b",)),
        R("k:STRING", ("b",), ("a",)),
        "SELECT k FROM t ORDER BY created_at",
        "undecided",
        "does not show",
    ),
    (
        "ORDER BY an ordinal",
        R("k:STRING,n:LONG", ("a", 1), ("b", 2)),
        R("k:STRING,n:LONG", ("b", 2), ("a", 1)),
        "SELECT k, n FROM t ORDER BY 2",
        "incorrect",
        "not in the order",
    ),
    (
        "ORDER BY an aggregate's alias, answer columns swapped",
        R("k:STRING,n:LONG", ("a", 3), ("b", 2)),
        R("n:LONG,k:STRING", (3, "a"), (2, "b")),
        "SELECT k, COUNT(*) AS n FROM t GROUP BY k ORDER BY n DESC",
        "correct",
        "same order",
    ),
    # no evidence
    ("two empty results", R("n:LONG"), R("m:LONG"), UNORDERED, "undecided", "both results are empty"),
    ("two all-NULL results", R("s:DOUBLE", (None,)), R("t:DOUBLE", (None,)), UNORDERED, "undecided", "only NULLs"),
    ("empty against one row", R("n:LONG"), R("n:LONG", (1,)), UNORDERED, "incorrect", "expected 0 rows, got 1"),
    (
        "a truncated answer",
        R("n:LONG", (1,)),
        R("n:LONG", (1,), truncated=True),
        UNORDERED,
        "undecided",
        "cut at the row cap",
    ),
    # shape
    ("fewer rows", R("n:LONG", (1,), (2,)), R("n:LONG", (1,)), UNORDERED, "incorrect", "expected 2 rows, got 1"),
    (
        "fewer columns",
        R("a:LONG,b:LONG", (1, 2)),
        R("a:LONG", (1,)),
        UNORDERED,
        "incorrect",
        "expected 2 columns, got 1",
    ),
    # columns
    (
        "columns permuted and renamed",
        R("city:STRING,n:LONG", ("Seoul", 3), ("Busan", 2)),
        R("cnt:LONG,c:STRING", (2, "Busan"), (3, "Seoul")),
        UNORDERED,
        "correct",
        "same rows",
    ),
    (
        "the first pairing of equal columns is wrong, the second right",
        R("a:LONG,b:LONG", (1, 2), (2, 3), (3, 1)),
        R("p:LONG,q:LONG", (2, 1), (3, 2), (1, 3)),
        UNORDERED,
        "correct",
        "same rows",
    ),
    (
        "seven interchangeable columns, one valid pairing of 5040",
        R(",".join(f"c{i}:LONG" for i in range(7)), *[tuple(int(i == j) for j in range(7)) for i in range(7)]),
        R(",".join(f"d{i}:LONG" for i in range(7)), *[tuple(int(i == 6 - j) for j in range(7)) for i in range(7)]),
        UNORDERED,
        "correct",
        "same rows",
    ),
    (
        "values of each column right, rows combined wrongly",
        R("k:STRING,n:LONG", ("a", 1), ("b", 2)),
        R("k:STRING,n:LONG", ("a", 2), ("b", 1)),
        UNORDERED,
        "incorrect",
        "combined into different rows",
    ),
    (
        "an extra column (default: allow)",
        R("n:LONG", (5,)),
        R("n:LONG,who:STRING", (5, "sandbox")),
        UNORDERED,
        "correct",
        "adds 1 column",
    ),
    (
        "an expected column missing, other columns present",
        R("n:LONG", (5,)),
        R("a:STRING,b:STRING", ("x", "y")),
        UNORDERED,
        "undecided",
        "another form",
    ),
]


@pytest.mark.parametrize(("case", "expected", "actual", "sql", "decision", "words"), CASES, ids=[c[0] for c in CASES])
def test_comparator_rule(case, expected, actual, sql, decision, words):
    expected_sql, answer_sql = sql if isinstance(sql, tuple) else (sql, sql)
    rounds = Rounding(rounding(expected_sql), rounding(answer_sql))
    got, reason = compare(expected, actual, sorting(expected_sql), Rules(), rounds)
    assert (got, case) == (decision, case), reason
    assert words in reason
    assert reason and reason[0].islower()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("setting", "decision", "words"),
    [
        ("allow", "correct", "adds 1 column"),
        ("judge", "undecided", "extra_columns=judge"),
        ("incorrect", "incorrect", "extra_columns=incorrect"),
    ],
)
def test_extra_columns_setting(setting, decision, words):
    got, reason = compare(R("n:LONG", (5,)), R("n:LONG,x:LONG", (5, 1)), Sorting(), Rules(extra_columns=setting))
    assert got == decision and words in reason


def test_tolerances_are_settings():
    close = (R("r:DOUBLE", (1.0,)), R("r:DOUBLE", (1.001,)))
    assert compare(*close, Sorting(), Rules(rel_tol=1e-2))[0] == "correct"
    assert compare(*close, Sorting(), Rules(rel_tol=1e-6))[0] == "incorrect"


@pytest.mark.parametrize(
    ("sql", "ordered", "keys", "limit"),
    [
        ("SELECT a, b FROM t", False, (), False),
        ("SELECT a, b FROM t LIMIT 3", False, (), True),
        ("SELECT a, b AS n FROM t ORDER BY n DESC, a", True, (1, 0), False),
        ("SELECT a, COUNT(*) FROM t GROUP BY a ORDER BY COUNT(*) DESC LIMIT 5", True, (1,), True),
        ("SELECT a FROM t ORDER BY b", True, None, False),
        ("SELECT * FROM t ORDER BY b", True, ("b",), False),
        ("SELECT t.a FROM t ORDER BY t.a", True, (0,), False),
        ("SELECT a FROM (SELECT a FROM t ORDER BY a)", False, (), False),
        ("SELECT a FROM t UNION ALL SELECT a FROM u ORDER BY 1", True, (0,), False),
        ("not sql at all (", False, (), False),
    ],
)
def test_sorting_reads_the_expected_sql(sql, ordered, keys, limit):
    assert sorting(sql) == Sorting(ordered, keys, limit)


# --- the same rules on what the sandbox warehouse returns (types from its result manifest) ---


@pytest.mark.parametrize(
    ("expected_sql", "answer_sql", "decision", "words"),
    [
        (
            "SELECT CAST(9007199254740993 AS BIGINT) AS n",
            "SELECT CAST(9007199254740992 AS BIGINT) AS n",
            "incorrect",
            "",
        ),
        ("SELECT CAST(9007199254740993 AS BIGINT) AS n", "SELECT 9007199254740993 AS total", "correct", ""),
        (
            "SELECT CAST('1234567890123456789012345678.1234567890' AS DECIMAL(38,10)) AS v",
            "SELECT CAST('1234567890123456789012345678.1234567891' AS DECIMAL(38,10)) AS v",
            "incorrect",
            "",
        ),
        (
            "SELECT CAST('1234567890123456789012345678.1234567890' AS DECIMAL(38,10)) AS v",
            "SELECT CAST('1234567890123456789012345678.123456789' AS DECIMAL(38,9)) AS v",
            "correct",
            "",
        ),
        ("SELECT DATE '2024-03-01' AS d", "SELECT TIMESTAMP '2024-03-01 00:00:00' AS d", "correct", ""),
        ("SELECT '02134' AS zip", "SELECT '2134' AS zip", "incorrect", ""),
        (
            "SELECT AVG(quantity) AS q FROM order_items",
            "SELECT ROUND(AVG(quantity), 2) AS q FROM order_items",
            "correct",
            "same values at 2 decimals",
        ),
        (
            "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY n DESC",
            "SELECT COUNT(*) AS orders, status FROM orders GROUP BY status ORDER BY orders DESC",
            "correct",
            "same order",
        ),
        (
            "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY n DESC",
            "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY n ASC",
            "incorrect",
            "not in the order",
        ),
        (
            "SELECT order_id FROM orders WHERE 1 = 0",
            "SELECT order_id FROM orders WHERE order_id < 0",
            "undecided",
            "both results are empty",
        ),
    ],
)
def test_rules_on_sandbox_results(client, expected_sql, answer_sql, decision, words):
    expected = run_sql(client, "sandbox-warehouse", expected_sql, 10)
    actual = run_sql(client, "sandbox-warehouse", answer_sql, 10)
    assert "error" not in expected and "error" not in actual, (expected, actual)
    got, reason = compare(
        expected, actual, sorting(expected_sql), Rules(), Rounding(rounding(expected_sql), rounding(answer_sql))
    )
    assert got == decision, reason
    assert words in reason


def test_a_20000_row_result_is_compared_in_full(client):
    sql = "SELECT range AS id, range * 3 AS v FROM range(20000)"
    expected = run_sql(client, "sandbox-warehouse", sql, 30, row_limit=30000)
    assert expected["row_count"] == 20000
    actual = run_sql(
        client,
        "sandbox-warehouse",
        sql.replace("range * 3", "CASE WHEN range = 19999 THEN 0 ELSE range * 3 END"),
        30,
        row_limit=30000,
    )
    assert compare(expected, expected, Sorting(), Rules())[0] == "correct"
    decision, reason = compare(expected, actual, Sorting(), Rules())
    assert decision == "incorrect" and "59997" in reason


# --- properties: rewrites of a right answer stay right; one wrong value makes it wrong ---

TYPES = {
    "LONG": st.integers(-(2**62), 2**62),
    "DOUBLE": st.floats(-1e12, 1e12, allow_nan=False).filter(lambda x: x == 0 or abs(x) > 1e-6),
    "STRING": st.text("abcxyz09 ", min_size=0, max_size=6).map(lambda s: s.strip()),
    "DATE": st.dates().map(lambda d: d.isoformat()),
}


@st.composite
def results(draw: Any) -> dict[str, Any]:
    types = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=4))
    n = draw(st.integers(1, 8))
    rows = [
        [draw(st.one_of(st.none(), TYPES[t])) if draw(st.booleans()) else draw(TYPES[t]) for t in types]
        for _ in range(n)
    ]
    return {"columns": [f"c{i}" for i in range(len(types))], "types": types, "rows": rows, "truncated": False}


def _informative(result: dict[str, Any]) -> bool:
    return any(v is not None for row in result["rows"] for v in row)


def _permuted(result: dict[str, Any], rows: list[int], cols: list[int], rename: bool) -> dict[str, Any]:
    return {
        "columns": [f"alias_{result['columns'][c]}" if rename else result["columns"][c] for c in cols],
        "types": [result["types"][c] for c in cols],
        "rows": [[result["rows"][r][c] for c in cols] for r in rows],
        "truncated": False,
    }


FAST = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(st.data())
def test_row_and_column_permutations_and_aliases_keep_a_right_answer_right(data):
    expected = data.draw(results())
    rows = data.draw(st.permutations(range(len(expected["rows"]))))
    cols = data.draw(st.permutations(range(len(expected["columns"]))))
    actual = _permuted(expected, list(rows), list(cols), data.draw(st.booleans()))
    decision, reason = compare(expected, actual, Sorting(), Rules())
    assert decision == ("correct" if _informative(expected) else "undecided"), reason


@FAST
@given(st.data())
def test_casts_between_equal_types_and_small_float_noise_keep_it_right(data):
    expected = data.draw(results())
    actual = {**expected, "types": list(expected["types"]), "rows": [list(r) for r in expected["rows"]]}
    for c, t in enumerate(expected["types"]):
        if t == "LONG" and data.draw(st.booleans()):  # CAST(n AS DECIMAL) or AS STRING
            actual["types"][c] = data.draw(st.sampled_from(["DECIMAL", "STRING"]))
            for row in actual["rows"]:
                row[c] = None if row[c] is None else str(row[c])
        elif t == "DOUBLE":  # noise well inside the relative tolerance
            for row in actual["rows"]:
                row[c] = None if row[c] is None else row[c] * (1 + data.draw(st.floats(-1e-9, 1e-9)))
        elif t == "DATE" and data.draw(st.booleans()):  # CAST(d AS TIMESTAMP)
            actual["types"][c] = "TIMESTAMP"
            for row in actual["rows"]:
                row[c] = None if row[c] is None else f"{row[c]}T00:00:00.000Z"
    decision, reason = compare(expected, actual, Sorting(), Rules())
    assert decision == ("correct" if _informative(expected) else "undecided"), reason


@FAST
@given(st.data())
def test_rounding_to_k_decimals_keeps_it_right(data):
    k = data.draw(st.integers(1, 4))
    values = data.draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=6))
    values = [v + 10 ** -(k + 3) * 3 for v in values]  # more decimals than k on the expected side
    expected = {"columns": ["v"], "types": ["DOUBLE"], "rows": [[v] for v in values]}
    rounded = [f"{v:.{k}f}" for v in values]
    actual = {"columns": ["v"], "types": ["DECIMAL"], "rows": [[v] for v in rounded]}
    decision, reason = compare(expected, actual, Sorting(), Rules(), Rounding(actual=frozenset({k})))
    assert decision == "correct", reason
    assert f"same values at {k} decimals" in reason or "same rows" in reason


def _changed(value: Any, kind: str) -> Any:
    if value is None:
        return {"LONG": 1, "DOUBLE": 1.5, "STRING": "q", "DATE": "2001-01-01"}[kind]
    if kind == "LONG":
        return value + 1
    if kind == "DOUBLE":
        return value + 1 if abs(value) < 1 else value * 1.01
    if kind == "STRING":
        return value + "!"
    return "1999-12-31" if value != "1999-12-31" else "2000-01-01"


@FAST
@given(st.data())
def test_one_changed_value_a_dropped_row_or_a_duplicated_row_make_it_wrong(data):
    expected = data.draw(results())
    if not _informative(expected):
        return
    actual = {**expected, "rows": [list(r) for r in expected["rows"]]}
    change = data.draw(st.sampled_from(["value", "drop", "duplicate"]))
    r = data.draw(st.integers(0, len(actual["rows"]) - 1))
    if change == "value":
        c = data.draw(st.integers(0, len(expected["columns"]) - 1))
        actual["rows"][r][c] = _changed(actual["rows"][r][c], expected["types"][c])
    elif change == "drop":
        del actual["rows"][r]
    else:
        actual["rows"].append(list(actual["rows"][r]))
    if not actual["rows"]:
        return
    decision, reason = compare(expected, actual, Sorting(), Rules())
    assert decision == "incorrect", (change, reason)


def test_a_double_within_tolerance_is_not_rounding():
    assert math.isclose(0.12345649, 0.12345651, rel_tol=1e-6)
    assert re.search("same rows", compare(R("r:DOUBLE", (0.12345649,)), R("r:DOUBLE", (0.12345651,)))[1])
