"""Text corpora for calibration, distillation and evaluation.

Built-in sources are Debian packages that carry freely licensed English text. They are
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a private cache, so
nothing is installed on the system and no root access is needed beyond what apt itself
requires. Users can bring their own ``.txt`` / ``.jsonl`` data through
:func:`load_user_documents`.

Documents are assigned to the ``train`` / ``calib`` / ``heldout`` splits by a seeded hash
of their id, so a document's split never depends on which other documents are present.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "NEMO_MINITRON_CACHE"
SPLITS = ("train", "calib", "heldout")
MANIFEST_NAME = "manifest.json"
# Bump when the extraction or output format changes so stale corpora are rebuilt.
CORPUS_FORMAT_VERSION = 1


class CorpusError(RuntimeError):
    """A corpus source could not be fetched, read or parsed."""


@dataclass(frozen=True)
class Document:
    """One unit of text; ``doc_id`` is unique across all sources and drives the split."""

    source: str
    doc_id: str
    text: str


# ---------------------------------------------------------------------------------------
# R serialization (XDR) reader
#
# The janeaustenr package ships its novels as R lazy-load data (``Rdata.rdb``/``.rdx``),
# so reading them needs a decoder for R's serialization format. Only what data objects
# use is supported; byte-code (compiled closures) is rejected rather than guessed at.
# ---------------------------------------------------------------------------------------


class RSerializationError(CorpusError):
    """The bytes are not an R serialization stream this reader understands."""


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (``as.name``)."""

    name: str


@dataclass(frozen=True)
class RSpecial:
    """A singleton R value without content (global env, missing argument, ...)."""

    name: str


@dataclass
class RObject:
    """A decoded R value: its ``typeof`` name, payload and attributes.

    Payloads: atomic vectors are Python lists (``None`` for NA), ``list`` / ``expression``
    are lists of decoded values, pairlists and calls are lists of ``(tag, value)`` pairs,
    ``raw`` is ``bytes``.
    """

    rtype: str
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None

    def __len__(self) -> int:
        return len(self.value)


# SEXPTYPE codes from R's Rinternals.h and the pseudo-types of serialize.c.
_SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP = 7, 8, 9, 10
_INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _BCODESXP, _EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = 19, 20, 21, 22, 23, 24, 25
_REFSXP, _NILVALUE_SXP, _PERSISTSXP, _PACKAGESXP, _NAMESPACESXP = 255, 254, 247, 248, 249
_ALTREP_SXP, _ATTRLISTSXP, _ATTRLANGSXP = 238, 239, 240
_SPECIAL_SINGLETONS = {
    253: "R_GlobalEnv",
    252: "R_UnboundValue",
    251: "R_MissingArg",
    250: "R_BaseNamespace",
    242: "R_EmptyEnv",
    241: "R_BaseEnv",
}
_NA_INTEGER = -(2**31)
# CHARSXP "levels" bits that declare the string's encoding.
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


