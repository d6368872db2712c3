"""Sparse autoencoders of a study's layers (trained here, or loaded) and how well each one reconstructs its layer."""

import hashlib
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt, instruction_offset
from refusal_core.saes import load_local_sae, load_sae, sae_quality, train_saes
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import SAE_QUALITY

QUALITY_CHECK = "sae_quality_thresholds"
EVAL_TEXTS = 48
"""Held-out prompts the SAEs are graded on (a clean pass, then a spliced and a zero-ablated pass per layer)."""


class SaeQualityConfig(dg.Config):
    """Below these an SAE is flagged as too poor to trust (the thresholds the study's goals name)."""

    min_explained_variance: float = 0.7
    min_ce_loss_recovered: float = 0.8


@dg.asset(partitions_def=studies, group_name="saes", pool="gpu", kinds={"parquet", "pytorch"},
          check_specs=[dg.AssetCheckSpec(QUALITY_CHECK, asset="saes",
                                         description="Every SAE reaches the explained-variance and CE-recovered thresholds.")])
def saes(context: dg.AssetExecutionContext, config: SaeQualityConfig, study: StudyResource, prompts: pa.Table):
    """One SAE per configured layer (trained with sae-lens on the model's own residual stream, or loaded) and its quality on held-out prompts."""
    loaded = study.load(context.partition_key)
    spec, settings = loaded.study.saes, loaded.study.settings
    template = loaded.study.chat_template
    train_split = prompts.filter(pc.equal(prompts["split"], "train"))
    held_out = prompts.filter(pc.and_(pc.equal(prompts["split"], "val"), pc.not_equal(prompts["label"], "jailbreak")))
    # Training text: the chat-formatted train prompts of every label but jailbreaks (whose long templates
    # would dominate the token budget); quality is measured on val prompts the SAEs never saw.
    texts = [format_prompt(loaded.tokenizer, t, template)
             for t in train_split.filter(pc.not_equal(train_split["label"], "jailbreak"))["text"].to_pylist()]
    evaluation = [format_prompt(loaded.tokenizer, t, template) for t in held_out["text"].sort().to_pylist()[:EVAL_TEXTS]]
    # The template prefix (system prompt, role markers) is the same in every prompt and carries residual
    # norms ~15x the rest at these layers; the SAEs are trained on, graded on and spliced after it.
    skip = instruction_offset(loaded.tokenizer, template)
    sources = {}
    if spec.kind == "train":
        fingerprint = hashlib.sha256(to_json({"model": loaded.weights_sha256, "spec": spec.model_dump(mode="json"),
                                              "prompts": content_sha256(prompts), "seed": settings.seed,
                                              "skip_first": skip}).encode()).hexdigest()[:16]
        folder = Path(study.cache_dir) / "saes" / loaded.study.key / fingerprint
        trained = train_saes(loaded.model, loaded.tokenizer, texts, spec.layers, spec.width, spec.architecture, spec.k,
                             spec.training_tokens, spec.learning_rate, folder, settings.seed, skip_first=skip)
        sae_list = [load_local_sae(trained[layer], layer, loaded.d_model, str(loaded.device)) for layer in spec.layers]
    elif spec.kind == "none":
        context.log.info("Study %s names no SAEs; the table is empty.", loaded.study.key)
        sae_list = []
    else:
        sae_list = [load_sae(spec, layer, loaded.d_model, None, str(loaded.device)) for layer in spec.layers]
    rows = []
    qualities = sae_quality(loaded.model, loaded.tokenizer, {item.layer: item.sae for item in sae_list}, evaluation,
                            settings.batch_size, skip) if sae_list else {}
    for item in sae_list:
        quality = qualities[item.layer]
        source = item.source.replace("local:", "trained:", 1) if spec.kind == "train" else item.source
        sources[item.layer] = (source, item.weights_sha256)
        rows.append({"model_key": loaded.study.key, "layer_index": item.layer, "sae_source": source, "sae_id": item.sae_id,
                     "sae_sha256": item.weights_sha256, "width": int(item.sae.cfg.d_sae),
                     "explained_variance": quality.explained_variance, "mean_l0": quality.mean_l0,
                     "dead_fraction": quality.dead_fraction, "ce_clean": quality.ce_clean, "ce_spliced": quality.ce_spliced,
                     "ce_zero_ablation": quality.ce_zero_ablation, "ce_loss_recovered": quality.ce_loss_recovered,
                     "n_tokens": quality.n_tokens})
        context.log.info("Layer %d SAE: explained variance %.3f, L0 %.1f, dead %.1f%%, CE recovered %.3f.", item.layer,
                         quality.explained_variance, quality.mean_l0, 100 * quality.dead_fraction, quality.ce_loss_recovered)
    table = pa.Table.from_pylist(rows, schema=SAE_QUALITY)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               "sae_source": ";".join(f"{layer}={s}" for layer, (s, _) in sorted(sources.items())),
               "sae_sha256": ";".join(f"{layer}={h}" for layer, (_, h) in sorted(sources.items())),
               "settings": to_json({"saes": spec.model_dump(mode="json"), "n_training_texts": len(texts),
                                    "training_text": "chat-formatted train prompts of every label but jailbreak, tokens "
                                                     "after the template prefix",
                                    "training_texts_sha256": hashlib.sha256(to_json(texts).encode()).hexdigest(),
                                    "n_evaluation_texts": len(evaluation), "skip_first": skip})}
    staged = spool([table], SAE_QUALITY, study.staging_dir, lineage)
    yield dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                    metadata={f"explained_variance/layer_{r['layer_index']}": round(r["explained_variance"], 3) for r in rows}
                    | {f"ce_loss_recovered/layer_{r['layer_index']}": round(r["ce_loss_recovered"], 3) for r in rows})
    poor = [r["layer_index"] for r in rows if r["explained_variance"] < config.min_explained_variance
            or r["ce_loss_recovered"] < config.min_ce_loss_recovered]
    yield dg.AssetCheckResult(
        check_name=QUALITY_CHECK, passed=not poor, severity=dg.AssetCheckSeverity.WARN,
        description=f"SAEs below thresholds at layers {poor}" if poor else "Every SAE is above the thresholds.",
        metadata={"poor_layers": str(poor), "min_explained_variance": config.min_explained_variance,
                  "min_ce_loss_recovered": config.min_ce_loss_recovered})

