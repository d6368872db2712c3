"""What the model does: its refusal score on every prompt with stored activations, and its judged answers to the eval prompts."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.behaviour import behaviour_table, eval_set_rates, refusal_rates
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.prompts import EVAL_SETS, eval_set_prompts
from refusal_core.study_interventions import judged_interventions
from refusal_core.tables import GENERATIONS, PROMPT_BEHAVIOUR


@study_asset(group_name="behaviour", pool="gpu", kinds={"parquet", "pytorch"})
def prompt_behaviour(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                     activations: pa.Table) -> dg.Output[Spool]:
    """Refusal score at the first answer token of every prompt with stored activations: what the directions, attribution and probes filter or label by."""
    loaded = study.load(context.partition_key)
    table = behaviour_table(loaded, prompts, activations)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations),
               "prompt_set_sha256": content_sha256(prompts), "settings": to_json({"refused": "refusal_score > 0"})}
    staged = spool([table], PROMPT_BEHAVIOUR, study.staging_dir, lineage)
    labels = tuple(sorted(set(table["label"].to_pylist())))
    rates = {f"refused_share/{label}": round(rate, 3) for label, rate in refusal_rates(table, labels, "refused").items()}
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata=rates)


@study_asset(group_name="behaviour", pool="gpu", kinds={"parquet", "pytorch"})
def baseline_generations(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table) -> dg.Output[Spool]:
    """Greedy answers to the prompts of every eval set (HarmBench, JBB, AdvBench, StrongREJECT, AlpacaEval, over-refusal), judged by substring and refusal score."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts), "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"max_new_tokens": settings.max_new_tokens,
                                    "eval_prompts_per_set": settings.eval_prompts_per_set})}
    table = judged_interventions(loaded, eval_set_prompts(prompts, settings.eval_prompts_per_set),
                                 {"baseline": (None, EVAL_SETS)}, study.classifier(loaded.study.key), context.log.info,
                                 checkpoints(context, study, lineage))
    staged = spool([table], GENERATIONS, study.staging_dir, lineage)
    rates = eval_set_rates(table)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256),
                     metadata={f"refusal_rate/{name}": round(rates[name], 3) for name in EVAL_SETS if name in rates}
                     | {"n_judges_disagree": sum(table["judges_disagree"].to_pylist())})
