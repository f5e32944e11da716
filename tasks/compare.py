"""Deterministic comparison of two SQL results: decides most benchmarks without an LLM, and hands the rest
to the judge with a reason.

The rules, in the order they are applied (README "How answers are compared" says the same):

1. **No evidence, no verdict.** A truncated result, two empty results, or two results whose every cell is
   NULL cannot tell the SQLs apart: undecided (the judge sees both SQLs).
2. **Shape.** A different number of rows, or fewer columns than expected, is incorrect.
3. **Types.** Cells are read by their column's type from the result manifest (`tasks.values`): integers
   and decimals exactly, floating values with `math.isclose` (`rel_tol`, `abs_tol`), strings exactly after
   trimming, DATE equal to a TIMESTAMP at midnight, NULL equal only to NULL.
4. **Rounding.** A numeric column is taken as rounded to k decimals when its side's SQL rounds to k
   (ROUND, BROUND, FORMAT_NUMBER, a cast to DECIMAL(p, k)) and none of its values has more than k decimals
   while the other side's have more; or, without the SQL's word, when at least 3 of its values all have at
   most k >= 1 decimals and every value on the other side has more. Such a pair compares at k decimals
   (|a - b| <= 0.5 * 10^-k) and the reason says "same values at k decimals". Otherwise a value with fewer
   decimals is just another value.
5. **Columns.** Names are ignored (aliases differ). Expected columns are assigned to distinct answer
   columns whose values match (a bipartite matching), and the assignment must also pair whole rows. Every
   assignment is tried, so a valid pairing is never missed; a search past `MAX_ASSIGNMENTS` ends undecided,
   never incorrect. Extra answer columns: `extra_columns="allow"` (default) accepts them when all expected
   columns match, "judge" sends such answers to the judge, "incorrect" refuses them. When a column has no
   match and the answer has extra columns, the judge decides (the value may be there in another form).
6. **Order.** Row order counts only when the expected SQL sorts its final result (top-level ORDER BY).
   It is checked on the sort keys: rows tied on them may come in any order. With a LIMIT, rows tied at the
   cut are interchangeable: the answer may hold other rows with the same key. When a sort key is not among
   the result's columns, a result in another order goes to the judge.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import sqlglot
from sqlglot import exp

from tasks.values import Kind, Unreadable, decimals, kind_of, pair_kind, read_column, sort_key

Decision = Literal["correct", "incorrect", "undecided"]
ExtraColumns = Literal["allow", "judge", "incorrect"]
MAX_ASSIGNMENTS = 5000  # column assignments tried before giving up (undecided)
MIN_ROUNDED_VALUES = 3  # values that show a rounding without the SQL's word for it
MAX_ROW_MATCHING = 400  # rows up to which a tolerance mismatch after sorting is rechecked by full matching


@dataclass(frozen=True)
class Rules:
    """How close is equal, and what extra columns mean (the scoring settings carry these)."""

    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    extra_columns: ExtraColumns = "allow"


@dataclass(frozen=True)
class Rounding:
    """The decimal places each side's SQL rounds numbers to (see `rounding`)."""

    expected: frozenset[int] = frozenset()
    actual: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Sorting:
    """What the expected SQL says about its result's order."""

    ordered: bool = False
    keys: tuple[int | str, ...] | None = ()  # result positions or names; None: a key not in the output
    limit: bool = False


@functools.lru_cache(maxsize=4096)  # a run asks it of each benchmark's SQL, while its calls go on (flows.score)
def sorting(sql: str) -> Sorting:
    """Whether `sql` sorts its final result, on which output columns, and whether it has a LIMIT."""
    try:
        tree = sqlglot.parse_one(sql, read="databricks")
    except sqlglot.errors.ParseError:
        return Sorting()
    if not isinstance(tree, exp.Query):
        return Sorting()
    limit = tree.args.get("limit") is not None or tree.args.get("fetch") is not None
    order = tree.args.get("order")
    if order is None:
        return Sorting(limit=limit)
    projections = tree.selects
    keys: list[int | str] = []
    for ordered in order.expressions:
        key = _sort_key_column(ordered.this, projections)
        if key is None:
            return Sorting(True, None, limit)
        keys.append(key)
    return Sorting(True, tuple(keys), limit)


