"""The warehouse on an object store: the whole study, the queries, lineage and report over s3:// (a local S3 server)."""

import os

import dagster as dg
import pytest

from pipelines.cli import failure_message, main
from pipelines.definitions import build_definitions, study_job
from pipelines.partitions import studies
from refusal_core.parquet import file_metadata, read_parquet
from refusal_core.storage import location, scratch_dir, write_atomically
from refusal_core.tables import TABLES
from tests.pipelines.test_study_graph import _materialize
from warehouse.query import connect, named_query

KEY = "tiny-qwen2"
URL = "s3://refusal-sae"  # the whole bucket; the other tests use a prefix in it


def _keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="refusal-sae", Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_whole_study_runs_into_s3_and_reads_back_like_a_local_warehouse(
        object_store, tiny_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(tiny_registry))
    monkeypatch.setenv("REFUSAL_SAE_WAREHOUSE", URL)
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main(["run"]) == 0
    printed = capsys.readouterr().out
    assert f"Report:         {URL}/report/model={KEY}/index.html" in printed

    local = tmp_path / "local"
    with dg.instance_for_test() as instance:
        assert _materialize(tiny_registry, local, KEY, instance).success

    keys = _keys(object_store)
    # Every table, lineage row, figure and report page the local run wrote is in the bucket, and nothing else:
    # no staging spool, no temporary file.
    written = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and ".staging" not in p.parts)
    assert keys == written
    assert not list(scratch_dir().glob(f"*~{os.getpid()}~*"))  # spools and uploads are local, published, then deleted
    tables = [k for k in keys if k.endswith("/data.parquet")]
    assert sorted(k.split("/")[0] for k in tables) == sorted(set(TABLES) - {"lineage"}) and any(k.endswith(".png") for k in keys)
    # The same inputs give the same tables: identical content hashes and rows in both warehouses.
    root = location(URL)
    for key in tables:
        remote, here = root / key, local / key
        assert file_metadata(remote)["refusal_sae.content_sha256"] == file_metadata(here)["refusal_sae.content_sha256"]
    assert read_parquet(root / "feature_effects" / f"model={KEY}" / "data.parquet").replace_schema_metadata(None).equals(
        read_parquet(local / "feature_effects" / f"model={KEY}" / "data.parquet").replace_schema_metadata(None))

    # DuckDB reads the bucket through the same filesystem: the named queries give the local answers.
    for name in ("main_table", "feature_table", "cross_study"):
        with connect(root) as remote, connect(local) as here:
            assert remote.sql(named_query(name)).fetchall() == here.sql(named_query(name)).fetchall() != []

        with connect(root) as remote:  # nor, through the bucket's filesystem, anything outside the warehouse
            with pytest.raises(ValueError, match="The query reads outside the warehouse"):
                remote.sql("SELECT * FROM read_text('/etc/hostname')")
    assert main(["query", "main_table"]) == 0
    shown = capsys.readouterr().out
    assert "│ harmbench " in shown and "│ ablate " in shown
    assert main(["lineage", f"{URL}/intervention_effects/model={KEY}/data.parquet"]) == 0
    chain = capsys.readouterr().out
    assert f"study {KEY}" in chain and "prompts  sha256" in chain and "weights: local:" in chain
    assert main(["lineage", "intervention_effects"]) == 0  # the study found from the bucket's lineage folder
    assert capsys.readouterr().out == chain
    page = (root / "report" / f"model={KEY}" / "index.html").read_text()
    assert f"Refusal study: {KEY}" in page and page.count("data:image/png;base64,") == sum(
        k.startswith(f"figures/model={KEY}/") for k in keys)


def test_an_interrupted_upload_leaves_the_old_object(object_store):
    path = location(URL) / "warehouse" / "t" / "data.bin"
    write_atomically(path, lambda temporary: temporary.write_bytes(b"old"))

    def fail_halfway(temporary):
        temporary.write_bytes(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, fail_halfway)
    assert path.read_bytes() == b"old" and _keys(object_store) == ["warehouse/t/data.bin"]
    assert not list(scratch_dir().glob(f"*~{os.getpid()}~*"))


def test_run_into_a_missing_bucket_says_so_and_starts_nothing(object_store, tiny_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(tiny_registry))
    monkeypatch.setenv("REFUSAL_SAE_WAREHOUSE", "s3://no-such-bucket/warehouse")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main(["run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("refusal-sae: Cannot write to the warehouse s3://no-such-bucket/warehouse (")
    assert "REFUSAL_SAE_WAREHOUSE" in error and len(error.strip().splitlines()) == 1
    assert not list((tmp_path / "home").iterdir())
    for command in (["query", "main_table"], ["lineage", "prompts"]):
        assert main(command) == 2
        assert capsys.readouterr().err.startswith(
            "refusal-sae: Cannot read the warehouse s3://no-such-bucket/warehouse (The specified bucket does not exist)")
    with connect(location("s3://refusal-sae/nothing-yet")) as empty:  # an existing bucket, an unused prefix
        assert empty.sql("SELECT count(*) FROM prompts").fetchall() == [(0,)]


def test_a_run_launched_without_the_cli_names_the_bucket_it_cannot_write(object_store, tiny_registry, tmp_path):
    defs = build_definitions(str(tiny_registry), "s3://no-such-bucket/warehouse", str(tmp_path / "cache"), "cpu")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(studies.name, [KEY])
        result = defs.resolve_job_def(study_job.name).execute_in_process(
            partition_key=KEY, instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("prompts")])
    failure = next(event for event in result.all_events if event.is_step_failure)
    assert failure_message(failure).startswith("OSError: Cannot write prompts to the warehouse s3://no-such-bucket/warehouse (")
    assert not list(scratch_dir().glob(f"*~{os.getpid()}~*"))  # the spool is gone too

