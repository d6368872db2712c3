"""Interventions on a forward pass as small serialisable values, applied by one context manager.

Every kind has a `kind`, a readable `name` (e.g. `clamp cossim_ap ×-1`), its `parameters()` as JSON
and builds its own hooks on the named hook points (`hooks.py`) with `hooks(model)`; building them
checks the intervention against the model (widths, layers, heads), so a mismatch registers nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from refusal_core.hooks import HookFn, check_heads, check_layers, decoder_layers, head_count, head_width, hooks


class Intervention(Protocol):
    """What every intervention kind provides."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    def parameters(self) -> dict: ...

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]: ...


@dataclass(frozen=True)
class Ablate:
    """Directional ablation: project `direction` out of every block's input and every attention and MLP write."""

    direction: Tensor
    """Shape [d_model]; normalised when applied."""
    kind = "ablate"
    name = "ablate direction"

    def parameters(self) -> dict:
        return {"direction_sha256": _tensor_sha(self.direction)}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        direction = _residual_vector(model, self.direction, self.kind).float()
        unit = direction / direction.norm()  # float32 even for a bf16 model, so the projection is not rounded twice

        def ablate(hidden: Tensor, positions: Tensor | None) -> Tensor:
            return project_out(hidden, unit)

        return [(f"{point}.{layer}", ablate) for layer in range(len(decoder_layers(model)))
                for point in ("resid_pre", "attn_out", "mlp_out")]


@dataclass(frozen=True)
class Add:
    """Activation addition: add `coefficient * direction` to the input of block `layer`, at every position."""

    direction: Tensor
    """Shape [d_model]; added as given (not normalised), as in Arditi et al."""
    layer: int
    coefficient: float = 1.0
    kind = "add"

    @property
    def name(self) -> str:
        return f"add direction ×{self.coefficient:g} at layer {self.layer}"

    def parameters(self) -> dict:
        return {"direction_sha256": _tensor_sha(self.direction), "layer": self.layer, "coefficient": self.coefficient}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        vector = self.coefficient * _residual_vector(model, self.direction, self.kind)
        check_layers([self.layer], len(decoder_layers(model)))
        return [(f"resid_pre.{self.layer}", lambda hidden, positions: hidden + vector)]


@dataclass(frozen=True, eq=False)
class SaeLatents:
    """Chosen latents of the SAE that reads the residual stream after block `layer`."""

    layer: int
    sae: Any
    """The sae-lens SAE of `layer`."""
    sae_sha256: str
    latents: tuple[int, ...]
    values: tuple[float, ...] | None = None
    """The constants an induce sets the latents to, one per latent; None for a multiplying clamp."""

    def __post_init__(self) -> None:
        if not self.latents:
            raise ValueError(f"A clamp needs at least one latent; none were given for layer {self.layer}.")
        if max(self.latents) >= self.sae.cfg.d_sae or min(self.latents) < 0:
            raise ValueError(f"Latent indices must lie in 0..{self.sae.cfg.d_sae - 1} for the SAE of layer {self.layer}.")
        if self.values is not None and len(self.values) != len(self.latents):
            raise ValueError(f"{len(self.values)} values were given for {len(self.latents)} latents; give one per latent.")


