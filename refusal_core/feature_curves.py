"""Feature-count curves: refusal with the top k latents of each ranking clamped, and the fewest that halve the baseline."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from refusal_core.activations import length_batches
from refusal_core.chat import format_prompt
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.evaluation import JUDGE_COLUMNS, judged_generations
from refusal_core.features import feature_set_members
from refusal_core.intervals import draws_interval, wilson_interval
from refusal_core.interventions import Clamp, describe
from refusal_core.judges import ClassifierJudge
from refusal_core.models import LoadedModel
from refusal_core.saes import LoadedSae
from refusal_core.scoring import SharedBottom, answer_log_probs, refusal_score, refusal_token_ids
from refusal_core.study_interventions import feature_clamp
from refusal_core.tables import FEATURE_COUNT_CURVE, FEATURE_COUNT_SUMMARY

CURVE_SIZES = (1, 2, 3, 5, 10, 20)
"""Latent counts k measured by refusal score (one forward pass per prompt)."""
JUDGED_SIZES = (5, 20)
"""Latent counts also measured by judged greedy answers (a generation per prompt, so only a few)."""
SCORE_JUDGE = "refusal_score"


@dataclass(frozen=True)
class Point:
    """One clamp measured on the harmful prompts by one judge."""

    feature_set: str
    seed: int | None
    """The random draw's seed; None for a ranking."""
    n_latents: int
    judge: str
    intervention_id: str
    verdicts: list[bool]
    """Per prompt, refused by this judge."""
    scores: list[float]
    """Per prompt, the refusal score at the first answer position."""


