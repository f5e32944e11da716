"""The sandbox workspace's HTTP API: the Databricks REST surface databricks-sdk calls, plus /sandbox admin."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from sandbox import models
from sandbox.faults import GROUPS, FaultMiddleware, FaultSpec, Ledger, OverCapacity
from sandbox.genie import AnswerMix, Genie, normalise_question
from sandbox.space_rules import SpaceRuleError, check
from sandbox.userdata import load_answers
from sandbox.warehouse import INLINE_LIMIT_BYTES, ROW_CAP, Statement, Warehouse

CHAT_ENDPOINTS = ("databricks-meta-llama-3-3-70b-instruct", "databricks-claude-sonnet-4")
EMBEDDING_ENDPOINTS = ("databricks-gte-large-en", "databricks-bge-large-en")
WORKSPACE_ID = "1234567890123456"


class ApiError(Exception):
    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


class Contracts(BaseModel):
    """Limits a real workspace enforces, each settable at /sandbox/contracts (tests shrink them)."""

    chunk_bytes: int = Field(64 * 2**10, ge=1, description="INLINE results are split into chunks of about this size")
    inline_limit_bytes: int = Field(INLINE_LIMIT_BYTES, ge=1, description="INLINE results above this fail")
    link_ttl_s: float = Field(900, ge=0, description="how long an EXTERNAL_LINKS URL stays valid")
    cold_start_s: float | None = Field(
        None, ge=0, description="stop the warehouse; the next use starts it and it serves after this long"
    )
    max_conversations: int = Field(10_000, ge=1, description="conversations a space can hold")
    result_ttl_s: float | None = Field(
        None, ge=0, description="a COMPLETED Genie message turns QUERY_RESULT_EXPIRED this long after it answered"
    )


class Workspace:
    """Everything the sandbox knows: its token, warehouse, Genie, endpoints and ledger."""

    def __init__(
        self,
        token: str,
        seed: int = 0,
        faults: dict[str, FaultSpec] | None = None,
        mix: AnswerMix | None = None,
        allow_writes: bool = False,
        data: str | None = None,
        genie_answers: str | None = None,
    ) -> None:
        self.token = token
        self.contracts = Contracts()
        self.ledger = Ledger(seed, faults)
        self.warehouse = Warehouse(allow_writes=allow_writes, data=data)
        self.genie = Genie(seed, mix)
        self.problems = list(self.warehouse.load_problems)
        if genie_answers:
            answers, problems = load_answers(genie_answers)
            self.genie.replay(answers)
            self.problems += [f"{genie_answers}: {p}" for p in problems]

    @staticmethod
    def group_of_endpoint(name: str) -> str | None:
        if name in CHAT_ENDPOINTS:
            return "chat"
        if name in EMBEDDING_ENDPOINTS:
            return "embeddings"
        return None


def create_app(ws: Workspace) -> Any:
    """The ASGI app: FastAPI routes wrapped in the transport-fault middleware."""
    app = FastAPI(title="batchflows sandbox workspace", docs_url=None, redoc_url=None)
    app.state.ws = ws

    def refused(request: Request, status: int, why: str = "refused") -> None:
        """Count a primary request the workspace refused (bad token, unknown resource, over capacity): a call
        all the same."""
        group = request.scope.get("state", {}).get("sandbox_group")
        if group is not None:
            ws.ledger.record(group, request.url.path, status, why)

    @app.exception_handler(OverCapacity)
    async def _over_capacity(request: Request, exc: OverCapacity) -> JSONResponse:
        refused(request, 429, "capacity")
        headers = {"Retry-After": str(max(0, round(exc.wait_s)))}
        message = f"Too many requests: {exc}. Please wait and retry."
        body = {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}
        return JSONResponse(body, status_code=429, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        refused(request, exc.status)
        return JSONResponse({"error_code": exc.error_code, "message": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if (
            path.startswith(("/.well-known/", "/sandbox/external/"))
            or path == "/oidc/.well-known/oauth-authorization-server"
        ):
            return await call_next(request)
        if request.headers.get("authorization") != f"Bearer {ws.token}":
            refused(request, 401)
            return JSONResponse({"error_code": "UNAUTHENTICATED", "message": "Invalid access token."}, 401)
        return await call_next(request)

    @app.get("/.well-known/databricks-config")
    async def well_known(request: Request) -> dict[str, Any]:
        return {"workspace_id": WORKSPACE_ID, "oidc_endpoint": f"{str(request.base_url).rstrip('/')}/oidc"}

    @app.get("/api/2.0/preview/scim/v2/Me")
    async def me() -> dict[str, Any]:
        return {"id": "1001", "userName": "sandbox@example.com", "displayName": "Sandbox User", "active": True}

    _genie_routes(app, ws)
    _sql_routes(app, ws)
    _serving_routes(app, ws)
    _admin_routes(app, ws)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str) -> None:
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '/{path}'")

    return FaultMiddleware(app, ws.ledger, ws.group_of_endpoint)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "MALFORMED_REQUEST", f"Could not parse request body as JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "MALFORMED_REQUEST", "Request body must be a JSON object")
    return body


def _space(ws: Workspace, space_id: str) -> dict[str, Any]:
    space = ws.genie.spaces.get(space_id)
    if space is None:
        raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Genie space {space_id} does not exist.")
    return space


def _genie_routes(app: FastAPI, ws: Workspace) -> None:
    genie = ws.genie
    base = "/api/2.0/genie/spaces"

    async def ask(request: Request, space_id: str, conversation_id: str | None) -> dict[str, Any]:
        _space(ws, space_id)
        content = (await _json(request)).get("content")
        if not isinstance(content, str) or not content.strip():
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "content must be a non-empty string")
        if conversation_id is None and genie.conversation_count(space_id) >= ws.contracts.max_conversations:
            raise ApiError(
                400,
                "RESOURCE_LIMIT_EXCEEDED",
                f"Genie space {space_id} holds {ws.contracts.max_conversations} conversations, its limit; "
                "delete conversations to start new ones.",
            )
        if conversation_id is not None and not genie.has_conversation(space_id, conversation_id):
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Conversation {conversation_id} does not exist.")
        fields = sorted(await _json(request))
        spec = ws.ledger.spec("genie")
        ws.ledger.admit("genie")  # beyond the hidden capacity: 429 (OverCapacity); its interval opens below
        fail = ws.ledger.draw("genie", ("genie_failed",)) == "genie_failed"
        now = time.time()
        message = genie.ask(
            space_id,
            conversation_id or uuid.uuid4().hex,
            content,
            spec.latency_s(ws.ledger.rng()),
            fail,
            warehouse_at=ws.warehouse.warm_at_time(now),
        )
        ws.ledger.open_interval("genie", message.created, message.ready_at)
        ws.ledger.record(
            "genie",
            request.url.path,
            200,
            "genie_failed" if fail else "ok",
            question=content,
            outcome=message.outcome,
            message_id=message.message_id,
            conversation_id=message.conversation_id,
            fields=fields,
        )
        return {
            "conversation_id": message.conversation_id,
            "message_id": message.message_id,
            "conversation": {
                "id": message.conversation_id,
                "space_id": space_id,
                "title": content[:60],
                "created_timestamp": int(message.created * 1000),
                "last_updated_timestamp": int(message.created * 1000),
                "user_id": 1,
            },
            "message": message.as_dict(now, ws.contracts.result_ttl_s),
        }

    @app.post(base + "/{space_id}/start-conversation")
    async def start_conversation(request: Request, space_id: str) -> dict[str, Any]:
        return await ask(request, space_id, None)

    @app.post(base + "/{space_id}/conversations/{conversation_id}/messages")
    async def create_message(request: Request, space_id: str, conversation_id: str) -> dict[str, Any]:
        return (await ask(request, space_id, conversation_id))["message"]

    def message_of(space_id: str, conversation_id: str, message_id: str) -> Any:
        _space(ws, space_id)
        message = genie.messages.get(message_id)
        if message is None or message.space_id != space_id or message.conversation_id != conversation_id:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Message {message_id} does not exist.")
        return message

    @app.get(base + "/{space_id}/conversations/{conversation_id}/messages/{message_id}")
    async def get_message(request: Request, space_id: str, conversation_id: str, message_id: str) -> dict[str, Any]:
        message = message_of(space_id, conversation_id, message_id)
        ws.ledger.record("genie_poll", request.url.path, 200, "ok", message_id=message_id)
        now = time.time()
        row_count, truncated = None, False
        if message.sql is not None and message.status(now) == "COMPLETED":
            try:
                stmt = await run_in_threadpool(_query_result, ws, message.sql, message.statement_parameters())
                row_count, truncated = len(stmt.result["rows"]), stmt.result["truncated"]  # type: ignore[index]
            except ApiError:
                pass  # Genie still answers with its (broken) SQL; running it shows the error
        return message.as_dict(now, ws.contracts.result_ttl_s, row_count, truncated)

    async def query_result(request: Request, space_id: str, conversation_id: str, message_id: str) -> dict[str, Any]:
        message = message_of(space_id, conversation_id, message_id)
        status = message.as_dict(time.time(), ws.contracts.result_ttl_s)["status"]
        if status == "QUERY_RESULT_EXPIRED":
            raise ApiError(400, "INVALID_STATE", f"The query result of message {message_id} has expired.")
        if status != "COMPLETED" or message.sql is None:
            raise ApiError(400, "INVALID_STATE", f"Message {message_id} has no query result.")
        stmt = await run_in_threadpool(_query_result, ws, message.sql, message.statement_parameters())
        base_url = str(request.base_url).rstrip("/")
        return {
            "statement_response": {**stmt.as_response(time.time(), base_url), "statement_id": message.attachment_id}
        }

    for suffix in ("/attachments/{attachment_id}/query-result", "/query-result", "/query-result/{attachment_id}"):
        app.get(base + "/{space_id}/conversations/{conversation_id}/messages/{message_id}" + suffix)(query_result)
    app.post(
        base + "/{space_id}/conversations/{conversation_id}/messages/{message_id}"
        "/attachments/{attachment_id}/execute-query"
    )(query_result)

    @app.get(base + "/{space_id}/conversations")
    async def list_conversations(space_id: str, page_size: int = 100, page_token: str | None = None) -> dict[str, Any]:
        _space(ws, space_id)
        summaries = genie.conversations_of(space_id)
        start = int(page_token or 0)
        page = summaries[start : start + page_size]
        body: dict[str, Any] = {"conversations": page}
        if start + page_size < len(summaries):
            body["next_page_token"] = str(start + page_size)
        return body

    @app.delete(base + "/{space_id}/conversations/{conversation_id}")
    async def delete_conversation(space_id: str, conversation_id: str) -> dict[str, Any]:
        _space(ws, space_id)
        if not genie.delete_conversation(space_id, conversation_id):
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Conversation {conversation_id} does not exist.")
        return {}

    @app.get(base)
    async def list_spaces() -> dict[str, Any]:
        return {"spaces": [{k: v for k, v in s.items() if k != "serialized_space"} for s in genie.spaces.values()]}

    @app.get(base + "/{space_id}")
    async def get_space(space_id: str, include_serialized_space: bool = False) -> dict[str, Any]:
        space = dict(_space(ws, space_id))
        if not include_serialized_space:
            space.pop("serialized_space")
        return space

    @app.post(base)
    async def create_space(request: Request) -> dict[str, Any]:
        body = await _json(request)
        config = _parse_serialized(body.get("serialized_space"))
        if body.get("warehouse_id") not in ws.warehouse.warehouse_ids:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Unknown warehouse_id {body.get('warehouse_id')!r}")
        return genie.create_space(
            None,
            body.get("title") or "Untitled space",
            body["warehouse_id"],
            config,
            body.get("description") or "",
            body.get("parent_path"),
        )

    @app.patch(base + "/{space_id}")
    async def update_space(request: Request, space_id: str) -> dict[str, Any]:
        space = _space(ws, space_id)
        body = await _json(request)
        if body.get("etag") and body["etag"] != space["etag"]:
            raise ApiError(409, "RESOURCE_CONFLICT", f"Space {space_id} was modified since etag {body['etag']}")
        if "serialized_space" in body:
            space["serialized_space"] = json.dumps(_parse_serialized(body["serialized_space"]), ensure_ascii=False)
        for key in ("title", "description", "warehouse_id", "parent_path"):
            if body.get(key) is not None:
                space[key] = body[key]
        space["etag"], space["update_time"] = uuid.uuid4().hex[:12], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return space

    @app.delete(base + "/{space_id}")
    async def trash_space(space_id: str) -> dict[str, Any]:
        _space(ws, space_id)
        del genie.spaces[space_id]
        return {}


def _parse_serialized(value: Any) -> dict[str, Any]:
    try:
        config = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ApiError(400, "INVALID_PARAMETER_VALUE", "serialized_space must be a JSON object encoded as a string")
    try:
        check(config)
    except SpaceRuleError as exc:
        raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid serialized_space: {exc}") from exc
    return config


def _query_result(ws: Workspace, sql: str, parameters: list[dict[str, Any]] | None = None) -> Statement:
    """Genie's run of its own SQL (capped at 5,000 rows), as a finished statement."""
    stmt = ws.warehouse.submit(sql, 0.0, ROW_CAP, parameters, "INLINE", ws.contracts)
    if stmt.error is not None:
        raise ApiError(400, "BAD_REQUEST", f"Query failed: {stmt.error}")
    return stmt


