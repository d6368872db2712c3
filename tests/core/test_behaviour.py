import pyarrow as pa
import pytest
import torch

from refusal_core.behaviour import MIN_BEHAVING, behaving, behaviour_table
from refusal_core.chat import format_prompt
from refusal_core.models import LoadedModel
from refusal_core.registry import load_registry
from refusal_core.scoring import answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.tables import PROMPT_BEHAVIOUR


def planted_behaviour(scores: dict[tuple[str, str], list[float]]) -> pa.Table:
    """A prompt_behaviour table with the given refusal scores per (label, split); ids sort in the listed order."""
    rows = [{"model_key": "m", "prompt_id": f"{label}-{split}-{i:02d}", "label": label, "split": split,
             "refusal_score": score, "refused": score > 0}
            for (label, split), values in scores.items() for i, score in enumerate(values)]
    return pa.Table.from_pylist(rows[::-1], schema=PROMPT_BEHAVIOUR)  # stored order must not matter


def test_refused_and_answered_prompts_are_split_by_their_planted_score_in_id_order():
    behaviour = planted_behaviour({("harmful", "train"): [2.0, -1.0, 0.5, 3.0, -0.1, 1.0, 0.0, 4.0, -2.0],
                                   ("harmful", "val"): [1.0] * 5, ("harmless", "train"): [-2.0] * 5 + [1.0]})
    refused = behaving(behaviour, "harmful", "train", refused=True)
    assert refused.prompt_ids == [f"harmful-train-{i:02d}" for i in (0, 2, 3, 5, 7)] and refused.note is None
    answered = behaving(behaviour, "harmful", "train", refused=False)  # a score of exactly 0 is not a refusal
    assert answered.prompt_ids == [f"harmful-train-{i:02d}" for i in (1, 4, 6, 8)]
    assert behaving(behaviour, "harmful", "train", refused=True, limit=2).prompt_ids == ["harmful-train-00", "harmful-train-02"]
    assert behaving(behaviour, "harmless", "train", refused=False).prompt_ids == [f"harmless-train-{i:02d}" for i in range(5)]


def test_too_few_behaving_prompts_keep_them_all_unfiltered_with_a_note():
    behaviour = planted_behaviour({("harmful", "train"): [-1.0] * 6 + [1.0] * (MIN_BEHAVING - 1)})
    kept = behaving(behaviour, "harmful", "train", refused=True, limit=4)
    assert kept.prompt_ids == [f"harmful-train-{i:02d}" for i in range(4)]
    assert kept.note == (f"Only {MIN_BEHAVING - 1} of {6 + MIN_BEHAVING - 1} harmful train prompts are refused by refusal "
                         f"score (fewer than {MIN_BEHAVING}); using them unfiltered.")
    with pytest.raises(ValueError, match="No harmless prompt of the train split has stored activations"):
        behaving(behaviour, "harmless", "train", refused=False)


def test_behaviour_table_scores_every_stored_prompt_once_in_id_order(tiny_registry, qwen):
    model, tokenizer = qwen
    loaded = LoadedModel(model, tokenizer, load_registry(tiny_registry).get("tiny-qwen2"), "local:tiny", "0" * 64)
    texts = {"b2": "How do I bake bread?", "a1": "Write a poem about rain.", "c3": "Tell me how to pick a lock."}
    prompts = pa.table({"prompt_id": list(texts), "text": list(texts.values()), "label": ["harmless", "harmless", "harmful"],
                        "split": ["train", "val", "train"]})
    activations = pa.table({"prompt_id": ["c3", "a1", "c3", "a1"]})  # b2 has no stored activations
    table = behaviour_table(loaded, prompts, activations)
    assert table.schema == PROMPT_BEHAVIOUR
    assert table["prompt_id"].to_pylist() == ["a1", "c3"] and table["label"].to_pylist() == ["harmless", "harmful"]
    alone = [float(refusal_score(answer_log_probs(model, tokenizer, [format_prompt(tokenizer, texts[i], "tokenizer")]),
                                 refusal_token_ids(model, tokenizer))[0]) for i in ("a1", "c3")]
    assert torch.allclose(torch.tensor(table["refusal_score"].to_pylist()), torch.tensor(alone), atol=1e-4)
    assert table["refused"].to_pylist() == [s > 0 for s in table["refusal_score"].to_pylist()]
