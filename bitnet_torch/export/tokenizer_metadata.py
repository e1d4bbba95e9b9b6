"""The tokenizer of a checkpoint as GGUF metadata (llama.cpp's ``gpt2`` byte-level BPE vocabulary).

What llama.cpp reads (and its ``convert_hf_to_gguf.py`` writes for BPE models such as Llama 3):
``tokenizer.ggml.model = "gpt2"``, ``tokenizer.ggml.pre`` (which pre-tokenizer regex to use),
``tokenizer.ggml.tokens`` (in id order), ``tokenizer.ggml.token_type``, ``tokenizer.ggml.merges``, the
special token ids (bos/eos/eot/pad/...), ``tokenizer.ggml.add_bos_token`` and ``tokenizer.chat_template``.
Merges, special ids and the chat template come through ``gguf.SpecialVocab`` (the reader llama.cpp's
converter uses); the vocabulary and token types are read here from ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..formats.gguf_layout import PRE_TOKENIZER_REGEXES

__all__ = ["TokenizerMetadataError", "TokenizerMetadata", "read_tokenizer_metadata", "PRE_TOKENIZER_REGEXES"]

logger = logging.getLogger(__name__)

#: Tokens that end a chat turn in common templates (→ ``tokenizer.ggml.eot_token_id``).
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_turn|>", "<end_of_turn>")


class TokenizerMetadataError(ValueError):
    """The tokenizer files are missing or are not a byte-level BPE tokenizer llama.cpp can run."""


@dataclass
class TokenizerMetadata:
    """Everything the GGUF tokenizer section needs."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab
    eot_token_id: int | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the tokenizer keys into ``writer``."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.eot_token_id is not None and "eot" not in self.special.special_token_ids:
            writer.add_eot_token_id(self.eot_token_id)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """Name llama.cpp's pre-tokenizer that matches ``tokenizer.json`` (Split regex or GPT-2 ByteLevel)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex")
            for name, regex in PRE_TOKENIZER_REGEXES.items():
                if pattern == regex:
                    return name
            raise TokenizerMetadataError(
                f"the tokenizer's pre-tokenizer regex {pattern!r} is not one llama.cpp knows by name; pass "
                f"pre_tokenizer= (one of llama.cpp's tokenizer.ggml.pre names, e.g. {sorted(PRE_TOKENIZER_REGEXES)})"
            )
    if any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return "gpt-2"
    raise TokenizerMetadataError(
        "cannot tell which llama.cpp pre-tokenizer matches this tokenizer.json; pass pre_tokenizer= explicitly"
    )


def read_tokenizer_metadata(model_dir: Path, vocab_size: int, pre_tokenizer: str | None = None) -> TokenizerMetadata:
    """Read ``tokenizer.json`` (+ ``tokenizer_config.json``) of ``model_dir`` for a model with ``vocab_size`` rows.

    Ids without a token (embedding rows beyond the tokenizer) become ``[PAD{id}]`` of type UNUSED, as
    llama.cpp's converter does. Raises :class:`TokenizerMetadataError` when ``tokenizer.json`` is missing,
    is not a byte-level BPE, or holds more tokens than the embedding has rows.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerMetadataError(
            f"no tokenizer.json in {model_dir}: llama.cpp/bitnet.cpp need the vocabulary inside the GGUF "
            "(save the tokenizer next to the model with tokenizer.save_pretrained)"
        )
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback", False):
        raise TokenizerMetadataError(
            f"tokenizer.json holds a {model.get('type')!r} model (byte_fallback={model.get('byte_fallback')}); "
            "only byte-level BPE tokenizers (GPT-2 / Llama-3 style) are exported"
        )
    by_id: dict[int, str] = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    added = {int(entry["id"]): entry for entry in tokenizer_json.get("added_tokens", [])}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    if by_id and max(by_id) >= vocab_size:
        raise TokenizerMetadataError(
            f"the tokenizer has ids up to {max(by_id)} but the embedding has only {vocab_size} rows"
        )
    tokens: list[str] = []
    token_types: list[int] = []
    notes: list[str] = []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(int(gguf.TokenType.UNUSED))
        elif token_id in added:
            tokens.append(by_id[token_id])
            special = added[token_id].get("special", False)
            token_types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[token_id])
            token_types.append(int(gguf.TokenType.NORMAL))
    if len(by_id) < vocab_size:
        notes.append(f"{vocab_size - len(by_id)} embedding rows have no token; written as [PAD<id>] (UNUSED)")
    special = gguf.SpecialVocab(
        model_dir, load_merges=True, special_token_types=("bos", "eos", "unk", "sep", "pad", "eot"), n_vocab=vocab_size
    )
    if not special.merges:
        raise TokenizerMetadataError(f"tokenizer.json in {model_dir} has no BPE merges")
    content_to_id = {entry["content"]: token_id for token_id, entry in added.items()}
    eot = next((content_to_id[t] for t in _END_OF_TURN_TOKENS if t in content_to_id), None)
    return TokenizerMetadata(
        tokens=tokens,
        token_types=token_types,
        pre=pre_tokenizer or _pre_tokenizer_name(tokenizer_json),
        special=special,
        eot_token_id=eot,
        notes=notes,
    )
