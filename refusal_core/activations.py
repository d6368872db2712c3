"""Capture residual-stream activations at the post-instruction positions, batch by batch."""

from __future__ import annotations

import copy
import time
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.hooks import StopForward, check_layers, decoder_layers, record_residual
from refusal_core.models import LoadedModel
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import activations_schema


@dataclass(frozen=True)
class ActivationBatch:
    """Activations of one batch of prompts."""

    indices: list[int]
    """Positions of the batch's prompts in the list given to `capture`."""
    activations: Tensor
    """Float32 on the CPU, shape [batch, n_layers, n_positions, d_model]; positions run -n..-1.

    The first position is the last token of the instruction; the rest are the post-instruction
    template tokens."""
    n_tokens: int
    """Tokens computed for the batch (no padding, no cached shared prefix), for throughput."""


@dataclass(frozen=True)
class PrefixCache:
    """The key-value cache of the tokens every prompt of a run starts with (a chat template's system prompt)."""

    ids: list[int]
    cache: object
    """The model's cache after the prefix, for one sequence; copied for each batch."""

    def for_batch(self, size: int):
        """A fresh copy of the cache repeated for `size` sequences (a forward pass extends the cache it is given)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(size)
        return cache


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Input ids, attention mask and position ids (counting real tokens only) of token-id rows, left-padded, on the CPU."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def prefix_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 n_prefix: int | None = None, min_rest: int = 1, last_layer: int | None = None) -> PrefixCache | None:
    """Run the tokens every prompt starts with once, for `tokenize_batch` to reuse; None if there are none.

    `n_prefix` fixes how many (None if not every prompt starts with the same `n_prefix` tokens and has
    `min_rest` more); left out, it is the longest prefix all prompts share that leaves each `min_rest`
    tokens. With `last_layer`, the blocks after it are not run (for passes that stop there too).
    Run it under the same intervention as the passes that will use it.
    """
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    if n_prefix is None:
        n_prefix = min(len(row) for row in ids) - min_rest
        for row in ids:
            n_prefix = next((i for i, (a, b) in enumerate(zip(row[:n_prefix], ids[0])) if a != b), n_prefix)
    if n_prefix <= 0 or any(len(row) < n_prefix + min_rest or row[:n_prefix] != ids[0][:n_prefix] for row in ids):
        return None
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    layers = [] if last_layer is None else [last_layer]
    with torch.inference_mode(), record_residual(model, layers, stop_after_last=True):
        try:
            model.get_decoder()(input_ids=torch.tensor([ids[0][:n_prefix]], device=device), past_key_values=cache,
                                use_cache=True)
        except StopForward:
            pass
    return PrefixCache(ids[0][:n_prefix], cache)


def tokenize_batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device,
                   prefix: PrefixCache | None = None) -> dict[str, Tensor]:
    """Left-padded input ids, attention mask and position ids that skip the padding.

    With `prefix`, only the tokens after it are given, right-padded so that every prompt's tokens follow
    the prefix without a gap (sliding-window attention counts positions), on top of a fresh copy of the
    prefix's cache; `input_mask` then says which given tokens are real and `last_index` where each ends.
    """
    if prefix is None:
        encoded = tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
        mask = encoded["attention_mask"]  # [batch, seq]
        # Position ids count real tokens only, as generate() does, so a left-padded prompt sees the
        # same positions as it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
        return {"input_ids": encoded["input_ids"].to(device), "attention_mask": mask.to(device),
                "position_ids": positions.to(device)}
    n_prefix = len(prefix.ids)
    rows = [row[n_prefix:] for row in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if any(not row for row in rows):
        raise ValueError("A prompt has no tokens after the shared prefix; build the prefix cache from these prompts.")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids.to(device),
            "attention_mask": torch.cat([torch.ones(len(rows), n_prefix, dtype=torch.long), mask], dim=1).to(device),
            "position_ids": (n_prefix + torch.arange(width)).expand(len(rows), width).to(device),
            "past_key_values": prefix.for_batch(len(rows)), "use_cache": True}


def input_mask(inputs: dict[str, Tensor]) -> Tensor:
    """Which of the given tokens [batch, seq] are real (not padding), with or without a prefix cache."""
    return inputs["attention_mask"][:, -inputs["input_ids"].shape[1]:].bool()


def last_index(inputs: dict[str, Tensor]) -> Tensor:
    """Index [batch] of each prompt's last real token among the given tokens (left or right padding)."""
    mask = input_mask(inputs)
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(1)


