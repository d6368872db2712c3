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
