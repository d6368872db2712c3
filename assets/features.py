"""SAE latents that carry refusal: attribution scores, the feature sets chosen from them, and their feature cards."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.attribution import attribution_patching, decoder_cosines
from refusal_core.chat import format_prompt, instruction_offset
from refusal_core.directions import selected_direction
from refusal_core.interventions import Ablate
from refusal_core.prompts import prompts_of
from refusal_core.readouts import latent_activations
from refusal_core.saes import neuronpedia_url, study_saes
from refusal_core.scoring import answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.tables import FEATURE_CARDS, FEATURE_SETS, LATENT_ATTRIBUTIONS, Spool, spool, to_json

MIN_ATTRIBUTION_PROMPTS = 4
TOP_PROMPTS = 5
"""Prompts shown on each feature card."""


def _label_mask(rows: list[dict], label: str) -> torch.Tensor:
    return torch.tensor([row["label"] == label for row in rows])


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each entry, highest first (ties by index)."""
    order = torch.argsort(-scores, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1)
    return ranks


@dg.asset(partitions_def=studies, group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def latent_attributions(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                        refusal_directions: pa.Table, saes: pa.Table) -> dg.Output[Spool]:
    """Candidate SAE latents per layer with their decoder cosine to the refusal direction, harmful-minus-harmless activation difference and attribution-patching score, globally and per prompt."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    items = study_saes(loaded, saes)
    _, direction = selected_direction(refusal_directions)
    template = loaded.study.chat_template
    skip = instruction_offset(loaded.tokenizer, template)
    rows, _, latents = latent_activations(activations, prompts, items)
    harmful, harmless = _label_mask(rows, "harmful"), _label_mask(rows, "harmless")
    if harmful.sum() == 0 or harmless.sum() == 0:
        raise ValueError("The activations table needs harmful and harmless prompts for the activation difference; "
                         "keep both in settings.activation_labels.")
    # Attribution runs on harmful train prompts the model refuses (refusal score > 0), screened in one pass.
    pool = prompts_of(prompts, "harmful", "train", 3 * settings.attribution_prompts)
    texts = [format_prompt(loaded.tokenizer, t, template) for t in pool["text"].to_pylist()]
    refusal_ids = refusal_token_ids(loaded.tokenizer)
    scores = refusal_score(answer_log_probs(loaded.model, loaded.tokenizer, texts, None, settings.batch_size), refusal_ids)
    refused = [i for i, s in enumerate(scores.tolist()) if s > 0][:settings.attribution_prompts]
    if len(refused) < MIN_ATTRIBUTION_PROMPTS:
        # As in the directions study: a model that refuses almost nothing is attributed on all prompts, with a warning.
        context.log.warning("Only %d of %d harmful train prompts are refused by refusal score; attributing on the first %d "
                            "unfiltered.", len(refused), len(texts), settings.attribution_prompts)
        refused = list(range(min(len(texts), settings.attribution_prompts)))
    result = attribution_patching(loaded.model, loaded.tokenizer, {layer: item.sae for layer, item in items.items()},
                                  [texts[i] for i in refused], Ablate(direction.float()), settings.attribution_steps,
                                  batch_size=8, skip_first=skip)
    # Prompts whose first answer token the ablation does not change have a metric that is zero everywhere.
    moved = [j for j, (r, c) in enumerate(zip(result.refusal_tokens, result.compliance_tokens)) if r != c] \
        or list(range(len(refused)))
    prompt_ids = [pool["prompt_id"][refused[j]].as_py() for j in moved]
    scores_by_layer = {layer: result.scores[layer][moved] for layer in result.scores}
    size = settings.feature_set_size
    table_rows = []
    per_layer = {}
    for layer, item in sorted(items.items()):
        cosine = decoder_cosines(item.sae, direction).cpu().double()
        difference = (latents[layer][harmful].mean((0, 1)) - latents[layer][harmless].mean((0, 1))).double()
        attribution = scores_by_layer[layer].double()  # [n_prompts, d_sae]
        cosine_rank = _ranks(cosine)
        candidates = set(torch.topk(cosine, max(settings.cosine_top_k, size)).indices.tolist())
        candidates |= set(torch.topk(difference, size).indices.tolist())
        candidates |= set(torch.topk(attribution.mean(0), size).indices.tolist())
        per_layer[layer] = (sorted(candidates), cosine, difference, attribution, cosine_rank)
    # CosSim+AP: latents in their layer's cosine top-k, ranked by attribution across layers (and per prompt).
    filtered = [(layer, latent) for layer, (candidates, *_, cosine_rank) in per_layer.items()
                for latent in candidates if cosine_rank[latent] <= settings.cosine_top_k]
    for scope in [None, *range(len(prompt_ids))]:
        def score(layer: int, latent: int) -> float:
            attribution = per_layer[layer][3]
            return float(attribution[:, latent].mean() if scope is None else attribution[scope, latent])

        combined = {key: rank for rank, key in enumerate(sorted(filtered, key=lambda k: (-score(*k), k)), start=1)}
        for layer, (candidates, cosine, difference, attribution, cosine_rank) in per_layer.items():
            for latent in candidates:
                table_rows.append({
                    "model_key": loaded.study.key, "layer_index": layer, "latent_index": latent,
                    "prompt_id": None if scope is None else prompt_ids[scope], "decoder_cosine": float(cosine[latent]),
                    "activation_difference": float(difference[latent]), "cosine_rank": int(cosine_rank[latent]),
                    "attribution": score(layer, latent), "combined_rank": combined.get((layer, latent))})
    table = pa.Table.from_pylist(table_rows, schema=LATENT_ATTRIBUTIONS)
    context.log.info("Attribution over %d harmful prompts; metric clean %.2f -> ablated %.2f.", len(prompt_ids),
                     float(result.clean_metric[moved].mean()), float(result.patched_metric[moved].mean()))
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations,
                                                           refusal_directions=refusal_directions, saes=saes),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"attribution_prompts": prompt_ids, "steps": settings.attribution_steps,
                                    "cosine_top_k": settings.cosine_top_k, "skip_first": skip,
                                    "metric": "logit(own compliance token) - logit(own refusal token), last position"})}
    staged = spool([table], LATENT_ATTRIBUTIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_attribution_prompts": len(prompt_ids), "metric_clean": round(float(result.clean_metric[moved].mean()), 3),
        "metric_ablated": round(float(result.patched_metric[moved].mean()), 3),
        "candidates_per_layer": {str(layer): len(v[0]) for layer, v in per_layer.items()}})


@dg.asset(partitions_def=studies, group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def feature_sets(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                 refusal_directions: pa.Table, saes: pa.Table, latent_attributions: pa.Table) -> dg.Output[Spool]:
    """Feature sets of equal size: CosSim+AP (the paper's), cosine only, activation difference, attribution only, and random latents from the same layers."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    items = study_saes(loaded, saes)
    _, direction = selected_direction(refusal_directions)
    rows, _, latents = latent_activations(activations, prompts, items)
    harmful, harmless = _label_mask(rows, "harmful"), _label_mask(rows, "harmless")
    scored = latent_attributions.filter(pc.is_null(latent_attributions["prompt_id"])).to_pylist()
    size = settings.feature_set_size
    chosen = {
        "cossim_ap": sorted((r for r in scored if r["combined_rank"] is not None), key=lambda r: r["combined_rank"]),
        "cosine": sorted(scored, key=lambda r: -r["decoder_cosine"]),
        "activation_difference": sorted(scored, key=lambda r: -r["activation_difference"]),
        "attribution": sorted(scored, key=lambda r: -r["attribution"]),
    }
    chosen = {name: [(r["layer_index"], r["latent_index"]) for r in ranked[:size]] for name, ranked in chosen.items()}
    # Random: as many latents per layer as CosSim+AP took there, drawn (seeded) among the layer's latents that
    # fire on the stored prompts, excluding CosSim+AP's own.
    generator = torch.Generator().manual_seed(settings.seed)
    chosen["random"] = []
    for layer in sorted(items):
        count = sum(1 for chosen_layer, _ in chosen["cossim_ap"] if chosen_layer == layer)
        taken = {latent for chosen_layer, latent in chosen["cossim_ap"] if chosen_layer == layer}
        alive = [i for i in torch.nonzero(latents[layer].amax((0, 1)) > 0).flatten().tolist() if i not in taken]
        order = torch.randperm(len(alive), generator=generator)[:count].tolist()
        chosen["random"] += [(layer, alive[i]) for i in sorted(order)]
    by_key = {(r["layer_index"], r["latent_index"]): r for r in scored}
    cosines = {layer: decoder_cosines(item.sae, direction) for layer, item in items.items()}
    out = []
    for name, members in chosen.items():
        if len(members) < size:
            context.log.warning("Feature set %s has %d latents, fewer than %d.", name, len(members), size)
        for rank, (layer, latent) in enumerate(members, start=1):
            layer_latents = latents[layer][..., latent]  # [n_prompts, n_pos]
            out.append({
                "model_key": loaded.study.key, "feature_set": name, "rank": rank, "layer_index": layer, "latent_index": latent,
                "decoder_cosine": float(cosines[layer][latent]),
                "activation_difference": float(layer_latents[harmful].mean() - layer_latents[harmless].mean()),
                "attribution": by_key[(layer, latent)]["attribution"] if (layer, latent) in by_key else None,
                "induce_value": settings.induce_multiplier * float(layer_latents[harmful].max()),
            })
    table = pa.Table.from_pylist(out, schema=FEATURE_SETS)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           latent_attributions=latent_attributions),
               "settings": to_json({"feature_set_size": size, "cosine_top_k": settings.cosine_top_k,
                                    "induce_multiplier": settings.induce_multiplier, "seed": settings.seed})}
    staged = spool([table], FEATURE_SETS, study.staging_dir, lineage)
    overlap = len(set(chosen["cossim_ap"]) & set(chosen["cosine"]))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "cossim_ap": ", ".join(f"L{layer}/{latent}" for layer, latent in chosen["cossim_ap"]), "overlap_with_cosine": overlap})