def length_batches(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of `batch_size`, shortest first (ties by position): how capture and generation batch.

    Sorting by length keeps padding small; the same prompts always form the same batches.
    """
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def capture(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int],
    suffix_ids: Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
    only: Container[int] | None = None,
) -> Iterator[ActivationBatch]:
    """Run the model's backbone on formatted `prompts` and yield the residual stream after each of `layers`.

    Only the last `len(suffix_ids) + 1` positions are kept: the instruction's last token (where
    harmfulness is read) and the post-instruction template tokens (where refusal is read).
    Prompts are batched by length to keep padding small, with left padding; the LM head and the
    blocks after the last requested layer are never run.

    Args:
        prompts: chat-formatted prompts, each ending with `suffix_ids`.
        layers: block indices whose output is recorded.
        suffix_ids: token ids of the post-instruction template (see `chat.post_instruction_tokens`).
        only: the numbers of the batches (of `length_batches`) to run, the others skipped; all when None.
    """
    if not prompts:
        raise ValueError("No prompts to capture activations for; the prompt selection is empty.")
    layers = check_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    n_positions = len(suffix_ids) + 1
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    for index, length in enumerate(lengths):
        if length < n_positions:
            raise ValueError(f"Prompt {index} does not end with the post-instruction template tokens {list(suffix_ids)}.")
    batches = [(number, indices) for number, indices in enumerate(length_batches(tokenizer, prompts, batch_size))
               if only is None or number in only]
    backbone = model.get_decoder()
    prefix = prefix_cache(model, tokenizer, prompts, min_rest=n_positions, last_layer=layers[-1])
    bar = tqdm(total=sum(len(indices) for _, indices in batches), desc="capture activations", unit="prompt",
               disable=not progress)
    for _, indices in batches:
        inputs = tokenize_batch(tokenizer, [prompts[i] for i in indices], device, prefix)
        kept = last_index(inputs)[:, None] - torch.arange(n_positions - 1, -1, -1, device=device)  # [batch, P]
        tails = inputs["input_ids"].gather(1, kept[:, 1:]).tolist()
        for index, tail in zip(indices, tails):
            if tail != list(suffix_ids):
                raise ValueError(f"Prompt {index} does not end with the post-instruction template tokens {list(suffix_ids)}.")
        with torch.inference_mode(), record_residual(model, layers, stop_after_last=True) as recorded:
            try:
                backbone(**{"use_cache": False, **inputs})
            except StopForward:
                pass
        rows = torch.arange(len(indices), device=device)[:, None]
        stacked = torch.stack([recorded[layer][rows, kept] for layer in layers], dim=1)  # [b, L, P, d]
        yield ActivationBatch(indices, stacked.float().cpu(), int(input_mask(inputs).sum()))
        bar.update(len(indices))
    bar.close()


INSTRUCTION_TOKEN = "[instruction]"
"""The `token` value stored for the instruction's last token, which differs from prompt to prompt."""


def position_tokens(tokenizer: PreTrainedTokenizerBase, suffix_ids: Sequence[int]) -> list[str]:
    """Names of the positions `capture` keeps: the instruction's last token, then the template tokens."""
    return [INSTRUCTION_TOKEN, *tokenizer.convert_ids_to_tokens(list(suffix_ids))]


