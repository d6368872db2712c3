import json

import numpy as np
import pytest

from refusal_core.evaluation import bootstrap_interval, draw_mean_rows, effect_rows
from refusal_core.intervals import paired_difference, wilson_interval


def test_the_bootstrap_interval_of_a_mean_covers_the_true_mean_at_its_nominal_95_percent():
    rng = np.random.default_rng(0)
    mean, n_values, n_studies = 0.3, 200, 400
    covered = 0
    for study in range(n_studies):
        values = rng.normal(mean, 1.0, n_values)
        low, high = bootstrap_interval(values, seed=study)
        covered += low <= mean <= high
    # 95% nominal; over 400 studies the binomial standard error of the coverage is 1.1 points.
    assert 0.92 <= covered / n_studies <= 0.98


@pytest.mark.parametrize(("count", "n", "low", "high"), [
    (0, 100, 0.0, 0.03699), (0, 32, 0.0, 0.10718), (16, 32, 0.33631, 0.66369), (32, 32, 0.89282, 1.0)])
def test_the_wilson_interval_of_a_rate_matches_known_values(count, n, low, high):
    assert wilson_interval(count, n) == pytest.approx((low, high), abs=1e-5)


def test_a_rate_over_no_items_is_refused():
    with pytest.raises(ValueError, match="zero items"):
        wilson_interval(0, 0)


