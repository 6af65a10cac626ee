"""Text corpora for calibration, distillation and evaluation.

Built-in sources are Debian packages that carry freely licensed English text. They are
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a private cache, so
nothing is installed on the system and no root access is needed beyond what apt itself
requires. Users can bring their own ``.txt`` / ``.jsonl`` data through
:func:`load_user_documents`.

Documents are assigned to the ``train`` / ``calib`` / ``heldout`` splits by a seeded hash
of their id, so a document's split never depends on which other documents are present.
Stages get a corpus from :func:`ensure_corpus`, which builds it once per settings.

Modules, each importing only those above it:
``document`` (Document, CorpusError), ``rdata`` (R serialization reader), ``debian``
(package fetch cache), ``sources`` (built-in sources and their cleaners), ``user_data``
(.txt/.jsonl files), ``split`` (hash-based splits), ``build`` (files, manifest, ensure_corpus).
"""

from nemo_minitron.data.corpus.build import (
    CORPUS_FORMAT_VERSION,
    MANIFEST_NAME,
    build_corpus,
    ensure_corpus,
)
from nemo_minitron.data.corpus.debian import (
    CACHE_ENV_VAR,
    default_cache_dir,
    fetch_package,
    package_version,
)
from nemo_minitron.data.corpus.document import CorpusError, Document
from nemo_minitron.data.corpus.rdata import (
    RObject,
    RSerializationError,
    RSpecial,
    RSymbol,
    parse_r_serialized,
    read_lazyload_db,
)
from nemo_minitron.data.corpus.sources import (
    DEFAULT_SOURCES,
    SOURCES,
    SourceSpec,
    clean_gcide_entry,
    fetch_source,
    load_documents,
)
from nemo_minitron.data.corpus.split import SPLITS, assign_split, split_documents
from nemo_minitron.data.corpus.user_data import (
    USER_SUFFIXES,
    iter_file_texts,
    load_user_documents,
    user_files,
)

__all__ = [
    "CACHE_ENV_VAR",
    "CORPUS_FORMAT_VERSION",
    "DEFAULT_SOURCES",
    "MANIFEST_NAME",
    "SOURCES",
    "SPLITS",
    "USER_SUFFIXES",
    "CorpusError",
    "Document",
    "RObject",
    "RSerializationError",
    "RSpecial",
    "RSymbol",
    "SourceSpec",
    "assign_split",
    "build_corpus",
    "clean_gcide_entry",
    "default_cache_dir",
    "ensure_corpus",
    "fetch_package",
    "fetch_source",
    "iter_file_texts",
    "load_documents",
    "load_user_documents",
    "package_version",
    "parse_r_serialized",
    "read_lazyload_db",
    "split_documents",
    "user_files",
]
