"""A nightly schedule that re-runs only the studies whose registry entry or code changed since their last report."""

import dagster as dg

from pipelines.resources import StudyResource
from refusal_core.lineage import code_version

REPORT = dg.AssetKey("report")


def stale_studies_schedule(job_name: str) -> dg.ScheduleDefinition:
    """Launch `job_name` for each local study whose last report was made from other settings or code, or never."""

    @dg.schedule(job_name=job_name, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED)
    def stale_studies(context: dg.ScheduleEvaluationContext, study: StudyResource):
        requests = []
        current_code = code_version()
        for key, entry in study.registry().studies.items():
            if entry.network:
                continue
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=REPORT, asset_partitions=[key]), limit=1).records
            metadata = records[0].asset_materialization.metadata if records else {}
            made_from = (metadata.get("study_sha256"), metadata.get("code_version"))
            if tuple(m.value if m else None for m in made_from) != (entry.fingerprint(), current_code):
                requests.append(dg.RunRequest(run_key=f"{key}:{entry.fingerprint()[:12]}:{current_code}", partition_key=key))
        if not requests:
            return dg.SkipReason("Every local study is up to date with its registry entry and the code.")
        return requests

    return stale_studies
