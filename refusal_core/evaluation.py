"""Judged generations under an intervention, refusal rates with Wilson intervals, and the bootstrap for other statistics."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import length_batches
from refusal_core.checkpoints import Checkpoints, digest
from refusal_core.generation import generate_scored
from refusal_core.intervals import draws_difference_interval, draws_interval, paired_difference, wilson_interval
from refusal_core.interventions import Intervention, describe, intervene
from refusal_core.judges import ClassifierJudge, SubstringJudge
from refusal_core.prompts import HARMLESS_SET
from refusal_core.scoring import refusal_score
from refusal_core.tables import GENERATIONS, INTERVENTION_FIELDS


def batched_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    refusal_ids: Sequence[int] | None = None,
    checkpoints: Checkpoints = Checkpoints(),
    what: str = "generate",
    progress: bool = True,
) -> tuple[list[str], list[float] | None]:
    """Greedy completions of chat-formatted `prompts` (in order) and, with `refusal_ids`, their refusal scores.

    The prompts are batched by length (`length_batches`) and each batch is answered on its own by
    `generate_scored`, under whatever intervention is active, so its answers depend on its own prompts only.
    Each finished batch is kept in `checkpoints`; a run that finds one there reads it back instead.
    """
    if not prompts:
        raise ValueError("No prompts to generate for; the prompt selection is empty.")
    batches = length_batches(tokenizer, prompts, batch_size)
    bar = tqdm(total=len(prompts), desc=what, unit="prompt", disable=not progress)

    def compute(todo: list[int]):
        for b in todo:
            completions, first_log_probs = generate_scored(model, tokenizer, [prompts[i] for i in batches[b]],
                                                           max_new_tokens, batch_size, progress=False)
            columns = {"completion": pa.array(completions, pa.string())}
            if refusal_ids is not None:
                columns["refusal_score"] = pa.array(refusal_score(first_log_probs, refusal_ids).numpy(), pa.float32())
            bar.update(len(completions))
            yield pa.table(columns)

    units = [{"prompts": digest([prompts[i] for i in batch]), "max_new_tokens": max_new_tokens,
              "refusal_ids": None if refusal_ids is None else list(refusal_ids)} for batch in batches]
    completions: list[str] = [""] * len(prompts)
    scores: list[float] = [0.0] * len(prompts)
    for batch, part in zip(batches, checkpoints.resume(what, units, compute)):
        for k, index in enumerate(batch):
            completions[index] = part["completion"][k].as_py()
            if refusal_ids is not None:
                scores[index] = part["refusal_score"][k].as_py()
    bar.close()
    return completions, None if refusal_ids is None else scores


def judged_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    labels: Sequence[str],
    model_key: str,
    refusal_ids: Sequence[int],
    intervention: Intervention | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    classifier: ClassifierJudge | None = None,
    instructions: Sequence[str] | None = None,
    checkpoints: Checkpoints = Checkpoints(),
    eval_sets: Sequence[Sequence[str]] | None = None,
) -> pa.Table:
    """Generate for chat-formatted `prompts` under `intervention` and judge every answer, in the GENERATIONS schema.

    Args:
        eval_sets: per prompt, the eval sets its answer counts in (none when left out: jailbreaks).
        classifier: an optional third judge; it sees `instructions` and each answer.
        instructions: the user's text of each prompt; with it the substring judge also counts an answer that does not
            address its request as a refusal (`judges.off_topic`), as people do.
        checkpoints: where each finished batch (under this intervention) is kept, so a killed run resumes after it.
    """
    description = describe(intervention)
    with intervene(model, intervention):
        completions, scores = batched_generations(
            model, tokenizer, prompts, max_new_tokens, batch_size, refusal_ids,
            checkpoints.within(intervention=description.id), f"generate ({description.name})")
    by_substring = SubstringJudge().judge(completions, list(instructions) if instructions is not None else None)
    by_score = [bool(s > 0) for s in scores]
    by_classifier = classifier.judge(list(instructions or prompts), completions) if classifier else [None] * len(prompts)
    n = len(prompts)
    return pa.Table.from_pydict(
        {
            "model_key": [model_key] * n, "prompt_id": list(prompt_ids), "label": list(labels),
            "eval_sets": [list(s) for s in eval_sets] if eval_sets is not None else [[] for _ in range(n)],
            "intervention_id": [description.id] * n, "intervention_kind": [description.kind] * n,
            "intervention_name": [description.name] * n, "intervention_parameters": [description.parameters] * n,
            "feature_set": [description.feature_set] * n, "max_new_tokens": [max_new_tokens] * n,
            "completion": completions, "refused_substring": by_substring,
            "refusal_score": scores, "refused_score": by_score,
            "refused_classifier": by_classifier,
            "judges_disagree": [len({a, b, c} - {None}) > 1 for a, b, c in zip(by_substring, by_score, by_classifier)],
        },
        schema=GENERATIONS,
    )


def bootstrap_interval(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values`, for statistics with no closed form (a rate takes
    `wilson_interval`)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("Cannot compute a mean over zero rows.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float], first: Sequence, second: Sequence,
                              n_resamples: int = 2000, seed: int = 0, max_undefined: float = 0.05) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic(first, second)`, resampling the pairs (rows) together.

    A resample where the statistic is undefined (not finite, e.g. kappa when both raters give one verdict
    throughout) is left out; when more than `max_undefined` of them are, the interval is (nan, nan).
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.size == 0 or first.shape != second.shape:
        raise ValueError(f"Cannot bootstrap over {first.size} and {second.size} rows: give two equal, non-empty arrays.")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, first.size, size=(n_resamples, first.size))
    values = np.array([statistic(first[pick], second[pick]) for pick in picks], dtype=np.float64)
    defined = values[np.isfinite(values)]
    if defined.size < (1 - max_undefined) * n_resamples:
        return float("nan"), float("nan")
    low, high = np.percentile(defined, [2.5, 97.5])
    return float(low), float(high)


def ratio_interval(changes: np.ndarray, baselines: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                   max_undefined: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean(changes) / mean(baselines) over rows (the first axis), with its 95% bootstrap interval over rows.

    Both arrays are [n_rows, ...]; each result has the trailing shape. A column whose baseline mean is 0
    in more than `max_undefined` of the resamples (a latent that rarely fires) gets nan throughout,
    rather than an interval over the resamples where it happened to fire.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(changes), size=(n_resamples, len(changes)))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns
        point = np.asarray(changes.mean(0) / baselines.mean(0), dtype=np.float64)
        ratios = changes[picks].mean(1) / baselines[picks].mean(1)  # [n_resamples, ...]
        ratios[~np.isfinite(ratios)] = np.nan
        undefined = (np.isnan(ratios).mean(0) > max_undefined) | ~np.isfinite(point)
        low, high = np.nanpercentile(ratios, [2.5, 97.5], axis=0)
    point[undefined], low[undefined], high[undefined] = np.nan, np.nan, np.nan
    return point, low, high


INTERVENTION_COLUMNS = [field.name for field in INTERVENTION_FIELDS]
JUDGE_COLUMNS = {"substring": "refused_substring", "refusal_score": "refused_score", "classifier": "refused_classifier"}


def effect_rows(model_key: str, generations: Sequence[Mapping], baseline: Sequence[Mapping],
                kl: Mapping[str, float] | None = None, cross_entropy: Mapping[str, float] | None = None) -> list[dict]:
    """EFFECTS rows: per eval set x intervention x judge, the refusal rate with its Wilson 95% interval.

    `generations` are GENERATIONS rows, each counted in every eval set of its `eval_sets`; `baseline` are the
    unhooked ones (intervention_kind none) on the same prompts. Each intervention's row also gets its difference in
    refusal rate from the baseline, by the same judge over the same prompts (paired by prompt id), with Newcombe's
    paired 95% interval. `kl` and `cross_entropy` (by intervention id) go on the harmless set's rows.
    A judge that gave no verdict (the classifier when the study has none) gets no row.
    """
    kl, cross_entropy = kl or {}, cross_entropy or {}
    unhooked: dict[str, Mapping] = {}
    for row in baseline:
        if row["intervention_kind"] != "none":
            raise ValueError(f"The baseline generations hold an intervention ({row['intervention_name']}); "
                             "pass the unhooked generations (baseline_generations) as the baseline.")
        unhooked[row["prompt_id"]] = row
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in generations:
        for eval_set in row["eval_sets"]:
            groups.setdefault((eval_set, row["intervention_id"]), []).append(row)
    rows = []
    for (eval_set, identity), members in sorted(groups.items()):
        paired = None
        if members[0]["intervention_kind"] != "none":
            missing = [m["prompt_id"] for m in members if m["prompt_id"] not in unhooked]
            if missing:
                raise ValueError(f"{len(missing)} {eval_set} prompts answered under {members[0]['intervention_name']} have "
                                 f"no baseline answer (e.g. {missing[0]}); re-materialize baseline_generations so both "
                                 "cover the same eval sets.")
            paired = [unhooked[m["prompt_id"]] for m in members]
        harmless = eval_set == HARMLESS_SET
        for judge, column in JUDGE_COLUMNS.items():
            verdicts = [m[column] for m in members]
            if None in verdicts:
                continue
            low, high = wilson_interval(sum(verdicts), len(verdicts))
            row = {
                "model_key": model_key, "eval_set": eval_set,
                **{column: members[0][column] for column in INTERVENTION_COLUMNS}, "judge": judge,
                "n_prompts": len(members), "refusal_rate": sum(verdicts) / len(verdicts), "ci_low": low, "ci_high": high,
                "mean_refusal_score": float(np.mean([m["refusal_score"] for m in members])),
                "kl": kl.get(identity) if harmless else None,
                "cross_entropy_change": cross_entropy.get(identity) if harmless else None,
            }
            before = None if paired is None else [b[column] for b in paired]
            if before is not None and None not in before:
                difference, difference_low, difference_high = paired_difference(verdicts, before)
                row |= {"n_paired": len(before), "baseline_refusal_rate": sum(before) / len(before),
                        "difference": difference, "difference_ci_low": difference_low,
                        "difference_ci_high": difference_high}
            rows.append(row)
    return rows


def draw_mean_rows(rows: Sequence[Mapping]) -> list[dict]:
    """EFFECTS rows for the mean over the seeded draws of a feature set (random), from the draws' own `rows`.

    Rows of interventions with a seed in their parameters are grouped by eval set, kind, feature set and judge;
    each group of at least 2 draws gives one row whose rate, refusal score, KL, cross-entropy change and
    difference from the baseline are the means over the draws, the rate with `draws_interval` and the difference
    with `draws_difference_interval`, which cover the spread across the draws and the prompts alike (one draw is not
    a control). Its name reads e.g. `clamp random (mean of 5 draws) ×-1`.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        if "seed" in json.loads(row["intervention_parameters"]):
            groups.setdefault((row["eval_set"], row["intervention_kind"], row["feature_set"], row["judge"]), []).append(row)
    means = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first, n = members[0], len(members)
        identities = sorted(m["intervention_id"] for m in members)
        rate, low, high = draws_interval([m["refusal_rate"] for m in members], first["n_prompts"])
        row = {**first, "intervention_id": f"{first['intervention_kind']}-mean-"
                                           f"{hashlib.sha256(' '.join(identities).encode()).hexdigest()[:12]}",
               "intervention_name": re.sub(r"\(seed \d+\)", f"(mean of {n} draws)", first["intervention_name"]),
               "intervention_parameters": json.dumps({"mean_of": identities}, separators=(",", ":")),
               "refusal_rate": rate, "ci_low": low, "ci_high": high,
               "mean_refusal_score": float(np.mean([m["mean_refusal_score"] for m in members]))}
        for column in ("kl", "cross_entropy_change", "baseline_refusal_rate"):
            row[column] = None if first.get(column) is None else float(np.mean([m[column] for m in members]))
        if first.get("difference") is not None:
            row["difference"], row["difference_ci_low"], row["difference_ci_high"] = draws_difference_interval(
                [m["difference"] for m in members], [m["difference_ci_low"] for m in members],
                [m["difference_ci_high"] for m in members])
        means.append(row)
    return means