@dataclass(frozen=True)
class FeatureCountCurve:
    """The FEATURE_COUNT_CURVE table of a study and the notes of the step that made it."""

    rows: list[dict]
    """FEATURE_COUNT_CURVE rows: each ranking and random draw per k and judge, then the random mean per k and judge."""
    notes: list[str]
    """Why some counts or judges are missing (a feature set shorter than the largest k, a baseline that refuses nothing)."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=FEATURE_COUNT_CURVE)


def measure_feature_count_curve(loaded: LoadedModel, saes: Mapping[int, LoadedSae], feature_sets: pa.Table, harmful: pa.Table,
                        baseline_generations: pa.Table, feature_generations: pa.Table, clamp_multiplier: float,
                        skip_first: int, classifier: ClassifierJudge | None = None, sizes: Sequence[int] = CURVE_SIZES,
                        judged_sizes: Sequence[int] = JUDGED_SIZES, log: Callable[[str], None] = print,
                        progress: bool = True, checkpoints: Checkpoints = Checkpoints()) -> FeatureCountCurve:
    """Refusal on the `harmful` prompts with the first k latents of each feature set clamped to -`clamp_multiplier`.

    Every k in `sizes` is measured by refusal score (> 0 is a refusal) in one forward pass per prompt; the k
    in `judged_sizes` also by judged greedy answers. A k beyond a set's length is measured at its length.
    Rankings come from `feature_sets` (FEATURE_SETS, in rank order; random: each seeded draw), clamped as
    `feature_generations` clamps them, so a clamp it already answered (the whole set) is read from its rows
    instead of generated again; clamps of the same latents are measured once. The baseline is measured on
    the same prompts: its scores by a forward pass, its answers from `baseline_generations`.

    Args:
        harmful: the prompts of the curve's eval set (EVAL_SET_PROMPTS rows: prompt_id, text, label, eval_set).
        checkpoints: where each finished batch is kept (scores per clamp and batch, answers per clamp and batch).
    """
    model, tokenizer, settings = loaded.model, loaded.tokenizer, loaded.study.settings
    prompt_ids, instructions = harmful["prompt_id"].to_pylist(), harmful["text"].to_pylist()
    texts = [format_prompt(tokenizer, text, loaded.study.chat_template) for text in instructions]
    refusal_ids = refusal_token_ids(model, tokenizer)
    sets = feature_set_members(feature_sets)
    longest = max((len(members) for members in sets.values()), default=0)
    notes = [f"The feature sets hold {longest} latents, fewer than the curve's largest k ({max(sizes)}); "
             f"the curve stops at {longest}."] if longest < max(sizes) else []

    clamps: dict[tuple[str, int | None, int], Clamp] = {}
    judged: set[tuple[str, int | None, int]] = set()
    for (name, seed), members in sets.items():
        for k in sorted({min(size, len(members)) for size in sizes}):
            clamps[(name, seed, k)] = feature_clamp(saes, members[:k], name, -clamp_multiplier, skip_first, seed)
        judged |= {(name, seed, min(size, len(members))) for size in judged_sizes}

    scores = _clamp_scores(model, tokenizer, texts, [None, *clamps.values()], refusal_ids, settings.batch_size,
                           progress, checkpoints)
    answered = _answers(feature_generations, prompt_ids)
    baseline = _answers(baseline_generations, prompt_ids).get(describe(None).id)
    if baseline is None:
        raise ValueError("baseline_generations has no unhooked answer to some harmful eval prompts; re-materialize it "
                         "so that it covers the same eval set.")
    points, generated = [], {}
    for (name, seed, k), clamp in clamps.items():
        identity = describe(clamp).id
        points.append(Point(name, seed, k, SCORE_JUDGE, identity, [s > 0 for s in scores[_latents(clamp)]],
                            scores[_latents(clamp)]))
        if (name, seed, k) not in judged:
            continue
        rows = answered.get(identity) or generated.get(_latents(clamp))
        if rows is None:
            table = judged_generations(model, tokenizer, texts, prompt_ids, harmful["label"].to_pylist(), loaded.study.key,
                                       refusal_ids, clamp, settings.max_new_tokens, settings.batch_size, classifier,
                                       instructions, checkpoints, [[name] for name in harmful["eval_set"].to_pylist()])
            rows = generated[_latents(clamp)] = table.to_pylist()
        for judge, column in JUDGE_COLUMNS.items():
            verdicts = [row[column] for row in rows]
            if judge != SCORE_JUDGE and None not in verdicts:
                points.append(Point(name, seed, k, judge, identity, verdicts, [row["refusal_score"] for row in rows]))
    log(f"Feature-count curve: {len(clamps)} clamps scored, {len(generated)} answered here, "
        f"{sum(1 for key in judged if describe(clamps[key]).id in answered)} read from feature_generations.")
    baselines = {SCORE_JUDGE: [s > 0 for s in scores[()]]}
    baselines |= {judge: [row[column] for row in baseline] for judge, column in JUDGE_COLUMNS.items()
                  if judge != SCORE_JUDGE and None not in [row[column] for row in baseline]}
    if not any(baselines[SCORE_JUDGE]):
        notes.append("The model refuses none of the harmful prompts at baseline (refusal score); no k can halve it.")
    checkpoints.clear()
    return FeatureCountCurve(curve_rows(loaded.study.key, points, baselines), notes)


def curve_rows(model_key: str, points: Sequence[Point], baselines: Mapping[str, Sequence[bool]]) -> list[dict]:
    """FEATURE_COUNT_CURVE rows of measured `points`: each with its Wilson interval over prompts, then per k and judge
    the mean over the random draws with `draws_interval` (where there are at least 2 draws).

    `baselines`: judge -> the unclamped verdicts on the same prompts.
    """
    rows = []
    for point in points:
        n, refused = len(point.verdicts), sum(point.verdicts)
        low, high = wilson_interval(refused, n)
        rows.append(_row(model_key, point.feature_set, point.seed, point.n_latents, point.judge, point.intervention_id,
                         n, 1, refused / n, low, high, float(np.mean(point.scores)), baselines[point.judge]))
    draws: dict[tuple[str, int, str], list[dict]] = {}
    for row in rows:
        if row["seed"] is not None:
            draws.setdefault((row["feature_set"], row["n_latents"], row["judge"]), []).append(row)
    for (name, k, judge), members in sorted(draws.items()):
        if len(members) < 2:
            continue
        mean, low, high = draws_interval([m["refusal_rate"] for m in members], members[0]["n_prompts"])
        rows.append(_row(model_key, name, None, k, judge, None, members[0]["n_prompts"], len(members), mean, low, high,
                         float(np.mean([m["mean_refusal_score"] for m in members])), baselines[judge]))
    return rows


def curve_summary(rows: Sequence[Mapping]) -> list[dict]:
    """FEATURE_COUNT_SUMMARY rows of FEATURE_COUNT_CURVE `rows`: per ranking (random: the mean over its draws) and
    judge, the fewest latents that reach half the baseline (null when no measured k does) and the most measured."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        if row["seed"] is None:
            groups.setdefault((row["feature_set"], row["judge"]), []).append(row)
    summary = []
    for (name, judge), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["n_latents"])
        reached = next((r for r in members if r["reaches_half"]), None)
        summary.append({
            "model_key": members[0]["model_key"], "feature_set": name, "judge": judge,
            "n_prompts": members[0]["n_prompts"], "baseline_refusal_rate": members[0]["baseline_refusal_rate"],
            "smallest_n_latents": None if reached is None else reached["n_latents"],
            "refusal_rate_at_smallest": None if reached is None else reached["refusal_rate"],
            "largest_n_latents": members[-1]["n_latents"], "refusal_rate_at_largest": members[-1]["refusal_rate"]})
    return summary


