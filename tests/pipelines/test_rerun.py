"""`refusal-sae run` re-materializes only what changed, from what Dagster records, and agrees with the UI's staleness."""

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from pipelines import resources
from pipelines.cli import main
from pipelines.definitions import ASSETS, build_definitions
from pipelines.staleness import behind, current_settings

KEY = "tiny-qwen2"


@pytest.fixture
def study_env(monkeypatch, tiny_registry, tmp_path):
    for name, value in {"REFUSAL_SAE_REGISTRY": tiny_registry, "REFUSAL_SAE_WAREHOUSE": tmp_path / "warehouse",
                        "REFUSAL_SAE_CACHE": tmp_path / "cache", "DAGSTER_HOME": tmp_path / "home"}.items():
        monkeypatch.setenv(name, str(value))
    (tmp_path / "home").mkdir()
    return tmp_path / "warehouse"


def _mtimes(warehouse):
    return {path.parent.parent.name: path.stat().st_mtime_ns for path in warehouse.glob(f"*/model={KEY}/data.parquet")}


def _ui_stale(registry) -> set[str]:
    """The assets the Dagster UI shows as stale for the study (the resolver the UI asks)."""
    defs = build_definitions(str(registry))
    with dg.DagsterInstance.get() as instance:
        resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
        return {asset.key.to_user_string() for asset in ASSETS
                if resolver.get_status(asset.key, KEY) == StaleStatus.STALE}


def test_a_rerun_skips_what_is_unchanged_and_redoes_what_a_setting_changed(study_env, tiny_registry, capsys):
    warehouse = study_env
    assert main(["run"]) == 0
    printed = capsys.readouterr()
    assert f"Skipping 0 of {len(ASSETS)} assets" in printed.out
    # The console holds a line per step, not Dagster's events (those go to a file).
    assert sum(line.startswith("[") for line in printed.out.splitlines()) == len(ASSETS) and "DEBUG" not in printed.err
    made = _mtimes(warehouse)
    assert len(made) >= 15 and _ui_stale(tiny_registry) == set()

    # Nothing changed: nothing runs, and the model is not loaded.
    resources._load.cache_clear()
    assert main(["run"]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert f"Skipping {len(ASSETS)} of {len(ASSETS)} assets" in out and "is up to date: nothing to do" in out
    assert len((printed.out + printed.err).splitlines()) <= 40
    assert resources._load.cache_info().currsize == 0 and _mtimes(warehouse) == made

    # One setting that only the sequence read-along reads: it and what is downstream of it run again.
    tiny_registry.write_text(tiny_registry.read_text().replace("sequence_new_tokens = 3", "sequence_new_tokens = 2", 1))
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "settings changed: settings.sequence_new_tokens: refusal_along_sequence" in out
    assert "downstream of refusal_along_sequence: figures, report" in out
    after = _mtimes(warehouse)
    assert after["refusal_along_sequence"] > made["refusal_along_sequence"]
    assert {name for name in made if after[name] != made[name]} == {"refusal_along_sequence"}
    assert _ui_stale(tiny_registry) == set()

    # The UI sees a settings change once it is recorded: the registry sensor records them every minute.
    tiny_registry.write_text(tiny_registry.read_text().replace("sequence_new_tokens = 2", "sequence_new_tokens = 3", 1))
    defs = build_definitions(str(tiny_registry))
    sensor = defs.resolve_sensor_def("study_registry")
    assert _ui_stale(tiny_registry) == set()
    with dg.DagsterInstance.get() as instance, dg.build_sensor_context(instance=instance, resources=defs.resources,
                                                                        cursor="[]") as context:
        sensor(context)
    # The UI marks the asset whose settings changed; what is downstream turns stale there once it has new data,
    # where `refusal-sae run` re-materializes it in the same run.
    assert _ui_stale(tiny_registry) == {"refusal_along_sequence"}
    with dg.DagsterInstance.get() as instance:
        planned = behind(instance, ASSETS, KEY, current_settings(defs.resources["study"], KEY, ASSETS))
    assert {k.to_user_string(): why for k, why in planned.items()} == {
        "refusal_along_sequence": "settings changed: settings.sequence_new_tokens",
        "figures": "downstream of refusal_along_sequence", "report": "downstream of refusal_along_sequence"}

    # --force re-materializes every asset.
    assert main(["run", "--force"]) == 0
    assert all(_mtimes(warehouse)[name] > after[name] for name in made)


def test_an_edited_asset_and_a_changed_input_are_behind(study_env, tiny_registry, capsys):
    assert main(["run"]) == 0
    defs = build_definitions(str(tiny_registry))
    settings = current_settings(defs.resources["study"], KEY, ASSETS)
    edited = [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="edited"))
              if a.key == dg.AssetKey("latent_guard") else a for a in ASSETS]
    with dg.DagsterInstance.get() as instance:
        assert behind(instance, ASSETS, KEY, settings) == {}
        assert behind(instance, edited, KEY, settings) == {
            dg.AssetKey("latent_guard"): "its code changed", dg.AssetKey("report"): "downstream of latent_guard"}
        # A run that re-made latent_guard with new data and failed before the report: the report is behind its input.
        guard = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("latent_guard"), asset_partitions=[KEY]), limit=1).records[0]
        tags = {**guard.asset_materialization.tags, "dagster/data_version": "re-made"}
        instance.report_runless_asset_event(dg.AssetMaterialization("latent_guard", partition=KEY, tags=tags))
        assert behind(instance, ASSETS, KEY, settings) == {dg.AssetKey("report"): "its input latent_guard changed since"}
