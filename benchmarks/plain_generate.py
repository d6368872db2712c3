"""Greedy answers with Hugging Face alone: the baseline the generation and start-up benchmarks time.

    python benchmarks/plain_generate.py MODEL_FOLDER PROMPTS.txt OUT.jsonl [--max-new-tokens 32] [--batch-size 32]

As a script it loads a save_pretrained folder in float32, applies the tokenizer's chat template to each prompt
(one a line), generates greedily in batches of the given size, in the file's order, and writes one
`{"completion": ...}` line per prompt. It imports nothing but torch and transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def plain_generate(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The new token ids of each formatted text from `model.generate`, up to the generation config's EOS token."""
    stops = model.generation_config.eos_token_id
    stops = {stops} if isinstance(stops, int) else set(stops)
    answers = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True,
                           return_tensors="pt").to(model.device)
        with torch.inference_mode():
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
            answers.append(row[:next((i for i, token in enumerate(row) if token in stops), len(row))])
    return answers


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False) for prompt in prompts]
    answers = plain_generate(model, tokenizer, texts, args.max_new_tokens, args.batch_size)
    with args.out.open("w", encoding="utf-8") as out:
        for answer in answers:
            out.write(json.dumps({"completion": tokenizer.decode(answer, skip_special_tokens=True)}) + "\n")


if __name__ == "__main__":
    main()
