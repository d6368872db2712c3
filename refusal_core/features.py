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


def refusal_members(feature_sets: pa.Table, name: str = "cossim_ap") -> list[tuple[int, int]]:
    """(layer, latent) of a feature set, in rank order; none when the table is empty (a study without SAEs)."""
    rows = feature_sets.filter(pc.equal(feature_sets["feature_set"], name)).sort_by("rank")
    if rows.num_rows == 0 and feature_sets.num_rows:
        raise ValueError(f"The feature_sets table has no {name!r} set; re-materialize feature_sets.")
    return list(zip(rows["layer_index"].to_pylist(), rows["latent_index"].to_pylist()))


@dataclass(frozen=True)
class FeatureSets:
    """Feature sets of equal size: the FEATURE_SETS table."""

    members: dict[str, list[tuple[int, int]]]
    """Set name -> (layer, latent) in rank order: cossim_ap, cosine, activation_difference, attribution, random."""
    rows: list[dict]
    """FEATURE_SETS rows, set by set in rank order."""
    notes: list[str]
    """One sentence per set that has fewer latents than asked for."""

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=FEATURE_SETS)


def select_feature_sets(model_key: str, attributions: pa.Table, saes: Mapping[int, SAE], direction: Tensor,
                        latents: Mapping[int, Tensor], labels: Sequence[str], size: int, induce_multiplier: float,
                        seed: int) -> FeatureSets:
    """The first `size` latents of each ranking in the overall rows of `attributions` (LATENT_ATTRIBUTIONS), and random ones.

    CosSim+AP is ranked by combined_rank; cosine, activation difference and attribution by their score.
    Random: as many latents per layer as CosSim+AP took there, drawn (seeded) among the layer's latents
    that fire on the stored prompts (`latents`: layer -> [n_prompts, n_positions, d_sae], with their
    `labels`), excluding CosSim+AP's own. Each member's induce value is `induce_multiplier` times its
    largest activation on a harmful prompt.
    """
    harmful, harmless = label_mask(labels, "harmful"), label_mask(labels, "harmless")
    scored = attributions.filter(pc.is_null(attributions["prompt_id"])).to_pylist()
    chosen = {
        "cossim_ap": sorted((r for r in scored if r["combined_rank"] is not None), key=lambda r: r["combined_rank"]),
        "cosine": sorted(scored, key=lambda r: -r["decoder_cosine"]),
        "activation_difference": sorted(scored, key=lambda r: -r["activation_difference"]),
        "attribution": sorted(scored, key=lambda r: -r["attribution"]),
    }
    chosen = {name: [(r["layer_index"], r["latent_index"]) for r in ranked[:size]] for name, ranked in chosen.items()}
    generator = torch.Generator().manual_seed(seed)
    chosen["random"] = []
    for layer in sorted(saes):
        taken = {latent for chosen_layer, latent in chosen["cossim_ap"] if chosen_layer == layer}
        count = sum(1 for chosen_layer, _ in chosen["cossim_ap"] if chosen_layer == layer)
        alive = [i for i in torch.nonzero(latents[layer].amax((0, 1)) > 0).flatten().tolist() if i not in taken]
        order = torch.randperm(len(alive), generator=generator)[:count].tolist()
        chosen["random"] += [(layer, alive[i]) for i in sorted(order)]
    by_key = {(r["layer_index"], r["latent_index"]): r for r in scored}
    cosines = {layer: decoder_cosines(sae, direction) for layer, sae in saes.items()}
    rows = []
    for name, members in chosen.items():
        for rank, (layer, latent) in enumerate(members, start=1):
            layer_latents = latents[layer][..., latent]  # [n_prompts, n_pos]
            rows.append({
                "model_key": model_key, "feature_set": name, "rank": rank, "layer_index": layer, "latent_index": latent,
                "decoder_cosine": float(cosines[layer][latent]),
                "activation_difference": float(layer_latents[harmful].mean() - layer_latents[harmless].mean()),
                "attribution": by_key[(layer, latent)]["attribution"] if (layer, latent) in by_key else None,
                "induce_value": induce_multiplier * float(layer_latents[harmful].max()),
            })
    notes = [f"Feature set {name} has {len(members)} latents, fewer than {size}."
             for name, members in chosen.items() if len(members) < size]
    return FeatureSets(chosen, rows, notes)


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


def build_feature_cards(model_key: str, feature_sets: pa.Table, rows: Sequence[Mapping], tokens: Sequence[str],
                        latents: Mapping[int, Tensor], sae_ids: Mapping[int, str], release: str | None,
                        top_prompts: int = TOP_PROMPTS) -> FeatureCards:
    """A card for every latent of the non-random sets of `feature_sets` (FEATURE_SETS).

    Args:
        rows, tokens, latents: the stored prompts (prompt_id, label, text), their post-instruction tokens
            and layer -> latents [n_prompts, n_positions, d_sae] (`readouts.latent_activations`).
        sae_ids, release: each layer's SAE id and the pretrained release (None for trained SAEs), for the
            Neuronpedia page.
    """
    cards: dict[tuple[int, int], dict] = {}
    for member in feature_sets.filter(pc.not_equal(feature_sets["feature_set"], "random")).to_pylist():
        key = (member["layer_index"], member["latent_index"])
        if key in cards:
            cards[key]["feature_sets"].append(member["feature_set"])
            continue
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
        }
    return FeatureCards([cards[key] for key in sorted(cards)])
