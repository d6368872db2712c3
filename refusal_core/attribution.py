"""Which SAE latents carry refusal: decoder cosine, activation difference and attribution patching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import input_mask, prefix_cache, tokenize_batch
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.hooks import record_residual
from refusal_core.interventions import Ablate, Intervention, describe, intervene
from refusal_core.saes import splice
from refusal_core.scoring import last_logits
from refusal_core.tables import LATENT_ATTRIBUTIONS


@dataclass(frozen=True)
class Attribution:
    """Attribution patching scores of the latents of several SAEs on a set of prompts."""

    scores: dict[int, Tensor]
    """layer -> [n_prompts, d_sae]: estimated change of the metric when each latent moves from its clean
    to its patched value, summed over the prompt's positions (integrated gradients)."""
    refusal_tokens: list[int]
    """Per prompt, the clean model's own first answer token (its refusal token)."""
    compliance_tokens: list[int]
    """Per prompt, the first answer token with the patch applied (its compliance token)."""
    clean_metric: Tensor
    """[n_prompts]: logit(compliance) - logit(refusal) of the clean model."""
    patched_metric: Tensor
    """[n_prompts]: the same with the patch applied to the whole model."""


def decoder_cosines(sae: SAE, direction: Tensor) -> Tensor:
    """Cosine of each latent's decoder vector with `direction` [d_model]: [d_sae], float32."""
    decoder = sae.W_dec.detach().float()  # [d_sae, d_model]
    direction = direction.to(decoder).flatten()
    return (decoder @ direction) / (decoder.norm(dim=-1) * direction.norm()).clamp_min(1e-12)


