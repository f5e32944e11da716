"""The strict sandbox enforces what a real workspace enforces, and the client obeys it.

Each contract is read from Databricks' documentation or databricks-sdk's source: responses round-trip
through the SDK's dataclasses with no field lost; serialized_space rules; chunked INLINE results and the
25 MiB INLINE cap; Genie polls, conversations, parameters and expiry; exact BIGINT and DECIMAL.
"""

from __future__ import annotations

import copy
import inspect
import json
import threading
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from databricks.sdk.errors import InvalidParameterValue
from databricks.sdk.service import dashboards, iam, serving, sql

from sandbox.genie import bare_configuration, full_configuration, load_brain
from tasks.calls import ask_genie, run_sql
from tasks.compare import Rules, compare
from tasks.errors import InvalidResponse
from tasks.improve import apply_fixes
from tasks.resilience import alongside, later
from tasks.space_config import problems

WAREHOUSE = "sandbox-warehouse"


def _http(sb: Any) -> httpx.Client:
    return httpx.Client(base_url=sb.host, headers={"Authorization": f"Bearer {sb.token}"}, timeout=30)


def _round_trips(cls: Any, body: dict[str, Any], sdk_misses: tuple[str, ...] = ()) -> None:
    """The SDK reads every field of `body` and writes it back unchanged (`sdk_misses`: fields a real endpoint
    sends that this SDK version reads under another name)."""
    again = cls.from_dict(body).as_dict()
    differences = [d for d in _differences(body, again) if not any(d.startswith(f"{m}:") for m in sdk_misses)]
    assert not differences, f"{cls.__name__}: {differences}"


def _differences(sent: Any, read: Any, where: str = "") -> list[str]:
    if isinstance(sent, dict) and isinstance(read, dict):
        found = [f"{where}.{k}: lost" for k in sent if k not in read]
        return found + [d for k in sent if k in read for d in _differences(sent[k], read[k], f"{where}.{k}")]
    if isinstance(sent, list) and isinstance(read, list) and len(sent) == len(read):
        return [d for n, (a, b) in enumerate(zip(sent, read, strict=True)) for d in _differences(a, b, f"{where}[{n}]")]
    return [] if sent == read else [f"{where}: {str(sent)[:80]} read as {str(read)[:80]}"]