def _wait_seconds(value: Any) -> float:
    match = re.fullmatch(r"(\d+)s", str(value or "10s"))
    if not match or not (int(match.group(1)) == 0 or 5 <= int(match.group(1)) <= 50):
        raise ApiError(400, "INVALID_PARAMETER_VALUE", f"wait_timeout must be 0s or between 5s and 50s, got {value!r}")
    return float(match.group(1))


def _sql_routes(app: FastAPI, ws: Workspace) -> None:
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.post("/api/2.0/sql/statements")
    @app.post("/api/2.0/sql/statements/")
    async def execute(request: Request) -> dict[str, Any]:
        body = await _json(request)
        sql, warehouse_id = body.get("statement"), body.get("warehouse_id")
        if not isinstance(sql, str) or not sql.strip():
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "statement must be a non-empty string")
        if len(sql.encode()) > 16 * 2**20:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "statement exceeds the maximum query text size of 16 MiB")
        if warehouse_id not in ws.warehouse.warehouse_ids:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Warehouse {warehouse_id} does not exist.")
        disposition = body.get("disposition") or "INLINE"
        if disposition not in ("INLINE", "EXTERNAL_LINKS"):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", f"disposition must be INLINE or EXTERNAL_LINKS, got {disposition!r}"
            )
        if (body.get("format") or "JSON_ARRAY") != "JSON_ARRAY":
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "the sandbox warehouse serves format JSON_ARRAY only")
        wait = _wait_seconds(body.get("wait_timeout"))
        latency = ws.ledger.spec("sql").latency_s(ws.ledger.rng())
        parameters = body.get("parameters")
        if parameters is not None and not (
            isinstance(parameters, list) and all(isinstance(p, dict) for p in parameters)
        ):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "parameters must be a list of {name, value, type}")
        stmt = await run_in_threadpool(
            ws.warehouse.submit, sql, latency, body.get("row_limit"), parameters, disposition, ws.contracts
        )
        ws.ledger.open_interval("sql", stmt.submitted, stmt.ready_at)
        ws.ledger.record(
            "sql",
            request.url.path,
            200,
            "ok",
            statement=sql,
            statement_id=stmt.statement_id,
            fields=sorted(body),
            parameters=parameters,
            disposition=disposition,
        )
        await asyncio.sleep(max(0.0, min(wait, stmt.ready_at - time.time())))
        if time.time() < stmt.ready_at and body.get("on_wait_timeout") == "CANCEL":
            stmt.canceled = True
        return stmt.as_response(time.time(), base_url(request))

    def statement(statement_id: str) -> Statement:
        stmt = ws.warehouse.get(statement_id)
        if stmt is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Statement {statement_id} does not exist.")
        return stmt

    @app.get("/api/2.0/sql/warehouses/{warehouse_id}")
    async def get_warehouse(warehouse_id: str) -> dict[str, Any]:
        if warehouse_id not in ws.warehouse.warehouse_ids:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Warehouse {warehouse_id} does not exist.")
        return {
            "id": warehouse_id,
            "name": warehouse_id,
            "state": ws.warehouse.state(time.time()),
            "cluster_size": "2X-Small",
            "warehouse_type": "PRO",
            "enable_serverless_compute": True,
            "auto_stop_mins": 10,
        }

    @app.get("/api/2.0/sql/statements/{statement_id}")
    async def get_statement(request: Request, statement_id: str) -> dict[str, Any]:
        return statement(statement_id).as_response(time.time(), base_url(request))

    @app.get("/api/2.0/sql/statements/{statement_id}/result/chunks/{chunk_index}")
    async def get_chunk(request: Request, statement_id: str, chunk_index: int) -> dict[str, Any]:
        stmt = statement(statement_id)
        if stmt.state(time.time()) != "SUCCEEDED":
            raise ApiError(
                400, "INVALID_STATE", f"Statement {statement_id} has no result: it is {stmt.state(time.time())}"
            )
        if not 0 <= chunk_index < len(stmt.chunks):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"chunk_index {chunk_index} is out of range")
        return stmt.chunk(chunk_index, base_url(request))

    @app.get("/sandbox/external/{statement_id}/{chunk_index}")
    async def external(request: Request, statement_id: str, chunk_index: int, expires: int, signature: str) -> Response:
        """A presigned link, as cloud storage serves it: no workspace token (one is refused), a signature, an expiry."""
        if "authorization" in request.headers:
            return JSONResponse({"Code": "InvalidArgument", "Message": "Only one auth mechanism allowed"}, 400)
        stmt = ws.warehouse.get(statement_id)
        if stmt is None or stmt.result is None or signature != stmt.signature(chunk_index, expires):
            return JSONResponse({"Code": "AccessDenied", "Message": "Signature does not match"}, 403)
        if time.time() > expires:
            return JSONResponse({"Code": "AccessDenied", "Message": "Request has expired"}, 403)
        offset, count = stmt.chunks[chunk_index]
        body = json.dumps(stmt.result["rows"][offset : offset + count])
        return Response(body, media_type="application/json")

    @app.post("/api/2.0/sql/statements/{statement_id}/cancel")
    async def cancel(statement_id: str) -> dict[str, Any]:
        stmt = statement(statement_id)
        if time.time() < stmt.ready_at:
            stmt.canceled = True
        return {}


