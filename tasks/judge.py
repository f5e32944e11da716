"""The LLM judge for cases the deterministic comparison cannot settle: 10 cases per call, one JSON array."""

from __future__ import annotations

import json
from typing import Any

from databricks.sdk import WorkspaceClient

from tasks.batched import ask_validated
from tasks.benchmarks import Benchmark
from tasks.calls import chat

PROMPT_VERSION = "judge-v2"
VERDICTS = ("correct", "incorrect")
SAMPLE_ROWS = 20

SYSTEM = (
    "You grade answers of a text-to-SQL assistant. For each item you get the question, the expected SQL and "
    "the answer's SQL, a sample of both results and why an exact comparison could not decide. Decide whether "
    "the answer's SQL answers the question as well as the expected SQL does, for any data, not just this "
    "sample. Extra columns are fine; missing or different values, filters or groupings are not. Reply with "
    'only a JSON array, one element per item: {"id": <item id>, "verdict": "correct" | "incorrect", '
    '"reason": <one sentence>}.'
)


def case_item(
    benchmark: Benchmark,
    answer_sql: str,
    expected: dict[str, Any],
    actual: dict[str, Any],
    note: str,
    answer_parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One judge item: the question, both SQLs, the comparison's reason, and both results cut to SAMPLE_ROWS
    rows (with their full row counts) to bound the prompt."""

    def cut(result: dict[str, Any]) -> dict[str, Any]:
        return {
            "columns": result["columns"],
            "types": result.get("types"),
            "rows": result["rows"][:SAMPLE_ROWS],
            "row_count": result.get("row_count"),
            "truncated": result.get("truncated", False),
        }

    item = {
        "id": benchmark.id,
        "question": benchmark.question,
        "expected_sql": benchmark.expected_sql,
        "answer_sql": answer_sql,
        "comparison": note,
        "expected": cut(expected),
        "actual": cut(actual),
    }
    if answer_parameters:  # the values Genie bound to the answer's :markers, so the judge reads the SQL run
        item["answer_parameters"] = answer_parameters
    return item


def validate_verdict(element: dict[str, Any]) -> str | None:
    if element.get("verdict") not in VERDICTS:
        return f"verdict {element.get('verdict')!r} is not one of {VERDICTS}"
    if not isinstance(element.get("reason"), str) or not element["reason"].strip():
        return "reason missing"
    return None


def judge_cases(client: WorkspaceClient, endpoint: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge a chunk of items. Returns {"verdicts": {case id: {"verdict", "reason"}}}.

    Invalid elements are re-asked (alone, or in halves when the whole reply is broken); an item still
    invalid after being asked alone comes back as {"verdict": None, "reason": problem}.
    """

    def ask(batch: list[dict[str, Any]]) -> str:
        payload = {"task": "judge", "items": batch}
        prompt = "Judge these items.\n```json\n" + json.dumps(payload, ensure_ascii=False, default=str) + "\n```"
        return str(chat(client, endpoint, prompt, system=SYSTEM)["content"])

    good, problems = ask_validated(items, ask, validate_verdict)
    verdicts = {i: {"verdict": e["verdict"], "reason": e["reason"]} for i, e in good.items()}
    verdicts.update({i: {"verdict": None, "reason": f"judge gave no valid verdict: {p}"} for i, p in problems.items()})
    return {"verdicts": verdicts}
