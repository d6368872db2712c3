"""What every asset needs to say where its table came from."""

from __future__ import annotations

import pyarrow as pa

from refusal_core.models import LoadedModel
from refusal_core.tables import to_json


def content_sha256(table: pa.Table) -> str:
    """The content hash an upstream table was published with (from its Parquet metadata)."""
    metadata = table.schema.metadata or {}
    return metadata.get(b"refusal_sae.content_sha256", b"").decode()


def model_lineage(loaded: LoadedModel) -> dict[str, str]:
    """Lineage fields that describe the model."""
    return {"model_source": loaded.source, "model_sha256": loaded.weights_sha256}


def upstream_lineage(**tables: pa.Table) -> dict[str, str]:
    """Lineage fields for the upstream tables an asset read, by asset name."""
    return {"upstream": to_json({name: content_sha256(table) for name, table in tables.items()})}


def prompts_of(prompts: pa.Table, label: str, split: str, limit: int, source: str | None = None) -> pa.Table:
    """Up to `limit` prompts with `label` in `split` (and from `source`), in prompt-id (hash) order."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(prompts["label"], label), pc.equal(prompts["split"], split))
    if source is not None:
        mask = pc.and_(mask, pc.equal(prompts["source"], source))
    chosen = prompts.filter(mask).sort_by("prompt_id").slice(0, limit)
    if chosen.num_rows == 0:
        raise ValueError(f"No {label} prompts in the {split} split{f' from {source}' if source else ''}; check the prompt set.")
    return chosen


def eval_prompts(prompts: pa.Table, limit: int) -> pa.Table:
    """The eval sets: HarmBench harmful, harmless and over-refusal prompts of the test split."""
    return pa.concat_tables([
        prompts_of(prompts, "harmful", "test", limit, "harmbench"),
        prompts_of(prompts, "harmless", "test", limit),
        prompts_of(prompts, "over_refusal", "test", limit),
    ])
