"""Improving a Genie space: learn the domain's patterns from benchmarks, ask for fixes to the failures,
check every fix against a schema, and apply the valid ones to a space configuration.

Prompts are versioned files (tasks/prompts/<task>-v<N>.md) and hold no domain words; the LLM's answers
are validated element by element (tasks/batched.py) and fix by fix (`Fix`), so an invalid or empty fix
is rejected with its reason, never applied.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Literal

import sqlglot
from databricks.sdk import WorkspaceClient
from pydantic import BaseModel, Field, StringConstraints, TypeAdapter, ValidationError, field_validator, model_validator

from tasks.batched import BatchAnswer, ask_task
from tasks.space_config import join_columns, new_id, normalised

LEARN_PROMPT = "learn-v1"
PROPOSE_PROMPT = "propose-v1"
CATEGORIES = ("metadata", "instruction", "sample_query", "join_spec", "sql_snippet")
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[\w.]+\.\w+$")]


def prompt(version: str) -> str:
    return resources.files("tasks").joinpath(f"prompts/{version}.md").read_text("utf-8")


class Pattern(BaseModel):
    """One domain pattern learned from a benchmark."""

    kind: Literal["join", "formula", "vocabulary", "date"]
    term: str = ""
    name: str = ""
    maps_to: Text

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Pattern:
        if self.kind in ("vocabulary", "date") and not self.term.strip():
            raise ValueError(f"a {self.kind} pattern needs a term")
        if self.kind == "formula" and not self.name.strip():
            raise ValueError("a formula pattern needs a name")
        if self.kind == "join" and not re.fullmatch(r"[\w.]+\.\w+ = [\w.]+\.\w+", self.maps_to):
            raise ValueError(f"join {self.maps_to!r} is not 'table.column = table.column'")
        return self

    @property
    def merge_key(self) -> tuple[str, str, str]:
        """Patterns with the same key are one pattern (a formula keeps its most used name)."""
        term = "" if self.kind in ("join", "formula") else self.term.casefold()
        return (self.kind, term, self.maps_to.casefold())


def _parses(sql: str) -> str:
    try:
        trees = sqlglot.parse(sql, read="databricks")
    except sqlglot.errors.ParseError as exc:
        raise ValueError(f"SQL does not parse: {str(exc).splitlines()[0]}") from exc
    if len([t for t in trees if t is not None]) != 1:
        raise ValueError("SQL must be exactly one statement")
    return sql


class _FixBase(BaseModel):
    pattern: str | None = Field(None, description="id of the learned pattern the fix comes from")


class MetadataFix(_FixBase):
    category: Literal["metadata"]
    table: Text
    column: Text
    description: Text
    synonyms: list[Text] = Field(default_factory=list)


class InstructionFix(_FixBase):
    category: Literal["instruction"]
    text: Text


class SampleQueryFix(_FixBase):
    category: Literal["sample_query"]
    question: Text
    sql: Text

    @field_validator("sql")
    @classmethod
    def _one_statement(cls, sql: str) -> str:
        return _parses(sql)


class JoinSpecFix(_FixBase):
    category: Literal["join_spec"]
    left: Identifier
    right: Identifier


class SqlSnippetFix(_FixBase):
    category: Literal["sql_snippet"]
    snippet_type: Literal["measure", "filter", "expression"]
    alias: Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^\w+$")]
    sql: Text


Fix = Annotated[
    MetadataFix | InstructionFix | SampleQueryFix | JoinSpecFix | SqlSnippetFix, Field(discriminator="category")
]
FIX = TypeAdapter(Fix)


def check_fix(raw: Any, patterns: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """(the fix as a dict, None) when `raw` is a valid fix naming a known pattern, else (None, problem)."""
    try:
        fix = FIX.validate_python(raw).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']}" if where else first["msg"]
    if fix["pattern"] is None and fix["category"] != "sample_query":
        return None, "pattern: a fix other than a sample query must name the pattern it comes from"
    if fix["pattern"] is not None and fix["pattern"] not in patterns:
        return None, f"pattern: {fix['pattern']!r} is not a learned pattern"
    return fix, None


def fix_key(fix: dict[str, Any]) -> str:
    """What makes two fixes the same fix (the benchmarks they address aside)."""
    return json.dumps({k: v for k, v in fix.items() if k not in ("benchmarks", "pattern")}, sort_keys=True)


def learn_batch(
    client: WorkspaceClient, endpoint: str, items: list[dict[str, Any]], before_call: Callable[[], None] | None = None
) -> BatchAnswer:
    """The patterns of a batch of benchmarks ({"id", "question", "expected_sql"}), by benchmark id."""

    def validate(element: dict[str, Any]) -> str | None:
        if not isinstance(element.get("patterns"), list):
            return "patterns missing or not a list"
        for i, raw in enumerate(element["patterns"]):
            try:
                Pattern.model_validate(raw)
            except ValidationError as exc:
                return f"pattern {i + 1}: {exc.errors()[0]['msg']}"
        return None

    answer = ask_task(client, endpoint, prompt(LEARN_PROMPT), {"task": "learn"}, items, validate, before_call)
    answer["good"] = {
        i: [Pattern.model_validate(p).model_dump() for p in e["patterns"]] for i, e in answer["good"].items()
    }
    return answer


def propose_batch(
    client: WorkspaceClient,
    endpoint: str,
    items: list[dict[str, Any]],
    patterns: list[dict[str, Any]],
    space: dict[str, Any],
    before_call: Callable[[], None] | None = None,
) -> BatchAnswer:
    """The raw fixes proposed for a batch of failing benchmarks, by benchmark id. Only the element's shape is
    checked here: each fix is checked by `check_fix`, so one bad fix does not cost its neighbours."""

    def validate(element: dict[str, Any]) -> str | None:
        fixes = element.get("fixes")
        if not isinstance(fixes, list) or not all(isinstance(f, dict) for f in fixes):
            return "fixes missing or not a list of objects"
        return None

    payload = {"task": "propose", "patterns": patterns, "space": space}
    answer = ask_task(client, endpoint, prompt(PROPOSE_PROMPT), payload, items, validate, before_call)
    answer["good"] = {i: e["fixes"] for i, e in answer["good"].items()}
    return answer


def merge_patterns(learned: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One list of patterns from every benchmark's: duplicates merged (with the benchmarks that show
    them), a formula named by its most used name, ids assigned in a stable order."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    names: dict[tuple[str, str, str], Counter[str]] = {}
    for benchmark_id, patterns in sorted(learned.items()):
        for raw in patterns:
            pattern = Pattern.model_validate(raw)
            key = pattern.merge_key
            entry = merged.setdefault(key, {**pattern.model_dump(), "benchmarks": []})
            entry["benchmarks"].append(benchmark_id)
            names.setdefault(key, Counter())[pattern.name] += 1
    result = []
    for n, (key, entry) in enumerate(sorted(merged.items(), key=lambda kv: (kv[0][0], -len(kv[1]["benchmarks"])))):
        entry["name"] = names[key].most_common(1)[0][0]
        entry["id"] = f"{key[0]}-{n + 1}"
        result.append(entry)
    return result


def space_summary(config: dict[str, Any]) -> dict[str, Any]:
    """What a space's configuration already holds, in the shape the propose prompt reads."""
    instructions = config.get("instructions", {})
    texts = [c for t in instructions.get("text_instructions", []) for c in t.get("content", [])]
    for table in config.get("data_sources", {}).get("tables", []):
        texts += table.get("description", [])
        for column in table.get("column_configs", []):
            texts += column.get("description", []) + column.get("synonyms", [])
    joins = [j for j in (join_columns(s) for s in instructions.get("join_specs", [])) if j]
    snippets = [s.get("alias", "") for kind in instructions.get("sql_snippets", {}).values() for s in kind]
    samples = [" ".join(e.get("question", [])) for e in instructions.get("example_question_sqls", [])]
    return {"texts": texts, "join_specs": joins, "snippets": snippets, "sample_questions": samples}


