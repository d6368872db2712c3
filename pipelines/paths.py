"""Default locations, overridable by environment variables (the only place they are read)."""

from __future__ import annotations

import os
from pathlib import Path

from refusal_core.storage import Location, location

REPOSITORY = Path(__file__).resolve().parent.parent


def registry_path() -> Path:
    """The study registry: $REFUSAL_SAE_REGISTRY, else studies.toml at the repository root."""
    return Path(os.environ.get("REFUSAL_SAE_REGISTRY", REPOSITORY / "studies.toml"))


def warehouse_root() -> Location:
    """The Parquet root: $REFUSAL_SAE_WAREHOUSE (a folder or a URL such as s3://bucket/prefix), else warehouse/data in the repository."""
    return location(os.environ.get("REFUSAL_SAE_WAREHOUSE", REPOSITORY / "warehouse" / "data"))


def cache_dir() -> Path:
    """Downloads and dequantized weights: $REFUSAL_SAE_CACHE, else ~/.cache/refusal-sae."""
    return Path(os.environ.get("REFUSAL_SAE_CACHE", Path.home() / ".cache" / "refusal-sae"))


def dagster_home() -> Path:
    """$DAGSTER_HOME, else .dagster_home in the repository (created with its dagster.yaml)."""
    return Path(os.environ.get("DAGSTER_HOME", REPOSITORY / ".dagster_home"))
