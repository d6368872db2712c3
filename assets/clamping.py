"""Generations with SAE feature sets clamped (harmful prompts) or set (harmless prompts), and their effects table."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt, instruction_offset
from refusal_core.evaluation import effect_rows, judged_generations
from refusal_core.interventions import Clamp, SaeLatents
from refusal_core.models import LoadedModel
from refusal_core.prompts import eval_prompts
from refusal_core.saes import study_saes
from refusal_core.scoring import refusal_token_ids
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import EFFECTS, GENERATIONS

INDUCED_SETS = ("cossim_ap", "random")
"""Feature sets also set on harmless prompts to induce refusal (the method and its control)."""


def feature_interventions(loaded: LoadedModel, saes: pa.Table, feature_sets: pa.Table,
                          feature_edges: pa.Table) -> dict[str, tuple]:
    """`name -> (intervention, labels)`: every set clamped to -m on harmful prompts; INDUCED_SETS set on harmless ones.

    The upstream set (feature_edges' latents that lower the refusal features) is clamped too, alone.
    """
    items = study_saes(loaded, saes)
    settings = loaded.study.settings
    skip = instruction_offset(loaded.tokenizer, loaded.study.chat_template)
    sets: dict[str, list[dict]] = {}
    for member in feature_sets.to_pylist():
        sets.setdefault(member["feature_set"], []).append(member)
    upstream = feature_edges.filter(feature_edges["in_upstream_set"])
    upstream = sorted(set(zip(upstream["upstream_layer"].to_pylist(), upstream["upstream_latent"].to_pylist())))
    if upstream:
        sets["upstream"] = [{"layer_index": layer, "latent_index": latent} for layer, latent in upstream]
    result = {}
    for name, members in sets.items():
        by_layer: dict[int, list[dict]] = {}
        for member in members:
            by_layer.setdefault(member["layer_index"], []).append(member)

        def targets(induce: bool) -> tuple[SaeLatents, ...]:
            return tuple(SaeLatents(layer, items[layer].sae, items[layer].weights_sha256,
                                    tuple(m["latent_index"] for m in layer_members),
                                    tuple(m["induce_value"] for m in layer_members) if induce else None)
                         for layer, layer_members in sorted(by_layer.items()))

        result[f"clamp:{name}"] = (Clamp(targets(induce=False), -settings.clamp_multiplier, skip, name), ("harmful",))
        if name in INDUCED_SETS:
            result[f"induce:{name}"] = (Clamp(targets(induce=True), None, skip, name), ("harmless",))
    return result


@dg.asset(partitions_def=studies, group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def feature_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, saes: pa.Table,
                        feature_sets: pa.Table, feature_edges: pa.Table) -> dg.Output[Spool]:
    """Greedy answers with each feature set's latents (and the upstream set's) multiplied by -m on harmful test prompts, and the CosSim+AP and random sets set to a constant on harmless ones, judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    chosen = eval_prompts(prompts, settings.max_eval_prompts_per_label)
    classifier = study.classifier(loaded.study.key)
    tables = []
    for name, (intervention, labels) in feature_interventions(loaded, saes, feature_sets, feature_edges).items():
        subset = chosen.filter(pc.is_in(chosen["label"], pa.array(labels)))
        texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in subset["text"].to_pylist()]
        table = judged_generations(
            loaded.model, loaded.tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(),
            loaded.study.key, refusal_token_ids(loaded.tokenizer), intervention, settings.max_new_tokens,
            settings.batch_size, classifier, subset["text"].to_pylist())
        context.log.info("%s: %.0f%% of %d %s prompts refused (substring).", name,
                         100 * pc.mean(table["refused_substring"].cast(pa.float64())).as_py(), subset.num_rows, "/".join(labels))
        tables.append(table)
    table = pa.concat_tables(tables)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, saes=saes, feature_sets=feature_sets,
                                                           feature_edges=feature_edges),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens, "clamp_multiplier": settings.clamp_multiplier,
                                    "induce_multiplier": settings.induce_multiplier, "induced_sets": INDUCED_SETS})}
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_generations": table.num_rows})


@dg.asset(partitions_def=studies, group_name="features", kinds={"parquet"})
def feature_effects(context: dg.AssetExecutionContext, study: StudyResource, feature_generations: pa.Table) -> dg.Output[Spool]:
    """Refusal rate by each judge with bootstrap 95% intervals, per eval set x feature-set intervention (query feature_table sets them beside direction ablation)."""
    key = context.partition_key
    settings = study.study(key).settings
    rows = effect_rows(key, feature_generations.to_pylist(), seed=settings.seed)
    table = pa.Table.from_pylist(rows, schema=EFFECTS)
    lineage = {**upstream_lineage(feature_generations=feature_generations), "settings": to_json({"bootstrap_seed": settings.seed})}
    staged = spool([table], EFFECTS, study.staging_dir, lineage)
    summary = {f"{r['eval_set']}/{r['intervention_name']}": round(r["refusal_rate"], 3)
               for r in rows if r["judge"] == "substring"}
    context.log.info("Refusal rate by substring: %s", summary)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"refusal_rate/{k}": v for k, v in summary.items()})