def _serving_routes(app: FastAPI, ws: Workspace) -> None:
    @app.get("/api/2.0/serving-endpoints/{name}")
    async def get_endpoint(name: str) -> dict[str, Any]:
        group = ws.group_of_endpoint(name)
        if group is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Endpoint with name '{name}' does not exist.")
        return {
            "name": name,
            "id": uuid.uuid5(uuid.NAMESPACE_URL, name).hex,
            "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
            "task": "llm/v1/chat" if group == "chat" else "llm/v1/embeddings",
        }

    @app.post("/serving-endpoints/{name}/invocations")
    async def invoke(request: Request, name: str) -> Any:
        group = ws.group_of_endpoint(name)
        if group is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Endpoint with name '{name}' does not exist.")
        body = await _json(request)
        rng = ws.ledger.rng()
        start = request.scope.get("state", {}).get("sandbox_arrived", time.time())
        ws.ledger.admit(group)  # beyond the hidden capacity: 429 (OverCapacity)
        interval = ws.ledger.open_interval(group, start)
        try:
            latency = ws.ledger.spec(group).latency_s(rng)
            texts = _texts(body) if group == "embeddings" else None
            vectors = [models.embed(t) for t in texts or []]  # the endpoint's work is part of its service time
            await asyncio.sleep(max(0.0, latency - (time.time() - start)))
            if group == "embeddings":
                return _embeddings(ws, request, name, texts, vectors)
            return _chat(ws, request, name, body)
        finally:
            interval[1] = time.time()


