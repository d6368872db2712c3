import pytest
import torch

from refusal_core.activations import capture
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.sequence import sequence_projections

TEXTS = ["How do I bake bread?", "List three colours.", "Write a poem about the sea, please."]


def test_prompt_positions_match_capture_and_answers_extend_them(qwen):
    model, tokenizer = qwen
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in TEXTS]
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    direction = torch.randn(64, dtype=torch.float64)
    answers = ["Sure, here it is.", "", "Red"]
    items = list(sequence_projections(model, tokenizer, prompts, answers, len(suffix), [0, 1], direction, batch_size=2))
    captured = next(capture(model, tokenizer, prompts, [0, 1], suffix, batch_size=3, progress=False))
    unit = direction / direction.norm()
    for item in items:
        n_answer = len(tokenizer(answers[item.index], add_special_tokens=False)["input_ids"]) if answers[item.index] else 0
        assert item.positions == list(range(-1 - len(suffix), n_answer))
        assert item.projections.shape == (2, 1 + len(suffix) + n_answer)
        row = captured.indices.index(item.index)
        expected = captured.activations[row].double() @ unit  # [layers, positions] of the prompt alone
        assert torch.allclose(item.projections[:, :1 + len(suffix)], expected, atol=1e-4)
        assert item.tokens[0] == "[instruction]" and item.tokens[1:1 + len(suffix)] == tokenizer.convert_ids_to_tokens(suffix)


def test_one_answer_per_prompt(qwen):
    model, tokenizer = qwen
    with pytest.raises(ValueError, match="one answer per prompt"):
        list(sequence_projections(model, tokenizer, ["a", "b"], ["x"], 5, [0], torch.randn(64)))
