"""SAE latents that carry refusal: attribution scores, the feature sets chosen from them, and their feature cards."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints, noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.attribution import rank_latents
from refusal_core.behaviour import behaving, chat_texts
from refusal_core.chat import instruction_offset
from refusal_core.directions import selected_direction
from refusal_core.features import (LOGIT_TOKENS, TOP_PROMPTS, build_feature_cards, decoder_logits, select_feature_sets,
                                   vocabulary)
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.readouts import latent_activations
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.tables import FEATURE_CARDS, FEATURE_SETS, LATENT_ATTRIBUTIONS


@study_asset(group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def latent_attributions(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                        refusal_directions: pa.Table, saes: pa.Table, prompt_behaviour: pa.Table) -> dg.Output[Spool]:
    """Candidate SAE latents per layer with their decoder cosine to the refusal direction, harmful-minus-harmless activation difference and attribution-patching score, globally and per prompt."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    skip = instruction_offset(loaded.tokenizer, loaded.study.chat_template)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations,
                                                           refusal_directions=refusal_directions, saes=saes,
                                                           prompt_behaviour=prompt_behaviour),
               "prompt_set_sha256": content_sha256(prompts)}
    if saes.num_rows == 0:
        staged = spool([], LATENT_ATTRIBUTIONS, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_attribution_prompts": 0})
    items = study_saes(loaded, saes)
    rows, _, latents = latent_activations(activations, prompts, items)
    refused = behaving(prompt_behaviour, "harmful", "train", refused=True, limit=settings.attribution_prompts)
    ranking = rank_latents(loaded.study.key, loaded.model, loaded.tokenizer,
                           {layer: item.sae for layer, item in items.items()}, selected_direction(refusal_directions)[1],
                           latents, [row["label"] for row in rows], chat_texts(loaded, prompts, refused.prompt_ids),
                           refused.prompt_ids, settings.attribution_steps, settings.cosine_top_k, settings.feature_set_size,
                           skip, checkpoints=checkpoints(context, study, lineage))
    lineage["settings"] = to_json({"attribution_prompts": ranking.prompt_ids, "steps": settings.attribution_steps,
                                   "cosine_top_k": settings.cosine_top_k, "skip_first": skip,
                                   "metric": "logit(own compliance token) - logit(own refusal token), last position"})
    staged = spool([ranking.table()], LATENT_ATTRIBUTIONS, study.staging_dir, lineage, noted(context, refused.note))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_attribution_prompts": len(ranking.prompt_ids), "metric_clean": round(ranking.clean_metric, 3),
        "metric_ablated": round(ranking.patched_metric, 3),
        "candidates_per_layer": {str(layer): len(ranking.candidates(layer)) for layer in ranking.layers}})


@study_asset(group_name="features", pool="gpu", kinds={"parquet", "pytorch"})
def feature_sets(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                 refusal_directions: pa.Table, saes: pa.Table, latent_attributions: pa.Table) -> dg.Output[Spool]:
    """Feature sets of equal size: CosSim+AP (the paper's), cosine only, activation difference, attribution only, and seeded random draws of latents from the same layers."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           refusal_directions=refusal_directions,
                                                           latent_attributions=latent_attributions),
               "settings": to_json({"feature_set_size": settings.feature_set_size, "cosine_top_k": settings.cosine_top_k,
                                    "induce_multiplier": settings.induce_multiplier, "seed": settings.seed,
                                    "random_draws": settings.random_draws})}
    if saes.num_rows == 0:
        staged = spool([], FEATURE_SETS, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"cossim_ap": ""})
    items = study_saes(loaded, saes)
    rows, _, latents = latent_activations(activations, prompts, items)
    chosen = select_feature_sets(loaded.study.key, latent_attributions, {layer: item.sae for layer, item in items.items()},
                                 selected_direction(refusal_directions)[1], latents, [row["label"] for row in rows],
                                 settings.feature_set_size, settings.induce_multiplier, settings.seed,
                                 settings.random_draws)
    staged = spool([chosen.table()], FEATURE_SETS, study.staging_dir, lineage, noted(context, *chosen.notes))
    cossim_ap = chosen.members["cossim_ap"]
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "cossim_ap": ", ".join(f"L{layer}/{latent}" for layer, latent in cossim_ap),
        "overlap_with_cosine": len(set(cossim_ap) & set(chosen.members["cosine"]))})


@study_asset(group_name="features", pool="gpu", kinds={"parquet"})
def feature_cards(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                  saes: pa.Table, feature_sets: pa.Table) -> dg.Output[Spool]:
    """One card per selected latent: its scores, the stored prompts that activate it most, and its Neuronpedia page when there is one."""
    loaded = study.load(context.partition_key)
    spec = loaded.study.saes
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           feature_sets=feature_sets),
               "settings": to_json({"top_prompts": TOP_PROMPTS, "logit_tokens": LOGIT_TOKENS})}
    if saes.num_rows == 0:
        staged = spool([], FEATURE_CARDS, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_cards": 0})
    loaded_saes = study_saes(loaded, saes)
    rows, tokens, latents = latent_activations(activations, prompts, loaded_saes)
    chosen = sorted({(m["layer_index"], m["latent_index"]) for m in feature_sets.to_pylist() if m["feature_set"] != "random"})
    unembedding = loaded.model.get_output_embeddings().weight  # [vocab, d_model]
    logits = decoder_logits({layer: item.sae for layer, item in loaded_saes.items()}, unembedding,
                            vocabulary(loaded.tokenizer, unembedding.shape[0]), chosen)
    cards = build_feature_cards(loaded.study.key, feature_sets, rows, tokens, latents,
                                dict(zip(saes["layer_index"].to_pylist(), saes["sae_id"].to_pylist())),
                                spec.release if spec.kind == "pretrained" else None, logits)
    staged = spool([cards.table()], FEATURE_CARDS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_cards": len(cards.cards), "harmful_share_of_top_prompts": round(cards.harmful_share, 3)})
