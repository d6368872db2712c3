import json
import shutil
from dataclasses import replace

from refusal_core.lineage import (PROJECT_PACKAGES, PROJECT_ROOT, LineageRecord, code_files, code_version, settings_read,
                                  settings_values, settings_version)
from refusal_core.registry import Study
from refusal_core.tables import TABLES


def _copy_project(tmp_path):
    for package in PROJECT_PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _versions(root, modules):
    return {module: code_version(module, root=root) for module in modules}


def test_an_edit_changes_the_code_version_of_exactly_the_modules_that_import_it(tmp_path):
    root = _copy_project(tmp_path)
    modules = sorted(f"assets.{p.stem}" for p in (root / "assets").glob("*.py") if p.stem != "__init__")
    before = _versions(root, modules)
    assert before == _versions(PROJECT_ROOT, modules)  # the hash is over contents, not where they live
    importers = {m for m in modules if "refusal_core.probes" in _imported(root, m)}
    assert "assets.probes" in importers and "assets.prompts" not in importers

    with open(root / "refusal_core" / "probes.py", "a") as source:
        source.write("\n# an edit\n")
    after = _versions(root, modules)
    assert {m for m in modules if after[m] != before[m]} == importers

    (root / "warehouse" / "queries.sql").write_text((root / "warehouse" / "queries.sql").read_text() + "\n")
    again = _versions(root, modules)
    assert {m for m in modules if again[m] != after[m]} == {"assets.figures", "assets.report"}

    # The schema module counts as each asset's own catalogue entry (see the next test), not as a file.
    with open(root / "refusal_core" / "tables.py", "a") as source:
        source.write("\n# an edit\n")
    assert _versions(root, modules) == again


def test_the_catalogue_entry_of_its_table_is_part_of_an_assets_code_version():
    saes, prompts = TABLES["saes"], TABLES["prompts"]
    assert code_version("assets.saes", replace(saes, version=2)) != code_version("assets.saes", saes)
    assert code_version("assets.saes", saes) != code_version("assets.saes", replace(saes, description="Other."))
    assert code_version("assets.prompts", prompts) != code_version("assets.prompts", replace(prompts, schema=saes.schema))


def test_the_record_carries_package_versions():
    record = LineageRecord("t", "s", "p", "0" * 64, 1, code_version="abc", device="cpu", dtype="torch.float32")
    packages = json.loads(record.package_versions)
    assert set(packages) == {"refusal-sae", "torch", "transformers", "sae-lens", "dagster"}
    assert packages["torch"].startswith("2.")
    row = record.table().to_pylist()[0]
    assert row["device"] == "cpu" and row["dtype"] == "torch.float32" and row["code_version"] == "abc"


def _imported(root, module):
    return {p.relative_to(root).with_suffix("").as_posix().replace("/", ".") for p in code_files(module, root)}


def test_settings_read_are_the_registry_fields_an_assets_code_names():
    sequence, clamping = settings_read("assets.sequence"), settings_read("assets.clamping")
    assert "settings.sequence_new_tokens" in sequence and "settings.clamp_multiplier" not in sequence
    assert {"settings.clamp_multiplier", "settings.induce_multiplier", "saes", "weights", "dtype"} <= set(clamping)
    assert "settings.sequence_new_tokens" not in clamping
    assert not {"key", "description", "network", "settings"} & set(sequence)  # no table depends on these


def test_settings_values_resolve_the_dtype_and_hash_stably():
    study = Study.model_validate({"key": "s", "weights": {"kind": "local", "path": "/m"}, "settings": {"seed": 3}})
    values = settings_values(study, ("dtype", "saes", "settings.seed"), "torch.bfloat16")
    assert values == {"dtype": "torch.bfloat16", "saes": study.saes.model_dump(mode="json"), "settings.seed": 3}
    assert settings_version(values) == settings_version(dict(reversed(values.items())))
    assert settings_version(values) != settings_version({**values, "settings.seed": 4})
