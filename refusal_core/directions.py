"""Refusal directions: float64 difference in means per layer and position, and the pure maths of choosing one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor


@dataclass(frozen=True)
class MeanActivations:
    """Mean activation of each group of prompts at each (layer, position)."""

    layers: list[int]
    """Layer indices, in the order of the tensor's second axis."""
    positions: list[int]
    """Positions (negative offsets), in the order of the tensor's third axis."""
    groups: list[str]
    """Group names, in the order of the tensor's first axis."""
    means: Tensor
    """Float64, shape [groups, layers, positions, d_model]."""
    counts: list[int]
    """Prompts per group."""

    def of(self, group: str) -> Tensor:
        """[layers, positions, d_model] mean of one group."""
        return self.means[self.groups.index(group)]


def mean_activations(batches: Iterable[pa.RecordBatch], groups: dict[str, set[str]]) -> MeanActivations:
    """Stream ACTIVATIONS record batches and average, in float64, the vectors of each group of prompt ids.

    Args:
        batches: record batches with prompt_id, layer_index, position and activation columns.
        groups: group name to the prompt ids in it; a prompt may sit in several groups.
    """
    sums: dict[tuple[str, int, int], np.ndarray] = {}
    prompts: dict[str, set[str]] = {name: set() for name in groups}
    for batch in batches:
        ids = np.asarray(batch.column("prompt_id").to_pylist(), dtype=object)
        layers = batch.column("layer_index").to_numpy()
        positions = batch.column("position").to_numpy()
        width = batch.schema.field("activation").type.list_size
        vectors = batch.column("activation").values.to_numpy().reshape(-1, width).astype(np.float64)
        for name, members in groups.items():
            mask = np.fromiter((i in members for i in ids), bool, len(ids))
            if not mask.any():
                continue
            prompts[name].update(ids[mask])
            for layer, position in set(zip(layers[mask].tolist(), positions[mask].tolist())):
                rows = mask & (layers == layer) & (positions == position)
                key = (name, layer, position)
                sums[key] = sums.get(key, 0.0) + vectors[rows].sum(axis=0)
    empty = [name for name, seen in prompts.items() if not seen]
    if empty:
        raise ValueError(f"No activations for the groups {empty}; capture activations for their prompts first.")
    layer_list = sorted({k[1] for k in sums})
    position_list = sorted({k[2] for k in sums})
    names = list(groups)
    means = torch.zeros(len(names), len(layer_list), len(position_list), next(iter(sums.values())).shape[0], dtype=torch.float64)
    for (name, layer, position), total in sums.items():
        means[names.index(name), layer_list.index(layer), position_list.index(position)] = torch.from_numpy(
            total / len(prompts[name]))
    return MeanActivations(layer_list, position_list, names, means, [len(prompts[n]) for n in names])


def difference_in_means(means: MeanActivations, positive: str, negative: str) -> Tensor:
    """[layers, positions, d_model] float64: mean of `positive` minus mean of `negative`."""
    return means.of(positive) - means.of(negative)


def pairwise_cosines(vectors: Tensor) -> Tensor:
    """[n, n] cosine similarities of the rows of a [n, d] tensor."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def eligible_layers(n_layers: int, excluded_fraction: float = 0.2) -> list[int]:
    """Layers a refusal direction may come from: all but the last `excluded_fraction` of them."""
    return list(range(int(n_layers * (1 - excluded_fraction))))


def cosine_scores(directions: Tensor, harmful: Tensor, harmless: Tensor) -> Tensor:
    """An output-free score per candidate (COSMIC-style): how well each direction separates the two groups.

    Args:
        directions: [layers, positions, d_model] candidate directions.
        harmful, harmless: [layers, positions, d_model] group means at the same places.

    Returns:
        [layers, positions]: cosine of the candidate with harmful means minus its cosine with
        harmless means, averaged over every (layer, position) where it is read.
    """
    unit = directions / directions.norm(dim=-1, keepdim=True)  # [L, P, d]
    flat = unit.reshape(-1, unit.shape[-1])  # [L*P, d]

    def cosines(means: Tensor) -> Tensor:
        normed = means / means.norm(dim=-1, keepdim=True)
        return flat @ normed.reshape(-1, normed.shape[-1]).T  # [L*P, L*P]

    score = (cosines(harmful) - cosines(harmless)).mean(dim=1)
    return score.reshape(directions.shape[:2])


def top_candidates(scores: Tensor, layers: Sequence[int], positions: Sequence[int], allowed: Sequence[int], k: int) -> list[tuple[int, int]]:
    """The `k` (layer, position) pairs with the highest scores among `allowed` layers."""
    ranked = sorted(
        ((float(scores[i, j]), layer, position) for i, layer in enumerate(layers) if layer in allowed
         for j, position in enumerate(positions)),
        reverse=True,
    )
    return [(layer, position) for _, layer, position in ranked[:k]]


def position_names(activations: pa.Table) -> dict[int, str]:
    """Position -> the token stored for it in an ACTIVATIONS table, read from the distinct pairs rather than from row order."""
    pairs = activations.select(["position", "token"]).group_by(["position", "token"]).aggregate([])
    return dict(zip(pairs["position"].to_pylist(), pairs["token"].to_pylist()))


def selected_direction(candidates: pa.Table) -> tuple[int, Tensor]:
    """(layer, direction tensor) of the selected row of a refusal_directions table."""
    row = candidates.filter(candidates["selected"]).to_pylist()
    if len(row) != 1:
        raise ValueError(f"The refusal_directions table has {len(row)} selected rows; re-materialize it.")
    return row[0]["layer_index"], torch.tensor(row[0]["direction"], dtype=torch.float64)


def direction_row(category_directions: pa.Table, name: str) -> dict:
    """The category_directions row called `name` (refusal, harmfulness, ...)."""
    rows = category_directions.filter(pc.equal(category_directions["name"], name)).to_pylist()
    if len(rows) != 1:
        raise ValueError(f"The category_directions table has {len(rows)} rows named {name!r}; re-materialize it.")
    return rows[0]
