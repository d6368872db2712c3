"""Lineage records: which model, SAE, data and code produced an artifact."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa

from refusal_core.tables import LINEAGE, to_json

LINEAGE_VERSION = "1"
"""Version of the lineage record layout, stored in every file's metadata."""


def code_version() -> str:
    """Package version plus the first 12 hex digits of a hash over the refusal_core sources.

    The hash changes with any edit to the science code, installed or checked out, with or without git.
    """
    try:
        package = version("refusal-sae")
    except PackageNotFoundError:
        package = "0+unknown"
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".jsonl", ".txt"}:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{package}+{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class LineageRecord:
    """One row of the lineage table."""

    artifact: str
    partition: str
    path: str
    content_sha256: str
    row_count: int
    model_source: str = ""
    model_sha256: str = ""
    sae_source: str = ""
    sae_sha256: str = ""
    prompt_set_sha256: str = ""
    code_version: str = field(default_factory=code_version)
    run_id: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    upstream: str = "{}"
    settings: str = "{}"

    def file_metadata(self) -> dict[str, str]:
        """The key-value metadata stored in the artifact's Parquet file.

        The run id, time and path are left out, so the same inputs give a byte-identical file;
        they live in the lineage table.
        """
        record = {k: str(v) for k, v in asdict(self).items() if k not in {"path", "run_id", "created_at"}}
        return {"refusal_sae.lineage_version": LINEAGE_VERSION, **{f"refusal_sae.{k}": v for k, v in record.items()}}

    def table(self) -> pa.Table:
        """The record as a one-row table in the LINEAGE schema."""
        return pa.Table.from_pylist([asdict(self)], schema=LINEAGE)


def upstream_json(hashes: dict[str, str]) -> str:
    """Canonical JSON of an upstream map (artifact name to content sha256)."""
    return to_json(hashes)
