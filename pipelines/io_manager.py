"""The Parquet IO manager: publishes spooled tables atomically under <root>/<asset>/model=<study>/ with lineage."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow as pa

from refusal_core.lineage import LineageRecord
from refusal_core.parquet import Spool, read_parquet, write_parquet
from refusal_core.storage import Location, location, shown
from refusal_core.tables import NOTES_KEY, TABLES, Table

PREVIEW_ROWS = 5
LINEAGE = TABLES["lineage"]


class ParquetIOManager(dg.ConfigurableIOManager):
    """Writes each partition of an asset to one Parquet file and a row of the lineage table.

    Assets hand over a `Spool` (rows already staged and hashed); this manager streams it into
    `<root>/<asset>/model=<study>/data.parquet` in one step (a rename locally, one upload to an
    object store), with the lineage record, the table's schema version and the step's notes as the
    file's key-value metadata, then deletes the spool. Reading a file written with another schema version is refused.
    """

    root: str
    """A local folder or an object-store URL (s3://bucket/prefix)."""

    def path_for(self, asset: str, study: str) -> Location:
        return location(self.root) / asset / f"model={study}" / "data.parquet"

    def handle_output(self, context: dg.OutputContext, obj: Spool) -> None:
        if not isinstance(obj, Spool):
            raise TypeError(f"Asset {context.asset_key.to_user_string()} must return a Spool, not {type(obj).__name__}.")
        asset = context.asset_key.path[-1]
        study = context.partition_key
        table = _catalogued(asset)
        if obj.schema.names != table.schema.names:
            raise TypeError(f"Asset {asset} spooled columns {obj.schema.names}; its catalogue entry has {table.schema.names}.")
        path = self.path_for(asset, study)
        record = LineageRecord(
            artifact=asset, partition=study, path=str(path), content_sha256=obj.sha256, row_count=obj.row_count,
            code_version=context.asset_spec.code_version or "", run_id=context.run_id, **obj.lineage,
        )
        preview = _preview(obj)
        try:
            write_parquet(path, obj.schema, obj.batches(), {**record.file_metadata(), **table.file_metadata(),
                                                            NOTES_KEY: json.dumps(list(obj.notes))})
        except OSError as error:  # a missing bucket, refused credentials, a full disk
            reason = " ".join(str(error).split()) or type(error).__name__
            raise OSError(f"Cannot write {asset} to the warehouse {shown(location(self.root))} ({reason}); create it "
                          "or point REFUSAL_SAE_WAREHOUSE at a folder or bucket you can write to.") from None
        finally:
            obj.path.unlink(missing_ok=True)
        lineage_path = location(self.root) / "lineage" / f"model={study}" / f"{asset}.parquet"
        write_parquet(lineage_path, LINEAGE.schema, record.table().to_batches(), LINEAGE.file_metadata())
        context.add_output_metadata(
            {
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": obj.row_count,
                "content_sha256": obj.sha256,
                "model_sha256": record.model_sha256 or "n/a",
                "code_version": record.code_version,
                "upstream": dg.MetadataValue.json(json.loads(record.upstream)),
                "dagster/column_schema": column_schema(obj.schema),
                "preview": dg.MetadataValue.md(preview),
                **({"notes": dg.MetadataValue.md("\n".join(f"- {note}" for note in obj.notes))} if obj.notes else {}),
            }
        )

    def load_input(self, context: dg.InputContext) -> pa.Table:
        asset = context.asset_key.path[-1]
        table = read_parquet(self.path_for(asset, context.partition_key))
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        refusal = _catalogued(asset).mismatch(metadata, context.partition_key)
        if refusal:
            raise ValueError(refusal)
        return table


def _catalogued(asset: str) -> Table:
    if asset not in TABLES:
        raise ValueError(f"Asset {asset} writes a table that is not in the catalogue: add its entry to refusal_core.tables.TABLES.")
    return TABLES[asset]

def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """Dagster's column schema, derived from the pyarrow schema and its field descriptions."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=field.name,
                type=str(field.type),
                description=(field.metadata or {}).get(b"description", b"").decode(),
                constraints=dg.TableColumnConstraints(nullable=field.nullable),
            )
            for field in schema
        ]
    )


def _preview(staged: Spool) -> str:
    """The first rows as a Markdown table, long values cut short (read from the spool, not the published file)."""
    head = next((batch for batch in staged.batches() if batch.num_rows), None)
    if head is None:
        return "(empty)"
    head = head.slice(0, PREVIEW_ROWS)
    columns = head.schema.names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in head.to_pylist():
        cells = []
        for name in columns:
            text = str(row[name]).replace("|", "\\|").replace("\n", " ")
            cells.append(text if len(text) <= 60 else text[:57] + "...")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
