"""Corpus sources, the R serialization reader, user data and deterministic splits.

Tests that fetch Debian packages share the real cache (``$NEMO_MINITRON_CACHE`` or
``~/.cache/nemo_minitron/corpus``), so each package is downloaded once per machine.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from nemo_minitron.data.corpus import (
    DEFAULT_SOURCES,
    SOURCES,
    SPLITS,
    CorpusError,
    Document,
    RObject,
    RSerializationError,
    assign_split,
    build_corpus,
    clean_gcide_entry,
    default_cache_dir,
    ensure_corpus,
    fetch_package,
    fetch_source,
    load_documents,
    load_user_documents,
    parse_r_serialized,
    read_lazyload_db,
    split_documents,
)
from nemo_minitron.errors import UserError

# --- a minimal R XDR writer, enough to hand-build test streams -------------------------

_UTF8, _LATIN1, _ASCII = 1 << 3, 1 << 2, 1 << 6
NULL = struct.pack(">i", 254)


def _int(value: int) -> bytes:
    return struct.pack(">i", value)


def _flags(sexptype: int, *, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return _int(sexptype | (attr << 9) | (tag << 10) | (levels << 12))


def _char(value: str | None, encoding: str = "utf-8", levels: int = _UTF8) -> bytes:
    if value is None:
        return _flags(9) + _int(-1)
    raw = value.encode(encoding)
    return _flags(9, levels=levels) + _int(len(raw)) + raw


def _sym(name: str) -> bytes:
    return _flags(1) + _char(name, levels=_ASCII)


def _ref(index: int) -> bytes:
    return _int((index << 8) | 255)


def _strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    body = b"".join(_char(v) for v in values)
    return _flags(16, attr=bool(attrs)) + _int(len(values)) + body + attrs


def _intsxp(values: list[int], attrs: bytes = b"", sexptype: int = 13) -> bytes:
    body = b"".join(map(_int, values))
    return _flags(sexptype, attr=bool(attrs)) + _int(len(values)) + body + attrs


def _realsxp(values: list[float]) -> bytes:
    return _flags(14) + _int(len(values)) + struct.pack(f">{len(values)}d", *values)


def _vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    return _flags(19, attr=bool(attrs)) + _int(len(items)) + b"".join(items) + attrs


def _pairlist(cells: list[tuple[bytes | None, bytes]]) -> bytes:
    out = b""
    for tag, value in cells:
        out += _flags(2, tag=tag is not None) + (tag or b"") + value
    return out + NULL


def _stream(item: bytes) -> bytes:
    header = b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8"
    return header + item


def _hand_built_object() -> bytes:
    """list(text=, n=, x=, flag=, latin=, seq=) with names, class and a compact ALTREP seq."""
    na = -(2**31)
    seq_info = _pairlist(
        [(None, _sym("compact_intseq")), (None, _sym("base")), (None, _intsxp([13]))]
    )
    elements = [
        _strsxp(["It is a truth universally acknowledged", None, "café"]),
        # the first use of the `names` symbol defines back-reference 1
        _intsxp([1, na, 3], attrs=_pairlist([(_sym("names"), _strsxp(["a", "b", "c"]))])),
        _realsxp([2.5, -1.0]),
        _intsxp([1, na, 0], sexptype=10),
        _flags(16) + _int(1) + _char("caf\xe9", "latin-1", _LATIN1),
        _int(238) + seq_info + _realsxp([4.0, 10.0, 1.0]) + NULL,
    ]
    names = _strsxp(["text", "n", "x", "flag", "latin", "seq"])
    attrs = _pairlist([(_ref(1), names), (_sym("class"), _strsxp(["novel"]))])
    return _stream(_vecsxp(elements, attrs))


def test_r_reader_decodes_hand_built_stream() -> None:
    obj = parse_r_serialized(_hand_built_object())
    assert isinstance(obj, RObject) and obj.rtype == "list"
    assert obj.names == ["text", "n", "x", "flag", "latin", "seq"]
    assert obj.attributes["class"].value == ["novel"]
    text, n, x, flag, latin, seq = obj.value
    assert text.rtype == "character"
    assert text.value == ["It is a truth universally acknowledged", None, "café"]
    assert n.value == [1, None, 3] and n.names == ["a", "b", "c"]
    assert x.value == [2.5, -1.0]
    assert flag.value == [True, None, False]
    assert latin.value == ["café"]
    assert seq.rtype == "integer" and seq.value == [10, 11, 12, 13]


def test_r_reader_accepts_gzip_wrapping_and_rejects_bad_streams() -> None:
    data = _hand_built_object()
    assert parse_r_serialized(gzip.compress(data)).names == parse_r_serialized(data).names
    with pytest.raises(RSerializationError, match="truncated"):
        parse_r_serialized(data[:-7])
    with pytest.raises(RSerializationError, match="XDR"):
        parse_r_serialized(b"A\n" + data[2:])


def test_read_lazyload_db_hand_built(tmp_path: Path) -> None:
    payload = _stream(_strsxp(["Chapter 1", "", "Once upon a time."]))
    blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
    location = _intsxp([0, len(blob)])
    variables = _vecsxp([location], _pairlist([(_sym("names"), _strsxp(["tale"]))]))
    index = _vecsxp(
        [variables, _vecsxp([]), _intsxp([1], sexptype=10)],
        _pairlist([(_ref(1), _strsxp(["variables", "references", "compressed"]))]),
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_stream(index)))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    db = read_lazyload_db(tmp_path / "Rdata")
    assert list(db) == ["tale"]
    assert db["tale"].value == ["Chapter 1", "", "Once upon a time."]


# --- real Debian packages ----------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def austen(cache_dir: Path) -> list[Document]:
    return load_documents("austen", cache_dir)


def test_austen_package_has_six_novels_by_chapter(austen: list[Document]) -> None:
    novels = {doc.doc_id.split("/")[1] for doc in austen}
    assert novels == {
        "sensesensibility",
        "prideprejudice",
        "mansfieldpark",
        "emma",
        "northangerabbey",
        "persuasion",
    }
    pride = [doc for doc in austen if doc.doc_id.startswith("austen/prideprejudice/")]
    assert len(pride) == 61
    assert pride[0].text.startswith("Chapter 1\n")
    assert "It is a truth universally acknowledged, that a single man" in pride[0].text
    assert len({doc.doc_id for doc in austen}) == len(austen)
    assert sum(len(doc.text) for doc in austen) > 3_500_000


def test_fetch_is_idempotent_and_leaves_no_temp_dirs(cache_dir: Path) -> None:
    first = fetch_source("austen", cache_dir)
    assert fetch_source("austen", cache_dir) == first
    assert not list(cache_dir.glob(".r-cran-janeaustenr.*"))


@pytest.mark.parametrize("name", ["fortunes", "python_docs", "gcide", "perl_docs"])
def test_other_sources_load(name: str, cache_dir: Path) -> None:
    docs = load_documents(name, cache_dir)
    assert len(docs) > 200
    assert all(doc.source == name and doc.text.strip() for doc in docs)
    assert len({doc.doc_id for doc in docs}) == len(docs)
    text = "\n".join(doc.text for doc in docs)
    if name == "python_docs":
        assert any(doc.doc_id == "python_docs/library/os" for doc in docs)
    if name == "gcide":
        assert "[1913 Webster]" not in text and "{" not in text
    if name == "fortunes":
        assert "\b" not in text and "\n%\n" not in text
    if name == "perl_docs":  # pages cut at headings into chunks; release notes and listings left out
        pages = {doc.doc_id.split("/")[1] for doc in docs}
        assert "perlstyle" in pages and "perlfunc" in pages
        assert not any(page.endswith("delta") or page in ("perltoc", "perluniprops") for page in pages)
        assert sum(doc.doc_id.startswith("perl_docs/perlfunc/") for doc in docs) > 10


def test_clean_gcide_entry_strips_markup() -> None:
    raw = (
        'Calorie \\Cal"o*rie\\, n. [F., fr. L. calor heat.] (Physics)\n'
        "   The unit of heat from 0[deg] to 1[deg]; cf. {Foot\n"
        "   pound} and the caf['e].\n"
        "   [1913 Webster]\n"
    )
    assert clean_gcide_entry(raw) == (
        "Calorie, n. [F., fr. L. calor heat.] (Physics)\n"
        "The unit of heat from 0° to 1°; cf. Foot\n"
        "pound and the café."
    )


def test_unavailable_package_raises_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError) as info:
        fetch_package("nemo-minitron-no-such-package", tmp_path, source="imaginary")
    message = str(info.value)
    assert "nemo-minitron-no-such-package" in message and "'imaginary'" in message
    assert "apt-get" in message and "download" in message
    assert not list(tmp_path.iterdir())  # the failed attempt cleaned up after itself


def test_unknown_source_raises_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown corpus source 'nope'"):
        fetch_source("nope", tmp_path)
    assert set(SOURCES) == {"austen", "fortunes", "python_docs", "gcide", "perl_docs"}
    assert DEFAULT_SOURCES == ("austen", "fortunes", "python_docs", "gcide")


# --- user data ---------------------------------------------------------------------------


def test_user_txt_jsonl_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    (tmp_path / "sub").mkdir()
    records = [{"text": "json one"}, {"body": "x", "text": "json two"}]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    (tmp_path / "ignored.csv").write_text("not, a, document")

    txt = load_user_documents(tmp_path / "a.txt")
    assert [d.text for d in txt] == ["first para\nline two", "second para"]
    assert [d.doc_id for d in txt] == ["user/a.txt:1", "user/a.txt:5"]

    everything = load_user_documents(tmp_path, source="mine")
    assert [d.text for d in everything] == [
        "first para\nline two",
        "second para",
        "json one",
        "json two",
    ]
    assert everything[2].doc_id == "mine/sub/b.jsonl:1" and everything[2].source == "mine"

    with pytest.raises(CorpusError, match=r"b\.jsonl:1: .*'body'"):
        load_user_documents(tmp_path / "sub" / "b.jsonl", text_key="body")


def test_malformed_jsonl_line_reports_its_number(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(CorpusError, match=r"data\.jsonl:3: malformed JSON"):
        load_user_documents(path)
    with pytest.raises(CorpusError, match="no such file"):
        load_user_documents(tmp_path / "missing.jsonl")


def test_non_utf8_user_file_names_file_and_line(tmp_path: Path) -> None:
    readable = {"data.txt": "first\n\nsecond\n", "data.jsonl": '{"text": "ok"}\n\n{"text": "2"}\n'}
    for name, good in readable.items():
        path = tmp_path / name
        path.write_bytes(good.encode() + b"caf\xe9 au lait\n")  # latin-1, not UTF-8
        with pytest.raises(CorpusError, match=rf"{name.replace('.', '[.]')}:4: not UTF-8") as info:
            load_user_documents(path)
        assert isinstance(info.value, UserError)


# --- splitting and building --------------------------------------------------------------


def _synthetic(n: int, prefix: str = "doc") -> list[Document]:
    return [Document("synthetic", f"{prefix}/{i}", f"text of {prefix} {i}") for i in range(n)]


def test_splits_are_disjoint_stable_and_seeded() -> None:
    docs = _synthetic(4000)
    splits = split_documents(docs, seed=7)
    ids = {name: {d.doc_id for d in split} for name, split in splits.items()}
    assert ids["train"].isdisjoint(ids["heldout"]) and ids["calib"].isdisjoint(ids["heldout"])
    assert ids["train"].isdisjoint(ids["calib"])
    assert sum(map(len, ids.values())) == len(docs)
    assert 120 < len(ids["heldout"]) < 280 and 120 < len(ids["calib"]) < 280

    assert split_documents(list(reversed(docs)), seed=7)["heldout"][::-1] == splits["heldout"]
    assert {d.doc_id for d in split_documents(docs, seed=8)["heldout"]} != ids["heldout"]
    # Adding another source leaves every existing document where it was.
    grown = split_documents(docs + _synthetic(500, "extra"), seed=7)
    assert ids["heldout"] <= {d.doc_id for d in grown["heldout"]}
    assert all(assign_split(d.doc_id, 7) == "heldout" for d in splits["heldout"])


def test_split_drops_duplicate_texts_and_rejects_duplicate_ids() -> None:
    docs = [Document("s", "a", "same"), Document("s", "b", "same"), Document("s", "c", "other")]
    kept = [d.doc_id for split in split_documents(docs).values() for d in split]
    assert sorted(kept) == ["a", "c"]
    with pytest.raises(CorpusError, match="duplicate document id"):
        split_documents([Document("s", "a", "x"), Document("s", "a", "y")])
    with pytest.raises(ValueError):
        split_documents(docs, heldout_fraction=0.6, calib_fraction=0.5)


def test_build_corpus_writes_splits_and_manifest(tmp_path: Path, cache_dir: Path) -> None:
    user = tmp_path / "mine.jsonl"
    user.write_text("".join(json.dumps({"text": f"user document {i}"}) + "\n" for i in range(300)))
    out = tmp_path / "corpus"
    paths = build_corpus(out, sources=["austen"], cache_dir=cache_dir, seed=3, user_paths=[user])
    assert set(paths) == set(SPLITS)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["packages"]["austen"]["package"] == "r-cran-janeaustenr"
    assert manifest["packages"]["austen"]["version"]
    seen: dict[str, set[str]] = {}
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and set(rows[0]) == {"source", "id", "text"}
        assert manifest["splits"][name]["documents"] == len(rows)
        assert manifest["splits"][name]["characters"] == sum(len(r["text"]) for r in rows)
        seen[name] = {r["id"] for r in rows}
    assert seen["heldout"].isdisjoint(seen["train"] | seen["calib"])
    assert sum(manifest["sources"]["user"][s]["documents"] for s in SPLITS) == 300
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    # A matching manifest skips the work; a different request rebuilds.
    stamp = paths["train"].stat().st_mtime_ns
    build_corpus(out, sources=["austen"], cache_dir=cache_dir, seed=3, user_paths=[user])
    assert paths["train"].stat().st_mtime_ns == stamp
    build_corpus(out, sources=["austen"], cache_dir=cache_dir, seed=4, user_paths=[user])
    assert json.loads((out / "manifest.json").read_text())["request"]["seed"] == 4


def test_ensure_corpus_one_folder_per_settings(tmp_path: Path) -> None:
    user = tmp_path / "mine.jsonl"
    user.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(100)))
    cache = tmp_path / "cache"
    paths = ensure_corpus(sources=(), cache_dir=cache, user_paths=[user])
    assert set(paths) == set(SPLITS) and all(p.is_file() for p in paths.values())
    folder = paths["train"].parent
    assert folder.parent == cache / "corpus"

    stamp = paths["train"].stat().st_mtime_ns
    # The same settings find the same, finished folder; other settings get their own.
    assert ensure_corpus(sources=[], cache_dir=cache, user_paths=[str(user)]) == paths
    assert paths["train"].stat().st_mtime_ns == stamp
    other = ensure_corpus(sources=(), cache_dir=cache, user_paths=[user], seed=1)
    assert other["train"].parent.parent == cache / "corpus" and other["train"].parent != folder
    assert paths["train"].stat().st_mtime_ns == stamp

    explicit = ensure_corpus(tmp_path / "here", sources=(), user_paths=[user])
    assert explicit["calib"] == tmp_path / "here" / "calib.jsonl" and explicit["calib"].is_file()
