"""Feature-count curves: refusal with the top k latents of each ranking clamped, and the fewest latents that halve it."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets import checkpoints, noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage, upstream_notes
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.chat import instruction_offset
from refusal_core.feature_curves import CURVE_SIZES, JUDGED_SIZES, measure_feature_count_curve, summary_table
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.prompts import CURVE_SET, eval_set_prompts
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.tables import FEATURE_COUNT_CURVE, FEATURE_COUNT_SUMMARY


@study_asset(group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def feature_count_curve(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, saes: pa.Table,
                        feature_sets: pa.Table, baseline_generations: pa.Table,
                        feature_generations: pa.Table) -> dg.Output[Spool]:
    """Refusal on the HarmBench test prompts with the first k latents of each ranking clamped: by refusal score at every k, by judged answers at k = 5 and 20; random per seeded draw and as their mean with a t interval."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, saes=saes, feature_sets=feature_sets,
                                                           baseline_generations=baseline_generations,
                                                           feature_generations=feature_generations),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"sizes": CURVE_SIZES, "judged_sizes": JUDGED_SIZES, "max_new_tokens": settings.max_new_tokens,
                                    "clamp_multiplier": settings.clamp_multiplier, "eval_set": CURVE_SET,
                                    "eval_prompts_per_set": settings.eval_prompts_per_set})}
    if saes.num_rows == 0:
        staged = spool([], FEATURE_COUNT_CURVE, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_rows": 0})
    eval_sets = eval_set_prompts(prompts, settings.eval_prompts_per_set)
    curve = measure_feature_count_curve(
        loaded, study_saes(loaded, saes), feature_sets, eval_sets.filter(pc.equal(eval_sets["eval_set"], CURVE_SET)),
        baseline_generations, feature_generations, settings.clamp_multiplier,
        instruction_offset(loaded.tokenizer, loaded.study.chat_template), study.classifier(loaded.study.key),
        log=context.log.info, checkpoints=checkpoints(context, study, lineage))
    staged = spool([curve.table()], FEATURE_COUNT_CURVE, study.staging_dir, lineage, noted(context, *curve.notes))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_rows": len(curve.rows)})


@study_asset(group_name="features", kinds={"parquet"})
def feature_count_summary(context: dg.AssetExecutionContext, study: StudyResource,
                          feature_count_curve: pa.Table) -> dg.Output[Spool]:
    """Per ranking (random: the mean over its draws) and judge, the fewest clamped latents that bring refusal to half the baseline or below, null when none does."""
    table = summary_table(feature_count_curve.to_pylist())
    lineage = {**upstream_lineage(feature_count_curve=feature_count_curve),
               "settings": to_json({"criterion": "refusal_rate <= baseline_refusal_rate / 2"})}
    staged = spool([table], FEATURE_COUNT_SUMMARY, study.staging_dir, lineage,
                   noted(context, *upstream_notes(feature_count_curve)))
    smallest = {f"smallest_n_latents/{r['feature_set']}/{r['judge']}": r["smallest_n_latents"] or "none"
                for r in table.to_pylist()}
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=smallest)
