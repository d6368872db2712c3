"""Feature sets: the SAE latents a study takes as its refusal features (and their controls), and a card for each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sae_lens import SAE
from torch import Tensor

from refusal_core.attribution import decoder_cosines, label_mask
from refusal_core.saes import neuronpedia_url
from refusal_core.tables import FEATURE_CARDS, FEATURE_SETS

TOP_PROMPTS = 5
"""Prompts shown on each feature card."""
LOGIT_TOKENS = 10
"""Tokens a feature card lists as promoted and as suppressed by the latent's decoder direction."""


RANKINGS = ("cossim_ap", "cosine", "activation_difference", "attribution")
"""The deterministic rankings a feature set is the top of; `random` draws are their control."""


def refusal_members(feature_sets: pa.Table, name: str = "cossim_ap") -> list[tuple[int, int]]:
    """(layer, latent) of a feature set, in rank order (of `random`, its first draw); none when the table is empty (a study without SAEs)."""
    rows = feature_sets.filter(pc.equal(feature_sets["feature_set"], name)).sort_by("rank")
    if rows.num_rows == 0 and feature_sets.num_rows:
        raise ValueError(f"The feature_sets table has no {name!r} set; re-materialize feature_sets.")
    return next(iter(_members_by_seed(rows).values()), [])


def feature_set_members(feature_sets: pa.Table) -> dict[tuple[str, int | None], list[dict]]:
    """(feature set, seed) -> its FEATURE_SETS rows in rank order: one entry per ranking (seed None) and per random draw."""
    grouped: dict[tuple[str, int | None], list[dict]] = {}
    for row in sorted(feature_sets.to_pylist(), key=lambda r: r.get("rank", 0)):
        grouped.setdefault((row["feature_set"], row.get("seed")), []).append(row)
    return grouped


def rank_methods(attributions: pa.Table) -> dict[str, list[tuple[int, int]]]:
    """Every ranking of the overall rows of `attributions` (LATENT_ATTRIBUTIONS), best first: name -> (layer, latent).

    CosSim+AP is ranked by combined_rank (only latents in their layer's cosine top-k have one); cosine,
    activation difference and attribution by their score, highest first, ties in table order. The table
    holds each layer's top `set_size` latents by every score, so the first `set_size` of every ranking
    across layers are exact; later ones are not.
    """
    scored = attributions.filter(pc.is_null(attributions["prompt_id"])).to_pylist()
    ranked = {
        "cossim_ap": sorted((r for r in scored if r["combined_rank"] is not None), key=lambda r: r["combined_rank"]),
        "cosine": sorted(scored, key=lambda r: -r["decoder_cosine"]),
        "activation_difference": sorted(scored, key=lambda r: -r["activation_difference"]),
        "attribution": sorted(scored, key=lambda r: -r["attribution"]),
    }
    return {name: [(r["layer_index"], r["latent_index"]) for r in rows] for name, rows in ranked.items()}


