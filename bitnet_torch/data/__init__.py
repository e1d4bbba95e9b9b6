"""Training data: the embedded King James Bible, a byte-level BPE tokenizer, block packing, a baseline.

* :func:`load_text_splits` -- the default KJV corpus, local text files or a ``datasets`` dataset,
  split deterministically into training and validation documents;
* :func:`train_bpe_tokenizer` -- a byte-level BPE tokenizer with the 2B-4T chat template (seconds);
* :func:`pack_documents` -- fixed-length blocks as a ``datasets.Dataset``;
* :func:`unigram_perplexity` -- the context-free baseline a language model must beat;
* :func:`build_kjv_chat_dataset` -- a local ``messages``-format instruction set for SFT.
"""

from .baseline import unigram_perplexity
from .chat import build_kjv_chat_dataset
from .blocks import pack_documents, pack_token_stream, tokenize_documents
from .corpus import DEFAULT_CORPUS, TextSplits, load_text_splits, split_every_nth
from .kjv import KJVChapter, kjv_database_path, load_kjv_chapters
from .tokenizer import EOT_TOKEN, train_bpe_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "EOT_TOKEN",
    "KJVChapter",
    "TextSplits",
    "build_kjv_chat_dataset",
    "kjv_database_path",
    "load_kjv_chapters",
    "load_text_splits",
    "pack_documents",
    "pack_token_stream",
    "split_every_nth",
    "tokenize_documents",
    "train_bpe_tokenizer",
    "unigram_perplexity",
]
