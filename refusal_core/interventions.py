"""Interventions on the residual stream as small serialisable values, applied by one context manager."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from refusal_core.hooks import check_layers, decoder_layers, hooked, untuple


@dataclass(frozen=True)
class Ablate:
    """Directional ablation: project `direction` out of every block's input and every attention and MLP output."""

    direction: Tensor
    """Shape [d_model]; normalised when applied."""
    kind: str = "ablate"

    def parameters(self) -> dict:
        return {"direction_sha256": _tensor_sha(self.direction)}


@dataclass(frozen=True)
class Add:
    """Activation addition: add `coefficient * direction` to the input of block `layer`, at every position."""

    direction: Tensor
    """Shape [d_model]; added as given (not normalised), as in Arditi et al."""
    layer: int
    coefficient: float = 1.0
    kind: str = "add"

    def parameters(self) -> dict:
        return {"direction_sha256": _tensor_sha(self.direction), "layer": self.layer, "coefficient": self.coefficient}


@dataclass(frozen=True)
class Compose:
    """Several interventions at once, applied in order."""

    parts: tuple
    kind: str = "compose"

    def parameters(self) -> dict:
        return {"parts": [{"kind": p.kind, **p.parameters()} for p in self.parts]}


Intervention = Ablate | Add | Compose


def describe(intervention: Intervention | None) -> tuple[str, str, str]:
    """(id, kind, parameters as canonical JSON) of an intervention; ("none", "none", "{}") for None."""
    if intervention is None:
        return "none", "none", "{}"
    parameters = json.dumps(intervention.parameters(), sort_keys=True, separators=(",", ":"))
    identity = hashlib.sha256(f"{intervention.kind}:{parameters}".encode()).hexdigest()[:12]
    return f"{intervention.kind}-{identity}", intervention.kind, parameters


@contextmanager
def intervene(model: nn.Module, intervention: Intervention | None) -> Iterator[None]:
    """Apply `intervention` to every forward pass inside the block (prompt and generated tokens alike).

    The model's weights are not touched; the hooks are removed on exit, also after an error.
    """
    if intervention is None:
        yield
        return
    blocks = decoder_layers(model)
    d_model = int(model.config.hidden_size)
    parameter = next(model.parameters())
    with ExitStack() as stack:
        for part in _flatten(intervention):
            if part.direction.shape != (d_model,):
                raise ValueError(
                    f"The {part.kind} direction has shape {tuple(part.direction.shape)} but this model's residual "
                    f"stream has width {d_model}; use a direction computed on this model."
                )
            direction = part.direction.to(device=parameter.device, dtype=parameter.dtype)
            if isinstance(part, Ablate):
                unit = direction / direction.norm()
                for block in blocks:
                    stack.enter_context(hooked(block, _ablate_input(unit), "forward_pre"))
                    for module in (block.self_attn, block.mlp):
                        stack.enter_context(hooked(module, _ablate_output(unit)))
            else:
                check_layers([part.layer], len(blocks))
                stack.enter_context(hooked(blocks[part.layer], _add_input(part.coefficient * direction), "forward_pre"))
        yield


def project_out(hidden: Tensor, unit: Tensor) -> Tensor:
    """hidden minus its component along the unit vector `unit`; hidden is [..., d_model]."""
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


def _ablate_input(unit: Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict | None = None):
        return (project_out(args[0], unit), *args[1:])

    return hook


def _ablate_output(unit: Tensor):
    def hook(module: nn.Module, args: tuple, output: Tensor | tuple):
        if isinstance(output, tuple):
            return (project_out(output[0], unit), *output[1:])
        return project_out(output, unit)

    return hook


def _add_input(vector: Tensor):
    def hook(module: nn.Module, args: tuple):
        return (args[0] + vector, *args[1:])

    return hook


def _flatten(intervention: Intervention) -> Sequence[Ablate | Add]:
    if isinstance(intervention, Compose):
        return [leaf for part in intervention.parts for leaf in _flatten(part)]
    return [intervention]


def _tensor_sha(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float64).cpu().numpy().tobytes()).hexdigest()[:16]
