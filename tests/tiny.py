"""Tiny random chat models, built and saved locally, for fast offline tests."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3", "phi3")
"""Every family the product claims; each has a layout in refusal_core.layouts."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on this package's own prompts, with a Qwen-style chat template."""
    corpus = []
    for name in ("harmless.jsonl", "over_refusal.jsonl"):
        text = (files("refusal_core") / "data" / name).read_text()
        corpus += [json.loads(line)["text"] for line in text.splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config_for(family: str, vocab_size: int, **overrides):
    """A 3-layer config of one of FAMILIES, width 64, 4 query heads of width 16 over 2 key-value heads."""
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=2, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
    )
    configs = {
        "qwen2": (Qwen2Config, {}),
        "qwen3": (Qwen3Config, {"head_dim": 16}),
        "llama": (LlamaConfig, {}),
        "mistral": (MistralConfig, {"sliding_window": None}),
        "gemma2": (Gemma2Config, {"head_dim": 16, "sliding_window": 16}),
        "gemma3": (Gemma3TextConfig, {"head_dim": 16, "sliding_window": 16}),
        "phi3": (Phi3Config, {}),
    }
    if family not in configs:
        raise ValueError(f"Unknown family {family!r}; use one of {', '.join(FAMILIES)}.")
    config_class, extra = configs[family]
    return config_class(**{**common, **extra, **overrides})


def save_tiny_model(folder: Path, family: str = "qwen2", seed: int = 0) -> Path:
    """Build a random tiny chat model of `family` with its tokenizer and save both in `folder` (safetensors)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, len(tokenizer)))
    # Larger random weights than the default init make the residual stream differ visibly per layer.
    # Norm weights vary per channel, as in every trained checkpoint (an intervention that forgets a norm shows).
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.2)
            elif "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_tiny(folder: Path):
    """(model, tokenizer) of a saved tiny model: float32, eval mode, left padding."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer


def random_sae(layer: int = 1, **overrides):
    """A randomly initialised sae-lens TopK SAE on the tiny models' residual stream (width 64) after `layer`."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from refusal_core.saes import layer_to_hook_point

    config = dict(d_in=64, d_sae=128, k=8, metadata=SAEMetadata(hook_name=layer_to_hook_point(layer)))
    return TopKSAE(TopKSAEConfig(**{**config, **overrides})).eval()
