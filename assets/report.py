"""The study's static HTML report, written next to its Parquet files."""

import json

import dagster as dg

from pipelines.metadata import png_metadata
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.parquet import file_metadata, read_parquet
from refusal_core.storage import Location, uri, write_atomically
from refusal_core.tables import NOTES_KEY, TABLES
from warehouse.findings import findings
from warehouse.lineage import lineage_tree
from warehouse.query import connect, named_query
from warehouse.figures import FIGURES, cross_study, peak_histogram, png_bytes, save
from warehouse.report import REPORT_TABLES, feature_page_name, render_feature_page, render_index, render_report


LINEAGE_SHOWN = ("intervention_effects", "capability", "feature_effects", "feature_count_summary", "jailbreak_summary", "refusal_probes", "latent_guard", "harm_judgment")
"""Result tables whose lineage the report prints, each back to the weights."""


@study_asset(group_name="report", kinds={"html"}, deps=["figures", "latent_guard", "judge_validation", "feature_cards", "feature_edges"])
def report(context: dg.AssetExecutionContext, study: StudyResource) -> dg.MaterializeResult:
    """A static HTML page with the study's figures, main tables and the lineage of its results, and the overview page of every study."""
    key = context.partition_key
    root = study.warehouse
    pngs = {p.stem: p for p in sorted((root / "figures" / f"model={key}").glob("*.png"))}
    with connect(root) as warehouse:
        tables = {name: warehouse.rows(named_query(name), key) for name in REPORT_TABLES}
        said = findings(lambda name: tables[name] if name in tables else warehouse.rows(named_query(name), key))
    lineage = [line for name in LINEAGE_SHOWN for line in [*lineage_tree(root, name, key), ""]]
    pages = feature_pages(root, key)
    page = render_report(key, pngs, tables, lineage[:-1], study_notes(root, key, pngs), pages, said)
    path = _write(root / "report" / f"model={key}" / "index.html", page)
    # The overview of every study in the warehouse, redrawn whenever one of them is reported.
    with connect(root) as warehouse:
        every = warehouse.sql(named_query("cross_study")).to_arrow_table().to_pylist()
    figure = save(cross_study(every), root / "figures" / "cross_study.png") if every else None
    overview = _write(root / "report" / "index.html", render_index(every, figure))
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)), "n_figures": len(pngs), "url": dg.MetadataValue.url(uri(path)),
        "overview": dg.MetadataValue.url(uri(overview)), "n_studies": len(every),
        **(png_metadata("cross_study", figure) if figure else {})})


def feature_pages(root: Location, key: str) -> list[tuple[str, str]]:
    """Write a page per feature card next to the study's report; return (label, file name) of each, in card order."""
    cards_path, edges_path = (root / name / f"model={key}" / "data.parquet" for name in ("feature_cards", "feature_edges"))
    if not cards_path.exists():
        return []
    edges = read_parquet(edges_path).to_pylist() if edges_path.exists() else []
    written = []
    for card in read_parquet(cards_path).to_pylist():
        layer, latent = card["layer_index"], card["latent_index"]
        histogram = png_bytes(peak_histogram(card["harmful_peaks"], card["harmless_peaks"], f"{key}: layer {layer}, latent {latent}"))
        name = feature_page_name(layer, latent)
        _write(root / "report" / f"model={key}" / "features" / name, render_feature_page(key, card, edges, histogram))
        written.append((f"layer {layer}, latent {latent} ({', '.join(card['feature_sets'])})", name))
    return written


def study_notes(root: Location, key: str, pngs: dict) -> dict[str, list[str]]:
    """Every note of the study's tables (from their Parquet metadata) -> the tables carrying it, and a note per figure
    left out because its query had no rows."""
    notes: dict[str, list[str]] = {}
    for name in TABLES:
        path = root / name / f"model={key}" / "data.parquet"
        if path.exists():
            for note in json.loads(file_metadata(path).get(NOTES_KEY, "[]")):
                notes.setdefault(note, []).append(name)
    for name, (query, _) in FIGURES.items():
        if name not in pngs:
            notes.setdefault(f"Figure {name} is left out: its query {query} has no rows for this study.", []).append("figures")
    return notes


def _write(path: Location, page: str) -> Location:
    """Write `page` to `path` in one step, so a reader never sees half a page."""
    return write_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
