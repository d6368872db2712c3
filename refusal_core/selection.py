"""Choose the refusal direction among candidates by what ablating and adding each does (Arditi et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.behaviour import behaving, chat_texts
from refusal_core.directions import DirectionCandidates, direction_candidates
from refusal_core.interventions import Ablate, Add
from refusal_core.models import LoadedModel
from refusal_core.prompts import prompts_of
from refusal_core.scoring import SharedBottom, answer_log_probs, kl_divergence, refusal_score, refusal_token_ids
from refusal_core.tables import DIRECTION_CANDIDATES

MAX_KL = 0.1
"""Largest mean KL on harmless prompts that ablating a candidate may cause (refusal_direction's bound)."""

KL_STANDARD_ERRORS = 2.0
"""A candidate fails the KL bound only when its mean KL exceeds MAX_KL by more than this many standard errors of
the mean: the bound is tested on the validation sample, not compared with it, so that rounding (bf16 against
float32) smaller than the sampling error cannot flip a candidate across it."""


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
    """Mean KL on harmless prompts between the clean and the ablated model (must not be above MAX_KL)."""
    kl_standard_error: float = 0.0
    """Standard error of that mean over the harmless prompts."""

    @property
    def passes(self) -> bool:
        return self.addition_refusal_score > 0 and self.kl - KL_STANDARD_ERRORS * self.kl_standard_error <= MAX_KL


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
    # Addition at a candidate's layer leaves the blocks below it alone: the clean pass records what it reuses.
    bottom = SharedBottom(model, [Add(direction.float(), layer) for (layer, _), direction in directions.items()])
    clean_harmless = answer_log_probs(model, tokenizer, harmless, None, batch_size, bottom=bottom)
    results = []
    for (layer, position), direction in tqdm(directions.items(), desc="evaluate directions", disable=not progress):
        direction = direction.float()
        ablate, add = Ablate(direction), Add(direction, layer)
        ablated_harmful = refusal_score(answer_log_probs(model, tokenizer, harmful, ablate, batch_size), refusal_ids)
        added_harmless = refusal_score(answer_log_probs(model, tokenizer, harmless, add, batch_size, bottom=bottom),
                                       refusal_ids)
        kl = kl_divergence(clean_harmless, answer_log_probs(model, tokenizer, harmless, ablate, batch_size))
        kl_error = float(kl.std() / len(kl) ** 0.5) if len(kl) > 1 else 0.0
        results.append(CandidateEvaluation(layer, position, float(ablated_harmful.mean()),
                                           float(added_harmless.mean()), float(kl.mean()), kl_error))
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


@dataclass(frozen=True)
class DirectionSelection:
    """The refusal_directions stage's result: every candidate, what the shortlisted ones do, and the one selected."""

    model_key: str
    candidates: DirectionCandidates
    evaluations: list[CandidateEvaluation]
    best: CandidateEvaluation
    passed: bool
    """Whether the selected candidate passes the filters (else it is the best by ablation)."""
    n_train: dict[str, int]
    """Train prompts averaged per side (harmful, harmless)."""
    notes: list[str]
    """Warnings: refusal filters skipped, no candidate passing."""

    def table(self) -> pa.Table:
        """DIRECTION_CANDIDATES rows, one per (layer, position) in that order."""
        c = self.candidates
        measured = {(e.layer, e.position): e for e in self.evaluations}
        rows = []
        for i, layer in enumerate(c.layers):
            for j, position in enumerate(c.positions):
                e = measured.get((layer, position))
                rows.append({
                    "model_key": self.model_key, "layer_index": layer, "position": position,
                    "token": c.tokens.get(position, ""), "norm": float(c.directions[i, j].norm()),
                    "cosine_score": float(c.scores[i, j]), "evaluated": e is not None,
                    "ablation_refusal_score": e.ablation_refusal_score if e else None,
                    "addition_refusal_score": e.addition_refusal_score if e else None, "kl": e.kl if e else None,
                    "kl_standard_error": e.kl_standard_error if e else None,
                    "passes_filters": (e.passes and layer in c.allowed) if e else None,
                    "selected": e is self.best, "selected_by_cosine": (layer, position) == c.by_cosine,
                    "direction": c.directions[i, j].tolist(),
                })
        return pa.Table.from_pylist(rows, schema=DIRECTION_CANDIDATES)

    def metadata(self) -> dict:
        best, by_cosine = self.best, self.candidates.by_cosine
        return {"selected_layer": best.layer, "selected_position": best.position,
                "selected_token": self.candidates.tokens.get(best.position, ""),
                "ablation_refusal_score": best.ablation_refusal_score, "addition_refusal_score": best.addition_refusal_score,
                "kl": best.kl, "passes_filters": self.passed, "selected_by_cosine": f"layer {by_cosine[0]}, position {by_cosine[1]}",
                "n_train_harmful": self.n_train["harmful"], "n_train_harmless": self.n_train["harmless"]}


def select_refusal_direction(loaded: LoadedModel, prompts: pa.Table, activations: pa.Table,
                             behaviour: pa.Table) -> DirectionSelection:
    """Difference in means over the refused harmful and answered harmless train prompts (by `behaviour`, the
    prompt_behaviour table), the best candidates by cosine score evaluated on val prompts, and the choice among them.

    Candidates are measured on the refused harmful val prompts and on harmless val prompts (`selection_prompts` each).
    """
    settings = loaded.study.settings
    harmful = behaving(behaviour, "harmful", "train", refused=True)
    harmless = behaving(behaviour, "harmless", "train", refused=False)
    candidates = direction_candidates(activations, set(harmful.prompt_ids), set(harmless.prompt_ids), loaded.n_layers,
                                      settings.direction_candidates)
    val_harmful = behaving(behaviour, "harmful", "val", refused=True, limit=settings.selection_prompts)
    val_harmless = prompts_of(prompts, "harmless", "val", settings.selection_prompts)["prompt_id"].to_pylist()
    evaluations = evaluate_candidates(
        loaded.model, loaded.tokenizer, {c: candidates.at(*c) for c in candidates.shortlist},
        chat_texts(loaded, prompts, val_harmful.prompt_ids), chat_texts(loaded, prompts, val_harmless),
        refusal_token_ids(loaded.model, loaded.tokenizer), settings.batch_size)
    best, passed = choose(evaluations)
    notes = [b.note for b in (harmful, harmless, val_harmful) if b.note]
    if not passed:
        notes.append("No candidate passed the filters (addition score > 0, KL not above 0.1 by more than 2 standard errors); kept the best by ablation.")
    return DirectionSelection(loaded.study.key, candidates, evaluations, best, passed,
                              {"harmful": len(harmful.prompt_ids), "harmless": len(harmless.prompt_ids)}, notes)
