import numpy as np

from refusal_core.evaluation import bootstrap_interval


def test_the_bootstrap_interval_of_a_rate_covers_the_true_rate_at_its_nominal_95_percent():
    rng = np.random.default_rng(0)
    rate, n_prompts, n_studies = 0.3, 200, 400
    covered = 0
    for study in range(n_studies):
        verdicts = rng.random(n_prompts) < rate  # one study's judged prompts
        low, high = bootstrap_interval(verdicts, seed=study)
        covered += low <= rate <= high
    # 95% nominal; over 400 studies the binomial standard error of the coverage is 1.1 points.
    assert 0.92 <= covered / n_studies <= 0.98
