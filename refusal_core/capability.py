"""Side effects of the interventions: 0-shot multiple-choice accuracy (ARC-Challenge, MMLU) and the cost on harmless answers.

Each question is one chat prompt ending where the answer starts; the answer is the choice letter with the
highest log-probability at that first answer position, one forward pass per question (the 5-shot context the
benchmarks ship would cost about 700 more tokens a question).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import length_batches, prefix_cache, tokenize_batch
from refusal_core.benchmarks import Question
from refusal_core.chat import format_prompt
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.intervals import paired_difference, wilson_interval
from refusal_core.interventions import Intervention, describe, intervene
from refusal_core.models import LoadedModel
from refusal_core.prompts import HARMLESS_SET
from refusal_core.scoring import SharedBottom
from refusal_core.study_interventions import Applied, harmless_costs
from refusal_core.tables import CAPABILITY

LETTERS = "ABCDE"
"""Choice letters, in order; ARC-Challenge has up to 5 choices, MMLU 4."""

INSTRUCTION = "Answer with the letter only."
"""Ends every question, so that the answer letter is the model's next token."""

CLAMPED_SETS = ("cossim_ap", "random")
"""Feature sets whose clamping is measured: the method and its control (of several random draws, the first only:
each costs a pass over every question)."""


def multiple_choice_prompt(question: Question) -> str:
    """The user's message for one question: the question, its lettered choices and `INSTRUCTION`."""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
    return f"{question.question.strip()}\n\n{options}\n\n{INSTRUCTION}"


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, n_letters: int) -> list[list[int]]:
    """Per letter, the single tokens that spell it as an answer's first token: "A" and " A" where each is one token."""
    found = []
    for letter in LETTERS[:n_letters]:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (letter, f" {letter}")]
        kept = sorted({row[0] for row in ids if len(row) == 1})
        if not kept:
            raise ValueError(f"The tokenizer spells neither {letter!r} nor {' ' + letter!r} as one token, so the answer "
                             "letter cannot be read at one position.")
        found.append(kept)
    return found


def letter_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    letter_ids: Sequence[Sequence[int]],
    intervention: Intervention | None = None,
    batch_size: int = 16,
    checkpoints: Checkpoints = Checkpoints(),
    progress: bool = True,
    bottom: SharedBottom | None = None,
) -> Tensor:
    """log P(letter) at the first answer position of each chat-formatted prompt, per letter: [n_prompts, n_letters].

    A letter's probability is the sum over its tokens (`letter_token_ids`). Prompts are batched by length, the
    tokens they share (the system prompt) run once, and only the last position's logits computed. Each finished
    batch is kept in `checkpoints`, so a killed run resumes after it. With `bottom`, a pass after the baseline's
    skips the blocks below the intervention's first hook (`scoring.SharedBottom`).
    """
    if not prompts:
        raise ValueError("No questions to score; the benchmark selection is empty.")
    description = describe(intervention)
    device = next(model.parameters()).device
    batches = length_batches(tokenizer, prompts, batch_size)
    bar = tqdm(total=len(prompts), desc=f"capability ({description.name})", unit="question", disable=not progress)

    bottom = bottom or SharedBottom(model)

    def compute(todo: list[int]):
        with intervene(model, intervention):
            prefix = prefix_cache(model, tokenizer, prompts)  # the shared system prompt, run once
        for b in todo:
            inputs = tokenize_batch(tokenizer, [prompts[i] for i in batches[b]], device, prefix)
            log_probs = torch.log_softmax(bottom.last_logits(b, inputs, intervention), dim=-1)  # [batch, vocab]
            letters = torch.stack([torch.logsumexp(log_probs[:, list(ids)], dim=-1) for ids in letter_ids], dim=-1)
            bar.update(len(batches[b]))
            yield {"letter_log_probs": letters.cpu()}  # [batch, n_letters]

    units = [{"prompts": digest([prompts[i] for i in batch]), "letters": [list(ids) for ids in letter_ids]}
             for batch in batches]
    result = torch.empty(len(prompts), len(letter_ids))
    scoped = checkpoints.within(intervention=description.id)
    for batch, part in zip(batches, scoped.resume(f"capability ({description.name})", units, compute)):
        result[batch] = part["letter_log_probs"].float()
    bar.close()
    return result


def grade(log_probs: Tensor, questions: Sequence[Question]) -> tuple[list[bool], list[float]]:
    """Per question, whether its most likely letter among its own choices is the correct one, and the probability the
    model puts on its choices' letters together (how far it answers with a letter at all).

    Args:
        log_probs: [n_questions, n_letters] from `letter_log_probs`; columns past a question's choices are ignored.
    """
    correct, mass = [], []
    for row, question in zip(log_probs, questions):
        scores = row[:len(question.choices)]  # [n_choices]
        correct.append(int(scores.argmax()) == question.answer)
        mass.append(float(torch.logsumexp(scores, dim=0).exp()))
    return correct, mass


def no_clamps_note(study_key: str) -> str:
    """The capability table's note in a study without SAEs."""
    return (f"Study {study_key} has no SAEs, so the capability table has no CosSim+AP or random clamping rows: only the "
            "baseline and the refusal direction ablated and added.")


