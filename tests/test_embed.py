"""Document embedding against the sandbox: batches of 100, cache, fallback, budget, store and search."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blocks.workspace import DatabricksWorkspace
from flows.embed import EmbedSettings, embed
from tasks.embed import BudgetExceeded, VectorStore, check_documents


def _docs(tmp_path: Path, n: int) -> str:
    path = tmp_path / "docs.jsonl"
    words = ["revenue", "customer", "inventory", "shipping", "refund", "discount", "store", "payment"]
    path.write_text(
        "\n".join(
            json.dumps(
                {"id": f"d{i}", "kind": "note", "text": f"Note {i} about {words[i % 8]} and {words[(i * 3) % 8]}"}
            )
            for i in range(n)
        )
    )
    return str(path)


def _run(tmp_path: Path, workspace_block: str, ledger_block: str, **kw: Any) -> dict[str, Any]:
    if "input_path" not in kw:
        kw["input_path"] = _docs(tmp_path, 250)
    return embed(
        settings=kw.pop("settings", EmbedSettings(retry_delay=0.05)),
        store_path=str(tmp_path / "vectors.duckdb"),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _sizes(sb: Any) -> list[int]:
    return sorted((r["inputs"] for r in sb.requests("embeddings") if "inputs" in r), reverse=True)


def test_250_documents_take_3_calls_then_none(sb, workspace_block, ledger_block, tmp_path):
    first = _run(tmp_path, workspace_block, ledger_block)
    assert _sizes(sb) == [100, 100, 50]
    assert (first["successful"], first["api_calls"], first["stored"]) == (250, 3, 250)
    assert first["by_kind"] == {"note": {"processed": 250, "successful": 250, "success_rate": 1.0}}
    assert first["estimate"]["estimated_batches"] == 3 and first["tokens"] > 0
    sb.reset()
    second = _run(tmp_path, workspace_block, ledger_block)
    assert sb.stats()["embeddings"]["calls"] == 0
    assert (second["successful"], second["cache_hits"], second["api_calls"]) == (250, 250, 0)


def test_a_failing_batch_falls_back_to_single_items(sb, workspace_block, ledger_block, tmp_path):
    settings = EmbedSettings(batch_size=5, max_concurrent=1, retry_attempts=3, retry_delay=0.05)
    sb.set_faults("embeddings", script=["500"] * 4)  # the first batch's four attempts
    result = _run(tmp_path, workspace_block, ledger_block, input_path=_docs(tmp_path, 12), settings=settings)
    assert sb.stats()["embeddings"]["calls"] == 4 + 2 + 5
    assert _sizes(sb) == [5, 2, 1, 1, 1, 1, 1]
    assert (result["successful"], result["api_calls"]) == (12, 11)


def test_over_budget_or_estimate_only_makes_no_call(sb, workspace_block, ledger_block, tmp_path):
    plan = _run(tmp_path, workspace_block, ledger_block, estimate_only=True)["estimate"]
    assert (plan["pending"], plan["estimated_batches"]) == (250, 3)
    assert plan["estimated_cost_usd"] == pytest.approx(plan["estimated_tokens"] / 1e6 * 0.13, abs=1e-6)
    with pytest.raises(BudgetExceeded, match="over the budget max_cost_usd"):
        _run(
            tmp_path, workspace_block, ledger_block, settings=EmbedSettings(max_cost_usd=plan["estimated_cost_usd"] / 2)
        )
    assert sb.stats()["embeddings"]["calls"] == 0


def test_schema_documentation_is_embedded_and_searchable(sb, workspace_block, ledger_block, tmp_path):
    result = _run(tmp_path, workspace_block, ledger_block, input_path=None, warehouse_id="sandbox-warehouse")
    kinds = result["by_kind"]
    assert (kinds["table"]["successful"], kinds["relationship"]["successful"]) == (5, 4)
    assert result["table_processing_results"]["table:orders"] is True
    assert result["summary"] == {
        "total_relationships_processed": 4,
        "successful_relationships": 4,
        "total_tables_processed": 5,
        "successful_tables": 5,
        "overall_success_rate": 1.0,
    }
    assert (result["estimate"]["pending_tables"], result["estimate"]["pending_relationships"]) == (5, 4)
    assert _sizes(sb) == [9]
    store = VectorStore(str(tmp_path / "vectors.duckdb"))
    client = DatabricksWorkspace(host=sb.host, token=sb.token).client(10)

    def top(query: str, k: int = 3) -> list[str]:
        response = client.serving_endpoints.query(name="databricks-gte-large-en", input=[query])
        vector = response.data[0].embedding if response.data else None
        assert vector
        return [hit["id"] for hit in store.search("databricks-gte-large-en", vector, k)]

    assert top("order lines with product quantity, unit price and discount")[0] == "table:order_items"
    assert top("physical stores with their city and opening date")[0] == "table:stores"
    assert "relationship:orders.customer_id->customers.customer_id" in top("join orders to customers on customer_id", 2)


def test_bad_documents_are_reported_and_long_ones_chunked_when_asked():
    docs = [
        {"id": "a", "text": "fine"},
        {"id": "a", "text": "again"},
        {"id": "b", "text": "  "},
        {"id": "c", "text": "x" * 400},
    ]
    ok, errors = check_documents(docs, max_item_tokens=50, chunk_oversized=False)
    assert [d["id"] for d in ok] == ["a"]
    assert [e["error"] for e in errors] == [
        "item 2: duplicate id 'a'",
        "item 3 (id b): empty text",
        "item 4 (id c): ~100 tokens, over the endpoint's 50 (set chunk_oversized to split it)",
    ]
    ok, _ = check_documents(docs, max_item_tokens=50, chunk_oversized=True)
    assert [d["id"] for d in ok] == ["a", "c#1", "c#2"]


def test_vectors_in_a_warehouse_table_are_searchable(prefect_api, tmp_path):
    from sandbox import Sandbox
    from tasks.embed import DeltaVectorStore, StoreError

    with Sandbox(allow_writes=True) as writable:
        DatabricksWorkspace(host=writable.host, token=writable.token).save("writable-sandbox", overwrite=True)
        from blocks.ledger import RowLedger

        RowLedger(path=str(tmp_path / "ledger.sqlite")).save("delta-ledger", overwrite=True)
        result = embed(
            warehouse_id="sandbox-warehouse",
            store_table="samples.main.doc_vectors",
            workspace_block="writable-sandbox",
            ledger_block="delta-ledger",
            output_dir=str(tmp_path / "out"),
        )
        assert result["stored"] == 9
        client = DatabricksWorkspace(host=writable.host, token=writable.token).client(10)
        store = DeltaVectorStore(client, "sandbox-warehouse", "samples.main.doc_vectors")
        assert store.count("databricks-gte-large-en") == 9
        response = client.serving_endpoints.query(
            name="databricks-gte-large-en", input=["order lines with product quantity, unit price and discount"]
        )
        vector = response.data[0].embedding if response.data else None
        assert vector and store.search("databricks-gte-large-en", vector, 1)[0]["id"] == "table:order_items"
        # a rerun replaces rows instead of adding them
        embed(
            warehouse_id="sandbox-warehouse",
            store_table="samples.main.doc_vectors",
            workspace_block="writable-sandbox",
            ledger_block="delta-ledger",
            output_dir=str(tmp_path / "out"),
        )
        assert store.count("databricks-gte-large-en") == 9
    with Sandbox() as read_only, pytest.raises(StoreError, match="read-only"):
        DeltaVectorStore(
            DatabricksWorkspace(host=read_only.host, token=read_only.token).client(10),
            "sandbox-warehouse",
            "samples.main.doc_vectors",
        )


def test_vectors_reach_the_store_while_the_calls_go_on(sb, workspace_block, ledger_block, tmp_path):
    """The store is written in bulk during the run, not all at its end; every vector is there afterwards."""
    sb.set_faults("embeddings", latency_ms=400)
    store = VectorStore(str(tmp_path / "vectors.duckdb"))
    seen: list[int] = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            seen.append(store.count("databricks-gte-large-en"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        settings = EmbedSettings(batch_size=50, max_concurrent=1, retry_delay=0.05)
        summary = _run(tmp_path, workspace_block, ledger_block, input_path=_docs(tmp_path, 300), settings=settings)
    finally:
        running.clear()
        watcher.join()
    assert (summary["successful"], summary["stored"]) == (300, 300)
    assert store.count("databricks-gte-large-en") == 300
    assert any(0 < n < 300 for n in seen), f"the store went from empty to full at once: {sorted(set(seen))}"


def test_the_embed_command_exits_without_a_word_on_stderr_from_its_libraries(command, tmp_path):
    """The command freezes its start-up objects out of garbage collection (batchflows_cli.common.loaded);
    duckdb 2's bindings reported each frozen object of theirs as leaked at exit, ~50 lines on every run."""
    done = command("embed", "--sandbox", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vectors:" in done.stdout
    assert "leaked" not in done.stderr, done.stderr[-2000:]