@dataclass(frozen=True, eq=False)
class Clamp:
    """Edit SAE latents at the output of their blocks, keeping each SAE's reconstruction error.

    With `factor`, the chosen latents are multiplied by it (a negative factor -m clamps them against
    their usual sign; kind `clamp`); without it, each is set to its constant in `SaeLatents.values`
    to induce what they encode (kind `induce`). Every position from `skip_first` on is edited,
    prompt and generated tokens alike.
    """

    targets: tuple[SaeLatents, ...]
    factor: float | None = None
    skip_first: int = 0
    feature_set: str = ""
    """Name of the feature set the latents come from."""
    seed: int | None = None
    """Seed of the random draw the latents are (None for a ranking)."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("A clamp needs the latents of at least one SAE layer.")
        setting = [target.values is not None for target in self.targets]
        if self.factor is not None and any(setting) or self.factor is None and not all(setting):
            raise ValueError("A clamp needs exactly one of factor (multiply the latents) or values (set them).")

    @property
    def kind(self) -> str:
        return "clamp" if self.factor is not None else "induce"

    @property
    def name(self) -> str:
        latents = self.feature_set or f"{sum(len(t.latents) for t in self.targets)} latents"
        latents += "" if self.seed is None else f" (seed {self.seed})"
        return f"clamp {latents} ×{self.factor:g}" if self.factor is not None else f"induce {latents}"

    def parameters(self) -> dict:
        seed = {} if self.seed is None else {"seed": self.seed}  # a ranking's id stays as it was
        return {"feature_set": self.feature_set, **seed, "factor": self.factor, "skip_first": self.skip_first,
                "layers": [{"layer": t.layer, "sae_sha256": t.sae_sha256[:16], "latents": list(t.latents),
                            "values": None if t.values is None else [round(v, 6) for v in t.values]}
                           for t in self.targets]}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        from refusal_core.saes import spliced  # sae-lens is imported only where an SAE is involved

        return [spliced(model, target.sae, target.layer, use_error_term=True, skip_first=self.skip_first,
                        edit=self._editor(target)) for target in self.targets]

    def _editor(self, target: SaeLatents):
        def edit(latents: Tensor) -> Tensor:
            index = torch.tensor(target.latents, device=latents.device)
            if self.factor is not None:
                chosen = latents[..., index] * self.factor
            else:
                chosen = torch.tensor(target.values, device=latents.device, dtype=latents.dtype)
                chosen = chosen.expand_as(latents[..., index])
            return latents.index_copy(-1, index, chosen)

        return edit


@dataclass(frozen=True)
class HeadAblate:
    """Scale (by default zero) the outputs of attention heads, before the output projection mixes them."""

    heads: tuple[tuple[int, int], ...]
    """(layer, head) pairs."""
    scale: float = 0.0
    kind = "head_ablate"

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("HeadAblate needs at least one (layer, head) pair.")

    @property
    def name(self) -> str:
        verb = "ablate" if self.scale == 0 else f"scale ×{self.scale:g}"
        return f"{verb} heads {_heads_text(self.heads)}"

    def parameters(self) -> dict:
        return {"heads": [list(h) for h in sorted(set(self.heads))], "scale": self.scale}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        def scaled(heads: list[int]) -> HookFn:
            def hook(outputs: Tensor, positions: Tensor | None) -> Tensor:
                outputs = outputs.clone()
                outputs[..., heads, :] *= self.scale
                return outputs

            return hook

        return [(f"head_out.{layer}", scaled(heads)) for layer, heads in _by_layer(check_heads(model, self.heads))]


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Replace attention heads' outputs by those recorded on another prompt (interchange intervention).

    `source` maps each layer to its recorded `head_out` activation [batch or 1, seq, n_heads, d_head]
    (for instance from `hooks.record(model, ["head_out.L"])`), position for position: the patched
    prompts must run whole, in one pass of the recorded length, with the same padding. Only the chosen
    heads are replaced. Later one-token decoding steps run unpatched, on the cache the patched prompt
    left; any other pass (a shared-prefix cache, a different length) is refused, since its positions
    would not line up with the recording.
    """

    heads: tuple[tuple[int, int], ...]
    source: Mapping[int, Tensor]
    kind = "head_patch"

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("HeadPatch needs at least one (layer, head) pair.")

    @property
    def name(self) -> str:
        return f"patch heads {_heads_text(self.heads)}"

    def parameters(self) -> dict:
        layers = sorted({layer for layer, _ in self.heads})
        return {"heads": [list(h) for h in sorted(set(self.heads))],
                "source_sha256": {str(layer): _tensor_sha(self.source[layer]) for layer in layers if layer in self.source}}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        grouped = _by_layer(check_heads(model, self.heads))
        n_heads, d_head = head_count(model), head_width(model)
        for layer, _ in grouped:
            shape = tuple(self.source[layer].shape) if layer in self.source else None
            if shape is None or len(shape) != 4 or shape[2:] != (n_heads, d_head):
                raise ValueError(f"HeadPatch needs a recorded head_out.{layer} of shape [batch, seq, {n_heads}, {d_head}]; "
                                 f"got {shape}: record it with hooks.record(model, ['head_out.{layer}']).")

        def patched(layer: int, heads: list[int]) -> HookFn:
            def hook(outputs: Tensor, positions: Tensor | None) -> Tensor | None:
                source = self.source[layer].to(outputs)
                if outputs.shape[1] == 1 and source.shape[1] != 1:
                    return None  # a decoding step after the patched prompt
                if outputs.shape[1] != source.shape[1] or source.shape[0] not in (1, outputs.shape[0]):
                    raise ValueError(
                        f"HeadPatch recorded {source.shape[0]} sequence(s) of {source.shape[1]} tokens at layer {layer} but "
                        f"the model ran {outputs.shape[0]} of {outputs.shape[1]}; run the same prompts whole, in one pass "
                        "(no shared-prefix cache), as when recording.")
                outputs = outputs.clone()
                outputs[..., heads, :] = source[..., heads, :].expand_as(outputs[..., heads, :])
                return outputs

            return hook

        return [(f"head_out.{layer}", patched(layer, heads)) for layer, heads in grouped]


