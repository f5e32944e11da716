"""The sandbox workspace, driven by the real databricks-sdk over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import platform as errors
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from databricks.sdk.service.sql import StatementState

from blocks.workspace import DatabricksWorkspace
from tasks.errors import CallTimeout, ConnectionFailed, RateLimited, ServerError, classify

WAREHOUSE = "sandbox-warehouse"
CHAT = "databricks-meta-llama-3-3-70b-instruct"
EMBED = "databricks-gte-large-en"


def test_well_known_config_needs_no_token(sb):
    body = httpx.get(f"{sb.host}/.well-known/databricks-config").json()
    assert body["workspace_id"]


def test_wrong_token_is_rejected_with_401(sb):
    bad = WorkspaceClient(host=sb.host, token="not-the-token")
    with pytest.raises(errors.Unauthenticated, match="Invalid access token"):
        bad.genie.get_space("retail")


def test_statement_returns_json_array_with_manifest(client):
    r = client.statement_execution.execute_statement(
        statement="SELECT city, COUNT(*) AS n FROM customers GROUP BY city ORDER BY city", warehouse_id=WAREHOUSE
    )
    assert r.status.state == StatementState.SUCCEEDED
    assert [c.name for c in r.manifest.schema.columns] == ["city", "n"]
    assert r.manifest.schema.columns[1].type_name.value == "LONG"
    assert r.result.data_array[0] == ["Busan", r.result.data_array[0][1]]
    assert sum(int(row[1]) for row in r.result.data_array) == 500


def test_slow_statement_is_pending_then_succeeds(sb, client):
    sb.set_faults("sql", latency_ms=1500)
    r = client.statement_execution.execute_statement(
        statement="SELECT 1 AS one", warehouse_id=WAREHOUSE, wait_timeout="0s"
    )
    assert r.status.state in (StatementState.PENDING, StatementState.RUNNING)
    time.sleep(1.6)
    done = client.statement_execution.get_statement(r.statement_id)
    assert done.status.state == StatementState.SUCCEEDED
    assert done.result.data_array == [["1"]]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO customers VALUES (1)",
        "DELETE FROM orders",
        "DROP TABLE stores",
        "CREATE TABLE x (a INT)",
        "UPDATE products SET unit_price = 0",
    ],
)
def test_writes_are_rejected(client, sql):
    r = client.statement_execution.execute_statement(statement=sql, warehouse_id=WAREHOUSE)
    assert r.status.state == StatementState.FAILED
    assert "read-only" in r.status.error.message


def test_malformed_statement_fails_with_the_warehouse_error(client):
    r = client.statement_execution.execute_statement(statement="SELEC nothing", warehouse_id=WAREHOUSE)
    assert r.status.state == StatementState.FAILED
    assert "PARSE_SYNTAX_ERROR" in r.status.error.message


def test_unknown_warehouse_is_404(client):
    with pytest.raises(errors.NotFound, match="Warehouse nope does not exist"):
        client.statement_execution.execute_statement(statement="SELECT 1", warehouse_id="nope")


def test_genie_conversation_goes_through_statuses_to_sql(sb, client):
    sb.set_faults("genie", latency_ms=600)
    started = client.genie.start_conversation(space_id="retail", content="How many customers do we have?").response
    first = client.genie.get_message("retail", started.conversation_id, started.message_id)
    assert first.status.value in ("SUBMITTED", "FILTERING_CONTEXT", "ASKING_AI", "EXECUTING_QUERY")
    time.sleep(0.7)
    done = client.genie.get_message("retail", started.conversation_id, started.message_id)
    assert done.status.value == "COMPLETED"
    query = done.attachments[0].query
    assert "customers" in query.query.lower()
    result = client.genie.get_message_attachment_query_result(
        "retail", started.conversation_id, started.message_id, done.attachments[0].attachment_id
    )
    assert result.statement_response.manifest.schema.column_count >= 1
    follow = client.genie.create_message_and_wait("retail", started.conversation_id, "How many orders were cancelled?")
    assert follow.status.value == "COMPLETED"
    assert sb.stats()["genie"]["calls"] == 2


def test_genie_failed_fault_ends_message_failed(sb, client):
    sb.set_faults("genie", script=["genie_failed"])
    m = client.genie.start_conversation(space_id="retail", content="How many customers do we have?").response
    assert client.genie.get_message("retail", m.conversation_id, m.message_id).status.value == "FAILED"


def test_genie_answers_depend_on_space_configuration(client):
    """A question whose needs the bare space lacks is answered with other SQL than the full space gives."""
    question = "서울에 사는 고객은 몇 명인가요?"
    full = client.genie.start_conversation_and_wait(space_id="retail", content=question)
    bare = client.genie.start_conversation_and_wait(space_id="retail-bare", content=question)
    assert "'Seoul'" in full.attachments[0].query.query
    assert "'Seoul'" not in bare.attachments[0].query.query


def test_space_management_create_update_trash(client):
    prod = client.genie.get_space("retail", include_serialized_space=True)
    copy = client.genie.create_space(warehouse_id=WAREHOUSE, serialized_space=prod.serialized_space, title="dev copy")
    updated = client.genie.update_space(copy.space_id, title="dev copy 2", etag=copy.etag)
    assert updated.title == "dev copy 2"
    client.genie.trash_space(copy.space_id)
    with pytest.raises(errors.NotFound, match=f"Genie space {copy.space_id} does not exist"):
        client.genie.get_space(copy.space_id)


def test_unknown_space_is_404(client):
    with pytest.raises(errors.NotFound, match="Genie space nope does not exist"):
        client.genie.start_conversation(space_id="nope", content="hi")


def test_chat_model_answers_in_the_requested_shape(client):
    prompt = '```json\n{"task": "enrich", "items": [{"id": "r1", "text": "distributed consensus strategy"}]}\n```'
    r = client.serving_endpoints.query(CHAT, messages=[ChatMessage(role=ChatMessageRole.USER, content=prompt)])
    assert (
        r.choices[0].message.content
        == '[{"id": "r1", "tldr": "distributed consensus strategy", "challenge": "expert"}]'
    )
    assert r.usage.total_tokens > 0


def test_embeddings_put_similar_texts_near(client):
    texts = ["monthly revenue by store", "revenue per store each month", "customer sign-up dates"]
    vectors = [d.embedding for d in client.serving_endpoints.query(EMBED, input=texts).data]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert len(vectors[0]) == 256
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_unknown_endpoint_is_404(client):
    with pytest.raises(errors.NotFound, match="Endpoint with name 'nope' does not exist"):
        client.serving_endpoints.query("nope", input=["x"])


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("429", RateLimited),
        ("500", ServerError),
        ("502", ServerError),  # a gateway's HTML page: transient, though the SDK has no class for it
        ("503", ServerError),  # Temporarily Unavailable: a server's failure, not our rate (it still waits)
        ("reset", ConnectionFailed),
        ("hang", CallTimeout),
    ],
)
def test_transport_faults_reach_the_client_once_without_sdk_retries(sb, fault, expected):
    sb.set_faults("sql", script=[fault], hang_s=30)
    client = DatabricksWorkspace(host=sb.host, token=sb.token).client(1.5)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        client.statement_execution.execute_statement(statement="SELECT 1", warehouse_id=WAREHOUSE)
    error = classify(info.value, 1.5)
    assert isinstance(error, expected)
    assert time.monotonic() - t0 < 3
    assert sb.stats()["sql"]["calls"] == 1  # the SDK did not retry behind our back
    if fault in ("429", "503"):
        assert error.retry_after_s == 1  # the sandbox's Retry-After


def test_429_carries_retry_after_header(sb):
    sb.set_faults("chat", script=["429"], retry_after_s=7)
    r = httpx.post(
        f"{sb.host}/serving-endpoints/{CHAT}/invocations",
        json={"messages": []},
        headers={"Authorization": f"Bearer {sb.token}"},
    )
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"


@pytest.mark.parametrize("fault", ["malformed", "missing_id", "extra_id", "bad_enum"])
def test_content_faults_corrupt_the_model_reply(sb, client, fault):
    sb.set_faults("chat", script=[fault])
    items = [{"id": f"r{i}", "text": f"row {i}"} for i in range(3)]
    import json as _json

    prompt = _json.dumps({"task": "enrich", "items": items})
    content = (
        client.serving_endpoints.query(CHAT, messages=[ChatMessage(role=ChatMessageRole.USER, content=prompt)])
        .choices[0]
        .message.content
    )
    if fault == "malformed":
        with pytest.raises(ValueError):
            _json.loads(content)
        return
    reply = _json.loads(content)
    ids = [e["id"] for e in reply]
    if fault == "missing_id":
        assert ids == ["r1", "r2"]
    elif fault == "extra_id":
        assert ids == ["r0", "r1", "r2", "sandbox-extra-id"]
    else:
        assert reply[0]["challenge"] == "not-a-valid-value"
    assert sb.stats()["chat"]["faults"] == {fault: 1}


def test_admin_rejects_unknown_fault_group(sb):
    r = httpx.put(f"{sb.host}/sandbox/faults/nope", json={}, headers={"Authorization": f"Bearer {sb.token}"})
    assert r.status_code == 404


def test_port_in_use_gives_a_clear_error(sb):
    from sandbox import Sandbox, SandboxError

    with pytest.raises(SandboxError, match=f"port {sb.port} on 127.0.0.1 is already in use"):
        Sandbox(port=sb.port)


def test_a_retry_delay_in_the_error_details_is_the_wait_and_a_bare_503_is_a_server_error():
    """Databricks' structured RetryInfo detail (the SDK's public error details) sets the wait; a 503 without a
    Retry-After is a failing server, not a rate limit (databricks-sdk defaults its retry_after_secs to 1)."""
    from databricks.sdk import errors as sdk_errors

    detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "7s"}
    limited = classify(sdk_errors.TooManyRequests("slow down", details=[detail]))
    assert isinstance(limited, RateLimited) and limited.retry_after_s == 7
    unavailable = classify(sdk_errors.TemporarilyUnavailable("try later"))
    assert isinstance(unavailable, ServerError) and unavailable.retry_after_s is None


def _invoke(sb: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {sb.token}"}
    return httpx.post(f"{sb.host}/serving-endpoints/{CHAT}/invocations", json=body, headers=headers, timeout=30)


def test_a_hidden_concurrency_capacity_answers_429_beyond_it(sb: Any) -> None:
    """Capacity mode: beyond `capacity_concurrent` calls in flight the endpoint answers 429 with Retry-After,
    as a real serving endpoint does when its pool is full; the calls within it are served."""
    from concurrent.futures import ThreadPoolExecutor

    sb.set_faults("chat", capacity_concurrent=2, latency_ms=500, retry_after_s=3)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: _invoke(sb), range(5)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 429, 429, 429], statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "3" and refused.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    stats = sb.stats()["chat"]
    assert stats["max_in_flight"] == 2 and stats["faults"] == {"capacity": 3} and stats["calls"] == 5


def test_a_hidden_rate_capacity_says_when_the_next_call_is_taken(sb: Any) -> None:
    sb.set_faults("chat", capacity_rpm=3)
    assert [_invoke(sb).status_code for _ in range(3)] == [200, 200, 200]
    refused = _invoke(sb)
    assert refused.status_code == 429
    assert 58 <= int(refused.headers["retry-after"]) <= 60  # when the first of the minute's three drops out
