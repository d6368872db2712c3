"""Figures of a study, drawn only from the warehouse's named queries."""

import dagster as dg

from pipelines.metadata import png_metadata
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from warehouse.figures import FIGURES, save
from warehouse.query import connect, named_query


@study_asset(group_name="report", kinds={"png"},
          deps=["intervention_effects", "refusal_directions", "category_directions", "latent_attributions", "feature_sets",
                "feature_effects", "feature_count_curve", "refusal_along_sequence", "feature_edges", "refusal_probes", "jailbreak_summary", "capability", "harm_judgment"])
def figures(context: dg.AssetExecutionContext, study: StudyResource) -> dg.MaterializeResult:
    """PNG figures (refusal by intervention, capability under each intervention, direction selection, direction cosines, feature clamping, refusal against the number of latents clamped, attribution by layer, refusal along the sequence, upstream -> refusal features, probe comparison, jailbreak drop, harm judgment under steering) made from named queries."""
    key = context.partition_key
    root = study.warehouse
    metadata = {}
    with connect(root) as warehouse:
        for name, (query, draw) in FIGURES.items():
            rows = warehouse.rows(named_query(query), key)
            if not rows:
                context.log.warning("Query %s has no rows for %s; figure %s skipped.", query, key, name)
                continue
            metadata |= png_metadata(name, save(draw(rows, key), root / "figures" / f"model={key}" / f"{name}.png"))
    return dg.MaterializeResult(metadata=metadata)

