"""The study's interventions, the eval sets each is applied to, their judged generations and their cost on harmless prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from refusal_core.chat import format_prompt
from refusal_core.checkpoints import Checkpoints
from refusal_core.directions import selected_direction
from refusal_core.evaluation import judged_generations
from refusal_core.features import feature_set_members
from refusal_core.interventions import Ablate, Add, Clamp, Intervention, SaeLatents, describe
from refusal_core.judges import ClassifierJudge
from refusal_core.models import LoadedModel
from refusal_core.named_interventions import INDUCED_SETS, with_upstream_set
from refusal_core.prompts import CURVE_SET, HARMFUL_SETS, HARMLESS_SET, in_eval_sets
from refusal_core.saes import LoadedSae
from refusal_core.scoring import SharedBottom, answer_log_probs, completion_cross_entropy, kl_divergence, refusal_token_ids

Applied = dict[str, tuple[Intervention, tuple[str, ...]]]
"""`name -> (intervention, the eval sets it is applied to)`."""

EVERY_SET = "cossim_ap"
"""The feature set clamped on every harmful eval set; the others are compared on `comparison_sets`."""


def direction_interventions(candidates: pa.Table) -> Applied:
    """The selected refusal direction ablated (the harmful and over-refusal sets) and added at its layer (the harmless set)."""
    layer, direction = selected_direction(candidates)
    return {
        "ablate": (Ablate(direction.float()), (*HARMFUL_SETS, "over_refusal")),
        "add": (Add(direction.float(), layer, 1.0), (HARMLESS_SET,)),
    }


def feature_interventions(saes: Mapping[int, LoadedSae], feature_sets: pa.Table, feature_edges: pa.Table,
                          clamp_multiplier: float, skip_first: int, comparison_sets: Sequence[str] = (CURVE_SET,)) -> Applied:
    """The CosSim+AP set clamped to -`clamp_multiplier` on every harmful eval set, every other feature set on
    `comparison_sets`; INDUCED_SETS set to their constants on the harmless set.

    Each random draw is a set of its own (`clamp:random:<seed>`). The upstream set (feature_edges' latents
    that lower the refusal features) is clamped too, alone.
    """
    sets = with_upstream_set(feature_set_members(feature_sets), feature_edges)
    result: Applied = {}
    for (name, seed), members in sets.items():
        suffix = "" if seed is None else f":{seed}"
        result[f"clamp:{name}{suffix}"] = (feature_clamp(saes, members, name, -clamp_multiplier, skip_first, seed),
                                           HARMFUL_SETS if name == EVERY_SET else tuple(comparison_sets))
        if name in INDUCED_SETS:
            result[f"induce:{name}{suffix}"] = (feature_clamp(saes, members, name, None, skip_first, seed), (HARMLESS_SET,))
    return result


def feature_clamp(saes: Mapping[int, LoadedSae], members: Sequence[Mapping], name: str, factor: float | None,
                  skip_first: int, seed: int | None = None) -> Clamp:
    """The latents of `members` (FEATURE_SETS rows: layer_index, latent_index, and induce_value when `factor` is None)
    multiplied by `factor`, or set to their induce values when it is None; latents grouped by layer in members' order."""
    by_layer: dict[int, list[Mapping]] = {}
    for member in members:
        by_layer.setdefault(member["layer_index"], []).append(member)
    targets = tuple(SaeLatents(layer, saes[layer].sae, saes[layer].weights_sha256,
                               tuple(m["latent_index"] for m in layer_members),
                               None if factor is not None else tuple(m["induce_value"] for m in layer_members))
                    for layer, layer_members in sorted(by_layer.items()))
    return Clamp(targets, factor, skip_first, name, seed)


def judged_interventions(loaded: LoadedModel, eval_sets: pa.Table, applied: Applied, classifier: ClassifierJudge | None,
                         log: Callable[[str], None] = print, checkpoints: Checkpoints = Checkpoints()) -> pa.Table:
    """Judged greedy answers (GENERATIONS rows) to the prompts of each intervention's eval sets, one intervention after
    another; `eval_sets` is `prompts.eval_set_prompts`. A prompt in several of an intervention's sets is answered once.

    Each finished batch of each intervention is kept in `checkpoints`, so a killed run resumes after the last
    one; they are deleted once every intervention is answered.
    """
    settings, tokenizer = loaded.study.settings, loaded.tokenizer
    tables = []
    for name, (intervention, names) in applied.items():
        subset, members = in_eval_sets(eval_sets, names)
        instructions = subset["text"].to_pylist()
        texts = [format_prompt(tokenizer, text, loaded.study.chat_template) for text in instructions]
        table = judged_generations(
            loaded.model, tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(),
            loaded.study.key, refusal_token_ids(loaded.model, tokenizer), intervention, settings.max_new_tokens, settings.batch_size,
            classifier, instructions, checkpoints, members)
        refused = pc.mean(table["refused_substring"].cast(pa.float64())).as_py()
        log(f"{describe(intervention).name}: {100 * refused:.0f}% of {subset.num_rows} prompts of {', '.join(names)} refused (substring).")
        tables.append(table)
    checkpoints.clear()
    return pa.concat_tables(tables)


def harmless_costs(loaded: LoadedModel, harmless: pa.Table, baseline_generations: pa.Table,
                   applied: Applied) -> tuple[dict[str, float], dict[str, float]]:
    """(KL at the first answer token, change in cross-entropy of the baseline's own answers) per intervention id, on `harmless` prompts.

    Both are means over the prompts; the baseline ("none") costs 0.
    """
    settings, model, tokenizer = loaded.study.settings, loaded.model, loaded.tokenizer
    texts = [format_prompt(tokenizer, t, loaded.study.chat_template) for t in harmless["text"].to_pylist()]
    answers = dict(zip(baseline_generations["prompt_id"].to_pylist(), baseline_generations["completion"].to_pylist()))
    completions = [answers[i] for i in harmless["prompt_id"].to_pylist()]
    bottom = SharedBottom(model, [intervention for intervention, _ in applied.values()])
    clean = answer_log_probs(model, tokenizer, texts, None, settings.batch_size, bottom=bottom)
    clean_loss = completion_cross_entropy(model, tokenizer, texts, completions, None, settings.batch_size)
    kl, cross_entropy = {"none": 0.0}, {"none": 0.0}
    for intervention, _ in applied.values():
        identity = describe(intervention).id
        changed = answer_log_probs(model, tokenizer, texts, intervention, settings.batch_size, bottom=bottom)
        kl[identity] = float(kl_divergence(clean, changed).mean())
        loss = completion_cross_entropy(model, tokenizer, texts, completions, intervention, settings.batch_size)
        cross_entropy[identity] = float((loss - clean_loss).nanmean())
    return kl, cross_entropy
