"""Genie spaces and the sandbox's deterministic Genie answer model.

Genie's answer to a question depends on two things only: a seeded draw among the outcomes (correct,
equivalent, wrong, error, text) in configured proportions, and whether the space's configuration covers
what the question needs (instruction terms, join specs, SQL snippets, or the question as a sample query).
A question whose needs are not covered is answered wrongly whatever the draw: that is what lets the
improvement job raise a space's score honestly, by changing its configuration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, Field

OUTCOMES = ("correct", "equivalent", "extra", "wrong", "error", "text")


class AnswerMix(BaseModel):
    """Proportions of Genie's outcomes for questions the space covers."""

    correct: float = Field(0.5, ge=0)
    equivalent: float = Field(0.15, ge=0)
    extra: float = Field(0.1, ge=0, description="right answer plus an extra column (needs a judge)")
    wrong: float = Field(0.1, ge=0)
    error: float = Field(0.05, ge=0)
    text: float = Field(0.1, ge=0)


def normalise_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def load_brain() -> list[dict[str, Any]]:
    return yaml.safe_load(resources.files("sandbox").joinpath("data/genie_brain.yaml").read_text("utf-8"))


def hex_id(*parts: str) -> str:
    """A stable 32-character lowercase hex id, the form a workspace requires in serialized_space."""
    return hashlib.md5("\x1f".join(parts).encode()).hexdigest()


def full_configuration(brain: list[dict[str, Any]]) -> dict[str, Any]:
    """The serialized configuration of a space that covers every question of the brain."""
    terms = sorted({n.split(":", 1)[1] for b in brain for n in b["needs"] if n.startswith("term:")})
    joins = sorted({n.split(":", 1)[1] for b in brain for n in b["needs"] if n.startswith("join:")})
    config = bare_configuration()
    config["instructions"]["text_instructions"] = [
        {"id": hex_id("glossary"), "content": [f"Glossary terms explained for this domain: {', '.join(terms)}."]}
    ]
    specs: list[dict[str, Any]] = []
    for join in joins:
        (lt, lc), (rt, rc) = (side.split(".") for side in join.split("="))
        specs.append(
            {
                "id": hex_id("join", join),
                "left": {"identifier": f"samples.retail.{lt}", "alias": lt},
                "right": {"identifier": f"samples.retail.{rt}", "alias": rt},
                "sql": [f"{lt}.{lc} = {rt}.{rc}"],
            }
        )
    config["instructions"]["join_specs"] = sorted(specs, key=lambda s: str(s["id"]))
    config["instructions"]["sql_snippets"]["measures"] = [
        {"id": hex_id("revenue"), "alias": "revenue", "sql": ["SUM(quantity * unit_price * (1 - discount))"]}
    ]
    return config


def bare_configuration() -> dict[str, Any]:
    """A space with the sample tables and benchmarks, and nothing else."""
    tables = sorted(["customers", "products", "stores", "orders", "order_items"])
    return {
        "version": 1,
        "config": {"sample_questions": []},
        "data_sources": {"tables": [{"identifier": f"samples.retail.{t}"} for t in tables]},
        "instructions": {
            "text_instructions": [],
            "example_question_sqls": [],
            "join_specs": [],
            "sql_snippets": {"measures": [], "filters": [], "expressions": []},
        },
        "benchmarks": {"questions": sample_benchmarks()},
    }


def sample_benchmarks() -> list[dict[str, Any]]:
    """The sample benchmarks as a space keeps them: serialized_space.benchmarks.questions."""
    rows = yaml.safe_load(resources.files("sandbox").joinpath("data/benchmarks.yaml").read_text("utf-8"))
    questions = [
        {
            "id": hex_id("benchmark", row["id"]),
            "question": [row["question"]],
            "answer": [{"format": "SQL", "content": [row["expected_sql"]]}],
        }
        for row in rows
    ]
    return sorted(questions, key=lambda q: q["id"])


