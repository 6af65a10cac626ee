"""What every corpus module shares: the document type and the corpus error."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_minitron.errors import UserError


class CorpusError(UserError):
    """A corpus source could not be fetched, read or parsed."""


@dataclass(frozen=True)
class Document:
    """One unit of text; ``doc_id`` is unique across all sources and drives the split."""

    source: str
    doc_id: str
    text: str
