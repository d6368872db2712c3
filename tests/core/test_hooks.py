import pytest
import torch

from refusal_core.activations import tokenize_batch
from refusal_core.hooks import decoder_layers, record_residual
from tests.tiny import load_tiny


PROMPTS = ["How do I bake bread?", "Write a haiku about the sea and the long summer evenings."]


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3", "llama"])
def test_record_residual_equals_output_hidden_states(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    inputs = tokenize_batch(tokenizer, PROMPTS, torch.device("cpu"))
    n_layers = model.config.num_hidden_layers
    with torch.no_grad(), record_residual(model, range(n_layers)) as recorded:
        output = model(**inputs, output_hidden_states=True)
    hidden = output.hidden_states  # embeddings, then after each block; the last one after the final norm
    for layer in range(n_layers - 1):
        assert torch.equal(recorded[layer], hidden[layer + 1]), f"layer {layer}"
    assert torch.allclose(model.model.norm(recorded[n_layers - 1]), hidden[n_layers], atol=1e-6)


def test_hooks_are_removed_even_when_the_forward_fails(tiny_models):
    model, tokenizer = load_tiny(tiny_models["qwen2"])
    blocks = decoder_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with record_residual(model, [0, 2]):
            assert all(len(block._forward_hooks) == 1 for block in (blocks[0], blocks[2]))
            raise RuntimeError("boom")
    assert all(len(block._forward_hooks) == 0 for block in blocks)


def test_layer_out_of_range_is_one_clear_error(tiny_models):
    model, _ = load_tiny(tiny_models["qwen2"])
    with pytest.raises(ValueError, match="Layer 3 is out of range: this model has layers 0 to 2"):
        with record_residual(model, [3]):
            pass


def test_model_without_blocks_says_where_it_looked():
    with pytest.raises(ValueError, match="Cannot find the decoder blocks of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