@dataclass(frozen=True)
class Compose:
    """Several interventions at once, applied in order."""

    parts: tuple
    kind = "compose"

    @property
    def name(self) -> str:
        return " + ".join(part.name for part in self.parts)

    def parameters(self) -> dict:
        return {"parts": [{"kind": p.kind, **p.parameters()} for p in self.parts]}

    def hooks(self, model: nn.Module) -> list[tuple[str, HookFn]]:
        return [hook for part in self.parts for hook in part.hooks(model)]


@dataclass(frozen=True)
class Description:
    """How a generation or effect row names its intervention."""

    id: str
    kind: str
    name: str
    parameters: str
    """Canonical JSON."""
    feature_set: str | None


def describe(intervention: Intervention | None) -> Description:
    """Id (kind + parameter hash), kind, readable name, canonical JSON parameters and feature set of an intervention."""
    if intervention is None:
        return Description("none", "none", "none", "{}", None)
    parameters = json.dumps(intervention.parameters(), sort_keys=True, separators=(",", ":"))
    identity = hashlib.sha256(f"{intervention.kind}:{parameters}".encode()).hexdigest()[:12]
    sets = [part.feature_set for part in _leaves(intervention) if getattr(part, "feature_set", "")]
    return Description(f"{intervention.kind}-{identity}", intervention.kind, intervention.name, parameters,
                       "+".join(sets) or None)


def _leaves(intervention: Intervention) -> list[Intervention]:
    return [leaf for part in intervention.parts for leaf in _leaves(part)] if isinstance(intervention, Compose) else [intervention]


@contextmanager
def intervene(model: nn.Module, intervention: Intervention | None) -> Iterator[None]:
    """Apply `intervention` to every forward pass inside the block (prompt and generated tokens alike).

    The model's weights are not touched; the hooks are removed on exit, also after an error.
    """
    if intervention is None:
        yield
        return
    with hooks(model, intervention.hooks(model)):
        yield


def project_out(hidden: Tensor, unit: Tensor) -> Tensor:
    """hidden minus its component along the unit vector `unit`; hidden is [..., d_model].

    The component is computed in `unit`'s dtype (float32 for a bf16 model) and subtracted in hidden's.
    """
    return hidden - ((hidden.to(unit.dtype) @ unit).unsqueeze(-1) * unit).to(hidden.dtype)


def _residual_vector(model: nn.Module, direction: Tensor, kind: str) -> Tensor:
    d_model = int(model.config.hidden_size)
    if direction.shape != (d_model,):
        raise ValueError(f"The {kind} direction has shape {tuple(direction.shape)} but this model's residual stream "
                         f"has width {d_model}; use a direction computed on this model.")
    parameter = next(model.parameters())
    return direction.detach().to(device=parameter.device, dtype=parameter.dtype)


def _by_layer(heads: Sequence[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return sorted(grouped.items())


def _heads_text(heads: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{layer}.{head}" for layer, head in sorted(set(heads)))


def _tensor_sha(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float64).cpu().numpy().tobytes()).hexdigest()[:16]