def covered(need: str, config: dict[str, Any], question: str) -> bool:
    """Whether the space configuration `config` provides `need` for `question`."""
    instructions = config.get("instructions", {})
    kind, _, value = need.partition(":")
    if kind == "term":
        texts = [c for t in instructions.get("text_instructions", []) for c in t.get("content", [])]
        texts += [d for t in config.get("data_sources", {}).get("tables", []) for d in _descriptions(t)]
        return any(value.casefold() in text.casefold() for text in texts)
    if kind == "join":
        wanted = {side.strip().casefold() for side in value.split("=")}
        return any(_join_columns(spec) == wanted for spec in instructions.get("join_specs", []))
    if kind == "snippet":
        snippets = instructions.get("sql_snippets", {})
        return any(s.get("alias") == value for kind_list in snippets.values() for s in kind_list)
    return False


def _join_columns(spec: dict[str, Any]) -> set[str]:
    """{"table.column", "table.column"} of a join spec, its aliases resolved to the tables' names."""
    tables = {
        spec.get(side, {}).get("alias", ""): str(spec.get(side, {}).get("identifier", "")).split(".")[-1]
        for side in ("left", "right")
    }
    for predicate in spec.get("sql", []):
        sides = [s.strip().strip("`") for s in predicate.split("=")]
        if len(sides) == 2 and all("." in s for s in sides):
            return {f"{tables.get(a, a)}.{c}".casefold() for a, c in (s.rsplit(".", 1) for s in sides)}
    return set()


def _descriptions(table: dict[str, Any]) -> list[str]:
    found = list(table.get("description", []))
    for column in table.get("column_configs", []):
        found += column.get("description", []) + column.get("synonyms", [])
    return found


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _draw(seed: int, question: str, mix: AnswerMix) -> str:
    digest = hashlib.sha256(f"{seed}:{normalise_question(question)}".encode()).digest()
    roll = int.from_bytes(digest[:8], "big") / 2**64 * sum(mix.model_dump().values())
    for outcome in OUTCOMES:
        roll -= getattr(mix, outcome)
        if roll < 0:
            return outcome
    return OUTCOMES[0]


def equivalent_sql(sql: str) -> str:
    """The same result under other column aliases (and another row order when order does not matter)."""
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(sql, read="duckdb")
    select = tree if isinstance(tree, exp.Select) else tree.find(exp.Select)
    assert select is not None
    for i, projection in enumerate(select.expressions):
        select.expressions[i] = exp.alias_(projection.unalias(), f"{projection.alias_or_name or 'col'}_{i + 1}")
    if not select.args.get("order"):
        tree = sqlglot.parse_one(f"SELECT * FROM ({tree.sql('duckdb')}) AS genie_answer ORDER BY 1 DESC")
    else:
        # keep ORDER BY valid after renaming: order by position
        order = select.args["order"]
        original = sqlglot.parse_one(sql, read="duckdb").find(exp.Select)
        names = [p.alias_or_name for p in original.expressions] if original else []
        for ordered in order.expressions:
            target = ordered.this
            if isinstance(target, exp.Column) and target.name in names and not target.table:
                ordered.set("this", exp.Literal.number(names.index(target.name) + 1))
    return tree.sql("duckdb")