@dg.asset(partitions_def=studies, group_name="features", pool="gpu", kinds={"parquet"})
def feature_cards(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                  saes: pa.Table, feature_sets: pa.Table) -> dg.Output[Spool]:
    """One card per selected latent: its scores, the stored prompts that activate it most, and its Neuronpedia page when there is one."""
    loaded = study.load(context.partition_key)
    items = study_saes(loaded, saes)
    rows, tokens, latents = latent_activations(activations, prompts, items)
    sae_ids = dict(zip(saes["layer_index"].to_pylist(), saes["sae_id"].to_pylist()))
    release = loaded.study.saes.release if loaded.study.saes.kind == "pretrained" else None
    selected = feature_sets.filter(pc.not_equal(feature_sets["feature_set"], "random")).to_pylist()
    cards: dict[tuple[int, int], dict] = {}
    for member in selected:
        key = (member["layer_index"], member["latent_index"])
        if key in cards:
            cards[key]["feature_sets"].append(member["feature_set"])
            continue
        values = latents[key[0]][..., key[1]]  # [n_prompts, n_pos]
        peak, where = values.max(dim=1)  # [n_prompts]
        top = [i for i in torch.argsort(-peak, stable=True)[:TOP_PROMPTS].tolist() if peak[i] > 0]
        cards[key] = {
            "model_key": loaded.study.key, "layer_index": key[0], "latent_index": key[1],
            "feature_sets": [member["feature_set"]], "decoder_cosine": member["decoder_cosine"],
            "activation_difference": member["activation_difference"], "attribution": member["attribution"],
            "top_prompts": [{"prompt_id": rows[i]["prompt_id"], "label": rows[i]["label"], "text": rows[i]["text"],
                             "token": tokens[int(where[i])], "activation": float(peak[i])} for i in top],
            "neuronpedia_url": neuronpedia_url(release, sae_ids[key[0]], key[1]) if release else None,
        }
    table = pa.Table.from_pylist([cards[key] for key in sorted(cards)], schema=FEATURE_CARDS)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           feature_sets=feature_sets),
               "settings": to_json({"top_prompts": TOP_PROMPTS})}
    staged = spool([table], FEATURE_CARDS, study.staging_dir, lineage)
    harmful_share = np.mean([p["label"] == "harmful" for card in cards.values() for p in card["top_prompts"]] or [0.0])
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_cards": len(cards), "harmful_share_of_top_prompts": round(float(harmful_share), 3)})
