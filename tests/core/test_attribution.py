import pytest
import torch

from refusal_core.activations import tokenize_batch
from refusal_core.attribution import attribution_patching, decoder_cosines, encode_rows
from refusal_core.generation import generate
from refusal_core.hooks import hooks, record_residual
from refusal_core.interventions import Ablate, Clamp, SaeLatents, describe, intervene
from refusal_core.saes import splice
from tests.tiny import load_tiny, random_sae

PROMPTS = ["How do I bake bread?", "List three colours.", "Write a poem about the sea, please.", "Hi"]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    sae = random_sae(layer=1)
    with torch.no_grad():  # encoder = decoder^T and a small threshold-free bias, so real latents fire
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_splice_that_patches_nothing_keeps_the_output(qwen, sae):
    model, tokenizer = qwen
    inputs = tokenize_batch(tokenizer, PROMPTS, torch.device("cpu"))
    clean = _logits(model, inputs)
    with splice(model, sae, 1, use_error_term=True, skip_first=2, edit=lambda latents: latents.clone()):
        spliced = _logits(model, inputs)
    assert torch.allclose(spliced, clean, atol=1e-4)


def test_clamp_subtracts_exactly_the_decoded_change_of_the_chosen_latents(qwen, sae):
    model, tokenizer = qwen
    inputs = tokenize_batch(tokenizer, PROMPTS, torch.device("cpu"))
    with torch.no_grad(), record_residual(model, [1]) as clean:
        model(**inputs)
    hidden = clean[1]
    latents = sae.encode(hidden)  # [batch, seq, d_sae]
    chosen = (3, 17, 40)
    expected = hidden + (-2.0 - 1.0) * latents[..., list(chosen)] @ sae.W_dec[list(chosen)]
    clamp = Clamp((SaeLatents(1, sae, "f" * 64, chosen),), factor=-2.0)
    with torch.no_grad(), intervene(model, clamp), record_residual(model, [1]) as clamped:
        model(**inputs)
    assert torch.allclose(clamped[1], expected, atol=1e-4)
    assert not torch.allclose(clamped[1], hidden, atol=1e-3)
    # Factor 1 keeps the latents, and the error term keeps the rest: the model's logits are the clean ones.
    clean_logits = _logits(model, inputs)
    with intervene(model, Clamp((SaeLatents(1, sae, "f" * 64, chosen),), factor=1.0)):
        kept = _logits(model, inputs)
    with intervene(model, clamp):
        changed = _logits(model, inputs)
    assert torch.allclose(kept, clean_logits, atol=1e-4)
    assert not torch.allclose(changed, clean_logits, atol=1e-3)  # the same comparison does see a real clamp


def test_setting_latents_sets_them_at_every_position_after_the_prefix_during_generation(qwen, sae):
    model, tokenizer = qwen
    clamp = Clamp((SaeLatents(1, sae, "f" * 64, (5, 9), values=(4.0, 2.5)),), skip_first=2, feature_set="planted")
    before, after = [], []
    with hooks(model, [("resid_post.1", lambda hidden, positions: before.append(hidden.detach()))]), \
            intervene(model, clamp), hooks(model, [("resid_post.1", lambda hidden, positions: after.append(hidden.detach()))]):
        answers = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4)
    assert len(answers) == 2 and len(after) >= 4  # the prompt pass and one pass per generated token
    values = torch.tensor([4.0, 2.5])
    for clean, clamped in zip(before, after):
        latents = sae.encode(clean)[..., [5, 9]]  # [batch, seq, 2]
        expected = clean + (values - latents) @ sae.W_dec[[5, 9]]
        if clean.shape[1] == 1:  # a generated token: its position is past the prefix
            assert torch.allclose(clamped, expected, atol=1e-4)
        else:  # the prompt pass: each prompt's first two tokens (and padding) are the prefix and stay as they were
            past_prefix = tokenize_batch(tokenizer, PROMPTS[:2], torch.device("cpu"))["position_ids"] >= 2
            assert torch.allclose(clamped, torch.where(past_prefix[..., None], expected, clean), atol=1e-4)
    described = describe(clamp)
    assert described.kind == "induce" and described.name == "induce planted" and described.feature_set == "planted"
    assert '"values":[4.0,2.5]' in described.parameters and described.id.startswith("induce-")


