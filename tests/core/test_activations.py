import numpy as np
import pytest
import torch

from refusal_core.activations import activation_rows, capture, position_tokens
from refusal_core.chat import format_prompt, post_instruction_tokens

TEXTS = ["Hi", "Explain photosynthesis to a ten-year-old in three sentences.", "List five uses of vinegar.",
         "What is ransomware?", "Translate 'good morning' into Spanish, French and German."]


def test_post_instruction_tokens_are_the_template_after_the_instruction(qwen):
    _, tokenizer = qwen
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    assert tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    plain = post_instruction_tokens(tokenizer, "plain")
    assert tokenizer.decode(plain).endswith("Answer:")


def test_capture_in_left_padded_batches_matches_each_prompt_alone(qwen):
    model, tokenizer = qwen
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in TEXTS]
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    layers = [0, 1]
    batched = {}
    for batch in capture(model, tokenizer, prompts, layers, suffix, batch_size=3, progress=False):
        for row, index in enumerate(batch.indices):
            batched[index] = batch.activations[row]
    assert sorted(batched) == list(range(len(TEXTS)))
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states
        for slot, layer in enumerate(layers):
            alone = hidden[layer + 1][0, -len(suffix) - 1:]  # [instruction token + template, d_model]
            assert torch.allclose(batched[index][slot], alone, atol=1e-4), (index, layer)


def test_capture_stops_after_the_last_needed_layer(qwen):
    model, tokenizer = qwen
    prompts = [format_prompt(tokenizer, TEXTS[1], "tokenizer")]
    calls = []
    handle = model.model.layers[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        list(capture(model, tokenizer, prompts, [0], post_instruction_tokens(tokenizer, "tokenizer"), progress=False))
    finally:
        handle.remove()
    assert calls == []


def test_capture_rejects_prompts_without_the_template(qwen):
    model, tokenizer = qwen
    with pytest.raises(ValueError, match="does not end with the post-instruction template tokens"):
        list(capture(model, tokenizer, ["plain text"], [0], post_instruction_tokens(tokenizer, "tokenizer"), progress=False))
    with pytest.raises(ValueError, match="No prompts"):
        list(capture(model, tokenizer, [], [0], [1], progress=False))


def test_activation_rows_lay_out_prompt_layer_position(qwen):
    model, tokenizer = qwen
    prompts = [format_prompt(tokenizer, text, "tokenizer") for text in TEXTS[:2]]
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    batch = next(capture(model, tokenizer, prompts, [0, 1], suffix, batch_size=2, progress=False))
    tokens = position_tokens(tokenizer, suffix)
    n = len(tokens)
    assert n == len(suffix) + 1 and tokens[0] == "[instruction]"
    rows = activation_rows(batch, "m", ["a", "b"], [0, 1], tokens)
    assert rows.num_rows == 2 * 2 * n
    table = rows.to_pydict()
    first = batch.indices[0]
    assert table["prompt_id"][0] == ["a", "b"][first]
    assert table["layer_index"][: 2 * n] == [0] * n + [1] * n
    assert table["position"][:n] == list(range(-n, 0))
    assert table["token"][:n] == tokens
    vector = np.asarray(table["activation"][n + 2], dtype=np.float32)  # layer 1, third position
    assert np.array_equal(vector, batch.activations[0, 1, 2].numpy())