def _texts(body: dict[str, Any]) -> list[str] | None:
    """An embedding request's texts, or None when its 'input' is not a string or a list of strings."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return None
    return texts


def _embeddings(ws: Workspace, request: Request, name: str, texts: list[str] | None, vectors: list[list[float]]) -> Any:
    if texts is None:
        raise ApiError(400, "BAD_REQUEST", "Embedding endpoints take 'input': a string or a list of strings")
    fault = ws.ledger.draw("embeddings", ("malformed",))
    ws.ledger.record(
        "embeddings", request.url.path, 200, fault, endpoint=name, inputs=len(texts), texts=[t[:80] for t in texts]
    )
    if fault == "malformed":
        return Response('{"object": "list", "data": [{"embedding": [0.1, ', media_type="application/json")
    tokens = sum(models.estimate_tokens(t) for t in texts)
    answer = {
        "object": "list",
        "model": name,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(json.dumps(answer), media_type="application/json")  # plain floats: no need of FastAPI's encoder


def _chat(ws: Workspace, request: Request, name: str, body: dict[str, Any]) -> Any:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "BAD_REQUEST", "Chat endpoints take 'messages': a non-empty list")
    prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    payload = models.find_payload(prompt)
    reply = models.answer(payload)
    task = (payload or {}).get("task")
    only = ws.ledger.spec("chat").tasks
    kinds = ("malformed", "missing_id", "extra_id", "bad_enum", "empty")
    fault = ws.ledger.draw("chat", kinds) if not only or task in only else "ok"
    items = [item for item in (payload or {}).get("items", []) if isinstance(item, dict)]
    ids = [item.get("id") for item in items]
    fields = sorted({key for item in items for key in item})
    ws.ledger.record("chat", request.url.path, 200, fault, endpoint=name, task=task, ids=ids, fields=fields)
    content = _corrupt(reply, fault) if isinstance(reply, list) else reply
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    prompt_tokens = sum(models.estimate_tokens(str(m.get("content", ""))) for m in messages)
    completion_tokens = models.estimate_tokens(content)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _corrupt(reply: list[Any], fault: str) -> Any:
    if fault == "malformed":
        return json.dumps(reply, ensure_ascii=False)[: max(1, len(json.dumps(reply)) // 2)]
    if fault == "missing_id" and reply:
        return reply[1:]
    if fault == "extra_id":
        return [*reply, {**(reply[0] if reply else {}), "id": "sandbox-extra-id"}]
    if fault == "bad_enum" and reply:
        first = dict(reply[0])
        for key in ("verdict", "challenge", "difficulty"):
            if key in first:
                first[key] = "not-a-valid-value"
                break
        for key in ("fixes", "patterns"):  # an improvement answer: its first fix or pattern
            if first.get(key):
                inner = dict(first[key][0])
                inner["category" if key == "fixes" else "kind"] = "not-a-valid-value"
                first[key] = [inner, *first[key][1:]]
        return [first, *reply[1:]]
    if fault == "empty" and reply:
        return [_blank(reply[0]), *reply[1:]]
    return reply


def _blank(value: Any) -> Any:
    """`value` with every string emptied, but for ids and enum-like keys (an answer with nothing in it)."""
    if isinstance(value, dict):
        keep = ("id", "category", "kind", "pattern", "snippet_type")
        return {k: v if k in keep else _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return "" if isinstance(value, str) else value


def _admin_routes(app: FastAPI, ws: Workspace) -> None:
    @app.put("/sandbox/contracts")
    async def put_contracts(request: Request) -> dict[str, Any]:
        """Set the enforced limits; `cold_start_s` also stops the warehouse."""
        try:
            contracts = Contracts.model_validate(await _json(request))
        except ValueError as exc:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", str(exc)) from exc
        ws.contracts = contracts
        if contracts.cold_start_s is not None:
            ws.warehouse.stop(contracts.cold_start_s)
        return contracts.model_dump()

    @app.get("/sandbox/stats")
    async def stats() -> dict[str, Any]:
        return ws.ledger.stats()

    @app.get("/sandbox/requests")
    async def requests(group: str | None = None) -> list[dict[str, Any]]:
        return [e for e in ws.ledger.log if group is None or e["group"] == group]

    @app.post("/sandbox/reset")
    async def reset() -> dict[str, Any]:
        ws.ledger.reset()
        ws.genie.flaky.clear()
        ws.contracts = Contracts()
        ws.warehouse.warm_at = 0.0
        ws.genie.conversations.clear()
        ws.genie.messages.clear()
        return {}

    @app.put("/sandbox/genie/flaky")
    async def flaky(request: Request) -> dict[str, Any]:
        questions = (await _json(request)).get("questions", [])
        unknown = [q for q in questions if normalise_question(q) not in ws.genie.brain]
        if unknown:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Genie knows no such question: {unknown}")
        ws.genie.flaky = {normalise_question(q): 0 for q in questions}
        return {"questions": questions}

    @app.get("/sandbox/faults/{group}")
    async def get_faults(group: str) -> dict[str, Any]:
        if group not in GROUPS:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Unknown endpoint group {group!r}; use one of {GROUPS}")
        return ws.ledger.spec(group).model_dump()

    @app.put("/sandbox/faults/{group}")
    async def put_faults(group: str, request: Request) -> dict[str, Any]:
        if group not in GROUPS:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Unknown endpoint group {group!r}; use one of {GROUPS}")
        try:
            spec = FaultSpec.model_validate(await _json(request))
        except ValueError as exc:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", str(exc)) from exc
        ws.ledger.set_spec(group, spec)
        return spec.model_dump()
