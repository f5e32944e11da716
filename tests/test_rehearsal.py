"""Offline rehearsal: the sandbox serves the user's own tables and replays recorded Genie answers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from blocks.settings import score_settings
from blocks.workspace import DatabricksWorkspace
from flows.score import score
from sandbox import Sandbox
from sandbox.userdata import UserDataError
from tasks.calls import run_sql

ANSWERS = [
    {  # the same result with other aliases and another row order
        "question": "Total sales per region?",
        "sql": "SELECT s.region AS r, SUM(s.amount) AS revenue FROM sales AS s GROUP BY s.region ORDER BY revenue DESC",
        "delay_ms": 50,
    },
    {"question": "Sales in the north?", "sql": "SELECT SUM(amount) AS total FROM sales WHERE region = 'south'"},
    {"question": "How many staff?", "sql": "SELECT COUNT(*) AS n FROM hr.staf"},
    {"question": "Who manages the east?", "text": "Which period do you mean?"},
    {"question": "Best day?", "error": "Genie failed", "delay_ms": 20},
]
BENCHMARKS = [
    {
        "id": "b1",
        "question": "Total sales per region?",
        "expected_sql": "SELECT region, SUM(amount) AS total FROM sales GROUP BY region",
    },
    {
        "id": "b2",
        "question": "Sales in the north?",
        "expected_sql": "SELECT SUM(amount) AS total FROM sales WHERE region = 'north'",
    },
    {"id": "b3", "question": "How many staff?", "expected_sql": "SELECT COUNT(*) AS n FROM hr.staff"},
    {
        "id": "b4",
        "question": "Who  manages the EAST?",
        "expected_sql": "SELECT manager FROM regions WHERE region = 'east'",
    },
    {"id": "b5", "question": "Best day?", "expected_sql": "SELECT day FROM sales ORDER BY amount DESC LIMIT 1"},
    {"id": "b6", "question": "Never recorded?", "expected_sql": "SELECT 1 AS one"},
]


@pytest.fixture
def user_data(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "hr").mkdir(parents=True)
    pd.DataFrame(
        {
            "region": ["north", "south", "east", "north", "east"],
            "amount": [10.5, 20.0, 7.25, 4.5, 1.0],
            "day": [1, 2, 3, 4, 5],
        }
    ).to_parquet(data / "sales.parquet")
    pd.DataFrame({"region": ["north", "south", "east"], "manager": ["Kim", "Lee", "Park"]}).to_csv(
        data / "regions.csv", index=False
    )
    pd.DataFrame({"name": ["a", "b", "c"]}).to_parquet(data / "hr" / "staff.parquet")
    (data / "broken.parquet").write_bytes(b"not parquet at all")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(a) for a in ANSWERS) + "\n{not json\n")
    return data, answers


def test_scoring_against_recorded_answers_on_own_tables(prefect_api, user_data, tmp_path):
    data, answers = user_data
    benchmarks = tmp_path / "benchmarks.yaml"
    benchmarks.write_text(yaml.safe_dump(BENCHMARKS))
    with Sandbox(data=str(data), genie_answers=str(answers)) as sb:
        assert sorted(sb.workspace.warehouse.user_tables) == ["default.regions", "default.sales", "hr.staff"]
        assert [p.split(":")[0] for p in sb.problems] == ["broken.parquet", f"{answers}"]
        assert "line 6: not JSON" in sb.problems[1]
        DatabricksWorkspace(host=sb.host, token=sb.token).save("rehearsal-sandbox", overwrite=True)
        result = score(
            str(benchmarks),
            "rehearsal",
            "sandbox-warehouse",
            score_settings(genie_rpm=0, genie_poll_initial=0.05, genie_poll_max=0.2, genie_retry_attempts=0),
            workspace_block="rehearsal-sandbox",
            output_dir=str(tmp_path / "out"),
        )
        asked = [r["t"] for r in sb.requests("genie")]
    verdicts = {r["id"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {
        "b1": "correct",
        "b2": "incorrect",
        "b3": "sql_error",
        "b4": "no_sql",
        "b5": "genie_error",
        "b6": "no_sql",
    }
    reasons = {r["id"]: r["reason"] for r in result["rows"]}
    assert "No recorded answer" in reasons["b6"] and "Which period" in reasons["b4"]
    assert len(asked) == 6


def test_a_duckdb_file_and_unusable_paths(tmp_path, user_data):
    import duckdb

    db = tmp_path / "shop.duckdb"
    with duckdb.connect(str(db)) as conn:
        conn.execute("CREATE TABLE items AS SELECT range AS id, range * 2 AS price FROM range(5)")
    with Sandbox(data=str(db)) as sb:
        client = DatabricksWorkspace(host=sb.host, token=sb.token).client(10)
        result = run_sql(client, "sandbox-warehouse", "SELECT SUM(price) AS total FROM items", 10)
        assert float(result["rows"][0][0]) == 20
    with pytest.raises(UserDataError, match="no such file or folder"):
        Sandbox(data=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserDataError, match=r"no \.parquet or \.csv files"):
        Sandbox(data=str(tmp_path / "empty"))


def test_recorded_answers_give_one_answer_per_question(tmp_path):
    from sandbox.userdata import load_answers

    path = tmp_path / "answers.jsonl"
    same = {"question": "Total sales?", "sql": "SELECT SUM(amount) FROM sales"}
    path.write_text("\n".join(json.dumps(a) for a in [same, {**same, "question": " total  SALES? "}]))
    answers, problems = load_answers(str(path))
    assert len(answers) == 1 and problems == ["line 2: repeats line 1 (same answer; kept once)"]
    other = {"question": "total sales?", "sql": "SELECT SUM(amount) FROM sales WHERE region = 'north'"}
    path.write_text("\n".join(json.dumps(a) for a in [same, other]))
    with pytest.raises(UserDataError, match="line 2 answers the question of line 1 differently"):
        load_answers(str(path))


def test_sandbox_command_names_the_rehearsal_space(tmp_path, user_data):
    import os
    import subprocess
    import sys

    data, _ = user_data
    (tmp_path / "answers-ok.jsonl").write_text("\n".join(json.dumps(a) for a in ANSWERS))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchflows_cli",
            "sandbox",
            "--data",
            str(data),
            "--genie-answers",
            str(tmp_path / "answers-ok.jsonl"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    assert "--space-id rehearsal" in "".join(lines), lines
