"""The sandbox chat model's "learn" and "propose" tasks: what an LLM asked to improve a Genie space would
work out, computed from the payload with a SQL parser and a small bilingual lexicon (the model's world
knowledge), never from the sandbox Genie's hidden needs.

learn: one benchmark (question + expected SQL) -> the domain patterns it shows: join relationships,
calculation formulas, vocabulary (words of the question -> a value, column or measure; Korean words
through the lexicon), date conventions.

propose: one failing benchmark + all learned patterns + a summary of the space's configuration -> fixes
for the patterns the benchmark uses that the space does not cover yet; a sample query when none is left.
"""

from __future__ import annotations

import re
from typing import Any

import sqlglot
from sqlglot import exp

LEXICON = {
    "서울": "seoul",
    "부산": "busan",
    "매출": "revenue",
    "반품": "returned",
    "온라인": "online",
    "카테고리": "category",
    "지역": "region",
    "가격": "price",
    "고객": "customers",
    "주문": "orders",
    "매장": "stores",
    "상품": "products",
}
TIME_WORDS = ("quarter", "monthly", "month", "weekly", "week", "분기", "월별")
_WORD = re.compile(r"\w+", re.UNICODE)
_OPERATORS: dict[type, str] = {exp.GTE: ">=", exp.GT: ">", exp.LT: "<", exp.LTE: "<="}


def _parse(sql: str) -> Any:
    try:
        return sqlglot.parse_one(sql, read="duckdb")
    except sqlglot.errors.ParseError:
        return None


def _aliases(tree: exp.Expression) -> dict[str, str]:
    found: dict[str, str] = {}
    for table in tree.find_all(exp.Table):
        found[table.name] = table.name
        found[table.alias_or_name] = table.name
    return found


def _column(column: exp.Column, aliases: dict[str, str]) -> str:
    tables = set(aliases.values())
    table = aliases.get(column.table) if column.table else (next(iter(tables)) if len(tables) == 1 else None)
    return f"{table}.{column.name}" if table else column.name


def _unqualified(node: Any) -> str:
    copy = node.copy()
    for column in copy.find_all(exp.Column):
        column.set("table", None)
    return copy.sql("duckdb")


def _joins(tree: exp.Expression, aliases: dict[str, str]) -> set[tuple[str, str]]:
    pairs = set()
    for join in tree.find_all(exp.Join):
        on = join.args.get("on")
        for eq in on.find_all(exp.EQ) if on else []:
            if isinstance(eq.this, exp.Column) and isinstance(eq.expression, exp.Column):
                left, right = sorted((_column(eq.this, aliases), _column(eq.expression, aliases)))
                pairs.add((left, right))
    return pairs


def _formulas(tree: exp.Expression) -> list[tuple[str, str]]:
    found = []
    for agg in tree.find_all(exp.AggFunc):
        if not agg.find(exp.Mul, exp.Sub, exp.Add, exp.Div):
            continue
        parent = agg.parent
        while parent is not None and not isinstance(parent, exp.Alias):
            parent = parent.parent
        if isinstance(parent, exp.Alias) and parent.alias:
            found.append((parent.alias, _unqualified(agg)))
    return found


def learn(item: dict[str, Any]) -> dict[str, Any]:
    question = str(item.get("question", ""))
    tree = _parse(str(item.get("expected_sql", "")))
    if tree is None:
        return {"id": item.get("id"), "patterns": []}
    aliases = _aliases(tree)
    patterns: list[dict[str, Any]] = [
        {"kind": "join", "maps_to": f"{left} = {right}"} for left, right in sorted(_joins(tree, aliases))
    ]
    formulas = _formulas(tree)
    patterns += [{"kind": "formula", "name": name, "maps_to": sql} for name, sql in formulas]
    literals = [
        (_column(eq.this, aliases), eq.expression.name)
        for eq in tree.find_all(exp.EQ)
        if isinstance(eq.this, exp.Column) and isinstance(eq.expression, exp.Literal) and eq.expression.is_string
    ]
    words = [(w, w) for w in _WORD.findall(question.casefold())]
    translated = [(term, meaning) for term, meaning in LEXICON.items() if term in question]
    columns = {c.name: _column(c, aliases) for c in tree.find_all(exp.Column)}
    for term, meaning in words + translated:
        target = next((f"{col} = '{value}'" for col, value in literals if value.casefold() == meaning), None)
        if target is None and (term, meaning) in translated:
            target = columns.get(meaning) or next((f"measure {n}" for n, _ in formulas if n == meaning), None)
        if target:
            patterns.append({"kind": "vocabulary", "term": term, "maps_to": target})
    time_word = next((w for w in TIME_WORDS if w in question.casefold()), None)
    dates = [
        c
        for c in tree.find_all(exp.GTE, exp.GT, exp.LT, exp.LTE)
        if isinstance(c.this, exp.Column) and isinstance(c.expression, exp.Cast)
    ]
    if time_word and dates:
        condition = " AND ".join(
            f"{_column(c.this, aliases)} {_OPERATORS[type(c)]} {c.expression.sql('duckdb')}" for c in dates
        )
        patterns.append({"kind": "date", "term": time_word, "maps_to": condition})
    return {"id": item.get("id"), "patterns": patterns}


def propose(item: dict[str, Any], patterns: list[dict[str, Any]], space: dict[str, Any]) -> dict[str, Any]:
    question = str(item.get("question", ""))
    sql = str(item.get("expected_sql", ""))
    tree = _parse(sql)
    if tree is None:
        return {"id": item.get("id"), "fixes": []}
    joins = {f"{a} = {b}" for a, b in _joins(tree, _aliases(tree))}
    flat = _unqualified(tree)
    texts = [t.casefold() for t in space.get("texts", [])]
    space_joins = {" = ".join(sorted(j.split(" = "))) for j in space.get("join_specs", [])}
    fixes: list[dict[str, Any]] = []
    for p in patterns:
        kind, maps_to, pid = p.get("kind"), str(p.get("maps_to", "")), p.get("id")
        term = str(p.get("term", ""))
        if kind == "join" and maps_to in joins and maps_to not in space_joins:
            left, right = maps_to.split(" = ")
            fixes.append({"category": "join_spec", "pattern": pid, "left": left, "right": right})
        elif kind == "formula" and maps_to in flat and p.get("name") not in space.get("snippets", []):
            fixes.append(
                {
                    "category": "sql_snippet",
                    "pattern": pid,
                    "snippet_type": "measure",
                    "alias": p["name"],
                    "sql": maps_to,
                }
            )
        elif kind in ("vocabulary", "date") and term and term.casefold() in question.casefold():
            if any(term.casefold() in t for t in texts):
                continue
            if kind == "vocabulary" and re.fullmatch(r"\w+\.\w+", maps_to):
                table, column = maps_to.split(".")
                description = f"Users call this column '{term}'."
                fixes.append(
                    {
                        "category": "metadata",
                        "pattern": pid,
                        "table": table,
                        "column": column,
                        "synonyms": [term],
                        "description": description,
                    }
                )
            elif kind == "vocabulary":
                fixes.append({"category": "instruction", "pattern": pid, "text": f"'{term}' means {maps_to}."})
            else:
                text = f"Date convention for '{term}': {maps_to} (start inclusive, end exclusive)."
                fixes.append({"category": "instruction", "pattern": pid, "text": text})
    if not fixes and question.casefold() not in {q.casefold() for q in space.get("sample_questions", [])}:
        fixes.append({"category": "sample_query", "pattern": None, "question": question, "sql": sql})
    return {"id": item.get("id"), "fixes": fixes}
