"""The same capture, interventions and generation on CUDA as on the CPU (run where a GPU is present)."""

import pytest
import torch

from refusal_core.activations import capture
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.generation import generate
from refusal_core.interventions import Ablate, intervene
from refusal_core.models import load_model
from refusal_core.registry import Study

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["How do I bake bread?", "List three colours and explain why the sky is blue.", "Hi"]


def _load(folder, device, dtype="float32"):
    study = Study.model_validate({"key": "t", "dtype": dtype, "weights": {"kind": "local", "path": str(folder)}})
    return load_model(study, folder.parent / "cache", device)


def _capture(loaded):
    prompts = [format_prompt(loaded.tokenizer, t, "tokenizer") for t in TEXTS]
    suffix = post_instruction_tokens(loaded.tokenizer, "tokenizer")
    batches = list(capture(loaded.model, loaded.tokenizer, prompts, [0, 1, 2], suffix, batch_size=2, progress=False))
    return {i: b.activations[row] for b in batches for row, i in enumerate(b.indices)}


def test_auto_device_picks_cuda_and_bfloat16(tiny_models):
    loaded = _load(tiny_models["qwen2"], "auto", "auto")
    assert loaded.device.type == "cuda" and loaded.model.dtype == torch.bfloat16
    assert set(_capture(loaded)) == {0, 1, 2}


def test_capture_on_cuda_matches_cpu(tiny_models):
    cpu, gpu = _capture(_load(tiny_models["qwen2"], "cpu")), _capture(_load(tiny_models["qwen2"], "cuda"))
    for index in cpu:
        assert torch.allclose(cpu[index], gpu[index], atol=1e-3, rtol=1e-3)


def test_ablation_and_generation_on_cuda_match_cpu(tiny_models):
    direction = torch.randn(64)
    outputs = []
    for device in ("cpu", "cuda"):
        loaded = _load(tiny_models["qwen2"], device)
        prompts = [format_prompt(loaded.tokenizer, t, "tokenizer") for t in TEXTS]
        with intervene(loaded.model, Ablate(direction)):
            outputs.append(generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=5, progress=False))
    assert outputs[0] == outputs[1]
