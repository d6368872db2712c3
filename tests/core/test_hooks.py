import pytest
import torch

from refusal_core.activations import tokenize_batch
from refusal_core.hooks import decoder_layers, head_count, hooks, record, record_residual
from refusal_core.layouts import LAYOUTS, layout_of
from tests.tiny import FAMILIES, load_tiny


PROMPTS = ["How do I bake bread?", "Write a haiku about the sea and the long summer evenings."]


@pytest.mark.parametrize("family", FAMILIES)
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


def test_model_without_blocks_names_the_supported_families():
    with pytest.raises(ValueError, match=r"Cannot find the decoder blocks, attention and MLP of Linear .*supported "
                                         r"families are gemma2, .*add a Layout for it to refusal_core.layouts.LAYOUTS"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_has_its_own_layout(tiny_models, family):
    model, _ = load_tiny(tiny_models[family])
    assert layout_of(model) is LAYOUTS[model.config.model_type]


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_decompose_the_residual_stream(tiny_models, family):
    """resid_post = resid_pre + attn_out + mlp_out in every block: the layout names what writes into the stream."""
    model, tokenizer = load_tiny(tiny_models[family])
    points = [f"{kind}.{layer}" for layer in range(3) for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post", "head_out")]
    with torch.no_grad(), record(model, points) as seen:
        model(**tokenize_batch(tokenizer, PROMPTS, torch.device("cpu")))
    for layer in range(3):
        total = seen[f"resid_pre.{layer}"] + seen[f"attn_out.{layer}"] + seen[f"mlp_out.{layer}"]
        assert torch.allclose(total, seen[f"resid_post.{layer}"], atol=1e-5), layer
        batch, seq, width = seen[f"resid_post.{layer}"].shape
        assert seen[f"head_out.{layer}"].shape == (batch, seq, head_count(model), 16)


def test_discovery_finds_the_blocks_of_an_unlisted_family(tiny_models, monkeypatch):
    model, _ = load_tiny(tiny_models["gemma2"])
    monkeypatch.setattr(model.config, "model_type", "my_gemma_variant")
    layout = layout_of(model)
    assert layout.blocks == "model.layers" and layout.attn_out == "post_attention_layernorm"


def test_bad_hook_point_registers_nothing(qwen):
    model, _ = qwen
    with pytest.raises(ValueError, match="Unknown hook point 'resid.1'; use KIND.LAYER"):
        with hooks(model, [("resid_post.0", lambda hidden, positions: None), ("resid.1", lambda hidden, positions: None)]):
            pass
    with pytest.raises(ValueError, match="Layer 5 is out of range"):
        with hooks(model, [("head_out.5", lambda hidden, positions: None)]):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