def summary_table(rows: Sequence[Mapping]) -> pa.Table:
    """`curve_summary` of `rows` in the FEATURE_COUNT_SUMMARY schema."""
    return pa.Table.from_pylist(curve_summary(rows), schema=FEATURE_COUNT_SUMMARY)


def _row(model_key: str, name: str, seed: int | None, k: int, judge: str, identity: str | None, n: int, n_draws: int,
         rate: float, low: float, high: float, mean_score: float, baseline: Sequence[bool]) -> dict:
    baseline_rate = sum(baseline) / len(baseline)
    return {"model_key": model_key, "feature_set": name, "seed": seed, "n_latents": k, "judge": judge,
            "intervention_id": identity, "n_prompts": n, "n_draws": n_draws, "refusal_rate": rate, "ci_low": low,
            "ci_high": high, "mean_refusal_score": mean_score, "baseline_refusal_rate": baseline_rate,
            # A baseline that refuses nothing cannot be halved: no k reaches it.
            "reaches_half": bool(baseline_rate > 0 and rate <= baseline_rate / 2)}


def _latents(clamp: Clamp | None) -> tuple:
    """What a clamp edits, without its name: clamps of the same latents are measured once. () for no clamp."""
    if clamp is None:
        return ()
    return (clamp.factor, clamp.skip_first, *((t.layer, t.sae_sha256, t.latents) for t in clamp.targets))


def _clamp_scores(model, tokenizer, texts: list[str], clamps: Sequence[Clamp | None], refusal_ids: list[int],
                  batch_size: int, progress: bool, checkpoints: Checkpoints) -> dict[tuple, list[float]]:
    """Refusal score per prompt under each distinct clamp (None: the baseline), one forward pass per prompt and clamp;
    each (clamp, batch) is a checkpointed unit."""
    distinct = sorted({_latents(clamp): clamp for clamp in clamps}.items(), key=lambda item: item[1] is not None)
    bottom = SharedBottom(model, [clamp for _, clamp in distinct])  # the baseline first: the clamps reuse its lower blocks
    batches = length_batches(tokenizer, texts, batch_size)  # by length: a long contextual prompt pads only its own batch
    units = [(key, clamp, batch) for key, clamp in distinct for batch in batches]
    identities = [{"intervention": describe(clamp).parameters if clamp else "none",
                   "prompts": digest([texts[i] for i in batch]), "refusal_ids": refusal_ids}
                  for _, clamp, batch in units]

    def compute(todo: list[int]):
        for i in tqdm(todo, desc="feature-count curve (refusal score)", unit="batch", disable=not progress):
            _, clamp, batch = units[i]
            log_probs = answer_log_probs(model, tokenizer, [texts[j] for j in batch], clamp, batch_size, bottom=bottom)
            yield {"score": refusal_score(log_probs, refusal_ids)}

    scores: dict[tuple, list[float]] = {key: [0.0] * len(texts) for key, _ in distinct}
    for (key, _, batch), part in zip(units, checkpoints.resume("refusal score", identities, compute)):
        for j, score in zip(batch, part["score"].tolist()):
            scores[key][j] = score
    return scores


def _answers(generations: pa.Table, prompt_ids: Sequence[str]) -> dict[str, list[dict]]:
    """intervention id -> its GENERATIONS rows in the order of `prompt_ids`, for the ids that answered all of them."""
    by_intervention: dict[str, dict[str, dict]] = {}
    for row in generations.to_pylist():
        by_intervention.setdefault(row["intervention_id"], {})[row["prompt_id"]] = row
    return {identity: [rows[p] for p in prompt_ids] for identity, rows in by_intervention.items()
            if all(p in rows for p in prompt_ids)}
