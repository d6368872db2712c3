"""Where refusal is decided: the refusal direction read along the template and the first answer tokens."""

import dagster as dg
import pyarrow as pa

from assets import checkpoints
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.directions import selected_direction
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.sequence import JAILBREAK_METHODS, LABELS, read_along_sequence
from refusal_core.tables import SEQUENCE_PROJECTIONS


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_along_sequence(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                           refusal_directions: pa.Table) -> dg.Output[Spool]:
    """Projection on the refusal direction at every layer, from the instruction's last token through the template to the first answer tokens, for harmful, harmless and jailbreak test prompts."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"prompts_per_label": settings.sequence_prompts,
                                    "new_tokens": settings.sequence_new_tokens, "labels": LABELS,
                                    "jailbreak_methods": JAILBREAK_METHODS})}
    read = read_along_sequence(loaded.study.key, loaded.model, loaded.tokenizer, prompts, loaded.study.chat_template,
                               selected_direction(refusal_directions)[1], settings.sequence_prompts,
                               settings.sequence_new_tokens, settings.batch_size, checkpoints(context, study, lineage))
    staged = spool([read.table()], SEQUENCE_PROJECTIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_prompts": read.chosen.num_rows})
