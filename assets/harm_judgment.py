"""Harmfulness apart from refusal: the model's own judgment of whether a request is harmful, under steering."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets import checkpoints
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.harm_judgment import QUESTION, STEERING_ALPHAS, judgment_conditions, measure_harm_judgment
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.prompts import CURVE_SET, HARMLESS_SET, eval_set_prompts
from refusal_core.tables import HARM_JUDGMENT

JUDGED_SETS = (CURVE_SET, HARMLESS_SET)
"""The eval sets whose instructions the model judges: one harmful, one harmless."""


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def harm_judgment(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                  category_directions: pa.Table) -> dg.Output[Spool]:
    """The model asked whether each harmbench and alpaca_eval instruction is harmful (log-odds of yes vs no), unchanged, steered along the harmfulness and the refusal direction, and with the refusal direction ablated: steering along harmfulness should move the judgment, steering along refusal should not (Zhao et al., 2025)."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    eval_sets = eval_set_prompts(prompts, settings.eval_prompts_per_set)
    eval_sets = eval_sets.filter(pc.is_in(eval_sets["eval_set"], pa.array(JUDGED_SETS)))
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, category_directions=category_directions),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"eval_sets": list(JUDGED_SETS), "eval_prompts_per_set": settings.eval_prompts_per_set,
                                    "question": QUESTION, "alphas": list(STEERING_ALPHAS),
                                    "scale": "alpha * unit direction * length of the refusal direction",
                                    "interval": "wilson", "paired_interval": "newcombe"})}
    table = measure_harm_judgment(loaded, eval_sets, judgment_conditions(category_directions),
                                  checkpoints=checkpoints(context, study, lineage), log=context.log.info)
    staged = spool([table], HARM_JUDGMENT, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        _metadata_key(r): round(r["judged_harmful_rate"], 3) for r in table.to_pylist()})


def _metadata_key(row: dict) -> str:
    """judged_harmful/<eval set>/<kind>[/<direction>][/<alpha>]."""
    parts = [row["eval_set"], row["kind"], row["direction"], "" if row["alpha"] is None else f"{row['alpha']:g}"]
    return "judged_harmful/" + "/".join(part for part in parts if part)
