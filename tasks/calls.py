"""The external calls batchflows makes, each bounded by its own deadline: ask Genie, run SQL, chat.

Each returns JSON-able values (so results can be cached and reported) and raises only errors that
`tasks.errors.classify` understands. Every HTTP request carries the client's own timeout: a task timeout
cannot interrupt a blocking socket read in a worker thread (PREFECT_NOTES pitfall 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from databricks.sdk.service.sql import (
    Disposition,
    ExecuteStatementRequestOnWaitTimeout,
    Format,
    StatementParameterListItem,
    StatementState,
)

from tasks.errors import CallTimeout, InvalidResponse, PermanentError

TERMINAL_GENIE = {"COMPLETED", "FAILED", "CANCELLED", "QUERY_RESULT_EXPIRED"}
GENIE_ROW_CAP = 5000


class GenieFailed(PermanentError):
    """Genie answered the question with a FAILED message."""

    kind = "genie_error"


def ask_genie(
    client: WorkspaceClient,
    space_id: str,
    question: str,
    timeout_s: float,
    poll_initial_s: float = 1.0,
    poll_max_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Ask one question in a new conversation and wait for Genie's answer.

    Polls every `poll_initial_s`, backing off by 1.5x up to `poll_max_s` (Databricks asks for 1-5 s),
    and gives up after `timeout_s`.

    Returns:
        {"kind": "sql" | "text", "sql", "text", "row_count", "truncated", "conversation_id", "message_id"}

    Raises:
        CallTimeout: no terminal status within `timeout_s`.
        GenieFailed: Genie's message ended FAILED, CANCELLED or expired.
    """
    deadline = time.monotonic() + timeout_s
    started: Any = client.genie.start_conversation(space_id=space_id, content=question).response
    conversation_id, message_id = started.conversation_id, started.message_id
    interval = poll_initial_s
    while True:
        message = client.genie.get_message(space_id=space_id, conversation_id=conversation_id, message_id=message_id)
        status = message.status.value if message.status else "UNKNOWN"
        if status in TERMINAL_GENIE:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeout(f"Genie did not answer within {timeout_s:g}s (last status {status})", timeout_s)
        sleep(min(interval, remaining))
        interval = min(poll_max_s, interval * 1.5)
    if status != "COMPLETED":
        reason = message.error.error if message.error and message.error.error else status
        raise GenieFailed(f"Genie message {status}: {reason}")
    answer: dict[str, Any] = {
        "kind": "text",
        "sql": None,
        "text": None,
        "row_count": None,
        "truncated": False,
        "conversation_id": conversation_id,
        "message_id": message_id,
    }
    for attachment in message.attachments or []:
        if attachment.query and attachment.query.query:
            meta = attachment.query.query_result_metadata
            answer.update(
                kind="sql",
                sql=attachment.query.query,
                row_count=meta.row_count if meta else None,
                truncated=bool(meta and meta.is_truncated),
            )
            break
        if attachment.text and attachment.text.content and answer["text"] is None:
            answer["text"] = attachment.text.content
    return answer


# JSON_ARRAY cells are text; integers and booleans become Python values, DOUBLE a float, and DECIMAL stays
# text so no digit is lost (tasks.values reads it as a Decimal when comparing).
_CASTS: dict[str, Callable[[str], Any]] = {
    "LONG": int,
    "INT": int,
    "SHORT": int,
    "BYTE": int,
    "DOUBLE": float,
    "FLOAT": float,
    "BOOLEAN": lambda v: v.lower() == "true",
}


def run_sql(
    client: WorkspaceClient,
    warehouse_id: str,
    sql: str,
    timeout_s: float,
    row_limit: int = GENIE_ROW_CAP,
    sleep: Callable[[float], None] = time.sleep,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one statement and return its rows, or the warehouse's error as a value.

    `parameters` bind the statement's named markers (:name): str, int, float, bool or None (NULL).

    A statement that fails in the warehouse (bad SQL, refused write) is a *result*, `{"error": ...}`,
    not an exception: rerunning it would fail the same way. Only transport problems raise.

    Returns:
        {"columns": [...], "types": [Databricks type_name...], "rows": [[...]], "row_count": n,
        "truncated": bool} or {"error": message}
    """
    deadline = time.monotonic() + timeout_s
    wait = "0s" if timeout_s < 5 else f"{min(50, int(timeout_s))}s"
    response = client.statement_execution.execute_statement(
        statement=sql,
        warehouse_id=warehouse_id,
        wait_timeout=wait,
        row_limit=row_limit,
        on_wait_timeout=ExecuteStatementRequestOnWaitTimeout.CONTINUE,
        format=Format.JSON_ARRAY,
        disposition=Disposition.INLINE,
        parameters=[_parameter(k, v) for k, v in parameters.items()] if parameters else None,
    )
    interval = 0.05
    statement_id = response.statement_id or ""
    while response.status and response.status.state in (StatementState.PENDING, StatementState.RUNNING):
        if time.monotonic() >= deadline:
            client.statement_execution.cancel_execution(statement_id)
            raise CallTimeout(f"statement did not finish within {timeout_s:g}s", timeout_s)
        sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(1.0, interval * 2)
        response = client.statement_execution.get_statement(statement_id)
    state = response.status.state if response.status else None
    if state != StatementState.SUCCEEDED:
        error = response.status.error if response.status else None
        return {"error": (error.message if error and error.message else f"statement ended {state}")}
    if response.manifest is None or response.manifest.schema is None:
        raise InvalidResponse("statement succeeded without a result manifest")
    columns = response.manifest.schema.columns or []
    types = [c.type_name.value if c.type_name else "STRING" for c in columns]
    casts = [_CASTS.get(t, str) for t in types]
    data = (response.result.data_array if response.result else None) or []
    rows = [[None if v is None else cast(v) for cast, v in zip(casts, row, strict=False)] for row in data]
    return {
        "columns": [c.name for c in columns],
        "types": types,
        "rows": rows,
        "row_count": len(rows),
        "truncated": bool(response.manifest.truncated),
    }


def _parameter(name: str, value: Any) -> StatementParameterListItem:
    if value is None:
        return StatementParameterListItem(name=name)
    if isinstance(value, bool):
        return StatementParameterListItem(name=name, value="true" if value else "false", type="BOOLEAN")
    if isinstance(value, int):
        return StatementParameterListItem(name=name, value=str(value), type="BIGINT")
    if isinstance(value, float):
        return StatementParameterListItem(name=name, value=repr(value), type="DOUBLE")
    return StatementParameterListItem(name=name, value=str(value), type="STRING")


def chat(
    client: WorkspaceClient, endpoint: str, prompt: str, *, system: str | None = None, max_tokens: int = 4096
) -> dict[str, Any]:
    """One chat completion. Returns {"content", "prompt_tokens", "completion_tokens"}."""
    messages = [ChatMessage(role=ChatMessageRole.SYSTEM, content=system)] if system else []
    messages.append(ChatMessage(role=ChatMessageRole.USER, content=prompt))
    response = client.serving_endpoints.query(name=endpoint, messages=messages, max_tokens=max_tokens, temperature=0.0)
    if not response.choices or response.choices[0].message is None:
        raise InvalidResponse(f"endpoint {endpoint} returned no choices")
    usage = response.usage
    return {
        "content": response.choices[0].message.content or "",
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }
