"""Dead services, wrong inputs and what the user is told: each case fails fast with one clear line, call
counts are exact, and what is printed works as printed (issue #18, defects 7 and 9-15)."""

from __future__ import annotations

import shlex

from typer.testing import CliRunner

from batchflows_cli import app

WIDE = {"COLUMNS": "400"}


def test_rerun_hint_after_score_sandbox_works_as_printed(prefect_api, tmp_path):
    benchmarks = tmp_path / "b.json"
    benchmarks.write_text(
        '[{"id": "q01", "question": "How many customers do we have?", "expected_sql": "SELECT 1"},'
        ' {"id": "bad", "question": "How many orders were placed in 2024?", "expected_sql": "SELECT * FROM nope"}]'
    )
    out = tmp_path / "out"
    scored = CliRunner().invoke(
        app,
        ["score", "--sandbox", "--benchmarks", str(benchmarks), "--genie-rpm", "0", "--output-dir", str(out)],
        env=WIDE,
    )
    assert scored.exit_code == 0, scored.output
    hint = next(line for line in scored.output.splitlines() if line.startswith("Rerun just the 1 failed rows: "))
    command = shlex.split(hint.split(": ", 1)[1])
    assert command[:2] == ["batchflows", "rerun-failed"] and command[-1] == "--sandbox"
    rerun = CliRunner().invoke(app, [*command[1:], "--fresh"], env=WIDE)
    assert rerun.exit_code == 0, rerun.output
    assert "Rerun 1 failed rows: 0 now judged, 1 still failed" in rerun.output
