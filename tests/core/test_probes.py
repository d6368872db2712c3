import numpy as np
import pytest

from refusal_core.evaluation import ratio_interval
from refusal_core.probes import MIN_PER_CLASS, best_layer, fit_threshold, probe_scores, too_few


def _blobs(n: int, shift: float, seed: int, width: int = 8):
    """n rows per class; class 1 is shifted by `shift` along the first feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, width))
    y = np.repeat([0, 1], n)
    x[y == 1, 0] += shift
    return x, y


def test_a_probe_separates_separable_classes_and_its_intervals_bracket_it():
    train_x, train_y = _blobs(40, 6.0, 0)
    test_x, test_y = _blobs(30, 6.0, 1)
    noise_x, noise_y = _blobs(30, 0.0, 2)
    scores = probe_scores(train_x, train_y, {"test": (test_x, test_y), "noise": (noise_x, noise_y)}, n_seeds=20, seed=0)
    assert scores["test"].accuracy > 0.95 and scores["test"].auroc > 0.98
    assert scores["test"].accuracy_low <= scores["test"].accuracy <= scores["test"].accuracy_high <= 1
    # On features that carry no label, the probe is at chance and the interval says so.
    assert scores["noise"].auroc_low < 0.5 < scores["noise"].auroc_high
    assert abs(scores["noise"].accuracy - 0.5) < 0.2


def test_same_inputs_give_the_same_scores():
    x, y = _blobs(20, 1.0, 3)
    assert probe_scores(x, y, {"t": (x, y)}, 5, 7) == probe_scores(x, y, {"t": (x, y)}, 5, 7)


def test_too_few_rows_say_so_with_the_counts():
    assert too_few(np.array([1] * MIN_PER_CLASS + [0] * MIN_PER_CLASS), "The set") is None
    note = too_few(np.array([1, 1, 0, 0, 0, 0, 0, 0]), "The jailbreak test set")
    assert note == ("The jailbreak test set has 2 refused and 6 complied prompts; a probe needs at least "
                    f"{MIN_PER_CLASS} of each, so no number is reported.")


def test_best_layer_is_the_one_that_carries_the_label():
    x, y = _blobs(30, 5.0, 4)
    noise, _ = _blobs(30, 0.0, 5)
    assert best_layer({3: noise, 7: x, 9: noise}, y)[0] == 7


def test_threshold_splits_the_classes_at_the_best_accuracy():
    values = np.array([0.1, 0.4, 0.35, 2.0, 2.5, 3.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = fit_threshold(values, labels)
    assert 0.4 < threshold < 2.0
    assert np.array_equal(values > threshold, labels.astype(bool))


def test_ratio_interval_is_the_ratio_of_means_with_an_interval_around_it():
    changes = np.array([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0], [-2.0, 0.0]])
    baselines = np.array([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0], [4.0, 0.0]])
    point, low, high = ratio_interval(changes, baselines)
    assert point[0] == pytest.approx(-0.5) and low[0] == pytest.approx(-0.5) and high[0] == pytest.approx(-0.5)
    assert np.isnan(point[1])  # a latent that never fires has no relative change


def test_ratio_interval_of_a_rarely_firing_latent_is_left_out_and_noise_gets_a_wide_interval():
    rng = np.random.default_rng(0)
    baselines = np.stack([rng.uniform(1, 3, 16), np.r_[np.zeros(15), 2.0]], axis=1)  # the second fires on 1 of 16
    changes = np.stack([rng.normal(-0.5, 1.0, 16), np.r_[np.zeros(15), -1.0]], axis=1)
    point, low, high = ratio_interval(changes, baselines)
    assert low[0] < point[0] < high[0] and high[0] - low[0] > 0.2
    assert np.isnan(point[1]) and np.isnan(low[1]) and np.isnan(high[1])


def test_the_probe_training_set_is_the_refused_harmful_and_answered_harmless_prompts_by_id():
    import pyarrow as pa

    from refusal_core.probes import probe_training_set
    from refusal_core.tables import PROMPT_BEHAVIOUR

    rows = [("h3", "harmful", 2.0), ("h1", "harmful", 0.5), ("h2", "harmful", -1.0), ("s2", "harmless", -0.2),
            ("s1", "harmless", 1.5), ("s3", "harmless", 0.0), ("o1", "over_refusal", 3.0), ("h4", "harmful", 1.0)]
    behaviour = pa.Table.from_pylist([{"model_key": "m", "prompt_id": i, "label": label, "split": "train",
                                       "refusal_score": score, "refused": score > 0} for i, label, score in rows],
                                     schema=PROMPT_BEHAVIOUR)
    train = probe_training_set(behaviour, exclude={"h4"})
    # Prompts doing the opposite of their label (h2 answered, s1 refused) are left out, not relabelled.
    assert list(train.items()) == [("h1", True), ("h3", True), ("s2", False), ("s3", False)]
