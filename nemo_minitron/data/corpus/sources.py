"""Built-in sources: per-source readers and cleaners of the Debian packages' text."""

from __future__ import annotations

import gzip
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from nemo_minitron.data.corpus.debian import fetch_package
from nemo_minitron.data.corpus.document import CorpusError, Document
from nemo_minitron.data.corpus.rdata import RObject, read_lazyload_db


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CorpusError(f"{what}: expected {path} in the unpacked package (layout changed?)")
    return path


def _tidy(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER_RE = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_VOLUME_RE = re.compile(r"^\s*volume\s+[ivx\d]+\.?\s*$", re.IGNORECASE)


def _austen_chapters(lines: Sequence[str | None]) -> list[str]:
    """Cut a novel's lines into chapters; the title page before chapter 1 is dropped."""
    chapters: list[list[str]] = []
    for line in lines:
        line = line or ""
        if _CHAPTER_RE.match(line):
            chapters.append([line.strip()])
        elif chapters and not _VOLUME_RE.match(
            line
        ):  # volume headings would dangle at chapter ends
            chapters[-1].append(line)
    return [_tidy("\n".join(chapter)) for chapter in chapters]


def _read_austen(root: Path) -> Iterator[Document]:
    data = _require(root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", "austen")
    novels = read_lazyload_db(data.with_suffix(""))
    missing = sorted(set(_AUSTEN_TITLES) - set(novels))
    if missing:
        raise CorpusError(f"austen: novels {missing} missing from {data}")
    for name in _AUSTEN_TITLES:
        novel = novels[name]
        if not isinstance(novel, RObject) or novel.rtype != "character":
            raise CorpusError(f"austen: {name} is not a character vector")
        for number, chapter in enumerate(_austen_chapters(novel.value), start=1):
            yield Document("austen", f"austen/{name}/ch{number:03d}", chapter)


_FORTUNES_PER_DOCUMENT = 50
# Drawings, not language; everything else in the package is prose or verse.
_FORTUNE_FILES_SKIPPED = frozenset({"ascii-art"})


def _remove_overstrike(text: str) -> str:
    """Apply backspaces like a terminal: ``_\\bA`` (underline), ``A\\bA`` (bold) become ``A``."""
    if "\b" not in text:
        return text
    out: list[str] = []
    for char in text:
        if char == "\b":
            if out:
                out.pop()
        else:
            out.append(char)
    return "".join(out)


def _read_fortunes(root: Path) -> Iterator[Document]:
    directory = _require(root / "usr/share/games/fortunes", "fortunes")
    for path in sorted(directory.iterdir()):
        # .dat files are strfile indexes; .u8 names are symlinks to the same text.
        if (
            path.is_symlink()
            or not path.is_file()
            or path.suffix
            or path.name in _FORTUNE_FILES_SKIPPED
        ):
            continue
        text = _remove_overstrike(path.read_text(encoding="utf-8", errors="replace"))
        records = [r.strip("\n") for r in re.split(r"^%\s*$", text, flags=re.MULTILINE)]
        records = [r for r in records if r.strip()]
        for start in range(0, len(records), _FORTUNES_PER_DOCUMENT):
            chunk = records[start : start + _FORTUNES_PER_DOCUMENT]
            doc_id = f"fortunes/{path.name}/{start // _FORTUNES_PER_DOCUMENT:03d}"
            yield Document("fortunes", doc_id, _tidy("\n\n".join(chunk)))


def _read_python_docs(root: Path) -> Iterator[Document]:
    sources = _require(root / "usr/share/doc/python3.11/html/_sources", "python_docs")
    for path in sorted(sources.rglob("*.rst.txt")):
        text = _tidy(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            page = path.relative_to(sources).as_posix().removesuffix(".rst.txt")
            yield Document("python_docs", f"python_docs/{page}", text)


# Release notes (perl5NNNdelta: change lists) and generated listings (the table of contents, the
# Unicode property tables) are not written prose.
_PERL_PAGES_SKIPPED = re.compile(r"perl\d*delta|perltoc|perluniprops")
_PERL_SECTION_RE = re.compile(r"^(?==head\d |=item )", re.MULTILINE)
_PERL_CHUNK_CHARS = 4000


def _joined_chunks(pieces: Iterable[str], min_chars: int, separator: str) -> Iterator[str]:
    """Consecutive pieces joined by `separator` into chunks of at least `min_chars` characters
    (the last may be shorter): documents of a size the splits can spread, from text whose natural
    units are far smaller (dictionary entries) or far larger (a whole manual page)."""
    chunk: list[str] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece) + len(separator)
        if size >= min_chars:
            yield separator.join(chunk)
            chunk, size = [], 0
    if chunk:
        yield separator.join(chunk)


def _perl_page_chunks(text: str) -> list[str]:
    """A POD page cut before its headings and list items into chunks of _PERL_CHUNK_CHARS: a few
    large pages (perlapi, perlfunc) would otherwise put a fifth of the source into whichever split
    their one hash falls in."""
    tidied = (_tidy(chunk) for chunk in _joined_chunks(_PERL_SECTION_RE.split(text), _PERL_CHUNK_CHARS, ""))
    return [chunk for chunk in tidied if chunk]


def _read_perl_docs(root: Path) -> Iterator[Document]:
    pods = sorted(root.glob("usr/share/perl/5.*/pod"))
    if len(pods) != 1:
        raise CorpusError(f"perl_docs: expected one usr/share/perl/5.*/pod in {root}, found {len(pods)}")
    for path in sorted(pods[0].glob("*.pod")):
        if _PERL_PAGES_SKIPPED.fullmatch(path.stem):
            continue
        for number, chunk in enumerate(_perl_page_chunks(path.read_text(encoding="utf-8", errors="replace"))):
            yield Document("perl_docs", f"perl_docs/{path.stem}/{number:03d}", chunk)


_GCIDE_CHUNK_CHARS = 4000
_DICTD_B64 = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
# GCIDE spells non-ASCII letters as bracketed codes; the diacritic ones map to combining marks.
_GCIDE_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "ng": "ŋ",
    "yogh": "ȝ", "imac": "ī", "aum": "ä", "udd": "ü", "add": "ȧ", "asl": "a", "dsdot": "ḍ",
    "deg": "°", "sect": "§", "pounds": "£", "root": "√", "prime": "′", "bprime": "″",
    "frac12": "½", "frac14": "¼", "frac34": "¾", "th": "θ", "alpha": "α", "beta": "β",
    "gamma": "γ", "delta": "δ", "phi": "φ",
}  # fmt: skip
_GCIDE_PREFIX_MARKS = {
    "'": "\u0301", "`": "\u0300", '"': "\u0308", "=": "\u0304", "-": "\u0304",
    "~": "\u0303", "^": "\u0302", ".": "\u0307", ",": "\u0327", "*": "\u030a",
}  # fmt: skip
_GCIDE_CODE_RE = re.compile(r"\[([A-Za-z0-9'`\"=~^.,*-]{1,6})\]")
_GCIDE_SOURCE_RE = re.compile(
    r"\s*\[[^\[\]\n]*(?:Webster|WordNet|PJC|RDH|RHUD|Century|Chambers|MW10|NRCD)[^\[\]\n]*\]"
)
_GCIDE_PRONUNCIATION_RE = re.compile(r"\s*\\[^\\\n]*\\")
# A parenthesised respelling such as (k[.a]*l[o^]r`[i^]) has syllable marks inside words.
_GCIDE_RESPELLING_RE = re.compile(r"\s*\((?=[^()]*\w[*\"`]\w)[^()]{1,200}\)")


def _gcide_code(match: re.Match[str]) -> str:
    code = match.group(1)
    if code in _GCIDE_NAMED:
        return _GCIDE_NAMED[code]
    if len(code) in (2, 3) and code[1:].isalpha() and code[0] in _GCIDE_PREFIX_MARKS:
        return code[1:] + _GCIDE_PREFIX_MARKS[code[0]]
    if len(code) in (2, 3) and code[-1] == "^" and code[:-1].isalpha():  # [a^], [oo^]: breve
        return code[:-1] + "\u0306"
    return match.group(0)  # a real bracketed word such as [Obs.]: keep it


def clean_gcide_entry(raw: str) -> str:
    """Turn one GCIDE dictd entry into plain text: no respellings, sources or markup."""
    text = _GCIDE_PRONUNCIATION_RE.sub("", raw)
    text = _GCIDE_RESPELLING_RE.sub("", text)
    text = _GCIDE_SOURCE_RE.sub("", text)
    text = _GCIDE_CODE_RE.sub(_gcide_code, text).replace("{", "").replace("}", "")
    lines = (re.sub(r"[ \t]{2,}", " ", line.strip()) for line in text.splitlines())
    return unicodedata.normalize("NFC", _tidy("\n".join(lines)))


def _dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + _DICTD_B64[char]
    return value


def _gcide_entries(index_path: Path, dict_path: Path) -> list[str]:
    """The distinct entries of a dictd database, in file order (many headwords share one)."""
    spans: set[tuple[int, int]] = set()
    with index_path.open(encoding="utf-8", errors="replace") as index:
        for line in index:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 3 and not fields[0].startswith("00-"):  # 00-* is database metadata
                spans.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
    data = gzip.decompress(dict_path.read_bytes())  # dictzip is gzip-compatible
    entries = []
    for offset, length in sorted(spans):
        blob = data[offset : offset + length]
        try:
            entries.append(blob.decode("utf-8"))
        except UnicodeDecodeError:  # a handful of entries carry stray Windows-1252 quotes
            entries.append(blob.decode("cp1252", errors="replace"))
    return entries


def _read_gcide(root: Path) -> Iterator[Document]:
    dictd = _require(root / "usr/share/dictd", "gcide")
    entries = _gcide_entries(
        _require(dictd / "gcide.index", "gcide"), _require(dictd / "gcide.dict.dz", "gcide")
    )
    cleaned = (clean_gcide_entry(raw) for raw in tqdm(entries, desc="gcide entries", unit="entry", mininterval=2.0))
    for number, chunk in enumerate(_joined_chunks((entry for entry in cleaned if entry), _GCIDE_CHUNK_CHARS, "\n\n")):
        yield Document("gcide", f"gcide/{number:05d}", chunk)


@dataclass(frozen=True)
class SourceSpec:
    """A built-in corpus source: the Debian package that carries it and how to read it."""

    name: str
    package: str
    description: str
    reader: Callable[[Path], Iterator[Document]]


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec(
            "austen",
            "r-cran-janeaustenr",
            "Jane Austen's six novels, one document per chapter",
            _read_austen,
        ),
        SourceSpec(
            "fortunes", "fortunes", "fortune(6) quotations, 50 per document", _read_fortunes
        ),
        SourceSpec(
            "python_docs",
            "python3.11-doc",
            "Python 3.11 documentation sources (reST)",
            _read_python_docs,
        ),
        SourceSpec(
            "gcide",
            "dict-gcide",
            "GCIDE dictionary (Webster 1913), ~4k-char documents",
            _read_gcide,
        ),
        SourceSpec(
            "perl_docs",
            "perl-doc",
            "Perl 5 documentation (POD), pages cut into ~4k-char documents, release notes excluded",
            _read_perl_docs,
        ),
    )
}
# The built-in corpus: every source but perl_docs, which a caller adds (corpus.sources=[...]).
DEFAULT_SOURCES = ("austen", "fortunes", "python_docs", "gcide")


def _spec(name: str) -> SourceSpec:
    try:
        return SOURCES[name]
    except KeyError:
        raise CorpusError(f"unknown corpus source {name!r}; known: {', '.join(SOURCES)}") from None


def fetch_source(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch the Debian package behind source ``name``; return its unpacked root."""
    return fetch_package(_spec(name).package, cache_dir, source=name)


def load_documents(name: str, cache_dir: str | os.PathLike[str] | None = None) -> list[Document]:
    """All documents of built-in source ``name`` (fetching it first if needed)."""
    spec = _spec(name)
    documents = list(spec.reader(fetch_source(name, cache_dir)))
    if not documents:
        raise CorpusError(f"corpus source {name!r} (package {spec.package!r}) yielded no documents")
    return documents
