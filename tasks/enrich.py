"""Row enrichment pieces: the output schema, reading and checking input rows, packing batches, and one
batched LLM call validated element by element.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from databricks.sdk import WorkspaceClient
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from tasks.batched import BatchAnswer, ask_task
from tasks.inputs import InputError
from tasks.report import stable_key

PROMPT_VERSION = "enrich-v1"
MAX_BATCH = 50  # rows per call the prompt is written for


def max_words(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value.split()) > limit:
            raise ValueError(f"at most {limit} words, got {len(value.split())}")
        return value

    return AfterValidator(check)


class Tldr(BaseModel):
    """The default task (the seed's): a short summary and how hard the topic is."""

    model_config = ConfigDict(extra="forbid")

    tldr: Annotated[str, Field(min_length=1, json_schema_extra={"maxWords": 12}), max_words(12)]
    challenge: Literal["practice", "expert"]


_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool}


def model_from_json_schema(schema: dict[str, Any], name: str = "Output") -> type[BaseModel]:
    """A pydantic model for a JSON schema object of flat properties (string/integer/number/boolean, enum,
    minLength/maxLength, minimum/maximum, and `maxWords`, batchflows' word limit for strings)."""
    if schema.get("type", "object") != "object" or not isinstance(schema.get("properties"), dict):
        raise ValueError("the output schema must be a JSON schema object with 'properties'")
    required = set(schema.get("required", schema["properties"]))
    fields: dict[str, Any] = {}
    for prop, spec in schema["properties"].items():
        if prop == "id":
            raise ValueError("the output schema must not define 'id': batchflows adds it")
        kind = spec.get("type", "string")
        if "enum" in spec:
            base: Any = Literal[tuple(spec["enum"])]
        elif kind in _TYPES:
            base = _TYPES[kind]
        else:
            raise ValueError(f"property {prop!r}: type {kind!r} is not supported (use {', '.join(_TYPES)})")
        constraints = {
            key: spec[source]
            for key, source in (
                ("min_length", "minLength"),
                ("max_length", "maxLength"),
                ("ge", "minimum"),
                ("le", "maximum"),
            )
            if source in spec
        }
        extra = {"maxWords": spec["maxWords"]} if "maxWords" in spec else None
        field = Field(... if prop in required else None, json_schema_extra=extra, **constraints)
        annotated = Annotated[base, field, max_words(int(spec["maxWords"]))] if "maxWords" in spec else base
        fields[prop] = (annotated if prop in required else annotated | None, field)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def load_schema(path: str | None) -> type[BaseModel]:
    """The output model: the default `Tldr`, or one built from a JSON schema file."""
    if path is None:
        return Tldr
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read output schema {path}: {exc}") from exc
    try:
        return model_from_json_schema(schema, Path(path).stem.title().replace("-", "").replace("_", ""))
    except ValueError as exc:
        raise InputError(f"output schema {path}: {exc}") from exc


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def field_specs(model: type[BaseModel]) -> dict[str, Any]:
    """The schema in the compact form the prompt lists per field (enum, maxWords, maxLength)."""
    specs: dict[str, Any] = {}
    for name, prop in schema_of(model)["properties"].items():
        spec = {k: prop[k] for k in ("enum", "maxLength") if k in prop}
        if "const" in prop:
            spec["enum"] = [prop["const"]]
        if "maxWords" in prop:
            spec["max_words"] = prop["maxWords"]
        specs[name] = spec
    return specs


