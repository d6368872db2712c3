"""The one place that wires assets, resources, the IO manager, jobs and sensors."""

from __future__ import annotations

import warnings

import dagster as dg

from assets.activations import activations
from assets.behaviour import baseline_generations
from assets.clamping import feature_effects, feature_generations
from assets.directions import category_directions, refusal_directions
from assets.edges import feature_edges
from assets.features import feature_cards, feature_sets, latent_attributions
from assets.figures import figures
from assets.interventions import intervention_effects, intervention_generations
from assets.jailbreaks import eval_activations, jailbreak_analysis, jailbreak_generations, jailbreak_summary
from assets.probes import latent_guard, refusal_probes
from assets.prompts import prompts
from assets.report import report
from assets.saes import saes
from assets.sequence import refusal_along_sequence
from pipelines import paths
from pipelines.io_manager import ParquetIOManager
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from pipelines.schedules import stale_studies_schedule
from pipelines.sensors import registry_sensor_for

# Output(data_version=...) is how each table's content hash becomes its data version; Dagster marks
# that parameter beta, and the warning on every materialization says nothing a user can act on.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*data_version.*")

ASSETS = [
    prompts,
    activations,
    baseline_generations,
    refusal_directions,
    category_directions,
    intervention_generations,
    intervention_effects,
    saes,
    latent_attributions,
    feature_sets,
    feature_cards,
    feature_edges,
    feature_generations,
    feature_effects,
    refusal_along_sequence,
    jailbreak_generations,
    eval_activations,
    jailbreak_analysis,
    jailbreak_summary,
    refusal_probes,
    latent_guard,
    figures,
    report,
]

study_job = dg.define_asset_job("study", selection=dg.AssetSelection.assets(*ASSETS), partitions_def=studies)


def build_definitions(
    registry_path: str | None = None,
    warehouse_root: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
) -> dg.Definitions:
    """Definitions over the given registry and folders (defaults from `pipelines.paths`)."""
    warehouse = warehouse_root or str(paths.warehouse_root())
    return dg.Definitions(
        assets=ASSETS,
        jobs=[study_job],
        sensors=[registry_sensor_for(study_job.name)],
        schedules=[stale_studies_schedule(study_job.name)],
        resources={
            "study": StudyResource(
                registry_path=registry_path or str(paths.registry_path()),
                cache_dir=cache_dir or str(paths.cache_dir()),
                warehouse_root=warehouse,
                device=device,
            ),
            "io_manager": ParquetIOManager(root=warehouse),
        },
    )


defs = build_definitions()