@dataclass
class Message:
    space_id: str
    conversation_id: str
    message_id: str
    content: str
    created: float
    ready_at: float
    outcome: str
    sql: str | None = None
    text: str | None = None
    failed: bool = False
    attachment_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queued_until: float = 0.0  # the warehouse is starting: PENDING_WAREHOUSE until then
    parameters: list[dict[str, Any]] = field(default_factory=list)  # {keyword, sql_type, value}

    def status(self, now: float) -> str:
        if now >= self.ready_at:
            return "FAILED" if self.failed else "COMPLETED"
        if now < self.queued_until:
            return "PENDING_WAREHOUSE"
        start = max(self.created, self.queued_until)
        progress = (now - start) / max(1e-9, self.ready_at - start)
        if progress < 0.2:
            return "SUBMITTED"
        if progress < 0.4:
            return "FILTERING_CONTEXT"
        if progress < 0.6:
            return "ASKING_AI"
        return "EXECUTING_QUERY"

    def statement_parameters(self) -> list[dict[str, Any]]:
        """The attachment's parameters as the Statement Execution API binds them."""
        return [{"name": p["keyword"], "value": p.get("value"), "type": p.get("sql_type")} for p in self.parameters]

    def as_dict(
        self, now: float, result_ttl_s: float | None = None, row_count: int | None = None, truncated: bool = False
    ) -> dict[str, Any]:
        status = self.status(now)
        if status == "COMPLETED" and self.sql is not None and result_ttl_s is not None:
            status = "QUERY_RESULT_EXPIRED" if now >= self.ready_at + result_ttl_s else status
        body: dict[str, Any] = {
            "id": self.message_id,
            "message_id": self.message_id,
            "space_id": self.space_id,
            "conversation_id": self.conversation_id,
            "content": self.content,
            "status": status,
            "created_timestamp": int(self.created * 1000),
            "last_updated_timestamp": int(now * 1000),
            "user_id": 1,
        }
        if status == "FAILED":
            body["error"] = {
                "error": "Genie could not process the request.",
                "type": "GENERIC_CHAT_COMPLETION_EXCEPTION",
            }
        elif status in ("COMPLETED", "QUERY_RESULT_EXPIRED") and self.sql is not None:
            query: dict[str, Any] = {
                "id": self.attachment_id,
                "query": self.sql,
                "title": self.content[:60],
                "description": "Query generated by the sandbox Genie",
                "statement_id": self.attachment_id,
                "query_result_metadata": {"row_count": row_count or 0, "is_truncated": truncated},
            }
            if self.parameters:
                query["parameters"] = self.parameters
            body["attachments"] = [{"attachment_id": self.attachment_id, "query": query}]
        elif status == "COMPLETED":
            body["attachments"] = [
                {"attachment_id": self.attachment_id, "text": {"id": self.attachment_id, "content": self.text}}
            ]
        return body