class _XdrReader:
    """Decoder for one XDR ('X\\n') serialization stream."""

    def __init__(self, data: bytes) -> None:
        self._buf = memoryview(data)
        self._pos = 0
        self._refs: list[Any] = []
        self._native_encoding = "utf-8"

    # -- primitives -------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise RSerializationError(f"truncated R stream at byte {self._pos} (wanted {n})")
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self._take(4 * n))

    def _length(self) -> int:
        n = self._int()
        if n != -1:
            return n
        upper, lower = self._int(), self._int()  # long vector: two 32-bit halves
        return (upper << 32) + lower

    # -- stream ------------------------------------------------------------------------
    def read_stream(self) -> Any:
        if bytes(self._take(2)) != b"X\n":
            raise RSerializationError("only XDR ('X\\n') R serialization is supported")
        version = self._int()
        self._take(8)  # writer's R version, oldest R version that can read this
        if version == 3:
            self._native_encoding = _python_encoding(bytes(self._take(self._int())).decode())
        elif version != 2:
            raise RSerializationError(f"unsupported R serialization version {version}")
        return self.read_item()

    def read_item(self) -> Any:
        flags = self._int()
        rtype = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if rtype == _NILVALUE_SXP:
            return None
        if rtype in _SPECIAL_SINGLETONS:
            return RSpecial(_SPECIAL_SINGLETONS[rtype])
        if rtype == _REFSXP:
            index = flags >> 8 or self._int()
            return self._refs[index - 1]
        if rtype == _SYMSXP:
            symbol = RSymbol(self._char_value(self.read_item()))
            self._refs.append(symbol)
            return symbol
        if rtype in (_PERSISTSXP, _PACKAGESXP, _NAMESPACESXP):
            kind = {_PERSISTSXP: "persistent", _PACKAGESXP: "package", _NAMESPACESXP: "namespace"}
            value = RObject(kind[rtype], self._string_vector())
            self._refs.append(value)
            return value
        if rtype == _ENVSXP:
            return self._environment()
        if rtype in (_LISTSXP, _LANGSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP):
            return self._pairlist(flags)
        if rtype in (_CLOSXP, _PROMSXP):
            return self._closure(flags)
        if rtype == _ALTREP_SXP:
            return self._altrep()
        if rtype == _CHARSXP:
            return self._charsxp(flags)
        value = self._vector(rtype)
        value.attributes = self._attributes() if has_attr else {}
        return value

    # -- compound objects --------------------------------------------------------------
    def _string_vector(self) -> list[str | None]:
        if self._int() != 0:
            raise RSerializationError("names vectors with a non-zero header are not supported")
        return [self._char_value(self.read_item()) for _ in range(self._int())]

    def _environment(self) -> RObject:
        env = RObject("environment", {})
        self._refs.append(env)  # registered before its contents, which may refer back to it
        self._int()  # locked flag
        env.value = {"enclos": self.read_item(), "frame": self.read_item()}
        env.value["hashtab"] = self.read_item()
        attributes = self.read_item()
        env.attributes = _attribute_dict(attributes)
        return env

    def _pairlist(self, flags: int) -> RObject:
        """Read a chain of cons cells iteratively so long pairlists do not recurse."""
        rtype = flags & 0xFF
        kind = "language" if rtype in (_LANGSXP, _ATTRLANGSXP) else "pairlist"
        result = RObject(kind, [])
        first = True
        while True:
            has_attr = bool(flags & (1 << 9)) or rtype in (_ATTRLISTSXP, _ATTRLANGSXP)
            attributes = self._attributes() if has_attr else {}
            if first:
                result.attributes = attributes
            tag = self.read_item() if flags & (1 << 10) else None
            result.value.append((_tag_name(tag), self.read_item()))
            first = False
            flags = self._int()
            rtype = flags & 0xFF
            if rtype not in (_LISTSXP, _LANGSXP, _DOTSXP):
                break
        self._pos -= 4  # let read_item decode the terminating CDR from its flags
        tail = self.read_item()
        if tail is not None:
            result.value.append((None, tail))
        return result

    def _closure(self, flags: int) -> RObject:
        attributes = self._attributes() if flags & (1 << 9) else {}
        env = self.read_item() if flags & (1 << 10) else None
        formals, body = self.read_item(), self.read_item()
        kind = "closure" if flags & 0xFF == _CLOSXP else "promise"
        return RObject(kind, {"env": env, "formals": formals, "body": body}, attributes)

    def _altrep(self) -> RObject:
        """Expand the ALTREP classes R itself writes (compact sequences, wrappers)."""
        info, state, attributes = self.read_item(), self.read_item(), self.read_item()
        class_name = info.value[0][1].name if isinstance(info, RObject) else "?"
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value
            values: list[Any] = [start + i * step for i in range(int(n))]
            if class_name == "compact_intseq":
                value = RObject("integer", [int(v) for v in values])
            else:
                value = RObject("double", values)
        elif class_name.startswith("wrap_"):
            value = state.value[0]
        elif class_name == "deferred_string":
            numbers = state.value[0][1]
            value = RObject(
                "character", [None if v is None else _r_number_text(v) for v in numbers.value]
            )
        else:
            raise RSerializationError(f"unsupported ALTREP class {class_name!r}")
        value.attributes = _attribute_dict(attributes)
        return value

    def _attributes(self) -> dict[str, Any]:
        return _attribute_dict(self.read_item())

    # -- vectors -----------------------------------------------------------------------
    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self._take(n))
        levels = flags >> 12
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8", errors="replace")
        if levels & (_LATIN1_MASK | _BYTES_MASK):
            return raw.decode("latin-1")
        return raw.decode(self._native_encoding, errors="replace")

    def _char_value(self, item: Any) -> str | None:
        if item is None or isinstance(item, str):
            return item
        raise RSerializationError(f"expected a CHARSXP, got {type(item).__name__}")

    def _vector(self, rtype: int) -> RObject:
        if rtype in (_LGLSXP, _INTSXP):
            ints = self._ints(self._length())
            if rtype == _LGLSXP:
                return RObject("logical", [None if v == _NA_INTEGER else bool(v) for v in ints])
            return RObject("integer", [None if v == _NA_INTEGER else v for v in ints])
        if rtype == _REALSXP:
            n = self._length()
            return RObject("double", list(struct.unpack(f">{n}d", self._take(8 * n))))
        if rtype == _CPLXSXP:
            n = self._length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return RObject("complex", [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)])
        if rtype == _STRSXP:
            return RObject(
                "character", [self._char_value(self.read_item()) for _ in range(self._length())]
            )
        if rtype in (_VECSXP, _EXPRSXP):
            kind = "list" if rtype == _VECSXP else "expression"
            return RObject(kind, [self.read_item() for _ in range(self._length())])
        if rtype == _RAWSXP:
            return RObject("raw", bytes(self._take(self._length())))
        if rtype == _S4SXP:
            return RObject("S4", None)
        if rtype in (_SPECIALSXP, _BUILTINSXP):
            return RObject("builtin", bytes(self._take(self._int())).decode())
        if rtype in (_EXTPTRSXP, _WEAKREFSXP):
            placeholder = RObject("externalptr", None)
            self._refs.append(placeholder)
            if rtype == _EXTPTRSXP:
                placeholder.value = (self.read_item(), self.read_item())  # protected, tag
            return placeholder
        if rtype == _BCODESXP:
            raise RSerializationError("R byte-code is not supported (only data objects are)")
        raise RSerializationError(f"unsupported SEXP type {rtype} at byte {self._pos}")


