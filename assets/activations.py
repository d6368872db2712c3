"""Residual-stream activations of a study's train and val prompts at the post-instruction positions."""


import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets.common import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.activations import activation_rows, capture, position_tokens
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.hooks import check_layers
from refusal_core.models import LoadedModel
from refusal_core.tables import Spool, activations_schema, spool, to_json


@dg.asset(partitions_def=studies, group_name="activations", pool="gpu", kinds={"parquet", "pytorch"})
def activations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """One row per (prompt, layer, position): the residual stream after each block at the instruction's last token and the post-instruction template tokens, float32."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    selected = select_prompts(prompts, settings.activation_labels, settings.max_prompts_per_label)
    staged, metadata = capture_table(context, study, loaded, selected, prompts,
                                     {"labels": settings.activation_labels,
                                      "max_prompts_per_label": settings.max_prompts_per_label})
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=metadata)


def capture_table(context: dg.AssetExecutionContext, study: StudyResource, loaded: LoadedModel, selected: pa.Table,
                  prompts: pa.Table, settings: dict, groups: list[list[int]] | None = None,
                  **upstream: pa.Table) -> tuple[Spool, dict]:
    """Capture the `selected` prompts' residual stream at the study's layers into a spooled ACTIVATIONS table.

    `groups` (row indices) are captured one after another, each with the prefix its prompts share run once.
    """
    layers = check_layers(loaded.study.settings.layers if loaded.study.settings.layers is not None
                          else range(loaded.n_layers), loaded.n_layers)
    template = loaded.study.chat_template
    suffix = post_instruction_tokens(loaded.tokenizer, template)
    tokens = position_tokens(loaded.tokenizer, suffix)
    texts = [format_prompt(loaded.tokenizer, text, template) for text in selected["text"].to_pylist()]
    ids = selected["prompt_id"].to_pylist()
    counter = {"tokens": 0}
    batch_size = loaded.study.settings.batch_size

    def batches():
        for group in groups or [list(range(len(texts)))]:
            for batch in capture(loaded.model, loaded.tokenizer, [texts[i] for i in group], layers, suffix, batch_size):
                counter["tokens"] += batch.n_tokens
                yield activation_rows(batch, loaded.study.key, [ids[i] for i in group], layers, tokens)

    started = time.perf_counter()
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, **upstream),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"layers": layers, **settings, "batch_size": batch_size, "positions": tokens})}
    staged = spool(batches(), activations_schema(loaded.d_model), study.staging_dir, lineage)
    seconds = time.perf_counter() - started
    context.log.info("Captured %d prompts x %d layers x %d positions in %.1f s.", len(ids), len(layers), len(tokens), seconds)
    return staged, {"n_prompts": len(ids), "n_layers": len(layers), "positions": tokens,
                    "tokens_per_second": round(counter["tokens"] / seconds, 1), "device": str(loaded.device)}


def select_prompts(prompts: pa.Table, labels: list[str], per_label: int) -> pa.Table:
    """Train and val prompts with the given labels, at most `per_label` of each, chosen by prompt id (a hash)."""
    pool = prompts.filter(pc.and_(pc.is_in(prompts["label"], pa.array(labels)),
                                  pc.is_in(prompts["split"], pa.array(["train", "val"]))))
    pool = pool.sort_by([("label", "ascending"), ("prompt_id", "ascending")])
    keep = []
    for label in labels:
        rows = pc.indices_nonzero(pc.equal(pool["label"], label)).to_pylist()[:per_label]
        keep += rows
    if not keep:
        raise ValueError(f"No train or val prompt has a label in {labels}; check activation_labels in the study settings.")
    return pool.take(sorted(keep))
