"""Choose the refusal direction among candidates by what ablating and adding each does (Arditi et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.interventions import Ablate, Add
from refusal_core.scoring import answer_log_probs, kl_divergence, refusal_score

MAX_KL = 0.1
"""Largest mean KL on harmless prompts that ablating a candidate may cause (refusal_direction's bound)."""


@dataclass(frozen=True)
class CandidateEvaluation:
    """What one candidate direction does on the validation prompts."""

    layer: int
    position: int
    ablation_refusal_score: float
    """Mean refusal score of harmful prompts with the direction ablated (lower is better)."""
    addition_refusal_score: float
    """Mean refusal score of harmless prompts with the direction added at its layer (must be > 0)."""
    kl: float
    """Mean KL on harmless prompts between the clean and the ablated model (must be <= MAX_KL)."""

    @property
    def passes(self) -> bool:
        return self.addition_refusal_score > 0 and self.kl <= MAX_KL


def evaluate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directions: dict[tuple[int, int], Tensor],
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
) -> list[CandidateEvaluation]:
    """Ablate and add every candidate direction and score the first answer token of the validation prompts.

    Args:
        directions: (layer, position) to its [d_model] direction.
        harmful, harmless: chat-formatted validation prompts.
    """
    clean_harmless = answer_log_probs(model, tokenizer, harmless, None, batch_size)
    results = []
    for (layer, position), direction in tqdm(directions.items(), desc="evaluate directions", disable=not progress):
        direction = direction.float()
        ablate, add = Ablate(direction), Add(direction, layer)
        ablated_harmful = refusal_score(answer_log_probs(model, tokenizer, harmful, ablate, batch_size), refusal_ids)
        added_harmless = refusal_score(answer_log_probs(model, tokenizer, harmless, add, batch_size), refusal_ids)
        kl = kl_divergence(clean_harmless, answer_log_probs(model, tokenizer, harmless, ablate, batch_size))
        results.append(CandidateEvaluation(layer, position, float(ablated_harmful.mean()),
                                           float(added_harmless.mean()), float(kl.mean())))
    return results


def choose(evaluations: Sequence[CandidateEvaluation]) -> tuple[CandidateEvaluation, bool]:
    """The candidate whose ablation lowers harmful refusal most among those that pass the filters.

    Returns the choice and whether it passed; when none passes, the best by ablation is returned
    with False so that the caller can record and report it.
    """
    if not evaluations:
        raise ValueError("No candidate directions were evaluated; check the layers and positions captured.")
    passing = [e for e in evaluations if e.passes]
    pool = passing or list(evaluations)
    return min(pool, key=lambda e: e.ablation_refusal_score), bool(passing)
