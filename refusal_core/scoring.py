"""One-forward-pass scores at the first answer position: refusal score, KL and cross-entropy against a baseline."""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor
from tqdm.auto import tqdm
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import last_index, length_batches, prefix_cache, tokenize_batch
from refusal_core.hooks import decoder_layers, hooks
from refusal_core.interventions import Intervention, intervene
from refusal_core.layouts import layout_of


def refusal_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The first token of each of the model family's refusal words, as the model would start its answer with it."""
    ids = {tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in layout_of(model).refusal_words}
    return sorted(ids)


def answer_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    intervention: Intervention | None = None,
    batch_size: int = 16,
    progress: bool = False,
    bottom: SharedBottom | None = None,
) -> Tensor:
    """Log-probabilities of the first answer token for each chat-formatted prompt: [n_prompts, vocab], float32.

    The tokens all prompts share (the system prompt) are run once; only the last position's logits are
    computed, which skips most of the LM head. With `bottom`, passes over the same batches under other
    interventions reuse the blocks that the intervention leaves alone (`SharedBottom`).
    """
    if not prompts:
        raise ValueError("No prompts to score; the prompt selection is empty.")
    device = next(model.parameters()).device
    with intervene(model, intervention):
        prefix = prefix_cache(model, tokenizer, prompts)  # the shared system prompt, run once
    rows: dict[int, Tensor] = {}
    for batch in tqdm(length_batches(tokenizer, prompts, batch_size), desc="score", disable=not progress):
        inputs = tokenize_batch(tokenizer, [prompts[i] for i in batch], device, prefix)  # shortest first: little padding
        texts = tuple(prompts[i] for i in batch)
        logits = (bottom or SharedBottom(model)).last_logits(texts, inputs, intervention)  # [batch, vocab]
        rows.update(zip(batch, torch.log_softmax(logits, dim=-1).cpu()))
    return torch.stack([rows[i] for i in range(len(prompts))])


def last_logits(model: PreTrainedModel, inputs: dict) -> Tensor:
    """Float32 logits [batch, vocab] at each prompt's last real token, computing the LM head there only.

    A prefix cache in `inputs` is copied first, so the same inputs can be run again.
    """
    if "past_key_values" in inputs:
        inputs = {**inputs, "past_key_values": copy.deepcopy(inputs["past_key_values"])}
    last = last_index(inputs)  # [batch]
    kept, where = torch.unique(last, return_inverse=True)  # the positions whose logits are needed
    logits = model(**{"use_cache": False, **inputs}, logits_to_keep=kept).logits  # [batch, len(kept), vocab]
    return logits[torch.arange(len(last), device=logits.device), where].float()


class SharedBottom:
    """Scores the same batches under several interventions, running the blocks below an intervention's first hooked
    block once, on the baseline pass.

    Those blocks compute the same with and without the intervention, so the baseline pass of a batch records the
    residual stream entering each block in `starts`, and a later pass of the same batch under an intervention that
    first hooks block L feeds the recording to block L instead of running blocks 0..L-1: the same arithmetic on the
    same tensors, so the same logits, bit for bit. A batch whose baseline pass did not run here (read back from a
    checkpoint) runs whole.
    """

    def __init__(self, model: PreTrainedModel, interventions: Iterable[Intervention | None] = ()):
        self.model = model
        n_blocks = len(decoder_layers(model))
        self.starts = sorted({first_block(model, i) for i in interventions if i is not None} - {0, n_blocks})
        self.recorded: dict[tuple[Hashable, int], Tensor] = {}

    def last_logits(self, key: Hashable, inputs: dict, intervention: Intervention | None) -> Tensor:
        """`last_logits` of one batch under `intervention`; `key` names the batch's prompts (the same key, the same
        prompts), and the prefix length and the shape of the given tokens complete it."""
        cache = inputs.get("past_key_values")
        key = (key, 0 if cache is None else cache.get_seq_length(), tuple(inputs["input_ids"].shape))
        if intervention is None:
            def keep(start: int):
                def hook(hidden: Tensor, _positions: Tensor | None) -> None:
                    self.recorded[(key, start)] = hidden
                return hook

            with torch.inference_mode(), hooks(self.model, [(f"resid_pre.{start}", keep(start)) for start in self.starts]):
                return last_logits(self.model, inputs)
        start = first_block(self.model, intervention)
        hidden = self.recorded.get((key, start))
        with torch.inference_mode(), intervene(self.model, intervention), \
                replayed(self.model, start, hidden) if hidden is not None else nullcontext():  # hooks first: on real blocks
            return last_logits(self.model, inputs)


