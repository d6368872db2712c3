import numpy as np
import pyarrow as pa
import torch

from refusal_core.directions import (
    cosine_scores,
    difference_in_means,
    eligible_layers,
    mean_activations,
    pairwise_cosines,
    top_candidates,
)
from refusal_core.tables import activations_schema


def _rows(ids, layers, positions, vectors):
    width = vectors.shape[1]
    return pa.RecordBatch.from_arrays(
        [pa.array(["m"] * len(ids)), pa.array(ids), pa.array(layers, pa.int16()), pa.array(positions, pa.int16()),
         pa.array(["t"] * len(ids)), pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(np.float32)), width)],
        schema=activations_schema(width))


def test_planted_direction_is_recovered_from_streamed_activations():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=16)
    planted /= np.linalg.norm(planted)
    batches = []
    for index in range(200):
        harmful = index % 2 == 0
        noise = rng.normal(size=(2 * 2, 16)) * 0.5
        vectors = noise + (4.0 * planted if harmful else 0.0)
        batches.append(_rows([f"p{index}"] * 4, [0, 0, 1, 1], [-2, -1, -2, -1], vectors))
    groups = {"harmful": {f"p{i}" for i in range(0, 200, 2)}, "harmless": {f"p{i}" for i in range(1, 200, 2)}}
    means = mean_activations(batches, groups)
    assert means.layers == [0, 1] and means.positions == [-2, -1] and means.counts == [100, 100]
    assert means.means.dtype == torch.float64
    direction = difference_in_means(means, "harmful", "harmless")  # [2, 2, 16]
    cosine = torch.nn.functional.cosine_similarity(direction, torch.from_numpy(planted).expand_as(direction), dim=-1)
    assert (cosine > 0.99).all()
    scores = cosine_scores(direction, means.of("harmful"), means.of("harmless"))
    assert scores.shape == (2, 2) and (scores > 0).all()
    # One table cut into batches at offsets (as to_batches(max_chunksize) cuts a table read from Parquet)
    # averages to the same means.
    sliced = pa.Table.from_batches(batches).combine_chunks().to_batches(max_chunksize=7)
    assert sliced[1].column("activation").offset == 7
    assert torch.equal(mean_activations(sliced, groups).means, means.means)


def test_pairwise_cosines_eligible_layers_and_top_candidates():
    cos = pairwise_cosines(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(torch.diag(cos), torch.ones(3, dtype=torch.float64))
    assert abs(float(cos[0, 2]) - 2 ** -0.5) < 1e-12
    assert eligible_layers(24) == list(range(19))
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.95, 0.0]])
    assert top_candidates(scores, [0, 1, 2], [-2, -1], allowed=[0, 1], k=2) == [(0, -1), (1, -2)]
