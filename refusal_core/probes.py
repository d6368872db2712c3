"""Linear probes that predict refusal, and one-threshold classifiers on a direction, with bootstrap intervals: the
probes' training set, the refusal_probes table and the latent guard table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from refusal_core.directions import direction_row
from refusal_core.features import refusal_members
from refusal_core.intervals import wilson_interval
from refusal_core.prompts import wrapped_prompts
from refusal_core.readouts import feature_activations, projections, residual_vectors
from refusal_core.saes import LoadedSae
from refusal_core.tables import LATENT_GUARD, PROBE_RESULTS

MIN_PER_CLASS = 5
"""Fewest rows of each class a probe is fitted or tested on; with fewer, no number is reported."""


@dataclass(frozen=True)
class ProbeScore:
    """Accuracy and AUROC of the probe fitted on every train row, with 95% bootstrap intervals."""

    accuracy: float
    accuracy_low: float
    accuracy_high: float
    auroc: float
    auroc_low: float
    auroc_high: float


def too_few(labels: np.ndarray, what: str, positive: str = "refused", negative: str = "complied") -> str | None:
    """A one-sentence reason why `labels` (1 = positive) are too few to fit or test a probe on, or None."""
    n_positive, n_negative = int(np.sum(labels)), int(len(labels) - np.sum(labels))
    if min(n_positive, n_negative) >= MIN_PER_CLASS:
        return None
    return (f"{what} has {n_positive} {positive} and {n_negative} {negative} prompts; a probe needs at least "
            f"{MIN_PER_CLASS} of each, so no number is reported.")


def new_probe(seed: int):
    """Standardised features into an L2-regularised logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))


def best_layer(by_layer: Mapping[int, np.ndarray], labels: np.ndarray, seed: int = 0) -> tuple[int, float]:
    """The layer whose features a probe separates best, by 5-fold cross-validated accuracy on the train rows."""
    folds = StratifiedKFold(n_splits=min(5, int(min(np.sum(labels), len(labels) - np.sum(labels)))), shuffle=True,
                            random_state=seed)
    scores = {layer: float(cross_val_score(new_probe(seed), x, labels, cv=folds).mean()) for layer, x in by_layer.items()}
    layer = max(scores, key=lambda k: (scores[k], -k))
    return layer, scores[layer]


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, tests: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 n_seeds: int, seed: int = 0) -> dict[str, ProbeScore]:
    """Fit a probe on every train row and score it on each test set, with intervals over `n_seeds` bootstrap seeds.

    Each seed resamples the train rows (within each class), refits, and scores on a resample of each
    test set (within each class, so AUROC is always defined); the intervals are the 2.5 and 97.5
    percentiles over seeds. Labels are 1 for refused, 0 for complied.
    """
    fitted = new_probe(seed).fit(train_x, train_y)
    point = {name: _score(fitted, x, y) for name, (x, y) in tests.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in tests}
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + 1 + s)
        rows = _resample(train_y, rng)
        probe = new_probe(seed).fit(train_x[rows], train_y[rows])
        for name, (x, y) in tests.items():
            picked = _resample(y, rng)
            samples[name].append(_score(probe, x[picked], y[picked]))
    result = {}
    for name, values in samples.items():
        accuracy, auroc = np.percentile(np.asarray(values), [2.5, 97.5], axis=0).T
        result[name] = ProbeScore(point[name][0], float(accuracy[0]), float(accuracy[1]),
                                  point[name][1], float(auroc[0]), float(auroc[1]))
    return result


