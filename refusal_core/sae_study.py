"""A study's SAEs: trained here on the model's own residual stream or loaded, and graded on held-out prompts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from refusal_core.chat import format_prompt, instruction_offset
from refusal_core.models import LoadedModel
from refusal_core.parquet import to_json
from refusal_core.saes import LoadedSae, load_local_sae, load_sae, sae_quality, train_saes
from refusal_core.tables import SAE_QUALITY

EVAL_TEXTS = 48
"""Held-out prompts the SAEs are graded on (a clean pass, then a spliced and a zero-ablated pass per layer)."""
TRAINING_TEXT = "chat-formatted train prompts of every label but jailbreak, tokens after the template prefix"


@dataclass(frozen=True)
class SaeStudy:
    """The SAEs of a study's layers and their quality rows (the SAE_QUALITY table)."""

    saes: list[LoadedSae]
    rows: list[dict]
    settings: dict
    """What lineage records of how they were made and graded."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=SAE_QUALITY)

    def sources(self) -> dict[str, str]:
        """Lineage fields naming each layer's SAE source and weights sha256."""
        ordered = sorted(self.rows, key=lambda r: r["layer_index"])
        return {"sae_source": ";".join(f"{r['layer_index']}={r['sae_source']}" for r in ordered),
                "sae_sha256": ";".join(f"{r['layer_index']}={r['sae_sha256']}" for r in ordered)}

    def poor_layers(self, min_explained_variance: float, min_ce_loss_recovered: float) -> list[int]:
        return [r["layer_index"] for r in self.rows if r["explained_variance"] < min_explained_variance
                or r["ce_loss_recovered"] < min_ce_loss_recovered]


def prepare_saes(loaded: LoadedModel, prompts: pa.Table, prompts_sha256: str, cache_dir: Path) -> SaeStudy:
    """Train (resumably, cached under `cache_dir`/saes) or load the study's SAEs, and grade them on val prompts.

    Training text: the chat-formatted train prompts of every label but jailbreaks (whose long templates
    would dominate the token budget); quality is measured on val prompts the SAEs never saw. The
    template prefix (system prompt, role markers) is the same in every prompt and carries residual
    norms ~15x the rest; the SAEs are trained on, graded on and spliced after it.
    """
    spec, settings, template = loaded.study.saes, loaded.study.settings, loaded.study.chat_template
    train_split = prompts.filter(pc.equal(prompts["split"], "train"))
    held_out = prompts.filter(pc.and_(pc.equal(prompts["split"], "val"), pc.not_equal(prompts["label"], "jailbreak")))
    texts = [format_prompt(loaded.tokenizer, t, template)
             for t in train_split.filter(pc.not_equal(train_split["label"], "jailbreak"))["text"].to_pylist()]
    evaluation = [format_prompt(loaded.tokenizer, t, template) for t in held_out["text"].sort().to_pylist()[:EVAL_TEXTS]]
    skip = instruction_offset(loaded.tokenizer, template)
    if spec.kind == "train":
        fingerprint = hashlib.sha256(to_json({"model": loaded.weights_sha256, "spec": spec.model_dump(mode="json"),
                                              "prompts": prompts_sha256, "seed": settings.seed, "dtype": str(loaded.model.dtype),
                                              "skip_first": skip}).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / "saes" / loaded.study.key / fingerprint
        trained = train_saes(loaded.model, loaded.tokenizer, texts, spec.layers, spec.width, spec.architecture, spec.k,
                             spec.training_tokens, spec.learning_rate, folder, settings.seed, skip_first=skip)
        saes = [load_local_sae(trained[layer], layer, loaded.d_model, str(loaded.device)) for layer in spec.layers]
    elif spec.kind == "none":
        saes = []
    else:
        saes = [load_sae(spec, layer, loaded.d_model, None, str(loaded.device)) for layer in spec.layers]
    qualities = sae_quality(loaded.model, loaded.tokenizer, {item.layer: item.sae for item in saes}, evaluation,
                            settings.batch_size, skip) if saes else {}
    rows = []
    for item in saes:
        quality = qualities[item.layer]
        source = item.source.replace("local:", "trained:", 1) if spec.kind == "train" else item.source
        rows.append({"model_key": loaded.study.key, "layer_index": item.layer, "sae_source": source, "sae_id": item.sae_id,
                     "sae_sha256": item.weights_sha256, "width": int(item.sae.cfg.d_sae),
                     "explained_variance": quality.explained_variance, "mean_l0": quality.mean_l0,
                     "dead_fraction": quality.dead_fraction, "ce_clean": quality.ce_clean, "ce_spliced": quality.ce_spliced,
                     "ce_zero_ablation": quality.ce_zero_ablation, "ce_loss_recovered": quality.ce_loss_recovered,
                     "n_tokens": quality.n_tokens})
    lineage_settings = {"saes": spec.model_dump(mode="json"), "n_training_texts": len(texts), "training_text": TRAINING_TEXT,
                        "training_texts_sha256": hashlib.sha256(to_json(texts).encode()).hexdigest(),
                        "n_evaluation_texts": len(evaluation), "skip_first": skip}
    return SaeStudy(saes, rows, lineage_settings)
