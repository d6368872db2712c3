"""Upstream -> downstream: earlier-layer latents whose clamping lowers the later refusal features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import capture
from refusal_core.attribution import encode_rows, label_mask
from refusal_core.evaluation import ratio_interval
from refusal_core.interventions import Clamp, Intervention, SaeLatents, intervene
from refusal_core.saes import LoadedSae
from refusal_core.tables import FEATURE_EDGES


def template_latents(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     suffix_ids: Sequence[int], sae: SAE, layer: int, latents: Sequence[int],
                     intervention: Intervention | None = None, batch_size: int = 16) -> np.ndarray:
    """[n_prompts, n_latents]: `latents` of the SAE at block `layer`'s output, averaged over the post-instruction tokens.

    The forward passes run under `intervention` (say, a Clamp at an earlier layer) and stop after `layer`.
    """
    result = np.zeros((len(prompts), len(latents)))
    with intervene(model, intervention):
        for batch in capture(model, tokenizer, prompts, [layer], suffix_ids, batch_size, progress=False):
            template = batch.activations[:, 0, 1:, :]  # [b, n_template, d]; position 0 is the instruction's last token
            encoded = encode_rows(sae, template.reshape(-1, template.shape[-1])).reshape(*template.shape[:2], -1)
            result[batch.indices] = encoded[..., list(latents)].mean(dim=1).double().numpy()
    return result


@dataclass(frozen=True)
class UpstreamEdges:
    """Edges from earlier-layer latents to the refusal features of one later layer: the FEATURE_EDGES table."""

    downstream_layer: int
    downstream: list[int]
    """The refusal features at `downstream_layer`."""
    candidates: list[tuple[int, int]]
    """The (layer, latent) clamped, layer by layer, each layer's by activation difference."""
    rows: list[dict]
    """FEATURE_EDGES rows: per candidate, each refusal feature then their sum."""
    upstream_set: list[tuple[int, int]]
    """Candidates whose clamping lowers the refusal features' sum with an interval below zero, most first."""
    total_effect: dict[tuple[int, int], float]
    """Candidate -> relative change of the refusal features' sum when it is clamped."""
    notes: list[str]

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=FEATURE_EDGES)


def upstream_edges(model_key: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   saes: Mapping[int, LoadedSae], refusal: Sequence[tuple[int, int]], latents: Mapping[int, Tensor],
                   labels: Sequence[str], prompts: Sequence[str], suffix_ids: Sequence[int], n_candidates: int,
                   set_size: int, clamp_multiplier: float, skip_first: int = 0, seed: int = 0, batch_size: int = 16,
                   progress: bool = True) -> UpstreamEdges:
    """Clamp, one at a time, the earlier-layer latents that best tell harmful from harmless, and read the refusal features.

    The refusal features are those of `refusal` (layer, latent) at its last layer. At every SAE layer below
    it, the `n_candidates` latents with the largest harmful-minus-harmless mean activation (`latents`:
    layer -> [n_prompts, n_positions, d_sae] of the stored prompts, with their `labels`) that are not
    refusal features are each clamped at -`clamp_multiplier` on the chat-formatted `prompts`; the
    relative change of each refusal feature after the template, and of their sum, gets a bootstrap
    interval. The upstream set is the first `set_size` candidates whose sum's interval lies below zero.
    """
    downstream_layer = max(layer for layer, _ in refusal)
    downstream = sorted(latent for layer, latent in refusal if layer == downstream_layer)
    upstream_layers = [layer for layer in sorted(saes) if layer < downstream_layer]
    if not upstream_layers:
        return UpstreamEdges(downstream_layer, downstream, [], [], [], {}, [
            f"The refusal features lie at layer {downstream_layer} and no SAE is below it, so there are no upstream "
            "features to clamp; give the study SAEs at two or more layers."])
    harmful, harmless = label_mask(labels, "harmful"), label_mask(labels, "harmless")
    members, candidates = set(refusal), []
    for layer in upstream_layers:
        difference = latents[layer][harmful].mean((0, 1)) - latents[layer][harmless].mean((0, 1))
        ranked = [i for i in torch.argsort(-difference, stable=True).tolist() if (layer, i) not in members]
        candidates += [(layer, latent) for latent in ranked[:n_candidates]]

    def downstream_activations(intervention=None):
        return template_latents(model, tokenizer, prompts, suffix_ids, saes[downstream_layer].sae, downstream_layer,
                                downstream, intervention, batch_size)

    clean = downstream_activations()  # [n_prompts, n_downstream]
    stacked_clean = np.concatenate([clean, clean.sum(1, keepdims=True)], axis=1)
    rows, totals = [], {}
    for layer, latent in tqdm(candidates, desc="clamp upstream latents", unit="latent", disable=not progress):
        target = SaeLatents(layer, saes[layer].sae, saes[layer].weights_sha256, (latent,))
        change = downstream_activations(Clamp((target,), -clamp_multiplier, skip_first, "upstream")) - clean
        # Each refusal feature, then their sum (downstream_latent null).
        stacked_change = np.concatenate([change, change.sum(1, keepdims=True)], axis=1)
        effect, low, high = ratio_interval(stacked_change, stacked_clean, seed=seed)
        totals[(layer, latent)] = (effect[-1], high[-1])
        for j, downstream_latent in enumerate([*downstream, None]):
            rows.append({
                "model_key": model_key, "upstream_layer": layer, "upstream_latent": latent,
                "downstream_layer": downstream_layer, "downstream_latent": downstream_latent,
                "clean_activation": float(stacked_clean[:, j].mean()), "effect": _finite(effect[j]),
                "ci_low": _finite(low[j]), "ci_high": _finite(high[j]), "n_prompts": len(prompts)})
    lowering = sorted((key for key, (effect, high) in totals.items() if high < 0), key=lambda k: (totals[k][0], k))
    upstream_set = lowering[:set_size]
    for row in rows:
        row["in_upstream_set"] = (row["upstream_layer"], row["upstream_latent"]) in upstream_set
    notes = [] if upstream_set else [
        "No upstream latent lowers the refusal features with an interval below zero; the upstream set is empty."]
    return UpstreamEdges(downstream_layer, downstream, candidates, rows, upstream_set,
                         {key: float(effect) for key, (effect, _) in totals.items()}, notes)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
