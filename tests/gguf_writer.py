"""Write a tiny saved chat model as an all-F32 GGUF file, so tests can load a model through `gguf_file=`.

The file follows llama.cpp's conventions (tensor names from `gguf.get_tensor_name_map`, hyper-parameters
under `<arch>.*`, a byte-level BPE vocabulary under `tokenizer.ggml.*`) closely enough that transformers
reads it back to the same logits and the same input ids as the folder it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

SUPPORTED = ("qwen2", "llama")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary halves (transformers' GGUF reader undoes exactly this)."""
    halves = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def _add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """The model shape, under the keys transformers' legacy GGUF config reader maps back."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _pre_tokenizer_name(state: dict | None) -> str:
    """llama.cpp's name for the split the loaded tokenizer really uses (AutoTokenizer may swap in its own).

    A qwen2 folder loads as `Qwen2Tokenizer`, which replaces the saved ByteLevel split with Qwen2's regex
    (digits one by one); a plain ByteLevel split is GPT-2's, which transformers keeps for "gpt-2".
    """
    state = state or {}
    if state.get("type") == "ByteLevel" and state.get("use_regex"):
        return "gpt-2"
    split = state.get("pretokenizers", [{}])[0].get("pattern", {}).get("Regex")
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if regex == split:
            return name
    raise ValueError(f"No GGUF pre-tokenizer name matches {state}.")


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, config: PretrainedConfig) -> None:
    """Vocabulary, merges, token types, special ids and chat template of the folder's byte-level BPE."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE":
        raise ValueError(f"Only byte-level BPE tokenizers can be written, not {model['type']}.")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        tokens[index] = added.content
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend["pre_tokenizer"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # BOS from config.json, as llama.cpp's converter falls back to; it is never prepended (add_bos_token False).
    special = {"bos": config.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for kind, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(folder: Path, output: Path) -> Path:
    """Write the tiny qwen2 model saved in `folder` (config.json, model.safetensors, tokenizer files) as a GGUF
    file at `output`, all tensors in F32, with the tokenizer and chat template in the GGUF metadata.

    llama models work too (q/k rows permuted the llama.cpp way); any other family raises ValueError.
    """
    folder, output = Path(folder), Path(output)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"Cannot write a {config.model_type!r} model as GGUF; supported: {', '.join(SUPPORTED)}.")
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == config.model_type)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(output, config.model_type)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, folder, config)

    for hf_name, weights in load_file(folder / "model.safetensors").items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"No GGUF name for tensor {hf_name!r}.")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if config.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            weights = _permute(weights, heads)
        writer.add_tensor(name, weights)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output
