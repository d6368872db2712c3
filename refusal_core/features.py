"""Feature sets: the SAE latents a study takes as its refusal features (and their controls), read from feature_sets."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def refusal_members(feature_sets: pa.Table, name: str = "cossim_ap") -> list[tuple[int, int]]:
    """(layer, latent) of a feature set, in rank order."""
    rows = feature_sets.filter(pc.equal(feature_sets["feature_set"], name)).sort_by("rank")
    if rows.num_rows == 0:
        raise ValueError(f"The feature_sets table has no {name!r} set; re-materialize feature_sets.")
    return list(zip(rows["layer_index"].to_pylist(), rows["latent_index"].to_pylist()))