@functools.lru_cache(maxsize=4096)
def rounding(sql: str) -> frozenset[int]:
    """The decimal places `sql` rounds to anywhere: ROUND(x, k), BROUND(x, k), FORMAT_NUMBER(x, k) and casts to
    DECIMAL(p, k)."""
    try:
        tree = sqlglot.parse_one(sql, read="databricks")
    except sqlglot.errors.ParseError:
        return frozenset()
    places: set[int] = set()
    for node in tree.walk() if tree else ():
        digits: exp.Expression | None = None
        if isinstance(node, exp.Round):
            digits = node.args.get("decimals") or exp.Literal.number(0)
        elif isinstance(node, exp.Anonymous) and node.name.upper() in ("BROUND", "FORMAT_NUMBER"):
            digits = node.expressions[1] if len(node.expressions) > 1 else exp.Literal.number(0)
        elif isinstance(node, exp.Cast) and node.to.is_type(exp.DataType.Type.DECIMAL):
            params = node.to.expressions
            digits = params[1].this if len(params) > 1 else exp.Literal.number(0)
        if isinstance(digits, exp.Literal) and digits.is_int:
            places.add(int(digits.this))
    return frozenset(places)


def _sort_key_column(key: exp.Expression, projections: list[Any]) -> int | str | None:
    if isinstance(key, exp.Literal) and key.is_int:
        return int(key.this) - 1
    plain = [p.this if isinstance(p, exp.Alias) else p for p in projections]
    for i, (projection, expression) in enumerate(zip(projections, plain, strict=True)):
        if isinstance(key, exp.Column) and not key.table and key.name == projection.alias_or_name:
            return i
        if key.sql() == expression.sql():
            return i
    if isinstance(key, exp.Column) and any(isinstance(p, exp.Star) or p.is_star for p in projections):
        return key.name  # SELECT *: found by name in the result
    return None


# --- cells and columns ---