def _pairs(both: int, first_only: int, second_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    first = [True] * (both + first_only) + [False] * (second_only + neither)
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    return first, second


@pytest.mark.parametrize(("cells", "low", "high"), [  # Newcombe (1998), Statistics in Medicine 17:2635, Table II, method 10
    ((36, 12, 2, 0), 0.0569, 0.3404), ((18, 12, 2, 18), 0.0562, 0.3290), ((53, 0, 0, 1), -0.0729, 0.0729),
    ((0, 30, 0, 0), 0.8395, 1.0)])
def test_the_paired_difference_interval_matches_newcombes_worked_examples(cells, low, high):
    difference, lower, upper = paired_difference(*_pairs(*cells))
    assert difference == pytest.approx((cells[1] - cells[2]) / sum(cells))
    assert (lower, upper) == pytest.approx((low, high), abs=1e-4)


def _generation(prompt_id: str, kind: str, refused: bool, label: str = "harmful", eval_sets=("harmbench",)) -> dict:
    return {"prompt_id": prompt_id, "label": label, "eval_sets": list(eval_sets), "intervention_id": kind, "intervention_kind": kind,
            "intervention_name": kind, "intervention_parameters": "{}", "feature_set": None,
            "refused_substring": refused, "refused_score": refused, "refused_classifier": None,
            "refusal_score": 1.0 if refused else -1.0}


def test_effect_rows_give_wilson_intervals_and_the_paired_difference_from_the_baseline():
    # 32 harmful prompts: the baseline refuses the first 20; ablated, the model refuses none of them.
    ids = [f"p{i:02d}" for i in range(32)]
    baseline = [_generation(i, "none", k < 20) for k, i in enumerate(ids)]
    ablated = [_generation(i, "ablate", False) for i in reversed(ids)]  # order differs: pairing is by prompt id
    rows = {(r["intervention_kind"], r["judge"]): r for r in effect_rows("m", baseline + ablated, baseline)}
    assert set(rows) == {("none", "substring"), ("none", "refusal_score"), ("ablate", "substring"), ("ablate", "refusal_score")}
    none, ablate = rows[("none", "substring")], rows[("ablate", "substring")]
    assert (ablate["refusal_rate"], ablate["ci_low"]) == (0.0, 0.0) and ablate["ci_high"] == pytest.approx(0.1072, abs=1e-4)
    assert none["refusal_rate"] == 20 / 32 and "difference" not in none and "n_paired" not in none  # null in EFFECTS
    # By hand (Newcombe method 10): 0 refused under both, 0 by the ablation only, 20 at baseline only, 12 by neither.
    # phi = 0 (a margin is empty); low = d - sqrt((p1 - l1)^2 + (u2 - p2)^2) with p1 = 0, p2 = 0.625.
    l2, u2 = wilson_interval(20, 32)
    assert ablate["n_paired"] == 32 and ablate["baseline_refusal_rate"] == 0.625 and ablate["difference"] == -0.625
    assert ablate["difference_ci_low"] == pytest.approx(-0.625 - np.hypot(0.0, u2 - 0.625))
    assert ablate["difference_ci_high"] == pytest.approx(-0.625 + np.hypot(0.1071792, 0.625 - l2), abs=1e-6)
    assert -0.79 < ablate["difference_ci_low"] < -0.77 and -0.44 < ablate["difference_ci_high"] < -0.42


def test_an_answer_counts_in_each_of_its_eval_sets_and_costs_go_on_the_harmless_set():
    # p0 is in HarmBench and JBB, p1 in JBB only, h0 in AlpacaEval: each answered once per intervention.
    baseline = [_generation("p0", "none", True, eval_sets=("harmbench", "jbb")), _generation("p1", "none", False, eval_sets=("jbb",)),
                _generation("h0", "none", False, "harmless", ("alpaca_eval",))]
    ablated = [_generation("p0", "ablate", False, eval_sets=("harmbench", "jbb")), _generation("p1", "ablate", False, eval_sets=("jbb",)),
               _generation("h0", "ablate", False, "harmless", ("alpaca_eval",))]
    rows = {(r["eval_set"], r["intervention_kind"]): r for r in effect_rows("m", baseline + ablated, baseline, {"ablate": 0.5})
            if r["judge"] == "substring"}
    assert {k: (r["n_prompts"], r["refusal_rate"]) for k, r in rows.items()} == {
        ("harmbench", "none"): (1, 1.0), ("jbb", "none"): (2, 0.5), ("alpaca_eval", "none"): (1, 0.0),
        ("harmbench", "ablate"): (1, 0.0), ("jbb", "ablate"): (2, 0.0), ("alpaca_eval", "ablate"): (1, 0.0)}
    assert rows[("jbb", "ablate")]["difference"] == -0.5 and rows[("jbb", "ablate")]["n_paired"] == 2
    assert rows[("alpaca_eval", "ablate")]["kl"] == 0.5 and rows[("jbb", "ablate")]["kl"] is None


def test_effect_rows_refuse_an_intervention_prompt_the_baseline_did_not_answer():
    baseline = [_generation("p0", "none", True)]
    with pytest.raises(ValueError, match="1 harmbench prompts answered under ablate have no baseline answer \\(e.g. p1\\)"):
        effect_rows("m", [_generation("p0", "ablate", False), _generation("p1", "ablate", False)], baseline)
    with pytest.raises(ValueError, match="pass the unhooked generations"):
        effect_rows("m", [], [_generation("p0", "ablate", False)])


def test_random_draws_get_a_mean_row_whose_interval_covers_draws_and_prompts_and_rankings_none():
    def row(identity, parameters, rate, difference):
        return {"eval_set": "harmful", "intervention_id": identity, "intervention_kind": "clamp", "feature_set": "random",
                "intervention_name": f"clamp random (seed {identity[-1]}) ×-1", "intervention_parameters": parameters,
                "judge": "substring", "n_prompts": 10, "refusal_rate": rate, "ci_low": 0.0, "ci_high": 1.0,
                "mean_refusal_score": rate, "kl": None, "cross_entropy_change": None, "n_paired": 10,
                "baseline_refusal_rate": 0.8, "difference": difference, "difference_ci_low": -1.0, "difference_ci_high": 1.0}

    draws = [row(f"clamp-{seed}", f'{{"seed":{seed}}}', rate, rate - 0.8) for seed, rate in enumerate([0.6, 0.7, 0.8])]
    ranking = {**row("clamp-x", "{}", 0.1, -0.7), "feature_set": "cossim_ap"}
    (mean,) = draw_mean_rows([*draws, ranking])
    assert mean["intervention_name"] == "clamp random (mean of 3 draws) ×-1" and mean["refusal_rate"] == pytest.approx(0.7)
    half = 4.302653 * 0.1 / np.sqrt(3)  # t(0.975, 2) x sd / sqrt(n): past Wilson's for 7 of 10 above, not below
    wilson_low, wilson_high = wilson_interval(7, 10)
    assert wilson_low < 0.7 - half and 0.7 + half > wilson_high
    assert (mean["ci_low"], mean["ci_high"]) == pytest.approx((wilson_low, 0.7 + half))
    assert (mean["difference"], mean["difference_ci_low"]) == pytest.approx((-0.1, -1.0))  # the draws' own intervals
    # Draws that agree keep the width their prompts allow: Wilson's for 2 of 32, not a point.
    same = [{**row(f"clamp-{seed}", f'{{"seed":{seed}}}', 2 / 32, 2 / 32 - 0.8), "n_prompts": 32} for seed in range(3)]
    (agreeing,) = draw_mean_rows(same)
    assert (agreeing["ci_low"], agreeing["ci_high"]) == pytest.approx(wilson_interval(2, 32))
    assert agreeing["ci_low"] < 2 / 32 < agreeing["ci_high"]
    assert json.loads(mean["intervention_parameters"]) == {"mean_of": ["clamp-0", "clamp-1", "clamp-2"]}
    assert draw_mean_rows(draws[:1]) == []  # one draw is not a control
