"""Benchmark: `refusal-sae generate` as a whole process, against a plain float32 Hugging Face script doing the same.

    python -m benchmarks.startup                  # the default study, 40 test prompts, median of 3 runs each
    python -m benchmarks.startup --runs 5

Both commands answer the same prompt file greedily with the study's number of new tokens and batch size, from the
same cached safetensors folder: `refusal-sae generate --intervention none` (the study's dtype, shared system prompt
run once, answers judged and written to Parquet) and `benchmarks/plain_generate.py` (float32, `model.generate`, the
chat template, the file's order). Each is timed by wall clock from start to exit, imports and loading included,
after one warm-up run of each; they run in turn, so that a drift of the machine's speed affects both alike, and the
median of the runs during which other processes left the CPUs alone counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import eval_prompts, median_quiet, ratio_line, runs_text, timed
from pipelines import paths
from refusal_core.registry import LocalWeights, PypiGgufWeights, Study, load_registry

PLAIN_SCRIPT = Path(__file__).with_name("plain_generate.py")
CLI = Path(sys.executable).with_name("refusal-sae")
"""The installed command (`pip install -e .` puts it beside the interpreter)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="Registry key (default: the registry's default).")
    parser.add_argument("--prompts", type=int, default=40, help="Number of test prompts (harmful and harmless).")
    parser.add_argument("--runs", type=int, default=3,
                        help="Timed runs of each command; the median of the quiet ones counts.")
    args = parser.parse_args()
    if not CLI.exists():
        raise SystemExit(f"{CLI} is not installed; run `pip install -e .` in this environment first.")
    registry = load_registry(paths.registry_path())
    study = registry.get(args.study or registry.default)
    settings = study.settings
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("".join(" ".join(p.text.split()) + "\n" for p in eval_prompts(args.prompts)))
        product = [str(CLI), "generate", "--study", study.key, "--prompts", str(prompts), "--intervention", "none",
                   "--out", str(folder / "answers.parquet")]
        _run(product)  # warm-up; it also caches the weights as safetensors if they were not yet
        plain = [sys.executable, str(PLAIN_SCRIPT), str(weights_folder(study)), str(prompts),
                 str(folder / "answers.jsonl"), "--max-new-tokens", str(settings.max_new_tokens),
                 "--batch-size", str(settings.batch_size)]
        _run(plain)  # warm-up
        runs = {"refusal-sae generate": [], "plain float32 script": []}
        for _ in range(args.runs):
            runs["refusal-sae generate"].append(timed(lambda: _run(product), children=True)[1])
            runs["plain float32 script"].append(timed(lambda: _run(plain), children=True)[1])
        ours = pq.read_table(folder / "answers.parquet")["completion"].to_pylist()
        theirs = [json.loads(line)["completion"] for line in (folder / "answers.jsonl").read_text().splitlines()]
    print(f"\nstudy {study.key}, {len(ours)} prompts, {settings.max_new_tokens} new tokens, "
          f"batch {settings.batch_size}, {args.runs} whole-process runs each")
    results = {name: median_quiet(timings) for name, timings in runs.items()}
    for name, r in results.items():
        print(f"  {name:22} {r['seconds']:6.1f} s   {runs_text(r)}")
    print(ratio_line("refusal-sae generate / plain float32 script",
                     results["plain float32 script"]["seconds"] / results["refusal-sae generate"]["seconds"], 2))
    print(f"  identical answers: {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}")


def weights_folder(study: Study) -> Path:
    """The save_pretrained folder `load_model` reads the study's weights from: a GGUF's cache, or a local folder."""
    weights = study.weights
    if isinstance(weights, LocalWeights):
        return weights.path
    if isinstance(weights, PypiGgufWeights):
        return paths.cache_dir() / "models" / weights.sha256[:16]
    raise ValueError(f"Study {study.key!r} has {weights.kind} weights; this benchmark needs a GGUF from PyPI or a "
                     "local folder, whose safetensors both commands can load.")


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")


if __name__ == "__main__":
    main()