class _Pair:
    """One expected column against one answer column: how their cells compare."""

    def __init__(self, kind: Kind, raw: tuple[list[Any], list[Any]], rules: Rules, rounds: Rounding) -> None:
        self.kind, self.raw, self.rounds = kind, raw, rounds
        self.expected, self.actual = read_column(raw[0], kind), read_column(raw[1], kind)
        self.rel_tol, self.abs_tol = rules.rel_tol, rules.abs_tol
        self.rounded: int | None = None
        self.matches = self._values_match()
        if not self.matches and kind in ("exact", "float"):
            self._try_rounding()

    def equal(self, a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is None and b is None
        if self.kind == "float" and (math.isnan(a) or math.isnan(b)):
            return math.isnan(a) and math.isnan(b)
        if self.rounded is not None:
            gap = abs(Decimal(repr(a)) - Decimal(repr(b))) if self.kind == "float" else abs(a - b)
            return bool(gap <= Decimal(5) * Decimal(10) ** -(self.rounded + 1))
        if self.kind == "float":
            return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return bool(a == b)

    def _values_match(self) -> bool:
        return _same_multiset([(v,) for v in self.expected], [(v,) for v in self.actual], [self])

    @property
    def exact(self) -> bool:
        """Equal cells are equal values (hashable alike): no tolerance, no rounding."""
        return self.kind != "float" and self.rounded is None

    def _try_rounding(self) -> None:
        places = [[decimals(v) for v in side if v is not None] for side in self.raw]
        most = [max(p, default=0) for p in places]
        fewer, more = (0, 1) if most[0] < most[1] else (1, 0)
        said = (self.rounds.expected, self.rounds.actual)[fewer]
        tries = {k for k in said if most[fewer] <= k < most[more]}
        k = most[fewer]  # the data's word: one side always rounded to k, the other never
        if k >= 1 and len(places[fewer]) >= MIN_ROUNDED_VALUES and all(d > k for d in places[more]):
            tries.add(k)
        for k in sorted(tries):
            self.rounded = k
            self.matches = self._values_match()
            if self.matches:
                return
        self.rounded = None


def _pairs(
    expected: dict[str, Any], actual: dict[str, Any], rules: Rules, rounds: Rounding
) -> dict[tuple[int, int], _Pair]:
    """Every (expected column, answer column) whose cells can be read under a common kind."""
    exp_cols, act_cols = _columns(expected), _columns(actual)
    kinds_e = [kind_of(t, c) for t, c in zip(_types(expected), exp_cols, strict=True)]
    kinds_a = [kind_of(t, c) for t, c in zip(_types(actual), act_cols, strict=True)]
    pairs = {}
    for i, column_e in enumerate(exp_cols):
        for j, column_a in enumerate(act_cols):
            kind = pair_kind(kinds_e[i], kinds_a[j])
            try:
                pairs[i, j] = _Pair(kind, (column_e, column_a), rules, rounds)
            except Unreadable:
                continue
    return pairs


def _columns(result: dict[str, Any]) -> list[list[Any]]:
    return [[row[i] for row in result["rows"]] for i in range(len(result["columns"]))]


def _types(result: dict[str, Any]) -> list[str | None]:
    return list(result.get("types") or [None] * len(result["columns"]))


# --- multisets of rows, with per-column equality ---


def _same_multiset(left: list[tuple[Any, ...]], right: list[tuple[Any, ...]], pairs: list[_Pair]) -> bool:
    """Whether two lists of tuples are the same multiset, each position compared by its pair's equality."""
    if len(left) != len(right):
        return False
    if len(left) == 1:
        return all(p.equal(a, b) for p, a, b in zip(pairs, left[0], right[0], strict=True))
    exact = [k for k, p in enumerate(pairs) if p.exact]
    if len(exact) == len(pairs):  # equality is identity of values: count them
        return Counter(left) == Counter(right)
    if len(pairs) == 1:
        return _same_numbers([t[0] for t in left], [t[0] for t in right], pairs[0])
    if exact:  # rows agree on their exact cells first; the others are compared within each such group
        groups_l: dict[tuple[Any, ...], list[tuple[Any, ...]]] = defaultdict(list)
        groups_r: dict[tuple[Any, ...], list[tuple[Any, ...]]] = defaultdict(list)
        for rows, groups in ((left, groups_l), (right, groups_r)):
            for t in rows:
                groups[tuple(t[k] for k in exact)].append(t)
        if groups_l.keys() != groups_r.keys():
            return False
        rest = [p for k, p in enumerate(pairs) if k not in exact]
        inexact = [k for k in range(len(pairs)) if k not in exact]
        return all(
            _same_multiset(
                [tuple(t[k] for k in inexact) for t in groups_l[g]],
                [tuple(t[k] for k in inexact) for t in groups_r[g]],
                rest,
            )
            for g in groups_l
        )
    eq = [p.equal for p in pairs]

    def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return all(e(x, y) for e, x, y in zip(eq, a, b, strict=True))

    def key(t: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(sort_key(v) for v in t)

    if all(same(a, b) for a, b in zip(sorted(left, key=key), sorted(right, key=key), strict=True)):
        return True
    if len(left) > MAX_ROW_MATCHING:
        return False
    return _matched(left, right, same)


def _matched(left: list[Any], right: list[Any], same: Callable[[Any, Any], bool]) -> bool:
    """Whether every left item pairs with its own right item (values equal within a tolerance can sort
    apart): a perfect bipartite matching by Kuhn's augmenting paths."""
    options = [[j for j, b in enumerate(right) if same(a, b)] for a in left]
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:
        for j in options[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(left)))


def _same_numbers(left: list[Any], right: list[Any], pair: _Pair) -> bool:
    """One column of numbers compared within a tolerance: NULLs and NaNs counted, the rest paired in order."""

    def split(values: list[Any]) -> tuple[int, int, list[Any]]:
        numbers = [v for v in values if v is not None and v == v]  # NaN != NaN
        nulls = sum(1 for v in values if v is None)
        return nulls, len(values) - nulls - len(numbers), sorted(numbers)

    (nulls_l, nans_l, nums_l), (nulls_r, nans_r, nums_r) = split(left), split(right)
    if (nulls_l, nans_l) != (nulls_r, nans_r):
        return False
    if all(pair.equal(a, b) for a, b in zip(nums_l, nums_r, strict=True)):
        return True
    if len(left) > MAX_ROW_MATCHING:
        return False
    return _matched([(v,) for v in nums_l], [(v,) for v in nums_r], lambda a, b: pair.equal(a[0], b[0]))


class _SearchCap(Exception):
    """Too many column assignments to try."""


def _assignments(
    n_exp: int, pairs: dict[tuple[int, int], _Pair], candidates: list[list[int]], rows_e: list[Any], rows_a: list[Any]
) -> Iterator[list[int]]:
    """Every assignment of expected columns to distinct answer columns under which whole rows match."""
    order = sorted(range(n_exp), key=lambda i: len(candidates[i]))
    tried = 0

    def walk(depth: int, chosen: dict[int, int]) -> Iterator[list[int]]:
        nonlocal tried
        if depth == n_exp:
            yield [chosen[i] for i in range(n_exp)]
            return
        i = order[depth]
        for j in candidates[i]:
            if j in chosen.values():
                continue
            tried += 1
            if tried > MAX_ASSIGNMENTS:
                raise _SearchCap
            chosen[i] = j
            if _rows_match(chosen, pairs, rows_e, rows_a):
                yield from walk(depth + 1, chosen)
            del chosen[i]

    yield from walk(0, {})


def _rows_match(
    chosen: dict[int, int], pairs: dict[tuple[int, int], _Pair], rows_e: list[Any], rows_a: list[Any]
) -> bool:
    cols = sorted(chosen)
    if len(cols) == 1:
        return True  # a single column matched on its own already
    ps = [pairs[i, chosen[i]] for i in cols]
    left = [tuple(p.expected[r] for p in ps) for r in range(len(rows_e))]
    right = [tuple(p.actual[r] for p in ps) for r in range(len(rows_a))]
    return _same_multiset(left, right, ps)


# --- the verdict ---


def compare(
    expected: dict[str, Any],
    actual: dict[str, Any],
    order: Sorting | None = None,
    rules: Rules | None = None,
    rounds: Rounding | None = None,
) -> tuple[Decision, str]:
    """Compare two results of `tasks.calls.run_sql` ({"columns", "types", "rows", "truncated"}).

    Returns:
        (decision, reason): "correct" or "incorrect" when the data settles it, else "undecided" with
        what the judge should look at.
    """
    order, rules, rounds = order or Sorting(), rules or Rules(), rounds or Rounding()
    decision, reason = _compare(expected, actual, order, rules, rounds)
    if decision == "incorrect" and order.ordered and order.limit and order.keys is not None:
        return _tie_at_cut(expected, actual, order, rules, rounds) or (decision, reason)
    return decision, reason


def _compare(
    expected: dict[str, Any], actual: dict[str, Any], order: Sorting, rules: Rules, rounds: Rounding
) -> tuple[Decision, str]:
    if expected.get("truncated") or actual.get("truncated"):
        side = "answer's" if actual.get("truncated") else "expected"
        return "undecided", f"the {side} result was cut at the row cap; it cannot be compared as complete"
    rows_e, rows_a = expected["rows"], actual["rows"]
    if not rows_e and not rows_a:
        return "undecided", "both results are empty, so the data cannot tell the two SQLs apart"
    if _all_null(rows_e) and _all_null(rows_a) and len(rows_e) == len(rows_a):
        return "undecided", "both results hold only NULLs, so the data cannot tell the two SQLs apart"
    if len(rows_e) != len(rows_a):
        return "incorrect", f"expected {len(rows_e)} rows, got {len(rows_a)}"
    n_exp, n_act = len(expected["columns"]), len(actual["columns"])
    if n_act < n_exp:
        return "incorrect", f"expected {n_exp} columns, got {n_act}"
    pairs = _pairs(expected, actual, rules, rounds)
    candidates = [[j for j in range(n_act) if (i, j) in pairs and pairs[i, j].matches] for i in range(n_exp)]
    names = expected["columns"]
    missing = [names[i] for i in range(n_exp) if not candidates[i]]
    if missing:
        if n_act > n_exp:
            return "undecided", (
                f"no answer column has the values of {_listed(missing)}; the answer has other columns "
                "(the values may be there in another form)"
            )
        return "incorrect", f"values differ in {_listed(missing)}: {_example(expected, actual, missing[0], pairs)}"
    matched_any = False
    try:
        for assignment in _assignments(n_exp, pairs, candidates, rows_e, rows_a):
            matched_any = True
            verdict = _ordered_verdict(expected, actual, order, assignment, pairs)
            if verdict is not None:
                return _with_extras(verdict, n_exp, n_act, assignment, pairs, names, rules)
    except _SearchCap:
        return "undecided", (
            f"more than {MAX_ASSIGNMENTS} ways to pair columns with equal values; the comparison stops there"
        )
    if not matched_any:
        return "incorrect", "each column has the expected values, but they are combined into different rows"
    if order.keys is None:
        return "undecided", "the rows match, in another order; the expected SQL sorts on a column it does not show"
    return "incorrect", "the rows match, but not in the order the expected SQL sorts them"


def _ordered_verdict(
    expected: dict[str, Any],
    actual: dict[str, Any],
    order: Sorting,
    assignment: list[int],
    pairs: dict[tuple[int, int], _Pair],
) -> tuple[Decision, str] | None:
    """The verdict for rows that match as a multiset under `assignment`, or None if the order is wrong."""
    if not order.ordered:
        return "correct", "same rows (row order ignored)"
    n = len(expected["rows"])
    all_cols = [pairs[i, j] for i, j in enumerate(assignment)]
    if all(all(p.equal(p.expected[r], p.actual[r]) for p in all_cols) for r in range(n)):
        return "correct", "same rows in the same order"
    keys = _key_positions(expected, order)
    if keys is None:
        return None
    ps = [pairs[i, assignment[i]] for i in keys]
    if all(all(p.equal(p.expected[r], p.actual[r]) for p in ps) for r in range(n)):
        names = _listed([expected["columns"][i] for i in keys])
        return "correct", f"same rows, sorted the same on {names}; rows tied on it come in another order"
    return None


def _key_positions(result: dict[str, Any], order: Sorting) -> list[int] | None:
    if order.keys is None:
        return None
    positions = []
    for key in order.keys:
        if isinstance(key, str):
            if key not in result["columns"]:
                return None
            key = result["columns"].index(key)
        if not 0 <= key < len(result["columns"]):
            return None
        positions.append(key)
    return positions


def _tie_at_cut(
    expected: dict[str, Any], actual: dict[str, Any], order: Sorting, rules: Rules, rounds: Rounding
) -> tuple[Decision, str] | None:
    """With ORDER BY ... LIMIT: the answer is right when it differs only in which rows tied at the cut it kept."""
    keys = _key_positions(expected, order)
    if not keys:
        return None
    rows_e = expected["rows"]
    last = [rows_e[-1][k] for k in keys]
    cut = len(rows_e)
    while cut > 0 and [rows_e[cut - 1][k] for k in keys] == last:
        cut -= 1
    if cut:
        head = {**expected, "rows": rows_e[:cut]}
        decision, _ = compare(
            head, {**actual, "rows": actual["rows"][:cut]}, Sorting(True, order.keys, False), rules, rounds
        )
        if decision != "correct":
            return None
    tail_e = {**expected, "columns": [expected["columns"][k] for k in keys], "rows": [last] * (len(rows_e) - cut)}
    tail_e["types"] = [_types(expected)[k] for k in keys]
    for combo in _key_columns(actual, len(keys)):
        tail_a = {**actual, "columns": combo, "rows": [[r[c] for c in combo] for r in actual["rows"][cut:]]}
        tail_a["types"] = [_types(actual)[c] for c in combo]
        if compare(tail_e, tail_a, Sorting(), rules)[0] != "correct":
            continue
        if not cut:  # nothing but the tied key to compare: the rest of the rows may be any of the tied ones
            return "undecided", "every row is tied on the sort key at the LIMIT cut, so any of the tied rows would do"
        return "correct", (
            f"same rows in the same order; {len(rows_e) - cut} row(s) tied at the LIMIT cut differ, and "
            "either choice is a valid answer"
        )
    return None


def _key_columns(actual: dict[str, Any], n: int) -> Iterator[list[int]]:
    yield from (list(p) for p in itertools.permutations(range(len(actual["columns"])), n))


def _with_extras(
    verdict: tuple[Decision, str],
    n_exp: int,
    n_act: int,
    assignment: list[int],
    pairs: dict[tuple[int, int], _Pair],
    names: list[str],
    rules: Rules,
) -> tuple[Decision, str]:
    decision, reason = verdict
    rounded = [(names[i], pairs[i, j].rounded) for i, j in enumerate(assignment) if pairs[i, j].rounded is not None]
    if rounded:
        reason += "; " + ", ".join(f"same values at {k} decimals in {name}" for name, k in rounded)
    if n_act == n_exp:
        return decision, reason
    extra = f"all {n_exp} expected columns match; the answer adds {n_act - n_exp} column(s)"
    if rules.extra_columns == "allow":
        return decision, f"{reason}; {extra}"
    if rules.extra_columns == "judge":
        return "undecided", f"{extra} (extra_columns=judge)"
    return "incorrect", f"{extra}, which extra_columns=incorrect refuses"


def _all_null(rows: list[list[Any]]) -> bool:
    return all(v is None for row in rows for v in row)


def _listed(names: list[str]) -> str:
    return ("column " if len(names) == 1 else "columns ") + ", ".join(names)


def _example(expected: dict[str, Any], actual: dict[str, Any], name: str, pairs: dict[tuple[int, int], _Pair]) -> str:
    """A first differing value of expected column `name` against the answer column in its position."""
    i = expected["columns"].index(name)
    pair = pairs.get((i, min(i, len(actual["columns"]) - 1)))
    if pair is None:
        return "the answer's column holds values of another type"
    if pair.kind != "float" and pair.rounded is None:  # hashable values: the multiset difference
        only_e, only_a = Counter(pair.expected) - Counter(pair.actual), Counter(pair.actual) - Counter(pair.expected)
        left, right = sorted(only_e.elements(), key=sort_key), sorted(only_a.elements(), key=sort_key)
    else:
        left, right = sorted(pair.expected, key=sort_key), sorted(pair.actual, key=sort_key)
        if len(left) <= MAX_ROW_MATCHING:  # the values on each side that find no partner
            for a in list(left):
                partner = next((k for k, b in enumerate(right) if pair.equal(a, b)), None)
                if partner is not None:
                    left.remove(a)
                    del right[partner]
    for a, b in zip(left, right, strict=True):
        if not pair.equal(a, b):
            return f"expected {_shown(a)}, the answer has {_shown(b)}"
    return "the same values in another combination"


def _shown(value: Any) -> str:
    return "NULL" if value is None else repr(value) if isinstance(value, str) else str(value)
