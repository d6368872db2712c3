"""Generations with the refusal direction ablated or added, and the effects table that compares them with the baseline."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets import checkpoints
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.evaluation import effect_rows
from refusal_core.prompts import HARMLESS_SET, eval_set_prompts
from refusal_core.study_interventions import direction_interventions, harmless_costs, judged_interventions
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import EFFECTS, GENERATIONS


@study_asset(group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def intervention_generations(
    context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, refusal_directions: pa.Table
) -> dg.Output[Spool]:
    """Greedy answers with the selected refusal direction ablated (the harmful and over-refusal sets) or added at its layer (alpaca_eval), judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts), "settings": to_json({
                   "max_new_tokens": settings.max_new_tokens, "eval_prompts_per_set": settings.eval_prompts_per_set})}
    table = judged_interventions(loaded, eval_set_prompts(prompts, settings.eval_prompts_per_set),
                                 direction_interventions(refusal_directions), study.classifier(loaded.study.key),
                                 context.log.info, checkpoints(context, study, lineage))
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_generations": table.num_rows})


@study_asset(group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def intervention_effects(
    context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, refusal_directions: pa.Table,
    baseline_generations: pa.Table, intervention_generations: pa.Table,
) -> dg.Output[Spool]:
    """Refusal rate by each judge with Wilson 95% intervals and its paired difference from the baseline, mean refusal score, and KL and cross-entropy change on alpaca_eval, per eval set x intervention."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    eval_sets = eval_set_prompts(prompts, settings.eval_prompts_per_set)
    kl, cross_entropy = harmless_costs(loaded, eval_sets.filter(pc.equal(eval_sets["eval_set"], HARMLESS_SET)),
                                       baseline_generations, direction_interventions(refusal_directions))
    generations = pa.concat_tables([baseline_generations, intervention_generations]).to_pylist()
    rows = effect_rows(loaded.study.key, generations, baseline_generations.to_pylist(), kl, cross_entropy)
    table = pa.Table.from_pylist(rows, schema=EFFECTS)
    lineage = {**model_lineage(loaded), **upstream_lineage(
        prompts=prompts, refusal_directions=refusal_directions, baseline_generations=baseline_generations,
        intervention_generations=intervention_generations), "prompt_set_sha256": content_sha256(prompts),
        "settings": to_json({"interval": "wilson", "paired_interval": "newcombe"})}
    staged = spool([table], EFFECTS, study.staging_dir, lineage)
    summary = {f"{r['eval_set']}/{r['intervention_kind']}": round(r["refusal_rate"], 3) for r in rows if r["judge"] == "substring"}
    context.log.info("Refusal rate by substring: %s; KL on harmless: %s", summary, kl)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        **{f"refusal_rate/{k}": v for k, v in summary.items()}, **{f"kl/{k}": round(v, 4) for k, v in kl.items()},
        **{f"cross_entropy_change/{k}": round(v, 4) for k, v in cross_entropy.items()}})
