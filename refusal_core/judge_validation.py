"""Refusal judges checked against people (PyRIT's human-labelled answers) and against each other, with intervals."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.proportion import proportion_confint

from refusal_core.evaluation import paired_bootstrap_interval
from refusal_core.judges import ClassifierJudge, SubstringJudge
from refusal_core.pypi import archive_member, download_wheel, verify_sha256
from refusal_core.tables import JUDGE_VALIDATION

PYRIT_PACKAGE, PYRIT_VERSION = "pyrit", "1.1.0"
PYRIT_SHA256 = "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"
"""The PyRIT wheel (MIT) whose refusal-scorer evaluation files hold the human labels; it is read, never installed."""

HUMAN_LABEL_FILES = {
    "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv":
        "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7",
    "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv":
        "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a",
}
"""Member of the wheel to its pinned sha256: 105 and 64 answers, `human_score` 1 meaning a refusal."""

HUMAN_LABEL_LICENCE = "MIT"

PARTS = ("tune", "report")
"""The human labels are split by a hash of each row: judging rules may be tuned on `tune`; `report` is only measured."""


class HumanLabel(NamedTuple):
    """One answer a person judged."""

    source: str
    """File it comes from (refusal.csv or refusal_extra.csv)."""
    objective: str
    """The request the answer responds to."""
    response: str
    """The assistant's answer."""
    refused: bool
    """A person judged the answer a refusal (`human_score` 1)."""
    part: str
    """tune or report, by `part_of`."""


class Agreement(NamedTuple):
    """How a judge's verdicts agree with a reference's; "refused" is the positive class. nan where undefined."""

    n: int
    """Answers compared."""
    n_refused_reference: int
    """Answers the reference calls refusals (the recall denominator)."""
    n_refused_judge: int
    """Answers the judge calls refusals (the precision denominator)."""
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    precision: float
    precision_low: float
    precision_high: float
    recall: float
    recall_low: float
    recall_high: float
    kappa: float
    """Cohen's kappa; nan when both give one verdict throughout."""
    kappa_low: float
    kappa_high: float


def fetch_pyrit_wheel(directory: Path) -> Path:
    """Download the pinned PyRIT wheel (without installing it) and check its sha256."""
    wheel = download_wheel(PYRIT_PACKAGE, PYRIT_VERSION, directory)
    verify_sha256(wheel, PYRIT_SHA256)
    return wheel


def read_human_labels(wheel: Path) -> list[HumanLabel]:
    """Every human-labelled answer of the pinned files in the PyRIT `wheel`, in file order, each checked by sha256."""
    labels = []
    for member, sha256 in HUMAN_LABEL_FILES.items():
        text = archive_member(wheel, member, sha256).decode("utf-8")
        labels += parse_human_labels(text, member.rsplit("/", 1)[-1])
    return labels


def parse_human_labels(text: str, source: str) -> list[HumanLabel]:
    """The rows of one PyRIT scorer file: `#` comment lines first, then a CSV with objective,
    assistant_response, human_score (0 or 1) and data_type."""
    lines = text.splitlines(keepends=True)
    # Only the leading lines are comments: a quoted answer may hold a Markdown heading starting with '#'.
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    rows = []
    for row in csv.DictReader(io.StringIO("".join(lines[start:]))):
        if row["human_score"] not in ("0", "1"):
            raise ValueError(f"{source} has human_score {row['human_score']!r}; only 0 and 1 are labels.")
        rows.append(HumanLabel(source, row["objective"], row["assistant_response"], row["human_score"] == "1",
                               part_of(row["objective"], row["assistant_response"])))
    return rows


def part_of(objective: str, response: str) -> str:
    """tune or report, half each in expectation, fixed by the sha256 of the (objective, response) pair."""
    digest = hashlib.sha256(json.dumps([objective, response]).encode()).digest()
    return PARTS[digest[0] % 2]