def capability_interventions(directions: Applied, features: Applied) -> dict[str, Intervention]:
    """The interventions whose side effects are measured, by name: direction ablation and addition, and the
    CosSim+AP and random feature sets clamped (as `study_interventions` builds them; no clamps without SAEs)."""
    chosen = {name: intervention for name, (intervention, _) in directions.items() if name in ("ablate", "add")}
    for name, (intervention, _) in features.items():
        kind, _, feature_set = name.partition(":")
        family = feature_set.partition(":")[0]
        if kind == "clamp" and family in CLAMPED_SETS and not any(n.startswith(f"clamp:{family}") for n in chosen):
            chosen[name] = intervention
    return chosen


def measure_capability(
    loaded: LoadedModel,
    questions: Sequence[Question],
    interventions: Mapping[str, Intervention],
    harmless: pa.Table,
    baseline_generations: pa.Table,
    known_costs: Mapping[str, tuple[float | None, float | None]],
    checkpoints: Checkpoints = Checkpoints(),
    log: Callable[[str], None] = print,
) -> pa.Table:
    """The CAPABILITY table: accuracy per benchmark under the baseline and each of `interventions`, and their cost on
    the `harmless` eval prompts (`study_interventions.harmless_costs`: KL and change in cross-entropy of the baseline's
    own answers).

    Args:
        known_costs: intervention id -> (KL, cross-entropy change) already measured (intervention_effects' harmless
            rows); only the interventions missing from it are measured here.
        checkpoints: each finished batch of each intervention is kept there; deleted once the table is complete.
    """
    settings, model, tokenizer = loaded.study.settings, loaded.model, loaded.tokenizer
    prompts = [format_prompt(tokenizer, multiple_choice_prompt(q), loaded.study.chat_template) for q in questions]
    letter_ids = letter_token_ids(tokenizer, max(len(q.choices) for q in questions))
    graded = {}
    bottom = SharedBottom(model, interventions.values())  # the baseline runs first and records what the others reuse
    for intervention in (None, *interventions.values()):
        description = describe(intervention)
        log_probs = letter_log_probs(model, tokenizer, prompts, letter_ids, intervention, settings.batch_size, checkpoints,
                                     bottom=bottom)
        graded[description.id] = (description, *grade(log_probs, questions))
        log(f"{description.name}: {100 * sum(graded[description.id][1]) / len(questions):.0f}% of {len(questions)} "
            "questions answered correctly.")
    missing = {name: (intervention, (HARMLESS_SET,)) for name, intervention in interventions.items()
               if describe(intervention).id not in known_costs}
    costs = dict(known_costs)
    if missing:
        kl, cross_entropy = harmless_costs(loaded, harmless, baseline_generations, missing)
        costs |= {identity: (kl[identity], cross_entropy[identity]) for identity in kl}
    rows = capability_rows(loaded.study.key, questions, graded, costs)
    checkpoints.clear()
    return pa.Table.from_pylist(rows, schema=CAPABILITY)


def capability_rows(model_key: str, questions: Sequence[Question],
                    graded: Mapping[str, tuple[object, list[bool], list[float]]],
                    costs: Mapping[str, tuple[float | None, float | None]]) -> list[dict]:
    """CAPABILITY rows: per benchmark x intervention, accuracy with its Wilson 95% interval, and the paired difference
    from the baseline over the same questions (Newcombe's interval).

    Args:
        graded: intervention id -> (its `Description`, correct per question, letter probability per question); the
            baseline's id is "none".
        costs: intervention id -> (KL, cross-entropy change) on harmless prompts; the baseline's are 0.
    """
    if "none" not in graded:
        raise ValueError("The capability rows need the baseline's answers (intervention id 'none') to compare with.")
    costs = {"none": (0.0, 0.0), **costs}
    rows = []
    for benchmark in sorted({q.benchmark for q in questions}):
        members = [i for i, q in enumerate(questions) if q.benchmark == benchmark]
        baseline = [graded["none"][1][i] for i in members]
        for identity, (description, correct, mass) in graded.items():
            answered = [correct[i] for i in members]
            low, high = wilson_interval(sum(answered), len(answered))
            kl, cross_entropy = costs.get(identity, (None, None))
            row = {"model_key": model_key, "benchmark": benchmark, "intervention_id": description.id,
                   "intervention_kind": description.kind, "intervention_name": description.name,
                   "intervention_parameters": description.parameters, "feature_set": description.feature_set,
                   "n_questions": len(members), "n_correct": sum(answered), "accuracy": sum(answered) / len(answered),
                   "ci_low": low, "ci_high": high,
                   "mean_letter_probability": sum(mass[i] for i in members) / len(members),
                   "harmless_kl": kl, "harmless_cross_entropy_change": _finite(cross_entropy)}
            if identity != "none":
                difference, difference_low, difference_high = paired_difference(answered, baseline)
                row |= {"n_paired": len(members), "baseline_accuracy": sum(baseline) / len(baseline),
                        "difference": difference, "difference_ci_low": difference_low, "difference_ci_high": difference_high}
            rows.append(row)
    return rows


def costs_from_effects(intervention_effects: pa.Table) -> dict[str, tuple[float | None, float | None]]:
    """Intervention id -> (KL, cross-entropy change) on harmless prompts, from an EFFECTS table's harmless rows."""
    harmless = intervention_effects.filter(pc.equal(intervention_effects["eval_set"], HARMLESS_SET))
    return {row["intervention_id"]: (row["kl"], row["cross_entropy_change"])
            for row in harmless.select(["intervention_id", "kl", "cross_entropy_change"]).to_pylist()}


def _finite(value: float | None) -> float | None:
    # A mean over no scorable answer is nan: stored as null, a missing number.
    return None if value is None or value != value else value