@torch.no_grad()
def encode_rows(sae: SAE, rows: Tensor, batch_size: int = 1024) -> Tensor:
    """SAE latents [n, d_sae] of residual vectors [n, d_model], encoded in batches."""
    weight = sae.W_dec
    parts = [sae.encode(rows[start:start + batch_size].to(weight)).float().cpu() for start in range(0, len(rows), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


def attribution_patching(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saes: Mapping[int, SAE],
                         prompts: Sequence[str], patch: Intervention, steps: int = 10, batch_size: int = 8,
                         skip_first: int = 0, progress: bool = True, checkpoints: Checkpoints = Checkpoints()) -> Attribution:
    """Attribute the refusal metric to SAE latents by integrated gradients between clean and patched states.

    The metric of a prompt is logit(compliance token) - logit(refusal token) at its last position, where
    the refusal token is the clean model's own first answer token and the compliance token the first
    answer token with `patch` (for instance the refusal direction ablated) applied to the whole model.
    For each layer separately, the latents are interpolated from their clean to their patched values in
    `steps` midpoint steps, with the SAE error of the clean state kept, so the model is unchanged when
    nothing is patched; the gradient averaged over the steps times the latent's change, summed over
    positions from `skip_first` on, is its score (Marks et al., 2024; Yeo et al., 2025).
    Each finished batch of prompts is kept in `checkpoints`; a run that finds one there reads it back instead.
    """
    if steps < 1:
        raise ValueError(f"steps is {steps}; integrated gradients needs at least 1 step.")
    if not prompts:
        raise ValueError("No prompts to attribute; the prompt selection is empty.")
    layers = sorted(saes)
    starts = list(range(0, len(prompts), batch_size))

    def compute(todo: list[int]):
        # The shared prefix is run once for the clean model and once with the patch (whose state covers every token).
        prefix = prefix_cache(model, tokenizer, prompts, skip_first)
        with intervene(model, patch):
            patched_prefix = prefix_cache(model, tokenizer, prompts, skip_first)
        with tqdm(total=len(todo) * len(layers) * steps, desc="attribution patching", unit="pass",
                  disable=not progress) as bar:
            for b in todo:
                yield _attribute_batch(model, tokenizer, saes, prompts[starts[b]:starts[b] + batch_size], patch, steps,
                                       skip_first, prefix, patched_prefix, bar)

    units = [{"prompts": digest(list(prompts[start:start + batch_size])), "patch": describe(patch).id, "steps": steps,
              "skip_first": skip_first, "layers": layers} for start in starts]
    parts = list(checkpoints.resume("attribution patching", units, compute))
    return Attribution({layer: torch.cat([part[f"scores.{layer}"] for part in parts]) for layer in layers},
                       torch.cat([part["refusal"] for part in parts]).tolist(),
                       torch.cat([part["compliance"] for part in parts]).tolist(),
                       torch.cat([part["clean_metric"] for part in parts]), torch.cat([part["patched_metric"] for part in parts]))


def _attribute_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saes: Mapping[int, SAE],
                     prompts: Sequence[str], patch: Intervention, steps: int, skip_first: int, prefix, patched_prefix,
                     bar: tqdm) -> dict[str, Tensor]:
    """One batch of `attribution_patching`: its refusal and compliance tokens, clean and patched metrics and scores per layer."""
    device = next(model.parameters()).device
    inputs = tokenize_batch(tokenizer, prompts, device, prefix)
    keep = (inputs["position_ids"] >= skip_first) & input_mask(inputs)  # [batch, seq]
    layers = sorted(saes)
    with torch.no_grad(), record_residual(model, layers) as clean_hidden:
        clean_logits = last_logits(model, inputs)  # [batch, vocab]
    patched_inputs = tokenize_batch(tokenizer, prompts, device, patched_prefix)
    with torch.no_grad(), intervene(model, patch), record_residual(model, layers) as patched_hidden:
        patched_logits = last_logits(model, patched_inputs)
    r, c = clean_logits.argmax(-1), patched_logits.argmax(-1)  # [batch]
    result = {"refusal": r.cpu(), "compliance": c.cpu(), "clean_metric": _metric(clean_logits, c, r).cpu(),
              "patched_metric": _metric(patched_logits, c, r).cpu()}
    for layer in layers:
        sae = saes[layer]
        with torch.no_grad():
            clean = sae.encode(clean_hidden[layer].to(sae.W_dec))  # [batch, seq, d_sae]
            delta = sae.encode(patched_hidden[layer].to(sae.W_dec)) - clean  # [batch, seq, d_sae]
        gradient = torch.zeros_like(clean)
        for step in range(steps):
            point = (clean + (step + 0.5) / steps * delta).requires_grad_(True)
            with torch.enable_grad(), splice(model, sae, layer, use_error_term=True, skip_first=skip_first,
                                             edit=lambda latents, point=point: point):
                logits = last_logits(model, inputs)
                (grad,) = torch.autograd.grad(_metric(logits, c, r).sum(), point)
            gradient += grad / steps
            bar.update()
        effect = (gradient * delta * keep.unsqueeze(-1)).sum(1)  # [batch, d_sae]
        result[f"scores.{layer}"] = effect.detach().float().cpu()
    return result


def _metric(logits: Tensor, compliance: Tensor, refusal: Tensor) -> Tensor:
    """logit(compliance) - logit(refusal) per row of logits [batch, vocab]: [batch]."""
    return logits.gather(-1, compliance[:, None])[:, 0] - logits.gather(-1, refusal[:, None])[:, 0]


@dataclass(frozen=True)
class LayerScores:
    """One layer's latent scores, the inputs of every ranking."""

    cosine: Tensor
    """[d_sae] float64: decoder cosine with the refusal direction."""
    difference: Tensor
    """[d_sae] float64: mean activation on harmful minus harmless prompts, over prompts and post-instruction positions."""
    attribution: Tensor
    """[n_prompts, d_sae] float64: attribution-patching score on each attribution prompt."""


@dataclass(frozen=True)
class LatentRanking:
    """Candidate latents of every layer and their CosSim+AP rank: the LATENT_ATTRIBUTIONS table.

    A layer's candidates are its top `max(cosine_top_k, set_size)` latents by decoder cosine and its top
    `set_size` by activation difference and by mean attribution. CosSim+AP ranks the latents in their
    layer's cosine top-k by attribution across layers (highest first, ties by (layer, latent)): overall
    by the mean over prompts, and per prompt.
    """

    model_key: str
    layers: dict[int, LayerScores]
    prompt_ids: list[str]
    """The attribution prompts, one per row of each layer's `attribution`."""
    cosine_top_k: int
    set_size: int
    clean_metric: float = float("nan")
    """Mean logit(compliance) - logit(refusal) of the clean model on the attribution prompts."""
    patched_metric: float = float("nan")
    """The same with the refusal direction ablated."""

    def candidates(self, layer: int) -> list[int]:
        scores, size = self.layers[layer], self.set_size
        chosen = set(torch.topk(scores.cosine, max(self.cosine_top_k, size)).indices.tolist())
        chosen |= set(torch.topk(scores.difference, size).indices.tolist())
        chosen |= set(torch.topk(scores.attribution.mean(0), size).indices.tolist())
        return sorted(chosen)

    def table(self) -> pa.Table:
        """One row per (layer, candidate) overall (prompt_id null), then the same rows for each attribution prompt."""
        layers = sorted(self.layers)
        candidates = {layer: self.candidates(layer) for layer in layers}
        cosine_ranks = {layer: _ranks(self.layers[layer].cosine) for layer in layers}
        filtered = [(layer, latent) for layer in layers for latent in candidates[layer]
                    if cosine_ranks[layer][latent] <= self.cosine_top_k]
        rows = []
        for scope in [None, *range(len(self.prompt_ids))]:
            def score(layer: int, latent: int) -> float:
                attribution = self.layers[layer].attribution
                return float(attribution[:, latent].mean() if scope is None else attribution[scope, latent])

            combined = {key: rank for rank, key in enumerate(sorted(filtered, key=lambda k: (-score(*k), k)), start=1)}
            for layer in layers:
                scores = self.layers[layer]
                for latent in candidates[layer]:
                    rows.append({
                        "model_key": self.model_key, "layer_index": layer, "latent_index": latent,
                        "prompt_id": None if scope is None else self.prompt_ids[scope],
                        "decoder_cosine": float(scores.cosine[latent]),
                        "activation_difference": float(scores.difference[latent]),
                        "cosine_rank": int(cosine_ranks[layer][latent]), "attribution": score(layer, latent),
                        "combined_rank": combined.get((layer, latent))})
        return pa.Table.from_pylist(rows, schema=LATENT_ATTRIBUTIONS)


def rank_latents(model_key: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saes: Mapping[int, SAE],
                 direction: Tensor, latents: Mapping[int, Tensor], labels: Sequence[str], prompts: Sequence[str],
                 prompt_ids: Sequence[str], steps: int, cosine_top_k: int, set_size: int, skip_first: int = 0,
                 progress: bool = True, checkpoints: Checkpoints = Checkpoints()) -> LatentRanking:
    """Score every latent of the SAEs against the refusal `direction` [d_model] and rank them (CosSim+AP).

    Args:
        latents: layer -> the stored prompts' latents [n_prompts, n_positions, d_sae], with their `labels`.
        prompts, prompt_ids: the chat-formatted prompts attribution patching runs on (the direction ablated)
            and their ids. Prompts whose first answer token the ablation does not change have a metric
            that is zero everywhere and are left out, unless that leaves none.
        checkpoints: where each finished batch of attribution patching is kept (deleted once all are done).
    """
    harmful, harmless = label_mask(labels, "harmful"), label_mask(labels, "harmless")
    if harmful.sum() == 0 or harmless.sum() == 0:
        raise ValueError("The activations table needs harmful and harmless prompts for the activation difference; "
                         "keep both in settings.activation_labels.")
    result = attribution_patching(model, tokenizer, saes, prompts, Ablate(direction.float()), steps, batch_size=8,
                                  skip_first=skip_first, progress=progress, checkpoints=checkpoints)
    checkpoints.clear()
    moved = [j for j, (r, c) in enumerate(zip(result.refusal_tokens, result.compliance_tokens)) if r != c] \
        or list(range(len(prompts)))
    layers = {layer: LayerScores(
        decoder_cosines(saes[layer], direction).cpu().double(),
        (latents[layer][harmful].mean((0, 1)) - latents[layer][harmless].mean((0, 1))).double(),
        result.scores[layer][moved].double()) for layer in sorted(saes)}
    return LatentRanking(model_key, layers, [prompt_ids[j] for j in moved], cosine_top_k, set_size,
                         float(result.clean_metric[moved].mean()), float(result.patched_metric[moved].mean()))


def label_mask(labels: Sequence[str], label: str) -> Tensor:
    """[n] bool: which of `labels` are `label`."""
    return torch.tensor([item == label for item in labels])


def _ranks(scores: Tensor) -> Tensor:
    """1-based rank of each entry, highest first (ties by index)."""
    order = torch.argsort(-scores, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1)
    return ranks
