"""A long step killed mid-way resumes from its last finished batch and ends with the same table, byte for byte."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from refusal_core import evaluation
from refusal_core.activations import capture_table
from refusal_core.attribution import rank_latents
from refusal_core.checkpoints import Checkpoints, step_checkpoints
from refusal_core.interventions import Ablate
from refusal_core.models import LoadedModel
from refusal_core.parquet import spool, table_sha256
from refusal_core.registry import load_registry
from refusal_core.sequence import read_along_sequence
from refusal_core.study_interventions import judged_interventions
from refusal_core.tables import GENERATIONS
from tests.tiny import random_sae

WORDS = ["bread", "rain", "lock", "sea", "tea", "code", "moon", "river", "salt", "glass", "stone", "wind"]


class Interrupted(Exception):
    """Stands for the process being killed."""


def _prompts() -> pa.Table:
    """Harmful, harmless and jailbreak prompts of the test split, of different lengths (so batches are length-sorted), each
    in the eval set named after its label."""
    rows = []
    for i, word in enumerate(WORDS):
        for label, source, method in (("harmful", "harmbench", None), ("harmless", "refusal_sae", None),
                                      ("jailbreak", "phrasing", "past_tense")):
            text = f"{'Please ' * (i % 4)}tell me about {word} as a {label} request" + "!" * (i % 3)
            rows.append({"prompt_id": f"{label}-{i:02d}", "text": text, "label": label, "split": "test",
                         "source": source, "jailbreak_method": method, "eval_set": label})
    return pa.Table.from_pylist(rows)


@pytest.fixture
def loaded(tiny_registry, qwen) -> LoadedModel:
    model, tokenizer = qwen
    return LoadedModel(model, tokenizer, load_registry(tiny_registry).get("tiny-qwen2"), "local:tiny", "0" * 64)


@pytest.fixture
def interrupt_after(monkeypatch):
    """interrupt_after(k): the next runs die after k units are saved (the k+1-th is computed, never written)."""
    saved = Checkpoints.save

    def arm(k: int):
        count = {"saved": 0}

        def save(self, path, result):
            if count["saved"] == k:
                raise Interrupted(f"killed after {k} units")
            saved(self, path, result)
            count["saved"] += 1

        monkeypatch.setattr(Checkpoints, "save", save)
        return lambda: monkeypatch.setattr(Checkpoints, "save", saved)

    return arm


@pytest.fixture
def generation_calls(monkeypatch):
    """How many batches generate_scored answers."""
    calls = []
    real = evaluation.generate_scored
    monkeypatch.setattr(evaluation, "generate_scored", lambda model, tokenizer, prompts, *args, **kwargs: (
        calls.append(len(prompts)), real(model, tokenizer, prompts, *args, **kwargs))[1])
    return calls


def _resumed(run, interrupt_after, k: int, folder: Path):
    """Run `run(checkpoints)` killed after k units, then again to the end; (its result, the resume log)."""
    logs: list[str] = []
    checkpoints = Checkpoints(folder, logs.append)
    disarm = interrupt_after(k)
    with pytest.raises(Interrupted):
        run(checkpoints)
    disarm()
    assert len(list(folder.glob("*.*"))) == k
    result = run(checkpoints)
    assert not folder.exists(), "the checkpoints are deleted once the step is complete"
    return result, logs


def test_interrupted_generations_resume_to_the_same_table(loaded, tmp_path, interrupt_after, generation_calls):
    prompts = _prompts()
    eval_set = prompts.filter(pc.is_in(prompts["label"], pa.array(["harmful", "harmless"]))).slice(0, 10)
    applied = {"baseline": (None, ("harmful", "harmless")), "ablate": (Ablate(torch.randn(64)), ("harmless",))}
    per_intervention = [3, 2]  # 10 prompts in batches of 4, then the 5 harmless ones
    assert loaded.study.settings.batch_size == 4 and eval_set.num_rows == 10

    def run(checkpoints=Checkpoints()):
        return judged_interventions(loaded, eval_set, applied, None, lambda _: None, checkpoints)

    uninterrupted = run()
    generation_calls.clear()
    resumed, logs = _resumed(run, interrupt_after, 4, tmp_path / "checkpoints")
    assert table_sha256(resumed) == table_sha256(uninterrupted)
    assert spool([resumed], GENERATIONS, tmp_path).sha256 == spool([uninterrupted], GENERATIONS, tmp_path).sha256
    # 5 batches until the kill (the 5th lost), then only the last one again.
    assert len(generation_calls) == 5 + 1 == sum(per_intervention) + 1
    assert [line.split(" batches")[0] for line in logs] == ["generate (none): 3 of 3", "generate (ablate direction): 1 of 2"]


def test_interrupted_capture_resumes_to_the_same_spool(loaded, tmp_path, interrupt_after):
    selected = _prompts().slice(0, 11)
    groups = [list(range(0, 6)), list(range(6, 11))]  # two batches each, every group with its own shared prefix

    def run(checkpoints=Checkpoints()):
        return capture_table(loaded, selected, tmp_path / "staging", {"model_sha256": "0" * 64}, {"test": True},
                             groups, checkpoints)[0]

    uninterrupted = run()
    for k in (1, 3):
        resumed, logs = _resumed(run, interrupt_after, k, tmp_path / f"checkpoints-{k}")
        assert (resumed.sha256, resumed.row_count) == (uninterrupted.sha256, uninterrupted.row_count)
        assert resumed.path.read_bytes() == uninterrupted.path.read_bytes()
        assert logs[0].startswith(f"capture activations: {k} of 4 batches were finished by an earlier run")


def test_interrupted_attribution_resumes_to_the_same_ranking(loaded, tmp_path, interrupt_after):
    torch.manual_seed(3)
    sae = {1: random_sae(layer=1)}
    texts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                  tokenize=False) for t in _prompts()["text"].to_pylist()[:11]]
    latents = {1: torch.rand(6, 3, 128)}
    labels = ["harmful", "harmless"] * 3
    direction = torch.randn(64)

    def run(checkpoints=Checkpoints()):
        return rank_latents("m", loaded.model, loaded.tokenizer, sae, direction, latents, labels, texts,
                            [f"p{i}" for i in range(len(texts))], 2, 4, 3, 0, False, checkpoints)

    uninterrupted = run()
    resumed, logs = _resumed(run, interrupt_after, 1, tmp_path / "checkpoints")  # 11 prompts: batches of 8 and 3
    assert torch.equal(resumed.layers[1].attribution, uninterrupted.layers[1].attribution)
    assert table_sha256(resumed.table()) == table_sha256(uninterrupted.table())
    assert logs[0].startswith("attribution patching: 1 of 2 batches")


def test_interrupted_read_along_the_sequence_resumes_to_the_same_table(loaded, tmp_path, interrupt_after):
    direction = torch.randn(64)

    def run(checkpoints=Checkpoints()):
        return read_along_sequence("m", loaded.model, loaded.tokenizer, _prompts(), "tokenizer", direction, 3, 3, 4,
                                   checkpoints).table()

    uninterrupted = run()
    for k in (1, 3):  # 9 prompts: generation batches 3, projection batches 3
        resumed, logs = _resumed(run, interrupt_after, k, tmp_path / f"checkpoints-{k}")
        assert table_sha256(resumed) == table_sha256(uninterrupted)
        assert logs[0].startswith(f"generate (sequence): {min(k, 3)} of 3")


def test_other_inputs_never_read_an_old_checkpoint(loaded, tmp_path, interrupt_after, generation_calls):
    root, step = tmp_path / "checkpoints", ("baseline_generations", "tiny-qwen2")
    first = step_checkpoints(root, step, {"code_version": "a", "model_sha256": "0" * 64})
    assert step_checkpoints(root, step, {"model_sha256": "0" * 64, "code_version": "a"}).folder == first.folder
    eval_set = _prompts().slice(0, 8)
    applied = {"baseline": (None, ("harmful", "harmless", "jailbreak"))}

    disarm = interrupt_after(1)
    with pytest.raises(Interrupted):
        judged_interventions(loaded, eval_set, applied, None, lambda _: None, first)
    disarm()
    assert len(list(first.folder.glob("*.arrow"))) == 1
    # A step keyed by other code (or inputs) gets its own folder; the stale one is deleted.
    other = step_checkpoints(root, step, {"code_version": "b", "model_sha256": "0" * 64})
    assert other.folder != first.folder and not first.folder.exists()
    # Within a folder, a batch of other prompts or settings is a different unit.
    logs = []
    batches = evaluation.batched_generations(loaded.model, loaded.tokenizer, ["a b", "c d"], 3, 4, None,
                                             Checkpoints(tmp_path / "units", logs.append))
    again = evaluation.batched_generations(loaded.model, loaded.tokenizer, ["a b", "c d"], 4, 4, None,
                                           Checkpoints(tmp_path / "units", logs.append))
    assert logs == [] and len(list((tmp_path / "units").glob("*.arrow"))) == 2
    assert batches[1] is None and again[1] is None


CHILD = """
import sys, time
import dagster as dg
from refusal_core import evaluation
from pipelines.definitions import build_definitions, study_job
from pipelines.partitions import studies

