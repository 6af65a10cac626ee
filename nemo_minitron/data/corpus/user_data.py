"""Users' own data: ``.txt`` and ``.jsonl`` files, or directories of them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from nemo_minitron.data.corpus.document import CorpusError, Document

USER_SUFFIXES = (".txt", ".jsonl")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file; bytes that are not UTF-8 raise a
    :class:`CorpusError` that names the file and the line."""
    try:
        with path.open(encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}:{_first_undecodable_line(path)}: not UTF-8 text ({err.reason}); "
            "save the file as UTF-8"
        ) from None


def _first_undecodable_line(path: Path) -> int:
    """The number of the first line of ``path`` that is not valid UTF-8 (0 if there is none)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _txt_documents(path: Path) -> Iterator[tuple[int, str]]:
    """Paragraphs of a text file: documents are separated by one or more blank lines."""
    lines: list[str] = []
    start = 0
    for number, line in numbered_lines(path):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip("\n"))
        elif lines:
            yield start, "\n".join(lines)
            lines = []
    if lines:
        yield start, "\n".join(lines)


def _jsonl_documents(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: malformed JSON line: {err}") from None
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise CorpusError(
                f"{path}:{number}: expected a JSON object with a string {text_key!r} field"
            )
        yield number, text


def iter_file_texts(
    path: str | os.PathLike[str], text_key: str = "text"
) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, text)`` for each non-empty document of one .txt/.jsonl file.

    ``.txt``: documents are separated by blank lines. ``.jsonl``: one JSON object per line,
    text under ``text_key``; a malformed line raises :class:`CorpusError` with its number.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        documents = _jsonl_documents(path, text_key)
    elif path.suffix == ".txt":
        documents = _txt_documents(path)
    else:
        raise CorpusError(
            f"{path}: unsupported file type (expected one of {', '.join(USER_SUFFIXES)})"
        )
    return ((number, text) for number, text in documents if text.strip())


def user_files(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself, or every .txt/.jsonl file below the directory ``path``, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in USER_SUFFIXES)
        if not files:
            raise CorpusError(f"{path}: no {' or '.join(USER_SUFFIXES)} files found")
        return files
    if path.exists() and not path.is_file():  # a pipe (`data=<(cat f)`), a device, a socket
        raise CorpusError(f"{path} is not a regular file (a pipe or process substitution?): nemo-minitron reads "
                          f"data files more than once and keys its caches by their size and time; write the text "
                          f"to a file and pass that")
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or directory")
    return [path]


def load_user_documents(
    path: str | os.PathLike[str], text_key: str = "text", source: str = "user"
) -> list[Document]:
    """Documents from a .txt file, a .jsonl file or a directory of them (see iter_file_texts).

    Ids are ``{source}/{file relative to path}:{line}``, stable while the files are unchanged.
    """
    path = Path(path)
    base = path if path.is_dir() else path.parent
    return [
        Document(source, f"{source}/{file.relative_to(base).as_posix()}:{number}", text)
        for file in user_files(path)
        for number, text in iter_file_texts(file, text_key)
    ]