def _python_encoding(r_encoding: str) -> str:
    """Map an R native-encoding name (e.g. 'UTF-8', 'latin1') to a Python codec."""
    try:
        return codecs.lookup(r_encoding).name
    except LookupError:
        return "utf-8"


def _tag_name(tag: Any) -> str | None:
    if isinstance(tag, RSymbol):
        return tag.name
    return tag if isinstance(tag, str) else None


def _attribute_dict(pairlist: Any) -> dict[str, Any]:
    if not isinstance(pairlist, RObject):
        return {}
    return {tag: value for tag, value in pairlist.value if tag is not None}


def _r_number_text(value: float | int) -> str:
    """Render a number the way as.character() does for the common cases."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.15g}"


def _decompress_r_file(data: bytes) -> bytes:
    """Undo the optional gzip/bzip2/xz wrapping that saveRDS() applies."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def parse_r_serialized(data: bytes) -> Any:
    """Decode an R serialization stream (an ``.rds`` file's bytes, possibly compressed)."""
    return _XdrReader(_decompress_r_file(data)).read_stream()


def _decompress_lazyload_blob(blob: bytes, compression: int) -> bytes:
    """Decode one ``.rdb`` entry: a 4-byte big-endian length, then the compressed body.

    ``compression`` is the rdx ``compressed`` field: 1 = zlib, 2 = bzip2, 3 = xz. Types 2
    and 3 add a one-byte method tag ('0' stored, '2' bzip2, 'Z' xz) after the length.
    """
    expected = struct.unpack(">I", blob[:4])[0]
    if compression == 1:
        out = zlib.decompress(blob[4:])
    else:
        method, body = blob[4:5], blob[5:]
        decoders: dict[bytes, Callable[[bytes], bytes]] = {
            b"0": lambda b: b,
            b"2": bz2.decompress,
            b"Z": lzma.decompress,
        }
        if method not in decoders:
            raise RSerializationError(f"unknown lazy-load compression tag {method!r}")
        out = decoders[method](body)
    if len(out) != expected:
        raise RSerializationError(f"lazy-load entry is {len(out)} bytes, index says {expected}")
    return out


