"""Generations with the refusal direction ablated or added, and the effects table that compares them with the baseline."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt
from refusal_core.directions import selected_direction
from refusal_core.evaluation import effect_rows, judged_generations
from refusal_core.interventions import Ablate, Add, describe
from refusal_core.prompts import eval_prompts
from refusal_core.scoring import answer_log_probs, completion_cross_entropy, kl_divergence, refusal_token_ids
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import EFFECTS, GENERATIONS


def direction_interventions(candidates: pa.Table) -> dict[str, tuple]:
    """The interventions of the directions study, with the labels each is applied to."""
    layer, direction = selected_direction(candidates)
    return {
        "ablate": (Ablate(direction.float()), ("harmful", "harmless", "over_refusal")),
        "add": (Add(direction.float(), layer, 1.0), ("harmless",)),
    }


@dg.asset(partitions_def=studies, group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def intervention_generations(
    context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, refusal_directions: pa.Table
) -> dg.Output[Spool]:
    """Greedy answers with the selected refusal direction ablated (every eval set) or added at its layer (harmless), judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    chosen = eval_prompts(prompts, settings.max_eval_prompts_per_label)
    tables = []
    classifier = study.classifier(loaded.study.key)
    for name, (intervention, labels) in direction_interventions(refusal_directions).items():
        subset = chosen.filter(pc.is_in(chosen["label"], pa.array(labels)))
        texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in subset["text"].to_pylist()]
        tables.append(judged_generations(
            loaded.model, loaded.tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(),
            loaded.study.key, refusal_token_ids(loaded.tokenizer), intervention, settings.max_new_tokens, settings.batch_size,
            classifier, subset["text"].to_pylist()))
        context.log.info("%s: %d generations", name, subset.num_rows)
    table = pa.concat_tables(tables)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts), "settings": to_json({"max_new_tokens": settings.max_new_tokens})}
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_generations": table.num_rows})


@dg.asset(partitions_def=studies, group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def intervention_effects(
    context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, refusal_directions: pa.Table,
    baseline_generations: pa.Table, intervention_generations: pa.Table,
) -> dg.Output[Spool]:
    """Refusal rate by each judge with bootstrap 95% intervals, mean refusal score, and KL and cross-entropy change on harmless prompts, per eval set x intervention."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    harmless = eval_prompts(prompts, settings.max_eval_prompts_per_label)
    harmless = harmless.filter(pc.equal(harmless["label"], "harmless"))
    texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in harmless["text"].to_pylist()]
    answers = dict(zip(baseline_generations["prompt_id"].to_pylist(), baseline_generations["completion"].to_pylist()))
    completions = [answers[i] for i in harmless["prompt_id"].to_pylist()]
    clean = answer_log_probs(loaded.model, loaded.tokenizer, texts, None, settings.batch_size)
    clean_loss = completion_cross_entropy(loaded.model, loaded.tokenizer, texts, completions, None, settings.batch_size)
    kl, cross_entropy = {"none": 0.0}, {"none": 0.0}
    for intervention, _ in direction_interventions(refusal_directions).values():
        identity = describe(intervention).id
        changed = answer_log_probs(loaded.model, loaded.tokenizer, texts, intervention, settings.batch_size)
        kl[identity] = float(kl_divergence(clean, changed).mean())
        loss = completion_cross_entropy(loaded.model, loaded.tokenizer, texts, completions, intervention, settings.batch_size)
        cross_entropy[identity] = float((loss - clean_loss).nanmean())
    generations = pa.concat_tables([baseline_generations, intervention_generations]).to_pylist()
    rows = effect_rows(loaded.study.key, generations, kl, cross_entropy, settings.seed)
    table = pa.Table.from_pylist(rows, schema=EFFECTS)
    lineage = {**model_lineage(loaded), **upstream_lineage(
        prompts=prompts, refusal_directions=refusal_directions, baseline_generations=baseline_generations,
        intervention_generations=intervention_generations), "prompt_set_sha256": content_sha256(prompts),
        "settings": to_json({"bootstrap_seed": settings.seed})}
    staged = spool([table], EFFECTS, study.staging_dir, lineage)
    summary = {f"{r['eval_set']}/{r['intervention_kind']}": round(r["refusal_rate"], 3) for r in rows if r["judge"] == "substring"}
    context.log.info("Refusal rate by substring: %s; KL on harmless: %s", summary, kl)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        **{f"refusal_rate/{k}": v for k, v in summary.items()}, **{f"kl/{k}": round(v, 4) for k, v in kl.items()},
        **{f"cross_entropy_change/{k}": round(v, 4) for k, v in cross_entropy.items()}})
