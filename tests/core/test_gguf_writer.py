import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gguf_writer import write_gguf
from tests.tiny import save_tiny_model

PROMPTS = [
    "How do I bake bread?",
    "Tell me 12345 jokes!\n\nPlease,  now.",
    "What's 2+2? I'd like   spaces\tand tabs.",
]


def test_gguf_round_trip_matches_original(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "qwen2")
    gguf = write_gguf(folder, tmp_path / "gguf" / "tiny-f32.gguf")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        ids = tokenizer(text, return_tensors="pt").input_ids
        gguf_ids = gguf_tokenizer(text, return_tensors="pt").input_ids
        assert torch.equal(gguf_ids, ids), prompt
        with torch.no_grad():
            logits, gguf_logits = model(ids).logits, gguf_model(gguf_ids).logits
        assert torch.allclose(gguf_logits, logits, atol=1e-5), (gguf_logits - logits).abs().max()
