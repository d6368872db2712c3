"""The one place that wires assets, resources, the IO manager, jobs and sensors."""

from __future__ import annotations

import warnings

import dagster as dg

import assets
from pipelines import paths
from pipelines.console import LOGGERS
from pipelines.io_manager import ParquetIOManager
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from pipelines.schedules import stale_studies_schedule
from pipelines.sensors import registry_sensor_for
from pipelines.staleness import asset_module, settings_specs
from refusal_core.lineage import code_version
from refusal_core.tables import TABLES

# Output(data_version=...) is how each table's content hash becomes its data version; Dagster marks
# that parameter beta, and the warning on every materialization says nothing a user can act on.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*data_version.*")


def with_code_version(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The asset with its Dagster code version: the hash of the code it runs and of its table's catalogue entry."""
    return asset.map_asset_specs(lambda spec: spec.replace_attributes(
        code_version=code_version(asset_module(asset), TABLES.get(spec.key.path[-1]))))


ASSETS = [with_code_version(asset) for asset in dg.load_assets_from_package_module(assets)]
"""Every asset of the `assets` package, each depending on its `settings/<asset>` source: a new asset module needs no line here."""

study_job = dg.define_asset_job("study", selection=dg.AssetSelection.assets(*ASSETS), partitions_def=studies)


def build_definitions(
    registry_path: str | None = None,
    warehouse_root: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    dtype: str = "",
) -> dg.Definitions:
    """Definitions over the given registry and folders (defaults from `pipelines.paths`)."""
    warehouse = warehouse_root or str(paths.warehouse_root())
    study = StudyResource(registry_path=registry_path or str(paths.registry_path()),
                          cache_dir=cache_dir or str(paths.cache_dir()), warehouse_root=warehouse, device=device, dtype=dtype)
    return dg.Definitions(
        assets=[*ASSETS, *settings_specs(ASSETS, studies)],
        jobs=[study_job],
        loggers=LOGGERS,
        sensors=[registry_sensor_for(study_job.name, ASSETS)],
        schedules=[stale_studies_schedule(study_job.name, ASSETS)],
        resources={
            "study": study,
            "io_manager": ParquetIOManager(root=warehouse),
        },
    )


defs = build_definitions()