real = evaluation.generate_scored
def slow(*args, **kwargs):  # widens the window in which the step is killed; the answers are unchanged
    time.sleep(1.0)
    return real(*args, **kwargs)
evaluation.generate_scored = slow
registry, warehouse, cache, key = sys.argv[1:]
instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions(studies.name, [key])
job = build_definitions(registry, warehouse, cache, "cpu").resolve_job_def(study_job.name)
job.execute_in_process(partition_key=key, instance=instance, asset_selection=[dg.AssetKey("baseline_generations")])
print("finished without being killed")
"""


def _materialize(registry, warehouse, cache, assets):
    from pipelines.definitions import build_definitions, study_job
    from pipelines.partitions import studies

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(studies.name, ["tiny-qwen2"])
        job = build_definitions(str(registry), str(warehouse), str(cache), "cpu").resolve_job_def(study_job.name)
        result = job.execute_in_process(partition_key="tiny-qwen2", instance=instance,
                                        asset_selection=[dg.AssetKey(name) for name in assets])
        assert result.success
        return [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_a_killed_materialization_resumes_and_publishes_the_uninterrupted_table(tiny_registry, tmp_path,
                                                                                 generation_calls):
    cache = tmp_path / "cache"
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _materialize(tiny_registry, whole, cache, ["prompts", "baseline_generations"])
    batches = len(generation_calls)  # 3 prompts of each of the 6 eval sets (17 or 18 distinct) in batches of 4
    assert batches == 5
    _materialize(tiny_registry, killed, cache, ["prompts"])
    staged = killed / ".staging" / "checkpoints" / "baseline_generations" / "tiny-qwen2"
    with open(tmp_path / "child.log", "wb") as output:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_registry), str(killed), str(cache), "tiny-qwen2"],
                                 stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while not list(staged.glob("*/*.arrow")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    log = (tmp_path / "child.log").read_text()
    assert child.returncode == -signal.SIGKILL and "finished without being killed" not in log, log
    finished = len(list(staged.glob("*/*.arrow")))
    assert 1 <= finished < batches
    assert not (killed / "baseline_generations").exists()

    generation_calls.clear()
    logs = _materialize(tiny_registry, killed, cache, ["baseline_generations"])
    assert len(generation_calls) == batches - finished
    assert any(f"generate (none): {finished} of {batches} batches were finished by an earlier run" in line
               for line in logs), logs
    published = lambda root: (root / "baseline_generations" / "model=tiny-qwen2" / "data.parquet").read_bytes()  # noqa: E731
    assert published(killed) == published(whole)
    assert not (killed / ".staging" / "checkpoints").exists(), "the step's checkpoints are deleted once it is published"
