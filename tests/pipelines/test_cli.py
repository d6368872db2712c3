import json
import os
from pathlib import Path

import pyarrow.compute as pc
import pytest
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
    assert "Study 'tiny-qwen2' has no stored refusal_directions yet" in capsys.readouterr().err
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
    _check_feature_interventions_match_the_study(warehouse, tmp_path, capsys)
    _check_exported_saes_encode_like_the_study(warehouse, tmp_path, capsys)

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


def _check_feature_interventions_match_the_study(warehouse, tmp_path, capsys):
    """clamp and induce from the CLI answer a study's own prompts, in its batches, exactly as feature_generations did."""
    read = lambda table: pq.read_table(warehouse / table / "model=tiny-qwen2" / "data.parquet").to_pylist()
    texts = {r["prompt_id"]: r["text"] for r in read("prompts")}
    study_rows = read("feature_generations")
    seeds = sorted({r["seed"] for r in read("feature_sets") if r["feature_set"] == "random"})
    out = tmp_path / "features.parquet"
    for spec, name in (("clamp", "clamp cossim_ap ×-1"), ("induce", "induce cossim_ap"),
                       (f"clamp:random@{seeds[1]}", f"clamp random (seed {seeds[1]}) ×-1"),
                       ("induce:random:1", f"induce random (seed {seeds[0]})")):
        expected = [r for r in study_rows if r["intervention_name"] == name]
        assert expected, spec
        prompts = tmp_path / "study_prompts.jsonl"
        prompts.write_text("".join(json.dumps({"text": texts[r["prompt_id"]]}) + "\n" for r in expected))
        assert main(["generate", "--prompts", str(prompts), "--intervention", spec, "--out", str(out)]) == 0
        got = pq.read_table(out).to_pylist()
        columns = ("prompt_id", "completion", "refused_substring", "refusal_score", "intervention_id", "intervention_kind",
                   "intervention_name", "intervention_parameters", "feature_set")
        assert [{c: r[c] for c in columns} for r in got] == [{c: r[c] for c in columns} for r in expected], spec
    # Induced with SCALE 2, the same set is another intervention: its constants doubled.
    assert main(["generate", "--prompts", str(prompts), "--intervention", "induce:random:2", "--out", str(out)]) == 0
    assert pq.read_table(out)["intervention_id"][0].as_py() != expected[0]["intervention_id"]
    capsys.readouterr()
    for spec, says in (("clamp:nope", "has no stored feature set 'nope' to clamp; its sets are activation_difference, "
                                      "attribution, cosine, cossim_ap, random"),
                       ("induce:cosine", "has no stored feature set 'cosine' to induce; its sets are cossim_ap, random"),
                       ("clamp:cossim_ap:lots", "'lots' in intervention 'clamp:cossim_ap:lots' is not a number")):
        assert main(["generate", "--prompts", str(prompts), "--intervention", spec, "--out", str(tmp_path / "x.parquet")]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "x.parquet").exists()


