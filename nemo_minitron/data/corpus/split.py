"""Splitting: each document's split comes from a seeded hash of its id alone."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from nemo_minitron.data.corpus.document import CorpusError, Document
from nemo_minitron.errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "calib", "heldout")


def _check_fractions(heldout_fraction: float, calib_fraction: float) -> None:
    if not (
        0 <= heldout_fraction < 1
        and 0 <= calib_fraction < 1
        and heldout_fraction + calib_fraction < 1
    ):
        raise UserError(
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