def test_every_route_answers_in_the_sdks_shapes(sb):
    with _http(sb) as http:
        _round_trips(iam.User, http.get("/api/2.0/preview/scim/v2/Me").json())
        _round_trips(dashboards.GenieListSpacesResponse, http.get("/api/2.0/genie/spaces").json())
        _round_trips(
            dashboards.GenieSpace,
            http.get("/api/2.0/genie/spaces/retail", params={"include_serialized_space": "true"}).json(),
        )
        started = http.post("/api/2.0/genie/spaces/retail/start-conversation", json={"content": "x"}).json()
        _round_trips(dashboards.GenieStartConversationResponse, started)
        conversation = f"/api/2.0/genie/spaces/retail/conversations/{started['conversation_id']}"
        message = http.get(f"{conversation}/messages/{started['message_id']}").json()
        _round_trips(dashboards.GenieMessage, message)
        _round_trips(
            dashboards.GenieListConversationsResponse, http.get("/api/2.0/genie/spaces/retail/conversations").json()
        )
        follow = http.post(f"{conversation}/messages", json={"content": "and per city?"}).json()
        _round_trips(dashboards.GenieMessage, follow)
        asked = http.post(
            "/api/2.0/genie/spaces/retail/start-conversation", json={"content": "How many customers do we have?"}
        )
        done = asked.json()
        answered = f"/api/2.0/genie/spaces/retail/conversations/{done['conversation_id']}/messages/{done['message_id']}"
        for _ in range(100):
            if http.get(answered).json()["status"] == "COMPLETED":
                break
        attachment = http.get(answered).json()["attachments"][0]["attachment_id"]
        result = http.get(f"{answered}/attachments/{attachment}/query-result").json()
        _round_trips(dashboards.GenieGetMessageQueryResultResponse, result)
        assert http.delete(conversation).status_code == 200
        http.delete(f"/api/2.0/genie/spaces/retail/conversations/{done['conversation_id']}").raise_for_status()
        config = json.dumps(bare_configuration())
        space = http.post("/api/2.0/genie/spaces", json={"warehouse_id": WAREHOUSE, "serialized_space": config}).json()
        _round_trips(dashboards.GenieSpace, space)
        renamed = http.patch(f"/api/2.0/genie/spaces/{space['space_id']}", json={"title": "renamed"}).json()
        _round_trips(dashboards.GenieSpace, renamed)
        stale = http.patch(f"/api/2.0/genie/spaces/{space['space_id']}", json={"title": "x", "etag": space["etag"]})
        assert stale.status_code == 409 and stale.json()["error_code"] == "RESOURCE_CONFLICT"
        http.delete(f"/api/2.0/genie/spaces/{space['space_id']}").raise_for_status()

        sb.set_contracts(chunk_bytes=2000)
        body = {"statement": "SELECT * FROM products", "warehouse_id": WAREHOUSE, "wait_timeout": "10s"}
        statement = http.post("/api/2.0/sql/statements", json=body).json()
        _round_trips(sql.StatementResponse, statement)
        assert statement["result"]["next_chunk_index"] == 1
        chunk = http.get(f"/api/2.0/sql/statements/{statement['statement_id']}/result/chunks/1").json()
        _round_trips(sql.ResultData, chunk)
        linked = http.post("/api/2.0/sql/statements", json={**body, "disposition": "EXTERNAL_LINKS"}).json()
        _round_trips(sql.StatementResponse, linked)
        _round_trips(sql.GetWarehouseResponse, http.get(f"/api/2.0/sql/warehouses/{WAREHOUSE}").json())

        endpoint = "databricks-meta-llama-3-3-70b-instruct"
        _round_trips(serving.ServingEndpointDetailed, http.get(f"/api/2.0/serving-endpoints/{endpoint}").json())
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
        answer = http.post(f"/serving-endpoints/{endpoint}/invocations", json=chat).json()
        # chat endpoints answer OpenAI's "finish_reason"; databricks-sdk 0.156 reads "finishReason"
        _round_trips(serving.QueryEndpointResponse, answer, sdk_misses=(".choices[0].finish_reason",))
        vectors = http.post("/serving-endpoints/databricks-gte-large-en/invocations", json={"input": ["a", "b"]}).json()
        _round_trips(serving.QueryEndpointResponse, vectors)


def test_the_clients_requests_use_only_the_sdks_fields(sb, client):
    """What goes over the wire is what the SDK's typed methods send: no invented field."""
    run_sql(client, WAREHOUSE, "SELECT :n AS n", 10, parameters={"n": 3})
    ask_genie(client, "retail", "How many customers do we have?", 10, 0.05, 0.1)
    statement = sb.requests("sql")[-1]
    execute = inspect.signature(client.statement_execution.execute_statement).parameters
    assert set(statement["fields"]) <= set(execute), statement["fields"]
    asked = sb.requests("genie")[-1]
    assert set(asked["fields"]) <= set(inspect.signature(client.genie.start_conversation).parameters)


# --- serialized_space: one case per documented rule, in the shapes improve used to write -------------------


def _broken(rule: str) -> dict[str, Any]:
    config = full_configuration(load_brain())
    ins = config["instructions"]
    if rule == "id not hex":
        ins["text_instructions"][0]["id"] = "batchflows"
    elif rule == "ids unsorted":
        ins["join_specs"].reverse()
    elif rule == "two text instructions":
        ins["text_instructions"].append({"id": "f" * 32, "content": ["more"]})
    elif rule == "join without aliases":
        ins["join_specs"][0] = {
            "id": ins["join_specs"][0]["id"],
            "left": {"identifier": "orders.customer_id"},
            "right": {"identifier": "customers.customer_id"},
            "sql": ["orders.customer_id = customers.customer_id"],
        }
    elif rule == "join predicate not on aliases":
        ins["join_specs"][0]["sql"] = ["samples.retail.orders.customer_id = c.customer_id"]
    elif rule == "text not a list":
        ins["sql_snippets"]["measures"][0]["sql"] = "SUM(quantity)"
    elif rule == "tables unsorted":
        config["data_sources"]["tables"].reverse()
    elif rule == "columns unsorted":
        config["data_sources"]["tables"][0]["column_configs"] = [
            {"column_name": "b", "description": ["x"]},
            {"column_name": "a", "description": ["y"]},
        ]
    elif rule == "string too long":
        ins["text_instructions"][0]["content"] = ["x" * 25_001]
    elif rule == "id used twice":
        ins["sql_snippets"]["measures"].append({**ins["sql_snippets"]["measures"][0], "alias": "again"})
    return config


