"""Interventions on the residual stream as small serialisable values, applied by one context manager."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from refusal_core.hooks import check_layers, decoder_layers, hooked, untuple
from refusal_core.saes import splice


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


@dataclass(frozen=True, eq=False)
class Clamp:
    """Edit SAE latents at the output of block `layer`, keeping the SAE's reconstruction error.

    With `factor`, the chosen latents are multiplied by it (a negative factor -m clamps them against
    their usual sign); with `values`, they are set to those constants (one per latent) to induce what
    they encode. Every position from `skip_first` on is edited, prompt and generated tokens alike.
    """

    sae: Any
    """The sae-lens SAE of `layer`."""
    sae_sha256: str
    layer: int
    latents: tuple[int, ...]
    factor: float | None = None
    values: tuple[float, ...] | None = None
    skip_first: int = 0
    feature_set: str = ""
    """Name of the feature set the latents come from, recorded with the parameters."""
    kind: str = "clamp"

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.values is None):
            raise ValueError("A clamp needs exactly one of factor (multiply the latents) or values (set them).")
        if self.values is not None and len(self.values) != len(self.latents):
            raise ValueError(f"{len(self.values)} values were given for {len(self.latents)} latents; give one per latent.")
        if not self.latents:
            raise ValueError("A clamp needs at least one latent.")
        if max(self.latents) >= self.sae.cfg.d_sae or min(self.latents) < 0:
            raise ValueError(f"Latent indices must lie in 0..{self.sae.cfg.d_sae - 1} for this SAE.")

    def parameters(self) -> dict:
        return {"sae_sha256": self.sae_sha256[:16], "layer": self.layer, "latents": list(self.latents),
                "factor": self.factor, "values": None if self.values is None else [round(v, 6) for v in self.values],
                "skip_first": self.skip_first, "feature_set": self.feature_set}

    def edit(self, latents: Tensor) -> Tensor:
        """The latents [..., d_sae] with the chosen ones multiplied or set."""
        index = torch.tensor(self.latents, device=latents.device)
        if self.factor is not None:
            chosen = latents[..., index] * self.factor
        else:
            chosen = torch.tensor(self.values, device=latents.device, dtype=latents.dtype).expand_as(latents[..., index])
        return latents.index_copy(-1, index, chosen)


@dataclass(frozen=True)
class Compose:
    """Several interventions at once, applied in order."""

    parts: tuple
    kind: str = "compose"

    def parameters(self) -> dict:
        return {"parts": [{"kind": p.kind, **p.parameters()} for p in self.parts]}


Intervention = Ablate | Add | Clamp | Compose


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
            if isinstance(part, Clamp):
                stack.enter_context(splice(model, part.sae, part.layer, use_error_term=True,
                                           skip_first=part.skip_first, edit=part.edit))
                continue
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


def _flatten(intervention: Intervention) -> Sequence[Ablate | Add | Clamp]:
    if isinstance(intervention, Compose):
        return [leaf for part in intervention.parts for leaf in _flatten(part)]
    return [intervention]


def _tensor_sha(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float64).cpu().numpy().tobytes()).hexdigest()[:16]
