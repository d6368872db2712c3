"""Refusal directions: float64 difference in means per layer and position, the candidates and their scores, and the
directions per harm category; readers of the stored direction tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from refusal_core.activations import INSTRUCTION_TOKEN
from refusal_core.tables import DIRECTIONS


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
        # flatten() honours a sliced batch's offset (to_batches(max_chunksize) slices); .values would not.
        vectors = batch.column("activation").flatten().to_numpy().reshape(-1, width).astype(np.float64)
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


@dataclass(frozen=True)
class DirectionCandidates:
    """Every candidate refusal direction (harmful minus harmless mean at each layer x post-instruction position) and its score."""

    layers: list[int]
    positions: list[int]
    directions: Tensor
    """Float64, [layers, positions, d_model]."""
    scores: Tensor
    """Cosine score of each candidate, [layers, positions]."""
    allowed: list[int]
    """Layers a direction may be selected from."""
    shortlist: list[tuple[int, int]]
    """The (layer, position) of the best candidates by cosine score in the allowed layers, best first."""
    by_cosine: tuple[int, int]
    """The output-free choice: the best candidate by cosine score in the allowed layers."""
    tokens: dict[int, str]
    """Position -> its template token."""

    def at(self, layer: int, position: int) -> Tensor:
        """The [d_model] candidate at (layer, position)."""
        return self.directions[self.layers.index(layer), self.positions.index(position)]


def direction_candidates(activations: pa.Table, harmful: set[str], harmless: set[str], n_layers: int,
                         k: int) -> DirectionCandidates:
    """The candidates from the stored post-instruction activations of the `harmful` and `harmless` prompt ids, with a shortlist of `k`."""
    template_rows = activations.filter(pc.not_equal(activations["token"], INSTRUCTION_TOKEN))
    means = mean_activations(template_rows.to_batches(max_chunksize=4096), {"harmful": harmful, "harmless": harmless})
    directions = difference_in_means(means, "harmful", "harmless")  # [L, P, d] float64
    scores = cosine_scores(directions, means.of("harmful"), means.of("harmless"))
    allowed = eligible_layers(n_layers)
    return DirectionCandidates(means.layers, means.positions, directions, scores, allowed,
                               top_candidates(scores, means.layers, means.positions, allowed, k),
                               top_candidates(scores, means.layers, means.positions, allowed, 1)[0], position_names(activations))


MIN_CATEGORY_PROMPTS = 5
"""Fewest prompts of a harm category that get a direction of their own."""


@dataclass(frozen=True)
class CategoryDirections:
    """The category_directions stage's result: a direction per group, read where the refusal direction was selected."""

    rows: list[dict]
    """DIRECTIONS rows, by name, then the refusal direction."""
    skipped: dict[str, int]
    """Harm categories with too few prompts for a direction, and their prompt counts."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=DIRECTIONS)


def directions_by_category(prompts: pa.Table, activations: pa.Table, refusal_directions: pa.Table) -> CategoryDirections:
    """A direction per harm category (with MIN_CATEGORY_PROMPTS or more stored prompts) and for over-refusal at the refusal
    direction's layer and position, and a harmfulness direction at the instruction's last token, each minus harmless."""
    chosen = refusal_directions.filter(refusal_directions["selected"]).to_pylist()[0]
    layer, position = chosen["layer_index"], chosen["position"]
    refusal = torch.tensor(chosen["direction"], dtype=torch.float64)
    captured = prompts.filter(pc.is_in(prompts["prompt_id"], activations["prompt_id"].unique()))
    rows_of = lambda label: captured.filter(pc.equal(captured["label"], label))  # noqa: E731
    groups = {label: set(rows_of(label)["prompt_id"].to_pylist()) for label in ("harmless", "harmful", "over_refusal")}
    harmful, skipped = rows_of("harmful"), {}
    for category in sorted(set(harmful["category"].to_pylist())):
        members = harmful.filter(pc.equal(harmful["category"], category))["prompt_id"].to_pylist()
        if len(members) >= MIN_CATEGORY_PROMPTS:
            groups[f"category:{category}"] = set(members)
        else:
            skipped[category] = len(members)
    at_layer = activations.filter(pc.equal(activations["layer_index"], layer))
    instruction = int(pc.min(at_layer["position"]).as_py())
    means = mean_activations(at_layer.to_batches(max_chunksize=4096), groups)
    tokens = position_names(at_layer)
    places = {name: position for name in groups if name not in ("harmless", "harmful")} | {"harmfulness": instruction}
    rows = []
    for name, place in sorted(places.items()):
        group = "harmful" if name == "harmfulness" else name
        vector = difference_in_means(means, group, "harmless")[0, means.positions.index(place)]
        rows.append({"model_key": chosen["model_key"], "name": name, "layer_index": layer, "position": place,
                     "token": tokens.get(place, ""), "n_prompts": means.counts[means.groups.index(group)],
                     "cosine_with_refusal": float(torch.nn.functional.cosine_similarity(vector, refusal, dim=0)),
                     "direction": vector.tolist()})
    rows.append({"model_key": chosen["model_key"], "name": "refusal", "layer_index": layer, "position": position,
                 "token": chosen["token"], "n_prompts": 0, "cosine_with_refusal": 1.0, "direction": chosen["direction"]})
    return CategoryDirections(rows, skipped)
