"""A static HTML report of a study: its figures, its main tables and the lineage of each table."""

from __future__ import annotations

import base64
import html
from pathlib import Path

REPORT_TABLES = ("main_table", "capability_table", "feature_table", "feature_count_summary", "direction_selection", "category_cosines",
                 "sae_quality", "feature_cards", "jailbreak_summary", "probe_comparison", "latent_guard", "feature_edges", "judge_agreement")
"""Named queries shown as tables in the report."""

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
          "th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow-x:auto}")


def render_report(study: str, figures: dict[str, Path], tables: dict[str, list[dict]], lineage: list[str],
                  notes: dict[str, list[str]] | None = None) -> str:
    """The report page: the steps' notes (note -> the tables that carry it), figures inlined as PNG data, tables as
    HTML tables, the lineage as text."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>refusal-sae report: {html.escape(study)}</title>",
        f"<style>{_STYLE}</style>",
        f"</head><body><h1>Refusal study: {html.escape(study)}</h1>",
    ]
    if notes:
        parts.append("<h2 id='notes'>Notes</h2><ul>" + "".join(
            f"<li>{html.escape(note)} <em>({html.escape(', '.join(where))})</em></li>" for note, where in notes.items())
            + "</ul>")
    for name, path in figures.items():
        encoded = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{html.escape(name.replace('_', ' '))}</figcaption></figure>")
    for name, rows in tables.items():
        parts.append(f"<h2 id='table-{name}'>{html.escape(name.replace('_', ' '))}</h2>")
        parts.append(_table(rows))
    parts.append("<h2 id='lineage'>Lineage</h2><pre>" + html.escape("\n".join(lineage)) + "</pre></body></html>")
    return "\n".join(parts)


def render_index(rows: list[dict], figure: Path | None) -> str:
    """The overview page of every study: the cross-study figure and table, and a link to each study's report."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>refusal-sae: all studies</title>",
        f"<style>{_STYLE}</style></head><body><h1>All studies</h1><ul id='studies'>",
        *(f"<li><a href='model={html.escape(r['model'])}/index.html'>{html.escape(r['model'])}</a></li>" for r in rows),
        "</ul>",
    ]
    if figure is not None:
        encoded = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<figure id='cross_study'><img alt='cross_study' src='data:image/png;base64,{encoded}'></figure>")
    parts.append("<h2 id='table-cross_study'>cross study</h2>" + _table_all(rows) + "</body></html>")
    return "\n".join(parts)


def _table_all(rows: list[dict]) -> str:
    """A table that keeps the `model` column (the per-study pages drop it)."""
    return _table([{"study": r["model"], **{k: v for k, v in r.items() if k != "model"}} for r in rows])


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    columns = [c for c in rows[0] if c != "model"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
