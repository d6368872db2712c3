"""Upstream -> downstream: earlier-layer latents whose clamping lowers the later refusal features."""

import dagster as dg
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt, instruction_offset, post_instruction_tokens
from refusal_core.edges import template_latents
from refusal_core.evaluation import ratio_interval
from refusal_core.features import refusal_members
from refusal_core.interventions import Clamp
from refusal_core.prompts import prompts_of
from refusal_core.readouts import latent_activations
from refusal_core.saes import study_saes
from refusal_core.tables import FEATURE_EDGES, Spool, spool, to_json


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def feature_edges(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                  saes: pa.Table, feature_sets: pa.Table) -> dg.Output[Spool]:
    """Edges from earlier-layer latents to the refusal features of the last SAE layer: the relative change of each refusal feature (and of their sum) when one upstream latent is clamped, on harmful prompts."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    items = study_saes(loaded, saes)
    members = refusal_members(feature_sets)
    downstream_layer = max(layer for layer, _ in members)
    downstream = sorted(latent for layer, latent in members if layer == downstream_layer)
    upstream_layers = [layer for layer in sorted(items) if layer < downstream_layer]
    if not upstream_layers:
        context.log.warning("The refusal features lie at layer %d and no SAE is below it, so there are no upstream "
                            "features to clamp; give the study SAEs at two or more layers.", downstream_layer)
        staged = spool([FEATURE_EDGES.empty_table()], FEATURE_EDGES, study.staging_dir,
                       {**model_lineage(loaded), **upstream_lineage(saes=saes, feature_sets=feature_sets)})
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_candidates": 0})
    rows, _, latents = latent_activations(activations, prompts, {layer: items[layer] for layer in upstream_layers})
    harmful = torch.tensor([row["label"] == "harmful" for row in rows])
    harmless = torch.tensor([row["label"] == "harmless" for row in rows])
    refusal = set(members)
    candidates = []
    for layer in upstream_layers:
        difference = latents[layer][harmful].mean((0, 1)) - latents[layer][harmless].mean((0, 1))
        ranked = [i for i in torch.argsort(-difference, stable=True).tolist() if (layer, i) not in refusal]
        candidates += [(layer, latent) for latent in ranked[:settings.upstream_candidates]]
    chosen = prompts_of(prompts, "harmful", "train", settings.edge_prompts)
    texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in chosen["text"].to_pylist()]
    skip = instruction_offset(loaded.tokenizer, loaded.study.chat_template)
    suffix = post_instruction_tokens(loaded.tokenizer, loaded.study.chat_template)

    def downstream_activations(intervention=None):
        return template_latents(loaded.model, loaded.tokenizer, texts, suffix, items[downstream_layer].sae, downstream_layer,
                                downstream, intervention, settings.batch_size)

    clean = downstream_activations()  # [n_prompts, n_downstream]
    table_rows, totals = [], {}
    for layer, latent in tqdm(candidates, desc="clamp upstream latents", unit="latent"):
        clamp = Clamp(items[layer].sae, items[layer].weights_sha256, layer, (latent,), factor=-settings.clamp_multiplier,
                      skip_first=skip, feature_set="upstream")
        change = downstream_activations(clamp) - clean
        # Each refusal feature, then their sum (downstream_latent null).
        stacked_change = np.concatenate([change, change.sum(1, keepdims=True)], axis=1)
        stacked_clean = np.concatenate([clean, clean.sum(1, keepdims=True)], axis=1)
        effect, low, high = ratio_interval(stacked_change, stacked_clean, seed=settings.seed)
        totals[(layer, latent)] = (effect[-1], high[-1])
        for j, downstream_latent in enumerate([*downstream, None]):
            table_rows.append({
                "model_key": loaded.study.key, "upstream_layer": layer, "upstream_latent": latent,
                "downstream_layer": downstream_layer, "downstream_latent": downstream_latent,
                "clean_activation": float(stacked_clean[:, j].mean()), "effect": _finite(effect[j]),
                "ci_low": _finite(low[j]), "ci_high": _finite(high[j]), "n_prompts": len(texts)})
    # The upstream set: latents whose clamping lowers the refusal features' sum with an interval below zero.
    lowering = sorted((key for key, (effect, high) in totals.items() if high < 0), key=lambda k: (totals[k][0], k))
    upstream_set = set(lowering[:settings.upstream_set_size])
    for row in table_rows:
        row["in_upstream_set"] = (row["upstream_layer"], row["upstream_latent"]) in upstream_set
    if not upstream_set:
        context.log.warning("No upstream latent lowers the refusal features with an interval below zero; the upstream set is empty.")
    table = pa.Table.from_pylist(table_rows, schema=FEATURE_EDGES)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           feature_sets=feature_sets),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"upstream_candidates": settings.upstream_candidates, "edge_prompts": settings.edge_prompts,
                                    "upstream_set_size": settings.upstream_set_size,
                                    "clamp_multiplier": settings.clamp_multiplier, "skip_first": skip})}
    staged = spool([table], FEATURE_EDGES, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_candidates": len(candidates), "downstream_layer": downstream_layer, "n_downstream": len(downstream),
        "upstream_set": ", ".join(f"L{layer}/{latent} ({totals[(layer, latent)][0]:+.2f})" for layer, latent in lowering[:settings.upstream_set_size])})


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