def read_lazyload_db(prefix: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``prefix.rdx`` + ``prefix.rdb``).

    Environments stored by reference inside the database are returned as unresolved
    ``RObject('persistent', ...)`` values; plain data objects need none.
    """
    index = parse_r_serialized(Path(f"{prefix}.rdx").read_bytes())
    parts = dict(zip(index.names, index.value, strict=True))
    compressed = parts.get("compressed")
    compression = 1 if compressed is None else int(compressed.value[0])
    variables = parts["variables"]
    rdb = Path(f"{prefix}.rdb").read_bytes()
    result: dict[str, Any] = {}
    for name, location in zip(variables.names, variables.value, strict=True):
        offset, length = (int(v) for v in location.value)
        payload = _decompress_lazyload_blob(rdb[offset : offset + length], compression)
        result[name] = _XdrReader(payload).read_stream()
    return result


# ---------------------------------------------------------------------------------------
# Fetching Debian packages
# ---------------------------------------------------------------------------------------

_PACKAGE_META = ".nemo_minitron_package.json"
_COMMAND_TIMEOUT_S = 900


def default_cache_dir() -> Path:
    """``$NEMO_MINITRON_CACHE`` if set, else ``~/.cache/nemo_minitron/corpus``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "nemo_minitron" / "corpus"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(command: list[str], cwd: Path, what: str) -> str:
    """Run ``command``; turn any failure into a CorpusError that names ``what`` and the command."""
    shown = " ".join(command)
    try:
        proc = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as err:
        raise CorpusError(
            f"{what}: `{shown}` failed: {command[0]} not found (needs Debian/Ubuntu)"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise CorpusError(f"{what}: `{shown}` timed out after {_COMMAND_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise CorpusError(f"{what}: `{shown}` exited with status {proc.returncode}: {detail}")
    return proc.stdout


def fetch_package(
    package: str, cache_dir: str | os.PathLike[str] | None = None, *, source: str | None = None
) -> Path:
    """Download and unpack Debian ``package`` into the cache; return the unpacked root.

    Idempotent: an existing unpacked tree is reused. The tree is built in a temporary
    directory and renamed into place, so an interrupted fetch leaves nothing that looks
    complete.
    """
    root = _cache_root(cache_dir)
    target = root / package
    if (target / _PACKAGE_META).is_file():
        return target
    what = (
        f"corpus source {source!r} (Debian package {package!r})"
        if source
        else f"Debian package {package!r}"
    )
    work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=root))
    try:
        download = ["apt-get", "download", package]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root apt drops privileges to `_apt`, which cannot write our private temp dir.
            download[1:1] = ["-o", "APT::Sandbox::User=root"]
        logger.info("downloading Debian package %s", package)
        _run(download, work, what)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise CorpusError(
                f"{what}: `apt-get download {package}` produced {len(debs)} .deb files"
            )
        version = _run(["dpkg-deb", "--field", str(debs[0]), "Version"], work, what).strip()
        tree = work / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(tree)], work, what)
        meta = {"package": package, "version": version, "deb": debs[0].name}
        (tree / _PACKAGE_META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tree.rename(target)
        except OSError:
            if not (target / _PACKAGE_META).is_file():  # not a concurrent fetch that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def package_version(package_root: Path) -> str:
    """The Debian version recorded when ``package_root`` was unpacked."""
    return json.loads((package_root / _PACKAGE_META).read_text())["version"]


# ---------------------------------------------------------------------------------------
# Built-in sources
# ---------------------------------------------------------------------------------------


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
    chunk: list[str] = []
    size = number = 0
    for raw in tqdm(entries, desc="gcide entries", unit="entry", mininterval=2.0):
        entry = clean_gcide_entry(raw)
        if not entry:
            continue
        chunk.append(entry)
        size += len(entry) + 2
        if size >= _GCIDE_CHUNK_CHARS:
            yield Document("gcide", f"gcide/{number:05d}", "\n\n".join(chunk))
            chunk, size, number = [], 0, number + 1
    if chunk:
        yield Document("gcide", f"gcide/{number:05d}", "\n\n".join(chunk))


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
    )
}
DEFAULT_SOURCES = tuple(SOURCES)


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


# ---------------------------------------------------------------------------------------
# Users' own data
# ---------------------------------------------------------------------------------------

USER_SUFFIXES = (".txt", ".jsonl")


def _txt_documents(path: Path) -> Iterator[tuple[int, str]]:
    """Paragraphs of a text file: documents are separated by one or more blank lines."""
    lines: list[str] = []
    start = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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


# ---------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------


def _check_fractions(heldout_fraction: float, calib_fraction: float) -> None:
    if not (
        0 <= heldout_fraction < 1
        and 0 <= calib_fraction < 1
        and heldout_fraction + calib_fraction < 1
    ):
        raise ValueError(
            "need fractions >= 0 with heldout + calib < 1, "
            f"got heldout={heldout_fraction}, calib={calib_fraction}"
        )


def assign_split(
    doc_id: str, seed: int, heldout_fraction: float = 0.05, calib_fraction: float = 0.05
) -> str:
    """The split of one document, from a seeded hash of its id alone.

    Depending only on the id keeps every document's split fixed when sources are added or
    removed, which is what keeps held-out text held out across corpus versions.
    """
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < heldout_fraction:
        return "heldout"
    if u < heldout_fraction + calib_fraction:
        return "calib"
    return "train"


