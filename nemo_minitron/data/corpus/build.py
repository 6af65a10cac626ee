"""Building a corpus on disk: split files plus a manifest that makes rebuilding idempotent."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nemo_minitron import parallel
from nemo_minitron.outputs import claim_output, releases_output_locks
from nemo_minitron.atomic import atomic_file, write_text
from nemo_minitron.data.corpus.debian import _cache_root, package_version
from nemo_minitron.data.corpus.document import Document
from nemo_minitron.data.corpus.sources import (
    DEFAULT_SOURCES,
    SOURCES,
    _spec,
    fetch_source,
    load_documents,
)
from nemo_minitron.data.corpus.split import SPLITS, _check_fractions, split_documents
from nemo_minitron.data.corpus.user_data import load_user_documents, user_files

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Bump when the extraction or output format changes so stale corpora are rebuilt.
CORPUS_FORMAT_VERSION = 1


def _write_jsonl(path: Path, documents: Sequence[Document]) -> None:
    with atomic_file(path) as handle:
        for doc in documents:
            handle.write(
                json.dumps(
                    {"source": doc.source, "id": doc.doc_id, "text": doc.text}, ensure_ascii=False
                )
            )
            handle.write("\n")


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
    write_text(output / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return paths


@releases_output_locks
def ensure_corpus(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.05,
    calib_fraction: float = 0.05,
    user_paths: Sequence[str | os.PathLike[str]] = (),
    text_key: str = "text",
) -> dict[str, Path]:
    """The ``train`` / ``calib`` / ``heldout`` files of the corpus for these settings (collective).

    The one way stages get a corpus: rank 0 runs :func:`build_corpus` (a no-op when the
    manifest already matches), every rank waits for it. With ``output_dir`` None the corpus
    lives in ``<cache_dir or default_cache_dir()>/corpus/<hash of the settings>``, so the
    same settings always find the same folder and different settings never share one; a given
    ``output_dir`` must be new, empty or an earlier corpus (``outputs.claim_output``).
    ``cache_dir`` is also where the Debian packages are fetched.
    """
    if output_dir is not None and not (Path(output_dir) / MANIFEST_NAME).is_file():
        claim_output(output_dir, "corpus", user_paths, key="corpus.output_dir")
    if output_dir is None:
        settings = {
            "sources": list(sources),
            "user_paths": [str(Path(p).expanduser().resolve()) for p in user_paths],
            "seed": int(seed),
            "heldout_fraction": float(heldout_fraction),
            "calib_fraction": float(calib_fraction),
            "text_key": text_key,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        output_dir = _cache_root(cache_dir) / "corpus" / key
    output = Path(output_dir)
    if parallel.is_main_process():
        build_corpus(output, sources, cache_dir, seed, heldout_fraction, calib_fraction,
                     user_paths, text_key)
    parallel.barrier()
    return {name: output / f"{name}.jsonl" for name in SPLITS}
