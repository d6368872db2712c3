"""Baseline behaviour: what the model answers to every eval prompt, judged."""

import dagster as dg
import pyarrow as pa

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt
from refusal_core.evaluation import judged_generations
from refusal_core.prompts import eval_prompts
from refusal_core.scoring import refusal_token_ids
from refusal_core.tables import GENERATIONS, Spool, spool, to_json


@dg.asset(partitions_def=studies, group_name="behaviour", pool="gpu", kinds={"parquet", "pytorch"})
def baseline_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """Greedy answers to the test-split HarmBench, harmless and over-refusal prompts, judged by substring and refusal score."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    chosen = eval_prompts(prompts, settings.max_eval_prompts_per_label)
    texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in chosen["text"].to_pylist()]
    table = judged_generations(
        loaded.model, loaded.tokenizer, texts, chosen["prompt_id"].to_pylist(), chosen["label"].to_pylist(),
        loaded.study.key, refusal_token_ids(loaded.tokenizer), None, settings.max_new_tokens, settings.batch_size,
        study.classifier(loaded.study.key), chosen["text"].to_pylist(),
    )
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens,
                                    "max_eval_prompts_per_label": settings.max_eval_prompts_per_label})}
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    rates = {label: round(sum(r for r, l in zip(table["refused_substring"].to_pylist(), table["label"].to_pylist()) if l == label)
                          / max(1, table["label"].to_pylist().count(label)), 3) for label in ("harmful", "harmless", "over_refusal")}
    context.log.info("Baseline refusal by substring: %s", rates)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"refusal_rate_{label}": rate for label, rate in rates.items()}
                     | {"n_judges_disagree": sum(table["judges_disagree"].to_pylist())})
