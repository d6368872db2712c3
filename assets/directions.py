"""The refusal direction: difference in means at every layer x position, selected by what ablating and adding it does."""

import dagster as dg
import pyarrow as pa

from assets import noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.directions import MIN_CATEGORY_PROMPTS, directions_by_category
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.selection import select_refusal_direction
from refusal_core.tables import DIRECTION_CANDIDATES, DIRECTIONS


@study_asset(group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_directions(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                       prompt_behaviour: pa.Table) -> dg.Output[Spool]:
    """Every candidate refusal direction (layer x post-instruction position) with its selection metrics; one row is selected."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    selection = select_refusal_direction(loaded, prompts, activations, prompt_behaviour)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations,
                                                           prompt_behaviour=prompt_behaviour),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"direction_candidates": settings.direction_candidates,
                                    "selection_prompts": settings.selection_prompts})}
    staged = spool([selection.table()], DIRECTION_CANDIDATES, study.staging_dir, lineage, noted(context, *selection.notes))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=selection.metadata())


@study_asset(group_name="directions", kinds={"parquet"})
def category_directions(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                        refusal_directions: pa.Table) -> dg.Output[Spool]:
    """A direction per harm category and for over-refusal at the refusal direction's place, and a harmfulness direction at the instruction's last token, each with its cosine to the refusal direction."""
    result = directions_by_category(prompts, activations, refusal_directions)
    for category, count in result.skipped.items():
        context.log.info("Category %s has %d prompts with activations (< %d); no direction.", category, count,
                         MIN_CATEGORY_PROMPTS)
    lineage = {**upstream_lineage(prompts=prompts, activations=activations, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"min_category_prompts": MIN_CATEGORY_PROMPTS})}
    staged = spool([result.table()], DIRECTIONS, study.staging_dir, lineage)
    cosines = {row["name"]: round(row["cosine_with_refusal"], 3) for row in result.rows}
    context.log.info("Cosine with the refusal direction: %s", cosines)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"cosine_with_refusal/{k}": v for k, v in cosines.items()})
