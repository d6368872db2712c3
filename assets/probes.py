"""Linear probes that predict refusal, in and out of distribution, and the latent guard on the harmfulness direction."""

import dagster as dg
import pyarrow as pa

from assets import noted
from pipelines.metadata import model_lineage, upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.probes import guard_table, judged_refusals, probe_inputs, probe_table, probe_training_set
from refusal_core.prompts import wrapped_prompts
from refusal_core.saes import no_saes_note, study_saes
from refusal_core.tables import LATENT_GUARD, PROBE_RESULTS


@study_asset(group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_probes(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                   eval_activations: pa.Table, baseline_generations: pa.Table, jailbreak_generations: pa.Table,
                   saes: pa.Table, feature_sets: pa.Table, category_directions: pa.Table,
                   prompt_behaviour: pa.Table) -> dg.Output[Spool]:
    """Logistic-regression probes of whether the model refuses, fitted on refused harmful vs answered harmless train prompts and tested on test prompts and on jailbreaks, for five feature sets."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    train = probe_training_set(prompt_behaviour, wrapped_prompts(prompts, jailbreak_generations))
    tests = {"in_distribution": judged_refusals(baseline_generations, ("harmful", "harmless")),
             "jailbreak": judged_refusals(jailbreak_generations, ("jailbreak",))}
    inputs = probe_inputs(prompts, study_saes(loaded, saes), feature_sets, category_directions)
    result = probe_table(loaded.study.key, activations, eval_activations, train, tests, inputs, int(loaded.d_model),
                         settings.probe_seeds, settings.seed)
    if result.dense:
        context.log.info("Dense residual probe: layer %d has the best cross-validated accuracy (%.3f).", *result.dense)
    lineage = {**model_lineage(loaded), **upstream_lineage(
        prompts=prompts, activations=activations, eval_activations=eval_activations, saes=saes, feature_sets=feature_sets,
        baseline_generations=baseline_generations, jailbreak_generations=jailbreak_generations,
        category_directions=category_directions, prompt_behaviour=prompt_behaviour),
        "settings": to_json({"probe_seeds": settings.probe_seeds, "seed": settings.seed, "judge": "substring",
                             "train_labels": "refusal score > 0 at the first answer token",
                             "features": "mean over the post-instruction tokens; directions at their own place"})}
    notes = noted(context, None if saes.num_rows else no_saes_note(loaded.study.key), *result.notes)
    staged = spool([result.table()], PROBE_RESULTS, study.staging_dir, lineage, notes)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"accuracy/{r['probe']}/{r['test_set']}": round(r["accuracy"], 3) for r in result.rows if r.get("accuracy") is not None})


@study_asset(group_name="analyses", kinds={"parquet"})
def latent_guard(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                 eval_activations: pa.Table, baseline_generations: pa.Table, jailbreak_generations: pa.Table,
                 category_directions: pa.Table) -> dg.Output[Spool]:
    """How often a harmful input is flagged by a threshold on the harmfulness direction, by one on the refusal direction, and by the substring judge on the model's own answer, on plain and jailbroken prompts."""
    key = context.partition_key
    table = guard_table(key, prompts, activations, eval_activations, baseline_generations, jailbreak_generations,
                        category_directions)
    lineage = {**upstream_lineage(prompts=prompts, activations=activations, eval_activations=eval_activations,
                                  baseline_generations=baseline_generations, jailbreak_generations=jailbreak_generations,
                                  category_directions=category_directions),
               "settings": to_json({"interval": "wilson", "threshold": "best accuracy on stored harmful vs harmless prompts"})}
    staged = spool([table], LATENT_GUARD, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"flagged/{r['classifier']}/{r['eval_set']}": round(r["flagged_rate"], 3) for r in table.to_pylist()})