RULES = {
    "id not hex": "32-character lowercase hex",
    "ids unsorted": "sorted by id",
    "two text instructions": "at most one",
    "join without aliases": "alias",
    "join predicate not on aliases": "alias",
    "text not a list": "list of strings",
    "tables unsorted": "sorted by identifier",
    "columns unsorted": "sorted by column_name",
    "string too long": "25000",
    "id used twice": "used twice",
}


@pytest.mark.parametrize("rule", RULES)
def test_a_workspace_refuses_each_broken_rule(client, rule):
    config = _broken(rule)
    with pytest.raises(InvalidParameterValue, match=RULES[rule]):
        client.genie.create_space(warehouse_id=WAREHOUSE, serialized_space=json.dumps(config), title=rule)
    assert problems(config), f"the client's own reading lets '{rule}' through"


def test_every_kind_of_fix_leaves_a_configuration_the_workspace_accepts(client):
    fixes: list[dict[str, Any]] = [
        {"category": "instruction", "text": "Fiscal years start in April."},
        {"category": "instruction", "text": "VIP customers spend over 10,000."},
        {"category": "join_spec", "left": "orders.store_id", "right": "stores.store_id"},
        {"category": "join_spec", "left": "order_items.product_id", "right": "products.product_id"},
        {"category": "sql_snippet", "snippet_type": "measure", "alias": "revenue", "sql": "SUM(quantity)"},
        {"category": "sample_query", "question": "How many stores?", "sql": "SELECT COUNT(*) FROM stores"},
        {"category": "metadata", "table": "orders", "column": "status", "description": "Order state", "synonyms": []},
        {"category": "metadata", "table": "orders", "column": "order_date", "description": "Placed", "synonyms": []},
    ]
    config, applied, skipped = apply_fixes(bare_configuration(), fixes)
    assert len(applied) == len(fixes) and not skipped
    assert len(config["instructions"]["text_instructions"]) == 1 and problems(config) == []
    created = client.genie.create_space(warehouse_id=WAREHOUSE, serialized_space=json.dumps(config), title="fixed")
    again, applied_again, _ = apply_fixes(copy.deepcopy(config), fixes)
    assert again == config and applied_again == []  # the same fixes twice: same ids, nothing new
    client.genie.trash_space(created.space_id)


# --- statement results: chunks, the INLINE cap, external links, exact numbers ---------------------------


def test_a_result_over_many_chunks_is_read_in_full(sb, client):
    result = run_sql(client, WAREHOUSE, "SELECT i, i * 2 AS d FROM range(20000) t(i) ORDER BY i", 30, row_limit=50_000)
    assert result["chunks"] >= 3 and result["row_count"] == 20_000 and not result["truncated"]
    assert result["rows"][-1] == [19_999, 39_998]
    capped = run_sql(client, WAREHOUSE, "SELECT i FROM range(20000) t(i)", 30, row_limit=12_345)
    assert capped["row_count"] == 12_345 and capped["truncated"]  # cut at the cap, and saying so


def test_a_result_over_25_mib_comes_through_external_links(sb, client):
    query = "SELECT i, repeat('x', 6000) AS pad FROM range(5000) t(i)"
    result = run_sql(client, WAREHOUSE, query, 60)
    assert result["row_count"] == 5000 and not result["truncated"]
    assert {len(r[1]) for r in result["rows"]} == {6000} and sorted(r[0] for r in result["rows"]) == list(range(5000))
    dispositions = [r["disposition"] for r in sb.requests("sql")]
    assert dispositions == ["INLINE", "EXTERNAL_LINKS"]  # refused INLINE at the cap, then fetched by link

    sb.set_contracts(link_ttl_s=0)  # a link read after it expired: a clear error, never a short result
    with pytest.raises(InvalidResponse, match="expired"):
        run_sql(client, WAREHOUSE, query, 60)


