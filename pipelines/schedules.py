"""A nightly schedule that re-runs, per study, what its registry entry or the code changed since it was materialized."""

import hashlib
from collections.abc import Sequence

import dagster as dg

from pipelines.resources import StudyResource

REPORT = dg.AssetKey("report")


def stale_studies_schedule(job_name: str, assets: Sequence[dg.AssetsDefinition]) -> dg.ScheduleDefinition:
    """Launch `job_name` for each local study: all of it when its entry changed since its last report (or it has
    none), else only the assets whose code version changed since they were materialized or whose inputs were
    re-made since they read them, and what is downstream."""
    versions = {key: version for asset in assets for key, version in asset.code_versions_by_key.items()}

    @dg.schedule(job_name=job_name, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED)
    def stale_studies(context: dg.ScheduleEvaluationContext, study: StudyResource):
        def latest(key: dg.AssetKey, partition: str) -> dg.EventLogRecord | None:
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
            return records[0] if records else None

        requests = []
        for key, entry in study.registry().studies.items():
            if entry.network:
                continue
            report = latest(REPORT, key)
            made_from = report.asset_materialization.metadata.get("study_sha256") if report else None
            if made_from is None or made_from.value != entry.fingerprint():
                changed = list(versions)
                selection = None
            else:
                made = {asset: latest(asset, key) for asset in versions}
                changed = [asset for asset in versions if _behind(asset, versions[asset], made)]
                selection = sorted(dg.AssetSelection.assets(*changed).downstream().resolve(assets))
            if changed:
                code = hashlib.sha256(repr([(a.to_user_string(), versions[a]) for a in changed]).encode()).hexdigest()[:12]
                requests.append(dg.RunRequest(run_key=f"{key}:{entry.fingerprint()[:12]}:{code}", partition_key=key,
                                              asset_selection=selection))
        if not requests:
            return dg.SkipReason("Every local study is up to date with its registry entry and the code.")
        return requests

    return stale_studies


def _behind(asset: dg.AssetKey, version: str, made: dict[dg.AssetKey, dg.EventLogRecord | None]) -> bool:
    """Never materialized, made by other code, or made from an input that has been materialized again since it was read.

    The last case catches a run that re-made an input and then failed before re-making this asset.
    """
    record = made[asset]
    if record is None or record.asset_materialization.tags.get("dagster/code_version") != version:
        return True
    provenance = dg.DataProvenance.from_tags(record.asset_materialization.tags)
    return provenance is not None and any(
        (upstream := made.get(key)) is not None and upstream.storage_id != read
        for key, read in provenance.input_storage_ids.items())
