"""Latent activations after the prompt template under an intervention: how clamping one latent moves later ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sae_lens import SAE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_core.activations import capture
from refusal_core.attribution import encode_rows
from refusal_core.interventions import Intervention, intervene


def template_latents(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     suffix_ids: Sequence[int], sae: SAE, layer: int, latents: Sequence[int],
                     intervention: Intervention | None = None, batch_size: int = 16) -> np.ndarray:
    """[n_prompts, n_latents]: `latents` of the SAE at block `layer`'s output, averaged over the post-instruction tokens.

    The forward passes run under `intervention` (say, a Clamp at an earlier layer) and stop after `layer`.
    """
    result = np.zeros((len(prompts), len(latents)))
    with intervene(model, intervention):
        for batch in capture(model, tokenizer, prompts, [layer], suffix_ids, batch_size, progress=False):
            template = batch.activations[:, 0, 1:, :]  # [b, n_template, d]; position 0 is the instruction's last token
            encoded = encode_rows(sae, template.reshape(-1, template.shape[-1])).reshape(*template.shape[:2], -1)
            result[batch.indices] = encoded[..., list(latents)].mean(dim=1).double().numpy()
    return result