def split_documents(
    documents: Iterable[Document],
    seed: int = 0,
    heldout_fraction: float = 0.05,
    calib_fraction: float = 0.05,
) -> dict[str, list[Document]]:
    """Partition documents into train/calib/heldout by :func:`assign_split`.

    Exact duplicate texts are kept only once (first occurrence), so the same text cannot
    sit in two splits under different ids. Duplicate ids are an error.
    """
    _check_fractions(heldout_fraction, calib_fraction)
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    seen_ids: set[str] = set()
    seen_texts: set[bytes] = set()
    duplicates = 0
    for doc in documents:
        if doc.doc_id in seen_ids:
            raise CorpusError(f"duplicate document id {doc.doc_id!r}")
        seen_ids.add(doc.doc_id)
        fingerprint = hashlib.sha256(doc.text.encode()).digest()
        if fingerprint in seen_texts:
            duplicates += 1
            continue
        seen_texts.add(fingerprint)
        splits[assign_split(doc.doc_id, seed, heldout_fraction, calib_fraction)].append(doc)
    if duplicates:
        logger.info("dropped %d documents whose text duplicates an earlier one", duplicates)
    return splits


# ---------------------------------------------------------------------------------------
# Building a corpus on disk
# ---------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write via a temp file in the same directory, then rename: never a partial file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600; these are ordinary shared data files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_jsonl(path: Path, documents: Sequence[Document]) -> None:
    def write(handle: TextIO) -> None:
        for doc in documents:
            handle.write(
                json.dumps(
                    {"source": doc.source, "id": doc.doc_id, "text": doc.text}, ensure_ascii=False
                )
            )
            handle.write("\n")

    _atomic_write(path, write)


def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _counts(documents: Sequence[Document]) -> dict[str, int]:
    return {"documents": len(documents), "characters": sum(len(d.text) for d in documents)}


def _manifest_is_current(output_dir: Path, request: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((output_dir / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("request") != request:
        return False
    for info in manifest.get("splits", {}).values():
        path = output_dir / info["file"]
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
    return set(manifest.get("splits", {})) == set(SPLITS)


def build_corpus(
    output_dir: str | os.PathLike[str],
    sources: Sequence[str] = DEFAULT_SOURCES,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.05,
    calib_fraction: float = 0.05,
    user_paths: Sequence[str | os.PathLike[str]] = (),
    text_key: str = "text",
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``calib.jsonl``, ``heldout.jsonl`` and ``manifest.json``.

    Each line is ``{"source", "id", "text"}`` for one document. The manifest records the
    request, package versions and per-split/per-source counts; when it already matches
    the request the existing files are returned untouched.
    """
    _check_fractions(heldout_fraction, calib_fraction)
    for name in sources:
        _spec(name)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    files = [f for p in user_paths for f in user_files(p)]
    request = {
        "format": CORPUS_FORMAT_VERSION,
        "sources": list(sources),
        "user_files": [_file_fingerprint(f) for f in files],
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "calib_fraction": calib_fraction,
        "text_key": text_key,
    }
    paths = {name: output / f"{name}.jsonl" for name in SPLITS}
    if _manifest_is_current(output, request):
        logger.info("corpus in %s is up to date", output)
        return paths

    documents: list[Document] = []
    packages: dict[str, dict[str, str]] = {}
    for name in tqdm(sources, desc="corpus sources", unit="source"):
        root = fetch_source(name, cache_dir)
        packages[name] = {"package": SOURCES[name].package, "version": package_version(root)}
        documents.extend(load_documents(name, cache_dir))
    for path in user_paths:
        documents.extend(load_user_documents(path, text_key=text_key))
    splits = split_documents(documents, seed, heldout_fraction, calib_fraction)

    # Drop the old manifest first: until the new one lands, the directory reads as unfinished.
    (output / MANIFEST_NAME).unlink(missing_ok=True)
    expected = {"train": 1.0, "calib": calib_fraction, "heldout": heldout_fraction}
    for name, docs in splits.items():
        if not docs and expected[name] > 0:
            logger.warning("split %r is empty; use more documents or a larger fraction", name)
        _write_jsonl(paths[name], docs)

    by_source = {
        source: {
            split: _counts([d for d in docs if d.source == source])
            for split, docs in splits.items()
        }
        for source in dict.fromkeys(d.source for d in documents)
    }
    manifest = {
        "request": request,
        "packages": packages,
        "splits": {
            name: {"file": paths[name].name, "bytes": paths[name].stat().st_size, **_counts(docs)}
            for name, docs in splits.items()
        },
        "sources": by_source,
    }
    _atomic_write(output / MANIFEST_NAME, lambda h: h.write(json.dumps(manifest, indent=2) + "\n"))
    return paths
