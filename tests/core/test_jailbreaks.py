import numpy as np
import pyarrow as pa
import pytest

from refusal_core.jailbreaks import jailbreak_pairs, jailbreak_selection, shared_prefix_groups, summarize_jailbreaks


def _prompt(prompt_id, label, source, method=None, base=None, split="test"):
    return {"prompt_id": prompt_id, "text": f"text of {prompt_id}", "source": source, "label": label,
            "jailbreak_method": method, "base_prompt_id": base, "split": split}


def test_dan_prompts_are_a_grid_of_the_first_templates_by_the_first_base_prompts():
    bases = [_prompt(f"b{i}", "harmful", "harmbench") for i in range(4)]
    dan = [_prompt(f"d{t}{i}", "jailbreak", "dan", f"dan:{t}", f"b{i}") for t in "xyz" for i in range(4)]
    gcg = [_prompt(f"g{i}", "jailbreak", "gcg", "gcg", f"b{i}") for i in range(4)]
    gcg.append(_prompt("g9", "jailbreak", "gcg", "gcg"))  # wraps nothing of ours
    tense = [_prompt(f"t{i}", "jailbreak", "phrasing", "past_tense") for i in range(6)]
    chosen = jailbreak_selection(pa.Table.from_pylist(bases + dan + gcg + tense), per_family=4)
    ids = chosen["prompt_id"].to_pylist()
    # ceil(sqrt(4)) = 2 templates x 2 bases; gcg needs a base prompt; the wrapped base prompts come first.
    assert ids == ["b0", "b1", "b2", "b3", "dx0", "dx1", "dy0", "dy1", "g0", "g1", "g2", "g3", "t0", "t1", "t2", "t3"]
    groups = shared_prefix_groups(chosen)
    assert [[ids[i] for i in group] for group in groups] == [
        ["b0", "b1", "b2", "b3", "g0", "g1", "g2", "g3", "t0", "t1", "t2", "t3"], ["dx0", "dx1"], ["dy0", "dy1"]]


def test_jailbreak_pairs_of_planted_jailbreaks_give_the_known_counts_and_drops():
    prompts = pa.Table.from_pylist([
        _prompt("b1", "harmful", "harmbench"), _prompt("b2", "harmful", "harmbench"),
        _prompt("j1", "jailbreak", "dan", "dan:x", "b1"), _prompt("j2", "jailbreak", "gcg", "gcg", "b1"),
        _prompt("j3", "jailbreak", "dan", "dan:x", "b2"), _prompt("j4", "jailbreak", "phrasing", "past_tense"),
        _prompt("j5", "jailbreak", "gcg", "gcg", "b2"),  # not judged
    ])
    refused = {"b1": True, "b2": False, "j1": False, "j2": True, "j3": False, "j4": False}
    members = [(0, 7), (1, 3)]
    activation = {"b1": np.array([2.0, 2.0]), "b2": np.array([0.0, 0.0]), "j1": np.array([1.0, 0.0]),
                  "j2": np.array([2.0, 4.0]), "j3": np.array([0.5, 0.5]), "j4": np.array([1.0, 1.0])}
    refusal = {key: float(i) for i, key in enumerate(activation)}
    harmfulness = {"b1": 3.0, "b2": 2.5, "j1": 1.0, "j2": 2.5, "j3": 0.5, "j4": 0.0}
    pairs = jailbreak_pairs("m", prompts, refused, members, activation, refusal, harmfulness, threshold=2.0)
    assert pairs.counts == {"n_pairs": 3, "n_base_refused": 2, "n_succeeded": 1}
    rows = pairs.table().to_pylist()
    assert [(r["family"], r["jailbreak_prompt_id"], r["base_prompt_id"]) for r in rows] == [
        ("dan", "j1", "b1"), ("dan", "j3", "b2"), ("gcg", "j2", "b1")]
    j1, j3, j2 = rows
    assert j1["succeeded"] and not j2["succeeded"] and not j3["succeeded"]
    assert j1["relative_drop"] == pytest.approx(0.75) and j2["relative_drop"] == pytest.approx(-0.5)
    assert j3["relative_drop"] is None  # nothing to drop from on the base prompt
    assert [f["relative_drop"] for f in j1["features"]] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert [(f["layer_index"], f["latent_index"]) for f in j1["features"]] == members
    assert [r["jailbreak_harmful_by_direction"] for r in rows] == [False, False, True]
    assert (j1["base_harmfulness_projection"], j1["jailbreak_refusal_projection"]) == (3.0, 2.0)
    # Only refused base prompts with a drop count, and too few pairs give notes instead of numbers.
    summary = summarize_jailbreaks("m", rows, seed=0)
    counts = {(r["family"], r["outcome"]): r["n_pairs"] for r in summary.table().to_pylist()}
    assert counts == {("all", "succeeded"): 1, ("all", "failed"): 1, ("dan", "succeeded"): 1, ("dan", "failed"): 0,
                      ("gcg", "succeeded"): 0, ("gcg", "failed"): 1}
    assert len(summary.notes) == 6 and summary.drops == {}