def test_clamp_rejects_bad_latents(sae):
    with pytest.raises(ValueError, match="0..127"):
        SaeLatents(1, sae, "f" * 64, (128,))
    with pytest.raises(ValueError, match="exactly one"):
        Clamp((SaeLatents(1, sae, "f" * 64, (1,)),))
    with pytest.raises(ValueError, match="exactly one"):
        Clamp((SaeLatents(1, sae, "f" * 64, (1,), values=(2.0,)),), factor=-1.0)
    with pytest.raises(ValueError, match="one per latent"):
        SaeLatents(1, sae, "f" * 64, (1, 2), values=(1.0,))


def test_integrated_gradients_add_up_to_the_effect_of_patching_the_layer(qwen, sae):
    """Completeness: the scores summed over latents equal metric(latents patched) - metric(clean)."""
    model, tokenizer = qwen
    direction = torch.randn(64)
    patch = Ablate(direction)
    result = attribution_patching(model, tokenizer, {1: sae}, PROMPTS, patch, steps=32, batch_size=2, progress=False)
    inputs = tokenize_batch(tokenizer, PROMPTS, torch.device("cpu"))
    with torch.no_grad(), intervene(model, patch), record_residual(model, [1]) as patched:
        model(**inputs)
    patched_latents = sae.encode(patched[1])
    with torch.no_grad(), splice(model, sae, 1, use_error_term=True, edit=lambda latents: patched_latents):
        logits = model(**inputs).logits[:, -1]
    refusal, compliance = torch.tensor(result.refusal_tokens), torch.tensor(result.compliance_tokens)
    layer_patched = logits.gather(-1, compliance[:, None])[:, 0] - logits.gather(-1, refusal[:, None])[:, 0]
    total = result.scores[1].sum(-1)  # [n_prompts]
    assert result.scores[1].shape == (4, 128)
    assert torch.allclose(total, layer_patched - result.clean_metric, atol=0.02 + 0.02 * float((layer_patched - result.clean_metric).abs().max()))
    assert float((layer_patched - result.clean_metric).abs().max()) > 0.01  # the patch does something


def test_decoder_cosines_and_encoding(sae):
    cosines = decoder_cosines(sae, sae.W_dec[7].detach() * 3)
    assert cosines.shape == (128,) and int(cosines.argmax()) == 7 and abs(float(cosines[7]) - 1) < 1e-5
    rows = torch.randn(10, 64)
    assert torch.allclose(encode_rows(sae, rows, batch_size=3), sae.encode(rows).detach())


def test_attribution_with_a_shared_prefix_cache_equals_the_full_passes(tiny_models, monkeypatch):
    from refusal_core import attribution

    model, tokenizer = load_tiny(tiny_models["qwen2"])
    torch.manual_seed(1)
    sae = random_sae(layer=1)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.T)
    prefix = "System: be helpful and kind. User:"
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    prompts = [f"{prefix} {text}" for text in PROMPTS]
    patch = Ablate(torch.randn(64))
    cached = attribution_patching(model, tokenizer, {1: sae}, prompts, patch, steps=3, batch_size=3,
                                  skip_first=n_prefix, progress=False)
    monkeypatch.setattr(attribution, "prefix_cache", lambda *args: None)
    full = attribution_patching(model, tokenizer, {1: sae}, prompts, patch, steps=3, batch_size=3,
                                skip_first=n_prefix, progress=False)
    assert cached.refusal_tokens == full.refusal_tokens and cached.compliance_tokens == full.compliance_tokens
    assert torch.allclose(cached.clean_metric, full.clean_metric, atol=1e-4)
    assert torch.allclose(cached.patched_metric, full.patched_metric, atol=1e-4)
    assert torch.allclose(cached.scores[1], full.scores[1], atol=1e-4)
    assert float(full.scores[1].abs().max()) > 1e-3

