import numpy as np
import torch

from refusal_core.activations import capture
from refusal_core.chat import format_prompt, instruction_offset, post_instruction_tokens
from refusal_core.edges import template_latents, upstream_edges
from refusal_core.interventions import Clamp, SaeLatents
from refusal_core.saes import LoadedSae
from tests.tiny import random_sae

PROMPTS = ["How do I bake bread?", "List three colours.", "Write a poem about the sea, please.", "Hi there"]


def _saes():
    torch.manual_seed(0)
    saes = {layer: random_sae(layer=layer) for layer in (0, 1)}
    with torch.no_grad():  # encoder = decoder^T, so real latents fire
        for sae in saes.values():
            sae.W_enc.copy_(sae.W_dec.T)
    return saes


def test_clamping_an_upstream_latent_moves_the_downstream_ones_and_a_no_op_clamp_does_not(qwen):
    model, tokenizer = qwen
    saes = _saes()
    texts = [format_prompt(tokenizer, p, "tokenizer") for p in PROMPTS]
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    skip = instruction_offset(tokenizer, "tokenizer")
    latents = list(range(128))
    clean = template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, batch_size=3)
    assert clean.shape == (4, 128) and clean.sum() > 0
    # Latents at layer 0 that fire after the template prefix on these prompts.
    fired = template_latents(model, tokenizer, texts, suffix, saes[0], 0, latents)
    upstream = tuple(int(i) for i in np.argsort(-fired.sum(0))[:8])
    same = Clamp((SaeLatents(0, saes[0], "sha", upstream),), factor=1.0, skip_first=skip)
    assert np.allclose(template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, same), clean, atol=1e-5)
    clamped = Clamp((SaeLatents(0, saes[0], "sha", upstream),), factor=-3.0, skip_first=skip)
    moved = template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, clamped)
    assert np.abs(moved - clean).max() > 1e-2
    # Batching does not change the numbers.
    assert np.allclose(template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, clamped, batch_size=1), moved,
                       atol=1e-5)


def test_upstream_edges_find_a_planted_upstream_latent(qwen):
    model, tokenizer = qwen
    texts = [format_prompt(tokenizer, p, "tokenizer") for p in PROMPTS]
    suffix = post_instruction_tokens(tokenizer, "tokenizer")
    # u: the mean direction of the residual stream after block 0 at the post-instruction tokens.
    (batch,) = capture(model, tokenizer, texts, [0], suffix, progress=False)
    mean = batch.activations[:, 0, 1:, :].reshape(-1, 64).mean(0)
    unit = mean / mean.norm()
    planted, refusal_upstream, refusal, decoys = 0, 1, 2, (3, 4)
    saes = _saes()
    with torch.no_grad():
        for sae in saes.values():
            sae.b_enc.zero_()
        # Latent 0 of layer 0 reads and writes u; the refusal feature at layer 1 reads u; the decoys never fire.
        saes[0].W_enc[:, planted], saes[0].W_dec[planted] = 10 * unit, unit / 10
        saes[1].W_enc[:, refusal] = 10 * unit
        for decoy in decoys:
            saes[0].W_enc[:, decoy] = 0.0
    loaded = {layer: LoadedSae(sae, layer, f"sae{layer}", "test", f"{layer}" * 64) for layer, sae in saes.items()}
    # Stored activations where the decoys and a refusal feature of layer 0 tell harmful from harmless more than u does.
    labels = ["harmful", "harmless"] * 3
    latents = {layer: torch.zeros(6, 2, 128) for layer in (0, 1)}
    for latent, value in {refusal_upstream: 5.0, decoys[0]: 4.0, planted: 3.0, decoys[1]: 2.0}.items():
        latents[0][0::2, :, latent] = value
    edges = upstream_edges("m", model, tokenizer, loaded, [(1, refusal), (0, refusal_upstream)], latents, labels, texts,
                           suffix, n_candidates=3, set_size=1, clamp_multiplier=3.0,
                           skip_first=instruction_offset(tokenizer, "tokenizer"), progress=False)
    assert (edges.downstream_layer, edges.downstream) == (1, [refusal])
    assert edges.candidates == [(0, decoys[0]), (0, planted), (0, decoys[1])]
    assert edges.upstream_set == [(0, planted)] and not edges.notes
    # Clamping the planted latent silences the refusal feature; clamping a latent that never fires changes
    # nothing but rounding.
    assert edges.total_effect[(0, planted)] < -0.5
    assert all(abs(edges.total_effect[(0, decoy)]) < 1e-5 for decoy in decoys)
    rows = edges.table().to_pylist()
    assert len(rows) == 3 * 2 and all(r["in_upstream_set"] == (r["upstream_latent"] == planted) for r in rows)
    assert all(r["n_prompts"] == len(PROMPTS) and r["clean_activation"] > 0 for r in rows)


def test_upstream_edges_without_an_sae_below_the_refusal_features_are_empty_with_a_note(qwen):
    model, tokenizer = qwen
    loaded = {0: LoadedSae(_saes()[0], 0, "sae0", "test", "0" * 64)}
    edges = upstream_edges("m", model, tokenizer, loaded, [(0, 1)], {0: torch.zeros(2, 2, 128)}, ["harmful", "harmless"],
                           PROMPTS, [], 3, 2, 3.0)
    assert edges.table().num_rows == 0 and edges.upstream_set == [] and "no SAE is below it" in edges.notes[0]
