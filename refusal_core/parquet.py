"""Parquet I/O: the one way tables are hashed, spooled, written and read, and the canonical JSON of their lineage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from refusal_core.storage import Location, arrow_source, owned_temporary, write_atomically


@dataclass(frozen=True)
class Spool:
    """A table staged in an Arrow IPC file, hashed as it was written, waiting to be published."""

    path: Path
    """The Arrow IPC stream file holding the rows."""
    schema: pa.Schema
    """The table's schema."""
    sha256: str
    """Hash of the serialized record batches, in order: the table's content hash."""
    row_count: int
    """Number of rows."""
    lineage: Mapping[str, str]
    """Lineage fields the producer knows (model source and sha, prompt set hash, upstream, settings)."""
    notes: tuple[str, ...] = ()
    """Sentences saying what the step had nothing to work on or which fallback it took; published with the file."""

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Read the rows back one record batch at a time."""
        with pa.memory_map(str(self.path)) as source:
            yield from ipc.open_stream(source)


def spool(
    batches: Iterable[pa.RecordBatch | pa.Table],
    schema: pa.Schema,
    directory: Path,
    lineage: Mapping[str, str] | None = None,
    notes: Iterable[str] = (),
) -> Spool:
    """Write `batches` to an IPC file in `directory`, checking them against `schema` and hashing them.

    Batches are written as they come, so memory stays bounded by one batch. A column that is
    not in `schema` is an error rather than being dropped silently. `notes` (each sentence once, in
    order) travel with the spool into the published file's metadata; they never change the content hash.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = owned_temporary(directory, "spool", ".arrows")
    digest = hashlib.sha256()
    rows = 0
    try:
        with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, schema) as writer:
            for item in batches:
                for batch in _as_batches(item):
                    batch = _conform(batch, schema)
                    digest.update(_serialize(batch))
                    writer.write_batch(batch)
                    rows += batch.num_rows
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Spool(path, schema, digest.hexdigest(), rows, dict(lineage or {}), tuple(dict.fromkeys(notes)))


def table_sha256(table: pa.Table) -> str:
    """Content hash of an in-memory table, equal to the hash `spool` gives the same batches."""
    digest = hashlib.sha256()
    for batch in table.to_batches():
        digest.update(_serialize(batch))
    return digest.hexdigest()


def write_parquet(
    path: Location,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    metadata: Mapping[str, str],
) -> None:
    """Write batches to `path` (a local path or an object-store URL) atomically.

    `metadata` is stored as the file's key-value metadata. An interrupted write leaves the old
    file (or nothing) in place, never a truncated one.
    """
    schema = schema.with_metadata({**(schema.metadata or {}), **{k: str(v) for k, v in metadata.items()}})

    def write(temporary: Path) -> None:
        with pq.ParquetWriter(str(temporary), schema, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch.replace_schema_metadata(schema.metadata))

    write_atomically(path, write)


def read_parquet(path: Location) -> pa.Table:
    """Read a table written by `write_parquet` (memory-mapped when local), with its key-value metadata."""
    if not path.exists():
        raise FileNotFoundError(f"No table at {path}: materialize its asset first.")
    source, filesystem = arrow_source(path)
    # One file, so ParquetFile rather than pq.read_table, whose pyarrow.dataset imports pandas (~0.4 s of `lineage`).
    with pq.ParquetFile(source, filesystem=filesystem, memory_map=filesystem is None) as file:
        return file.read()


def file_metadata(path: Location) -> dict[str, str]:
    """The key-value metadata of a Parquet file, decoded, without reading its rows."""
    source, filesystem = arrow_source(path)
    raw = pq.read_schema(source, filesystem=filesystem).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}


def to_json(value: Mapping[str, object]) -> str:
    """Canonical JSON (sorted keys, no spaces) for settings and upstream maps stored in tables."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _as_batches(item: pa.RecordBatch | pa.Table) -> list[pa.RecordBatch]:
    return item.to_batches() if isinstance(item, pa.Table) else [item]


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    extra = set(batch.schema.names) - set(schema.names)
    if extra:
        raise ValueError(f"Columns {sorted(extra)} are not in the table schema {schema.names}.")
    missing = set(schema.names) - set(batch.schema.names)
    if missing:
        raise ValueError(f"Columns {sorted(missing)} are missing; the table schema is {schema.names}.")
    return pa.RecordBatch.from_arrays(
        [batch.column(name).cast(schema.field(name).type) for name in schema.names], schema=schema
    )


def _serialize(batch: pa.RecordBatch) -> bytes:
    # The schema metadata is dropped so that lineage metadata never changes the content hash.
    return batch.replace_schema_metadata(None).serialize().to_pybytes()
