"""Which assets of a study are behind: one answer, from what Dagster records, for `refusal-sae run` and the schedule.

Each asset depends (`partitions.study_asset`) on an external asset `settings/<asset>`, observed per
study with the registry fields the asset's code reads whenever their values change, so Dagster
records which settings an asset was made from as it records its input tables, and the UI marks it
stale when they change. An asset is behind when it was never materialized, its code version
changed, the settings it was made from are not today's, or an input has new data since it read it
(a run that re-made the input and failed before re-making it); what is downstream of it is behind
with it. These are the rules of Dagster's own stale status, which the UI shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from pipelines.partitions import SETTINGS, settings_key
from pipelines.resources import StudyResource
from refusal_core.lineage import settings_read, settings_values, settings_version
from refusal_core.registry import Study


def asset_module(asset: dg.AssetsDefinition) -> str:
    """The module whose code an asset runs."""
    return asset.op.compute_fn.decorated_fn.__module__


@dataclass(frozen=True)
class StudySettings:
    """Per asset, the registry fields its code reads and their values in one study."""

    values: Mapping[dg.AssetKey, dict[str, object]]

    @classmethod
    def of(cls, study: Study, assets: Sequence[dg.AssetsDefinition], dtype: str) -> StudySettings:
        """`dtype` is the study's resolved dtype (auto means bf16 on one machine and float32 on another)."""
        return cls({key: settings_values(study, settings_read(asset_module(asset)), dtype)
                    for asset in assets for key in asset.keys})

    def version(self, asset: dg.AssetKey) -> str:
        return settings_version(self.values[asset])


def current_settings(study: StudyResource, key: str, assets: Sequence[dg.AssetsDefinition]) -> StudySettings:
    """What each asset of study `key` reads from its registry entry now (with the resource's dtype override)."""
    from refusal_core.models import pick_device, pick_dtype  # torch, only now: checking settings loads no model

    entry = study.study(key)
    return StudySettings.of(entry, assets, str(pick_dtype(entry.dtype, pick_device(study.device))))


def settings_specs(assets: Sequence[dg.AssetsDefinition], partitions_def: dg.PartitionsDefinition) -> list[dg.AssetSpec]:
    """One external asset `settings/<asset>` per asset, observed per study by `record_settings`."""
    return [dg.AssetSpec(settings_key(key), partitions_def=partitions_def, group_name=SETTINGS,
                         description=f"The registry fields {key.to_user_string()} reads, per study: observed "
                         "each time their values change, by `refusal-sae run`, the registry sensor and the schedule.")
            for asset in assets for key in asset.keys]


def record_settings(instance: dg.DagsterInstance, settings: StudySettings, partition: str) -> list[dg.AssetKey]:
    """Observe each settings asset of a study whose values differ from its latest observation; returns their keys.

    An observation carries the values (shown in the UI, and named when they change) and their hash
    as its data version.
    """
    changed = []
    for key, values in settings.values.items():
        version = settings_version(values)
        latest = _record(instance, settings_key(key), partition, observed=True)
        if latest is None or _version(latest) != version:
            instance.report_runless_asset_event(dg.AssetObservation(
                settings_key(key), partition=partition, tags={"dagster/data_version": version},
                metadata={"settings": dg.MetadataValue.json(values)}))
            changed.append(key)
    return changed


def record_run_settings(instance: dg.DagsterInstance, study: StudyResource, key: str) -> None:
    """`record_settings` for every asset of the study job (`StudyResource` calls it as a run starts)."""
    from pipelines.definitions import ASSETS  # which imports this module

    record_settings(instance, current_settings(study, key, ASSETS), key)


def behind(instance: dg.DagsterInstance, assets: Sequence[dg.AssetsDefinition], partition: str,
           settings: StudySettings) -> dict[dg.AssetKey, str]:
    """The assets of `partition` that need materializing, each with why, in graph order; the rest are up to date."""
    versions = {key: version for asset in assets for key, version in asset.code_versions_by_key.items()}
    made = {key: _record(instance, key, partition) for key in versions}
    order = _in_graph_order(assets)
    reasons = {key: reason for key in order if (reason := _why(instance, key, versions[key], made, settings, partition))}
    for key in list(reasons):
        for below in dg.AssetSelection.assets(key).downstream().resolve(assets):
            reasons.setdefault(below, f"downstream of {key.to_user_string()}")
    return {key: reasons[key] for key in order if key in reasons}


def _why(instance: dg.DagsterInstance, key: dg.AssetKey, version: str, made: Mapping[dg.AssetKey, dg.EventLogRecord | None],
         settings: StudySettings, partition: str) -> str:
    record = made[key]
    if record is None:
        return "never materialized"
    tags = record.asset_materialization.tags
    if tags.get("dagster/code_version") != version:
        return "its code changed"
    provenance = dg.DataProvenance.from_tags(tags)
    read = dict(provenance.input_storage_ids) if provenance else {}
    # Dagster points each input at the latest event of that asset when the step ran, of any study; the
    # study's own record in effect then is its latest one up to that pointer (as the UI reads it too).
    cursor = read.pop(settings_key(key), None)
    used = _record(instance, settings_key(key), partition, observed=True, up_to=cursor) if cursor else None
    if used is None:
        return "its settings were not recorded"
    if _version(used) != settings.version(key):
        before = used.asset_observation.metadata["settings"].value
        changed = [field for field, value in settings.values[key].items() if before.get(field) != value]
        return f"settings changed: {', '.join(changed)}"
    for upstream, cursor in read.items():
        latest = made.get(upstream)
        if latest is not None and latest.storage_id > cursor:
            then = _record(instance, upstream, partition, up_to=cursor)
            if then is None or _version(then) != _version(latest):
                return f"its input {upstream.to_user_string()} changed since"
    return ""


def _record(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, observed: bool = False,
            up_to: int | None = None) -> dg.EventLogRecord | None:
    """The latest materialization (or observation) of `key` for `partition`, up to storage id `up_to` when given."""
    query = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition],
                                  before_storage_id=None if up_to is None else up_to + 1)
    fetch = instance.fetch_observations if observed else instance.fetch_materializations
    records = fetch(query, limit=1).records
    return records[0] if records else None


def _version(record: dg.EventLogRecord) -> str | None:
    event = record.asset_materialization or record.asset_observation
    return event.tags.get("dagster/data_version")


def _in_graph_order(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetKey]:
    """Every asset key, each after its inputs (ties by name)."""
    deps = {spec.key: {dep.asset_key for dep in spec.deps} for asset in assets for spec in asset.specs}
    order: list[dg.AssetKey] = []

    def visit(key: dg.AssetKey) -> None:
        if key in deps and key not in order:
            for dep in sorted(deps[key], key=str):
                visit(dep)
            order.append(key)

    for key in sorted(deps, key=str):
        visit(key)
    return order
