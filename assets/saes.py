"""Sparse autoencoders of a study's layers (trained here, or loaded) and how well each one reconstructs its layer."""

from pathlib import Path

import dagster as dg
import pyarrow as pa

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.sae_study import prepare_saes
from refusal_core.tables import SAE_QUALITY

QUALITY_CHECK = "sae_quality_thresholds"


class SaeQualityConfig(dg.Config):
    """Below these an SAE is flagged as too poor to trust (the thresholds the study's goals name)."""

    min_explained_variance: float = 0.7
    min_ce_loss_recovered: float = 0.8


@study_asset(group_name="saes", pool="gpu", kinds={"parquet", "pytorch"},
          check_specs=[dg.AssetCheckSpec(QUALITY_CHECK, asset="saes",
                                         description="Every SAE reaches the explained-variance and CE-recovered thresholds.")])
def saes(context: dg.AssetExecutionContext, config: SaeQualityConfig, study: StudyResource, prompts: pa.Table):
    """One SAE per configured layer (trained with sae-lens on the model's own residual stream, or loaded) and its quality on held-out prompts."""
    loaded = study.load(context.partition_key)
    prepared = prepare_saes(loaded, prompts, content_sha256(prompts), Path(study.cache_dir))
    rows = prepared.rows
    if not rows:
        context.log.info("Study %s names no SAEs; the table is empty.", loaded.study.key)
    for r in rows:
        context.log.info("Layer %d SAE: explained variance %.3f, L0 %.1f, dead %.1f%%, CE recovered %.3f.", r["layer_index"],
                         r["explained_variance"], r["mean_l0"], 100 * r["dead_fraction"], r["ce_loss_recovered"])
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               **prepared.sources(), "settings": to_json(prepared.settings)}
    staged = spool([prepared.table()], SAE_QUALITY, study.staging_dir, lineage)
    yield dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                    metadata={f"explained_variance/layer_{r['layer_index']}": round(r["explained_variance"], 3) for r in rows}
                    | {f"ce_loss_recovered/layer_{r['layer_index']}": round(r["ce_loss_recovered"], 3) for r in rows})
    poor = prepared.poor_layers(config.min_explained_variance, config.min_ce_loss_recovered)
    yield dg.AssetCheckResult(
        check_name=QUALITY_CHECK, passed=not poor, severity=dg.AssetCheckSeverity.WARN,
        description=f"SAEs below thresholds at layers {poor}" if poor else "Every SAE is above the thresholds.",
        metadata={"poor_layers": str(poor), "min_explained_variance": config.min_explained_variance,
                  "min_ce_loss_recovered": config.min_ce_loss_recovered})

