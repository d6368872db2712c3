"""What the interventions cost the model's abilities: multiple-choice accuracy and harmless answers under each one."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets import checkpoints, noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.benchmarks import benchmark_questions
from refusal_core.capability import capability_interventions, costs_from_effects, measure_capability, no_clamps_note
from refusal_core.chat import instruction_offset
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.prompts import HARMLESS_SET, eval_set_prompts
from refusal_core.saes import study_saes
from refusal_core.study_interventions import direction_interventions, feature_interventions
from refusal_core.tables import CAPABILITY


@study_asset(group_name="capability", pool="gpu", kinds={"parquet", "pytorch"})
def capability(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, refusal_directions: pa.Table,
               saes: pa.Table, feature_sets: pa.Table, feature_edges: pa.Table, baseline_generations: pa.Table,
               intervention_effects: pa.Table) -> dg.Output[Spool]:
    """0-shot ARC-Challenge and MMLU accuracy (Wilson 95% intervals, paired differences from the baseline) and the KL and cross-entropy change of the baseline's answers on harmless prompts, under the baseline, direction ablation and addition, and CosSim+AP and random clamping."""
    settings = study.study(context.partition_key).settings
    fetched = study.benchmark_sources()  # checked by sha256 before the model loads
    questions = benchmark_questions(fetched, settings.capability_arc_questions, settings.capability_mmlu_per_subject)
    loaded = study.load(context.partition_key)
    features = {} if saes.num_rows == 0 else feature_interventions(
        study_saes(loaded, saes), feature_sets, feature_edges, settings.clamp_multiplier,
        instruction_offset(loaded.tokenizer, loaded.study.chat_template))
    interventions = capability_interventions(direction_interventions(refusal_directions), features)
    lineage = {**model_lineage(loaded), **upstream_lineage(
        prompts=prompts, refusal_directions=refusal_directions, saes=saes, feature_sets=feature_sets,
        feature_edges=feature_edges, baseline_generations=baseline_generations, intervention_effects=intervention_effects),
        "prompt_set_sha256": content_sha256(prompts), "settings": to_json({
            "capability_arc_questions": settings.capability_arc_questions, "clamp_multiplier": settings.clamp_multiplier,
            "capability_mmlu_per_subject": settings.capability_mmlu_per_subject, "interval": "wilson",
            "paired_interval": "newcombe", "sources": [item.source.lineage() for item in fetched]})}
    eval_sets = eval_set_prompts(prompts, settings.eval_prompts_per_set)
    table = measure_capability(loaded, questions, interventions, eval_sets.filter(pc.equal(eval_sets["eval_set"], HARMLESS_SET)),
                               baseline_generations, costs_from_effects(intervention_effects),
                               checkpoints(context, study, lineage), context.log.info)
    notes = noted(context, no_clamps_note(loaded.study.key) if saes.num_rows == 0 else None)
    staged = spool([table], CAPABILITY, study.staging_dir, lineage, notes)
    accuracy = {f"accuracy/{r['benchmark']}/{r['intervention_name']}": round(r["accuracy"], 3) for r in table.to_pylist()}
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_questions": len(questions), **accuracy})