class Genie:
    """Spaces, conversations and messages of the sandbox Genie."""

    def __init__(self, seed: int = 0, mix: AnswerMix | None = None, warehouse_id: str = "sandbox-warehouse") -> None:
        self.seed = seed
        self.mix = mix or AnswerMix()
        self.brain = {normalise_question(b["question"]): b for b in load_brain()}
        self.recorded: dict[str, dict[str, Any]] = {}
        self.flaky: dict[str, int] = {}  # question -> times asked; answered right, then wrong, in turn
        self.spaces: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, Message] = {}
        self.conversations: dict[str, dict[str, Any]] = {}  # id -> {space_id, created, title}
        brain = list(self.brain.values())
        self.create_space("retail", "Retail sales", warehouse_id, full_configuration(brain))
        self.create_space("retail-bare", "Retail sales (unconfigured)", warehouse_id, bare_configuration())
        self.replaying = False

    def replay(self, answers: list[dict[str, Any]], warehouse_id: str = "sandbox-warehouse") -> None:
        """Answer exactly these recorded answers (any space), and a "no recorded answer" text otherwise.
        Adds the space `rehearsal` for them."""
        self.recorded = {normalise_question(a["question"]): a for a in answers}
        self.replaying = True
        self.create_space("rehearsal", "Recorded answers", warehouse_id, bare_configuration())

    def create_space(
        self,
        space_id: str | None,
        title: str,
        warehouse_id: str,
        config: dict[str, Any],
        description: str = "",
        parent_path: str | None = None,
    ) -> dict[str, Any]:
        space_id = space_id or uuid.uuid4().hex[:32]
        now = _rfc3339(time.time())
        space = {
            "space_id": space_id,
            "title": title,
            "description": description,
            "warehouse_id": warehouse_id,
            "serialized_space": json.dumps(config, ensure_ascii=False),
            "etag": uuid.uuid4().hex[:12],
            "create_time": now,
            "update_time": now,
            "parent_path": parent_path or "/Workspace/Shared",
        }
        self.spaces[space_id] = space
        return space

    def config(self, space_id: str) -> dict[str, Any]:
        return copy.deepcopy(json.loads(self.spaces[space_id]["serialized_space"]))

    def ask(
        self,
        space_id: str,
        conversation_id: str,
        content: str,
        latency_s: float,
        fail: bool,
        warehouse_at: float = 0.0,
    ) -> Message:
        """A new message; a conversation id not seen before starts that conversation. Genie works only once
        the space's warehouse serves (`warehouse_at`): until then the message is PENDING_WAREHOUSE."""
        now = time.time()
        outcome, sql, text = self._answer(space_id, content)
        recorded = self.recorded.get(normalise_question(content))
        parameters: list[dict[str, Any]] = []
        if recorded:
            latency_s = recorded.get("delay_ms", latency_s * 1000) / 1000
            fail = fail or bool(recorded.get("error"))
            parameters = list(recorded.get("parameters") or [])
        start = max(now, warehouse_at)
        message = Message(
            space_id,
            conversation_id,
            uuid.uuid4().hex,
            content,
            now,
            start + latency_s,
            outcome,
            sql,
            text,
            failed=fail,
            queued_until=start if start > now else 0.0,
            parameters=parameters,
        )
        self.conversations.setdefault(conversation_id, {"space_id": space_id, "created": now, "title": content[:60]})
        self.messages[message.message_id] = message
        return message

    def has_conversation(self, space_id: str, conversation_id: str) -> bool:
        return self.conversations.get(conversation_id, {}).get("space_id") == space_id

    def conversation_count(self, space_id: str) -> int:
        return sum(1 for c in self.conversations.values() if c["space_id"] == space_id)

    def conversations_of(self, space_id: str) -> list[dict[str, Any]]:
        return [
            {"conversation_id": cid, "title": c["title"], "created_timestamp": int(c["created"] * 1000)}
            for cid, c in self.conversations.items()
            if c["space_id"] == space_id
        ]

    def delete_conversation(self, space_id: str, conversation_id: str) -> bool:
        """Delete a conversation and its messages; False when the space holds no such conversation."""
        if not self.has_conversation(space_id, conversation_id):
            return False
        del self.conversations[conversation_id]
        for message_id in [m.message_id for m in self.messages.values() if m.conversation_id == conversation_id]:
            del self.messages[message_id]
        return True

    def _answer(self, space_id: str, question: str) -> tuple[str, str | None, str | None]:
        key = normalise_question(question)
        recorded = self.recorded.get(key)
        if recorded is not None:
            if recorded.get("sql"):
                return "recorded", recorded["sql"], None
            return "recorded", None, recorded.get("text") or ""
        if self.replaying:
            return "text", None, "No recorded answer for this question."
        entry = self.brain.get(key)
        if entry is None:
            return "text", None, "I could not find data in this space that answers that question."
        if key in self.flaky:  # Genie is not deterministic: this question's answer alternates
            self.flaky[key] += 1
            return ("correct", entry["sql"], None) if self.flaky[key] % 2 else ("wrong", entry["wrong"], None)
        config = self.config(space_id)
        samples = {
            normalise_question(" ".join(e.get("question", [])))
            for e in config.get("instructions", {}).get("example_question_sqls", [])
        }
        if key in samples:
            return "correct", entry["sql"], None
        outcome = _draw(self.seed, question, self.mix)
        if outcome in ("correct", "equivalent", "extra") and not all(
            covered(n, config, question) for n in entry["needs"]
        ):
            outcome = "wrong"
        if outcome == "correct":
            return outcome, entry["sql"], None
        if outcome == "equivalent":
            return outcome, equivalent_sql(entry["sql"]), None
        if outcome == "extra":
            return (
                outcome,
                f"SELECT genie_answer.*, 'sandbox' AS answered_by FROM ({entry['sql']}) AS genie_answer",
                None,
            )
        if outcome == "wrong":
            return outcome, entry["wrong"], None
        if outcome == "error":
            return outcome, entry["sql"].replace("SELECT ", "SELECT missing_column, ", 1), None
        return "text", None, "Could you clarify which time period and measure you mean?"
