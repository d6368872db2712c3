"""What assets publish besides their rows: the lineage fields of a table, and a figure as Dagster metadata."""

from __future__ import annotations

import base64
import json

import dagster as dg
import pyarrow as pa

from refusal_core.models import LoadedModel
from refusal_core.storage import Location
from refusal_core.parquet import to_json
from refusal_core.tables import NOTES_KEY


def content_sha256(table: pa.Table) -> str:
    """The content hash an upstream table was published with (from its Parquet metadata)."""
    metadata = table.schema.metadata or {}
    return metadata.get(b"refusal_sae.content_sha256", b"").decode()


def model_lineage(loaded: LoadedModel) -> dict[str, str]:
    """Lineage fields that describe the model and where it ran."""
    return {"model_source": loaded.source, "model_sha256": loaded.weights_sha256,
            "device": str(loaded.device), "dtype": str(loaded.model.dtype)}


def upstream_notes(*tables: pa.Table) -> list[str]:
    """The notes the upstream tables were published with (from their Parquet metadata), in order."""
    return [note for table in tables
            for note in json.loads((table.schema.metadata or {}).get(NOTES_KEY.encode(), b"[]").decode())]


def upstream_lineage(**tables: pa.Table) -> dict[str, str]:
    """Lineage fields for the upstream tables an asset read, by asset name."""
    return {"upstream": to_json({name: content_sha256(table) for name, table in tables.items()})}


def png_metadata(name: str, path: Location) -> dict:
    """A PNG as asset metadata: the picture itself (shown in the Dagster UI) and its path."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return {name: dg.MetadataValue.md(f"![{name}](data:image/png;base64,{encoded})"),
            f"{name}_path": dg.MetadataValue.path(str(path))}
