"""Sparse autoencoders on the residual stream: load sae-lens SAEs, train them, splice them in and grade them."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from sae_lens import SAE, LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name, get_gemma_2_config_from_hf
from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk, read_sae_components_from_disk
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import input_mask, length_batches, prefix_cache, tokenize_batch
from refusal_core.hooks import HookFn, StopForward, check_layers, decoder_layers, hooks, record_residual
from refusal_core.models import LoadedModel
from refusal_core.registry import SaeSpec

HOOK_POINT = re.compile(r"blocks\.(\d+)\.hook_resid_post")
"""sae-lens names the residual stream after block i `blocks.i.hook_resid_post`: our layer i."""


@dataclass(frozen=True)
class LoadedSae:
    """An SAE ready for use on one layer, with what lineage needs to know about it."""

    sae: SAE
    """The sae-lens SAE, in eval mode, float32, on the requested device."""
    layer: int
    """The block whose output (residual stream) it reads."""
    sae_id: str
    """The sae-lens id actually loaded (the one chosen by L0 when the template has {l0}), or the folder name."""
    source: str
    """Where it came from in one line: pretrained:RELEASE/ID@REVISION or local:FOLDER."""
    weights_sha256: str
    """sha256 of its state dict serialised as safetensors."""


@dataclass(frozen=True)
class SaeQuality:
    """How well an SAE reconstructs one layer's residual stream on a set of texts."""

    explained_variance: float
    """1 - sum of squared reconstruction errors / total variance of the activations about their mean."""
    mean_l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Fraction of latents never active on these tokens."""
    ce_clean: float
    """Mean next-token cross-entropy (nats) of the unmodified model."""
    ce_spliced: float
    """The same with the block's output replaced by the SAE reconstruction."""
    ce_zero_ablation: float
    """The same with the block's output replaced by zeros."""
    ce_loss_recovered: float
    """(ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean): 1 is perfect, 0 no better than zeros."""
    n_tokens: int
    """Tokens the statistics are over (real tokens after the first skip_first of each text)."""


def hook_point_to_layer(hook_name: str) -> int:
    """Our layer index for an sae-lens hook name: `blocks.12.hook_resid_post` -> 12 (the output of block 12)."""
    match = HOOK_POINT.fullmatch(hook_name)
    if match is None:
        raise ValueError(
            f"Hook point {hook_name!r} is not a residual-stream output; this project reads SAEs at "
            "blocks.<layer>.hook_resid_post, the output of decoder block <layer>."
        )
    return int(match.group(1))


