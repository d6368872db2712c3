"""A sensor that keeps the study partitions in step with the registry and launches new studies."""


import json

import dagster as dg

from pipelines.partitions import studies
from pipelines.resources import StudyResource


def registry_sensor_for(job_name: str) -> dg.SensorDefinition:
    """Add a partition for every registry entry; launch job `job_name` for entries that appear after the first tick.

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
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"{key}:registered", partition_key=key) for key in launch],
            dynamic_partitions_requests=[studies.build_add_request(new)] if new else [],
            cursor=json.dumps(sorted(registry.studies)),
        )

    return study_registry
