"""A small byte-level BPE tokenizer trained on the corpus in seconds, wrapped for Transformers.

The result is a :class:`transformers.PreTrainedTokenizerFast` with Llama-3-style special tokens
(``<|begin_of_text|>`` as BOS, ``<|end_of_text|>`` as EOS, ``<|eot_id|>`` ending a chat turn, a
dedicated ``<|pad|>``) and the chat template of the BitNet b1.58 2B-4T model (docs/SPEC.md §4,
:data:`bitnet_torch.models.LLAMA3_CHAT_TEMPLATE`): BOS, then ``Role: content<|eot_id|>`` per message, then
``Assistant: `` when a generation prompt is asked for.
It is saved next to the model with ``save_pretrained`` and reloads with ``AutoTokenizer``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..models.chat import apply_llama3_chat_template

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "EOT_TOKEN",
    "PAD_TOKEN",
    "train_bpe_tokenizer",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, PAD_TOKEN)

#: The smallest vocabulary that still holds the 256 byte symbols and the special tokens.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and return it as a Transformers fast tokenizer.

    Encoding adds no special tokens by itself (``add_special_tokens`` only prepends BOS), so packed
    training text is built explicitly by the caller. Raises ``ValueError`` for a vocabulary smaller
    than the 256 byte symbols plus the special tokens.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[EOT_TOKEN],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return apply_llama3_chat_template(wrapped)
