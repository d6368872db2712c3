"""Chat formatting: the prompt a model sees, and which of its tokens come after the user's instruction."""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

PLAIN_TEMPLATE = "Question: {instruction}\nAnswer:"
"""How base models without a chat template are prompted."""

_SENTINEL = "\u2063refusal-sae-instruction\u2063"


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, template: Literal["tokenizer", "plain"]) -> str:
    """The text the model is given for one user `instruction`, ending where the answer starts."""
    if template == "plain":
        # A base model still expects its BOS token, which a chat template would otherwise supply.
        return (tokenizer.bos_token or "") + PLAIN_TEMPLATE.format(instruction=instruction)
    if not tokenizer.chat_template:
        raise ValueError(
            "The tokenizer has no chat template; set chat_template = \"plain\" in the study's registry entry."
        )
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def post_instruction_tokens(
    tokenizer: PreTrainedTokenizerBase, template: Literal["tokenizer", "plain"]
) -> list[int]:
    """Token ids of the template between the end of the user's text and the start of the answer.

    For Qwen's template these are `<|im_end|> \\n <|im_start|> assistant \\n`; for the plain
    template, the tokens of "\\nAnswer:".
    """
    text = format_prompt(tokenizer, _SENTINEL, template)
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    if not suffix:
        raise ValueError("The chat template puts nothing after the instruction; there are no post-instruction tokens.")
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full[-len(ids):] != ids:
        raise ValueError(
            f"The template suffix {suffix!r} does not tokenize the same inside the prompt; "
            "post-instruction positions cannot be located for this tokenizer."
        )
    return ids


def instruction_offset(tokenizer: PreTrainedTokenizerBase, template: Literal["tokenizer", "plain"]) -> int:
    """How many tokens of the template come before the user's instruction (the shared prompt prefix).

    These tokens (BOS, system prompt, role markers) are the same in every prompt and carry residual
    norms far above the rest (attention sinks), so SAEs are trained, graded and spliced only after them.
    """
    text = format_prompt(tokenizer, _SENTINEL, template)
    prefix = text[:text.index(_SENTINEL)]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(prefix_ids), len(full)) and prefix_ids[shared] == full[shared]:
        shared += 1
    return shared
