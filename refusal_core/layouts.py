"""Where each model family keeps what the study hooks: one Layout per `model_type`, as data.

A layout names, relative to the model, its decoder blocks and, relative to a block, the modules whose
outputs are added to the residual stream (after Gemma's post-norms) and the attention output
projection, whose input is the heads' outputs side by side. It also names the tokens that end the
assistant's turn and the words whose first tokens the refusal score reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

REFUSAL_WORDS = ("I", "As", "Sorry", "Unfortunately")
"""First words of refusals ("I cannot", "As an AI", ...); their first tokens are the refusal tokens."""


@dataclass(frozen=True)
class Layout:
    """Module paths of one model family (dotted attribute paths)."""

    blocks: str
    """The ModuleList of decoder blocks, from the model."""
    attn_out: str = "self_attn"
    """From a block: the module whose output is the attention's write into the residual stream."""
    mlp_out: str = "mlp"
    """From a block: the module whose output is the MLP's write into the residual stream."""
    heads_in: str = "self_attn.o_proj"
    """From a block: the attention output projection; its input is [batch, seq, n_heads * d_head]."""
    end_of_turn: tuple[str, ...] = ()
    """Tokens that end the assistant's turn, besides the generation config's and tokenizer's EOS."""
    refusal_words: tuple[str, ...] = REFUSAL_WORDS


_QWEN = Layout("model.layers", end_of_turn=("<|im_end|>", "<|endoftext|>"))
# Gemma-2/3 normalise each sublayer's output before adding it: the write is the post-norm's output.
_GEMMA = Layout("model.layers", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                end_of_turn=("<end_of_turn>", "<eos>"))

LAYOUTS: dict[str, Layout] = {
    "qwen2": _QWEN,
    "qwen3": _QWEN,
    "llama": Layout("model.layers", end_of_turn=("<|eot_id|>", "<|end_of_text|>")),
    "mistral": Layout("model.layers", end_of_turn=("</s>",)),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    # Phi-3 adds each sublayer's output through a dropout (the identity in eval mode): the write is its output.
    "phi3": Layout("model.layers", attn_out="resid_attn_dropout", mlp_out="resid_mlp_dropout",
                   end_of_turn=("<|end|>", "<|endoftext|>")),
}
"""Layouts by `config.model_type`. To add a family, add its entry here (and a tiny model in tests/tiny.py)."""


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted attribute path, or None where a part is missing."""
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def layout_of(model: nn.Module) -> Layout:
    """The model's layout: its family's entry, else one discovered from the ModuleList of num_hidden_layers blocks.

    Raises a ValueError naming the supported families when neither finds blocks with attention and MLP modules.
    """
    config = getattr(model, "config", None)
    layout = LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        layout = _discovered(model)
    blocks = module_at(model, layout.blocks)
    if isinstance(blocks, nn.ModuleList) and all(
            module_at(blocks[0], path) is not None for path in (layout.attn_out, layout.mlp_out, layout.heads_in)):
        return layout
    raise ValueError(
        f"Cannot find the decoder blocks, attention and MLP of {type(model).__name__} "
        f"(model_type {getattr(config, 'model_type', None)!r}); supported families are {', '.join(sorted(LAYOUTS))}: "
        "add a Layout for it to refusal_core.layouts.LAYOUTS."
    )


def _discovered(model: nn.Module) -> Layout:
    """A layout for an unlisted family: the ModuleList of num_hidden_layers blocks, Llama-style names inside."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            block = module[0]
            if module_at(block, "post_feedforward_layernorm") is not None:
                return Layout(name, attn_out=_GEMMA.attn_out, mlp_out=_GEMMA.mlp_out)
            return Layout(name)
    return Layout("")
