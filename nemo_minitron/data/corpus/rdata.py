"""R serialization (XDR) reader.

The janeaustenr package ships its novels as R lazy-load data (``Rdata.rdb``/``.rdx``),
so reading them needs a decoder for R's serialization format. Only what data objects
use is supported; byte-code (compiled closures) is rejected rather than guessed at.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_minitron.data.corpus.document import CorpusError


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
