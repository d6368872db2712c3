"""Named hook points on a model's forward pass, registered by one context manager that always removes them.

Points are named `KIND.LAYER`:

- `resid_pre.L`: the residual stream entering block L, [batch, seq, d_model];
- `resid_post.L`: the residual stream leaving block L (the block's output), [batch, seq, d_model];
- `attn_out.L`, `mlp_out.L`: what block L's attention and MLP add to the residual stream (after the
  post-norms on Gemma), [batch, seq, d_model];
- `head_out.L`: block L's per-head attention outputs before the output projection, [batch, seq, n_heads, d_head].

A hook function takes the activation and the position ids of the pass (where the hooked module is
given them, as the blocks of `resid_*` points are; None elsewhere) and returns a replacement of the
same shape, or None to leave it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from refusal_core.layouts import Layout, layout_of, module_at

HookFn = Callable[[Tensor, Tensor | None], Tensor | None]
POINT_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed block has run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, as its family's layout (or discovery) finds them."""
    return module_at(model, layout_of(model).blocks)


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Sorted unique layer indices, or a ValueError naming the bad one and the valid range."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"Layer {layer} is out of range: this model has layers 0 to {n_layers - 1}.")
    return sorted(set(layers))


def head_count(model: nn.Module) -> int:
    """Number of attention (query) heads per block."""
    n_heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if n_heads is None:
        raise ValueError(f"The config of {type(model).__name__} has no num_attention_heads, so its heads cannot be told "
                         "apart; hook head_out points only on a model whose config names its heads.")
    return int(n_heads)


def head_width(model: nn.Module) -> int:
    """Width of one head's output: the attention output projection's input width over the number of heads."""
    projection = module_at(decoder_layers(model)[0], layout_of(model).heads_in)
    return int(projection.in_features) // head_count(model)


def check_heads(model: nn.Module, heads: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted unique (layer, head) pairs, or a ValueError naming the bad one and the valid range."""
    heads = sorted(set((int(layer), int(head)) for layer, head in heads))
    check_layers([layer for layer, _ in heads], len(decoder_layers(model)))
    n_heads = head_count(model)
    for layer, head in heads:
        if not 0 <= head < n_heads:
            raise ValueError(f"Head {head} of layer {layer} is out of range: this model has heads 0 to {n_heads - 1}.")
    return heads


def untuple(output: Tensor | tuple) -> Tensor:
    """The hidden states of a module's output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def hook_module(model: nn.Module, point: str, layout: Layout | None = None) -> tuple[nn.Module, bool]:
    """(module, whether the hook reads the module's input) for a named point, or a ValueError saying what is valid."""
    kind, _, layer_text = point.partition(".")
    if kind not in POINT_KINDS or not layer_text.lstrip("-").isdigit():
        raise ValueError(f"Unknown hook point {point!r}; use KIND.LAYER with KIND one of {', '.join(POINT_KINDS)}.")
    layout = layout or layout_of(model)
    blocks = module_at(model, layout.blocks)
    (layer,) = check_layers([int(layer_text)], len(blocks))
    block = blocks[layer]
    if kind in ("resid_pre", "resid_post"):
        return block, kind == "resid_pre"
    path = {"attn_out": layout.attn_out, "mlp_out": layout.mlp_out, "head_out": layout.heads_in}[kind]
    return module_at(block, path), kind == "head_out"


@contextmanager
def hooks(model: nn.Module, points: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Run `(point, fn)` hooks on every forward pass inside the block, in the order given.

    Every point is resolved before any hook is registered, so a bad point registers nothing; the
    hooks are removed on exit, also after an error.
    """
    layout = layout_of(model)
    resolved = [(point, *hook_module(model, point, layout), fn) for point, fn in points]
    handles = []
    try:
        for point, module, reads_input, fn in resolved:
            heads = head_count(model) if point.startswith("head_out.") else None
            handles.append(_register(module, reads_input, fn, heads))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _register(module: nn.Module, reads_input: bool, fn: HookFn, n_heads: int | None):
    def split(hidden: Tensor) -> Tensor:
        return hidden if n_heads is None else hidden.unflatten(-1, (n_heads, -1))

    def merge(new: Tensor) -> Tensor:
        return new if n_heads is None else new.flatten(-2)

    if reads_input:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = fn(split(hidden), kwargs.get("position_ids"))
            if new is None:
                return None
            if args:
                return (merge(new), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": merge(new)}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple):
        new = fn(untuple(output), kwargs.get("position_ids"))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(forward_hook, with_kwargs=True)


@contextmanager
def record(model: nn.Module, points: Sequence[str], stop_after_last: bool = False,
           keys: Sequence | None = None) -> Iterator[dict]:
    """Record the activation at each named point; yields a dict that fills with `key -> Tensor` as the model runs.

    The keys are the point names unless `keys` (one per point) are given. With `stop_after_last`, the
    forward pass raises `StopForward` once the last point has been recorded, so later blocks and the
    LM head are skipped; the caller catches it.
    """
    keys = list(points) if keys is None else list(keys)
    recorded: dict = {}

    def make(index: int) -> HookFn:
        def keep(activation: Tensor, positions: Tensor | None) -> None:
            recorded[keys[index]] = activation.detach()
            if stop_after_last and index == len(points) - 1:
                raise StopForward

        return keep

    with hooks(model, [(point, make(index)) for index, point in enumerate(points)]):
        yield recorded


def record_residual(model: nn.Module, layers: Sequence[int], stop_after_last: bool = False):
    """`record` of the residual stream after each block in `layers` (sorted), keyed by layer: [batch, seq, d_model]."""
    layers = check_layers(layers, len(decoder_layers(model)))
    return record(model, [f"resid_post.{layer}" for layer in layers], stop_after_last, keys=layers)
