"""Residual-stream activations of a study's train and val prompts at the post-instruction positions."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.activations import capture_table
from refusal_core.parquet import Spool
from refusal_core.prompts import activation_prompts


@study_asset(group_name="activations", pool="gpu", kinds={"parquet", "pytorch"})
def activations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """One row per (prompt, layer, position): the residual stream after each block at the instruction's last token and the post-instruction template tokens, float32."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    selected = activation_prompts(prompts, settings.activation_labels, settings.max_prompts_per_label)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts)}
    staged, metadata = capture_table(loaded, selected, study.staging_dir, lineage,
                                     {"labels": settings.activation_labels,
                                      "max_prompts_per_label": settings.max_prompts_per_label},
                                     checkpoints=checkpoints(context, study, lineage))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)
