"""The refusal direction: difference in means at every layer x position, selected by what ablating and adding it does."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.activations import INSTRUCTION_TOKEN
from refusal_core.chat import format_prompt
from refusal_core.directions import (cosine_scores, difference_in_means, eligible_layers, mean_activations, position_names,
                                     top_candidates)
from refusal_core.prompts import prompts_of
from refusal_core.scoring import answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.selection import choose, evaluate_candidates
from refusal_core.tables import DIRECTION_CANDIDATES, DIRECTIONS, Spool, spool, to_json


MIN_FILTERED = 4
"""Fewest prompts a refusal filter may leave before it is skipped."""

MIN_CATEGORY_PROMPTS = 5
"""Fewest prompts of a harm category that get a direction of their own."""


@dg.asset(partitions_def=studies, group_name="directions", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_directions(
    context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table
) -> dg.Output[Spool]:
    """Every candidate refusal direction (layer x post-instruction position) with its selection metrics; one row is selected."""
    loaded = study.load(context.partition_key)
    settings, template = loaded.study.settings, loaded.study.chat_template
    refusal_ids = refusal_token_ids(loaded.tokenizer)

    def formatted(table: pa.Table) -> list[str]:
        return [format_prompt(loaded.tokenizer, t, template) for t in table["text"].to_pylist()]

    def by_refusal(table: pa.Table, refused: bool) -> pa.Table:
        # As in refusal_direction: keep harmful prompts the model refuses and harmless ones it answers.
        # A model that refuses (or answers) almost nothing keeps them all, and the log says so.
        scores = refusal_score(answer_log_probs(loaded.model, loaded.tokenizer, formatted(table), None, settings.batch_size), refusal_ids)
        kept = table.filter(pa.array([(s > 0) == refused for s in scores.tolist()]))
        if kept.num_rows < MIN_FILTERED:
            context.log.warning("Only %d of %d %s prompts are %s by refusal score; using all of them unfiltered.",
                                kept.num_rows, table.num_rows, table["label"][0], "refused" if refused else "answered")
            return table
        return kept

    captured = set(activations["prompt_id"].unique().to_pylist())
    train = prompts.filter(pc.is_in(prompts["prompt_id"], pa.array(sorted(captured))))
    harmful = by_refusal(train.filter(pc.and_(pc.equal(train["label"], "harmful"), pc.equal(train["split"], "train"))), True)
    harmless = by_refusal(train.filter(pc.and_(pc.equal(train["label"], "harmless"), pc.equal(train["split"], "train"))), False)
    context.log.info("Train prompts kept: %d refused harmful, %d answered harmless.", harmful.num_rows, harmless.num_rows)
    template_rows = activations.filter(pc.not_equal(activations["token"], INSTRUCTION_TOKEN))
    means = mean_activations(template_rows.to_batches(max_chunksize=4096),
                             {"harmful": set(harmful["prompt_id"].to_pylist()), "harmless": set(harmless["prompt_id"].to_pylist())})
    directions = difference_in_means(means, "harmful", "harmless")  # [L, P, d] float64
    scores = cosine_scores(directions, means.of("harmful"), means.of("harmless"))
    allowed = eligible_layers(loaded.n_layers)
    shortlist = top_candidates(scores, means.layers, means.positions, allowed, settings.direction_candidates)
    val_harmful = by_refusal(prompts_of(prompts, "harmful", "val", 4 * settings.selection_prompts), True).slice(0, settings.selection_prompts)
    val_harmless = prompts_of(prompts, "harmless", "val", settings.selection_prompts)
    index = {(layer, position): (i, j) for i, layer in enumerate(means.layers) for j, position in enumerate(means.positions)}
    evaluations = evaluate_candidates(
        loaded.model, loaded.tokenizer, {c: directions[index[c]] for c in shortlist},
        formatted(val_harmful), formatted(val_harmless), refusal_ids, settings.batch_size)
    best, passed = choose(evaluations)
    if not passed:
        context.log.warning("No candidate passed the filters (addition score > 0, KL <= 0.1); kept the best by ablation.")
    measured = {(e.layer, e.position): e for e in evaluations}
    token_of = position_names(activations)
    by_cosine = top_candidates(scores, means.layers, means.positions, allowed, 1)[0]
    rows = []
    for (layer, position), (i, j) in sorted(index.items()):
        e = measured.get((layer, position))
        rows.append({
            "model_key": loaded.study.key, "layer_index": layer, "position": position, "token": token_of.get(position, ""),
            "norm": float(directions[i, j].norm()), "cosine_score": float(scores[i, j]), "evaluated": e is not None,
            "ablation_refusal_score": e.ablation_refusal_score if e else None,
            "addition_refusal_score": e.addition_refusal_score if e else None, "kl": e.kl if e else None,
            "passes_filters": (e.passes and layer in allowed) if e else None,
            "selected": e is best, "selected_by_cosine": (layer, position) == by_cosine,
            "direction": directions[i, j].tolist(),
        })
    table = pa.Table.from_pylist(rows, schema=DIRECTION_CANDIDATES)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"direction_candidates": settings.direction_candidates,
                                    "selection_prompts": settings.selection_prompts})}
    staged = spool([table], DIRECTION_CANDIDATES, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "selected_layer": best.layer, "selected_position": best.position, "selected_token": token_of.get(best.position, ""),
        "ablation_refusal_score": best.ablation_refusal_score, "addition_refusal_score": best.addition_refusal_score,
        "kl": best.kl, "passes_filters": passed, "selected_by_cosine": f"layer {by_cosine[0]}, position {by_cosine[1]}", "n_train_harmful": harmful.num_rows, "n_train_harmless": harmless.num_rows})


@dg.asset(partitions_def=studies, group_name="directions", kinds={"parquet"})
def category_directions(
    context: dg.AssetExecutionContext, prompts: pa.Table, activations: pa.Table, refusal_directions: pa.Table,
    study: StudyResource,
) -> dg.Output[Spool]:
    """A direction per harm category and for over-refusal at the refusal direction's place, and a harmfulness direction at the instruction's last token, each with its cosine to the refusal direction."""
    chosen = refusal_directions.filter(refusal_directions["selected"]).to_pylist()[0]
    layer, position = chosen["layer_index"], chosen["position"]
    refusal = torch.tensor(chosen["direction"], dtype=torch.float64)
    captured = prompts.filter(pc.is_in(prompts["prompt_id"], activations["prompt_id"].unique()))
    rows_of = lambda label: captured.filter(pc.equal(captured["label"], label))  # noqa: E731
    groups = {"harmless": set(rows_of("harmless")["prompt_id"].to_pylist()),
              "harmful": set(rows_of("harmful")["prompt_id"].to_pylist()),
              "over_refusal": set(rows_of("over_refusal")["prompt_id"].to_pylist())}
    harmful = rows_of("harmful")
    for category in sorted(set(harmful["category"].to_pylist())):
        members = harmful.filter(pc.equal(harmful["category"], category))["prompt_id"].to_pylist()
        if len(members) >= MIN_CATEGORY_PROMPTS:
            groups[f"category:{category}"] = set(members)
        else:
            context.log.info("Category %s has %d prompts with activations (< %d); no direction.", category, len(members), MIN_CATEGORY_PROMPTS)
    at_layer = activations.filter(pc.equal(activations["layer_index"], layer))
    instruction = int(pc.min(at_layer["position"]).as_py())
    means = mean_activations(at_layer.to_batches(max_chunksize=4096), groups)
    tokens = position_names(at_layer)
    places = {name: position for name in groups if name not in ("harmless", "harmful")} | {"harmfulness": instruction}
    rows = []
    for name, place in sorted(places.items()):
        group = "harmful" if name == "harmfulness" else name
        vector = difference_in_means(means, group, "harmless")[0, means.positions.index(place)]
        rows.append({"model_key": chosen["model_key"], "name": name, "layer_index": layer, "position": place,
                     "token": tokens.get(place, ""), "n_prompts": means.counts[means.groups.index(group)],
                     "cosine_with_refusal": float(torch.nn.functional.cosine_similarity(vector, refusal, dim=0)),
                     "direction": vector.tolist()})
    rows.append({"model_key": chosen["model_key"], "name": "refusal", "layer_index": layer, "position": position,
                 "token": chosen["token"], "n_prompts": 0, "cosine_with_refusal": 1.0, "direction": chosen["direction"]})
    table = pa.Table.from_pylist(rows, schema=DIRECTIONS)
    lineage = {**upstream_lineage(prompts=prompts, activations=activations, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"min_category_prompts": MIN_CATEGORY_PROMPTS})}
    staged = spool([table], DIRECTIONS, study.staging_dir, lineage)
    cosines = {row["name"]: round(row["cosine_with_refusal"], 3) for row in rows}
    context.log.info("Cosine with the refusal direction: %s", cosines)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"cosine_with_refusal/{k}": v for k, v in cosines.items()})
