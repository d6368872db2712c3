import numpy as np
import torch

from refusal_core.chat import format_prompt, instruction_offset, post_instruction_tokens
from refusal_core.edges import template_latents
from refusal_core.interventions import Clamp
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
    same = Clamp(saes[0], "sha", 0, upstream, factor=1.0, skip_first=skip)
    assert np.allclose(template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, same), clean, atol=1e-5)
    clamped = Clamp(saes[0], "sha", 0, upstream, factor=-3.0, skip_first=skip)
    moved = template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, clamped)
    assert np.abs(moved - clean).max() > 1e-2
    # Batching does not change the numbers.
    assert np.allclose(template_latents(model, tokenizer, texts, suffix, saes[1], 1, latents, clamped, batch_size=1), moved,
                       atol=1e-5)
