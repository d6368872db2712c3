"""A study's SAEs as folders that `sae_lens.SAE.load_from_disk` loads, with the model's name and a model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from refusal_core.registry import Study
from refusal_core.saes import load_local_sae


def published_name(study: Study) -> str:
    """The model's published name: the study's `model_name`, else the hub repository, else the study key."""
    return study.model_name or getattr(study.weights, "repo_id", None) or study.key


def export_saes(saes: pa.Table, study: Study, out: Path) -> tuple[list[Path], list[str]]:
    """Write each of the study's local SAEs (trained here, or from a local folder) to `out`/layer_N, and a README.md
    model card; return the folders written and a line for each published SAE left where it is published.

    The SAEs are checked against the weights hash the `saes` table recorded. Everything is written to a
    temporary folder beside `out` and renamed into place, so `out` is whole or absent.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out or empty it.")
    if saes.num_rows == 0:
        raise ValueError(f"Study {study.key!r} has no SAEs to export (its registry entry trains or loads none).")
    lineage = {key.decode().removeprefix("refusal_sae."): value.decode() for key, value in (saes.schema.metadata or {}).items()}
    settings = json.loads(lineage.get("settings", "{}"))
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written, published = [], []
    try:
        for row in sorted(saes.to_pylist(), key=lambda r: r["layer_index"]):
            kind, _, where = row["sae_source"].partition(":")
            if kind not in ("trained", "local"):
                published.append(f"layer {row['layer_index']}: published as {where}; load it with SAE.from_pretrained.")
                continue
            folder = Path(where)
            loaded = load_local_sae(folder, row["layer_index"], _d_in(folder))
            if loaded.weights_sha256 != row["sae_sha256"]:
                raise ValueError(f"The SAE at {folder} is not the one the saes table recorded; re-materialize the saes asset.")
            target = partial / f"layer_{row['layer_index']}"
            target.mkdir()
            for name in os.listdir(folder):
                if name != "cfg.json" and (folder / name).is_file() and not name.startswith("."):
                    shutil.copy2(folder / name, target / name)
            config = json.loads((folder / "cfg.json").read_text())
            config.setdefault("metadata", {})["model_name"] = published_name(study)
            (target / "cfg.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            written.append(out / target.name)
        (partial / "README.md").write_text(model_card(saes, study, lineage, settings, published))
        if out.exists():
            out.rmdir()  # an empty folder the user made
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return written, published


def _d_in(folder: Path) -> int:
    return int(json.loads((folder / "cfg.json").read_text())["d_in"])


def model_card(saes: pa.Table, study: Study, lineage: dict[str, str], settings: dict, published: list[str]) -> str:
    """The exported folder's README.md: what the SAEs read, how they were trained and graded, and their lineage."""
    spec = settings.get("saes", {})
    name = published_name(study)
    rows = sorted(saes.to_pylist(), key=lambda r: r["layer_index"])
    lines = [
        f"# Sparse autoencoders for {name} (refusal-sae study `{study.key}`)", "",
        f"Residual-stream SAEs of {name}, made by the refusal-sae study `{study.key}`. Each `layer_N/` folder loads",
        "with `sae_lens.SAE.load_from_disk`; its SAE reads the residual stream after decoder block N",
        "(`blocks.N.hook_resid_post`, the output of `model.layers[N]` in Hugging Face transformers).", "",
        "```python", "from sae_lens import SAE", "",
        f"sae = SAE.load_from_disk(\"layer_{rows[0]['layer_index']}\")  # then sae.encode(residual) -> latents", "```", "",
        "## Model", "",
        f"- name: {name}",
        f"- weights: {lineage.get('model_source', '')}",
        f"- weights sha256: `{lineage.get('model_sha256', '')}`",
        f"- dtype and device of the study: {lineage.get('dtype', '')} on {lineage.get('device', '')}", "",
        "## Training", "",
        f"- text: {settings.get('training_text', 'pretrained')} ({settings.get('n_training_texts', '?')} prompts, "
        f"sha256 `{settings.get('training_texts_sha256', '')}`)",
        f"- tokens: {spec.get('training_tokens', '?')}; architecture {spec.get('architecture', '?')}, k = {spec.get('k', '?')}, "
        f"width {spec.get('width', '?')}, learning rate {spec.get('learning_rate', '?')}",
        f"- first {settings.get('skip_first', '?')} tokens of each prompt (the chat template's shared prefix) left out of "
        "training, grading and splicing", "",
        "## Quality (held-out val prompts)", "",
        "| layer | hook | width | explained variance | CE loss recovered | mean L0 | dead fraction | tokens | weights sha256 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {r['layer_index']} | `blocks.{r['layer_index']}.hook_resid_post` | {r['width']} | {r['explained_variance']:.3f} | "
          f"{r['ce_loss_recovered']:.3f} | {r['mean_l0']:.1f} | {r['dead_fraction']:.3f} | {r['n_tokens']} | "
          f"`{r['sae_sha256'][:16]}` |" for r in rows),
        "", *(["## Published SAEs not copied", "", *(f"- {line}" for line in published), ""] if published else []),
        "## Lineage", "",
        f"- `saes` table content sha256: `{lineage.get('content_sha256', '')}`",
        f"- code version: `{lineage.get('code_version', '')}`",
        f"- packages: `{lineage.get('package_versions', '')}`",
        f"- prompt set sha256: `{lineage.get('prompt_set_sha256', '')}`", "",
    ]
    return "\n".join(lines)
