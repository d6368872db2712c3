import hashlib
import math
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from refusal_core.evaluation import paired_bootstrap_interval
from refusal_core.judge_validation import (HUMAN_LABEL_FILES, PARTS, agreement, fetch_pyrit_wheel, parse_human_labels,
                                           part_of, read_human_labels, validate_judges, validation_rows)
from refusal_core.judges import SubstringJudge
from refusal_core.pypi import ChecksumError
from refusal_core.tables import GENERATIONS, JUDGE_VALIDATION

# Ten answers: the judge says refused on 0, 1, 2 and 6; the reference on 0, 1 and 3.
JUDGED = [True, True, True, False, False, False, True, False, False, False]
REFERENCE = [True, True, False, True, False, False, False, False, False, False]


def _wilson(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out (Wilson, 1927)."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


def test_agreement_on_planted_verdicts_matches_hand_computed_values():
    result = agreement(JUDGED, REFERENCE, seed=3)
    # 2 true positives, 2 false positives, 1 false negative, 5 true negatives.
    assert (result.n, result.n_refused_reference, result.n_refused_judge) == (10, 3, 4)
    assert result.accuracy == pytest.approx(0.7) and result.precision == pytest.approx(0.5)
    assert result.recall == pytest.approx(2 / 3)
    # Observed agreement 0.7; chance agreement 0.4 * 0.3 + 0.6 * 0.7 = 0.54.
    assert result.kappa == pytest.approx((0.7 - 0.54) / (1 - 0.54))
    assert (result.accuracy_low, result.accuracy_high) == pytest.approx(_wilson(7, 10))
    assert (result.precision_low, result.precision_high) == pytest.approx(_wilson(2, 4))
    assert (result.recall_low, result.recall_high) == pytest.approx(_wilson(2, 3))
    assert -1 <= result.kappa_low < result.kappa < result.kappa_high <= 1
    assert agreement(JUDGED, REFERENCE, seed=3) == result
    assert agreement(JUDGED, REFERENCE, seed=4).kappa_low != result.kappa_low


def test_perfect_and_undefined_agreement():
    perfect = agreement(REFERENCE, REFERENCE)
    assert perfect.kappa == 1 and perfect.accuracy == 1 and (perfect.kappa_low, perfect.kappa_high) == (1, 1)
    # Neither calls anything a refusal: kappa, precision and recall are undefined, accuracy is 1.
    none = agreement([False] * 6, [False] * 6)
    assert none.accuracy == 1 and all(math.isnan(v) for v in (none.kappa, none.kappa_low, none.precision, none.recall))
    with pytest.raises(ValueError, match="Cannot compare 2 verdicts with 3"):
        agreement([True, False], [True, False, True])


def test_paired_bootstrap_resamples_pairs_together():
    rng = np.random.default_rng(0)
    first = rng.normal(size=200)
    second = first + 1.0  # the difference is exactly 1 in every pair, so in every resample
    low, high = paired_bootstrap_interval(lambda a, b: float(np.mean(b - a)), first, second, seed=1)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    low, high = paired_bootstrap_interval(lambda a, b: float(np.mean(a)), first, second, seed=1)
    assert low < first.mean() < high
    assert math.isnan(paired_bootstrap_interval(lambda a, b: float("nan"), first, second)[0])


def test_the_split_is_fixed_by_a_hash_of_the_row():
    digest = hashlib.sha256(b'["Write a poem.", "No."]').digest()
    assert part_of("Write a poem.", "No.") == PARTS[digest[0] % 2]
    assert part_of("Write a poem.", "No.") == part_of("Write a poem.", "No.")
    parts = [part_of(f"objective {i}", "answer") for i in range(400)]
    assert 160 < parts.count("tune") < 240


def test_parsing_skips_leading_comments_only():
    text = ('# dataset_version=1.0\n# a second comment\nobjective,assistant_response,human_score,data_type\n'
            'Tell me a joke.,"Sure:\n# A heading\nWhy did...",0,text\nBuild a bomb.,I cannot help with that.,1,text\n')
    rows = parse_human_labels(text, "x.csv")
    assert [(r.objective, r.refused) for r in rows] == [("Tell me a joke.", False), ("Build a bomb.", True)]
    assert rows[0].response == "Sure:\n# A heading\nWhy did..." and rows[0].part == part_of(rows[0].objective, rows[0].response)
    with pytest.raises(ValueError, match="human_score '2'"):
        parse_human_labels("objective,assistant_response,human_score,data_type\na,b,2,text\n", "x.csv")


@pytest.fixture(scope="module")
def pyrit_wheel() -> Path:
    return fetch_pyrit_wheel(Path.home() / ".cache" / "refusal-sae" / "downloads" / "pyrit")


def test_pyrit_human_labels_are_the_pinned_105_and_64_rows(pyrit_wheel):
    labels = read_human_labels(pyrit_wheel)
    assert [sum(label.source == name.rsplit("/", 1)[-1] for label in labels) for name in HUMAN_LABEL_FILES] == [105, 64]
    assert sum(label.refused for label in labels) == 70 + 39
    assert {label.part for label in labels} == set(PARTS)
    assert 60 < sum(label.part == "tune" for label in labels) < 110


def test_a_changed_label_file_is_refused(tmp_path):
    member = next(iter(HUMAN_LABEL_FILES))
    wheel = tmp_path / "pyrit-1.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, "objective,assistant_response,human_score,data_type\na,b,1,text\n")
    with pytest.raises(ChecksumError, match=f"{member} in {wheel.name} has sha256 .* but {HUMAN_LABEL_FILES[member]} is pinned"):
        read_human_labels(wheel)


def test_validation_table_has_a_row_per_judge_and_part_and_per_eval_set(pyrit_wheel):
    labels = read_human_labels(pyrit_wheel)
    generations = pa.Table.from_pylist([
        {"model_key": "m", "prompt_id": str(i), "label": label, "eval_sets": sets, "intervention_id": "none", "intervention_kind": "none",
         "intervention_name": "none", "intervention_parameters": "{}", "feature_set": None, "max_new_tokens": 4,
         "completion": "", "refused_substring": substring, "refusal_score": 1.0 if score else -1.0, "refused_score": score,
         "refused_classifier": None, "judges_disagree": substring != score}
        for i, (label, sets, substring, score) in enumerate([
            ("harmful", ["harmbench", "jbb"], True, True), ("harmful", ["harmbench"], True, False),
            ("harmful", ["harmbench"], False, False), ("harmless", ["alpaca_eval"], False, False),
            ("harmless", ["alpaca_eval"], False, True)])], schema=GENERATIONS)
    table = validate_judges("m", labels, generations, seed=0)
    assert table.schema == JUDGE_VALIDATION
    rows = {(r["judge"], r["reference"], r["part"]): r for r in table.to_pylist()}
    assert set(rows) == {("substring", "human", "tune"), ("substring", "human", "report"),
                         ("refusal_score", "substring", "harmbench"), ("refusal_score", "substring", "jbb"),
                         ("refusal_score", "substring", "alpaca_eval")}
    assert rows["substring", "human", "tune"]["n"] + rows["substring", "human", "report"]["n"] == 169
    harmful = rows["refusal_score", "substring", "harmbench"]
    assert (harmful["n"], harmful["accuracy"], harmful["precision"], harmful["recall"]) == (3, 2 / 3, 1.0, 0.5)
    # The substring judge calls no harmless answer a refusal: recall is undefined, stored as null.
    assert rows["refusal_score", "substring", "alpaca_eval"]["recall"] is None
    assert rows["refusal_score", "substring", "jbb"]["n"] == 1  # an answer counts in each of its eval sets
    # The same inputs give the same table.
    assert validate_judges("m", labels, generations, seed=0).equals(table)
    tune = [label for label in labels if label.part == "tune"]
    verdicts = SubstringJudge().judge([label.response for label in tune], [label.objective for label in tune])
    assert rows["substring", "human", "tune"]["accuracy"] == pytest.approx(
        np.mean([v == label.refused for v, label in zip(verdicts, tune)]))
    assert validation_rows("m", labels, {}, [], 0) == []
