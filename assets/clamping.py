"""Generations with SAE feature sets clamped (harmful prompts) or set (harmless prompts), and their effects table."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints, noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage, upstream_notes
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.chat import instruction_offset
from refusal_core.evaluation import draw_mean_rows, effect_rows
from refusal_core.prompts import eval_set_prompts
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.study_interventions import INDUCED_SETS, feature_interventions, judged_interventions
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import EFFECTS, GENERATIONS

@study_asset(group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def feature_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, saes: pa.Table,
                        feature_sets: pa.Table, feature_edges: pa.Table) -> dg.Output[Spool]:
    """Greedy answers with the CosSim+AP latents multiplied by -m on every harmful eval set and every other feature set's (and the upstream set's) on the comparison sets, and the CosSim+AP and random sets set to a constant on alpaca_eval, judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, saes=saes, feature_sets=feature_sets,
                                                           feature_edges=feature_edges),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens, "clamp_multiplier": settings.clamp_multiplier,
                                    "induce_multiplier": settings.induce_multiplier, "induced_sets": INDUCED_SETS,
                                    "eval_prompts_per_set": settings.eval_prompts_per_set,
                                    "comparison_sets": settings.comparison_sets})}
    if saes.num_rows == 0:
        staged = spool([], GENERATIONS, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_generations": 0})
    applied = feature_interventions(study_saes(loaded, saes), feature_sets, feature_edges, settings.clamp_multiplier,
                                    instruction_offset(loaded.tokenizer, loaded.study.chat_template), settings.comparison_sets)
    table = judged_interventions(loaded, eval_set_prompts(prompts, settings.eval_prompts_per_set), applied,
                                 study.classifier(loaded.study.key), context.log.info, checkpoints(context, study, lineage))
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_generations": table.num_rows})


@study_asset(group_name="features", kinds={"parquet"})
def feature_effects(context: dg.AssetExecutionContext, study: StudyResource, baseline_generations: pa.Table,
                    feature_generations: pa.Table) -> dg.Output[Spool]:
    """Refusal rate by each judge with Wilson 95% intervals and its paired difference from the baseline, per eval set x feature-set intervention, and for random the mean over its draws with a t interval across them (query feature_table sets them beside direction ablation)."""
    key = context.partition_key
    rows = effect_rows(key, feature_generations.to_pylist(), baseline_generations.to_pylist())
    rows += draw_mean_rows(rows)
    table = pa.Table.from_pylist(rows, schema=EFFECTS)
    lineage = {**upstream_lineage(baseline_generations=baseline_generations, feature_generations=feature_generations),
               "settings": to_json({"interval": "wilson", "paired_interval": "newcombe",
                                    "random_draws": "mean with a t interval across draws"})}
    staged = spool([table], EFFECTS, study.staging_dir, lineage, noted(context, *upstream_notes(feature_generations)))
    summary = {f"{r['eval_set']}/{r['intervention_name']}": round(r["refusal_rate"], 3)
               for r in rows if r["judge"] == "substring"}
    context.log.info("Refusal rate by substring: %s", summary)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"refusal_rate/{k}": v for k, v in summary.items()})

