"""What scoring lets reach a user's warehouse: exactly one read-only query that reads no files or secrets
and calls nothing outside the warehouse. The expected SQL of a benchmark and Genie's SQL pass the same
guard, since either may come from someone else.

Refused: more or less than one statement; anything but a query (INSERT, DELETE, DROP, MERGE, ...);
SELECT ... INTO; tables named by a path (csv.`/path`, parquet.`s3://...`, delta.`...`, ...); and the
functions in `DENIED_FUNCTIONS`, which read files or secrets, call services or models, or run code.
Names in `allowed` (the scoring setting `allowed_functions`) are let through.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import sqlglot
from sqlglot import exp

READ_ONLY = (exp.Select, exp.Union, exp.Intersect, exp.Except)
DENIED_FUNCTIONS = frozenset(
    {
        # Databricks: files, secrets, network, models, JVM
        "read_files", "cloud_files_state", "read_kafka", "read_kinesis", "read_pubsub", "read_pulsar",
        "read_statestore", "read_state_metadata", "secret", "try_secret", "list_secrets", "http_request",
        "ai_query", "ai_gen", "ai_generate_text", "ai_extract", "ai_classify", "ai_summarize", "ai_translate",
        "ai_analyze_sentiment", "ai_fix_grammar", "ai_mask", "ai_similarity", "ai_forecast", "ai_parse_document",
        "vector_search", "reflect", "try_reflect", "java_method", "input_file_name",
        # other engines' file readers (the sandbox runs on DuckDB)
        "read_text", "read_blob", "read_csv", "read_csv_auto", "read_parquet", "parquet_scan", "read_json",
        "read_json_auto", "read_ndjson", "glob", "sniff_csv",
    }
)  # fmt: skip
PATH_FORMATS = frozenset({"csv", "json", "parquet", "delta", "text", "binaryfile", "avro", "orc", "xml", "file"})


def read_only_problem(sql: str, whose: str = "Genie's SQL", allowed: Iterable[str] = ()) -> str | None:
    """Why `sql` must not reach the warehouse, or None when it may.

    Example:
        >>> read_only_problem("DELETE FROM orders", "the expected SQL")
        'the expected SQL is a DELETE statement, not a query; refused'
    """
    return _problem(sql, whose, tuple(sorted(allowed)))


@functools.lru_cache(maxsize=4096)  # a run checks each statement before it runs and again when it decides
def _problem(sql: str, whose: str, allowed: tuple[str, ...]) -> str | None:
    try:
        trees = [t for t in sqlglot.parse(sql, read="databricks") if t is not None]
    except sqlglot.errors.ParseError as exc:
        return f"{whose} does not parse: {str(exc).splitlines()[0][:300]}"
    if len(trees) != 1:
        return f"{whose} has {len(trees)} statements; only one query is run"
    tree = trees[0]
    if not isinstance(tree, READ_ONLY):
        return f"{whose} is a {tree.key.upper()} statement, not a query; refused"
    if any(select.args.get("into") for select in tree.find_all(exp.Select)):
        return f"{whose} writes a table (SELECT ... INTO); refused"
    for table in tree.find_all(exp.Table):
        if table.db.lower() in PATH_FORMATS and ("/" in table.name or ":" in table.name):
            return f"{whose} reads files by path ({table.db}.`{table.name[:80]}`); refused"
    permitted = {name.lower() for name in allowed}
    for func in tree.find_all(exp.Func):
        name = (func.name if isinstance(func, exp.Anonymous) else func.sql_name()).lower()
        if name in DENIED_FUNCTIONS and name not in permitted:
            return (
                f"{whose} calls {name}(), which reads files, secrets or services; refused (allowed_functions "
                "lets it through)"
            )
    return None
