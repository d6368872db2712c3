import pytest
import torch

from refusal_core.activations import tokenize_batch
from refusal_core.hooks import decoder_layers, record_residual
from refusal_core.interventions import Ablate, Add, Compose, describe, intervene, project_out
from refusal_core.scoring import completion_cross_entropy, kl_divergence, refusal_score


def _inputs(tokenizer):
    return tokenize_batch(tokenizer, ["How do I bake bread?", "List three colours."], torch.device("cpu"))


def test_addition_changes_its_layer_by_exactly_the_vector_and_leaves_earlier_layers(qwen):
    model, tokenizer = qwen
    inputs = _inputs(tokenizer)
    vector = torch.randn(64)
    with torch.no_grad(), record_residual(model, [0, 1]) as clean:
        model(**inputs)
    clean = dict(clean)
    captured = {}

    def grab(module, args):
        captured["input"] = args[0].clone()

    with torch.no_grad(), intervene(model, Add(vector, layer=1, coefficient=2.0)), record_residual(model, [0]) as patched:
        handle = decoder_layers(model)[1].register_forward_pre_hook(grab)
        try:
            model(**inputs)
        finally:
            handle.remove()
    assert torch.equal(patched[0], clean[0])  # block 0 is untouched
    assert torch.allclose(captured["input"], clean[0] + 2.0 * vector, atol=1e-6)


def test_ablation_removes_the_direction_from_every_block_output(qwen):
    model, tokenizer = qwen
    direction = torch.randn(64)
    unit = direction / direction.norm()
    with torch.no_grad(), intervene(model, Ablate(direction)), record_residual(model, [0, 1, 2]) as recorded:
        model(**_inputs(tokenizer))
    for layer, hidden in recorded.items():
        assert (hidden @ unit).abs().max() < 1e-4, layer


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
    first, kind, parameters = describe(Add(direction, 3, 1.5))
    assert describe(Add(direction.clone(), 3, 1.5))[0] == first and kind == "add"
    assert describe(Add(direction, 3, 2.0))[0] != first and '"layer":3' in parameters
    assert describe(None) == ("none", "none", "{}")


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
