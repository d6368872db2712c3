"""Dagster software-defined assets: thin wrappers that move tables between refusal_core and the warehouse."""

from collections.abc import Mapping

import dagster as dg

from pipelines.resources import StudyResource
from refusal_core.checkpoints import Checkpoints, step_checkpoints


def checkpoints(context: dg.AssetExecutionContext, study: StudyResource, lineage: Mapping[str, str]) -> Checkpoints:
    """Where a long step keeps its finished batches: under the staging folder, keyed by the asset, the study, its
    registry entry, the asset's code version and `lineage` (model, dtype, device, upstream hashes, settings)."""
    key = context.partition_key
    identity = {"asset": context.asset_key.to_user_string(), "study": key, "entry": study.study(key).fingerprint(),
                "code_version": context.assets_def.code_versions_by_key[context.asset_key], **lineage}
    return step_checkpoints(study.staging_dir / "checkpoints", (context.asset_key.to_user_string(), key), identity,
                            context.log.info)


def noted(context: dg.AssetExecutionContext, *notes: str | None) -> list[str]:
    """The step's notes, each once (None dropped), logged as warnings; `spool(..., notes=)` publishes them with its table."""
    kept = list(dict.fromkeys(note for note in notes if note))
    for note in kept:
        context.log.warning(note)
    return kept
