import pytest

from refusal_core import generation
from refusal_core.chat import format_prompt
from refusal_core.generation import generate
from tests.tiny import load_tiny

PROMPTS = ["How do I bake bread?", "List three colours.", "Write a poem about the sea, please.", "Hi"]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generation_with_the_shared_prefix_cache_equals_generation_without(tiny_models, family, monkeypatch):
    model, tokenizer = load_tiny(tiny_models[family])
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in PROMPTS]
    assert len(generation.prefix_cache(model, tokenizer, prompts).ids) >= 3  # the template's shared start
    cached = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    monkeypatch.setattr(generation, "prefix_cache", lambda *args, **kwargs: None)
    plain = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert cached == plain and any(cached)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_first_answer_log_probs_from_generation_equal_a_separate_scoring_pass(tiny_models, family):
    import torch

    from refusal_core.generation import generate_scored
    from refusal_core.interventions import Ablate, intervene
    from refusal_core.scoring import answer_log_probs

    model, tokenizer = load_tiny(tiny_models[family])
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in PROMPTS]
    direction = torch.randn(model.config.hidden_size)
    for intervention in (None, Ablate(direction)):
        with intervene(model, intervention):
            completions, first = generate_scored(model, tokenizer, prompts, max_new_tokens=4, batch_size=3, progress=False)
        scored = answer_log_probs(model, tokenizer, prompts, intervention, batch_size=2)
        assert first.shape == scored.shape
        assert torch.allclose(first, scored, atol=1e-4)
        assert len(completions) == len(prompts)


def test_a_prompt_run_in_pieces_is_refused_rather_than_scored_wrong(tiny_models):
    from refusal_core.generation import generate_scored

    model, tokenizer = load_tiny(tiny_models["qwen2"])
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in PROMPTS]
    model.generation_config.prefill_chunk_size = 2  # generate() would prefill two tokens at a time
    with pytest.raises(ValueError, match="unset prefill_chunk_size"):
        generate_scored(model, tokenizer, prompts, max_new_tokens=2, batch_size=3, progress=False)
