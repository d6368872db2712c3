"""The study's static HTML report, written next to its Parquet files."""

from pathlib import Path

import dagster as dg

from assets.figures import figures
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.lineage import code_version
from warehouse.lineage import lineage_tree
from warehouse.query import connect, named_query
from warehouse.report import REPORT_TABLES, render_report


@dg.asset(partitions_def=studies, group_name="report", kinds={"html"}, deps=[figures])
def report(context: dg.AssetExecutionContext, study: StudyResource) -> dg.MaterializeResult:
    """A static HTML page with the study's figures, main tables and the lineage of its results."""
    key = context.partition_key
    root = Path(study.warehouse_root)
    pngs = {p.stem: p for p in sorted((root / "figures" / f"model={key}").glob("*.png"))}
    with connect(root) as warehouse:
        tables = {name: warehouse.rows(named_query(name), key) for name in REPORT_TABLES}
    page = render_report(key, pngs, tables, lineage_tree(root, "intervention_effects", key) + [""] + lineage_tree(root, "feature_effects", key))
    path = root / "report" / f"model={key}" / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)), "n_figures": len(pngs), "url": dg.MetadataValue.url(path.as_uri()),
        # What the schedule compares to decide whether the study is stale.
        "study_sha256": study.study(key).fingerprint(), "code_version": code_version()})