def random_draws(reference: Sequence[tuple[int, int]], live: Mapping[int, Sequence[int]],
                 seeds: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
    """Per seed, a random stand-in for each latent of `reference` (in its rank order): a latent of the same layer
    among that layer's `live` ones, not in `reference`, drawn without replacement.

    Rank r of every draw lies in the layer of the reference's rank r, so the first k of a draw have the
    reference's layers for every k (the feature-count curve clamps prefixes). A layer whose live latents
    run out leaves the later stand-ins of that layer out.
    """
    taken = set(reference)
    draws = {}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        pools = {}
        for layer in sorted(live):
            candidates = [latent for latent in live[layer] if (layer, latent) not in taken]
            pools[layer] = [candidates[i] for i in torch.randperm(len(candidates), generator=generator).tolist()]
        draws[seed] = [(layer, pools[layer].pop(0)) for layer, _ in reference if pools.get(layer)]
    return draws


def _members_by_seed(rows: pa.Table) -> dict[int | None, list[tuple[int, int]]]:
    grouped: dict[int | None, list[tuple[int, int]]] = {}
    seeds = rows["seed"].to_pylist() if "seed" in rows.column_names else [None] * rows.num_rows
    for seed, layer, latent in zip(seeds, rows["layer_index"].to_pylist(), rows["latent_index"].to_pylist()):
        grouped.setdefault(seed, []).append((layer, latent))
    return dict(sorted(grouped.items(), key=lambda item: (item[0] is not None, item[0] or 0)))


@dataclass(frozen=True)
class FeatureSets:
    """Feature sets of equal size: the FEATURE_SETS table."""

    members: dict[str, list[tuple[int, int]]]
    """Set name -> (layer, latent) in rank order: cossim_ap, cosine, activation_difference, attribution, random (its first draw)."""
    draws: dict[int, list[tuple[int, int]]]
    """Seed -> the latents of that random draw, in the rank order of the CosSim+AP members they stand in for."""
    rows: list[dict]
    """FEATURE_SETS rows, set by set (random: draw by draw) in rank order."""
    notes: list[str]
    """One sentence per set that has fewer latents than asked for."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=FEATURE_SETS)


def select_feature_sets(model_key: str, attributions: pa.Table, saes: Mapping[int, SAE], direction: Tensor,
                        latents: Mapping[int, Tensor], labels: Sequence[str], size: int, induce_multiplier: float,
                        seed: int, n_random_draws: int = 5) -> FeatureSets:
    """The first `size` latents of each ranking (`rank_methods`) in `attributions` (LATENT_ATTRIBUTIONS), and random draws.

    Random: `n_random_draws` draws, seeded `seed`, `seed` + 1, ..., each a stand-in per CosSim+AP
    member from that member's layer (`random_draws`), among the layer's latents that fire on the stored
    prompts (`latents`: layer -> [n_prompts, n_positions, d_sae], with their `labels`), excluding
    CosSim+AP's own: one draw is not a control. Each member's induce value is `induce_multiplier` times
    its largest activation on a harmful prompt.
    """
    harmful, harmless = label_mask(labels, "harmful"), label_mask(labels, "harmless")
    scored = attributions.filter(pc.is_null(attributions["prompt_id"])).to_pylist()
    chosen = {name: members[:size] for name, members in rank_methods(attributions).items()}
    live = {layer: torch.nonzero(latents[layer].amax((0, 1)) > 0).flatten().tolist() for layer in sorted(saes)}
    seeds = [seed + draw for draw in range(n_random_draws)]
    draws = random_draws(chosen["cossim_ap"], live, seeds)
    by_key = {(r["layer_index"], r["latent_index"]): r for r in scored}
    cosines = {layer: decoder_cosines(sae, direction) for layer, sae in saes.items()}
    rows = []
    sets = [(name, None, members) for name, members in chosen.items()]
    sets += [("random", draw_seed, members) for draw_seed, members in draws.items()]
    for name, draw_seed, members in sets:
        for rank, (layer, latent) in enumerate(members, start=1):
            layer_latents = latents[layer][..., latent]  # [n_prompts, n_pos]
            rows.append({
                "model_key": model_key, "feature_set": name, "seed": draw_seed, "rank": rank, "layer_index": layer,
                "latent_index": latent,
                "decoder_cosine": float(cosines[layer][latent]),
                "activation_difference": float(layer_latents[harmful].mean() - layer_latents[harmless].mean()),
                "attribution": by_key[(layer, latent)]["attribution"] if (layer, latent) in by_key else None,
                "induce_value": induce_multiplier * float(layer_latents[harmful].max()),
            })
    notes = [f"Feature set {name} has {len(members)} latents, fewer than {size}."
             for name, members in chosen.items() if len(members) < size]
    short = {draw_seed: len(members) for draw_seed, members in draws.items() if len(members) < size}
    if short:
        notes.append(f"Random draws {', '.join(f'{s} ({n} latents)' for s, n in short.items())} hold fewer than {size} "
                     "latents: their layers have too few live latents.")
    return FeatureSets({**chosen, "random": draws.get(seed, [])}, draws, rows, notes)


@dataclass(frozen=True)
class FeatureCards:
    """One card per selected latent: the FEATURE_CARDS table."""

    cards: list[dict]
    """FEATURE_CARDS rows, by (layer, latent)."""

    @property
    def harmful_share(self) -> float:
        """Share of harmful prompts among the cards' top prompts (0 when there are none)."""
        return float(np.mean([p["label"] == "harmful" for card in self.cards for p in card["top_prompts"]] or [0.0]))

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.cards, schema=FEATURE_CARDS)


