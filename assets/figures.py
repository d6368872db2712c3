"""Figures of a study, drawn only from the warehouse's named queries."""

import base64

import dagster as dg

from assets.directions import category_directions, refusal_directions
from assets.edges import feature_edges
from assets.clamping import feature_effects
from assets.features import feature_sets, latent_attributions
from assets.interventions import intervention_effects
from assets.jailbreaks import jailbreak_summary
from assets.probes import refusal_probes
from assets.sequence import refusal_along_sequence
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.storage import Location
from warehouse.figures import FIGURES, save
from warehouse.query import connect, named_query


@dg.asset(partitions_def=studies, group_name="report", kinds={"png"},
          deps=[intervention_effects, refusal_directions, category_directions, latent_attributions, feature_sets,
                feature_effects, refusal_along_sequence, feature_edges, refusal_probes, jailbreak_summary])
def figures(context: dg.AssetExecutionContext, study: StudyResource) -> dg.MaterializeResult:
    """PNG figures (refusal by intervention, direction selection, direction cosines, feature clamping, attribution by layer, refusal along the sequence, upstream -> refusal features, probe comparison, jailbreak drop) made from named queries."""
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


def png_metadata(name: str, path: Location) -> dict:
    """A PNG as asset metadata: the picture itself (shown in the Dagster UI) and its path."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return {name: dg.MetadataValue.md(f"![{name}](data:image/png;base64,{encoded})"),
            f"{name}_path": dg.MetadataValue.path(str(path))}