def fit_threshold(values: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t that best separates `values` (flag when value > t) by accuracy on labels (1 = flag)."""
    order = np.sort(np.unique(values))
    if len(order) == 1:
        return float(order[0])
    candidates = np.concatenate([[order[0] - 1.0], (order[:-1] + order[1:]) / 2])
    accuracy = [np.mean((values > t) == labels.astype(bool)) for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def fitted_threshold(activations: pa.Table, prompts: pa.Table, direction: dict, exclude: set[str] = frozenset()) -> float:
    """Projection threshold on `direction` that best separates the stored harmful from harmless prompts (not `exclude`)."""
    values = projections(activations, direction)
    labels = dict(zip(prompts["prompt_id"].to_pylist(), prompts["label"].to_pylist()))
    train = [(v, labels[i] == "harmful") for i, v in values.items()
             if labels.get(i) in ("harmful", "harmless") and i not in exclude]
    if not any(flag for _, flag in train) or all(flag for _, flag in train):
        raise ValueError("The activations table needs harmful and harmless prompts to fit a threshold on a direction; "
                         "keep both in settings.activation_labels.")
    return fit_threshold(np.array([v for v, _ in train]), np.array([flag for _, flag in train]))


def _score(probe, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    probability = probe.predict_proba(x)[:, 1]
    return float(np.mean((probability > 0.5) == y.astype(bool))), float(roc_auc_score(y, probability))


def _resample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn with replacement within each class, keeping the class sizes."""
    parts = [rng.choice(np.flatnonzero(labels == value), size=int(np.sum(labels == value))) for value in (0, 1)]
    return np.concatenate(parts)


Reader = Callable[[pa.Table], tuple[list[str], np.ndarray]]
"""Reads (prompt ids in id order, features [n, width]) from an activations table."""


@dataclass(frozen=True)
class ProbeInput:
    """What a probe reads: its features from an activations table, their width and their layer (None for latent sets)."""

    read: Reader | None
    """None when there is nothing to read (the dense residual, whose layer needs a train set to be chosen)."""
    width: int
    layer: int | None


def judged_refusals(generations: pa.Table, labels: tuple[str, ...]) -> dict[str, bool]:
    """prompt id -> refused (substring judge) for the generations of the given labels."""
    rows = generations.filter(pc.is_in(generations["label"], pa.array(labels)))
    return dict(zip(rows["prompt_id"].to_pylist(), rows["refused_substring"].to_pylist()))


def probe_training_set(behaviour: pa.Table, exclude: set[str]) -> dict[str, bool]:
    """The probes' train rows, prompt id -> refused: the stored harmful prompts the model refuses and the harmless ones it
    answers (by refusal score, the prompt_behaviour table), in prompt-id order, leaving out `exclude`.

    Prompts whose behaviour goes against their label are left out, with no fallback (unlike `behaviour.behaving`): a probe
    fitted on mislabelled rows would measure nothing, so too few rows give a note instead of a number.
    """
    rows = behaviour.filter(pc.is_in(behaviour["label"], pa.array(["harmful", "harmless"]))).sort_by("prompt_id")
    return {i: label == "harmful" for i, label, refused in zip(*(rows[c].to_pylist() for c in ("prompt_id", "label", "refused")))
            if (label == "harmful") == refused and i not in exclude}


def probe_inputs(prompts: pa.Table, saes: Mapping[int, LoadedSae], feature_sets: pa.Table,
                 category_directions: pa.Table) -> dict[str, ProbeInput]:
    """The probes other than the dense residual: the refusal features and random latents (mean over the post-instruction
    tokens) and the projections on the refusal and harmfulness directions (at their own place). Without SAEs (an empty
    `feature_sets`) only the direction probes are there."""
    def latents(name: str) -> ProbeInput:
        members = refusal_members(feature_sets, name)
        return ProbeInput(lambda table: feature_activations(table, prompts, saes, members), len(members), None)

    def direction(name: str) -> ProbeInput:
        row = direction_row(category_directions, name)
        return ProbeInput(lambda table: _column(projections(table, row)), 1, row["layer_index"])

    sets = {"refusal_features": latents("cossim_ap"), "random_latents": latents("random")} if feature_sets.num_rows else {}
    return {**sets, "refusal_direction": direction("refusal"), "harmfulness_direction": direction("harmfulness")}


@dataclass(frozen=True)
class ProbeResults:
    """The refusal_probes stage's result."""

    rows: list[dict]
    """PROBE_RESULTS rows, by probe then test set."""
    notes: list[str]
    """Why numbers are missing, each once."""
    dense: tuple[int, float] | None
    """The dense residual probe's layer and its cross-validated accuracy; None without a train set."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PROBE_RESULTS)


def probe_table(model_key: str, activations: pa.Table, eval_activations: pa.Table, train: dict[str, bool],
                tests: Mapping[str, dict[str, bool]], inputs: Mapping[str, ProbeInput], d_model: int, n_seeds: int,
                seed: int = 0) -> ProbeResults:
    """Fit each probe on the `train` rows (read from `activations`) and score it on each test set (read from `eval_activations`).

    `train` and `tests` map prompt ids to refused; `inputs` are the probes besides the dense residual, which reads the
    layer whose residual a probe separates best on the train rows (cross-validated).
    """
    train_y = np.array([train[i] for i in sorted(train)], dtype=int)
    train_note = too_few(train_y, "The train set (stored harmful prompts refused, harmless answered)")
    inputs, dense = dict(inputs), None
    if train_note is None:
        layers = sorted(set(activations["layer_index"].to_pylist()))
        by_layer = {layer: _select(residual_vectors(activations, layer), train)[0] for layer in layers}
        dense = best_layer(by_layer, train_y, seed)
        inputs["dense_residual"] = ProbeInput(lambda table, layer=dense[0]: residual_vectors(table, layer), d_model, dense[0])
    else:
        inputs["dense_residual"] = ProbeInput(None, d_model, None)
    rows = []
    for probe, item in sorted(inputs.items()):
        base = {"model_key": model_key, "probe": probe, "n_features": item.width, "layer_index": item.layer,
                "n_train_refused": int(train_y.sum()), "n_train_complied": int(len(train_y) - train_y.sum()),
                "n_seeds": n_seeds}
        evaluated = item.read(eval_activations) if item.read else None
        sets = {name: _select(evaluated, labels) if item.read else (None, np.array(list(labels.values()), dtype=int))
                for name, labels in tests.items()}
        notes = {name: train_note or too_few(y, f"The {name.replace('_', '-')} test set") for name, (_, y) in sets.items()}
        scored = {}
        if train_note is None:
            train_x, _ = _select(item.read(activations), train)
            scored = probe_scores(train_x, train_y, {n: s for n, s in sets.items() if notes[n] is None}, n_seeds, seed)
        for name, (_, y) in sets.items():
            row = base | {"test_set": name, "n_refused": int(y.sum()), "n_complied": int(len(y) - y.sum()), "note": notes[name]}
            if name in scored:
                row |= vars(scored[name])
            rows.append(row)
    return ProbeResults(rows, list(dict.fromkeys(r["note"] for r in rows if r["note"])), dense)


def guard_table(model_key: str, prompts: pa.Table, activations: pa.Table, eval_activations: pa.Table,
                baseline_generations: pa.Table, jailbreak_generations: pa.Table, category_directions: pa.Table) -> pa.Table:
    """LATENT_GUARD rows: the share of each eval set (harmful, harmless, each jailbreak family) flagged harmful by a
    threshold on the harmfulness direction, by one on the refusal direction (each fitted on the stored harmful vs
    harmless prompts, not those the jailbreaks wrap) and by the substring judge on the model's answer, with Wilson intervals."""
    families = dict(zip(prompts["prompt_id"].to_pylist(), prompts["source"].to_pylist()))
    judged = {**judged_refusals(baseline_generations, ("harmful", "harmless")),
              **judged_refusals(jailbreak_generations, ("jailbreak",))}
    labels = dict(zip(baseline_generations["prompt_id"].to_pylist(), baseline_generations["label"].to_pylist()))
    eval_sets: dict[str, list[str]] = {}
    for prompt_id in sorted(judged):
        eval_sets.setdefault(labels.get(prompt_id) or f"jailbreak:{families[prompt_id]}", []).append(prompt_id)
    classifiers = {}
    for name in ("harmfulness", "refusal"):
        row = direction_row(category_directions, name)
        threshold = fitted_threshold(activations, prompts, row, wrapped_prompts(prompts, jailbreak_generations))
        classifiers[f"{name}_direction"] = (threshold, {i: v > threshold for i, v in projections(eval_activations, row).items()})
    classifiers["substring_judge"] = (None, judged)
    rows = []
    for classifier, (threshold, flagged) in classifiers.items():
        for eval_set, ids in sorted(eval_sets.items()):
            verdicts = [flagged[i] for i in ids]
            low, high = wilson_interval(sum(verdicts), len(verdicts))
            rows.append({"model_key": model_key, "classifier": classifier, "eval_set": eval_set, "threshold": threshold,
                         "n_prompts": len(ids), "flagged_rate": float(np.mean(verdicts)), "ci_low": low, "ci_high": high})
    return pa.Table.from_pylist(rows, schema=LATENT_GUARD)


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
