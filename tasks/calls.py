"""The external calls batchflows makes, each bounded by its own deadline: ask Genie, run SQL, chat.

Each returns JSON-able values (so results can be cached and reported) and raises only errors that
`tasks.errors.classify` understands. Every HTTP request carries the client's own timeout: a task timeout
cannot interrupt a blocking socket read in a worker thread (PREFECT_NOTES pitfall 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from databricks.sdk.service.sql import (
    Disposition,
    ExecuteStatementRequestOnWaitTimeout,
    Format,
    StatementParameterListItem,
    StatementState,
)

from blocks.workspace import DatabricksWorkspace
from tasks import meter
from tasks.errors import CallTimeout, InvalidResponse, NotFound, PermanentError, TransientError, classify
from tasks.resilience import later, run_logger

TERMINAL_GENIE = {"COMPLETED", "FAILED", "CANCELLED", "QUERY_RESULT_EXPIRED"}
ANSWERED_GENIE = {"COMPLETED", "QUERY_RESULT_EXPIRED"}  # an expired result still carries its SQL, which we run
GENIE_ROW_CAP = 5000
READ_AGAIN_AFTER_S = (0.2, 1.0)  # a single read that fails in transit is made again after these waits
log = logging.getLogger(__name__)
T = TypeVar("T")


def read_again(read: Callable[[], T], what: str) -> T:
    """`read()`, a single workspace read outside a phase (a space, the user, a warehouse): made again after
    `READ_AGAIN_AFTER_S` when it fails in transit (a keep-alive connection the server closed as it was
    reused, a 5xx, a 429), so a moment's hiccup does not fail the run. A timeout (it has already waited its
    time) or a refusal is raised at once, as the SDK raised it."""
    for wait in READ_AGAIN_AFTER_S:
        try:
            return read()
        except Exception as exc:
            error = classify(exc)
            if not isinstance(error, TransientError) or isinstance(error, CallTimeout):
                raise
            run_logger().info(f"reading {what} failed in transit ({error}); reading it again in {wait:g} s")
            time.sleep(min(5.0, max(wait, error.retry_after_s or 0)))
    return read()


class GenieFailed(PermanentError):
    """Genie answered the question with a FAILED message."""

    kind = "genie_error"


class GenieTimeout(PermanentError):
    """Genie's message was still not answered at the deadline. Not retried: asking again spends another of
    the workspace's few questions a minute on a question that just took the whole timeout."""

    kind = "timeout"

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class Call:
    """A phase's call as data, so that any task runner can send it to another process: a module-level
    function (pickled by its name), the workspace's connection settings, the client's timeout and the
    function's other arguments. The client is built where the call runs (`DatabricksWorkspace.client`: one
    per process, connection and timeout).

        Call(ask_genie, workspace, 60, "question", {"space_id": "retail", "timeout_s": 600})("How many orders?")

    `payload_as` names the argument a row's payload is; None when the payload is a dict of arguments.
    """

    fn: Callable[..., Any]
    workspace: DatabricksWorkspace
    timeout_s: float
    payload_as: str | None
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, payload: Any, **more: Any) -> Any:
        given = {self.payload_as: payload} if self.payload_as else payload
        return self.fn(self.workspace.client(self.timeout_s), **self.params, **more, **given)