def test_bigint_and_decimal_beyond_2_53_compare_exactly(sb, client):
    def value(big: str, dec: str) -> dict[str, Any]:
        sql_text = f"SELECT CAST({big} AS BIGINT) AS b, CAST('{dec}' AS DECIMAL(38,10)) AS d"
        return run_sql(client, WAREHOUSE, sql_text, 10)

    expected = value("9007199254740993", "1234567890123456789012345678.1234567891")
    assert expected["rows"] == [[9007199254740993, "1234567890123456789012345678.1234567891"]]
    assert Decimal(expected["rows"][0][1]) == Decimal("1234567890123456789012345678.1234567891")
    rules = Rules()
    assert compare(expected, value("9007199254740993", "1234567890123456789012345678.1234567891"), None, rules)[0] == (
        "correct"
    )
    assert compare(expected, value("9007199254740992", "1234567890123456789012345678.1234567891"), None, rules)[0] == (
        "incorrect"
    )
    assert compare(expected, value("9007199254740993", "1234567890123456789012345678.1234567892"), None, rules)[0] == (
        "incorrect"
    )


def test_databricks_sql_runs_as_databricks_sql(client):
    """Valid Databricks SQL that DuckDB spells differently: transpiled, not refused."""
    for query in (
        "SELECT size(collect_list(city)) AS n FROM customers",
        "SELECT transform(array(1, 2, 3), x -> x + 1) AS t",
        "SELECT datediff(DATE '2024-02-01', DATE '2024-01-01') AS days",
        "SELECT nvl(NULL, 1) AS n",
    ):
        result = run_sql(client, WAREHOUSE, query, 10)
        assert "error" not in result, (query, result)
    assert run_sql(client, WAREHOUSE, "SELECT transform(array(1, 2), x -> x + 1) AS t", 10)["rows"] == [["[2, 3]"]]
    assert "error" in run_sql(client, WAREHOUSE, "SELEC 1", 10)


# --- Genie: polls on the same message, conversations deleted, a space's cap ----------------------------------


def test_poll_failures_are_retried_on_the_same_message(sb, client):
    sb.set_faults("genie", latency_ms=300)
    sb.set_faults("genie_poll", script=["503", "500", "reset", "429"])
    answer = ask_genie(client, "retail", "How many customers do we have?", 30, 0.05, 0.1)
    assert answer["kind"] == "sql" and answer["poll_errors"] == 4
    assert sb.stats()["genie"]["calls"] == 1  # 4 failed polls, 0 extra questions
    assert sb.stats()["genie_poll"]["faults"] == {"503": 1, "500": 1, "reset": 1, "429": 1}
    with _http(sb) as http:
        assert http.get("/api/2.0/genie/spaces/retail/conversations").json()["conversations"] == []


def test_inside_alongside_an_answer_does_not_wait_for_its_conversation_to_be_deleted(sb, client, monkeypatch):
    """The delete goes from a thread: the question's slot is free for the next one at once (a scoring run's
    second round waited for it). The block's end waits for it. The delete is held up for 5 s here."""
    gate = threading.Event()
    opens = threading.Timer(5, gate.set)
    delete = client.genie.delete_conversation

    def held_delete(**kwargs: Any) -> Any:
        gate.wait(10)
        return delete(**kwargs)

    monkeypatch.setattr(client.genie, "delete_conversation", held_delete)  # the SDK's call, held up
    listed = "/api/2.0/genie/spaces/retail/conversations"
    with _http(sb) as http:
        opens.start()
        with alongside():
            answer = ask_genie(client, "retail", "How many customers do we have?", 30, 0.05, 0.1)
            assert not gate.is_set()  # answered while its delete waits
            left = [c["conversation_id"] for c in http.get(listed).json()["conversations"]]
            assert left == [answer["conversation_id"]]
        assert gate.is_set()  # the block's end waited for the delete
        assert http.get(listed).json()["conversations"] == []


