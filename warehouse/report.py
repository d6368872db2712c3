"""A static HTML report of a study: its figures, its main tables and the lineage of each table."""

from __future__ import annotations

import base64
import html
from pathlib import Path

SECTIONS = (
    ("Behaviour and judges", ("table:judge_agreement",)),
    ("Directions", ("direction_selection", "table:direction_selection", "category_cosines", "table:category_cosines",
                    "refusal_along_sequence")),
    ("SAEs", ("table:sae_quality",)),
    ("Features", ("attribution_by_layer", "feature_count_curve", "table:feature_count_summary", "table:feature_cards",
                  "feature_graph", "table:feature_edges")),
    ("Interventions", ("refusal_by_intervention", "table:main_table", "feature_clamping", "table:feature_table",
                       "capability_by_intervention",
                       "table:capability_table")),
    ("Analyses", ("jailbreak_drop", "table:jailbreak_summary", "probe_comparison", "table:probe_comparison",
                  "table:latent_guard", "harm_judgment", "table:harm_judgment")),
)
"""The report's sections in study order: figures by name and named-query tables as `table:NAME`; the findings and
`paper_table` (a row per method, a column per eval set) open the page."""

REPORT_TABLES = ("paper_table", *(item.removeprefix("table:") for _, items in SECTIONS for item in items
                                    if item.startswith("table:")))
"""Named queries shown as tables in the report."""

CAPTIONS = {
    "refusal_by_intervention": "Refusal per eval set with the refusal direction ablated or added: look for ablation near 0 "
                               "on the harmful sets and addition high on alpaca_eval.",
    "direction_selection": "Every candidate direction's cosine score by layer and position; the selected one is marked.",
    "category_cosines": "Cosines between the per-category, harmfulness and refusal directions: how far they are one direction.",
    "feature_clamping": "Refusal with each feature set clamped (on the comparison sets) or set (alpaca_eval), beside direction "
                        "ablation: informed sets should beat random.",
    "capability_by_intervention": "ARC-Challenge and MMLU accuracy under each intervention: what the interventions cost.",
    "feature_count_curve": "Refusal against the number of latents clamped, one line per ranking (random with its band across "
                           "draws); the dashed line is half the baseline.",
    "attribution_by_layer": "Attribution-patching scores of the candidate latents by layer: where the refusal features sit.",
    "refusal_along_sequence": "Projection on the refusal direction along the prompt and answer: where harmful and harmless separate.",
    "feature_graph": "Upstream latents whose clamping lowers the refusal features: the edges of the feature graph.",
    "probe_comparison": "Probes predicting refusal from each feature set, in distribution and on jailbreaks.",
    "jailbreak_drop": "How much jailbreaks lower the refusal features, succeeded vs failed.",
    "harm_judgment": "How often the model judges a request harmful when asked, steered along the harmfulness or the refusal "
                     "direction: harmfulness should move the judgment out of the baseline's band, refusal should not.",
}
"""One line per figure saying what to look for."""

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
          "th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow-x:auto}")


def feature_page_name(layer: int, latent: int) -> str:
    """The feature page's file name, in the study's report folder's `features/`."""
    return f"L{layer}-{latent}.html"


