import pyarrow as pa
import pytest
import torch

from refusal_core.attribution import LatentRanking, LayerScores, rank_latents
from refusal_core.features import build_feature_cards, decoder_logits, random_draws, rank_methods, refusal_members, select_feature_sets
from tests.tiny import random_sae

D_SAE = 128
PLANTED = [(1, 3), (0, 7)]
"""Latents with a high decoder cosine and the largest attribution, most first."""


def _ranking(n_prompts: int = 3) -> LatentRanking:
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for layer in (0, 1):
        cosine = 0.1 * torch.rand(D_SAE, generator=generator, dtype=torch.float64)
        difference = 0.1 * torch.rand(D_SAE, generator=generator, dtype=torch.float64)
        attribution = 0.01 * torch.randn(n_prompts, D_SAE, generator=generator, dtype=torch.float64)
        layers[layer] = LayerScores(cosine, difference, attribution)
    (top_layer, top), (second_layer, second) = PLANTED
    layers[top_layer].cosine[top], layers[top_layer].attribution[:, top] = 0.8, 1.0
    layers[second_layer].cosine[second], layers[second_layer].attribution[:, second] = 0.7, 0.5
    # A large attribution without a high cosine, and the highest cosine without attribution.
    layers[0].cosine[11], layers[0].attribution[:, 11] = 0.0, 5.0
    layers[1].cosine[5] = 0.95
    return LatentRanking("m", layers, [f"p{i}" for i in range(n_prompts)], cosine_top_k=3, set_size=2)


def test_planted_latents_come_first_in_the_cossim_ap_ranking_overall_and_per_prompt():
    table = _ranking().table().to_pylist()
    for scope in (None, "p0", "p1", "p2"):
        rows = [r for r in table if r["prompt_id"] == scope]
        ranked = sorted((r for r in rows if r["combined_rank"] is not None), key=lambda r: r["combined_rank"])
        assert [(r["layer_index"], r["latent_index"]) for r in ranked[:2]] == PLANTED
        # Only a layer's cosine top-3 is ranked: 3 per layer, ranks 1..6.
        assert [r["combined_rank"] for r in ranked] == list(range(1, 7))
        assert all((r["combined_rank"] is not None) == (r["cosine_rank"] <= 3) for r in rows)
        decoy = next(r for r in rows if (r["layer_index"], r["latent_index"]) == (0, 11))
        assert decoy["combined_rank"] is None and decoy["attribution"] == pytest.approx(5.0)
        assert next(r for r in rows if (r["layer_index"], r["latent_index"]) == (1, 5))["cosine_rank"] == 1
    overall = [r for r in table if r["prompt_id"] is None]
    assert len(table) == 4 * len(overall) and {r["model_key"] for r in table} == {"m"}


def test_rank_latents_needs_harmful_and_harmless_prompts():
    latents = {1: torch.zeros(2, 3, D_SAE)}
    with pytest.raises(ValueError, match="harmful and harmless"):
        rank_latents("m", None, None, {1: random_sae()}, torch.ones(64), latents, ["harmful", "harmful"], ["x"], ["p"],
                     steps=1, cosine_top_k=3, set_size=2)


def _latents(alive: dict[int, list[int]], labels: list[str]) -> dict[int, torch.Tensor]:
    """layer -> [n_prompts, 2 positions, D_SAE]: the `alive` latents fire (more on harmful prompts), the rest never do."""
    result = {}
    for layer, indices in alive.items():
        values = torch.zeros(len(labels), 2, D_SAE)
        for i, label in enumerate(labels):
            values[i, 1, indices] = (2.0 if label == "harmful" else 0.5) + i
        result[layer] = values
    return result


def test_the_random_set_is_drawn_among_live_latents_with_cossim_aps_count_per_layer():
    labels = ["harmful", "harmless", "harmful", "harmless"]
    alive = {0: [2, 7, 11, 40, 41, 42, 90], 1: [3, 5, 60, 61]}
    saes = {layer: random_sae(layer=layer) for layer in (0, 1)}
    attributions = _ranking().table()
    chosen = select_feature_sets("m", attributions, saes, torch.ones(64), _latents(alive, labels), labels, size=2,
                                 induce_multiplier=3.0, seed=0)
    assert chosen.members["cossim_ap"] == PLANTED
    assert {name: len(members) for name, members in chosen.members.items()} == dict.fromkeys(
        ("cossim_ap", "cosine", "activation_difference", "attribution", "random"), 2)
    assert chosen.members["cosine"][0] == (1, 5) and chosen.members["attribution"][0] == (0, 11)
    assert sorted(chosen.draws) == [0, 1, 2, 3, 4] and chosen.members["random"] == chosen.draws[0]
    for members in chosen.draws.values():
        # Rank r of every draw stands in for CosSim+AP's rank r, from its layer, among the live latents.
        assert [layer for layer, _ in members] == [layer for layer, _ in PLANTED]
        assert all(latent in alive[layer] and (layer, latent) not in PLANTED for layer, latent in members)
    assert len({tuple(members) for members in chosen.draws.values()}) > 1
    rows = chosen.table().to_pylist()
    assert sorted({r["seed"] for r in rows if r["feature_set"] == "random"}) == [0, 1, 2, 3, 4]
    assert {r["seed"] for r in rows if r["feature_set"] != "random"} == {None}
    # The same seed draws the same set; rows carry each member's scores.
    again = select_feature_sets("m", attributions, saes, torch.ones(64), _latents(alive, labels), labels, 2, 3.0, seed=0)
    assert again.draws == chosen.draws and not chosen.notes
    table = chosen.table().to_pylist()
    row = next(r for r in table if r["feature_set"] == "cossim_ap" and r["rank"] == 2)
    assert (row["layer_index"], row["latent_index"]) == (0, 7)
    assert row["induce_value"] == pytest.approx(3.0 * 4.0)  # largest harmful activation: 2 + prompt 2
    assert row["activation_difference"] == pytest.approx((2 + 4) / 4 - (1.5 + 3.5) / 4)  # over prompts and positions


