"""A Genie space's configuration (`serialized_space`) as a workspace accepts it.

Databricks documents the rules (Genie Conversation API, "validation rules for serialized_space"): every
`id` is 32 lowercase hex characters; lists of id-bearing entries are sorted by id, tables by identifier,
column configs by column name; at most one text instruction; a join spec names both tables with an
alias, and each of its predicates is one equality written against those aliases; text fields are lists
of strings; a string holds at most 25,000 characters and a list at most 10,000 items.

`normalised` puts a configuration in that shape and `check` refuses one that is not, before any write:
a space update that the workspace would reject must fail here, with every problem named, not halfway
through a promotion.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

MAX_CHARS = 25_000
MAX_LIST = 10_000
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
TEXT_FIELDS = ("question", "content", "sql", "description", "synonyms", "usage_guidance", "comment", "instruction")
ID_LISTS = (
    ("config", "sample_questions"),
    ("instructions", "text_instructions"),
    ("instructions", "example_question_sqls"),
    ("instructions", "join_specs"),
    ("instructions", "sql_functions"),
    ("instructions", "sql_snippets", "measures"),
    ("instructions", "sql_snippets", "filters"),
    ("instructions", "sql_snippets", "expressions"),
    ("benchmarks", "questions"),
)
_EQUALITY = re.compile(r"^\s*`?(\w+)`?\.`?(\w+)`?\s*=\s*`?(\w+)`?\.`?(\w+)`?\s*$")


class SpaceConfigError(ValueError):
    """A configuration a workspace would refuse; the message lists every problem."""


def new_id(*parts: str) -> str:
    """A stable id for an entry we add: the same content gets the same id on every run."""
    return hashlib.sha256("|".join(("batchflows", *parts)).encode()).hexdigest()[:32]


def entries(config: dict[str, Any], *path: str) -> list[Any]:
    """The list at `path` (empty when absent)."""
    node: Any = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, list) else []


def normalised(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with its lists in the order a workspace requires."""
    new = copy.deepcopy(config)
    for path in ID_LISTS:
        found = entries(new, *path)
        found.sort(key=lambda e: str(e.get("id", "")) if isinstance(e, dict) else "")
    tables = entries(new, "data_sources", "tables")
    tables.sort(key=lambda t: str(t.get("identifier", "")))
    entries(new, "data_sources", "metric_views").sort(key=lambda t: str(t.get("identifier", "")))
    for table in tables:
        if isinstance(table.get("column_configs"), list):
            table["column_configs"].sort(key=lambda c: str(c.get("column_name", "")))
    return new


def problems(config: Any) -> list[str]:
    """Every rule `config` breaks, each naming where (empty when a workspace would accept it)."""
    if not isinstance(config, dict):
        return ["the configuration must be a JSON object"]
    found: list[str] = []
    seen_ids: dict[str, str] = {}
    _check_values(config, "", found, seen_ids)
    for path in ID_LISTS:
        ids = [str(e.get("id", "")) for e in entries(config, *path) if isinstance(e, dict)]
        if ids != sorted(ids):
            found.append(f"{'.'.join(path)}: not sorted by id")
    for kind in ("tables", "metric_views"):
        names = [str(t.get("identifier", "")) for t in entries(config, "data_sources", kind)]
        if names != sorted(names):
            found.append(f"data_sources.{kind}: not sorted by identifier")
        for n, table in enumerate(entries(config, "data_sources", kind)):
            columns = [str(c.get("column_name", "")) for c in table.get("column_configs", []) or []]
            if columns != sorted(columns):
                found.append(f"data_sources.{kind}[{n}].column_configs: not sorted by column_name")
    if len(entries(config, "instructions", "text_instructions")) > 1:
        found.append("instructions.text_instructions: more than one entry (merge them into one)")
    for n, spec in enumerate(entries(config, "instructions", "join_specs")):
        found += _join_problems(spec, f"instructions.join_specs[{n}]")
    return found


def check(config: dict[str, Any]) -> None:
    """Raise SpaceConfigError listing every rule `config` breaks."""
    found = problems(config)
    if found:
        raise SpaceConfigError(
            f"the space configuration would be refused by the workspace ({len(found)} problem(s)): "
            + "; ".join(found[:20])
        )


def _check_values(node: Any, where: str, found: list[str], seen_ids: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{where}.{key}" if where else key
            if key == "id":
                if not (isinstance(value, str) and HEX_ID.match(value)):
                    found.append(f"{at}: {str(value)[:40]!r} is not a 32-character lowercase hex id")
                elif value in seen_ids:
                    found.append(f"{at}: id also used at {seen_ids[value]}")
                else:
                    seen_ids[value] = at
            elif (
                key in TEXT_FIELDS
                and "sql_functions" not in where
                and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                found.append(f"{at}: must be a list of strings")
            _check_values(value, at, found, seen_ids)
    elif isinstance(node, list):
        if len(node) > MAX_LIST:
            found.append(f"{where}: {len(node)} items (at most {MAX_LIST})")
        for n, value in enumerate(node):
            _check_values(value, f"{where}[{n}]", found, seen_ids)
    elif isinstance(node, str) and len(node) > MAX_CHARS:
        found.append(f"{where}: {len(node)} characters (at most {MAX_CHARS})")


def _join_problems(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: must be an object"]
    aliases: list[str] = []
    for side in ("left", "right"):
        table = spec.get(side)
        if not (isinstance(table, dict) and table.get("identifier") and table.get("alias")):
            return [f"{where}.{side}: needs an identifier (catalog.schema.table) and an alias"]
        aliases.append(str(table["alias"]))
    found = []
    for predicate in spec.get("sql") or [None]:
        match = _EQUALITY.match(predicate) if isinstance(predicate, str) else None
        if match is None:
            found.append(f"{where}.sql: {predicate!r} is not one equality alias.column = alias.column")
        elif {match.group(1), match.group(3)} != set(aliases):
            found.append(f"{where}.sql: {predicate!r} does not compare the aliases {aliases[0]} and {aliases[1]}")
    return found


def join_columns(spec: dict[str, Any]) -> str | None:
    """A join spec's relationship as "table.column = table.column" (sorted, aliases resolved to table names)."""
    names = {
        str(spec.get(side, {}).get("alias", "")): str(spec.get(side, {}).get("identifier", "")).split(".")[-1]
        for side in ("left", "right")
    }
    for predicate in spec.get("sql") or []:
        match = _EQUALITY.match(predicate) if isinstance(predicate, str) else None
        if match:
            a, b = f"{names.get(match[1], match[1])}.{match[2]}", f"{names.get(match[3], match[3])}.{match[4]}"
            return " = ".join(sorted((a, b)))
    return None
