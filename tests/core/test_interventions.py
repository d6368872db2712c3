import pytest
import torch

from refusal_core.activations import tokenize_batch
from refusal_core.hooks import decoder_layers, head_count, hooks, record, record_residual
from refusal_core.interventions import (Ablate, Add, Clamp, Compose, HeadAblate, HeadPatch, SaeLatents, describe, intervene,
                                        project_out)
from refusal_core.scoring import SharedBottom, answer_log_probs, completion_cross_entropy, kl_divergence, refusal_score
from tests.tiny import FAMILIES, load_tiny, random_sae


def _inputs(tokenizer):
    return tokenize_batch(tokenizer, ["How do I bake bread?", "List three colours."], torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_removes_the_direction_from_every_block_output(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    direction = torch.randn(64)
    unit = direction / direction.norm()
    inputs = _inputs(tokenizer)
    with torch.no_grad(), record_residual(model, [0, 1, 2]) as clean:
        model(**inputs)
    assert max(((h @ unit).abs() / h.norm(dim=-1)).max() for h in clean.values()) > 1e-2  # the test can fail
    points = [f"{kind}.{layer}" for layer in range(3) for kind in ("attn_out", "mlp_out", "resid_post")]
    with torch.no_grad(), intervene(model, Ablate(direction)), record(model, points) as recorded:
        model(**inputs)
    for point, hidden in recorded.items():  # every write into the residual stream, and the stream after each block
        assert ((hidden @ unit).abs() / hidden.norm(dim=-1).clamp_min(1e-6)).max() < 1e-4, point  # a padded row is 0


@pytest.mark.parametrize("family", FAMILIES)
def test_addition_changes_exactly_its_layers_input(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    inputs, vector = _inputs(tokenizer), torch.randn(64)
    points = ["resid_pre.0", "resid_pre.1", "resid_post.0"]
    with torch.no_grad(), record(model, points) as clean:
        model(**inputs)
    with torch.no_grad(), intervene(model, Add(vector, layer=1, coefficient=2.0)), record(model, points) as added:
        model(**inputs)
    assert torch.equal(added["resid_pre.0"], clean["resid_pre.0"]) and torch.equal(added["resid_post.0"], clean["resid_post.0"])
    assert torch.allclose(added["resid_pre.1"], clean["resid_pre.1"] + 2.0 * vector, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablating_every_head_of_a_layer_removes_its_attention_output(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    inputs = _inputs(tokenizer)
    all_heads = tuple((1, head) for head in range(head_count(model)))
    with torch.no_grad():
        clean = model(**inputs).logits
        with intervene(model, HeadAblate(all_heads)):
            ablated = model(**inputs).logits
        with hooks(model, [("attn_out.1", lambda hidden, positions: torch.zeros_like(hidden))]):
            removed = model(**inputs).logits
        with intervene(model, HeadAblate(all_heads[:1])):
            one = model(**inputs).logits
    assert not torch.allclose(ablated, clean, atol=1e-3) and not torch.allclose(one, ablated, atol=1e-3)
    assert torch.allclose(ablated, removed, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_patch_from_the_same_prompt_changes_nothing_and_from_another_moves_only_its_heads(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    inputs = _inputs(tokenizer)
    with torch.no_grad(), record(model, ["head_out.1"]) as own:
        clean = model(**inputs).logits
    with torch.no_grad(), intervene(model, HeadPatch(((1, 0), (1, 2)), {1: own["head_out.1"]})):
        same = model(**inputs).logits
    assert torch.equal(same, clean)
    source = own["head_out.1"] + torch.randn_like(own["head_out.1"])
    with torch.no_grad(), intervene(model, HeadPatch(((1, 2),), {1: source})), record(model, ["head_out.1"]) as seen:
        patched = model(**inputs).logits
    assert not torch.allclose(patched, clean, atol=1e-3)
    assert torch.equal(seen["head_out.1"][:, :, 2], source[:, :, 2])
    assert torch.equal(seen["head_out.1"][:, :, :2], own["head_out.1"][:, :, :2])


@pytest.mark.parametrize("family", FAMILIES)
def test_clamp_moves_the_block_output_by_exactly_the_decoded_change(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    inputs, sae = _inputs(tokenizer), random_sae(layer=1)
    chosen = (3, 17, 40)
    with torch.no_grad(), record_residual(model, [1]) as clean:
        model(**inputs)
    with torch.no_grad(), intervene(model, Clamp((SaeLatents(1, sae, "f" * 64, chosen),), factor=-2.0)), \
            record_residual(model, [1]) as clamped:
        model(**inputs)
    with torch.no_grad():
        latents = sae.encode(clean[1])
        change = torch.zeros_like(latents)
        change[..., list(chosen)] = -3.0 * latents[..., list(chosen)]  # x(-2) is a change of -3x
        expected = change @ sae.W_dec
    assert expected.abs().max() > 1e-3  # some chosen latent fires
    assert torch.allclose(clamped[1] - clean[1], expected, atol=1e-4)
    silent = int((latents.amax((0, 1)) == 0).nonzero()[0])  # a latent that never fires on these prompts
    with torch.no_grad():
        logits = model(**inputs).logits
        with intervene(model, Clamp((SaeLatents(1, sae, "f" * 64, (silent,)),), factor=-2.0)):
            assert torch.equal(model(**inputs).logits, logits)  # no latent changes, nothing changes: not even rounding


def test_head_and_clamp_bad_input_is_one_clear_error(qwen):
    model, tokenizer = qwen
    with pytest.raises(ValueError, match="Head 4 of layer 1 is out of range: this model has heads 0 to 3"):
        with intervene(model, HeadAblate(((1, 4),))):
            pass
    for source in (torch.zeros(1, 3, 64), torch.zeros(1, 3, 4, 8)):
        with pytest.raises(ValueError, match=r"HeadPatch needs a recorded head_out.1 of shape \[batch, seq, 4, 16\]"):
            with intervene(model, HeadPatch(((1, 0),), {1: source})):
                pass
    with pytest.raises(ValueError, match="HeadAblate needs at least one"):
        HeadAblate(())
    inputs = _inputs(tokenizer)  # 2 prompts
    length = inputs["input_ids"].shape[1]
    for source in (torch.zeros(3, length, 4, 16), torch.zeros(2, length + 1, 4, 16)):
        with pytest.raises(ValueError, match=r"HeadPatch recorded \d sequence\(s\) of \d+ tokens at layer 1 but the model ran "
                                             r"2 of \d+; run the same prompts whole, in one pass"), \
                torch.no_grad(), intervene(model, HeadPatch(((1, 0),), {1: source})):
            model(**inputs)
    # The shared-prefix scoring path runs prompts in pieces: refused rather than patched out of line.
    prompts = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\n"]
    with pytest.raises(ValueError, match="no shared-prefix cache"):
        answer_log_probs(model, tokenizer, prompts, HeadPatch(((1, 0),), {1: torch.zeros(1, 7, 4, 16)}))
    with pytest.raises(ValueError, match="SAE given has width 32 but the model's residual stream has width 64"):
        with intervene(model, Clamp((SaeLatents(1, random_sae(layer=1, d_in=32), "f" * 64, (1,)),), factor=0.0)):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_model_is_unchanged_after_the_context_exits(qwen):
    model, tokenizer = qwen
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        before = model(**inputs).logits
        with intervene(model, Compose((Ablate(torch.randn(64)), Add(torch.randn(64), 0)))):
            during = model(**inputs).logits
        after = model(**inputs).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert all(not block._forward_pre_hooks for block in decoder_layers(model))


def test_wrong_width_is_one_clear_error(qwen):
    model, _ = qwen
    with pytest.raises(ValueError, match=r"has shape \(32,\) but this model's residual stream has width 64"):
        with intervene(model, Ablate(torch.randn(32))):
            pass
    with pytest.raises(ValueError, match="Layer 9 is out of range"):
        with intervene(model, Add(torch.randn(64), layer=9)):
            pass


def test_description_is_stable_and_depends_on_parameters():
    direction = torch.arange(4.0)
    first = describe(Add(direction, 3, 1.5))
    assert describe(Add(direction.clone(), 3, 1.5)) == first and first.kind == "add"
    assert describe(Add(direction, 3, 2.0)).id != first.id and '"layer":3' in first.parameters
    assert first.name == "add direction ×1.5 at layer 3" and first.feature_set is None
    assert describe(None).id == "none" and describe(None).parameters == "{}"
    both = describe(Compose((Ablate(direction), HeadAblate(((2, 1), (1, 0)), scale=0.5))))
    assert both.kind == "compose" and both.name == "ablate direction + scale ×0.5 heads 1.0,2.1"


def test_project_out_and_scores_on_planted_values():
    unit = torch.tensor([1.0, 0.0])
    assert torch.equal(project_out(torch.tensor([[3.0, 4.0]]), unit), torch.tensor([[0.0, 4.0]]))
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.45, 0.45]]))
    assert torch.allclose(refusal_score(log_probs, [0]), torch.tensor([0.0, torch.log(torch.tensor(0.1 / 0.9))]))
    assert torch.allclose(kl_divergence(log_probs, log_probs), torch.zeros(2))


def test_completion_cross_entropy_matches_a_direct_computation(qwen):
    model, tokenizer = qwen
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nList three colours please<|im_end|>\n<|im_start|>assistant\n"]
    completions = ["Hello there", "Red, green and blue"]
    batched = completion_cross_entropy(model, tokenizer, prompts, completions, batch_size=2)
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = tokenizer(prompt + completion, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(logits[n_prompt - 1:], ids[0, n_prompt:])
        assert torch.allclose(batched[index], expected, atol=1e-4)
    with torch.no_grad():
        ablated = completion_cross_entropy(model, tokenizer, prompts, completions, Ablate(torch.randn(64)), batch_size=2)
    assert not torch.allclose(ablated, batched)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_bottom_skips_the_blocks_below_each_intervention_and_gives_the_same_scores(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    prompts = [f"You are a careful assistant. {q}" for q in
               ("How do I bake bread?", "List three colours.", "Why is the sky blue today?", "Name a prime.", "Hi")]
    direction = torch.randn(model.config.hidden_size)
    interventions = [Add(direction, 2), HeadAblate(((1, 0), (1, 1))),
                     Clamp((SaeLatents(1, random_sae(layer=1), "f" * 64, (3, 17, 40)),), factor=-2.0), Ablate(direction)]
    expected = [answer_log_probs(model, tokenizer, prompts, i, batch_size=2) for i in interventions]
    bottom = SharedBottom(model, interventions)
    assert bottom.starts == [1, 2]  # ablation hooks every block: nothing below it to reuse
    runs = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *_: runs.append(1))
    try:
        baseline = answer_log_probs(model, tokenizer, prompts, None, batch_size=2, bottom=bottom)
        assert len(runs) == 4  # the prefix and the 3 batches
        for intervention, want in zip(interventions, expected):
            runs.clear()
            assert torch.equal(answer_log_probs(model, tokenizer, prompts, intervention, batch_size=2, bottom=bottom), want)
            assert len(runs) == (4 if isinstance(intervention, Ablate) else 1)  # only the prefix, run under the intervention
    finally:
        handle.remove()
    assert torch.equal(baseline, answer_log_probs(model, tokenizer, prompts, None, batch_size=2))
    assert all(isinstance(block, type(decoder_layers(model)[-1])) for block in decoder_layers(model))  # blocks restored
    unseen = answer_log_probs(model, tokenizer, prompts[:3], interventions[0], batch_size=2, bottom=bottom)
    assert torch.allclose(unseen, expected[0][:3], atol=1e-5)  # another prefix: nothing recorded for it, it runs whole
