"""Walk the lineage table from an artifact back to the model weights, the prompt set, the code and the packages."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from refusal_core.parquet import file_metadata, read_parquet
from refusal_core.storage import Location
from refusal_core.tables import TABLES


def lineage_record(root: Location, artifact: str, study: str) -> dict:
    """The lineage row of one artifact of one study."""
    path = root / "lineage" / f"model={study}" / f"{artifact}.parquet"
    if not path.exists():
        known = sorted(p.stem for p in (root / "lineage" / f"model={study}").glob("*.parquet"))
        raise ValueError(f"No lineage for {artifact!r} of study {study!r}; known artifacts: {', '.join(known) or 'none'}.")
    if refusal := TABLES["lineage"].mismatch(file_metadata(path), study):
        raise ValueError(refusal)
    return read_parquet(path).to_pylist()[0]


def resolve(root: Location, target: str, study: str | None) -> tuple[str, str]:
    """(artifact, study) from an asset name (with --study) or a Parquet path under the warehouse."""
    path = PurePosixPath(target.split("://", 1)[1]) if "://" in target else Path(target).resolve()
    if path.suffix == ".parquet":
        parts = path.parts
        partition = next((p for p in parts if p.startswith("model=")), None)
        if partition is None:
            raise ValueError(f"{target} is not under <asset>/model=<study>/ in the warehouse.")
        return parts[parts.index(partition) - 1], partition.removeprefix("model=")
    if study is None:
        studies = sorted(p.name.removeprefix("model=") for p in (root / "lineage").glob("model=*"))
        if len(studies) != 1:
            raise ValueError(f"Name the study with --study; the warehouse holds {', '.join(studies) or 'none'}.")
        study = studies[0]
    return target, study


def lineage_tree(root: Location, artifact: str, study: str) -> list[str]:
    """Lines of text: the artifact, its upstream artifacts (recursively) and the model, code and packages they came from."""
    lines: list[str] = []
    models: dict[str, str] = {}
    environments: set[str] = set()

    def walk(name: str, expected: str | None, indent: str) -> None:
        record = lineage_record(root, name, study)
        stale = "" if expected in (None, record["content_sha256"]) else "  STALE: upstream was re-materialized since"
        lines.append(f"{indent}{name}  sha256 {record['content_sha256'][:16]}  rows {record['row_count']}  "
                     f"code {record['code_version']}  run {record['run_id'][:8]}  {record['created_at']}{stale}")
        if record["model_source"]:
            models[record["model_source"]] = record["model_sha256"]
        if record["sae_source"]:
            models[f"SAE {record['sae_source']}"] = record["sae_sha256"]
        if record["device"]:
            environments.add(f"ran on: {record['device']} {record['dtype']}")
        packages = json.loads(record["package_versions"])
        environments.add("packages: " + ", ".join(f"{name} {version}" for name, version in sorted(packages.items())))
        for upstream, sha in sorted(json.loads(record["upstream"]).items()):
            walk(upstream, sha, indent + "  ")

    walk(artifact, None, "")
    lines.append("")
    lines += [f"weights: {source}  sha256 {sha}" for source, sha in sorted(models.items())]
    lines += sorted(environments)
    prompts = lineage_record(root, "prompts", study) if (root / "lineage" / f"model={study}" / "prompts.parquet").exists() else None
    if prompts:
        lines.append(f"prompt set: sha256 {prompts['content_sha256']}  settings {prompts['settings']}")
    return lines
