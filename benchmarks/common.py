"""What the benchmarks share: one process per phase (so its peak memory is its own), peak memory, random weights."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from refusal_core.models import LoadedModel, pick_device, pick_dtype


def run_phase(module: str, arguments: list[str]) -> dict:
    """Run `python -m module ARGUMENTS` in a fresh process and return the JSON object on its last line."""
    output = subprocess.run([sys.executable, "-m", module, *arguments], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


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


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_gpu(device: torch.device) -> None:
    """Start counting peak CUDA memory from now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def random_model(folder: Path, study) -> LoadedModel:
    """Random weights shaped by the config in `folder`: the same speed as the real model, without loading it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = pick_device()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(study.dtype, device)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, study, f"random:{folder.name}", "")
