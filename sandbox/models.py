"""The sandbox's serving-endpoint "models": deterministic programs, not canned strings.

The chat model finds the JSON payload in the last user message (`{"task": ..., "items": [...]}`) and
answers in the shape that task asks for, computed from the items themselves. Embeddings are hashed
bags of words and character trigrams, so texts that share words lie near each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from sandbox import advisor

EMBEDDING_DIM = 256
_WORD = re.compile(r"\w+", re.UNICODE)
_HARD_WORDS = {
    "architecture",
    "distributed",
    "strategy",
    "optimisation",
    "optimization",
    "scaling",
    "concurrency",
    "consensus",
    "security",
    "governance",
    "migration",
}


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def find_payload(text: str) -> dict[str, Any] | None:
    """The JSON object embedded in a prompt (fenced or bare), or None."""
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.S)
    candidate = fenced.group(1) if fenced else text[text.find("{") : text.rfind("}") + 1]
    try:
        payload = json.loads(candidate)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def answer(payload: dict[str, Any] | None) -> Any:
    """The model's answer (a JSON-able value) for a task payload."""
    if payload is None:
        return "I am the sandbox model. Send a JSON payload with a task and items."
    task = payload.get("task")
    items = payload.get("items", [])
    if task == "judge":
        return [_judge(item) for item in items]
    if task == "enrich":
        return [_enrich(item, payload.get("fields", {})) for item in items]
    if task == "analyse":
        return [_analyse(item) for item in items]
    if task == "learn":
        return [advisor.learn(item) for item in items]
    if task == "propose":
        return [advisor.propose(item, payload.get("patterns", []), payload.get("space", {})) for item in items]
    return f"Unknown task {task!r}."


def _norm(value: Any) -> str:
    if value is None:
        return "null"
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return str(value).strip().casefold()


def _judge(item: dict[str, Any]) -> dict[str, Any]:
    """Correct when every expected column appears among the actual columns with the same values."""
    expected, actual = item.get("expected") or {}, item.get("actual") or {}
    exp_rows, act_rows = expected.get("rows", []), actual.get("rows", [])
    if len(exp_rows) != len(act_rows):
        return {
            "id": item.get("id"),
            "verdict": "incorrect",
            "reason": f"expected {len(exp_rows)} rows, the answer has {len(act_rows)}",
        }
    act_columns = [sorted(_norm(r[i]) for r in act_rows) for i in range(len(actual.get("columns", [])))]
    for i, name in enumerate(expected.get("columns", [])):
        column = sorted(_norm(r[i]) for r in exp_rows)
        if column not in act_columns:
            return {
                "id": item.get("id"),
                "verdict": "incorrect",
                "reason": f"no column of the answer matches expected column {name!r}",
            }
    return {
        "id": item.get("id"),
        "verdict": "correct",
        "reason": "every expected column is present with the same values; extra columns are harmless",
    }


def _enrich(item: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    text = str(item.get("text", ""))
    words = _WORD.findall(text)
    out: dict[str, Any] = {"id": item.get("id")}
    for name, spec in (fields or {"tldr": {"max_words": 12}, "challenge": {"enum": ["practice", "expert"]}}).items():
        if "enum" in spec:
            hard = len(words) > 60 or bool(_HARD_WORDS & {w.casefold() for w in words})
            out[name] = spec["enum"][-1] if hard else spec["enum"][0]
        else:
            out[name] = " ".join(words[: int(spec.get("max_words", 12))])
    return out


def _analyse(item: dict[str, Any]) -> dict[str, Any]:
    text = str(item.get("text", "")).strip()
    words = _WORD.findall(text)
    fragment = bool(text) and (text[0].islower() or text.startswith(("...", "(", "continued", "and ")))
    topic = max(words, key=len).casefold() if words else ""
    return {
        "id": item.get("id"),
        "topic": topic,
        "is_fragment": fragment,
        "difficulty": "hard" if len(words) > 80 else "medium" if len(words) > 30 else "easy",
    }


def embed(text: str) -> list[float]:
    """A deterministic unit vector: hashed words (weight 1) and character trigrams (weight 0.5)."""
    vector = [0.0] * EMBEDDING_DIM
    lowered = text.casefold()
    features = [(w, 1.0) for w in _WORD.findall(lowered)]
    features += [(lowered[i : i + 3], 0.5) for i in range(max(0, len(lowered) - 2))]
    for feature, weight in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % EMBEDDING_DIM
        sign = 1.0 if digest[4] & 1 else -1.0
        vector[index] += sign * weight
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]
