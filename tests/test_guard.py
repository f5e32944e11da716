"""The guard on every statement scoring runs on a user's warehouse, and inputs that must not hurt: the
expected SQL is checked like Genie's, file/secret/network functions are refused, the sandbox cannot read
its host's files, and benchmark files are read safely."""

from __future__ import annotations

import time
import uuid
from importlib import resources

import pytest

from blocks.settings import score_settings
from blocks.workspace import DatabricksWorkspace
from flows.phase import summary_of
from flows.score import score
from sandbox import Sandbox
from tasks.benchmarks import Benchmark, BenchmarkFileError, load_benchmarks
from tasks.calls import run_sql
from tasks.guard import read_only_problem

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("DELETE FROM order_items", "DELETE statement"),
        ("INSERT INTO orders VALUES (1)", "INSERT statement"),
        ("SELECT COUNT(*) FROM orders; DROP TABLE customers", "2 statements"),
        ("SELECT * INTO copy FROM orders", "SELECT ... INTO"),
        ("SELECT * FROM read_files('/Volumes/x')", "read_files()"),
        ("SELECT * FROM csv.`/etc/passwd`", "reads files by path"),
        ("SELECT * FROM parquet.`s3://bucket/key`", "reads files by path"),
        ("SELECT secret('scope', 'key')", "secret()"),
        ("SELECT http_request('GET', 'https://example.com')", "http_request()"),
        ("SELECT ai_query('endpoint', 'prompt')", "ai_query()"),
        ("SELECT reflect('java.lang.Runtime', 'getRuntime')", "reflect()"),
        ("SELECT java_method('java.lang.System', 'exit', 0)", "java_method()"),
        ("SELECT * FROM read_text('/etc/passwd')", "read_text()"),
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ],
)
def test_guard_refuses(sql, words):
    problem = read_only_problem(sql, "the expected SQL")
    assert problem and problem.startswith("the expected SQL") and words in problem, problem


def test_guard_passes_queries_and_what_the_setting_allows():
    assert read_only_problem("SELECT o.status, COUNT(*) FROM orders o GROUP BY 1 ORDER BY 2 DESC") is None
    assert read_only_problem("SELECT * FROM samples.retail.orders UNION SELECT * FROM o2") is None
    assert read_only_problem("SELECT ai_query('e', 'p')", allowed=["AI_QUERY"]) is None


def test_expected_sql_goes_through_the_guard(workspace_block, ledger_block, tmp_path, prefect_api):
    """On a warehouse that allows writes, a benchmark's DELETE or a hidden DROP must never run."""
    with Sandbox(allow_writes=True) as writable:
        DatabricksWorkspace(host=writable.host, token=writable.token).save("writable", overwrite=True)
        client = DatabricksWorkspace(host=writable.host, token=writable.token).client(10)
        count = "SELECT COUNT(*) AS n FROM order_items"
        before = run_sql(client, "sandbox-warehouse", count, 10)["rows"]
        first = load_benchmarks(BENCHMARKS)[0]
        items = [
            Benchmark(id="del", question=first.question, expected_sql="DELETE FROM order_items"),
            Benchmark(
                id="drop", question=first.question, expected_sql="SELECT COUNT(*) FROM orders; DROP TABLE customers"
            ),
        ]
        state = score(
            items,
            "retail",
            "sandbox-warehouse",
            score_settings(genie_rpm=0, genie_poll_initial=0.05, genie_poll_max=0.2),
            workspace_block="writable",
            ledger_block=ledger_block,
            output_dir=str(tmp_path),
            breaker_block=f"b-{uuid.uuid4().hex[:8]}",
            return_state=True,
        )
        ran = [r["statement"] for r in writable.requests("sql")]
        assert run_sql(client, "sandbox-warehouse", count, 10)["rows"] == before
        assert run_sql(client, "sandbox-warehouse", "SELECT COUNT(*) AS n FROM customers", 10)["rows"][0][0] > 0
    assert state.is_failed() and state.message == "0/2 judged, 2 failed: sql_error 2"  # nothing could be judged
    rows = {r["id"]: r for r in summary_of(state)["rows"]}
    assert {r["verdict"] for r in rows.values()} == {"sql_error"}
    assert {r["error_kind"] for r in rows.values()} == {"expected_not_read_only"}
    assert "DELETE statement" in rows["del"]["reason"] and "2 statements" in rows["drop"]["reason"]
    assert not any("DELETE" in s or "DROP" in s for s in ran), ran


def test_sandbox_does_not_read_its_hosts_files(client):
    for sql in ("SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM read_csv('/etc/hostname')"):
        result = run_sql(client, "sandbox-warehouse", sql, 10)
        assert "error" in result and "disabled" in result["error"], result


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    lines.append("benchmarks: [{id: *i, question: q, expected_sql: SELECT 1}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines))
    assert bomb.stat().st_size < 800
    t0 = time.monotonic()
    with pytest.raises(BenchmarkFileError, match=r"line 2: YAML aliases \(\*a\) are not allowed"):
        load_benchmarks(bomb)
    assert time.monotonic() - t0 < 5  # not a timing target: a bomb would take minutes and gigabytes


def test_csv_benchmarks_keep_line_breaks_inside_quoted_fields(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text('id,question,expected_sql\nq1,How many?,"SELECT COUNT(*) AS customer_count\nFROM customers"\n')
    [benchmark] = load_benchmarks(path)
    assert benchmark.expected_sql == "SELECT COUNT(*) AS customer_count\nFROM customers"