def vocabulary(tokenizer, size: int) -> list[str]:
    """Token i as text, for i < `size` (an unembedding may have more rows than the tokenizer has tokens: those are '')."""
    return tokenizer.batch_decode([[i] for i in range(min(size, len(tokenizer)))]) + [""] * max(0, size - len(tokenizer))


def decoder_logits(saes: Mapping[int, SAE], unembedding: Tensor, vocabulary: Sequence[str], keys: Sequence[tuple[int, int]],
                   n: int = LOGIT_TOKENS) -> dict[tuple[int, int], tuple[list[dict], list[dict]]]:
    """(layer, latent) -> (the `n` tokens its decoder row raises most through `unembedding` [vocab, d_model], highest
    first; the `n` it lowers most, lowest first), each {token, logit}; `vocabulary[i]` is token i as text."""
    if not keys:
        return {}
    rows = torch.stack([saes[layer].W_dec[latent].detach().float() for layer, latent in keys])  # [n_keys, d_model]
    every = (unembedding.detach().float() @ rows.to(unembedding.device).T).cpu()  # [vocab, n_keys], one pass for all
    result = {}
    for column, key in enumerate(keys):
        logits = every[:, column]
        order = torch.argsort(logits, descending=True, stable=True)
        pick = lambda ids: [{"token": vocabulary[i], "logit": float(logits[i])} for i in ids.tolist()]  # noqa: E731
        result[key] = pick(order[:n]), pick(order.flip(0)[:n])
    return result


def build_feature_cards(model_key: str, feature_sets: pa.Table, rows: Sequence[Mapping], tokens: Sequence[str],
                        latents: Mapping[int, Tensor], sae_ids: Mapping[int, str], release: str | None,
                        logits: Mapping[tuple[int, int], tuple[list[dict], list[dict]]] | None = None,
                        top_prompts: int = TOP_PROMPTS) -> FeatureCards:
    """A card for every latent of the non-random sets of `feature_sets` (FEATURE_SETS).

    Args:
        rows, tokens, latents: the stored prompts (prompt_id, label, text), their post-instruction tokens
            and layer -> latents [n_prompts, n_positions, d_sae] (`readouts.latent_activations`).
        sae_ids, release: each layer's SAE id and the pretrained release (None for trained SAEs), for the
            Neuronpedia page.
        logits: `decoder_logits` of the cards' latents (empty token lists when left out).
    """
    labels = [row["label"] for row in rows]
    harmful, harmless = label_mask(labels, "harmful"), label_mask(labels, "harmless")
    cards: dict[tuple[int, int], dict] = {}
    for member in feature_sets.filter(pc.not_equal(feature_sets["feature_set"], "random")).to_pylist():
        key = (member["layer_index"], member["latent_index"])
        if key in cards:
            cards[key]["feature_sets"].append(member["feature_set"])
            continue
        promoted, suppressed = (logits or {}).get(key, ([], []))
        values = latents[key[0]][..., key[1]]  # [n_prompts, n_pos]
        peak, where = values.max(dim=1)  # [n_prompts]
        top = [i for i in torch.argsort(-peak, stable=True)[:top_prompts].tolist() if peak[i] > 0]
        cards[key] = {
            "model_key": model_key, "layer_index": key[0], "latent_index": key[1], "feature_sets": [member["feature_set"]],
            "decoder_cosine": member["decoder_cosine"], "activation_difference": member["activation_difference"],
            "attribution": member["attribution"],
            "top_prompts": [{"prompt_id": rows[i]["prompt_id"], "label": rows[i]["label"], "text": rows[i]["text"],
                             "token": tokens[int(where[i])], "activation": float(peak[i])} for i in top],
            "neuronpedia_url": neuronpedia_url(release, sae_ids[key[0]], key[1]) if release else None,
            "harmful_peaks": peak[harmful].tolist(), "harmless_peaks": peak[harmless].tolist(),
            "promoted_tokens": promoted, "suppressed_tokens": suppressed,
        }
    return FeatureCards([cards[key] for key in sorted(cards)])