def test_alongside_raises_the_first_failure_of_its_work_at_its_end():
    done: list[str] = []

    def fails(what: str) -> None:
        done.append(what)
        raise RuntimeError(what)

    with pytest.raises(RuntimeError, match="first"), alongside():
        later(fails, "first")
        time.sleep(0.05)
        later(done.append, "then this")
    assert done == ["first", "then this"]
    later(done.append, "outside: at once")
    assert done[-1] == "outside: at once"


def test_polls_keep_to_their_schedule_from_the_question_whatever_each_takes(sb, client):
    """Polls at 0.1, 0.25, 0.475 s... after Genie took the question: time spent past a wait is taken off the
    next one (each used to be counted from the poll before, so every poll's time pushed all later ones back),
    and a wait overrun past the next poll's time is followed by a poll at once."""
    sb.set_faults("genie", latency_ms=600)
    asked: list[float] = []

    def overrunning(by: list[float]) -> Any:
        def sleep(seconds: float) -> None:
            asked.append(seconds)
            time.sleep(seconds + (by.pop(0) if by else 0))

        return sleep

    question = "How many customers do we have?"
    assert ask_genie(client, "retail", question, 30, 0.1, 0.5, sleep=overrunning([0.06] * 9))["kind"] == "sql"
    assert asked == pytest.approx([0.1, 0.15 - 0.06, 0.225 - 0.06, 0.3375 - 0.06], abs=0.015)
    asked.clear()
    assert ask_genie(client, "retail", question, 30, 0.1, 0.5, sleep=overrunning([0.3]))["kind"] == "sql"
    assert asked[:3] == pytest.approx([0.1, 0.0, 0.225], abs=0.015)


def test_genie_is_first_polled_after_the_first_interval_not_at_once(sb, client):
    """Genie takes seconds to answer: a poll right after the question only adds a request to its API."""
    sb.set_faults("genie", latency_ms=200)
    before = sb.stats()["genie_poll"]["calls"]
    assert ask_genie(client, "retail", "How many customers do we have?", 30, 0.1, 0.5)["kind"] == "sql"
    assert sb.stats()["genie_poll"]["calls"] - before == 2  # at 0.1 s and at 0.25 s, after the answer at 0.2 s


def test_a_space_holds_a_bounded_number_of_conversations(sb, client):
    sb.set_contracts(max_conversations=2)
    for _ in range(3):  # each deleted once read: the cap is never reached
        ask_genie(client, "retail", "How many customers do we have?", 30, 0.05, 0.1)
    with _http(sb) as http:
        for _ in range(2):
            http.post("/api/2.0/genie/spaces/retail/start-conversation", json={"content": "kept"}).raise_for_status()
        full = http.post("/api/2.0/genie/spaces/retail/start-conversation", json={"content": "one more"})
        assert full.status_code == 400 and full.json()["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
        for c in http.get("/api/2.0/genie/spaces/retail/conversations").json()["conversations"]:
            http.delete(f"/api/2.0/genie/spaces/retail/conversations/{c['conversation_id']}").raise_for_status()


def test_an_expired_query_result_still_gives_its_sql(sb, client):
    sb.set_contracts(result_ttl_s=0)
    answer = ask_genie(client, "retail", "How many customers do we have?", 30, 0.05, 0.1)
    assert answer["kind"] == "sql" and answer["sql"].startswith("SELECT COUNT(*)")


def test_the_client_never_asks_the_warehouse_to_wait_longer_than_it_listens(sb):
    """A 6 s HTTP client asking for a 60 s statement: it asks the server to answer at once and polls, instead
    of asking for 50 s of waiting and timing out its own read at 6 s."""
    from blocks.workspace import DatabricksWorkspace

    sb.set_faults("sql", latency_ms=8000)
    short = DatabricksWorkspace(host=sb.host, token=sb.token).client(6)
    result = run_sql(short, WAREHOUSE, "SELECT 1 AS one", 60)
    assert result["rows"] == [[1]]
    assert sb.stats()["sql"]["calls"] == 1  # polled, not resubmitted
