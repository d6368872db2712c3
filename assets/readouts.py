"""Per-prompt readouts of a stored activations table: residual vectors, projections on a direction, refusal-feature activations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assets.features import latent_activations
from refusal_core.activations import INSTRUCTION_TOKEN
from refusal_core.saes import LoadedSae


def residual_vectors(activations: pa.Table, layer: int, position: int | None = None) -> tuple[list[str], np.ndarray]:
    """(prompt ids in id order, vectors [n, d_model]) at `layer`: at `position`, or averaged over the post-instruction tokens."""
    rows = activations.filter(pc.equal(activations["layer_index"], layer))
    rows = rows.filter(pc.not_equal(rows["token"], INSTRUCTION_TOKEN) if position is None
                       else pc.equal(rows["position"], position))
    if rows.num_rows == 0:
        where = f"layer {layer}" if position is None else f"layer {layer}, position {position}"
        raise ValueError(f"The activations table has no rows at {where}; capture that layer (settings.layers) and "
                         "re-materialize the activations.")
    rows = rows.sort_by([("prompt_id", "ascending"), ("position", "ascending")])
    ids = pc.unique(rows["prompt_id"]).to_pylist()
    flat = pc.list_flatten(rows["activation"]).to_numpy()
    return ids, flat.reshape(len(ids), rows.num_rows // len(ids), -1).astype(np.float64).mean(axis=1)


def projections(activations: pa.Table, direction: dict) -> dict[str, float]:
    """prompt id -> projection on the unit `direction` (a category_directions row) at its layer and position."""
    ids, vectors = residual_vectors(activations, direction["layer_index"], direction["position"])
    unit = np.asarray(direction["direction"], dtype=np.float64)
    return dict(zip(ids, (vectors @ (unit / np.linalg.norm(unit))).tolist()))


def feature_activations(activations: pa.Table, prompts: pa.Table, saes: dict[int, LoadedSae],
                        members: list[tuple[int, int]]) -> tuple[list[str], np.ndarray]:
    """(prompt ids in id order, [n, len(members)]): each (layer, latent) averaged over the post-instruction tokens."""
    layers = sorted({layer for layer, _ in members})
    rows, _, latents = latent_activations(activations, prompts, {layer: saes[layer] for layer in layers})
    columns = [latents[layer][:, :, latent].mean(dim=1).double().numpy() for layer, latent in members]
    return [row["prompt_id"] for row in rows], np.stack(columns, axis=1)


def direction_row(category_directions: pa.Table, name: str) -> dict:
    """The category_directions row called `name` (refusal, harmfulness, ...)."""
    rows = category_directions.filter(pc.equal(category_directions["name"], name)).to_pylist()
    if len(rows) != 1:
        raise ValueError(f"The category_directions table has {len(rows)} rows named {name!r}; re-materialize it.")
    return rows[0]


def fitted_threshold(activations: pa.Table, prompts: pa.Table, direction: dict, exclude: set[str] = frozenset()) -> float:
    """Projection threshold on `direction` that best separates the stored harmful from harmless prompts (not `exclude`)."""
    from refusal_core.probes import fit_threshold

    values = projections(activations, direction)
    labels = dict(zip(prompts["prompt_id"].to_pylist(), prompts["label"].to_pylist()))
    train = [(v, labels[i] == "harmful") for i, v in values.items()
             if labels.get(i) in ("harmful", "harmless") and i not in exclude]
    if not any(flag for _, flag in train) or all(flag for _, flag in train):
        raise ValueError("The activations table needs harmful and harmless prompts to fit a threshold on a direction; "
                         "keep both in settings.activation_labels.")
    return fit_threshold(np.array([v for v, _ in train]), np.array([flag for _, flag in train]))