def layer_to_hook_point(layer: int) -> str:
    """The sae-lens hook name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def load_sae(spec: SaeSpec, layer: int, d_model: int, cache_dir: Path | None = None, device: str = "cpu") -> LoadedSae:
    """The study's SAE for `layer`: pretrained (kind = pretrained) or from a folder (kind = local).

    A local `spec.path` may hold one SAE, or one per layer in `layer_{layer}/` as `train_saes` writes.
    `cache_dir` is the Hugging Face download cache for pretrained SAEs (None: the default cache).
    """
    if spec.kind == "pretrained":
        if spec.release is None or spec.sae_id_template is None:
            raise ValueError("saes.kind = 'pretrained' needs saes.release and saes.sae_id_template; set both.")
        return load_pretrained_sae(spec.release, spec.sae_id_template, layer, d_model, spec.revision,
                                   spec.l0_target, cache_dir, device)
    if spec.kind == "local":
        if spec.path is None:
            raise ValueError("saes.kind = 'local' needs saes.path, a folder in sae-lens format; set it.")
        per_layer = spec.path / f"layer_{layer}"
        return load_local_sae(per_layer if per_layer.is_dir() else spec.path, layer, d_model, device)
    raise ValueError(
        f"saes.kind = {spec.kind!r} has nothing to load; train with train_saes and load its folders with "
        "load_local_sae, or use kind 'pretrained' or 'local'."
    )


def choose_sae_id(release: str, sae_id_template: str, layer: int, l0_target: float | None) -> str:
    """The id of `release` that fits the template at `layer`; with {l0}, the one whose L0 is closest to l0_target.

    L0 is the release's registry metadata, or the number the id carries where the registry has none.
    """
    saes = _release(release)
    if "{l0}" not in sae_id_template:
        sae_id = sae_id_template.format(layer=layer)
        if sae_id not in saes.saes_map:
            near = difflib.get_close_matches(sae_id, list(saes.saes_map), n=3, cutoff=0)
            raise ValueError(f"Release {release!r} has no SAE {sae_id!r}; close ids are {', '.join(near)}.")
        return sae_id
    if l0_target is None:
        raise ValueError(f"sae_id_template {sae_id_template!r} has {{l0}} but saes.l0_target is unset; set it.")
    pieces = [re.escape(piece.format(layer=layer)) for piece in sae_id_template.split("{l0}")]
    pattern = re.compile(r"(\d+(?:\.\d+)?)".join(pieces))
    l0s = {}
    for sae_id in saes.saes_map:
        if match := pattern.fullmatch(sae_id):
            l0s[sae_id] = saes.expected_l0.get(sae_id) or float(match.group(1))
    if not l0s:
        raise ValueError(f"Release {release!r} has no SAE id matching {sae_id_template!r} at layer {layer}; "
                         f"its ids look like {next(iter(saes.saes_map))!r}.")
    return min(l0s, key=lambda sae_id: (abs(l0s[sae_id] - l0_target), l0s[sae_id], sae_id))


def load_pretrained_sae(release: str, sae_id_template: str, layer: int, d_model: int, revision: str | None = None,
                        l0_target: float | None = None, cache_dir: Path | None = None, device: str = "cpu") -> LoadedSae:
    """Download (or read from the cache) an SAE of the sae-lens registry, checked against the model.

    The release and id are checked against the registry before anything is downloaded. sae-lens 6.54's
    loaders take no revision or cache folder, so the files are downloaded here, at `revision` into
    `cache_dir`, by a converter for the release's format (`PINNED_FORMATS`) that `SAE.from_pretrained`
    is given; it still applies the registry's config overrides and norm scaling factor. A release in
    another format loads through sae-lens' own loader, only with no revision and the default cache.
    """
    sae_id = choose_sae_id(release, sae_id_template, layer, l0_target)
    file_format = get_conversion_loader_name(release)
    converter = None
    if file_format in PINNED_FORMATS:
        converter = partial(PINNED_FORMATS[file_format], revision=revision, cache_dir=cache_dir)
    elif revision is not None or cache_dir is not None:
        raise ValueError(f"Release {release!r} is in sae-lens' {file_format!r} format, which loads only from main into "
                         f"the default cache; unset saes.revision, or use a release in a {'/'.join(PINNED_FORMATS)} format.")
    sae = SAE.from_pretrained(release, sae_id, device=device, dtype="float32", converter=converter)
    _check_sae(sae, layer, d_model, f"{release}/{sae_id}")
    return LoadedSae(sae.eval(), layer, sae_id, f"pretrained:{release}/{sae_id}@{revision or 'main'}", _sha256(sae))


def load_local_sae(folder: Path, layer: int, d_model: int, device: str = "cpu") -> LoadedSae:
    """Load an SAE saved in sae-lens format (cfg.json + sae_weights.safetensors), checked against the model."""
    if not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"{folder} has no cfg.json; point saes.path at a folder saved by sae-lens.")
    try:
        sae = SAE.load_from_disk(folder, device=device, dtype="float32")
    except Exception as error:  # safetensors, JSON and config errors all mean the same thing here
        raise ValueError(f"The SAE in {folder} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]}); "
                         "delete the folder to train it again, or point saes.path at an intact one.") from error
    _check_sae(sae, layer, d_model, str(folder))
    return LoadedSae(sae.eval(), layer, folder.name, f"local:{folder}", _sha256(sae))


def residual_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    layers: Sequence[int], batch_size: int = 16, skip_first: int = 4) -> Iterator[dict[int, Tensor]]:
    """Yield, per batch of prompts, `layer -> float32 CPU Tensor[n_tokens, d_model]` of the residual stream.

    One backbone pass per batch feeds every layer, stopping after the last one. Padding and the first
    `skip_first` tokens of each prompt are dropped: attention-sink tokens have norms far above the rest.
    When every prompt starts with the same `skip_first` tokens (a chat template's system prompt), that
    prefix is run once and its key-value cache reused for every batch (`prefix_cache`), so only the
    rest is computed.
    """
    if skip_first < 0:
        raise ValueError(f"skip_first is {skip_first}; it counts tokens, so use 0 or more.")
    layers = check_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    backbone = model.get_decoder()
    prefix = prefix_cache(model, tokenizer, prompts, skip_first, last_layer=layers[-1])
    for batch in length_batches(tokenizer, prompts, batch_size):  # shortest first: little padding
        inputs = tokenize_batch(tokenizer, [prompts[i] for i in batch], device, prefix)
        keep = (inputs["position_ids"] >= skip_first) & input_mask(inputs)  # [batch, seq]
        with torch.inference_mode(), record_residual(model, layers, stop_after_last=True) as recorded:
            try:
                backbone(**{"use_cache": False, **inputs})
            except StopForward:
                pass
        yield {layer: recorded[layer][keep].float().cpu() for layer in layers}  # [n_tokens, d_model] each


def train_saes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], layers: Sequence[int],
               width: int, architecture: str, k: int, training_tokens: int, learning_rate: float, output_dir: Path,
               seed: int, progress: bool = True, *, train_batch_size: int = 512, forward_batch_size: int = 16,
               l1_coefficient: float = 5.0, skip_first: int = 4, n_checkpoints: int = 4) -> dict[int, Path]:
    """Train one sae-lens SAE per layer on the model's own residual stream; return `layer -> folder`.

    The residual tokens of `texts` are collected once (at most `training_tokens` per layer) into a CPU
    buffer and fed to sae-lens' `SAETrainer` in seeded shuffles, epoch after epoch, until
    `training_tokens` samples have been seen. Activations are scaled to mean norm sqrt(d_model) while
    training; the scale is folded into the saved weights. Each SAE is saved in sae-lens format in
    `output_dir/layer_{L}/` with a training.json of these settings.

    Resuming: a layer whose folder is complete is not retrained (a ValueError if its settings differ).
    A layer interrupted midway resumes from its last checkpoint in `output_dir/layer_{L}.partial/`
    (SAE weights, optimizer, schedulers, dead-latent counters and the data position are all restored,
    so the result equals an uninterrupted run). The finished SAE is written inside the partial folder
    and renamed into place, so `layer_{L}/` is never half-written.

    Args:
        architecture: "topk" (k active latents per token) or "standard" (ReLU with an L1 penalty).
        train_batch_size: tokens per optimiser step; small enough that the short runs here take a few hundred
            steps (at 4096, 150k tokens were 36 steps and explained variance stayed near 0.5).
        progress: show progress bars (collection, layers and each layer's training steps).
    """
    if architecture not in ("topk", "standard"):
        raise ValueError(f"architecture {architecture!r} is not supported; use 'topk' or 'standard'.")
    layers = check_layers(layers, len(decoder_layers(model)))
    settings = {"width": width, "architecture": architecture, "k": k, "training_tokens": training_tokens,
                "learning_rate": learning_rate, "seed": seed, "train_batch_size": train_batch_size,
                "l1_coefficient": l1_coefficient, "skip_first": skip_first,
                "texts_sha256": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()}
    folders = {layer: output_dir / f"layer_{layer}" for layer in layers}
    todo = [layer for layer in layers if not _complete(folders[layer], settings)]
    if not todo:
        return folders
    buffers: dict[int, list[Tensor]] = {layer: [] for layer in todo}
    n_collected = 0
    available = sum(max(0, len(row) - skip_first) for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    with tqdm(total=min(training_tokens, available), desc="collect residual tokens", unit="token", disable=not progress) as bar:
        for batch in residual_tokens(model, tokenizer, texts, todo, forward_batch_size, skip_first):
            for layer in todo:
                buffers[layer].append(batch[layer])  # [n_tokens, d_model]
            n_collected += len(batch[todo[0]])
            bar.update(len(batch[todo[0]]))
            if n_collected >= training_tokens:
                break
    if n_collected == 0:
        raise ValueError(f"The {len(texts)} texts leave no tokens after skipping the first {skip_first}; pass longer texts.")
    device = str(next(model.parameters()).device)
    model_name = Path(str(model.config.name_or_path)).name
    for layer in tqdm(todo, desc="train SAEs", unit="layer", disable=not progress):
        buffer = torch.cat(buffers.pop(layer))[:training_tokens]  # [n_tokens, d_model]
        sae = _new_training_sae(buffer.shape[1], width, architecture, k, l1_coefficient, layer, model_name, seed)
        _train_layer(sae, buffer, folders[layer], settings, device, progress, n_checkpoints)
    return folders


def spliced(model: nn.Module, sae: SAE, layer: int, use_error_term: bool, skip_first: int = 0,
            edit: Callable[[Tensor], Tensor] | None = None) -> tuple[str, HookFn]:
    """The `(hook point, hook)` that replaces the output of block `layer` by the SAE reconstruction.

    `edit` maps the latents [batch, seq, d_sae] to the latents to decode (clamping, patching); without
    it they are decoded as encoded. With `use_error_term`, the reconstruction error x - sae(x) of the
    unedited latents is added back: the output is x plus the decoded change of the latents, computed as
    that difference, so an edit that changes no latent (or no edit) leaves x exactly as it was.
    Positions whose position id is below `skip_first` (the template prefix) pass through untouched.
    """
    _check_sae(sae, layer, int(model.config.hidden_size), "given")
    weight = sae.W_dec

    def reconstruct(hidden: Tensor) -> Tensor:
        x = hidden.to(weight.dtype)  # [batch, seq, d_model]
        latents = sae.encode(x)  # [batch, seq, d_sae]
        edited = sae.decode(latents if edit is None else edit(latents))  # [batch, seq, d_model]
        if use_error_term:
            edited = x.detach() + (edited - sae.decode(latents).detach())
        return edited.to(hidden.dtype)

    return _replacing(model, layer, reconstruct, skip_first)


@contextmanager
def splice(model: nn.Module, sae: SAE, layer: int, use_error_term: bool, skip_first: int = 0,
           edit: Callable[[Tensor], Tensor] | None = None) -> Iterator[None]:
    """`spliced`, applied while the block is open."""
    with hooks(model, [spliced(model, sae, layer, use_error_term, skip_first, edit)]):
        yield


@torch.no_grad()
def sae_quality(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saes: Mapping[int, SAE],
                texts: Sequence[str], batch_size: int = 16, skip_first: int = 4) -> dict[int, SaeQuality]:
    """Explained variance, L0, dead latents and CE loss recovered of each `layer -> SAE` on `texts`.

    Cross-entropy is next-token prediction from every real position after the first `skip_first`;
    the splice and the zero ablation touch exactly those positions, and the SAE statistics cover them.
    One clean pass per batch serves every layer; each layer adds a spliced and a zero-ablated pass.
    """
    for layer, sae in saes.items():
        _check_sae(sae, layer, int(model.config.hidden_size), "given")
    device = next(model.parameters()).device
    names = ("squared_error", "square_sum", "l0", "spliced", "zero")
    totals = {layer: dict.fromkeys(names, 0.0) for layer in saes}
    x_sum = {layer: torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device) for layer, sae in saes.items()}
    fired = {layer: torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device) for layer, sae in saes.items()}
    clean_total, n_predicted, n_tokens = 0.0, 0, 0
    for batch in length_batches(tokenizer, texts, batch_size):  # shortest first: little padding
        inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
        mask = inputs["attention_mask"].bool()  # [batch, seq]
        keep = mask & (inputs["position_ids"] >= skip_first)  # [batch, seq]
        predicts = keep[:, :-1] & mask[:, 1:]  # [batch, seq-1]: kept positions that have a next token
        targets = inputs["input_ids"][:, 1:][predicts]  # [n_predicted]
        with record_residual(model, list(saes)) as recorded:
            clean_total += _summed_ce(model, inputs, predicts, targets)
        for layer, sae in saes.items():
            with splice(model, sae, layer, use_error_term=False, skip_first=skip_first):
                totals[layer]["spliced"] += _summed_ce(model, inputs, predicts, targets)
            with hooks(model, [_replacing(model, layer, torch.zeros_like, skip_first)]):
                totals[layer]["zero"] += _summed_ce(model, inputs, predicts, targets)
            x = recorded[layer][keep].float()  # [n, d_model]
            acts = sae.encode(x)  # [n, d_sae]
            totals[layer]["squared_error"] += float((x - sae.decode(acts)).double().pow(2).sum())
            totals[layer]["square_sum"] += float(x.double().pow(2).sum())
            totals[layer]["l0"] += float((acts > 0).sum())
            x_sum[layer] += x.double().sum(0)
            fired[layer] |= (acts > 0).any(0)
        n_predicted += len(targets)
        n_tokens += int(keep.sum())
    if n_tokens == 0 or n_predicted == 0:
        raise ValueError(f"The {len(texts)} texts leave no tokens after skipping the first {skip_first}; pass longer texts.")
    clean = clean_total / n_predicted
    result = {}
    for layer, total in totals.items():
        total_variance = total["square_sum"] - float(x_sum[layer].pow(2).sum()) / n_tokens
        spliced, zero = total["spliced"] / n_predicted, total["zero"] / n_predicted
        result[layer] = SaeQuality(
            explained_variance=1 - total["squared_error"] / total_variance, mean_l0=total["l0"] / n_tokens,
            dead_fraction=1 - float(fired[layer].float().mean()), ce_clean=clean, ce_spliced=spliced,
            ce_zero_ablation=zero, ce_loss_recovered=(zero - spliced) / (zero - clean), n_tokens=n_tokens,
        )
    return result


def neuronpedia_url(release: str, sae_id: str, latent: int) -> str | None:
    """The latent's Neuronpedia page when the release's registry entry names one, else None (no download)."""
    directory = get_pretrained_saes_directory()
    if release not in directory:
        return None
    neuronpedia_id = (directory[release].neuronpedia_id or {}).get(sae_id)
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{latent}" if neuronpedia_id else None


def no_saes_note(study_key: str) -> str:
    """The note of every step built on SAE latents, in a study that has none."""
    return (f"Study {study_key} has no SAEs (its registry entry names none), so there are no SAE latents to attribute, "
            "gather into feature sets, clamp or probe: the tables built on them are empty.")


def study_saes(loaded: LoadedModel, saes_table: pa.Table) -> dict[int, LoadedSae]:
    """The SAEs a stored `saes` table was made with, by layer, checked against the weights hash it recorded; empty
    for a study without SAEs (see `no_saes_note`)."""
    spec = loaded.study.saes
    result = {}
    for row in saes_table.to_pylist():
        kind, _, where = row["sae_source"].partition(":")
        if kind in ("trained", "local"):
            item = load_local_sae(Path(where), row["layer_index"], loaded.d_model, str(loaded.device))
        else:
            item = load_pretrained_sae(spec.release, row["sae_id"], row["layer_index"], loaded.d_model, spec.revision,
                                       None, None, str(loaded.device))
        if item.weights_sha256 != row["sae_sha256"]:
            raise ValueError(f"The SAE for layer {row['layer_index']} at {row['sae_source']} is not the one the saes table "
                             "was made with; re-materialize the saes asset.")
        result[item.layer] = item
    return result


def _release(release: str):
    """The registry entry of `release`, or a ValueError naming close and example releases (no download)."""
    directory = get_pretrained_saes_directory()
    if release not in directory:
        near = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.6) or sorted(directory)[:5]
        raise ValueError(f"Release {release!r} is not in the sae-lens registry; valid releases include {', '.join(near)}.")
    return directory[release]


def _hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: Path | None, force_download: bool) -> Path:
    """One file of a hub repository at `revision` (None: main), downloaded into `cache_dir` (None: the default cache)."""
    return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                                                cache_dir=cache_dir, force_download=force_download))


# The converters below follow sae-lens 6.54's `PretrainedSaeHuggingfaceLoader` protocol (what
# `SAE.from_pretrained(converter=...)` calls) and return what the loader of the same format returns,
# less the feature sparsity, which `from_pretrained` drops.

def _sae_lens_format(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                     cfg_overrides: dict | None = None, *, revision: str | None = None,
                     cache_dir: Path | None = None) -> tuple[dict, dict[str, Tensor], None]:
    """sae-lens' own format: FOLDER/cfg.json and FOLDER/sae_weights.safetensors."""
    download = partial(_hub_file, repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download)
    cfg_path = download(f"{folder_name}/{SAE_CFG_FILENAME}")
    weights_path = download(f"{folder_name}/{SAE_WEIGHTS_FILENAME}")
    cfg = get_sae_lens_config_from_disk(cfg_path.parent, device, cfg_overrides)
    return (*read_sae_components_from_disk(cfg, weights_path, device), None)


def _gemma_scope_format(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                        cfg_overrides: dict | None = None, *, revision: str | None = None,
                        cache_dir: Path | None = None) -> tuple[dict, dict[str, Tensor], None]:
    """Gemma Scope: FOLDER/params.npz (w_enc, w_dec, b_enc, b_dec, threshold); the config comes from the names."""
    # sae-lens builds this config from the repository and folder names alone; it downloads nothing.
    cfg = get_gemma_2_config_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    path = _hub_file(repo_id, f"{folder_name}/params.npz", revision, cache_dir, force_download)
    with np.load(path) as data:
        state = {("W_" + key[2:] if key.startswith("w_") else key): torch.tensor(data[key], dtype=torch.float32, device=device)
                 for key in data}
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError(f"{repo_id}/{folder_name} has a fine-tuning scaling factor, which Gemma Scope SAEs do not; "
                         "use another SAE of the release.")
    cfg["finetuning_scaling_factor"] = False
    if "embedding" in folder_name:  # as sae-lens does: embedding SAEs were trained on embeddings scaled by sqrt(d_model)
        state["W_enc"] = state["W_enc"] / cfg["d_in"] ** 0.5
        state["W_dec"] = state["W_dec"] * cfg["d_in"] ** 0.5
    return cfg, state, None


def _llama_scope_format(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                        cfg_overrides: dict | None = None, *, revision: str | None = None,
                        cache_dir: Path | None = None) -> tuple[dict, dict[str, Tensor], None]:
    """Llama Scope: FOLDER/hyperparams.json and FOLDER/checkpoints/final.safetensors, converted as sae-lens does."""
    download = partial(_hub_file, repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download)
    hyper = json.loads(download(f"{folder_name}/hyperparams.json").read_text())
    d_in = hyper["d_model"]
    # from_pretrained folds the release's norm scaling factor into W_enc; the scalar threshold is scaled to match.
    norm_scaling_factor = d_in ** 0.5 / hyper["dataset_average_activation_norm"]["in"]
    cfg = {
        "architecture": "jumprelu", "jump_relu_threshold": hyper["jump_relu_threshold"] * norm_scaling_factor,
        "d_in": d_in, "d_sae": hyper["d_sae"], "dtype": "bfloat16", "model_name": "meta-llama/Llama-3.1-8B",
        "hook_name": hyper["hook_point_in"], "hook_head_index": None, "activation_fn": "relu",
        "finetuning_scaling_factor": False, "sae_lens_training_version": None, "prepend_bos": True,
        "dataset_path": "cerebras/SlimPajama-627B", "context_size": 1024, "dataset_trust_remote_code": True,
        "apply_b_dec_to_input": False, "normalize_activations": "expected_average_only_in", "device": device,
        **(cfg_overrides or {}),
    }
    weights_path = download(f"{folder_name}/checkpoints/final.safetensors")
    dtype = getattr(torch, cfg["dtype"])
    raw = {name: tensor.to(dtype) for name, tensor in load_file(weights_path, device=device).items()}
    state = {"W_enc": raw["encoder.weight"].T, "W_dec": raw["decoder.weight"].T, "b_enc": raw["encoder.bias"],
             "b_dec": raw["decoder.bias"],
             "threshold": torch.ones(cfg["d_sae"], dtype=dtype, device=cfg["device"]) * cfg["jump_relu_threshold"]}
    return cfg, state, None


PINNED_FORMATS = {"sae_lens": _sae_lens_format, "gemma_2": _gemma_scope_format, "llama_scope": _llama_scope_format}
"""sae-lens release formats (the registry's conversion_func) whose files are downloaded here at a pinned revision."""


def _check_sae(sae: SAE, layer: int, d_model: int, name: str) -> None:
    """A one-sentence ValueError unless `sae` reads the d_model-wide residual stream after block `layer`."""
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE {name} has width {sae.cfg.d_in} but the model's residual stream has width {d_model}; "
                         "use an SAE trained on this model.")
    hook = sae.cfg.metadata.hook_name
    if hook is None or HOOK_POINT.fullmatch(hook) is None:
        raise ValueError(f"SAE {name} reads hook point {hook!r}, not a residual-stream output "
                         f"(blocks.<layer>.hook_resid_post); use a residual-stream SAE for layer {layer}.")
    if hook_point_to_layer(hook) != layer:
        raise ValueError(f"SAE {name} reads {hook} but was asked for layer {layer}; use the SAE for "
                         f"{layer_to_hook_point(layer)}.")


def _sha256(sae: SAE) -> str:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in sae.state_dict().items()}
    return hashlib.sha256(safetensors_bytes(tensors)).hexdigest()


