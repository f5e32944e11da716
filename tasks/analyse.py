"""Item analysis pieces: one LLM call per item (with its predecessor's text as context), the analysis
schema, and the deterministic ordered merge of fragments into groups.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from databricks.sdk import WorkspaceClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.batched import parse_array
from tasks.calls import chat
from tasks.errors import InvalidResponse

PROMPT_VERSION = "analyse-v1"
SYSTEM = (
    "You analyse one item of an ordered document. Say its topic in one word, whether it is a fragment that "
    "continues the previous item (given as context) rather than a standalone item, and its difficulty. Reply "
    'with only a JSON array of one object: {"id", "topic", "is_fragment": true|false, "difficulty": '
    '"easy"|"medium"|"hard"}.'
)


class Analysis(BaseModel):
    model_config = ConfigDict(extra="ignore")

    topic: str = Field(min_length=1, max_length=80)
    is_fragment: bool
    difficulty: Literal["easy", "medium", "hard"]


FAILED_ANALYSIS = {"topic": "", "is_fragment": False, "difficulty": None}


def analyse_item(client: WorkspaceClient, endpoint: str, item: dict[str, Any]) -> dict[str, Any]:
    """One call for one item: {"id", "text", "previous"} -> its analysis (validated), or InvalidResponse."""
    payload = {"task": "analyse", "items": [{"id": item["id"], "text": item["text"]}], "previous": item["previous"]}
    prompt = "Analyse this item.\n```json\n" + json.dumps(payload, ensure_ascii=False) + "\n```"
    elements = parse_array(str(chat(client, endpoint, prompt, system=SYSTEM, max_tokens=256)["content"]))
    mine = [e for e in elements if isinstance(e, dict) and str(e.get("id")) == item["id"]]
    if len(mine) != 1:
        raise InvalidResponse(f"expected one analysis for item {item['id']}, got {len(mine)}")
    try:
        return Analysis.model_validate(mine[0]).model_dump()
    except ValidationError as exc:
        raise InvalidResponse(f"invalid analysis: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc


def merge(items: list[dict[str, Any]], analyses: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups in position order: an item whose analysis says it is a fragment joins the group of the item
    before it; any other item starts a group. Deterministic given the analyses; a group carries all its
    source ids and takes its topic and difficulty from its first item."""
    groups: list[dict[str, Any]] = []
    for item in sorted(items, key=lambda i: i["position"]):
        analysis = analyses[item["id"]]
        if analysis["is_fragment"] and groups:
            groups[-1]["ids"].append(item["id"])
            groups[-1]["text"] += "\n" + item["text"]
            continue
        groups.append(
            {
                "group": len(groups) + 1,
                "ids": [item["id"]],
                "topic": analysis["topic"],
                "difficulty": analysis["difficulty"],
                "text": item["text"],
            }
        )
    return groups
