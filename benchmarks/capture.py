"""Benchmark: activation capture in bfloat16 and float32, against a plain Hugging Face forward on the same batches.

    python -m benchmarks.capture                 # the default study, 32 test prompts, the study's batch size
    python -m benchmarks.capture --loads         # also the first load (dequantizing the GGUF) and a later one

Each phase (capture or plain forward, in each dtype) runs in its own process, so that its peak memory is its own,
and times one pass over all the prompts after a warm-up pass; the phases take turns, `--rounds` times, and the
median of the rounds during which other processes left the CPUs alone counts (`common.QUIET`). The baseline is
`model(**inputs, output_hidden_states=True)` on exactly the batches `capture` uses, keeping the same positions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (DTYPES, eval_prompts, load, peak_rss_gib, peaks, peaks_text, ratio_line, reset_peaks,
                               run_phase, run_rounds, runs_text, timed)
from pipelines import paths
from refusal_core.activations import capture, length_batches, tokenize_batch
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.models import load_model
from refusal_core.registry import load_registry, with_dtype

PHASES = [f"{kind}:{dtype}" for kind in ("capture", "plain") for dtype in DTYPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="Registry key (default: the registry's default).")
    parser.add_argument("--prompts", type=int, default=32, help="Number of test prompts (harmful and harmless).")
    parser.add_argument("--batch-size", type=int, help="Default: the study's.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Times every phase runs; the median of the quiet ones counts.")
    parser.add_argument("--loads", action="store_true", help="Also time the first load (dequantizing) and a later one.")
    parser.add_argument("--random-weights", type=Path,
                        help="Skip loading: random weights shaped by the config in this model folder (same speed).")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    registry = load_registry(paths.registry_path())
    study = registry.get(args.study or registry.default)
    args.batch_size = args.batch_size or study.settings.batch_size
    if args.phase:
        print(json.dumps(_phase(args, study)))
        return
    options = ["--study", study.key, "--prompts", str(args.prompts), "--batch-size", str(args.batch_size)]
    options += ["--random-weights", str(args.random_weights)] if args.random_weights else []
    loads = _loads(study, options) if args.loads else {}
    results = run_rounds("benchmarks.capture", options, PHASES, args.rounds)
    print(f"\nstudy {study.key}, device {results[PHASES[0]]['device']}, {args.prompts} prompts, "
          f"batch {args.batch_size}, all layers, {args.rounds} rounds")
    for phase, r in loads.items():
        print(f"  {phase:16} {r['load_seconds']:7.1f} s   peak RSS {r['peak_rss_gib']:.2f} GiB")
    for phase, r in results.items():
        print(f"  {phase:16} {r['seconds']:7.2f} s   {r['prompts'] / r['seconds']:7.1f} prompts/s   "
              f"{peaks_text(r)}   load {r['load_seconds']:.1f} s   {runs_text(r)}")
    speed = {phase: r["prompts"] / r["seconds"] for phase, r in results.items()}
    print(ratio_line("capture bfloat16 / capture float32", speed["capture:bfloat16"] / speed["capture:float32"], 3))
    print(ratio_line("capture bfloat16 / plain forward bfloat16", speed["capture:bfloat16"] / speed["plain:bfloat16"]))
    print(ratio_line("capture float32 / plain forward float32", speed["capture:float32"] / speed["plain:float32"]))
    print(ratio_line("plain bfloat16 / plain float32", speed["plain:bfloat16"] / speed["plain:float32"]))


def _loads(study, options: list[str]) -> dict:
    """The first load from a cache holding only the downloaded GGUF (it dequantizes), then a later one (safetensors)."""
    load_model(with_dtype(study, "float32"), paths.cache_dir(), "cpu")  # make sure the download exists
    with tempfile.TemporaryDirectory() as cold_cache:
        shutil.copytree(paths.cache_dir() / "downloads", Path(cold_cache) / "downloads", symlinks=True,
                        copy_function=os.link)
        return {phase: run_phase("benchmarks.capture", [*options, "--phase", phase, "--cache", cold_cache])
                for phase in ("first_load", "later_load")}


def _phase(args: argparse.Namespace, study) -> dict:
    kind, _, dtype = args.phase.partition(":")
    started = time.perf_counter()
    if kind.endswith("_load"):
        load_model(study, Path(args.cache))
        return {"load_seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib()}
    loaded = load(study, dtype, args.random_weights)
    load_seconds = time.perf_counter() - started
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [format_prompt(tokenizer, p.text, study.chat_template) for p in eval_prompts(args.prompts)]
    suffix = post_instruction_tokens(tokenizer, study.chat_template)
    layers = list(range(loaded.n_layers))

    def product() -> None:
        for _ in capture(model, tokenizer, texts, layers, suffix, args.batch_size, progress=False):
            pass

    def plain() -> None:
        for indices in length_batches(tokenizer, texts, args.batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in indices], loaded.device)
            with torch.inference_mode():
                hidden = model(**inputs, output_hidden_states=True).hidden_states
            torch.stack([h[:, -len(suffix) - 1:] for h in hidden[1:]], dim=1).float().cpu()  # what capture keeps

    run = product if kind == "capture" else plain
    run()  # warm-up
    reset_peaks(loaded.device)
    _, timing = timed(run, loaded.device)
    return {**timing, "prompts": len(texts), "load_seconds": load_seconds, **peaks(loaded.device),
            "device": str(loaded.device)}


if __name__ == "__main__":
    main()
