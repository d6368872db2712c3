"""Batched greedy generation with the chat template, stopping at the model's end-of-turn token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import PrefixCache, left_padded, prefix_cache
from refusal_core.layouts import layout_of


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends the assistant's turn: the generation config's EOS ids, the tokenizer's EOS and the family's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for token in (tokenizer.eos_token, *layout_of(model).end_of_turn):
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

    Prompts are batched by length; the tokens they all share (the system prompt) are run once and
    reused. Decoding is greedy, so the same prompts always give the same completions.
    """
    return generate_scored(model, tokenizer, prompts, max_new_tokens, batch_size, progress)[0]


def generate_scored(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[str], Tensor]:
    """`generate`, plus the log-probabilities of the first answer token [n_prompts, vocab] from the same pass.

    They are what `scoring.answer_log_probs` computes, without running the prompts a second time.
    """
    if not prompts:
        raise ValueError("No prompts to generate for; the prompt selection is empty.")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
    # The tokens every prompt shares (the system prompt) are run once; each batch continues from a copy
    # of their cache, with its padding placed after them. A sliding window counts padding, so models
    # whose window the prompts could outgrow run without the shared prefix.
    window = getattr(model.config, "sliding_window", None)
    fits = window is None or max(map(len, ids)) + max_new_tokens <= window
    prefix = prefix_cache(model, tokenizer, prompts) if fits else None
    completions: list[str] = [""] * len(prompts)
    first: list[Tensor | None] = [None] * len(prompts)
    # Only the prefill's logits are kept: the raw model outputs at the first answer step, before any logits
    # processor. output_logits=True would keep every step's: 2 GiB more peak memory for a batch of 32 with a
    # 152k vocabulary (python -m benchmarks.generation).
    logits: list[tuple[int, Tensor]] = []

    def keep_first(_module, _args, kwargs, output) -> None:
        if not logits:
            fed = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            logits.append((fed.shape[1], output.logits[:, -1].float()))

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        inputs, extra = _generation_inputs([ids[i] for i in indices], prefix, tokenizer.pad_token_id or 0, device)
        logits.clear()
        hook = model.register_forward_hook(keep_first, with_kwargs=True)
        try:
            with torch.inference_mode():
                sequences = model.generate(
                    **inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                )
        finally:
            hook.remove()
        fed, first_logits = logits[0]
        expected = inputs["input_ids"].shape[1] - (len(prefix.ids) if prefix else 0)
        if fed != expected:
            raise ValueError(
                f"generate() ran {fed} of the prompts' {expected} new tokens in its first pass, so the first answer "
                "step's scores are not there; unset prefill_chunk_size and prompt_lookup_num_tokens in the model's "
                "generation config.")
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]  # [batch, new]
        log_probs = torch.log_softmax(first_logits, dim=-1).cpu()  # [batch, vocab], first answer step
        for k, (index, row) in enumerate(zip(indices, new_tokens.tolist())):
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            completions[index] = tokenizer.decode(row[:cut], skip_special_tokens=True)
            first[index] = log_probs[k]
        bar.update(len(indices))
    bar.close()
    return completions, torch.stack(first)


def _generation_inputs(rows: list[list[int]], prefix: PrefixCache | None, pad_id: int,
                       device: torch.device) -> tuple[dict[str, Tensor], dict]:
    """Input ids and attention mask for generate(): [prefix, padding, rest] with a prefix, else [padding, prompt].

    generate() derives position ids from the attention mask, so padding never shifts a position.
    """
    if prefix is None:
        padded = left_padded(rows, pad_id)
        return {"input_ids": padded["input_ids"].to(device), "attention_mask": padded["attention_mask"].to(device)}, {}
    padded = left_padded([row[len(prefix.ids):] for row in rows], pad_id)
    shared = torch.tensor([prefix.ids] * len(rows), dtype=torch.long)
    return ({"input_ids": torch.cat([shared, padded["input_ids"]], dim=1).to(device),
             "attention_mask": torch.cat([torch.ones_like(shared), padded["attention_mask"]], dim=1).to(device)},
            {"past_key_values": prefix.for_batch(len(rows))})