def test_a_study_whose_jailbreaks_wrap_none_of_its_prompts_says_so():
    prompts = pa.Table.from_pylist([_prompt("j4", "jailbreak", "phrasing", "past_tense")])
    with pytest.raises(ValueError, match="jailbreak_base_prompts"):
        jailbreak_pairs("m", prompts, {"j4": False}, [(0, 1)], {"j4": np.ones(1)}, {"j4": 0.0}, {"j4": 0.0}, 0.0)


def test_jailbreak_summary_counts_and_intervals_use_the_same_pairs():
    def pair(family, succeeded, drop, base_refused=True):
        return {"family": family, "base_refused": base_refused, "succeeded": succeeded, "relative_drop": drop,
                "base_harmfulness_projection": 10.0, "jailbreak_harmfulness_projection": 7.0,
                "jailbreak_harmful_by_direction": True}

    pairs = ([pair("dan", True, 0.5 + 0.01 * i) for i in range(6)] + [pair("gcg", False, 0.01 * i) for i in range(5)]
             + [pair("gcg", True, None), pair("gcg", True, 0.9), pair("dan", False, 0.3, base_refused=False)])
    summary = summarize_jailbreaks("m", pairs, seed=0)
    rows = {(r["family"], r["outcome"]): r for r in summary.rows}
    assert rows[("all", "succeeded")]["n_pairs"] == 7 and rows[("all", "failed")]["n_pairs"] == 5
    assert rows[("dan", "succeeded")]["mean_relative_drop"] == pytest.approx(0.525)
    assert rows[("dan", "succeeded")]["ci_low"] <= 0.525 <= rows[("dan", "succeeded")]["ci_high"]
    assert rows[("all", "succeeded")]["mean_harmfulness_drop"] == pytest.approx(3.0)
    # One usable gcg success (the other has no drop) and no refused-base dan failure: a note each, no number.
    assert rows[("gcg", "succeeded")]["n_pairs"] == 1 and rows[("gcg", "succeeded")].get("mean_relative_drop") is None
    assert rows[("gcg", "succeeded")]["note"].startswith("1 succeeded gcg jailbreaks of refused prompts")
    assert rows[("dan", "failed")]["n_pairs"] == 0 and rows[("dan", "failed")]["note"]
    assert set(summary.drops) == {"all/succeeded", "all/failed", "dan/succeeded", "gcg/failed"}


def test_a_paired_family_grows_while_a_group_of_refused_base_prompts_has_too_few_pairs():
    from refusal_core.jailbreaks import families_to_grow

    bases = [_prompt(f"b{i}", "harmful", "harmbench") for i in range(8)]
    gcg = [_prompt(f"g{i}", "jailbreak", "gcg", "gcg", f"b{i}") for i in range(8)]
    dan = [_prompt(f"d{t}{i}", "jailbreak", "dan", f"dan:{t}", f"b{i}") for t in "wxyz" for i in range(8)]
    prompts = pa.Table.from_pylist(bases + gcg + dan)
    chosen = jailbreak_selection(prompts, {"dan": 16, "gcg": 8, "phrasing": 0})
    # GCG suffixes on b0-b3 and DAN templates w and x are refused; the others are answered.
    refused = {f"b{i}": True for i in range(8)} | {row["prompt_id"]: row["prompt_id"][-1 if row["source"] == "gcg" else 1] in "0123wx"
                                                   for row in prompts.to_pylist() if row["label"] == "jailbreak"}
    # 4 succeeded and 4 failed GCG pairs (too few), but all 8 GCG prompts are chosen: it cannot grow.
    # DAN: 16 of 32 chosen (4 templates x 4 bases), 8 succeeded and 8 failed: enough.
    assert families_to_grow(prompts, chosen, refused, {"dan": 16, "gcg": 8}, 64) == []
    # Half as many DAN prompts (3 templates x 3 bases, the first 8): 6 failed and 2 succeeded, so DAN doubles,
    # unless that passes the most allowed.
    fewer = jailbreak_selection(prompts, {"dan": 8, "gcg": 8, "phrasing": 0})
    assert families_to_grow(prompts, fewer, refused, {"dan": 8, "gcg": 8}, 64) == ["dan"]
    assert families_to_grow(prompts, fewer, refused, {"dan": 8, "gcg": 8}, 15) == []
    # Unrefused base prompts give no pairs to count.
    answered = refused | {f"b{i}": False for i in range(8)}
    assert families_to_grow(prompts, chosen, answered, {"dan": 16, "gcg": 8}, 64) == ["dan"]
