"""Linear probes that predict refusal, in and out of distribution, and the latent guard on the harmfulness direction."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.metadata import model_lineage, upstream_lineage
from pipelines.partitions import studies
from pipelines.resources import StudyResource
from refusal_core.chat import format_prompt
from refusal_core.directions import direction_row
from refusal_core.evaluation import bootstrap_interval
from refusal_core.features import refusal_members
from refusal_core.probes import best_layer, fitted_threshold, probe_scores, too_few
from refusal_core.prompts import wrapped_prompts
from refusal_core.readouts import feature_activations, projections, residual_vectors
from refusal_core.saes import study_saes
from refusal_core.scoring import answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.tables import LATENT_GUARD, PROBE_RESULTS, Spool, spool, to_json


def _behaviour(generations: pa.Table, labels: tuple[str, ...]) -> dict[str, bool]:
    """prompt id -> refused (substring judge) for the generations of the given labels."""
    rows = generations.filter(pc.is_in(generations["label"], pa.array(labels)))
    return dict(zip(rows["prompt_id"].to_pylist(), rows["refused_substring"].to_pylist()))


@dg.asset(partitions_def=studies, group_name="analyses", pool="gpu", kinds={"parquet", "pytorch"})
def refusal_probes(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                   eval_activations: pa.Table, baseline_generations: pa.Table, jailbreak_generations: pa.Table,
                   saes: pa.Table, feature_sets: pa.Table, category_directions: pa.Table) -> dg.Output[Spool]:
    """Logistic-regression probes of whether the model refuses, fitted on refused harmful vs answered harmless train prompts and tested on test prompts and on jailbreaks, for five feature sets."""
    loaded = study.load(context.partition_key)
    settings = loaded.study.settings
    # Train rows: stored harmful and harmless prompts, minus the prompts the judged jailbreaks wrap, labelled by
    # what the model does (refusal score at the first answer token): refused harmful vs answered harmless.
    wrapped = wrapped_prompts(prompts, jailbreak_generations)
    stored = prompts.filter(pc.and_(pc.is_in(prompts["prompt_id"], pc.unique(activations["prompt_id"])),
                                    pc.is_in(prompts["label"], pa.array(["harmful", "harmless"]))))
    stored = stored.filter(pc.invert(pc.is_in(stored["prompt_id"], pa.array(sorted(wrapped), pa.string())))).sort_by("prompt_id")
    texts = [format_prompt(loaded.tokenizer, t, loaded.study.chat_template) for t in stored["text"].to_pylist()]
    scores = refusal_score(answer_log_probs(loaded.model, loaded.tokenizer, texts, None, settings.batch_size),
                           refusal_token_ids(loaded.tokenizer)).tolist()
    train = {i: label == "harmful" for i, label, s in zip(stored["prompt_id"].to_pylist(), stored["label"].to_pylist(), scores)
             if (label == "harmful") == (s > 0)}
    tests = {"in_distribution": _behaviour(baseline_generations, ("harmful", "harmless")),
             "jailbreak": _behaviour(jailbreak_generations, ("jailbreak",))}
    items = study_saes(loaded, saes)

    def latents(name: str):
        members = refusal_members(feature_sets, name)
        return lambda table: feature_activations(table, prompts, items, members), len(members), None

    def direction(name: str):
        row = direction_row(category_directions, name)
        return lambda table: _column(projections(table, row)), 1, row["layer_index"]

    readers = {"refusal_features": latents("cossim_ap"), "random_latents": latents("random"),
               "refusal_direction": direction("refusal"), "harmfulness_direction": direction("harmfulness")}
    train_y = np.array([train[i] for i in sorted(train)], dtype=int)
    train_note = too_few(train_y, "The train set (stored harmful prompts refused, harmless answered)")
    if train_note is None:
        layers = sorted(set(activations["layer_index"].to_pylist()))
        by_layer = {layer: _select(residual_vectors(activations, layer), train)[0] for layer in layers}
        layer, accuracy = best_layer(by_layer, train_y, settings.seed)
        context.log.info("Dense residual probe: layer %d has the best cross-validated accuracy (%.3f).", layer, accuracy)
        readers["dense_residual"] = (lambda table, layer=layer: residual_vectors(table, layer), int(loaded.d_model), layer)
    else:
        readers["dense_residual"] = (None, int(loaded.d_model), None)
    rows = []
    for probe, (read, width, layer) in sorted(readers.items()):
        base = {"model_key": loaded.study.key, "probe": probe, "n_features": width, "layer_index": layer,
                "n_train_refused": int(train_y.sum()), "n_train_complied": int(len(train_y) - train_y.sum()),
                "n_seeds": settings.probe_seeds}
        sets = {name: _select(read(eval_activations), labels) if read else (None, np.array(list(labels.values()), dtype=int))
                for name, labels in tests.items()}
        notes = {name: train_note or too_few(y, f"The {name.replace('_', '-')} test set") for name, (_, y) in sets.items()}
        scored = {}
        if train_note is None:
            train_x, _ = _select(read(activations), train)
            scored = probe_scores(train_x, train_y, {n: s for n, s in sets.items() if notes[n] is None},
                                  settings.probe_seeds, settings.seed)
        for name, (_, y) in sets.items():
            row = base | {"test_set": name, "n_refused": int(y.sum()), "n_complied": int(len(y) - y.sum()), "note": notes[name]}
            if name in scored:
                row |= vars(scored[name])
            rows.append(row)
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        context.log.warning(note)
    table = pa.Table.from_pylist(rows, schema=PROBE_RESULTS)
    lineage = {**model_lineage(loaded), **upstream_lineage(
        prompts=prompts, activations=activations, eval_activations=eval_activations, saes=saes, feature_sets=feature_sets,
        baseline_generations=baseline_generations, jailbreak_generations=jailbreak_generations,
        category_directions=category_directions),
        "settings": to_json({"probe_seeds": settings.probe_seeds, "seed": settings.seed, "judge": "substring",
                             "train_labels": "refusal score > 0 at the first answer token",
                             "features": "mean over the post-instruction tokens; directions at their own place"})}
    staged = spool([table], PROBE_RESULTS, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"accuracy/{r['probe']}/{r['test_set']}": round(r["accuracy"], 3) for r in rows if r.get("accuracy") is not None})


@dg.asset(partitions_def=studies, group_name="analyses", kinds={"parquet"})
def latent_guard(context: dg.AssetExecutionContext, study: StudyResource, prompts: pa.Table, activations: pa.Table,
                 eval_activations: pa.Table, baseline_generations: pa.Table, jailbreak_generations: pa.Table,
                 category_directions: pa.Table) -> dg.Output[Spool]:
    """How often a harmful input is flagged by a threshold on the harmfulness direction, by one on the refusal direction, and by the substring judge on the model's own answer, on plain and jailbroken prompts."""
    key = context.partition_key
    seed = study.study(key).settings.seed
    families = dict(zip(prompts["prompt_id"].to_pylist(), prompts["source"].to_pylist()))
    judged = {**_behaviour(baseline_generations, ("harmful", "harmless")), **_behaviour(jailbreak_generations, ("jailbreak",))}
    labels = dict(zip(baseline_generations["prompt_id"].to_pylist(), baseline_generations["label"].to_pylist()))
    eval_sets: dict[str, list[str]] = {}
    for prompt_id in sorted(judged):
        name = labels.get(prompt_id) or f"jailbreak:{families[prompt_id]}"
        eval_sets.setdefault(name, []).append(prompt_id)
    classifiers = {}
    for name in ("harmfulness", "refusal"):
        row = direction_row(category_directions, name)
        threshold = fitted_threshold(activations, prompts, row, wrapped_prompts(prompts, jailbreak_generations))
        values = projections(eval_activations, row)
        classifiers[f"{name}_direction"] = (threshold, {i: v > threshold for i, v in values.items()})
    classifiers["substring_judge"] = (None, judged)
    rows = []
    for classifier, (threshold, flagged) in classifiers.items():
        for eval_set, ids in sorted(eval_sets.items()):
            verdicts = [flagged[i] for i in ids]
            low, high = bootstrap_interval(verdicts, seed=seed)
            rows.append({"model_key": key, "classifier": classifier, "eval_set": eval_set, "threshold": threshold,
                         "n_prompts": len(ids), "flagged_rate": float(np.mean(verdicts)), "ci_low": low, "ci_high": high})
    table = pa.Table.from_pylist(rows, schema=LATENT_GUARD)
    lineage = {**upstream_lineage(prompts=prompts, activations=activations, eval_activations=eval_activations,
                                  baseline_generations=baseline_generations, jailbreak_generations=jailbreak_generations,
                                  category_directions=category_directions),
               "settings": to_json({"bootstrap_seed": seed, "threshold": "best accuracy on stored harmful vs harmless prompts"})}
    staged = spool([table], LATENT_GUARD, study.staging_dir, lineage)
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"flagged/{r['classifier']}/{r['eval_set']}": round(r["flagged_rate"], 3) for r in rows})


def _column(values: dict[str, float]) -> tuple[list[str], np.ndarray]:
    ids = sorted(values)
    return ids, np.array([[values[i]] for i in ids])


def _select(read: tuple[list[str], np.ndarray], labels: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `read` (ids, features) for the prompts in `labels`, in id order, with their 0/1 labels."""
    ids, features = read
    index = {prompt_id: i for i, prompt_id in enumerate(ids)}
    missing = [i for i in labels if i not in index]
    if missing:
        raise ValueError(f"{len(missing)} prompts have no stored activations (e.g. {missing[0]}); re-materialize "
                         "activations and eval_activations.")
    chosen = sorted(labels)
    return features[[index[i] for i in chosen]], np.array([labels[i] for i in chosen], dtype=int)