def first_block(model: nn.Module, intervention: Intervention) -> int:
    """The lowest block any of the intervention's hooks acts in (every hook point names its block)."""
    return min((int(point.rpartition(".")[2]) for point, _ in intervention.hooks(model)), default=len(decoder_layers(model)))


class _Replay(nn.Module):
    """Stands in for a skipped block: passes its input on, or, for the last skipped block, returns the recording."""

    def __init__(self, output: Tensor | None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.output is None:
            return hidden_states
        if self.output.shape != hidden_states.shape:
            raise ValueError(f"A replayed residual stream of shape {tuple(self.output.shape)} was given for a pass of "
                             f"shape {tuple(hidden_states.shape)}; record it on the same batch.")
        return self.output


@contextmanager
def replayed(model: nn.Module, start: int, hidden: Tensor) -> Iterator[None]:
    """Blocks 0..start-1 skipped, block `start` given `hidden` (recorded entering it on the same inputs); restored on exit."""
    blocks = decoder_layers(model)
    kept = [blocks[i] for i in range(start)]
    try:
        for i in range(start):
            blocks[i] = _Replay(hidden if i == start - 1 else None)
        yield
    finally:
        for i, block in enumerate(kept):
            blocks[i] = block


def refusal_score(log_probs: Tensor, refusal_ids: Sequence[int]) -> Tensor:
    """log P(refusal token) - log P(any other token), per prompt (Arditi et al., 2024): [n]."""
    refusal = torch.logsumexp(log_probs[:, list(refusal_ids)], dim=-1)  # [n]
    other = torch.log1p(-refusal.exp().clamp(max=1 - 1e-6))
    return refusal - other


def kl_divergence(baseline: Tensor, changed: Tensor) -> Tensor:
    """KL(baseline || changed) of next-token distributions given as log-probabilities: [n]."""
    return (baseline.exp() * (baseline - changed)).sum(dim=-1)


def completion_cross_entropy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    intervention: Intervention | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Mean cross-entropy (nats per token) of each completion given its chat-formatted prompt: [n].

    Scoring the clean model's own completions with and without an intervention measures how much
    the intervention damages ordinary answers (Arditi et al.'s CE loss on harmless text).
    """
    device = next(model.parameters()).device
    losses: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        texts = [p + c for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        n_prompt = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[start:start + batch_size]]
        inputs = tokenize_batch(tokenizer, texts, device)
        # Left padding: each row's completion is its last (length - n_prompt) tokens, so the LM head runs only on
        # the last positions, those that predict a completion token.
        n_completion = [int(length) - n for length, n in zip(inputs["attention_mask"].sum(dim=1), n_prompt)]
        keep = max(max(n_completion), 0) + 1
        with torch.inference_mode(), intervene(model, intervention):
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [b, keep, vocab]
        targets = inputs["input_ids"][:, inputs["input_ids"].shape[1] - keep + 1:]  # [b, keep - 1]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # [b, keep - 1]
        for row, n in enumerate(n_completion):
            losses.append(token_loss[row, keep - 1 - n:].mean().cpu() if n > 0 else torch.tensor(float("nan")))
    return torch.stack(losses)