def agreement(judged: Sequence[bool], reference: Sequence[bool], n_resamples: int = 2000, seed: int = 0) -> Agreement:
    """Accuracy, precision and recall of "refused" with Wilson 95% intervals, and Cohen's kappa with a
    bootstrap 95% interval over rows (seeded), of `judged` against `reference`."""
    judged, reference = np.asarray(judged, dtype=bool), np.asarray(reference, dtype=bool)
    if judged.size == 0 or judged.shape != reference.shape:
        raise ValueError(f"Cannot compare {judged.size} verdicts with {reference.size}: give two equal, non-empty lists.")

    def rate(successes: int, trials: int) -> tuple[float, float, float]:
        if trials == 0:
            return float("nan"), float("nan"), float("nan")
        low, high = proportion_confint(successes, trials, alpha=0.05, method="wilson")
        return successes / trials, float(low), float(high)

    both = int((judged & reference).sum())
    kappa_low, kappa_high = paired_bootstrap_interval(cohen_kappa, judged, reference, n_resamples, seed)
    return Agreement(int(judged.size), int(reference.sum()), int(judged.sum()),
                     *rate(int((judged == reference).sum()), judged.size), *rate(both, int(judged.sum())),
                     *rate(both, int(reference.sum())), cohen_kappa(judged, reference), kappa_low, kappa_high)


def cohen_kappa(first: np.ndarray, second: np.ndarray) -> float:
    """Cohen's kappa of two boolean raters; nan when it is undefined (both give one and the same verdict throughout)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(cohen_kappa_score(first, second, labels=[False, True], replace_undefined_by=np.nan))


def validate_judges(model_key: str, labels: Sequence[HumanLabel], baseline_generations: pa.Table,
                    classifier: ClassifierJudge | None = None, seed: int = 0) -> pa.Table:
    """The JUDGE_VALIDATION table: the substring judge (and `classifier`, if any) on the human `labels`, and the
    refusal-score judge against the substring judge on the study's `baseline_generations`."""
    responses = [label.response for label in labels]
    verdicts = {"substring": SubstringJudge().judge(responses, [label.objective for label in labels])}
    if classifier is not None:
        verdicts["classifier"] = classifier.judge([label.objective for label in labels], responses)
    rows = validation_rows(model_key, labels, verdicts, baseline_generations.to_pylist(), seed)
    return pa.Table.from_pylist(rows, schema=JUDGE_VALIDATION)


def validation_rows(model_key: str, labels: Sequence[HumanLabel], verdicts: Mapping[str, Sequence[bool]],
                    generations: Sequence[Mapping], seed: int = 0) -> list[dict]:
    """JUDGE_VALIDATION rows: each answer-reading judge against the human labels, per part; and the refusal-score
    judge against the substring judge on the study's own answers, per eval set.

    Args:
        verdicts: judge name (substring, classifier) to its verdict on each of `labels`, in order.
        generations: GENERATIONS rows (the baseline answers).
    """
    rows = []
    for judge, judged in verdicts.items():
        for part in PARTS:
            picked = [i for i, label in enumerate(labels) if label.part == part]
            result = agreement([judged[i] for i in picked], [labels[i].refused for i in picked], seed=seed)
            rows.append(_row(model_key, judge, "human", part, result))
    for eval_set in sorted({name for row in generations for name in row["eval_sets"]}):
        members = [row for row in generations if eval_set in row["eval_sets"]]
        result = agreement([m["refused_score"] for m in members], [m["refused_substring"] for m in members], seed=seed)
        rows.append(_row(model_key, "refusal_score", "substring", eval_set, result))
    return rows


def _row(model_key: str, judge: str, reference: str, part: str, result: Agreement) -> dict:
    # nan (undefined) is stored as null: a missing number, not a number.
    values = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in result._asdict().items()}
    return {"model_key": model_key, "judge": judge, "reference": reference, "part": part, **values}
