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
