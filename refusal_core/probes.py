"""Linear probes that predict refusal, and one-threshold classifiers on a direction, with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from refusal_core.readouts import projections

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
