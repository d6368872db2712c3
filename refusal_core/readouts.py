"""Per-prompt readouts of a stored activations table: residual vectors, projections on a direction, SAE latents."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from refusal_core.activations import INSTRUCTION_TOKEN
from refusal_core.attribution import encode_rows
from refusal_core.saes import LoadedSae


def latent_activations(activations: pa.Table, prompts: pa.Table, saes: dict[int, LoadedSae]):
    """Encode the stored post-instruction activations with each layer's SAE.

    Returns (prompt rows in prompt-id order, template tokens, layer -> latents [n_prompts, n_positions, d_sae]).
    """
    post = activations.filter(pc.and_(pc.is_in(activations["layer_index"], pa.array(sorted(saes), pa.int16())),
                                      pc.not_equal(activations["token"], INSTRUCTION_TOKEN)))
    post = post.sort_by([("layer_index", "ascending"), ("prompt_id", "ascending"), ("position", "ascending")])
    ids = sorted(set(post["prompt_id"].to_pylist()))
    tokens = [t for _, t in sorted(set(zip(post["position"].to_pylist(), post["token"].to_pylist())))]
    by_id = {row["prompt_id"]: row for row in prompts.select(["prompt_id", "label", "text"]).to_pylist()}
    latents = {}
    for layer, item in saes.items():
        rows = post.filter(pc.equal(post["layer_index"], layer))["activation"]
        vectors = torch.from_numpy(pc.list_flatten(rows).to_numpy().reshape(len(rows), -1).copy())  # [n_rows, d_model]
        latents[layer] = encode_rows(item.sae, vectors).reshape(len(ids), len(tokens), -1)  # [n_prompts, n_pos, d_sae]
    return [by_id[i] for i in ids], tokens, latents


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
    if not members:  # a study without SAEs: every prompt, no column
        ids = sorted(set(activations["prompt_id"].to_pylist()))
        return ids, np.zeros((len(ids), 0))
    layers = sorted({layer for layer, _ in members})
    rows, _, latents = latent_activations(activations, prompts, {layer: saes[layer] for layer in layers})
    columns = [latents[layer][:, :, latent].mean(dim=1).double().numpy() for layer, latent in members]
    return [row["prompt_id"] for row in rows], np.stack(columns, axis=1)

