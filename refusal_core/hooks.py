"""Forward hooks on decoder blocks, as context managers that always remove themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

# Where each model family keeps its decoder blocks; discovery below is the fallback.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed block has run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, found at a known path or as the ModuleList of num_hidden_layers blocks."""
    for path in LAYER_PATHS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"Cannot find the decoder blocks of {type(model).__name__}: none of {', '.join(LAYER_PATHS)} is a "
        "ModuleList and no ModuleList has num_hidden_layers entries; add its path to hooks.LAYER_PATHS."
    )


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Sorted unique layer indices, or a ValueError naming the bad one and the valid range."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"Layer {layer} is out of range: this model has layers 0 to {n_layers - 1}.")
    return sorted(set(layers))


def untuple(output: Tensor | tuple) -> Tensor:
    """The hidden states of a block's output, whether the block returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(module: nn.Module, hook: Callable, kind: str = "forward") -> Iterator[None]:
    """Register `hook` on `module` for the duration of the block (kind: forward or forward_pre)."""
    handle = None
    try:
        register = module.register_forward_hook if kind == "forward" else module.register_forward_pre_hook
        handle = register(hook)
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def record_residual(
    model: nn.Module, layers: Sequence[int], stop_after_last: bool = False
) -> Iterator[dict[int, Tensor]]:
    """Record the output of each block in `layers` (the residual stream after the block).

    Yields a dict that fills with `layer -> Tensor[batch, seq, d_model]` as the model runs. With
    `stop_after_last`, the forward pass raises `StopForward` once the last recorded block has run,
    so later blocks and the LM head are skipped; the caller catches it.
    """
    blocks = decoder_layers(model)
    layers = check_layers(layers, len(blocks))
    recorded: dict[int, Tensor] = {}
    last = layers[-1] if layers else None

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            recorded[index] = untuple(output).detach()
            if stop_after_last and index == last:
                raise StopForward

        return hook

    with ExitStack() as stack:
        for index in layers:
            stack.enter_context(hooked(blocks[index], make_hook(index)))
        yield recorded
