"""The study's findings in sentences, generated from its named queries: every number with its interval and n."""

from __future__ import annotations

from collections.abc import Callable

from refusal_core.prompts import HARMFUL_SETS, HARMLESS_SET

SET_NAMES = {"harmbench": "HarmBench", "jbb": "JailbreakBench", "advbench": "AdvBench", "strongreject": "StrongREJECT",
             "alpaca_eval": "AlpacaEval", "over_refusal": "over-refusal"}
"""How the sentences name each eval set."""

Rows = Callable[[str], list[dict]]
"""A named query's rows for one study."""


def findings(rows: Rows) -> list[str]:
    """Five to nine sentences on what the study found, each left out when its tables have no rows (substring judge)."""
    table = [r for r in rows("feature_table") if r["judge"] == "substring"]
    rate = {(r["eval_set"], r["method"]): r["rate_ci"] for r in table}
    said = []
    harmful = [name for name in HARMFUL_SETS if (name, "baseline") in rate]

    def across(method: str) -> str:
        return ", ".join(f"{rate[(name, method)]} of {SET_NAMES[name]}" for name in harmful if (name, method) in rate)

    if harmful:
        others = [f"{rate[(s, 'baseline')]} of {SET_NAMES[s]}" for s in (HARMLESS_SET, "over_refusal") if (s, "baseline") in rate]
        said.append(f"At baseline the model refuses {across('baseline')} test prompts"
                    + (f", and {' and '.join(others)} prompts" if others else "") + " (substring judge, Wilson 95% intervals).")
    selected = [r for r in rows("direction_selection") if r["selected"]]
    if selected and any((name, "direction ablation") in rate for name in harmful):
        where = f"layer {selected[0]['layer_index']}, token {selected[0]['token']!r}"
        added = rate.get((HARMLESS_SET, "direction addition"))
        said.append(f"Ablating the refusal direction ({where}) brings refusal to {across('direction ablation')}"
                    + (f"; adding it makes {added} of {SET_NAMES[HARMLESS_SET]} instructions refused." if added else "."))
    if any((name, "clamp cossim_ap") in rate for name in harmful):
        compared = next((name for name in harmful if (name, "clamp random (mean of draws)") in rate), None)
        random = rate.get((compared, "clamp random (mean of draws)"))
        upstream = rate.get((compared, "clamp upstream"))
        said.append(f"Clamping the CosSim+AP latents brings refusal to {across('clamp cossim_ap')}"
                    + (f"; on {SET_NAMES[compared]} random latents (mean of the draws) leave {random}" if random else "")
                    + (f" and the upstream set alone gives {upstream}" if upstream else "") + ".")
    if (HARMLESS_SET, "induce cossim_ap") in rate:
        random = rate.get((HARMLESS_SET, "induce random (mean of draws)"))
        said.append(f"Setting the CosSim+AP latents on {SET_NAMES[HARMLESS_SET]} instructions makes "
                    f"{rate[(HARMLESS_SET, 'induce cossim_ap')]} of them refused" + (f" (random latents: {random})." if random else "."))
    curve = {r["feature_set"]: r for r in rows("feature_count_summary") if r["judge"] == "refusal_score"}
    if "cossim_ap" in curve:
        def smallest(name: str) -> str:
            row = curve[name]
            return (f"{row['smallest_n_latents']}" if row["smallest_n_latents"] != "none"
                    else f"none of up to {row['largest_n_latents']}")
        named = {"cossim_ap": "CosSim+AP", "cosine": "cosine", "activation_difference": "activation difference",
                 "attribution": "attribution", "random": "random (mean of the draws)"}
        parts = [f"{label} {smallest(name)}" for name, label in named.items() if name in curve]
        row = curve["cossim_ap"]
        said.append(f"Latents needed to halve refusal on the {row['n_prompts']} HarmBench prompts (baseline "
                    f"{100 * row['baseline_refusal_rate']:.0f}% by refusal score): {', '.join(parts)}.")
    capability = {(r["benchmark"], r["method"]): r for r in rows("capability_table")}
    pairs = [(b, capability[(b, "baseline")], capability[(b, "clamp cossim_ap")]) for b in sorted({b for b, _ in capability})
             if (b, "baseline") in capability and (b, "clamp cossim_ap") in capability]
    if pairs:
        said.append("Accuracy at baseline and with the CosSim+AP latents clamped: " + "; ".join(
            f"{benchmark} {base['accuracy_ci']} and {clamped['accuracy_ci']} (paired difference {clamped['difference_ci']} "
            "points)" for benchmark, base, clamped in pairs) + ".")
    judges = [r for r in rows("judge_agreement") if (r["judge"], r["reference"], r["part"]) == ("substring", "human", "report")]
    if judges and judges[0]["kappa"]:
        said.append(f"The substring judge agrees with people on the reported part of PyRIT's labels with Cohen's kappa "
                    f"{judges[0]['kappa']} and accuracy {judges[0]['accuracy']} (n = {judges[0]['n']}).")
    judged = {(r["eval_set"], r["method"]): r["rate_ci"] for r in rows("harm_judgment")}
    if (HARMLESS_SET, "baseline") in judged and (HARMLESS_SET, "add harmfulness ×1") in judged:
        said.append(f"Asked whether a request is harmful, the model says yes to {judged[(HARMLESS_SET, 'baseline')]} of "
                    f"{SET_NAMES[HARMLESS_SET]} instructions; steered along the harmfulness direction to "
                    f"{judged[(HARMLESS_SET, 'add harmfulness ×1')]}, along the refusal direction to "
                    f"{judged.get((HARMLESS_SET, 'add refusal ×1'), 'not measured')}.")
    jailbreaks = {r["outcome"]: r for r in rows("jailbreak_summary") if r["family"] == "all" and r["mean_relative_drop"] is not None}
    if {"succeeded", "failed"} <= set(jailbreaks):
        won, lost = jailbreaks["succeeded"], jailbreaks["failed"]
        said.append(f"Successful jailbreaks of refused prompts lower the refusal features by {_percent(won)} (n = {won['n_pairs']} "
                    f"pairs), failed ones by {_percent(lost)} (n = {lost['n_pairs']}).")
    return said


def _percent(row: dict) -> str:
    return f"{100 * row['mean_relative_drop']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
