"""The chat prompt of BitNet b1.58 2B-4T (SPEC §4) as a Jinja ``chat_template`` for Transformers tokenizers.

``<|begin_of_text|>`` then ``Role: content<|eot_id|>`` for each message (role capitalised: ``System``,
``User``, ``Assistant``), then ``Assistant: `` when a generation prompt is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLAMA3_CHAT_TEMPLATE", "apply_llama3_chat_template"]

#: Jinja template; set it as ``tokenizer.chat_template`` (``apply_llama3_chat_template`` does).
LLAMA3_CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def apply_llama3_chat_template(tokenizer: Any) -> Any:
    """Put :data:`LLAMA3_CHAT_TEMPLATE` on ``tokenizer`` and return it.

    Refuses (``ValueError``) a tokenizer that lacks ``<|eot_id|>`` or has no BOS token: the prompt would
    silently lose its turn structure.
    """
    if tokenizer.bos_token is None:
        raise ValueError("the Llama-3 chat prompt starts with the BOS token (<|begin_of_text|>); this tokenizer has none")
    if tokenizer.convert_tokens_to_ids("<|eot_id|>") in (None, tokenizer.unk_token_id):
        raise ValueError("the Llama-3 chat prompt ends each turn with <|eot_id|>; this tokenizer has no such token")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer
