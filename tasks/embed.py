"""Embedding pieces: documents from a schema's metadata or a file, the cost estimate, one batched
embedding call validated per item, and the local vector store (DuckDB) with its search.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from databricks.sdk import WorkspaceClient

from tasks import meter, stopping
from tasks.batched import BatchAnswer
from tasks.calls import run_sql
from tasks.enrich import estimate_tokens
from tasks.errors import TransientError, classify
from tasks.inputs import QUERY_ROW_CAP, InputError
from tasks.resilience import RetryPolicy

if TYPE_CHECKING:
    import duckdb

TOKENIZER = "estimate: 4 characters a token (no tokenizer ships its vocabulary offline; tiktoken downloads)"


class BudgetExceeded(InputError):
    """The run's estimated cost is over its budget (max_cost): stopped before the first call."""


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def schema_documents(
    client: WorkspaceClient, warehouse_id: str, catalog: str, schema: str, timeout_s: float
) -> list[dict[str, Any]]:
    """One document per table (its comment and columns) and one per foreign key, from the warehouse's
    system.information_schema."""
    where = f"table_catalog = {_q(catalog)} AND table_schema = {_q(schema)}"
    tables = _rows(
        client,
        warehouse_id,
        f"SELECT table_name, comment FROM system.information_schema.tables WHERE {where}",
        timeout_s,
    )
    columns = _rows(
        client,
        warehouse_id,
        "SELECT table_name, column_name, data_type, comment FROM system.information_schema.columns "
        f"WHERE {where} ORDER BY table_name, ordinal_position",
        timeout_s,
    )
    keys = _rows(
        client,
        warehouse_id,
        "SELECT kcu.table_name, kcu.column_name, ccu.table_name, ccu.column_name "
        "FROM system.information_schema.table_constraints AS tc "
        "JOIN system.information_schema.key_column_usage AS kcu ON tc.constraint_name = kcu.constraint_name "
        "JOIN system.information_schema.constraint_column_usage AS ccu ON tc.constraint_name = ccu.constraint_name "
        f"WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_catalog = {_q(catalog)} "
        f"AND tc.table_schema = {_q(schema)} ORDER BY 1, 2",
        timeout_s,
    )
    if not tables:
        raise InputError(f"no tables in {catalog}.{schema} (or no access to its information_schema)")
    comments = {t: c or "" for t, c in tables}
    docs = []
    for table, comment in sorted(comments.items()):
        cols = [f"{name} ({kind}{': ' + c if c else ''})" for t, name, kind, c in columns if t == table]
        text = f"Table {catalog}.{schema}.{table}. {comment} Columns: {', '.join(cols)}."
        docs.append({"id": f"table:{table}", "kind": "table", "text": text.replace("  ", " ")})
    for table, column, ref_table, ref_column in keys:
        text = (
            f"Relationship: {table}.{column} references {ref_table}.{ref_column}; join {table} to {ref_table} "
            f"on {table}.{column} = {ref_table}.{ref_column}. {table}: {comments.get(table, '')} "
            f"{ref_table}: {comments.get(ref_table, '')}"
        )
        docs.append(
            {"id": f"relationship:{table}.{column}->{ref_table}.{ref_column}", "kind": "relationship", "text": text}
        )
    return docs


SCHEMA_READ = RetryPolicy(retries=3, base_delay_s=2)


def _rows(client: WorkspaceClient, warehouse_id: str, sql: str, timeout_s: float) -> list[list[Any]]:
    """Every row of a metadata query; a transient failure (5xx, 429, reset, timeout) is retried with backoff."""
    attempt = 0
    while True:
        attempt += 1
        try:
            result = run_sql(client, warehouse_id, sql, timeout_s, row_limit=QUERY_ROW_CAP)
            break
        except Exception as exc:  # classified: only transient failures are retried
            error = classify(exc)
            if not isinstance(error, TransientError) or attempt > SCHEMA_READ.retries:
                raise error from exc
            stopping.sleep(SCHEMA_READ.delay(attempt, error.retry_after_s))
    if "error" in result:
        raise InputError(f"reading the schema's metadata failed: {result['error']}")
    return [list(r) for r in result["rows"]]


def check_documents(
    docs: list[dict[str, Any]], max_item_tokens: int, chunk_oversized: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(documents to embed, per-item errors): empty texts and duplicate ids are errors; a text over
    `max_item_tokens` is an error, or split into numbered chunks when `chunk_oversized`."""
    ok: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, doc in enumerate(docs, start=1):
        doc_id, text = str(doc.get("id") or "").strip(), str(doc.get("text") or "").strip()
        kind = str(doc.get("kind") or "document")
        tokens = estimate_tokens(text)
        if not doc_id:
            errors.append({"id": f"item {n}", "kind": kind, "error": f"item {n}: empty id"})
        elif doc_id in seen:
            errors.append({"id": doc_id, "kind": kind, "error": f"item {n}: duplicate id {doc_id!r}"})
        elif not text:
            errors.append({"id": doc_id, "kind": kind, "error": f"item {n} (id {doc_id}): empty text"})
        elif tokens > max_item_tokens and not chunk_oversized:
            errors.append(
                {
                    "id": doc_id,
                    "kind": kind,
                    "error": f"item {n} (id {doc_id}): ~{tokens} tokens, over the endpoint's {max_item_tokens} "
                    "(set chunk_oversized to split it)",
                }
            )
        else:
            seen.add(doc_id)
            if tokens <= max_item_tokens:
                ok.append({"id": doc_id, "kind": kind, "text": text})
                continue
            size = max_item_tokens * 4
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            ok += [{"id": f"{doc_id}#{p}", "kind": kind, "text": piece} for p, piece in enumerate(pieces, start=1)]
    return ok, errors


def estimate(docs: list[dict[str, Any]], batch_size: int, price_per_million: float) -> dict[str, Any]:
    """The seed's cost estimation: what the pending documents would take and cost."""
    kinds: dict[str, int] = {}
    kind_tokens: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        kind_tokens[d["kind"]] = kind_tokens.get(d["kind"], 0) + estimate_tokens(d["text"])
    tokens = sum(kind_tokens.values())
    cost = tokens / 1e6 * price_per_million
    seed_shape = {  # the seed's processing statistics and cost estimation responses
        **{f"pending_{kind}s": n for kind, n in kinds.items()},
        "total_pending": len(docs),
        **{f"estimated_{kind}_cost": round(n / 1e6 * price_per_million, 6) for kind, n in kind_tokens.items()},
        "total_estimated_cost": round(cost, 6),
        "batch_size": batch_size,
        "total_texts": len(docs),
        "cost_per_text": round(cost / len(docs), 8) if docs else 0.0,
    }
    return {
        **seed_shape,
        "pending": len(docs),
        "pending_by_kind": kinds,
        "estimated_batches": math.ceil(len(docs) / batch_size),
        "estimated_tokens": tokens,
        "estimated_cost_usd": round(cost, 6),
        "cost_per_item_usd": round(cost / len(docs), 8) if docs else 0.0,
        "price_per_million_tokens_usd": price_per_million,
        "tokenizer": TOKENIZER,
    }


def embed_batch(
    client: WorkspaceClient, endpoint: str, batch: list[dict[str, Any]], before_call: Callable[[], None] | None = None
) -> BatchAnswer:
    """One call for a batch; each item's vector is checked (present once, same length, finite numbers)."""
    del before_call  # a single call per batch: the phase took its rate slot already
    meter.count("invocations")
    response = client.serving_endpoints.query(name=endpoint, input=[d["text"] for d in batch])
    by_index: dict[int, list[float]] = {}
    twice: set[int] = set()
    for element in response.data or []:
        if element.index is None or element.embedding is None:
            continue
        if element.index in by_index:
            twice.add(element.index)
        by_index[element.index] = element.embedding
    dims = {len(v) for v in by_index.values()}
    width = max(dims, key=lambda d: sum(len(v) == d for v in by_index.values())) if dims else 0
    good: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for i, doc in enumerate(batch):
        vector = by_index.get(i)
        if vector is None:
            problems[doc["id"]] = "no vector for this input in the reply"
        elif i in twice:
            problems[doc["id"]] = "two vectors for this input in the reply"
        elif len(vector) != width or not all(math.isfinite(x) for x in vector):
            problems[doc["id"]] = f"vector of length {len(vector)} (others {width}) or not finite"
        else:
            good[doc["id"]] = vector
    tokens = response.usage.total_tokens if response.usage and response.usage.total_tokens else 0
    return {"good": good, "problems": problems, "tokens": tokens}


class VectorStore:
    """Vectors and metadata in a local DuckDB file, searched with its list cosine similarity.

    Example:
        store = VectorStore("vectors.duckdb"); store.upsert("databricks-gte-large-en", docs, vectors)
        store.search("databricks-gte-large-en", query_vector, k=5)
    """

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (model VARCHAR, id VARCHAR, kind VARCHAR, text VARCHAR, "
                "vector FLOAT[], PRIMARY KEY (model, id))"
            )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        # imported here, once a flow runs: a command freezes the objects it has loaded before its flow
        # (batchflows_cli.common.loaded), and duckdb 2's bindings (nanobind) report each frozen object of theirs
        # as leaked when the process exits (~50 lines on stderr)
        import duckdb

        return duckdb.connect(self.path)

    def upsert(self, model: str, docs: list[dict[str, Any]], vectors: dict[str, list[float]]) -> int:
        kept = [d for d in docs if d["id"] in vectors]
        if not kept:
            return 0
        frame = pd.DataFrame(
            {
                "model": model,
                "id": [d["id"] for d in kept],
                "kind": [d["kind"] for d in kept],
                "text": [d["text"] for d in kept],
                "vector": [vectors[d["id"]] for d in kept],
            }
        )
        with self._lock, self._connect() as conn:  # one bulk insert: executemany takes ~5 ms a row here
            conn.register("incoming", frame)
            conn.execute(
                "INSERT OR REPLACE INTO embeddings SELECT model, id, kind, text, vector::FLOAT[] FROM incoming"
            )
        return len(kept)

    def count(self, model: str) -> int:
        with self._lock, self._connect() as conn:
            return int(conn.execute("SELECT count(*) FROM embeddings WHERE model = ?", [model]).fetchone()[0])  # type: ignore[index]

    def search(self, model: str, vector: list[float], k: int = 5) -> list[dict[str, Any]]:
        with self._lock, self._connect() as conn:
            rows = conn.execute(
                "SELECT id, kind, text, list_cosine_similarity(vector, ?::FLOAT[]) AS score FROM embeddings "
                "WHERE model = ? ORDER BY score DESC, id LIMIT ?",
                [vector, model, k],
            ).fetchall()
        return [{"id": r[0], "kind": r[1], "text": r[2], "score": round(float(r[3]), 4)} for r in rows]


class StoreWriter:
    """Writes a run's new vectors while its calls go on: answers queue up as they arrive (`writer(good)`) and
    a thread writes them in bulk, at the latest `every_s` after the first one waiting, so the run's end
    writes only the last few. `written` holds the ids written; what a failed write left out is the
    caller's to write at the end (its error then surfaces there), so no vector is lost to the thread.

    Example:
        with StoreWriter(store, model, docs) as writer:
            result = run_batched(..., on_good=writer)
        store.upsert(model, docs, {i: v for i, v in result.values.items() if i not in writer.written})
    """

    def __init__(self, store: Any, model: str, docs: list[dict[str, Any]], every_s: float = 1.0) -> None:
        self.store, self.model, self.every_s = store, model, every_s
        self.docs = {d["id"]: d for d in docs}
        self.written: set[str] = set()
        self._waiting: dict[str, list[float]] = {}
        self._closed = False
        self._failed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vector-store-writer", daemon=True)

    def __enter__(self) -> StoreWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, good: dict[str, Any]) -> None:
        with self._wake:
            self._waiting.update((i, v) for i, v in good.items() if i in self.docs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to another process (a process-based task runner), it writes nothing: the caller's final
        # write covers every id it did not write.
        return _no_write, ()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed, timeout=self.every_s)
                batch, self._waiting = self._waiting, {}
                closed = self._closed
            if batch and not self._failed:
                try:
                    self.store.upsert(self.model, [self.docs[i] for i in batch], batch)
                    self.written.update(batch)
                except Exception:  # the caller writes these again at the end, where the error is raised
                    self._failed = True
            if closed:
                return


def _no_write(good: dict[str, Any]) -> None:
    del good


class StoreError(RuntimeError):
    """The warehouse refused a statement of the Delta vector store."""


class DeltaVectorStore:
    """Vectors in a table of a Databricks SQL warehouse (a Delta table on Databricks), written and read
    through the Statement Execution API. Vectors are stored as JSON text, which every warehouse can hold
    and `from_json` turns into an array. Search reads the model's rows inline and ranks them here, so it
    suits tables whose rows fit one inline result (25 MiB on Databricks: some thousands of 1,024-dimension
    vectors); beyond that a Vector Search index is the tool.
    """

    WRITE_ROWS = 200  # rows per INSERT statement (about 2 MB of SQL at 1,024 dimensions)

    def __init__(self, client: WorkspaceClient, warehouse_id: str, table: str, timeout_s: float = 120) -> None:
        self.client, self.warehouse_id, self.table, self.timeout_s = client, warehouse_id, table, timeout_s
        self.path = f"{table} on warehouse {warehouse_id}"
        self._sql(
            f"CREATE TABLE IF NOT EXISTS {table} (model STRING, id STRING, kind STRING, text STRING, vector STRING)"
        )

    def _sql(self, sql: str, row_limit: int = 1) -> dict[str, Any]:
        result = run_sql(self.client, self.warehouse_id, sql, self.timeout_s, row_limit=row_limit)
        if "error" in result:
            raise StoreError(f"vector table {self.table}: {result['error']}")
        return result

    def upsert(self, model: str, docs: list[dict[str, Any]], vectors: dict[str, list[float]]) -> int:
        kept = [d for d in docs if d["id"] in vectors]
        for start in range(0, len(kept), self.WRITE_ROWS):
            part = kept[start : start + self.WRITE_ROWS]
            ids = ", ".join(_q(d["id"]) for d in part)
            self._sql(f"DELETE FROM {self.table} WHERE model = {_q(model)} AND id IN ({ids})")
            values = ", ".join(
                f"({_q(model)}, {_q(d['id'])}, {_q(d['kind'])}, {_q(d['text'])}, {_q(json.dumps(vectors[d['id']]))})"
                for d in part
            )
            self._sql(f"INSERT INTO {self.table} VALUES {values}")
        return len(kept)

    def count(self, model: str) -> int:
        return int(self._sql(f"SELECT count(*) FROM {self.table} WHERE model = {_q(model)}")["rows"][0][0])

    def search(self, model: str, vector: list[float], k: int = 5, max_rows: int = 1_000_000) -> list[dict[str, Any]]:
        result = self._sql(
            f"SELECT id, kind, text, vector FROM {self.table} WHERE model = {_q(model)}", row_limit=max_rows
        )
        if result["truncated"]:
            raise StoreError(f"{self.table} holds over {max_rows} rows for {model}: search it with Vector Search")
        scored = [(_cosine(vector, json.loads(v)), i, kind, text) for i, kind, text, v in result["rows"]]
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [{"id": i, "kind": kind, "text": text, "score": round(score, 4)} for score, i, kind, text in scored[:k]]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
