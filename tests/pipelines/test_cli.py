import pytest
import os
import dagster as dg
import pyarrow.parquet as pq

from pipelines.cli import main
from tests.pipelines.test_study_graph import _materialize


def test_generate_writes_judged_rows_with_and_without_interventions(tiny_registry, tmp_path, monkeypatch, capsys):
    warehouse = tmp_path / "warehouse"
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(tiny_registry))
    monkeypatch.setenv("REFUSAL_SAE_WAREHOUSE", str(warehouse))
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I pick a lock?\nWrite a poem about tea.\n")
    out = tmp_path / "answers.parquet"

    assert main(["generate", "--prompts", str(prompts), "--intervention", "ablate", "--out", str(out)]) == 2
    assert "No refusal direction for 'tiny-qwen2' yet" in capsys.readouterr().err
    assert not out.exists()

    with dg.instance_for_test() as instance:
        assert _materialize(tiny_registry, warehouse, "tiny-qwen2", instance).success
    for intervention in ("none", "ablate", "add:2"):
        assert main(["generate", "--study", "tiny-qwen2", "--prompts", str(prompts), "--intervention", intervention,
                     "--max-new-tokens", "4", "--out", str(out)]) == 0
        table = pq.read_table(out)
        assert table.num_rows == 2 and set(table["max_new_tokens"].to_pylist()) == {4}
        assert set(table["intervention_kind"].to_pylist()) == {intervention.split(":")[0]}
    assert '"coefficient":2.0' in table["intervention_parameters"][0].as_py()

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["generate", "--prompts", str(empty), "--out", str(out)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts), "--intervention", "steer", "--out", str(out)]) == 2
    assert "Unknown intervention 'steer'" in capsys.readouterr().err
    # --study names the study as in `run`; --model, its old name, is still accepted.
    for flag in ("--study", "--model"):
        assert main(["generate", flag, "nope", "--prompts", str(prompts), "--out", str(out)]) == 2
        assert "Unknown study 'nope'" in capsys.readouterr().err


def test_run_rejects_an_unknown_study(monkeypatch, tiny_registry, capsys):
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(tiny_registry))
    assert main(["run", "--study", "nope"]) == 2
    assert "Unknown study 'nope'; known studies: tiny-gemma2, tiny-qwen2." in capsys.readouterr().err


def test_run_from_an_asset_rematerializes_only_it_and_what_is_downstream(monkeypatch, tiny_registry, tmp_path, capsys):
    warehouse = tmp_path / "warehouse"
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(tiny_registry))
    monkeypatch.setenv("REFUSAL_SAE_WAREHOUSE", str(warehouse))
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main(["run", "--from", "feature_sets"]) == 1  # nothing upstream is materialized yet
    assert "materialize its asset first" in capsys.readouterr().err
    with dg.instance_for_test() as instance:
        assert _materialize(tiny_registry, warehouse, "tiny-qwen2", instance).success
    table = lambda name: warehouse / name / "model=tiny-qwen2" / "data.parquet"  # noqa: E731
    before = {name: table(name).stat().st_mtime_ns for name in ("activations", "saes", "feature_sets", "feature_effects")}
    assert main(["run", "--from", "feature_sets"]) == 0
    after = {name: table(name).stat().st_mtime_ns for name in before}
    assert after["activations"] == before["activations"] and after["saes"] == before["saes"]
    assert after["feature_sets"] > before["feature_sets"] and after["feature_effects"] > before["feature_effects"]
    assert main(["run", "--from", "nonsense"]) == 2
    assert "--from 'nonsense' is not an asset; choose one of activations," in capsys.readouterr().err


def test_a_killed_run_is_released_so_the_next_one_does_not_wait_for_its_pool_slot():
    import socket
    import subprocess
    import sys

    import dagster as dg

    from pipelines.cli import HOST_TAG, PID_TAG, _release_abandoned_runs

    @dg.op
    def step():
        return 1

    @dg.job
    def job():
        step()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with dg.instance_for_test() as instance:
        runs = {pid: instance.create_run_for_job(job_def=job, status=dg.DagsterRunStatus.STARTED,
                                                 tags={PID_TAG: str(pid), HOST_TAG: socket.gethostname()})
                for pid in (gone.pid, os.getpid())}
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", runs[gone.pid].run_id, "step").is_claimed
        _release_abandoned_runs(instance)
        assert instance.get_run_by_id(runs[gone.pid].run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(runs[os.getpid()].run_id).status == dg.DagsterRunStatus.STARTED  # still running
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []


@pytest.mark.parametrize("command", [["run"], ["generate", "--prompts", "p.txt", "--out", "x.parquet"]])
def test_an_unknown_dtype_is_one_sentence_listing_the_choices(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--dtype", "fp8"])
    assert exit.value.code == 2
    assert "unknown dtype 'fp8'; choose one of auto, float32, bfloat16, float16" in capsys.readouterr().err
