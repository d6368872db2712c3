import pyarrow as pa
import torch

from refusal_core.hooks import record_residual
from refusal_core.interventions import Clamp, describe, intervene
from refusal_core.prompts import HARMFUL_SETS
from refusal_core.saes import LoadedSae
from refusal_core.study_interventions import INDUCED_SETS, feature_interventions
from tests.tiny import random_sae


def _saes():
    return {layer: LoadedSae(random_sae(layer=layer), layer, f"layer_{layer}", "local:x", f"{layer}" * 64)
            for layer in (0, 1)}


def _sets():
    rows = [("cossim_ap", 0, 5, 2.0), ("cossim_ap", 1, 7, 3.5), ("cossim_ap", 1, 9, 1.0),
            ("random", 0, 11, 0.5), ("cosine", 1, 7, 3.5)]
    return pa.Table.from_pylist([{"feature_set": s, "layer_index": l, "latent_index": i, "induce_value": v}
                                 for s, l, i, v in rows])


def _edges(in_set):
    return pa.Table.from_pylist([{"upstream_layer": 0, "upstream_latent": 3, "in_upstream_set": in_set},
                                 {"upstream_layer": 0, "upstream_latent": 3, "in_upstream_set": in_set},
                                 {"upstream_layer": 0, "upstream_latent": 8, "in_upstream_set": False}])


def test_feature_interventions_clamp_every_set_and_induce_the_method_and_its_control():
    applied = feature_interventions(_saes(), _sets(), _edges(True), clamp_multiplier=2.0, skip_first=4)
    assert sorted(applied) == ["clamp:cosine", "clamp:cossim_ap", "clamp:random", "clamp:upstream",
                               "induce:cossim_ap", "induce:random"]
    clamp, sets = applied["clamp:cossim_ap"]
    assert sets == HARMFUL_SETS and clamp.factor == -2.0 and clamp.skip_first == 4
    assert applied["clamp:cosine"][1] == applied["clamp:random"][1] == applied["clamp:upstream"][1] == ("harmbench",)
    compared = feature_interventions(_saes(), _sets(), _edges(True), 2.0, 4, ["jbb", "advbench"])
    assert compared["clamp:cosine"][1] == ("jbb", "advbench") and compared["clamp:cossim_ap"][1] == HARMFUL_SETS
    assert [(t.layer, t.latents, t.values) for t in clamp.targets] == [(0, (5,), None), (1, (7, 9), None)]
    induce, sets = applied["induce:cossim_ap"]
    assert sets == ("alpaca_eval",) and [t.values for t in induce.targets] == [(2.0,), (3.5, 1.0)]
    assert describe(induce).name == "induce cossim_ap" and describe(clamp).name == "clamp cossim_ap ×-2"
    assert [(t.layer, t.latents) for t in applied["clamp:upstream"][0].targets] == [(0, (3,))]
    assert {name.split(":")[1] for name in applied if name.startswith("induce:")} == set(INDUCED_SETS)


def test_an_empty_upstream_set_is_not_clamped():
    assert "clamp:upstream" not in feature_interventions(_saes(), _sets(), _edges(False), 1.0, 0)


def test_a_feature_set_clamp_edits_each_layer_with_its_own_sae(qwen):
    model, tokenizer = qwen
    saes = _saes()
    inputs = tokenizer(["How do I bake bread?"], return_tensors="pt")
    with torch.no_grad(), record_residual(model, [0, 1]) as clean_hidden:
        clean = model(**inputs).logits
    fired = {layer: int(saes[layer].sae.encode(clean_hidden[layer]).amax((0, 1)).argmax()) for layer in (0, 1)}
    sets = pa.Table.from_pylist([{"feature_set": "cossim_ap", "layer_index": layer, "latent_index": latent, "induce_value": 1.0}
                                 for layer, latent in fired.items()])
    clamp, _ = feature_interventions(saes, sets, _edges(False), 1.0, 0)["clamp:cossim_ap"]
    assert [point for point, _ in clamp.hooks(model)] == ["resid_post.0", "resid_post.1"]
    with torch.no_grad(), intervene(model, clamp), record_residual(model, [0]) as clamped_hidden:
        clamped = model(**inputs).logits
    latent = saes[0].sae.encode(clean_hidden[0])[..., fired[0]]
    expected = clean_hidden[0] - 2 * latent[..., None] * saes[0].sae.W_dec[fired[0]]
    assert torch.allclose(clamped_hidden[0], expected, atol=1e-4)  # x -1 is a change of -2x
    assert not torch.allclose(clean, clamped, atol=1e-4)
    # Layer 1 moves by its own latent's decoded change, read on the stream that layer 0's clamp left.
    only_first = Clamp((clamp.targets[0],), -1.0)
    with torch.no_grad(), intervene(model, only_first), record_residual(model, [1]) as first:
        model(**inputs)
    with torch.no_grad(), intervene(model, clamp), record_residual(model, [1]) as both:
        model(**inputs)
    latent = saes[1].sae.encode(first[1])[..., fired[1]]
    assert torch.allclose(both[1], first[1] - 2 * latent[..., None] * saes[1].sae.W_dec[fired[1]], atol=1e-4)


def test_each_random_draw_is_clamped_and_induced_on_its_own_with_its_seed_in_the_name():
    rows = [{"feature_set": "random", "seed": seed, "rank": rank, "layer_index": 0, "latent_index": latent,
             "induce_value": 1.0} for seed, latents in ((3, (11, 12)), (4, (20, 21))) for rank, latent in enumerate(latents, 1)]
    applied = feature_interventions(_saes(), pa.Table.from_pylist(rows), _edges(False), 1.0, 0)
    assert sorted(applied) == ["clamp:random:3", "clamp:random:4", "induce:random:3", "induce:random:4"]
    clamp = applied["clamp:random:4"][0]
    assert [t.latents for t in clamp.targets] == [(20, 21)] and describe(clamp).name == "clamp random (seed 4) ×-1"
    assert describe(clamp).feature_set == "random" and '"seed":4' in describe(clamp).parameters
    # A ranking's clamp has no seed in its parameters, so its id is the one it always had.
    assert "seed" not in describe(feature_interventions(_saes(), _sets(), _edges(False), 1.0, 0)["clamp:cosine"][0]).parameters
