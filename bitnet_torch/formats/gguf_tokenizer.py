"""A Transformers tokenizer rebuilt from a GGUF file's tokenizer metadata (llama.cpp's ``gpt2`` BPE section).

What llama.cpp itself tokenizes with: ``tokenizer.ggml.tokens`` (id order), ``token_type``, ``merges``,
``pre`` (which pre-tokenizer regex), the special token ids, ``add_bos_token`` and ``chat_template``. From
these :func:`tokenizer_from_gguf` builds a byte-level BPE ``PreTrainedTokenizerFast`` that encodes and
decodes as the original ``tokenizer.json`` did, so a ``.gguf`` is enough to generate from.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from .gguf_layout import PRE_TOKENIZER_REGEXES, GGUFError
from .gguf_reader import field_value, open_gguf

__all__ = ["PRE_TOKENIZER_REGEXES", "tokenizer_from_gguf"]

def _pre_tokenizer(pre: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZER_REGEXES:
        raise GGUFError(
            f"{path}: tokenizer.ggml.pre is {pre!r}; a tokenizer can be rebuilt for {sorted(PRE_TOKENIZER_REGEXES)} "
            "only: pass --tokenizer DIR (a directory with tokenizer.json)"
        )
    if pre == "gpt-2":  # GPT-2's regex is the one built into the ByteLevel pre-tokenizer
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    regex = PRE_TOKENIZER_REGEXES[pre]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def tokenizer_from_gguf(path: str | os.PathLike):
    """A ``PreTrainedTokenizerFast`` equal in encoding and decoding to the one the GGUF was made from.

    Raises :class:`GGUFError` when the file has no tokenizer, a tokenizer model other than ``gpt2``
    (byte-level BPE), or a pre-tokenizer this rebuild does not know.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    reader = open_gguf(path)
    kind = field_value(reader, "tokenizer.ggml.model")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{path} embeds no tokenizer: pass --tokenizer DIR (a directory with tokenizer.json)")
    if kind != "gpt2":
        raise GGUFError(f"{path} holds a {kind!r} tokenizer; only byte-level BPE ('gpt2') can be rebuilt: pass --tokenizer")
    types = field_value(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = field_value(reader, "tokenizer.ggml.merges") or []
    pre = field_value(reader, "tokenizer.ggml.pre") or "gpt-2"
    unused, control, user = int(gguf.TokenType.UNUSED), int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    vocab = {tok: i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ != unused}
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=pre == "llama-bpe",  # llama.cpp does so for its Llama-3 pre-tokenizer, as tokenizer.json does
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=typ == control, normalized=False)
             for i, typ in enumerate(types) if typ in (control, user)]
    if added:
        tok.add_tokens(added)

    def special(name: str) -> str | None:
        token_id = field_value(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    bos = special("bos")
    if field_value(reader, "tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=special("eos"), pad_token=special("pad"),
        unk_token=special("unk"),
    )
    template = field_value(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast
