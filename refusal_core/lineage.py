"""Lineage records: which model, SAE, data, code and packages produced an artifact."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa

from refusal_core.parquet import to_json
from refusal_core.tables import LINEAGE, TABLES, Table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding the project's packages, checked out or installed."""
PROJECT_PACKAGES = ("refusal_core", "assets", "pipelines", "warehouse")
DATA_SUFFIXES = (".sql", ".jsonl", ".txt")
SCHEMA_MODULE = "refusal_core.tables"
"""Hashed as the asset's own catalogue entry, not as a whole, so a change to one schema marks only its table stale."""
PACKAGES = ("refusal-sae", "torch", "transformers", "sae-lens", "dagster")
"""The packages whose versions every lineage record carries."""


def code_version(module: str, table: Table | None = None, root: Path = PROJECT_ROOT) -> str:
    """First 12 hex digits of a hash over the code `module` runs, and over its `table`'s catalogue entry.

    The code is the module's source, the project modules it imports (transitively, also inside
    functions) and the data files of their packages that they name (views.sql, harmless.jsonl),
    read from `root`, so an edit changes the version of exactly the modules that can run it.
    """
    digest = hashlib.sha256()
    for path in sorted(code_files(module, root)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    if table is not None:
        digest.update(f"{table.name}\0{table.version}\0{table.needs_model}\0{table.description}\0".encode())
        digest.update(table.schema.to_string(show_field_metadata=True, show_schema_metadata=True).encode())
    return digest.hexdigest()[:12]


def code_files(module: str, root: Path = PROJECT_ROOT) -> set[Path]:
    """The files `code_version` hashes for `module` (the schema module aside)."""
    found: set[Path] = set()
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen or name == SCHEMA_MODULE or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        seen.add(name)
        base = root / name.replace(".", "/")
        path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
        if path is None:  # a name imported from a module, not a module
            continue
        found.add(path)
        text = path.read_text(encoding="utf-8")
        found |= {data for data in _data_files(root / name.split(".")[0]) if data.name in text}
        todo += _imports(str(path), text)
    return found


NOT_READ = ("key", "description", "network", "settings")
"""Study fields no table depends on (the key is the partition; settings is read field by field)."""


def settings_read(module: str, root: Path = PROJECT_ROOT) -> tuple[str, ...]:
    """The registry fields the code `module` runs can read: those it names as attributes anywhere.

    `study.saes` names a whole section, `settings.max_new_tokens` one setting (listed as
    `settings.max_new_tokens`). Matching attribute names over the same files as `code_version`
    errs on the side of too many (any `.layers` counts), never too few, so a change to a field an
    asset reads always re-runs it.
    """
    from refusal_core.registry import Settings, Study

    named = set().union(*(_attributes(str(path), path.read_text(encoding="utf-8"))
                          for path in code_files(module, root) if path.suffix == ".py"))
    study = sorted(name for name in Study.model_fields if name in named and name not in NOT_READ)
    return (*study, *sorted(f"settings.{name}" for name in Settings.model_fields if name in named))


def settings_values(study, fields: tuple[str, ...], dtype: str) -> dict[str, object]:
    """The values of `fields` (from `settings_read`) in a registry entry, as JSON; `dtype` as resolved (auto is not a dtype)."""
    def value(field: str) -> object:
        if field == "dtype":
            return dtype
        owner, _, name = field.rpartition(".")
        found = getattr(study.settings if owner else study, name)
        return found.model_dump(mode="json") if hasattr(found, "model_dump") else found

    return {field: value(field) for field in fields}


def settings_version(values: dict[str, object]) -> str:
    """First 16 hex digits of the hash of `settings_values`: the data version of an asset's settings."""
    return hashlib.sha256(to_json(values).encode()).hexdigest()[:16]


@cache
def _attributes(path: str, text: str) -> frozenset[str]:
    return frozenset(node.attr for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Attribute))


@cache
def _imports(path: str, text: str) -> tuple[str, ...]:
    # Every module a source imports, anywhere in it; for `from a import b`, both a and a.b (b may be a module).
    names: list[str] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{path} imports relatively; use absolute imports, which code versions follow.")
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return tuple(names)


@cache
def _data_files(package: Path) -> tuple[Path, ...]:
    # The package's own folder and its subfolders (refusal_core/data), not deeper (a local warehouse under warehouse/data).
    return tuple(p for pattern in ("*", "*/*") for p in package.glob(pattern) if p.suffix in DATA_SUFFIXES and p.is_file())


@cache
def package_versions() -> str:
    """Canonical JSON of the installed versions of `PACKAGES` (absent ones as "not installed")."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return to_json({name: installed(name) for name in PACKAGES})


@dataclass(frozen=True)
class LineageRecord:
    """One row of the lineage table."""

    artifact: str
    partition: str
    path: str
    content_sha256: str
    row_count: int
    code_version: str
    model_source: str = ""
    model_sha256: str = ""
    sae_source: str = ""
    sae_sha256: str = ""
    prompt_set_sha256: str = ""
    package_versions: str = field(default_factory=package_versions)
    device: str = ""
    dtype: str = ""
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
        return {"refusal_sae.lineage_version": str(TABLES["lineage"].version),
                **{f"refusal_sae.{k}": v for k, v in record.items()}}

    def table(self) -> pa.Table:
        """The record as a one-row table in the LINEAGE schema."""
        return pa.Table.from_pylist([asdict(self)], schema=LINEAGE)