def check_rows(
    frame: pd.DataFrame,
    id_column: str | None,
    text_columns: list[str],
    max_item_tokens: int | None = None,
    oversized: str = "refuse",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split input rows into items to enrich ({"id", "text", "position"}, "truncated" if cut) and per-row
    errors.

    Without an id column, a row's id is the hash of its text. Missing ids, duplicate ids and empty text
    are errors naming the row (its 1-based position in the input); the other rows go on. A text over
    `max_item_tokens` is never sent whole: an error (`oversized="refuse"`) or cut to that size ("truncate").
    """
    missing = [c for c in [*([id_column] if id_column else []), *text_columns] if c not in frame.columns]
    if missing:
        raise InputError(
            f"column(s) {', '.join(missing)} not in the input (it has: {', '.join(map(str, frame.columns))})"
        )
    if not text_columns:
        raise InputError("name at least one text column to send")
    items: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    first_at: dict[str, int] = {}
    for position, record in enumerate(frame.to_dict("records"), start=1):
        text = "\n".join(f"{c}: {_text(record[c])}" for c in text_columns if _text(record[c]))
        row_id = _text(record[id_column]) if id_column else stable_key(text)
        problem = None
        if not row_id:
            problem = f"row {position}: empty id in column {id_column!r}"
        elif row_id in first_at:
            problem = f"row {position}: duplicate id {row_id!r} (first at row {first_at[row_id]})"
        elif not text:
            problem = f"row {position} (id {row_id}): every text column is empty"
        elif max_item_tokens and (tokens := estimate_tokens(text)) > max_item_tokens and oversized != "truncate":
            problem = (
                f"row {position} (id {row_id}): ~{tokens:,} tokens, over max_item_tokens {max_item_tokens:,} "
                f"(set oversized=truncate to send its first {max_item_tokens:,})"
            )
        if problem:
            errors.append({"position": position, "id": row_id, "error": problem})
            continue
        first_at[row_id] = position
        item = {"id": row_id, "text": text, "position": position}
        if max_item_tokens and estimate_tokens(text) > max_item_tokens:
            item.update(text=text[: max_item_tokens * CHARS_PER_TOKEN], truncated=True)
        items.append(item)
    return items, errors


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """About four characters a token (no tokenizer download needed); errs high for short words."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def pack(items: list[dict[str, Any]], batch_size: int, max_tokens: int) -> list[list[dict[str, Any]]]:
    """Consecutive batches of at most `batch_size` items and about `max_tokens` prompt tokens each (an
    item over the budget on its own still goes, alone)."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    tokens = 0
    for item in items:
        cost = estimate_tokens(item["text"]) + 10
        if current and (len(current) >= batch_size or tokens + cost > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += cost
    if current:
        batches.append(current)
    return batches


def validator(model: type[BaseModel]) -> Callable[[dict[str, Any]], str | None]:
    def validate(element: dict[str, Any]) -> str | None:
        try:
            model.model_validate({k: v for k, v in element.items() if k != "id"})
        except ValidationError as exc:
            return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'element'}: {e['msg']}" for e in exc.errors())
        return None

    return validate


def system_prompt(model: type[BaseModel], instructions: str) -> str:
    return (
        f"{instructions}\nReply with only a JSON array: one object per input item, in any order, each with the "
        f'item\'s "id" and these fields (JSON schema): {json.dumps(schema_of(model), ensure_ascii=False)}'
    )


def enrich_by_schema(
    client: WorkspaceClient,
    endpoint: str,
    items: list[dict[str, Any]],
    schema_path: str | None,
    instructions: str,
    before_call: Callable[[], None] | None = None,
) -> BatchAnswer:
    """`enrich_batch` with the output model named by its schema file (None: `Tldr`): a call that is data
    (`tasks.calls.Call`) names the model, as a model built from a schema at run time cannot be pickled."""
    return enrich_batch(client, endpoint, items, _model(schema_path), instructions, before_call)


@functools.lru_cache(maxsize=16)
def _model(schema_path: str | None) -> type[BaseModel]:
    return load_schema(schema_path)


def enrich_batch(
    client: WorkspaceClient,
    endpoint: str,
    items: list[dict[str, Any]],
    model: type[BaseModel],
    instructions: str,
    before_call: Callable[[], None] | None = None,
) -> BatchAnswer:
    """Enrich one batch. Invalid or missing elements are asked again alone (then recorded as problems).

    Returns {"good": {id: fields}, "problems": {id: message}, "calls": n, "tokens": n}.
    `before_call` runs before every call after the first (the rate limit of the re-asks).
    """
    payload = {"task": "enrich", "fields": field_specs(model)}
    sent = [{"id": i["id"], "text": i["text"]} for i in items]
    system = system_prompt(model, instructions)
    answer = ask_task(client, endpoint, system, payload, sent, validator(model), before_call, "Enrich these items.\n")
    fields = list(schema_of(model)["properties"])
    answer["good"] = {i: {f: e.get(f) for f in fields} for i, e in answer["good"].items()}
    return answer
