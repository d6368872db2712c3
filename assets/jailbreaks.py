"""Jailbreaks: judged answers to jailbreaks and the prompts they wrap, test-set activations, and what the refusal features do."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints, noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.activations import capture_table
from refusal_core.directions import direction_row
from refusal_core.features import refusal_members
from refusal_core.jailbreaks import (FAMILIES, jailbreak_pairs, judge_jailbreaks, judged_prompts, shared_prefix_groups,
                                     summarize_jailbreaks)
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.probes import fitted_threshold
from refusal_core.prompts import wrapped_prompts
from refusal_core.readouts import feature_activations, projections
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.tables import GENERATIONS, JAILBREAK_PAIRS, JAILBREAK_SUMMARY


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def jailbreak_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """Greedy answers to DAN, GCG and tense jailbreaks and to the harmful prompts the paired ones wrap, judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens, "jailbreak_prompts": settings.jailbreak_prompts,
                                    "jailbreak_prompts_max": settings.jailbreak_prompts_max,
                                    "families": FAMILIES})}
    judged = judge_jailbreaks(loaded.study.key, loaded.model, loaded.tokenizer, prompts, settings.jailbreak_prompts,
                              loaded.study.chat_template, settings.max_new_tokens, settings.batch_size,
                              study.classifier(loaded.study.key), checkpoints(context, study, lineage),
                              settings.jailbreak_prompts_max)
    staged = spool([judged.table()], GENERATIONS, study.staging_dir, lineage)
    metadata = {f"answered_rate/{family}": round(rate, 3) for family, rate in judged.answered_rates.items()}
    context.log.info("Share of jailbreaks answered (substring judge): %s", metadata)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def eval_activations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                     baseline_generations: pa.Table, jailbreak_generations: pa.Table) -> dg.Output[Spool]:
    """Residual stream of every judged test prompt (baseline eval sets, jailbreaks and their base prompts), as in activations."""
    loaded = study.load(context.partition_key)
    selected = judged_prompts(prompts, baseline_generations, jailbreak_generations)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, baseline_generations=baseline_generations,
                                                           jailbreak_generations=jailbreak_generations),
               "prompt_set_sha256": content_sha256(prompts)}
    staged, metadata = capture_table(loaded, selected, study.staging_dir, lineage, {"prompts": "judged test prompts"},
                                     shared_prefix_groups(selected), checkpoints(context, study, lineage))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def jailbreak_analysis(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                       eval_activations: pa.Table, jailbreak_generations: pa.Table, saes: pa.Table,
                       feature_sets: pa.Table, category_directions: pa.Table) -> dg.Output[Spool]:
    """One row per (harmful prompt, jailbreak of it): judged refusal of both, the refusal features' activation on both and its drop, and both prompts on the refusal and harmfulness directions."""
    loaded = study.load(context.partition_key)
    members = refusal_members(feature_sets)
    ids, values = feature_activations(eval_activations, prompts, study_saes(loaded, saes), members)
    harmfulness = direction_row(category_directions, "harmfulness")
    threshold = fitted_threshold(activations, prompts, harmfulness, wrapped_prompts(prompts, jailbreak_generations))
    pairs = jailbreak_pairs(
        loaded.study.key, prompts,
        dict(zip(jailbreak_generations["prompt_id"].to_pylist(), jailbreak_generations["refused_substring"].to_pylist())),
        members, dict(zip(ids, values)), projections(eval_activations, direction_row(category_directions, "refusal")),
        projections(eval_activations, harmfulness), threshold)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations,
                                                           eval_activations=eval_activations, saes=saes,
                                                           jailbreak_generations=jailbreak_generations,
                                                           feature_sets=feature_sets, category_directions=category_directions),
               "settings": to_json({"feature_set": "cossim_ap", "judge": "substring", "harmfulness_threshold": threshold})}
    notes = noted(context, None if saes.num_rows else no_saes_note(loaded.study.key))
    staged = spool([pairs.table()], JAILBREAK_PAIRS, study.staging_dir, lineage, notes)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=pairs.counts)


@study_asset(group_name="analyses", kinds={"parquet"})
def jailbreak_summary(context: dg.AssetExecutionContext, study: StudyResource, jailbreak_analysis: pa.Table) -> dg.Output[Spool]:
    """Mean relative drop of the refusal features by jailbreak family and outcome (refused base prompts only), with bootstrap intervals, and what the harmfulness direction still sees."""
    key = context.partition_key
    seed = study.study(key).settings.seed
    summary = summarize_jailbreaks(key, jailbreak_analysis.to_pylist(), seed)
    lineage = {**upstream_lineage(jailbreak_analysis=jailbreak_analysis), "settings": to_json({"bootstrap_seed": seed})}
    staged = spool([summary.table()], JAILBREAK_SUMMARY, study.staging_dir, lineage, noted(context, *summary.notes))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"drop/{group}": round(drop, 3) for group, drop in summary.drops.items()})