def test_a_layer_with_too_few_live_latents_gives_a_short_random_set_and_a_note():
    labels = ["harmful", "harmless"]
    chosen = select_feature_sets("m", _ranking().table(), {layer: random_sae(layer=layer) for layer in (0, 1)},
                                 torch.ones(64), _latents({0: [7], 1: [3]}, labels), labels, 2, 3.0, seed=0)
    assert chosen.members["random"] == [] and chosen.notes == [
        "Random draws 0 (0 latents), 1 (0 latents), 2 (0 latents), 3 (0 latents), 4 (0 latents) hold fewer than 2 "
        "latents: their layers have too few live latents."]


def test_feature_cards_show_the_prompts_that_activate_each_latent_most():
    labels = ["harmful", "harmless", "harmful", "harmless"]
    rows = [{"prompt_id": f"p{i}", "label": label, "text": f"text {i}"} for i, label in enumerate(labels)]
    latents = _latents({0: [7], 1: [3]}, labels)
    sets = pa.Table.from_pylist([
        {"feature_set": "cossim_ap", "layer_index": 0, "latent_index": 7, "decoder_cosine": 0.8,
         "activation_difference": 1.0, "attribution": 1.0},
        {"feature_set": "cosine", "layer_index": 0, "latent_index": 7, "decoder_cosine": 0.8,
         "activation_difference": 1.0, "attribution": 1.0},
        {"feature_set": "random", "layer_index": 1, "latent_index": 3, "decoder_cosine": 0.1,
         "activation_difference": 0.0, "attribution": None}])
    cards = build_feature_cards("m", sets, rows, ["[instruction]", "tok"], latents, {0: "sae0", 1: "sae1"}, None,
                                top_prompts=3)
    (card,) = cards.table().to_pylist()
    assert (card["layer_index"], card["latent_index"], card["feature_sets"]) == (0, 7, ["cossim_ap", "cosine"])
    # Peaks 2, 1.5, 4, 3.5 at the second position: the top 3, highest first.
    assert [(p["prompt_id"], p["token"], p["activation"]) for p in card["top_prompts"]] == [
        ("p2", "tok", 4.0), ("p3", "tok", 3.5), ("p0", "tok", 2.0)]
    assert card["neuronpedia_url"] is None and cards.harmful_share == pytest.approx(2 / 3)
    # The distribution the feature page draws: each stored prompt's peak, by label.
    assert card["harmful_peaks"] == [2.0, 4.0] and card["harmless_peaks"] == [1.5, 3.5]
    assert card["promoted_tokens"] == [] and card["suppressed_tokens"] == []


def test_decoder_logits_read_the_tokens_a_latents_decoder_row_raises_and_lowers():
    class Sae:  # only W_dec is read
        W_dec = torch.zeros(4, 3)
    Sae.W_dec[2] = torch.tensor([1.0, 0.0, -1.0])
    unembedding = torch.tensor([[0.0, 0, 1], [2, 0, 0], [0, 5, 0], [1, 0, 0], [0, 0, 0.5]])  # [vocab 5, d 3]
    (promoted, suppressed), = decoder_logits({0: Sae()}, unembedding, list("abcde"), [(0, 2)], n=2).values()
    assert promoted == [{"token": "b", "logit": 2.0}, {"token": "d", "logit": 1.0}]
    assert suppressed == [{"token": "a", "logit": -1.0}, {"token": "e", "logit": -0.5}]


def test_random_draws_follow_the_reference_layers_rank_by_rank_without_repeats():
    reference = [(1, 0), (0, 0), (1, 1), (1, 2)]
    live = {0: [0, 5, 6], 1: [0, 1, 2, 7, 8]}
    draws = random_draws(reference, live, seeds=[3, 4])
    for members in draws.values():
        assert [layer for layer, _ in members] == [1, 0, 1]  # layer 1 has only 2 live latents outside the reference
        assert len(set(members)) == 3 and not set(members) & set(reference)
    assert random_draws(reference, live, seeds=[3]) == {3: draws[3]}


def test_rank_methods_orders_each_ranking_and_the_sets_are_their_prefixes():
    attributions = _ranking().table()
    ranked = rank_methods(attributions)
    assert ranked["cossim_ap"][:2] == PLANTED and len(ranked["cossim_ap"]) == 6
    assert ranked["cosine"][0] == (1, 5) and ranked["attribution"][0] == (0, 11)
    labels = ["harmful", "harmless"]
    chosen = select_feature_sets("m", attributions, {layer: random_sae(layer=layer) for layer in (0, 1)}, torch.ones(64),
                                 _latents({0: list(range(40)), 1: list(range(40))}, labels), labels, 2, 3.0, seed=7)
    assert all(chosen.members[name] == ranked[name][:2] for name in ranked)
    assert refusal_members(chosen.table(), "random") == chosen.draws[7]
