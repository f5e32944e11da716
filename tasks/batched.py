"""Batched LLM calls answered with one JSON array: validate every element, keep the good ones, re-ask
the rest in smaller batches (down to one item), never guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypedDict

from databricks.sdk import WorkspaceClient

from tasks.calls import chat
from tasks.errors import InvalidResponse


class PartialAnswer(Exception):
    """A transient error part-way through a batch, carrying the elements validated before it."""

    def __init__(self, error: BaseException, good: dict[str, Any]) -> None:
        super().__init__(str(error))
        self.error, self.good = error, good


class BatchAnswer(TypedDict):
    """What one batched call (with its re-asks) came back with."""

    good: dict[str, Any]  # item id -> valid answer
    problems: dict[str, str]  # item id -> why it has none
    tokens: int


Validator = Callable[[dict[str, Any]], str | None]  # returns a problem, or None when the element is valid


def parse_array(content: str) -> list[Any]:
    """The JSON array in an LLM reply (bare or in a ```json fence)."""
    fenced = re.search(r"```(?:json)?\s*(\[.*\])\s*```", content, re.S)
    text = fenced.group(1) if fenced else content.strip()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidResponse(f"reply is not valid JSON: {exc}") from exc
    if not isinstance(value, list):
        raise InvalidResponse(f"reply is a JSON {type(value).__name__}, not an array")
    return value


def check_elements(ids: list[str], elements: list[Any], validate: Validator) -> tuple[dict[str, Any], dict[str, str]]:
    """Split an array into valid elements by id and problems by id (missing, duplicated, unknown, invalid)."""
    wanted = set(ids)
    good: dict[str, Any] = {}
    problems: dict[str, str] = {}
    seen: dict[str, int] = {}
    for element in elements:
        if not isinstance(element, dict) or "id" not in element:
            continue
        element_id = str(element["id"])
        if element_id not in wanted:
            continue  # an id we did not send: ignore it, never attach it to a row
        seen[element_id] = seen.get(element_id, 0) + 1
        problem = validate(element)
        if problem:
            problems[element_id] = problem
        else:
            good[element_id] = element
    for element_id in ids:
        if seen.get(element_id, 0) > 1:
            good.pop(element_id, None)
            problems[element_id] = "id answered more than once"
        elif element_id not in seen:
            problems[element_id] = "id missing from the reply"
    return good, problems


def ask_validated(
    items: list[dict[str, Any]],
    ask: Callable[[list[dict[str, Any]]], str],
    validate: Validator,
    on_good: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Ask for `items` in one call; re-ask invalid or missing ones in halves until single items.

    Returns (valid elements by id, final problems by id); tasks.meter counts the calls. `on_good` gets each
    call's valid elements the moment they are validated, so a transient error in a later re-ask, which
    propagates to the caller's retry policy, loses none of them.
    """
    ids = [str(item["id"]) for item in items]
    try:
        good, problems = check_elements(ids, parse_array(ask(items)), validate)
    except InvalidResponse as exc:
        good, problems = {}, {i: str(exc) for i in ids}
    if good and on_good is not None:
        on_good(good)
    if not problems or len(items) == 1:
        return good, problems
    retry = [item for item in items if str(item["id"]) in problems]
    halves = [retry] if len(retry) < len(items) else [retry[: len(retry) // 2], retry[len(retry) // 2 :]]
    final_problems: dict[str, str] = {}
    for half in halves:
        if not half:
            continue
        if len(half) > 1 and half is retry:
            half_good, half_problems = _ask_each(half, ask, validate, on_good)
        else:
            half_good, half_problems = ask_validated(half, ask, validate, on_good)
        good.update(half_good)
        final_problems.update(half_problems)
    return good, final_problems


def _ask_each(
    items: list[dict[str, Any]],
    ask: Callable[[list[dict[str, Any]]], str],
    validate: Validator,
    on_good: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    good: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for item in items:
        g, p = ask_validated([item], ask, validate, on_good)
        good.update(g)
        problems.update(p)
    return good, problems


def ask_task(
    client: WorkspaceClient,
    endpoint: str,
    system: str,
    payload: dict[str, Any],
    items: list[dict[str, Any]],
    validate: Validator,
    before_call: Callable[[], None] | None = None,
    intro: str = "",
) -> BatchAnswer:
    """Ask `endpoint` for `items` in one call, the payload (`{**payload, "items": batch}`) as fenced JSON after
    `intro`, re-asking invalid elements (`ask_validated`). `before_call` runs before every call after the
    first (the rate limit of the re-asks). Returns the valid elements by id, problems and tokens."""
    tokens = asked = 0

    def ask(batch: list[dict[str, Any]]) -> str:
        nonlocal tokens, asked
        if asked and before_call is not None:
            before_call()
        asked += 1
        text = f"{intro}```json\n" + json.dumps({**payload, "items": batch}, ensure_ascii=False) + "\n```"
        reply = chat(client, endpoint, text, system=system)
        tokens += (reply["prompt_tokens"] or 0) + (reply["completion_tokens"] or 0)
        return str(reply["content"])

    kept: dict[str, Any] = {}
    try:
        good, problems = ask_validated(items, ask, validate, kept.update)
    except Exception as exc:
        if kept:
            raise PartialAnswer(exc, kept) from exc
        raise
    return {"good": good, "problems": problems, "tokens": tokens}