def activation_rows(
    batch: ActivationBatch,
    model_key: str,
    prompt_ids: Sequence[str],
    layers: Sequence[int],
    tokens: Sequence[str],
) -> pa.RecordBatch:
    """One Arrow row per (prompt, layer, position) of `batch`, in the ACTIVATIONS schema.

    Args:
        prompt_ids: ids of all prompts given to `capture`, indexed by `batch.indices`.
        tokens: one name per kept position, in order (see `position_tokens`).
    """
    n_batch, n_layers, n_positions, d_model = batch.activations.shape
    vectors = batch.activations.numpy().reshape(-1, d_model)  # [b*L*P, d]
    ids = np.repeat(np.asarray([prompt_ids[i] for i in batch.indices], dtype=object), n_layers * n_positions)
    layer_column = np.tile(np.repeat(np.asarray(layers, dtype=np.int16), n_positions), n_batch)
    position_column = np.tile(np.arange(-n_positions, 0, dtype=np.int16), n_batch * n_layers)
    token_column = np.tile(np.asarray(tokens, dtype=object), n_batch * n_layers)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.RecordBatch.from_arrays(
        [
            pa.array([model_key] * len(ids), pa.string()),
            pa.array(ids, pa.string()),
            pa.array(layer_column, pa.int16()),
            pa.array(position_column, pa.int16()),
            pa.array(token_column, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, d_model),
        ],
        schema=activations_schema(d_model),
    )


def capture_table(loaded: LoadedModel, selected: pa.Table, directory: Path, lineage: Mapping[str, str],
                  settings: Mapping[str, object], groups: list[list[int]] | None = None,
                  checkpoints: Checkpoints = Checkpoints()) -> tuple[Spool, dict]:
    """Capture the `selected` prompts' residual stream at the study's layers into an ACTIVATIONS table spooled in `directory`.

    `groups` (row indices) are captured one after another, each with the prefix its prompts share run once.
    The spool's lineage is `lineage` plus the settings: the caller's, the layers, the batch size and the positions.
    Each batch is kept in `checkpoints` as it is captured, so a killed capture resumes after its last finished
    batch, with the same batches; they are deleted once the spool is complete.
    Returns the spool and its metadata (counts, positions, tokens per second, device).
    """
    layers = check_layers(loaded.study.settings.layers if loaded.study.settings.layers is not None
                          else range(loaded.n_layers), loaded.n_layers)
    template = loaded.study.chat_template
    suffix = post_instruction_tokens(loaded.tokenizer, template)
    tokens = position_tokens(loaded.tokenizer, suffix)
    texts = [format_prompt(loaded.tokenizer, text, template) for text in selected["text"].to_pylist()]
    ids = selected["prompt_id"].to_pylist()
    counter = {"tokens": 0}
    batch_size = loaded.study.settings.batch_size
    groups = groups or [list(range(len(texts)))]
    # Every batch of every group, in capture order: (group, its number in the group, its rows). A batch's numbers
    # depend on the whole group (the prefix its prompts share), so the group's texts are part of its identity.
    units = [(g, number, [group[i] for i in indices]) for g, group in enumerate(groups)
             for number, indices in enumerate(length_batches(loaded.tokenizer, [texts[i] for i in group], batch_size))]

    def compute(todo: list[int]):
        for g, group in enumerate(groups):
            wanted = {units[u][1] for u in todo if units[u][0] == g}
            if not wanted:
                continue
            for batch in capture(loaded.model, loaded.tokenizer, [texts[i] for i in group], layers, suffix, batch_size,
                                 only=wanted):
                counter["tokens"] += batch.n_tokens
                yield pa.Table.from_batches([activation_rows(batch, loaded.study.key, [ids[i] for i in group], layers,
                                                             tokens)])

    started = time.perf_counter()
    lineage = {**lineage, "settings": to_json({"layers": layers, **settings, "batch_size": batch_size, "positions": tokens})}
    group_keys = [digest([texts[i] for i in group]) for group in groups]
    identities = [{"group": group_keys[g], "prompts": [ids[i] for i in rows], "texts": digest([texts[i] for i in rows])}
                  for g, _, rows in units]
    scoped = checkpoints.within(layers=layers, positions=tokens, model_key=loaded.study.key)
    staged = spool(scoped.resume("capture activations", identities, compute), activations_schema(loaded.d_model),
                   directory, lineage)
    checkpoints.clear()
    seconds = time.perf_counter() - started
    return staged, {"n_prompts": len(ids), "n_layers": len(layers), "positions": tokens,
                    "tokens_per_second": round(counter["tokens"] / seconds, 1), "device": str(loaded.device)}
