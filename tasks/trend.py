"""A space's score trend from its history: a table (per run: score, version change, flipped benchmarks),
its markdown for the Prefect UI, and one self-contained HTML file with plotly charts (the plotly.js
bundle is inlined, so the file opens offline)."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from typing import Any

GOOD, BAD = "correct", "incorrect"


def trend_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run (oldest first): when, score, version and what changed since the run before."""
    out = []
    previous: dict[str, Any] | None = None
    for run in runs:
        changed = ""
        flipped: list[str] = []
        if previous is not None:
            if run["version"] != previous["version"]:
                changed = f"v{previous['version']} -> v{run['version']}"
            for benchmark, verdict in sorted(run["verdicts"].items()):
                before = previous["verdicts"].get(benchmark)
                if before is not None and before != verdict:
                    sign = "+" if verdict == GOOD else "-" if before == GOOD else "~"
                    flipped.append(f"{sign}{benchmark}")
        figures = run["figures"]
        out.append(
            {
                "run": run["run_id"][:8],
                "when": run["created_at"][:16].replace("T", " "),
                "version": run["version"],
                "score": run["score"],
                "correct": f"{run['correct']}/{run['total']}",
                "config_change": changed,
                "flipped": " ".join(flipped),
                "flaky": ", ".join(run["flaky"]),
                "genie_p50_s": figures.get("genie_latency_p50_s"),
                "genie_p95_s": figures.get("genie_latency_p95_s"),
                "breaker_events": len(run["breaker_events"]),
                "adaptive": _adaptive(figures),
            }
        )
        previous = run
    return out


def _adaptive(figures: dict[str, Any]) -> str:
    """Where each adaptive phase's concurrency went in the run, e.g. "genie 3→5 (lowest 2)"."""
    return ", ".join(
        f"{p['phase']} {a['start']}→{a['level']}" + (f" (lowest {a['lowest']})" if a["lowest"] < a["level"] else "")
        for p in figures.get("phases", [])
        if (a := p.get("adaptive"))
    )


def trend_markdown(space_id: str, rows: list[dict[str, Any]], report: str | None, last: int = 10) -> str:
    """The last `last` runs as a markdown table, newest last, with a link to the HTML report."""
    shown = rows[-last:]
    lines = [
        f"# Score trend of {space_id}: last {len(shown)} of {len(rows)} runs",
        "",
        "| run | when (UTC) | version | score | correct | config change | flipped | flaky | Genie p50/p95 s "
        "| breaker | adaptive concurrency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['when']} | v{r['version']} | {r['score']:.1%} | {r['correct']} | {r['config_change']} | "
        f"{r['flipped']} | {r['flaky']} | {r['genie_p50_s']}/{r['genie_p95_s']} | {r['breaker_events']} | "
        f"{r['adaptive']} |"
        for r in shown
    ]
    if len(rows) > 1:
        delta = rows[-1]["score"] - rows[-2]["score"]
        lines += ["", f"This run: {rows[-1]['score']:.1%} ({delta:+.1%} against the run before)."]
    if report:
        lines += ["", f"Charts: [{Path(report).name}]({Path(report).resolve().as_uri()}) (`{report}`)"]
    return "\n".join(lines)


def write_html(space_id: str, runs: list[dict[str, Any]], path: Path) -> Path:
    """The history of a space as one HTML file: score over time, per-benchmark stability, Genie latency
    and breaker events, and the trend table.

    The charts are plotly figures written as plain dicts (plotly's figure objects validate and copy every
    property: a third of the page's time for nothing, as these are fixed here), and the 4.8 MB plotly.js bundle
    goes in as bytes encoded once per process."""
    from plotly.io import to_html

    rows = trend_rows(runs)
    labels = [f"{r['when']} ({r['run']})" for r in rows]
    score = {
        "data": [
            {
                "type": "scatter",
                "x": labels,
                "y": [r["score"] * 100 for r in rows],
                "mode": "lines+markers+text",
                "text": [f"v{r['version']}" if r["config_change"] or i == 0 else "" for i, r in enumerate(rows)],
                "textposition": "top center",
                "name": "score",
            }
        ],
        "layout": {
            "title": {"text": "Score over time (%; labels mark configuration versions)"},
            "yaxis": {"range": [0, 105]},
        },
    }

    benchmarks = sorted({b for run in runs for b in run["verdicts"]})
    code = {GOOD: 1.0, BAD: 0.0}
    flaky = set(runs[-1]["flaky"]) if runs else set()
    heat = {
        "data": [
            {
                "type": "heatmap",
                "z": [[code.get(run["verdicts"].get(b, ""), 0.5) for run in runs] for b in benchmarks],
                "x": labels,
                "y": [f"{b} (flaky)" if b in flaky else b for b in benchmarks],
                "text": [
                    [f"{b} in {run['run_id'][:8]}: {run['verdicts'].get(b, 'not scored')}" for run in runs]
                    for b in benchmarks
                ],
                "hoverinfo": "text",
                "colorscale": [[0, "#d62728"], [0.5, "#bbbbbb"], [1, "#2ca02c"]],
                "zmin": 0,
                "zmax": 1,
                "showscale": False,
            }
        ],
        "layout": {
            "title": {"text": "Per-benchmark stability (green correct, red incorrect, grey failed or not scored)"},
            "height": max(300, 18 * len(benchmarks) + 120),
        },
    }

    latency = {
        "data": [
            {"type": "scatter", "x": labels, "y": [r[key] for r in rows], "mode": "lines+markers", "name": name}
            for key, name in (("genie_p50_s", "Genie p50 s"), ("genie_p95_s", "Genie p95 s"))
        ]
        + [
            {
                "type": "bar",
                "x": labels,
                "y": [r["breaker_events"] for r in rows],
                "name": "breaker transitions",
                "opacity": 0.4,
                "yaxis": "y2",
            }
        ],
        "layout": {
            "title": {"text": "Genie latency and circuit-breaker transitions per run"},
            "yaxis": {"rangemode": "tozero", "title": {"text": "seconds"}},
            "yaxis2": {
                "rangemode": "tozero",
                "dtick": 1,
                "title": {"text": "transitions"},
                "overlaying": "y",
                "side": "right",
            },
        },
    }

    charts = [
        to_html(figure, full_html=False, include_plotlyjs=False, div_id=f"chart-{i}", validate=False)
        for i, figure in enumerate((score, heat, latency))
    ]
    columns = [
        "run",
        "when",
        "version",
        "score",
        "correct",
        "config_change",
        "flipped",
        "flaky",
        "breaker_events",
        "adaptive",
    ]
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in reversed(rows)
    )
    head = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>batchflows history: {html.escape(space_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}</style></head>
<body><h1>Score history of Genie space {html.escape(space_id)}</h1>
<p>{len(runs)} scoring runs; latest score {rows[-1]["score"]:.1%}.</p>
"""
    body = f"""{"".join(charts)}
<h2>Runs, newest first</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{table}</table>
</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.writelines((head.encode(), _plotly_script(), body.encode()))
    return path


@cache
def _plotly_script() -> bytes:
    """plotly.js in a script element, so the page draws its charts offline."""
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>\n'.encode()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"
    return "" if value is None else str(value)
