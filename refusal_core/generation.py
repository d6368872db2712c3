"""Batched greedy generation with the chat template, stopping at the model's end-of-turn token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import tokenize_batch


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends the assistant's turn: the generation config's EOS ids and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for token in (tokenizer.eos_token, "<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of chat-formatted `prompts`, in order, without the end-of-turn token.

    Prompts are batched by length with left padding. Decoding is greedy, so the same prompts
    always give the same completions.
    """
    if not prompts:
        raise ValueError("No prompts to generate for; the prompt selection is empty.")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    completions: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        inputs = tokenize_batch(tokenizer, [prompts[i] for i in indices], device)
        inputs.pop("position_ids")  # generate() derives them from the attention mask.
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # [batch, new]
        for index, row in zip(indices, new_tokens.tolist()):
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            completions[index] = tokenizer.decode(row[:cut], skip_special_tokens=True)
        bar.update(len(indices))
    bar.close()
    return completions
