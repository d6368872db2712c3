"""A nightly schedule that re-runs, per study, the assets whose code, settings or inputs changed since they were made."""

import hashlib
from collections.abc import Sequence

import dagster as dg

from pipelines.resources import StudyResource
from pipelines.staleness import behind, current_settings


def stale_studies_schedule(job_name: str, assets: Sequence[dg.AssetsDefinition]) -> dg.ScheduleDefinition:
    """Launch `job_name` for each local study on the assets that are behind (`staleness.behind`), as `refusal-sae run` would."""

    @dg.schedule(job_name=job_name, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED)
    def stale_studies(context: dg.ScheduleEvaluationContext, study: StudyResource):
        requests = []
        for key, entry in study.registry().studies.items():
            if entry.network:
                continue
            reasons = behind(context.instance, assets, key, current_settings(study, key, assets))
            if reasons:
                digest = hashlib.sha256(repr(sorted((k.to_user_string(), why) for k, why in reasons.items())).encode())
                requests.append(dg.RunRequest(run_key=f"{key}:{digest.hexdigest()[:12]}", partition_key=key,
                                              asset_selection=list(reasons)))
        if not requests:
            return dg.SkipReason("Every asset of every local study is up to date with its code, settings and inputs.")
        return requests

    return stale_studies