class FixNotApplicable(ValueError):
    """A valid fix that does not fit the space (e.g. a column of a table the space does not hold)."""


def apply_fixes(
    config: dict[str, Any], fixes: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """A new configuration with `fixes` applied, in the shape a workspace accepts (tasks.space_config).
    Returns (config, fixes applied, (fix, reason) not applied: already present, or not applicable)."""
    new = copy.deepcopy(config)
    instructions = new.setdefault("instructions", {})
    applied: list[dict[str, Any]] = []
    skipped: list[tuple[dict[str, Any], str]] = []
    for fix in fixes:
        try:
            changed = _APPLY[fix["category"]](new, instructions, fix)
        except FixNotApplicable as exc:
            skipped.append((fix, str(exc)))
            continue
        if changed:
            applied.append(fix)
        else:
            skipped.append((fix, "already in the space"))
    return normalised(new), applied, skipped


def _instruction(_: dict[str, Any], ins: dict[str, Any], fix: dict[str, Any]) -> bool:
    """A space has one text instruction block: new text joins it."""
    texts = ins.setdefault("text_instructions", [])
    if any(fix["text"] in t.get("content", []) for t in texts):
        return False
    if not texts:
        texts.append({"id": new_id("text_instructions"), "content": []})
    texts[0].setdefault("content", []).append(fix["text"])
    return True


def _join(config: dict[str, Any], ins: dict[str, Any], fix: dict[str, Any]) -> bool:
    """A join spec between two tables of the space, each named by its identifier and an alias."""
    (left, left_column), (right, right_column) = (_table_of(config, c) for c in (fix["left"], fix["right"]))
    left_alias, right_alias = left.split(".")[-1], right.split(".")[-1]
    if left_alias == right_alias:  # a self-join needs two aliases
        left_alias, right_alias = f"{left_alias}_1", f"{right_alias}_2"
    spec = {
        "id": new_id("join_spec", left, left_column, right, right_column),
        "left": {"identifier": left, "alias": left_alias},
        "right": {"identifier": right, "alias": right_alias},
        "sql": [f"{left_alias}.{left_column} = {right_alias}.{right_column}"],
    }
    specs = ins.setdefault("join_specs", [])
    if join_columns(spec) in {join_columns(s) for s in specs}:
        return False
    specs.append(spec)
    return True


def _table_of(config: dict[str, Any], column: str) -> tuple[str, str]:
    """(the space's table identifier, column) for "table.column" or "schema.table.column"."""
    table, _, name = column.rpartition(".")
    for entry in config.get("data_sources", {}).get("tables", []):
        identifier = str(entry.get("identifier", ""))
        if identifier.casefold() == table.casefold() or identifier.casefold().endswith(f".{table.casefold()}"):
            return identifier, name
    raise FixNotApplicable(f"table {table!r} is not a table of the space")


def _snippet(_: dict[str, Any], ins: dict[str, Any], fix: dict[str, Any]) -> bool:
    snippets = ins.setdefault("sql_snippets", {})
    if any(s.get("alias") == fix["alias"] for kind in snippets.values() for s in kind):
        return False
    snippets.setdefault(f"{fix['snippet_type']}s", []).append(
        {"id": new_id("sql_snippet", fix["alias"]), "alias": fix["alias"], "sql": [fix["sql"]]}
    )
    return True


def _sample(_: dict[str, Any], ins: dict[str, Any], fix: dict[str, Any]) -> bool:
    samples = ins.setdefault("example_question_sqls", [])
    question = fix["question"].casefold()
    if any(" ".join(e.get("question", [])).casefold() == question for e in samples):
        return False
    samples.append({"id": new_id("sample_query", question), "question": [fix["question"]], "sql": [fix["sql"]]})
    return True


def _metadata(config: dict[str, Any], _: dict[str, Any], fix: dict[str, Any]) -> bool:
    tables = config.get("data_sources", {}).get("tables", [])
    name = fix["table"].casefold()
    table = next(
        (
            t
            for t in tables
            if t.get("identifier", "").casefold() in (name,) or t["identifier"].casefold().endswith(f".{name}")
        ),
        None,
    )
    if table is None:
        raise FixNotApplicable(f"table {fix['table']!r} is not a table of the space")
    columns = table.setdefault("column_configs", [])
    column = next((c for c in columns if c.get("column_name") == fix["column"]), None)
    if column is None:
        column = {"column_name": fix["column"], "description": [], "synonyms": []}
        columns.append(column)
    new_synonyms = [s for s in fix["synonyms"] if s not in column.setdefault("synonyms", [])]
    new_description = fix["description"] not in column.setdefault("description", [])
    column["synonyms"] += new_synonyms
    if new_description:
        column["description"].append(fix["description"])
    return bool(new_synonyms) or new_description


_APPLY: dict[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], bool]] = {
    "instruction": _instruction,
    "join_spec": _join,
    "sql_snippet": _snippet,
    "sample_query": _sample,
    "metadata": _metadata,
}
