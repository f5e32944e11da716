"""Benchmark files (JSON, YAML or CSV): id, question, expected_sql, optional tags, validated row by row."""

from __future__ import annotations

import csv
import io
import json
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class BenchmarkFileError(ValueError):
    """A benchmarks file that cannot be used; the message names every problem and its row."""


class Benchmark(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    expected_sql: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.replace(";", ",").split(",") if t.strip()]
        return value or []

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


MAX_FILE_BYTES = 50 * 2**20  # far above any benchmark set; bounds what a file can make us allocate
_SHOWN = reprlib.Repr()  # error messages quote a bounded excerpt of what a file holds
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


def _records(path: Path) -> list[Any]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BenchmarkFileError(f"{path}: {size:,} bytes; a benchmarks file may hold {MAX_FILE_BYTES:,} at most")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkFileError(f"cannot read benchmarks file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            _no_aliases(text, path)
            data = yaml.safe_load(text)
        elif suffix == ".csv":  # a real CSV reader: quoted fields keep their line breaks
            data = list(csv.DictReader(io.StringIO(text, newline="")))
        else:
            raise BenchmarkFileError(f"{path}: unsupported format {suffix!r}; use .json, .yaml, .yml or .csv")
    except BenchmarkFileError:
        raise
    except (ValueError, yaml.YAMLError) as exc:
        raise BenchmarkFileError(f"{path}: not valid {suffix[1:].upper()}: {str(exc)[:500]}") from exc
    except RecursionError as exc:
        raise BenchmarkFileError(f"{path}: nested too deeply to be a list of benchmarks") from exc
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        data = data["benchmarks"]
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path}: expected a list of benchmarks (or {{'benchmarks': [...]}})")
    return data


def _no_aliases(text: str, path: Path) -> None:
    """Refuse YAML anchors and aliases: a benchmarks file has no use for them, and nested aliases expand
    exponentially (a 500-byte "billion laughs" file)."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise BenchmarkFileError(
                    f"{path}: line {line}: YAML aliases (*{str(event.anchor)[:40]}) are not allowed in a "
                    "benchmarks file; write each value out"
                )
    except yaml.YAMLError as exc:
        raise BenchmarkFileError(f"{path}: not valid YAML: {str(exc)[:500]}") from exc


def load_benchmarks(path: str | Path) -> list[Benchmark]:
    """Read and validate every row; raise one error listing all bad rows (nothing is dropped silently).

    Raises:
        BenchmarkFileError: unreadable file, wrong format, an invalid row, or a duplicate id.
    """
    path = Path(path)
    problems: list[str] = []
    benchmarks: list[Benchmark] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(_records(path), start=1):
        if not isinstance(record, dict):
            problems.append(f"row {number}: expected an object with id, question, expected_sql")
            continue
        try:
            benchmark = Benchmark.model_validate(
                {k: v for k, v in record.items() if v not in (None, "") or k != "tags"}
            )
        except ValidationError as exc:
            label = _SHOWN.repr(record.get("id")) if record.get("id") else "(no id)"
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
            problems.append(f"row {number} (id {label}): {details}")
            continue
        if benchmark.id in seen:
            problems.append(f"row {number}: duplicate id {benchmark.id!r} (first at row {seen[benchmark.id]})")
            continue
        seen[benchmark.id] = number
        benchmarks.append(benchmark)
    if problems:
        raise BenchmarkFileError(f"{path}: {len(problems)} invalid row(s):\n  " + "\n  ".join(problems))
    if not benchmarks:
        raise BenchmarkFileError(f"{path}: no benchmarks found")
    return benchmarks


def space_benchmarks(config: dict[str, Any] | None, space_id: str) -> tuple[list[Benchmark], list[str]]:
    """The benchmarks a space keeps (serialized_space.benchmarks.questions, each with an answer in SQL),
    and the ids of the questions left out because they have no SQL answer.

    A benchmark's id is the first 8 characters of the space's 32-character id (the whole id where two
    would share them); its question and SQL are their segments joined.

    Raises:
        InputError: the configuration cannot be read, or holds no benchmark with a SQL answer.
    """
    from tasks.inputs import InputError

    if config is None:
        raise InputError(
            f"space {space_id}: its configuration cannot be read with these credentials (reading its benchmarks "
            "needs CAN EDIT); pass a benchmarks file"
        )
    questions = (config.get("benchmarks") or {}).get("questions") or []
    short = [str(q.get("id", ""))[:8] for q in questions]
    found: list[Benchmark] = []
    skipped: list[str] = []
    for n, q in enumerate(questions):
        full_id = str(q.get("id") or f"benchmark-{n + 1}")
        sql = next(
            (
                "".join(a.get("content") or [])
                for a in q.get("answer") or []
                if str(a.get("format", "")).upper() == "SQL"
            ),
            "",
        )
        question = "".join(q.get("question") or []).strip()
        if not sql.strip() or not question:
            skipped.append(full_id)
            continue
        bid = short[n] if short[n] and short.count(short[n]) == 1 else full_id
        found.append(Benchmark(id=bid, question=question, expected_sql=sql.strip()))
    if not found:
        raise InputError(
            f"space {space_id} keeps no benchmark with a SQL answer ({len(questions)} question(s)); "
            "add benchmarks to the space or pass a benchmarks file"
        )
    return found, skipped


def repeated_questions(benchmarks: list[Benchmark]) -> list[list[str]]:
    """Ids of benchmarks that ask the same question, one list per question (Genie is asked it once)."""
    by_question: dict[str, list[str]] = {}
    for b in benchmarks:
        by_question.setdefault(b.question, []).append(b.id)
    return [ids for ids in by_question.values() if len(ids) > 1]
