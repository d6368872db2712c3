"""The refusal direction read along the sequence: the instruction's last token, the template tokens and the first answer tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import INSTRUCTION_TOKEN, left_padded
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.evaluation import batched_generations
from refusal_core.hooks import StopForward, check_layers, decoder_layers, record_residual
from refusal_core.prompts import prompts_of
from refusal_core.tables import SEQUENCE_PROJECTIONS

LABELS = ("harmful", "harmless", "jailbreak")
JAILBREAK_METHODS = ("past_tense", "future_tense")
"""The jailbreaks read along the sequence: tense reformulations, as short as the prompts they rewrite."""


@dataclass(frozen=True)
class SequenceProjection:
    """Projections of one prompt's residual stream on a unit direction, position by position."""

    index: int
    """Position of the prompt in the list given to `sequence_projections`."""
    positions: list[int]
    """Offset of each position from the answer's first token: -1 is the last template token, 0 the first answer token."""
    tokens: list[str]
    """The token at each position ([instruction] for the instruction's last token)."""
    projections: Tensor
    """[n_layers, n_positions] float64: residual stream after each layer dotted with the unit direction."""


def sequence_projections(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                         answers: Sequence[str], n_template: int, layers: Sequence[int], direction: Tensor,
                         batch_size: int = 16) -> Iterator[SequenceProjection]:
    """Project the residual stream of each chat-formatted prompt followed by its answer onto `direction`.

    The kept positions are the instruction's last token, the `n_template` post-instruction template
    tokens and every token of the answer (its text tokenized on its own and appended: for a real model the
    tokens it generated, for a random one sometimes more).
    One backbone pass per batch, left-padded, stopping after the last requested layer.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt.")
    layers = check_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    unit = (direction / direction.norm()).to(device=device, dtype=torch.float64)
    backbone = model.get_decoder()
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(prompts), batch_size):
        rows, n_answer = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
            rows.append(tokenizer(prompt, add_special_tokens=False)["input_ids"] + answer_ids)
            n_answer.append(len(answer_ids))
        inputs = {name: tensor.to(device) for name, tensor in left_padded(rows, pad).items()}
        with torch.inference_mode(), record_residual(model, layers, stop_after_last=True) as recorded:
            try:
                backbone(**inputs, use_cache=False)
            except StopForward:
                pass
        for i, n in enumerate(n_answer):
            count = 1 + n_template + n
            hidden = torch.stack([recorded[layer][i, -count:] for layer in layers])  # [n_layers, count, d_model]
            tokens = tokenizer.convert_ids_to_tokens(rows[i][-count:])
            yield SequenceProjection(start + i, list(range(-1 - n_template, n)), [INSTRUCTION_TOKEN, *tokens[1:]],
                                     (hidden.double() @ unit).cpu())


def sequence_prompts(prompts: pa.Table, per_label: int) -> pa.Table:
    """Up to `per_label` test prompts of each label: HarmBench harmful, harmless, and tense jailbreaks (not DAN's ~700 tokens)."""
    return pa.concat_tables([
        prompts_of(prompts, "harmful", "test", per_label, "harmbench"),
        prompts_of(prompts, "harmless", "test", per_label, "refusal_sae"),
        prompts_of(prompts.filter(pc.is_in(prompts["jailbreak_method"], pa.array(JAILBREAK_METHODS))), "jailbreak", "test",
                   per_label),
    ])


@dataclass(frozen=True)
class RefusalAlongSequence:
    """The refusal direction read at every layer and position of each chosen prompt: the SEQUENCE_PROJECTIONS table."""

    chosen: pa.Table
    """The prompts read (`sequence_prompts`)."""
    columns: dict[str, list]

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=SEQUENCE_PROJECTIONS)


def read_along_sequence(model_key: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: pa.Table,
                        chat_template: str, direction: Tensor, per_label: int, new_tokens: int,
                        batch_size: int = 16, checkpoints: Checkpoints = Checkpoints()) -> RefusalAlongSequence:
    """Answer `sequence_prompts` greedily (`new_tokens` tokens); project every layer on `direction` along each sequence.

    Each finished batch of answers and of projections is kept in `checkpoints` (deleted once all are done),
    so a killed run resumes after it.
    """
    chosen = sequence_prompts(prompts, per_label)
    texts = [format_prompt(tokenizer, t, chat_template) for t in chosen["text"].to_pylist()]
    answers, _ = batched_generations(model, tokenizer, texts, new_tokens, batch_size, None, checkpoints,
                                     "generate (sequence)")
    n_template = len(post_instruction_tokens(tokenizer, chat_template))
    layers = list(range(len(decoder_layers(model))))
    ids, labels = chosen["prompt_id"].to_pylist(), chosen["label"].to_pylist()
    starts = list(range(0, len(texts), batch_size))

    def compute(todo: list[int]):
        for b in todo:
            part = slice(starts[b], starts[b] + batch_size)
            columns = {name: [] for name in SEQUENCE_PROJECTIONS.names}
            for item in sequence_projections(model, tokenizer, texts[part], answers[part], n_template, layers, direction,
                                             batch_size):
                index = starts[b] + item.index
                for layer, values in zip(layers, item.projections.tolist()):
                    columns["model_key"] += [model_key] * len(values)
                    columns["prompt_id"] += [ids[index]] * len(values)
                    columns["label"] += [labels[index]] * len(values)
                    columns["layer_index"] += [layer] * len(values)
                    columns["position"] += item.positions
                    columns["token"] += item.tokens
                    columns["projection"] += values
            yield pa.Table.from_pydict(columns, schema=SEQUENCE_PROJECTIONS)

    direction_key = digest(direction.double().flatten().tolist())
    units = [{"prompts": digest(texts[start:start + batch_size]), "answers": digest(answers[start:start + batch_size]),
              "direction": direction_key, "model_key": model_key} for start in starts]
    parts = list(checkpoints.resume("refusal along the sequence", units, compute))
    checkpoints.clear()
    table = pa.concat_tables(parts)
    return RefusalAlongSequence(chosen, {name: table[name].to_pylist() for name in SEQUENCE_PROJECTIONS.names})
