"""Upstream -> downstream: earlier-layer latents whose clamping lowers the later refusal features."""

import dagster as dg
import pyarrow as pa

from assets import noted
from pipelines.metadata import content_sha256, model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt, instruction_offset, post_instruction_tokens
from refusal_core.edges import upstream_edges
from refusal_core.features import refusal_members
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.prompts import prompts_of
from refusal_core.readouts import latent_activations
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.tables import FEATURE_EDGES


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def feature_edges(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                  saes: pa.Table, feature_sets: pa.Table) -> dg.Output[Spool]:
    """Edges from earlier-layer latents to the refusal features of the last SAE layer: the relative change of each refusal feature (and of their sum) when one upstream latent is clamped, on harmful prompts."""
    loaded = study.load(context.partition_key)
    settings, template = loaded.study.settings, loaded.study.chat_template
    skip = instruction_offset(loaded.tokenizer, template)
    lineage = {**model_lineage(loaded), **upstream_lineage(prompts=prompts, activations=activations, saes=saes,
                                                           feature_sets=feature_sets),
               "prompt_set_sha256": content_sha256(prompts),
               "settings": to_json({"upstream_candidates": settings.upstream_candidates, "edge_prompts": settings.edge_prompts,
                                    "upstream_set_size": settings.upstream_set_size,
                                    "clamp_multiplier": settings.clamp_multiplier, "skip_first": skip})}
    if saes.num_rows == 0:
        staged = spool([], FEATURE_EDGES, study.staging_dir, lineage, noted(context, no_saes_note(loaded.study.key)))
        return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={"n_candidates": 0})
    items = study_saes(loaded, saes)
    rows, _, latents = latent_activations(activations, prompts, items)
    texts = [format_prompt(loaded.tokenizer, t, template)
             for t in prompts_of(prompts, "harmful", "train", settings.edge_prompts)["text"].to_pylist()]
    edges = upstream_edges(loaded.study.key, loaded.model, loaded.tokenizer, items, refusal_members(feature_sets), latents,
                           [row["label"] for row in rows], texts, post_instruction_tokens(loaded.tokenizer, template),
                           settings.upstream_candidates, settings.upstream_set_size, settings.clamp_multiplier, skip,
                           settings.seed, settings.batch_size)
    staged = spool([edges.table()], FEATURE_EDGES, study.staging_dir, lineage, noted(context, *edges.notes))
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        "n_candidates": len(edges.candidates), "downstream_layer": edges.downstream_layer,
        "n_downstream": len(edges.downstream),
        "upstream_set": ", ".join(f"L{layer}/{latent} ({edges.total_effect[(layer, latent)]:+.2f})"
                                  for layer, latent in edges.upstream_set)})
