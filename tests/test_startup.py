"""Commands outside `run` import only what they use: never Dagster or sae-lens, and torch only to run a model."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from pipelines.definitions import build_definitions, study_job
from pipelines.partitions import studies
from tests.conftest import local_entry, write_registry

KEY = "tiny-qwen2"
REPOSITORY = Path(__file__).resolve().parent.parent
HEAVY = {"dagster", "sae_lens", "torch", "transformers", "pandas"}
"""The packages watched: sql, query, lineage and studies run no pipeline, SAE or model,
make no data frame: import none."""
JUDGE = HEAVY - {"pandas"}
"""What judge must not import: it builds its verdict table from Python lists, and pyarrow imports pandas (when it is
installed) on the first such conversion, to recognise pandas' missing values."""
GENERATE = {"dagster", "sae_lens"}
"""What generate must not import: it runs the model, but no pipeline and, for none, ablate or add, no SAE."""


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory) -> Path:
    """A folder with a tiny study's registry, a prompt file, and a warehouse holding refusal_directions and its inputs."""
    root = tmp_path_factory.mktemp("startup")
    registry = write_registry(root / "studies.toml", {KEY: local_entry(KEY, tiny_models["qwen2"])}, KEY)
    defs = build_definitions(str(registry), str(root / "warehouse"), str(root / "cache"), "cpu")
    needed = dg.AssetSelection.assets("refusal_directions").upstream().materializable()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(studies.name, [KEY])
        result = defs.resolve_job_def(study_job.name).execute_in_process(
            partition_key=KEY, instance=instance, asset_selection=sorted(needed.resolve(defs.resolve_asset_graph()), key=str))
    assert result.success
    (root / "prompts.txt").write_text("How do I pick a lock?\nWrite a poem about tea.\n")
    (root / "answers.jsonl").write_text('{"prompt": "Pick a lock?", "answer": "I cannot help."}\n')
    return root


def _command(root: Path, argv: list[str]) -> tuple[str, set[str]]:
    """What `refusal-sae ARGV` prints, run in a fresh interpreter, and which of HEAVY it imported."""
    script = ("import sys\nfrom pipelines.cli import main\ncode = main(sys.argv[1:])\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}))\nsys.exit(code)")
    env = {**os.environ, "REFUSAL_SAE_REGISTRY": str(root / "studies.toml"), "REFUSAL_SAE_WAREHOUSE": str(root / "warehouse"),
           "REFUSAL_SAE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    *printed, modules = done.stdout.rstrip("\n").split("\n")
    return "\n".join(printed), {m.split(".")[0] for m in ast.literal_eval(modules)}


@pytest.mark.parametrize(("argv", "shows", "forbidden"), [
    (["sql", "SELECT label, count(*) AS n FROM prompts GROUP BY ALL ORDER BY ALL"], "over_refusal", HEAVY),
    (["query"], "main_table", HEAVY),
    (["lineage", "refusal_directions", "--study", KEY], "refusal_directions  sha256", HEAVY),
    (["studies"], KEY, HEAVY),
    (["generate", "--intervention", "ablate"], "Wrote 2 judged answers", GENERATE),
    (["generate", "--intervention", "none"], "Wrote 2 judged answers", GENERATE),
    (["judge", "--prompt-column", "prompt", "--answer-column", "answer"], "1 answer(s) judged by substring, 1 refused", JUDGE),
], ids=["sql", "query", "lineage", "studies", "generate-ablate", "generate-none", "judge"])
def test_command_imports_only_what_it_uses(study, argv, shows, forbidden):
    if argv[0] == "judge":
        argv = [*argv, "--in", str(study / "answers.jsonl"), "--out", str(study / "verdicts.parquet")]
    if argv[0] == "generate":
        argv = [*argv, "--prompts", str(study / "prompts.txt"), "--max-new-tokens", "2",
                "--out", str(study / "answers.parquet")]
    printed, imported = _command(study, argv)
    assert shows in printed
    assert not imported & forbidden, f"refusal-sae {argv[0]} imported {sorted(imported & forbidden)}"
    if argv[0] == "generate":
        assert pq.read_table(study / "answers.parquet").num_rows == 2
