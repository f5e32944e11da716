"""What a workspace refuses in a Genie space's `serialized_space`, read from Databricks' documentation
(Genie Conversation API, "validation rules for serialized_space") for the sandbox alone: the client keeps
its own reading (tasks/space_config.py), so the two check each other instead of agreeing by construction.

Rules: every `id` is 32 lowercase hex characters and unique; lists of id-bearing entries are sorted by id,
tables and metric views by identifier, column configs by column name; at most one text instruction; a
join spec names both tables with an alias and writes each predicate as one equality against those
aliases; text fields are lists of strings; strings hold at most 25,000 characters, arrays 10,000 items.
"""

from __future__ import annotations

import re
from typing import Any

MAX_STRING = 25_000
MAX_ITEMS = 10_000
_HEX32 = re.compile(r"[0-9a-f]{32}")
_TEXT_LISTS = {"question", "content", "sql", "description", "synonyms", "usage_guidance", "comment", "instruction"}
_BY_ID = (
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
_PREDICATE = re.compile(r"\s*`?(\w+)`?\.`?(\w+)`?\s*=\s*`?(\w+)`?\.`?(\w+)`?\s*")


class SpaceRuleError(ValueError):
    """A configuration a workspace would refuse; the message names the rule and where it is broken."""


def check(config: Any) -> None:
    """Raise SpaceRuleError naming the first broken rule of `config` (a parsed serialized_space)."""
    if not isinstance(config, dict):
        raise SpaceRuleError("serialized_space must be a JSON object")
    _walk(config, "", set())
    for path in _BY_ID:
        entries = _at(config, path)
        ids = [str(e.get("id")) for e in entries if isinstance(e, dict)]
        if ids != sorted(ids):
            raise SpaceRuleError(f"{'.'.join(path)} must be sorted by id")
    for kind in ("tables", "metric_views"):
        entries = _at(config, ("data_sources", kind))
        names = [e.get("identifier", "") for e in entries if isinstance(e, dict)]
        if names != sorted(names):
            raise SpaceRuleError(f"data_sources.{kind} must be sorted by identifier")
        for i, entry in enumerate(entries):
            if len(str(entry.get("identifier", "")).split(".")) != 3:
                raise SpaceRuleError(f"data_sources.{kind}[{i}].identifier must be catalog.schema.name")
            columns = [c.get("column_name", "") for c in entry.get("column_configs", []) if isinstance(c, dict)]
            if columns != sorted(columns):
                raise SpaceRuleError(f"data_sources.{kind}[{i}].column_configs must be sorted by column_name")
    if len(_at(config, ("instructions", "text_instructions"))) > 1:
        raise SpaceRuleError("instructions.text_instructions may hold at most one entry")
    for i, spec in enumerate(_at(config, ("instructions", "join_specs"))):
        _check_join(spec, f"instructions.join_specs[{i}]")


def _at(config: dict[str, Any], path: tuple[str, ...]) -> list[Any]:
    node: Any = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, list):
        raise SpaceRuleError(f"{'.'.join(path)} must be a list")
    return node or []


def _walk(node: Any, where: str, ids: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{where}.{key}" if where else key
            if key == "id":
                if not isinstance(value, str) or not _HEX32.fullmatch(value):
                    raise SpaceRuleError(f"{at}: {value!r} is not a 32-character lowercase hex id")
                if value in ids:
                    raise SpaceRuleError(f"{at}: id {value} is used twice")
                ids.add(value)
            elif (
                key in _TEXT_LISTS
                and not (key == "description" and "sql_functions" in where)
                and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                raise SpaceRuleError(f"{at} must be a list of strings")
            _walk(value, at, ids)
    elif isinstance(node, list):
        if len(node) > MAX_ITEMS:
            raise SpaceRuleError(f"{where}: {len(node)} items; at most {MAX_ITEMS} are allowed")
        for i, value in enumerate(node):
            _walk(value, f"{where}[{i}]", ids)
    elif isinstance(node, str) and len(node) > MAX_STRING:
        raise SpaceRuleError(f"{where}: {len(node)} characters; a string may hold at most {MAX_STRING}")


def _check_join(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise SpaceRuleError(f"{where} must be an object")
    aliases = []
    for side in ("left", "right"):
        table = spec.get(side)
        if not isinstance(table, dict) or not table.get("identifier") or not table.get("alias"):
            raise SpaceRuleError(f"{where}.{side} must be {{identifier, alias}}")
        if len(str(table["identifier"]).split(".")) != 3:
            raise SpaceRuleError(f"{where}.{side}.identifier must be catalog.schema.table")
        aliases.append(table["alias"])
    predicates = spec.get("sql") or []
    if not predicates:
        raise SpaceRuleError(f"{where}.sql must hold the join condition")
    for predicate in predicates:
        match = _PREDICATE.fullmatch(predicate)
        if not match:
            raise SpaceRuleError(f"{where}.sql: {predicate!r} is not one equality alias.column = alias.column")
        used = {match.group(1), match.group(3)}
        if used != set(aliases):
            raise SpaceRuleError(f"{where}.sql: {predicate!r} must compare the aliases {aliases[0]} and {aliases[1]}")
