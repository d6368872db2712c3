"""Where refusal is decided: the refusal direction read along the template and the first answer tokens."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt, post_instruction_tokens
from refusal_core.directions import selected_direction
from refusal_core.generation import generate
from refusal_core.prompts import prompts_of
from refusal_core.sequence import sequence_projections
from refusal_core.tables import SEQUENCE_PROJECTIONS, Spool, spool, to_json

LABELS = ("harmful", "harmless", "jailbreak")
JAILBREAK_METHODS = ("past_tense", "future_tense")


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_along_sequence(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table,
                           refusal_directions: pa.Table) -> dg.Output[Spool]:
    """Projection on the refusal direction at every layer, from the instruction's last token through the template to the first answer tokens, for harmful, harmless and jailbreak test prompts."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    _, direction = selected_direction(refusal_directions)
    template = loaded.study.chat_template
    chosen = pa.concat_tables([
        prompts_of(prompts, "harmful", "test", settings.sequence_prompts, "harmbench"),
        prompts_of(prompts, "harmless", "test", settings.sequence_prompts),
        # Tense reformulations: jailbreaks as short as the prompts they rewrite (a DAN template is ~700 tokens).
        prompts_of(prompts.filter(pc.is_in(prompts["jailbreak_method"], pa.array(JAILBREAK_METHODS))), "jailbreak", "test",
                   settings.sequence_prompts),
    ])
    texts = [format_prompt(loaded.tokenizer, t, template) for t in chosen["text"].to_pylist()]
    answers = generate(loaded.model, loaded.tokenizer, texts, settings.sequence_new_tokens, settings.batch_size)
    n_template = len(post_instruction_tokens(loaded.tokenizer, template))
    layers = list(range(loaded.n_layers))
    ids, labels = chosen["prompt_id"].to_pylist(), chosen["label"].to_pylist()
    columns = {name: [] for name in SEQUENCE_PROJECTIONS.names}
    for item in sequence_projections(loaded.model, loaded.tokenizer, texts, answers, n_template, layers, direction,
                                     settings.batch_size):
        for layer, values in zip(layers, item.projections.tolist()):
            columns["model_key"] += [loaded.study.key] * len(values)
            columns["prompt_id"] += [ids[item.index]] * len(values)
            columns["label"] += [labels[item.index]] * len(values)
            columns["layer_index"] += [layer] * len(values)
            columns["position"] += item.positions
            columns["token"] += item.tokens
            columns["projection"] += values
    table = pa.Table.from_pydict(columns, schema=SEQUENCE_PROJECTIONS)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, refusal_directions=refusal_directions),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"prompts_per_label": settings.sequence_prompts,
                                    "new_tokens": settings.sequence_new_tokens, "labels": LABELS,
                                    "jailbreak_methods": JAILBREAK_METHODS})}
    staged = spool([table], SEQUENCE_PROJECTIONS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_prompts": chosen.num_rows})
