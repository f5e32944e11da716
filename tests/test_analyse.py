"""Item analysis: parallel and sequential give the same merge; failures become default analyses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flows.analyse import AnalyseSettings, analyse
from tasks.inputs import InputError

TEXTS = [
    "Prove that the sum of two even numbers is even.",
    "and conclude the same for any finite number of them.",
    "Compute the derivative of x squared.",
    "Sort a list of integers with merge sort and state its cost.",
    "...then argue why the merge step is linear.",
    "(continued) show the recurrence and solve it.",
    "Define a group and give two examples.",
    "Explain the pumping lemma for regular languages.",
    "continued: use it to show a language is not regular.",
    "Find the eigenvalues of a two by two matrix.",
]
SETTINGS = AnalyseSettings(batch_size=5, retry_delay=0.05)


def _items(tmp_path: Path, texts: list[str] = TEXTS) -> str:
    path = tmp_path / "items.jsonl"
    rows = [{"id": f"ex{n}", "position": n, "text": t} for n, t in enumerate(texts, start=1)]
    path.write_text("\n".join(json.dumps(r) for r in reversed(rows)))  # order comes from position, not the file
    return str(path)


def _run(tmp_path: Path, workspace_block: str, ledger_block: str, **kw: Any) -> dict[str, Any]:
    return analyse(
        input_path=_items(tmp_path),
        settings=kw.pop("settings", SETTINGS),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def test_parallel_and_sequential_merge_the_same(sb, workspace_block, tmp_path, prefect_api):
    from blocks.ledger import RowLedger

    RowLedger(path=str(tmp_path / "a.sqlite")).save("analyse-a", overwrite=True)
    RowLedger(path=str(tmp_path / "b.sqlite")).save("analyse-b", overwrite=True)
    sb.set_faults("chat", latency_ms=50)
    parallel = _run(tmp_path, workspace_block, "analyse-a")
    assert sb.stats()["chat"]["max_in_flight"] == 5
    sb.reset(clear_faults=False)
    sequential = _run(tmp_path, workspace_block, "analyse-b", sequential=True)
    assert sb.stats()["chat"]["max_in_flight"] == 1
    assert (
        parallel["merged"]
        == sequential["merged"]
        == [
            ["ex1", "ex2"],
            ["ex3"],
            ["ex4", "ex5", "ex6"],
            ["ex7"],
            ["ex8", "ex9"],
            ["ex10"],
        ]
    )
    groups = json.loads(Path(parallel["files"]["groups"]).read_text())
    assert groups[2]["text"].count("\n") == 2 and parallel["failed"] == 0


def test_a_failed_analysis_gets_a_default_and_the_rerun_asks_only_for_it(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("chat", script=["malformed"])  # the first call's reply is cut in half: not retried, invalid
    first = _run(tmp_path, workspace_block, ledger_block, sequential=True)
    assert (first["analysed"], first["failed"]) == (9, 1)
    [failure] = first["failures"]
    assert failure["row_key"] == "ex1" and failure["error_kind"] == "invalid_response"
    assert first["merged"][0] == ["ex1", "ex2"]  # a failed analysis is a standalone item; its fragment still joins
    sb.reset()
    second = _run(tmp_path, workspace_block, ledger_block)
    assert sb.stats()["chat"]["calls"] == 1
    assert (second["analysed"], second["failed"], second["cached"]) == (10, 0, 9)


def test_items_that_cannot_be_ordered_are_refused_naming_each_row(workspace_block, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,position,text\na,1,one\na,2,two\nb,1,three\nc,x,four\nd,5,\n")
    with pytest.raises(InputError) as info:
        analyse(input_path=str(path), workspace_block=workspace_block)
    assert str(info.value).splitlines()[1:] == [
        "row 2: duplicate id 'a' (first at row 1)",
        "row 3: position 1 already used by row 1",
        "row 4: position 'x' is not a number",
        "row 5 (id d): empty text",
    ]
