"""Commands of the row jobs: enrich, analyse, embed, and search over the embedded documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from batchflows_cli.common import (
    SANDBOX_WAREHOUSE,
    _exit_status,
    _job,
    _run,
    _settings,
    _uses_prefect,
    _workspace,
    app,
    console,
)


def _one_source(input_path: Path | None, query: str | None) -> None:
    """The rows come from --input or --query, exactly one: said before anything starts."""
    if (input_path is None) == (query is None):
        both = ", not both" if input_path is not None else ""
        raise typer.BadParameter(f"give --input FILE or --query SQL{both}", param_hint="'--input' / '--query'")


@app.command()
def enrich(
    text_columns: Annotated[str, typer.Option("--text-columns", help="comma-separated columns sent to the model")],
    input_path: Annotated[Path | None, typer.Option("--input", help="rows file: CSV, JSONL, JSON or Parquet")] = None,
    query: Annotated[str | None, typer.Option(help="SQL query whose result is the rows (instead of --input)")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that runs --query")] = None,
    id_column: Annotated[str | None, typer.Option(help="id column (default: a hash of the row's text)")] = None,
    schema: Annotated[
        Path | None, typer.Option(help="JSON schema of the new columns (default: tldr, challenge)")
    ] = None,
    instructions: Annotated[str | None, typer.Option(help="what to ask the model for each row")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the enriched rows go")] = Path("out"),
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Add LLM-generated columns to rows: 20 rows per call, validated, cached per row, rate-limited."""
    _one_source(input_path, query)
    workspace = _workspace(use_sandbox, workspace_block)
    from flows.enrich import DEFAULT_INSTRUCTIONS, EnrichSettings
    from flows.enrich import enrich as enrich_flow

    settings = _settings(EnrichSettings, set_)
    with _job(workspace) as block_name:
        summary = _run(
            enrich_flow,
            [c.strip() for c in text_columns.split(",") if c.strip()],
            input_path=str(input_path) if input_path else None,
            query=query,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            id_column=id_column,
            schema_path=str(schema) if schema else None,
            instructions=instructions or DEFAULT_INSTRUCTIONS,
            settings=settings,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    if json_out:
        console.print_json(json.dumps(summary, default=str))
    else:
        console.print(
            f"Total rows: {summary['total']}; cache hits: {summary['cache_hits']}; newly enriched: "
            f"{summary['newly_enriched']}; failed: {summary['failed']}; success rate: {summary['success_rate']:.1%}; "
            f"API calls: {summary['api_calls']}; tokens: {summary['tokens']}; {summary['wall_time_s']} s"
        )
        console.print(f"Rows: {summary['files']['parquet']} and {summary['files']['csv']}")
    _exit_status(summary["total"] - summary["failed"], summary["total"], "rows enriched")


@app.command()
def analyse(
    input_path: Annotated[Path | None, typer.Option("--input", help="items file: CSV, JSONL, JSON or Parquet")] = None,
    query: Annotated[str | None, typer.Option(help="SQL query whose result is the items (instead of --input)")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that runs --query")] = None,
    id_column: Annotated[str, typer.Option(help="id column")] = "id",
    position_column: Annotated[str, typer.Option(help="order column")] = "position",
    text_column: Annotated[str, typer.Option(help="text column")] = "text",
    batch_size: Annotated[int | None, typer.Option(help="items analysed at once (default 10)")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="one item at a time (same output)")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the report goes")] = Path("out"),
) -> None:
    """Analyse ordered items in parallel, then merge fragments with the item before them, in order."""
    _one_source(input_path, query)
    workspace = _workspace(use_sandbox, workspace_block)
    from flows.analyse import AnalyseSettings
    from flows.analyse import analyse as analyse_flow

    settings = _settings(AnalyseSettings, set_, batch_size=batch_size)
    with _job(workspace) as block_name:
        summary = _run(
            analyse_flow,
            input_path=str(input_path) if input_path else None,
            query=query,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            id_column=id_column,
            position_column=position_column,
            text_column=text_column,
            settings=settings,
            sequential=sequential,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    console.print(
        f"{summary['items']} items: {summary['analysed']} analysed ({summary['cached']} cached), "
        f"{summary['failed']} failed; {summary['groups']} groups; analysis {summary['analysis_s']} s, "
        f"run {summary['wall_time_s']} s"
    )
    console.print(f"Report: {summary['files']['csv']}; groups: {summary['files']['groups']}")
    _exit_status(summary["analysed"], summary["items"], "items analysed")


@app.command()
def embed(
    input_path: Annotated[Path | None, typer.Option("--input", help="documents file with id, text (, kind)")] = None,
    catalog: Annotated[str, typer.Option(help="without --input: the catalog to document")] = "samples",
    schema: Annotated[
        str, typer.Option(help="without --input: the schema whose tables and keys are documented")
    ] = "retail",
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that reads the information_schema")] = None,
    estimate_only: Annotated[bool, typer.Option("--estimate", help="report tokens and cost, call nothing")] = False,
    max_cost: Annotated[float | None, typer.Option(help="refuse to run over this estimated cost, USD")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    store: Annotated[Path | None, typer.Option(help="vector store file (default ~/.batchflows/vectors.duckdb)")] = None,
    store_table: Annotated[
        str | None, typer.Option(help="instead, a table on the warehouse for the vectors, e.g. main.docs.vectors")
    ] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the per-item results go")] = Path("out"),
) -> None:
    """Embed documents 100 per call into a searchable store, after a cost estimate and within a budget."""
    workspace = _workspace(use_sandbox, workspace_block, allow_writes=bool(store_table))
    from flows.embed import EmbedSettings
    from flows.embed import embed as embed_flow

    settings = _settings(EmbedSettings, set_, max_cost_usd=max_cost)
    with _job(workspace) as block_name:
        summary = _run(
            embed_flow,
            input_path=str(input_path) if input_path else None,
            catalog=catalog,
            schema_name=schema,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            settings=settings,
            estimate_only=estimate_only,
            store_path=str(store) if store else None,
            store_table=store_table,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    plan = summary["estimate"]
    console.print(
        f"Estimate: {plan['pending']} pending {plan['pending_by_kind']}, {plan['estimated_batches']} batches, "
        f"~{plan['estimated_tokens']} tokens, ${plan['estimated_cost_usd']:.4f} "
        f"(${plan['cost_per_item_usd']:.6f} per item; {plan['tokenizer']})"
    )
    if estimate_only:
        return
    console.print(
        f"Embedded {summary['successful']}/{summary['processed']} ({summary['cache_hits']} cached) in "
        f"{summary['api_calls']} calls, {summary['tokens']} tokens, {summary['wall_time_s']} s; by kind: "
        f"{summary['by_kind']}"
    )
    console.print(f"Vectors: {summary['store']}; results: {summary['files']['csv']}")
    _exit_status(summary["successful"], summary["processed"], "documents embedded")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="what to look for")],
    k: Annotated[int, typer.Option(help="how many items")] = 5,
    endpoint: Annotated[str, typer.Option(help="the embedding endpoint the store was built with")] = (
        "databricks-gte-large-en"
    ),
    store: Annotated[Path | None, typer.Option(help="vector store file (default ~/.batchflows/vectors.duckdb)")] = None,
    store_table: Annotated[str | None, typer.Option(help="instead, the warehouse table holding the vectors")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="the warehouse of --store-table")] = None,
    use_sandbox: Annotated[
        bool, typer.Option("--sandbox", help="embed TEXT with an embedded sandbox workspace")
    ] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
) -> None:
    """The stored items nearest to TEXT (cosine similarity of their embeddings)."""
    from flows.embed import default_store
    from flows.phase import load_blocks
    from tasks.embed import DeltaVectorStore, VectorStore

    path = str(store) if store else default_store()
    if not store_table and not Path(path).exists():
        console.print(f"[red]error:[/red] no vector store at {path}; run `batchflows embed` first")
        raise typer.Exit(2)
    if store_table and not (warehouse_id or use_sandbox):
        raise typer.BadParameter("--store-table needs --warehouse-id")
    _uses_prefect()  # the workspace is a block
    with _workspace(use_sandbox, workspace_block) as block_name:
        workspace, _ = load_blocks(block_name, None)
        client = workspace.client(60)
        response = client.serving_endpoints.query(name=endpoint, input=[text])
        vector = response.data[0].embedding if response.data else None
        if not vector:
            console.print(f"[red]error:[/red] {endpoint} returned no embedding")
            raise typer.Exit(2)
        if store_table:
            table_store = DeltaVectorStore(client, warehouse_id or SANDBOX_WAREHOUSE, store_table)
            hits = table_store.search(endpoint, vector, k)
        else:
            hits = VectorStore(path).search(endpoint, vector, k)
    if not hits:
        console.print(f"no items stored for {endpoint} in {path}")
    for hit in hits:
        console.print(f"{hit['score']:.4f}  {hit['id']}  {hit['text'][:100]}")