def render_report(study: str, figures: dict[str, Path], tables: dict[str, list[dict]], lineage: list[str],
                  notes: dict[str, list[str]] | None = None, feature_pages: list[tuple[str, str]] = (),
                  said: list[str] = ()) -> str:
    """The report page: the paper-style table and the findings (`said`), a table of contents, then SECTIONS in study
    order (figures inlined as PNG data with their captions, named-query tables), the steps' notes (note -> the tables
    that carry it) and the lineage as text."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>refusal-sae report: {esc(study)}</title>",
        f"<style>{_STYLE}</style>",
        f"</head><body><h1>Refusal study: {esc(study)}</h1>",
        "<h2 id='findings'>Findings</h2>",
        "<ul>" + "".join(f"<li>{esc(sentence)}</li>" for sentence in said) + "</ul>" if said else "<p>(no findings yet)</p>",
        "<h3 id='table-paper_table'>Refusal by method and eval set</h3>", _table(tables.get("paper_table", [])),
        "<nav id='contents'><h2>Contents</h2><ol>",
        *(f"<li><a href='#{_anchor(title)}'>{esc(title)}</a></li>" for title, _ in SECTIONS),
        *(["<li><a href='#notes'>Notes</a></li>"] if notes else []), "<li><a href='#lineage'>Lineage</a></li></ol></nav>",
    ]
    shown = set()
    for title, items in SECTIONS:
        parts.append(f"<h2 id='{_anchor(title)}'>{esc(title)}</h2>")
        for item in items:
            name = item.removeprefix("table:")
            if item.startswith("table:"):
                parts.append(f"<h3 id='table-{name}'>{esc(name.replace('_', ' '))}</h3>" + _table(tables.get(name, [])))
                if name == "feature_cards" and feature_pages:
                    parts.append("<p>A page per selected latent:</p><ul id='feature-pages'>" + "".join(
                        f"<li><a href='features/{esc(href)}'>{esc(label)}</a></li>" for label, href in feature_pages)
                        + "</ul>")
            elif name in figures:
                shown.add(name)
                parts.append(_figure(name, figures[name]))
    parts += [_figure(name, path) for name, path in figures.items() if name not in shown]  # one no section names
    if notes:
        parts.append("<h2 id='notes'>Notes</h2><ul>" + "".join(
            f"<li>{esc(note)} <em>({esc(', '.join(where))})</em></li>" for note, where in notes.items()) + "</ul>")
    parts.append("<h2 id='lineage'>Lineage</h2><pre>" + esc("\n".join(lineage)) + "</pre></body></html>")
    return "\n".join(parts)


def _figure(name: str, path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(CAPTIONS.get(name, name.replace('_', ' ')))}</figcaption></figure>")


def _anchor(title: str) -> str:
    return "section-" + title.lower().replace(" ", "-")


def render_feature_page(study: str, card: dict, edges: list[dict], histogram: bytes) -> str:
    """One selected latent's page: its scores and sets, the prompts that activate it most (peak token marked), its
    activation distribution on harmful vs harmless prompts, the tokens its decoder direction promotes and suppresses,
    its upstream and downstream edges, and its Neuronpedia page when hosted. `card` is a FEATURE_CARDS row, `edges`
    the study's FEATURE_EDGES rows."""
    layer, latent = card["layer_index"], card["latent_index"]
    title = f"Layer {layer}, latent {latent}"
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}: {esc(study)}</title><style>{_STYLE}mark{{background:#ffe08a}}</style></head><body>",
        f"<p><a href='../index.html'>&larr; report of {esc(study)}</a></p><h1>{esc(title)}</h1>",
        f"<p>Feature sets: {esc(', '.join(card['feature_sets']))}."
        + (f" <a href='{esc(card['neuronpedia_url'])}'>Neuronpedia</a>." if card.get("neuronpedia_url") else "") + "</p>",
        "<h2 id='scores'>Scores</h2>" + _table([{k: card[k] for k in ("decoder_cosine", "activation_difference", "attribution")}]),
        "<h2 id='top-prompts'>Prompts that activate it most</h2><ol>",
        *(f"<li>{esc(p['text'])} <em>({esc(p['label'])})</em>: peaks at <mark>{esc(p['token'])}</mark> "
          f"({p['activation']:.3g})</li>" for p in card["top_prompts"]),
        "</ol>",
        "<h2 id='distribution'>Activation on harmful vs harmless prompts</h2>",
        f"<img alt='distribution' src='data:image/png;base64,{base64.b64encode(histogram).decode()}'>",
        _table([_peaks(label, card[f"{label}_peaks"]) for label in ("harmful", "harmless")]),
        "<h2 id='tokens'>Tokens its decoder direction promotes and suppresses</h2>",
        _table([{"promoted": p["token"], "logit": p["logit"], "suppressed": s["token"], "logit ": s["logit"]}
                for p, s in zip(card["promoted_tokens"], card["suppressed_tokens"])]),
        "<h2 id='upstream'>Upstream: latents whose clamping changes it</h2>",
        _table([_edge(e, "upstream") for e in edges if (e["downstream_layer"], e["downstream_latent"]) == (layer, latent)]),
        "<h2 id='downstream'>Downstream: refusal features its clamping changes</h2>",
        _table([_edge(e, "downstream") for e in edges if (e["upstream_layer"], e["upstream_latent"]) == (layer, latent)]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _peaks(label: str, values: list[float]) -> dict:
    active = [v for v in values if v > 0]
    return {"prompts": label, "n": len(values), "share active": len(active) / len(values) if values else None,
            "mean": sum(values) / len(values) if values else None, "max": max(values, default=None)}


def _edge(edge: dict, side: str) -> dict:
    other = (edge["upstream_layer"], edge["upstream_latent"]) if side == "upstream" else (
        edge["downstream_layer"], edge["downstream_latent"])
    return {"layer": other[0], "latent": "sum of the set" if other[1] is None else other[1], "effect": edge["effect"],
            "ci_low": edge["ci_low"], "ci_high": edge["ci_high"], "n_prompts": edge["n_prompts"],
            "in_upstream_set": edge["in_upstream_set"]}


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