def ask_genie(
    client: WorkspaceClient,
    space_id: str,
    question: str,
    timeout_s: float,
    poll_initial_s: float = 1.0,
    poll_max_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    on_asked: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Ask one question in a new conversation, wait for Genie's answer, then delete the conversation.
    `on_asked` is told when Genie has the question, before the wait.

    Polls every `poll_initial_s`, backing off by 1.5x up to `poll_max_s` (Databricks asks for 1-5 s). A
    poll that fails in transit (5xx, 429, reset, timeout) is repeated on the same message: only asking
    costs one of the workspace's few questions a minute. The conversation is deleted once the answer is
    read (or given up on), so a space never fills up with ours: at once, or inside
    `tasks.resilience.alongside()` from one of its threads.

    Returns:
        {"kind": "sql" | "text", "sql", "text", "parameters", "row_count", "truncated", "conversation_id",
        "message_id", "poll_errors"}

    Raises:
        GenieTimeout: no terminal status within `timeout_s`.
        GenieFailed: Genie's message ended FAILED or CANCELLED.
    """
    deadline = time.monotonic() + timeout_s
    meter.count("genie")
    started: Any = client.genie.start_conversation(space_id=space_id, content=question).response
    conversation_id, message_id = started.conversation_id, started.message_id
    if on_asked is not None:
        on_asked()
    try:
        message, poll_errors = _wait_for_message(
            client, space_id, conversation_id, message_id, deadline, timeout_s, poll_initial_s, poll_max_s, sleep
        )
    finally:  # off the question's slot inside `alongside()`: the next question need not wait for it
        later(_delete_conversation, client, space_id, conversation_id)
    status = message.status.value if message.status else "UNKNOWN"
    if status not in ANSWERED_GENIE:
        reason = message.error.error if message.error and message.error.error else status
        raise GenieFailed(f"Genie message {status}: {reason}")
    answer: dict[str, Any] = {
        "kind": "text",
        "sql": None,
        "text": None,
        "parameters": None,
        "row_count": None,
        "truncated": False,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "poll_errors": poll_errors,
    }
    for attachment in message.attachments or []:
        if attachment.query and attachment.query.query:
            meta = attachment.query.query_result_metadata
            answer.update(
                kind="sql",
                sql=attachment.query.query,
                parameters=_typed_parameters(attachment.query.parameters) or None,
                row_count=meta.row_count if meta else None,
                truncated=bool(meta and meta.is_truncated),
            )
            break
        if attachment.text and attachment.text.content and answer["text"] is None:
            answer["text"] = attachment.text.content
    return answer


def _wait_for_message(
    client: WorkspaceClient,
    space_id: str,
    conversation_id: str,
    message_id: str,
    deadline: float,
    timeout_s: float,
    interval: float,
    poll_max_s: float,
    sleep: Callable[[float], None],
) -> tuple[Any, int]:
    """(the message once terminal, polls that failed in transit and were repeated).

    The polls keep to a schedule counted from now, when Genie has the question: the first after `interval`
    (Genie takes seconds to answer: a poll at once only adds a request), then each gap 1.5x the one before.
    A poll's own time does not push the later ones back, so an answer is seen when its poll comes due, not a
    poll's latency later for every poll before it. A poll that overran its gap is followed at once, and the
    schedule goes on from there."""
    poll_errors = 0
    status = "UNKNOWN"
    due = time.monotonic()
    while True:
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            raise GenieTimeout(f"Genie did not answer within {timeout_s:g}s (last status {status})", timeout_s)
        due = max(due + interval, now)
        sleep(min(due - now, remaining))
        interval = min(poll_max_s, interval * 1.5)
        try:
            message = client.genie.get_message(
                space_id=space_id, conversation_id=conversation_id, message_id=message_id
            )
            status = message.status.value if message.status else "UNKNOWN"
            if status in TERMINAL_GENIE:
                return message, poll_errors
        except Exception as exc:  # classified below: only transit failures are polled again
            error = classify(exc)
            if isinstance(error, NotFound):  # this message is gone, not the space: this row fails, not the phase
                raise GenieFailed(f"Genie message {message_id} disappeared while polling: {error}") from exc
            if not isinstance(error, TransientError):
                raise error from exc
            poll_errors += 1
            status = f"poll failed: {error}"


def _delete_conversation(client: WorkspaceClient, space_id: str, conversation_id: str) -> None:
    """Best effort: a conversation left behind costs space in the space, not correctness."""
    try:
        client.genie.delete_conversation(space_id=space_id, conversation_id=conversation_id)
    except Exception as exc:  # logged; the answer is already read
        log.warning(f"could not delete Genie conversation {conversation_id} in space {space_id}: {classify(exc)}")


def _typed_parameters(parameters: Any) -> dict[str, dict[str, Any]]:
    """A query attachment's parameters as {keyword: {"value", "type"}} for `run_sql`."""
    return {
        p.keyword: {"value": p.value, "type": (p.sql_type or "STRING").upper()} for p in parameters or [] if p.keyword
    }


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
    """Run one statement and return all its rows (every chunk), or the warehouse's error as a value.

    `parameters` bind the statement's named markers (:name): str, int, float, bool or None (NULL), or
    {"value": text, "type": SQL type} as Genie's query attachments give them. Results come INLINE; one
    over the API's 25 MiB INLINE limit is run again with EXTERNAL_LINKS and read from its links. At most
    `row_limit` rows are returned, and `truncated` says when the warehouse had more.

    A statement that fails in the warehouse (bad SQL, refused write) is a *result*, `{"error": ...}`,
    not an exception: rerunning it would fail the same way. Only transport problems raise.

    Returns:
        {"columns": [...], "types": [Databricks type_name...], "rows": [[...]], "row_count": n,
        "truncated": bool, "chunks": n} or {"error": message}
    """
    deadline = time.monotonic() + timeout_s
    bound = [_parameter(k, v) for k, v in parameters.items()] if parameters else None
    response = _execute(client, warehouse_id, sql, timeout_s, deadline, row_limit, bound, Disposition.INLINE, sleep)
    if _inline_limit_exceeded(response):
        response = _execute(
            client, warehouse_id, sql, timeout_s, deadline, row_limit, bound, Disposition.EXTERNAL_LINKS, sleep
        )
    state = response.status.state if response.status else None
    if state != StatementState.SUCCEEDED:
        error = response.status.error if response.status else None
        return {"error": (error.message if error and error.message else f"statement ended {state}")}
    if response.manifest is None or response.manifest.schema is None:
        raise InvalidResponse("statement succeeded without a result manifest")
    columns = response.manifest.schema.columns or []
    types = [c.type_name.value if c.type_name else "STRING" for c in columns]
    casts = [_CASTS.get(t, str) for t in types]
    rows: list[list[Any]] = []
    chunk, chunks = response.result, 0
    while chunk is not None:
        chunks += 1
        rows += [[None if v is None else cast(v) for cast, v in zip(casts, row, strict=False)] for row in _data(chunk)]
        # INLINE chunks name the next one; with EXTERNAL_LINKS each link does
        following = chunk.external_links[-1].next_chunk_index if chunk.external_links else chunk.next_chunk_index
        if following is None or len(rows) >= row_limit:
            break
        if time.monotonic() >= deadline:
            raise CallTimeout(f"statement result not read within {timeout_s:g}s ({len(rows)} rows so far)", timeout_s)
        chunk = client.statement_execution.get_statement_result_chunk_n(response.statement_id or "", following)
    total = response.manifest.total_row_count
    if total is not None and len(rows) < min(total, row_limit):  # never a short result passed off as whole
        raise InvalidResponse(f"read {len(rows)} of the statement's {total} rows: its chunks ended early")
    truncated = bool(response.manifest.truncated) or len(rows) > row_limit
    return {
        "columns": [c.name for c in columns],
        "types": types,
        "rows": rows[:row_limit],
        "row_count": min(len(rows), row_limit),
        "truncated": truncated,
        "chunks": chunks,
    }


def _execute(
    client: WorkspaceClient,
    warehouse_id: str,
    sql: str,
    timeout_s: float,
    deadline: float,
    row_limit: int,
    parameters: list[StatementParameterListItem] | None,
    disposition: Disposition,
    sleep: Callable[[float], None],
) -> Any:
    """Submit a statement and poll it until it leaves PENDING/RUNNING (cancelled at the deadline). The
    server is asked to wait no longer than the client's HTTP timeout allows, so the answer always comes."""
    http_timeout = float(client.config.http_timeout_seconds or 60)
    wait_s = int(min(50, timeout_s, http_timeout - 5))
    meter.count("sql")
    response = client.statement_execution.execute_statement(
        statement=sql,
        warehouse_id=warehouse_id,
        wait_timeout=f"{wait_s}s" if wait_s >= 5 else "0s",
        row_limit=row_limit,
        on_wait_timeout=ExecuteStatementRequestOnWaitTimeout.CONTINUE,
        format=Format.JSON_ARRAY,
        disposition=disposition,
        parameters=parameters,
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
    return response


def _inline_limit_exceeded(response: Any) -> bool:
    error = response.status.error if response.status and response.status.state == StatementState.FAILED else None
    return bool(error and error.message and "disposition=EXTERNAL_LINKS" in error.message)


def _data(chunk: Any) -> list[list[Any]]:
    """A chunk's rows: inline, or downloaded from its external links (presigned: sent without our token)."""
    if not chunk.external_links:
        return chunk.data_array or []
    rows: list[list[Any]] = []
    for link in chunk.external_links:
        reply = requests.get(link.external_link, headers=link.http_headers or {}, timeout=120)
        if reply.status_code != 200:
            raise InvalidResponse(
                f"result chunk {link.chunk_index} link answered {reply.status_code}: {reply.text[:200]}"
            )
        rows += reply.json()
    return rows


def _parameter(name: str, value: Any) -> StatementParameterListItem:
    if isinstance(value, dict):  # already typed: {"value": text or None, "type": SQL type}
        text = value.get("value")
        return StatementParameterListItem(name=name, value=None if text is None else str(text), type=value.get("type"))
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
    meter.count("invocations")
    response = client.serving_endpoints.query(name=endpoint, messages=messages, max_tokens=max_tokens, temperature=0.0)
    if not response.choices or response.choices[0].message is None:
        raise InvalidResponse(f"endpoint {endpoint} returned no choices")
    usage = response.usage
    return {
        "content": response.choices[0].message.content or "",
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }
