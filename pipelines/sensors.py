"""A sensor that keeps the study partitions and their recorded settings in step with the registry, and launches new studies."""


import json
from collections.abc import Sequence

import dagster as dg

from pipelines.partitions import studies
from pipelines.resources import StudyResource
from pipelines.staleness import current_settings, record_settings


def registry_sensor_for(job_name: str, assets: Sequence[dg.AssetsDefinition]) -> dg.SensorDefinition:
    """Add a partition for every registry entry; launch job `job_name` for entries that appear after the first tick.

    Each tick also records every registered local study's settings where the registry changed them,
    so the UI marks the assets that read a changed setting as stale.

    On its first tick the sensor only registers what is already in the registry, so turning it on
    does not start every study at once; an entry added later is registered and run. Studies that
    need the hub (network = true) are registered but not launched.
    """

    @dg.sensor(job_name=job_name, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
    def study_registry(context: dg.SensorEvaluationContext, study: StudyResource) -> dg.SensorResult:
        registry = study.registry()
        known = set(context.instance.get_dynamic_partitions(studies.name))
        new = [key for key in registry.studies if key not in known]
        first_tick = context.cursor is None
        launch = [] if first_tick else [key for key in new if not registry.studies[key].network]
        for key, entry in registry.studies.items():
            if key in known and not entry.network:
                record_settings(context.instance, current_settings(study, key, assets), key)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"{key}:registered", partition_key=key) for key in launch],
            dynamic_partitions_requests=[studies.build_add_request(new)] if new else [],
            cursor=json.dumps(sorted(registry.studies)),
        )

    return study_registry