def _complete(folder: Path, settings: dict) -> bool:
    """Whether `folder` holds a finished SAE; a ValueError if it was trained with other settings."""
    if not (folder / "sae_weights.safetensors").is_file():
        return False
    record = folder / "training.json"
    recorded = json.loads(record.read_text()) if record.is_file() else None
    if recorded != settings:
        raise ValueError(f"{folder} holds an SAE trained with {recorded}, not {settings}; delete it or use another output_dir.")
    return True


def _new_training_sae(d_model: int, width: int, architecture: str, k: int, l1_coefficient: float, layer: int,
                      model_name: str, seed: int) -> TopKTrainingSAE | StandardTrainingSAE:
    """A freshly initialised training SAE; its initial weights depend only on `seed` and `layer`."""
    metadata = SAEMetadata(hook_name=layer_to_hook_point(layer), model_name=model_name)
    common = dict(d_in=d_model, d_sae=width, normalize_activations="expected_average_only_in", metadata=metadata)
    # The SAE is built on the CPU under a forked RNG: the weights are the same on any device and the
    # caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + layer)
        if architecture == "topk":
            return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common))


def _train_layer(sae: TopKTrainingSAE | StandardTrainingSAE, buffer: Tensor, folder: Path, settings: dict,
                 device: str, progress: bool, n_checkpoints: int) -> None:
    """Fit `sae` on `buffer` [n_tokens, d_model] with SAETrainer, resuming from a checkpoint, then move it to `folder`."""
    partial_folder = folder.with_name(folder.name + ".partial")
    if (partial_folder / "training.json").is_file() and json.loads((partial_folder / "training.json").read_text()) != settings:
        shutil.rmtree(partial_folder)
    partial_folder.mkdir(parents=True, exist_ok=True)
    (partial_folder / "training.json").write_text(json.dumps(settings))
    checkpoints = partial_folder / "checkpoints"
    batch_size = min(settings["train_batch_size"], settings["training_tokens"])
    config = SAETrainerConfig(
        total_training_samples=settings["training_tokens"], train_batch_size_samples=batch_size,
        # The learning rate decays linearly to zero over the last fifth of the steps, as in Anthropic's
        # April 2024 training update. SAETrainerConfig has no default lr_end (the runner config sets it).
        lr=settings["learning_rate"], lr_end=settings["learning_rate"],
        lr_decay_steps=settings["training_tokens"] // batch_size // 5,
        # A latent silent for a tenth of training counts as dead, so TopK's auxiliary loss revives it within
        # these short runs (sae-lens' default window, 1000 steps, is longer than the whole run).
        dead_feature_window=max(1, settings["training_tokens"] // batch_size // 10),
        device=device, n_checkpoints=n_checkpoints, checkpoint_path=str(checkpoints),
        logger=LoggingConfig(log_to_wandb=False),
    )
    # The batches are not the trainer's data provider: _fit feeds them, from the resumed position on.
    trainer = SAETrainer(config, sae, data_provider=iter(()), save_checkpoint_fn=_keep_latest)
    if (latest := _latest_checkpoint(checkpoints)) is not None:
        try:
            trainer.load_trainer_state(latest)
            sae.load_weights_from_checkpoint(latest)
        except Exception as error:  # a truncated or foreign checkpoint, whatever the library raises
            raise ValueError(f"Checkpoint {latest} cannot be read ({type(error).__name__}); delete {partial_folder} to "
                             f"train layer {folder.name.removeprefix('layer_')} from the start.") from error
        # SAETrainer rebuilds its checkpoint schedule from zero; drop the thresholds already passed.
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    else:
        # ActivationScaler.estimate_scaling_factor's formula, over the whole buffer rather than batches drawn
        # from the data provider, so the provider's position stays the sample count.
        trainer.activation_scaler.scaling_factor = buffer.shape[1] ** 0.5 / float(buffer.norm(dim=-1).mean())
    _fit(trainer, _batches(buffer, batch_size, settings["seed"], trainer.n_training_samples), progress, folder.name)
    finished = partial_folder / "sae"
    shutil.rmtree(finished, ignore_errors=True)
    sae.save_inference_model(finished)
    (finished / "training.json").write_text(json.dumps(settings))
    shutil.rmtree(folder, ignore_errors=True)
    finished.rename(folder)
    shutil.rmtree(partial_folder)


def _fit(trainer: SAETrainer, batches: Iterator[Tensor], progress: bool, name: str) -> None:
    """`SAETrainer.fit` without wandb, with a progress bar that `progress` turns off (fit's own cannot be).

    The trainer is driven through the calls sae-lens documents for outside coordinators (its
    MultiSAETrainer uses the same): `maybe_reset_sparsity`, `step`, `save_checkpoint` at the thresholds
    in `checkpoint_thresholds`, then the activation scale folded into the weights and
    `set_final_sae_metadata`. The scale must already be set (estimated, or restored from a checkpoint).
    """
    sae, total = trainer.sae, trainer.cfg.total_training_samples
    sae.to(trainer.cfg.device)
    if trainer.activation_scaler.scaling_factor is None:
        raise ValueError(f"SAE {name} has no activation scale to train with; set it before training.")
    with tqdm(total=total, initial=trainer.n_training_samples, desc=f"train {name}", unit="token", disable=not progress) as bar:
        while trainer.n_training_samples < total:
            trainer.maybe_reset_sparsity()
            before = trainer.n_training_samples
            trainer.step(next(batches))  # [train_batch_size, d_model]
            if trainer.checkpoint_thresholds and trainer.n_training_samples > trainer.checkpoint_thresholds[0]:
                trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
                trainer.checkpoint_thresholds.pop(0)
            trainer.n_training_steps += 1
            bar.update(trainer.n_training_samples - before)
    sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()


def _batches(buffer: Tensor, batch_size: int, seed: int, start: int) -> Iterator[Tensor]:
    """Batches [batch_size, d_model] of `buffer` in a fresh seeded shuffle per epoch, from sample `start` on."""
    n_tokens = len(buffer)
    position, epoch, order = start, -1, None
    while True:
        parts = []
        while sum(len(part) for part in parts) < batch_size:
            if position // n_tokens != epoch:
                epoch = position // n_tokens
                order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            offset = position % n_tokens
            parts.append(order[offset:offset + batch_size - sum(len(part) for part in parts)])
            position += len(parts[-1])
        yield buffer[torch.cat(parts)]  # [batch_size, d_model]


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (its activation_scaler.json is written last), if any."""
    complete = [path for path in checkpoints.glob("*") if path.name.isdigit() and (path / "activation_scaler.json").is_file()]
    return max(complete, key=lambda path: int(path.name), default=None)


def _keep_latest(checkpoint_path: Path | None) -> None:
    """Called by SAETrainer once a checkpoint is complete: delete the older ones."""
    if checkpoint_path is not None:
        for older in checkpoint_path.parent.glob("*"):
            if older != checkpoint_path and older.name.isdigit():
                shutil.rmtree(older)


def _summed_ce(model: nn.Module, inputs: dict[str, Tensor], predicts: Tensor, targets: Tensor) -> float:
    """Summed next-token cross-entropy at the `predicts` [batch, seq-1] positions."""
    logits = model(**inputs, use_cache=False).logits  # [batch, seq, vocab]
    return F.cross_entropy(logits[:, :-1][predicts].float(), targets, reduction="sum").item()


def _replacing(model: nn.Module, layer: int, replace: Callable[[Tensor], Tensor], skip_first: int) -> tuple[str, HookFn]:
    """The hook that replaces the output of block `layer` by `replace(output)` at positions with position id >= skip_first."""
    check_layers([layer], len(decoder_layers(model)))

    def hook(hidden: Tensor, positions: Tensor | None) -> Tensor:
        new = replace(hidden)  # [batch, seq, d_model]
        if skip_first > 0:
            if positions is None:
                raise ValueError(f"Block {layer} got no position_ids, so the first {skip_first} tokens cannot be "
                                 "told apart; pass skip_first=0.")
            new = torch.where((positions >= skip_first).unsqueeze(-1), new, hidden)
        return new

    return f"resid_post.{layer}", hook
