"""Benchmark: judged generation in bfloat16 and float32, unhooked and under interventions, against plain `generate`.

    python -m benchmarks.generation               # the default study, 32 test prompts, the study's batch and length
    python -m benchmarks.generation --prompts 64  # more prompts

Judged generation is the study's own path, `evaluation.judged_generations`: greedy answers, the refusal score
from the first answer step, the judges. The baseline is Hugging Face `model.generate` (greedy, left-padded,
`plain_generate`) on the same prompts in the same batches. Judged generation also runs, in bfloat16, under
directional ablation of a random unit direction and under a clamp of 20 latents of a randomly initialised SAE of
the study's width at its first SAE layer, with the study's multiplier, past its template prefix (what they encode
does not change their cost). Each phase runs in its own
process after a short warm-up, and its peak memory is counted from after loading; the phases take turns,
`--rounds` times, and the median of the rounds during which other processes left the CPUs alone counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import (DTYPES, eval_prompts, load, peaks, peaks_text, ratio_line, reset_peaks, run_rounds,
                               runs_text, timed)
from benchmarks.plain_generate import plain_generate
from pipelines import paths
from refusal_core.activations import length_batches
from refusal_core.chat import format_prompt, instruction_offset
from refusal_core.evaluation import judged_generations
from refusal_core.interventions import Ablate, Clamp, SaeLatents
from refusal_core.registry import load_registry
from refusal_core.scoring import refusal_token_ids

PHASES = [*(f"{kind}:{dtype}" for kind in ("judged", "plain") for dtype in DTYPES), "ablate:bfloat16", "clamp:bfloat16"]
RATIOS = [  # (what, the phase it divides the time of, the phase whose time it is divided by, the goal)
    ("judged bfloat16 / plain generate float32", "plain:float32", "judged:bfloat16", 2.5),
    ("judged bfloat16 / plain generate bfloat16", "plain:bfloat16", "judged:bfloat16", 0.95),
    ("judged float32 / plain generate float32", "plain:float32", "judged:float32", None),
    ("judged bfloat16 / judged float32", "judged:float32", "judged:bfloat16", None),
    ("ablation / unhooked judged (bfloat16)", "judged:bfloat16", "ablate:bfloat16", 0.9),
    ("clamping / unhooked judged (bfloat16)", "judged:bfloat16", "clamp:bfloat16", 0.8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="Registry key (default: the registry's default).")
    parser.add_argument("--prompts", type=int, default=32, help="Number of test prompts (harmful and harmless).")
    parser.add_argument("--batch-size", type=int, help="Default: the study's.")
    parser.add_argument("--max-new-tokens", type=int, help="Default: the study's.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Times every phase runs; the median of the quiet ones counts.")
    parser.add_argument("--random-weights", type=Path,
                        help="Skip loading: random weights shaped by the config in this model folder (same speed).")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    registry = load_registry(paths.registry_path())
    study = registry.get(args.study or registry.default)
    args.batch_size = args.batch_size or study.settings.batch_size
    args.max_new_tokens = args.max_new_tokens or study.settings.max_new_tokens
    if args.phase:
        print(json.dumps(_phase(args, study)))
        return
    options = ["--study", study.key, "--prompts", str(args.prompts), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens)]
    options += ["--random-weights", str(args.random_weights)] if args.random_weights else []
    results = run_rounds("benchmarks.generation", options, PHASES, args.rounds)
    print(f"\nstudy {study.key}, device {results[PHASES[0]]['device']}, {args.prompts} prompts, "
          f"batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.rounds} rounds")
    for phase, r in results.items():
        print(f"  {phase:16} {r['seconds']:7.1f} s   {r['new_tokens'] / r['seconds']:6.1f} new tokens/s   "
              f"{peaks_text(r)}   {runs_text(r)}")
    seconds = {phase: r["seconds"] for phase, r in results.items()}
    for name, slower, faster, goal in RATIOS:
        print(ratio_line(name, seconds[slower] / seconds[faster], goal))
    n = len(results["plain:float32"]["answers"])

    def same(a: str, b: str, key: str) -> int:
        return sum(x == y for x, y in zip(results[a][key], results[b][key]))

    print(f"  token-identical greedy answers, plain generate bfloat16 vs float32: "
          f"{same('plain:bfloat16', 'plain:float32', 'answers')}/{n}")
    print(f"  identical answers, judged bfloat16 vs float32: {same('judged:bfloat16', 'judged:float32', 'completions')}"
          f"/{n}; judged vs plain: {same('judged:bfloat16', 'plain:bfloat16', 'completions')}/{n} in bfloat16, "
          f"{same('judged:float32', 'plain:float32', 'completions')}/{n} in float32")
    pairs = list(zip(results["judged:bfloat16"]["refusal_scores"], results["judged:float32"]["refusal_scores"]))
    print(f"  refusal score bfloat16 vs float32: same sign {sum((a > 0) == (b > 0) for a, b in pairs)}/{n}, "
          f"largest difference {max(abs(a - b) for a, b in pairs):.3f}")


def _phase(args: argparse.Namespace, study) -> dict:
    kind, _, dtype = args.phase.partition(":")
    loaded = load(study, dtype, args.random_weights)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = eval_prompts(args.prompts)
    texts = [format_prompt(tokenizer, p.text, study.chat_template) for p in prompts]

    intervention = _intervention(kind, loaded, study)

    def judged(texts: list[str], max_new_tokens: int):
        n = len(texts)
        return judged_generations(model, tokenizer, texts, [p.prompt_id for p in prompts[:n]],
                                  [p.label for p in prompts[:n]], study.key, refusal_token_ids(model, tokenizer),
                                  intervention, max_new_tokens, args.batch_size, instructions=[p.text for p in prompts[:n]])

    def plain(texts: list[str], max_new_tokens: int) -> list[list[int]]:
        # The same batches as judged generation (shortest first), answered in the prompts' order.
        order = [i for batch in length_batches(tokenizer, texts, args.batch_size) for i in batch]
        answers = plain_generate(model, tokenizer, [texts[i] for i in order], max_new_tokens, args.batch_size)
        by_prompt = dict(zip(order, answers))
        return [by_prompt[i] for i in range(len(texts))]

    run = plain if kind == "plain" else judged
    run(texts[:2], 2)  # warm-up
    reset_peaks(loaded.device)
    output, timing = timed(lambda: run(texts, args.max_new_tokens), loaded.device)
    result = {**timing, **peaks(loaded.device), "device": str(loaded.device)}
    if kind == "plain":
        completions = [tokenizer.decode(answer, skip_special_tokens=True) for answer in output]
        return {**result, "answers": output, "completions": completions, "new_tokens": sum(map(len, output))}
    completions = output["completion"].to_pylist()
    new_tokens = sum(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
    return {**result, "completions": completions, "refusal_scores": output["refusal_score"].to_pylist(),
            "new_tokens": new_tokens}


def _intervention(kind: str, loaded, study):
    """None for unhooked generation; a random unit direction to ablate; or 20 latents of a random SAE to clamp."""
    torch.manual_seed(0)
    if kind == "ablate":
        direction = torch.randn(loaded.d_model)
        return Ablate(direction / direction.norm())
    if kind != "clamp":
        return None
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from refusal_core.saes import layer_to_hook_point

    spec, layer = study.saes, study.saes.layers[0]
    config = dict(d_in=loaded.d_model, d_sae=spec.width, metadata=SAEMetadata(hook_name=layer_to_hook_point(layer)))
    sae = TopKSAE(TopKSAEConfig(k=spec.k, **config)) if spec.architecture == "topk" else StandardSAE(
        StandardSAEConfig(**config))
    # Float32 on the model's device, as the study's SAEs are loaded; clamped as the study clamps.
    target = SaeLatents(layer, sae.to(loaded.device).eval(), "random", tuple(range(20)))
    return Clamp((target,), -study.settings.clamp_multiplier, instruction_offset(loaded.tokenizer, study.chat_template),
                 "random")

if __name__ == "__main__":
    main()