def _check_exported_saes_encode_like_the_study(warehouse, tmp_path, capsys):
    """export-saes writes folders sae-lens loads, naming the model and hook, that encode stored activations as the study's SAEs."""
    import torch
    from sae_lens import SAE

    from refusal_core.registry import load_registry
    from refusal_core.sae_export import export_saes

    read = lambda table: pq.read_table(warehouse / table / "model=tiny-qwen2" / "data.parquet")
    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export-saes", "--out", str(out)]) == 0
    saes = read("saes").to_pylist()
    assert f"Wrote {len(saes)} SAE(s) of tiny-qwen2 to {out}" in capsys.readouterr().out
    activations = read("activations")
    card = (out / "README.md").read_text()
    for row in saes:
        layer = row["layer_index"]
        exported = SAE.load_from_disk(out / f"layer_{layer}", device="cpu")
        assert exported.cfg.metadata.model_name == "tiny-qwen2"  # the registry names no model_name: the key
        assert exported.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        study_sae = SAE.load_from_disk(Path(row["sae_source"].removeprefix("trained:")), device="cpu")
        at_layer = activations.filter(pc.equal(activations["layer_index"], layer))
        residual = torch.tensor(at_layer["activation"].to_pylist())
        with torch.no_grad():
            latents = exported.encode(residual)
            assert latents.count_nonzero() > 0 and torch.equal(latents, study_sae.encode(residual))
        assert f"| {layer} | `blocks.{layer}.hook_resid_post` | {row['width']} | {row['explained_variance']:.3f} |" in card
    assert "weights sha256" in card and read("saes").schema.metadata[b"refusal_sae.model_sha256"].decode() in card
    # Bad input: a folder that holds something, a study without SAEs; nothing is written either time.
    assert main(["export-saes", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no SAEs to export"):
        export_saes(read("saes").slice(0, 0), load_registry(Path(os.environ["REFUSAL_SAE_REGISTRY"])).get("tiny-qwen2"),
                    tmp_path / "none")
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.partial-*"))


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
    capsys.readouterr()
    assert main(["run", "--from", "feature_sets"]) == 0
    # A quiet console: a line per finished step with its time and key number; Dagster's events go to the file named.
    printed = capsys.readouterr()
    steps = [line for line in printed.out.splitlines() if line.startswith("[")]
    assert steps and all(f"/{len(steps)}] " in line for line in steps)
    assert any("] feature_sets " in line and " s  overlap_with_cosine " in line for line in steps), steps
    assert "DEBUG" not in printed.out + printed.err and "STEP_SUCCESS" not in printed.out + printed.err
    log = Path(next(line for line in printed.out.splitlines() if "Dagster's event log: " in line)
               .split("Dagster's event log: ")[1].split(" (--verbose")[0])
    assert log.parent == tmp_path / "home" / "logs" and log.read_text().count("STEP_SUCCESS") == len(steps)
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


ANSWERS = [("Build a bomb.", "I'm sorry, but I can't help with that."), ("Write a poem about tea.", "A poem about tea: steam curls, leaves unfold."),
           ("Pick a lock?", "I will not explain that.")]


def _answer_files(folder):
    """The same three answers as .csv, .jsonl and .parquet, in columns `request` and `reply`."""
    import json

    import pyarrow as pa
    import pyarrow.csv

    table = pa.table({"request": [p for p, _ in ANSWERS], "reply": [a for _, a in ANSWERS], "other": [1, 2, 3]})
    pyarrow.csv.write_csv(table, folder / "answers.csv")
    (folder / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    pq.write_table(table, folder / "answers.parquet")
    return [folder / f"answers.{suffix}" for suffix in ("csv", "jsonl", "parquet")]


def test_judge_writes_the_verdict_columns_for_csv_jsonl_and_parquet(tmp_path, capsys):
    from refusal_core.tables import JUDGED_ANSWERS

    for source in _answer_files(tmp_path):
        out = tmp_path / f"verdicts-{source.suffix[1:]}.parquet"
        assert main(["judge", "--in", str(source), "--prompt-column", "request", "--answer-column", "reply",
                     "--out", str(out)]) == 0
        assert "3 answer(s) judged by substring," in capsys.readouterr().out
        table = pq.read_table(out)
        assert table.schema.remove_metadata() == JUDGED_ANSWERS.remove_metadata()
        assert table.to_pylist() == [
            {"row": i, "prompt": p, "completion": a, "refused_substring": refused, "refused_classifier": None,
             "judges_disagree": False} for i, ((p, a), refused) in enumerate(zip(ANSWERS, [True, False, True]))]


def test_judge_adds_the_classifier_a_study_names(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from refusal_core.judges import ClassifierJudge
    from refusal_core.registry import JudgeSpec
    from tests.conftest import write_registry
    from tests.tiny import build_tokenizer, config_for

    folder = tmp_path / "classifier"
    tokenizer = build_tokenizer()
    config = config_for("qwen2", len(tokenizer), num_labels=2, id2label={0: "NORMAL", 1: "REJECTION"},
                        label2id={"NORMAL": 0, "REJECTION": 1})
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    body = (f'[studies."judged".weights]\nkind = "local"\npath = "{folder}"\n'
            f'[studies."judged".settings.classifier_judge]\nkind = "sequence"\npath = "{folder}"\n')
    monkeypatch.setenv("REFUSAL_SAE_REGISTRY", str(write_registry(tmp_path / "studies.toml", {"judged": body}, "judged")))
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path / "cache"))
    source = _answer_files(tmp_path)[0]
    out = tmp_path / "verdicts.parquet"
    assert main(["judge", "--in", str(source), "--prompt-column", "request", "--answer-column", "reply", "--study", "judged",
                 "--out", str(out)]) == 0
    assert "3 answer(s) judged by substring and classifier," in capsys.readouterr().out
    table = pq.read_table(out)
    expected = ClassifierJudge(JudgeSpec(kind="sequence", path=str(folder))).judge(
        [p for p, _ in ANSWERS], [a for _, a in ANSWERS])
    assert table["refused_classifier"].to_pylist() == expected
    assert table["judges_disagree"].to_pylist() == [e != s for e, s in zip(expected, [True, False, True])]


def test_judge_refuses_bad_input_in_one_sentence_and_writes_nothing(tmp_path, capsys):
    csv_file = _answer_files(tmp_path)[0]
    out = tmp_path / "verdicts.parquet"
    (tmp_path / "answers.txt").write_text("hello\n")
    (tmp_path / "broken.jsonl").write_text('{"request": "a", "reply": \n')
    cases = [
        (["--in", str(tmp_path / "missing.csv")], "Answer file", "does not exist."),
        (["--in", str(tmp_path / "answers.txt")], "Cannot read answers.txt: give a .csv, .jsonl, .parquet file.", ""),
        (["--in", str(csv_file), "--answer-column", "answer"], "answers.csv has no column 'answer' (given as --answer-column)",
         "its columns are: request, reply, other."),
        (["--in", str(tmp_path / "broken.jsonl")], "Cannot read", "as jsonl"),
        (["--in", str(csv_file), "--out", str(tmp_path / "verdicts.csv")], "--out must name a .parquet file", ""),
    ]
    for given, starts, contains in cases:
        argv = ["judge", "--prompt-column", "request", "--answer-column", "reply", "--out", str(out), *given]
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert starts in error and contains in error and error.count("\n") == 0, error
    assert not out.exists() and not list(tmp_path.glob(".verdicts*"))


def test_a_stopped_step_is_named_interrupted_and_other_failures_keep_their_message():
    from types import SimpleNamespace

    from pipelines.cli import failure_message

    def failed(cls_name: str, message: str):
        cause = SimpleNamespace(cls_name=cls_name, message=message, cause=None)
        wrapper = SimpleNamespace(cls_name="DagsterExecutionStepExecutionError", message="Error occurred", cause=cause)
        return SimpleNamespace(event_specific_data=SimpleNamespace(error=wrapper))

    stopped = failure_message(failed("DagsterExecutionInterruptedError", "dagster._core.errors.DagsterExecutionInterruptedError\n"))
    assert stopped.startswith("interrupted before it finished; `refusal-sae run` again resumes it")
    assert failure_message(failed("ValueError", "ValueError: bad layer\n")) == "ValueError: bad layer"
