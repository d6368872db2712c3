"""What the model does: its refusal score on every prompt of the activations table, the refused or answered prompts a
stage keeps, and refusal rates per label."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from refusal_core.chat import format_prompt
from refusal_core.models import LoadedModel
from refusal_core.prompts import texts_of
from refusal_core.scoring import answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.tables import PROMPT_BEHAVIOUR

MIN_BEHAVING = 4
"""Fewest prompts a refusal filter may keep; with fewer it is skipped (see `behaving`)."""


def behaviour_table(loaded: LoadedModel, prompts: pa.Table, activations: pa.Table) -> pa.Table:
    """PROMPT_BEHAVIOUR rows: the refusal score of every prompt with stored activations, in prompt-id order, in one pass."""
    ids = sorted(pc.unique(activations["prompt_id"]).to_pylist())
    chosen = prompts.filter(pc.is_in(prompts["prompt_id"], pa.array(ids, pa.string()))).sort_by("prompt_id")
    texts = chat_texts(loaded, chosen, chosen["prompt_id"].to_pylist())
    log_probs = answer_log_probs(loaded.model, loaded.tokenizer, texts, None, loaded.study.settings.batch_size)
    scores = refusal_score(log_probs, refusal_token_ids(loaded.model, loaded.tokenizer)).tolist()
    return pa.table({"model_key": [loaded.study.key] * len(scores), "prompt_id": chosen["prompt_id"],
                     "label": chosen["label"], "split": chosen["split"], "refusal_score": scores,
                     "refused": [score > 0 for score in scores]}, schema=PROMPT_BEHAVIOUR)


@dataclass(frozen=True)
class Behaving:
    """Prompts kept by a refusal filter."""

    prompt_ids: list[str]
    """In prompt-id order."""
    note: str | None
    """Why the filter was skipped, when it was; None otherwise."""


def behaving(behaviour: pa.Table, label: str, split: str, refused: bool, limit: int | None = None) -> Behaving:
    """The `label` prompts of `split` that the model refuses (`refused`) or answers, by refusal score, first `limit` by id.

    The one fallback rule of every stage that filters by behaviour (directions, attribution): when fewer than
    MIN_BEHAVING prompts behave so (a model that refuses, or answers, almost nothing), the filter is skipped and the
    first `limit` prompts of `label` in `split` are kept whatever they do, with a note saying so. The probes take no
    fallback: they are labelled by what the model does (`probes.probe_training_set`).
    """
    rows = behaviour.filter(pc.and_(pc.equal(behaviour["label"], label), pc.equal(behaviour["split"], split)))
    if rows.num_rows == 0:
        raise ValueError(f"No {label} prompt of the {split} split has stored activations; keep {label} in "
                         "settings.activation_labels and raise settings.max_prompts_per_label.")
    rows = rows.sort_by("prompt_id")
    kept, note = rows.filter(pc.equal(rows["refused"], refused)), None
    if kept.num_rows < MIN_BEHAVING:
        note = (f"Only {kept.num_rows} of {rows.num_rows} {label} {split} prompts are {'refused' if refused else 'answered'} "
                f"by refusal score (fewer than {MIN_BEHAVING}); using them unfiltered.")
        kept = rows
    return Behaving(kept["prompt_id"].to_pylist()[:limit], note)


def chat_texts(loaded: LoadedModel, prompts: pa.Table, ids: list[str]) -> list[str]:
    """The prompts `ids`, in that order, formatted with the study's chat template."""
    return [format_prompt(loaded.tokenizer, text, loaded.study.chat_template) for text in texts_of(prompts, ids)]


def refusal_rates(table: pa.Table, labels: tuple[str, ...], column: str = "refused_substring") -> dict[str, float]:
    """Share of each label's rows refused by `column` (the substring judge of generations by default); 0 for a label with none."""
    refused, label_of = table[column].to_pylist(), table["label"].to_pylist()
    return {label: sum(r for r, l in zip(refused, label_of) if l == label) / max(1, label_of.count(label)) for label in labels}


def eval_set_rates(generations: pa.Table, column: str = "refused_substring") -> dict[str, float]:
    """Share of each eval set's answers (GENERATIONS rows, by their `eval_sets`) refused by `column`."""
    counts: dict[str, list[int]] = {}
    for refused, sets in zip(generations[column].to_pylist(), generations["eval_sets"].to_pylist()):
        for name in sets:
            counts.setdefault(name, []).append(bool(refused))
    return {name: sum(verdicts) / len(verdicts) for name, verdicts in counts.items()}
