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
from refusal_core.saes import LoadedSae
from refusal_core.scoring import SharedBottom, answer_log_probs, completion_cross_entropy, kl_divergence, refusal_token_ids

Applied = dict[str, tuple[Intervention, tuple[str, ...]]]
"""`name -> (intervention, the eval-set labels it is applied to)`."""


def direction_interventions(candidates: pa.Table) -> Applied:
    """The selected refusal direction ablated (every eval set) and added at its layer (harmless prompts)."""
    layer, direction = selected_direction(candidates)
    return {
        "ablate": (Ablate(direction.float()), ("harmful", "harmless", "over_refusal")),
        "add": (Add(direction.float(), layer, 1.0), ("harmless",)),
    }


def feature_interventions(saes: Mapping[int, LoadedSae], feature_sets: pa.Table, feature_edges: pa.Table,
                          clamp_multiplier: float, skip_first: int) -> Applied:
    """Every feature set clamped to -`clamp_multiplier` on harmful prompts; INDUCED_SETS set to their constants on harmless ones.

    Each random draw is a set of its own (`clamp:random:<seed>`). The upstream set (feature_edges' latents
    that lower the refusal features) is clamped too, alone.
    """
    sets = with_upstream_set(feature_set_members(feature_sets), feature_edges)
    result: Applied = {}
    for (name, seed), members in sets.items():
        suffix = "" if seed is None else f":{seed}"
        result[f"clamp:{name}{suffix}"] = (feature_clamp(saes, members, name, -clamp_multiplier, skip_first, seed),
                                           ("harmful",))
        if name in INDUCED_SETS:
            result[f"induce:{name}{suffix}"] = (feature_clamp(saes, members, name, None, skip_first, seed), ("harmless",))
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


def judged_interventions(loaded: LoadedModel, eval_set: pa.Table, applied: Applied, classifier: ClassifierJudge | None,
                         log: Callable[[str], None] = print, checkpoints: Checkpoints = Checkpoints()) -> pa.Table:
    """Judged greedy answers (GENERATIONS rows) of the eval prompts of each intervention's labels, one intervention after another.

    Each finished batch of each intervention is kept in `checkpoints`, so a killed run resumes after the last
    one; they are deleted once every intervention is answered.
    """
    settings, tokenizer = loaded.study.settings, loaded.tokenizer
    tables = []
    for name, (intervention, labels) in applied.items():
        subset = eval_set.filter(pc.is_in(eval_set["label"], pa.array(labels)))
        instructions = subset["text"].to_pylist()
        texts = [format_prompt(tokenizer, text, loaded.study.chat_template) for text in instructions]
        table = judged_generations(
            loaded.model, tokenizer, texts, subset["prompt_id"].to_pylist(), subset["label"].to_pylist(),
            loaded.study.key, refusal_token_ids(loaded.model, tokenizer), intervention, settings.max_new_tokens, settings.batch_size,
            classifier, instructions, checkpoints)
        refused = pc.mean(table["refused_substring"].cast(pa.float64())).as_py()
        log(f"{describe(intervention).name}: {100 * refused:.0f}% of {subset.num_rows} {'/'.join(labels)} prompts refused (substring).")
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
