"""The scores cache: every prune keeps its teacher's importance scores in one directory, under a key
of what they depend on (the prune stage's request: the teacher's content id, the method, the
aggregation, the calibration windows and the depth-scoring samples), so pruning the same teacher to
another target, into another directory, skips the importance pass.

The directory is $NEMO_MINITRON_SCORES_CACHE, else ~/.cache/nemo_minitron/importance. It lies in
rank 0's home, which other nodes may not share, so rank 0 reads and writes it and tells the others.
A damaged or foreign file is a miss (with a warning), never an error: the scores are recomputed and
the file replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from nemo_minitron import parallel
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.config import ModelArch

log = logging.getLogger("nemo_minitron")

SCORES_CACHE_ENV = "NEMO_MINITRON_SCORES_CACHE"


def scores_cache_dir() -> Path:
    """Where prunes keep their teachers' scores: $NEMO_MINITRON_SCORES_CACHE, else
    ~/.cache/nemo_minitron/importance."""
    override = os.environ.get(SCORES_CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "nemo_minitron" / "importance"


def cache_file(request: dict) -> Path:
    """The file of the scores computed for `request`."""
    key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return scores_cache_dir() / f"{key}.pt"


def matching(path: Path, teacher: ModelArch, request: dict) -> ImportanceScores | None:
    """The scores saved at `path` if they were computed for `teacher` with `request`."""
    if not path.is_file():
        return None
    scores = ImportanceScores.load(path)
    return scores if scores.arch == teacher and scores.info.get("request") == request else None


def lookup(teacher: ModelArch, request: dict) -> ImportanceScores | None:
    """The cached scores for `request`, or None (collective: rank 0 reads, every rank gets them)."""
    cached = None
    if parallel.is_main_process():
        path = cache_file(request)
        try:
            cached = matching(path, teacher, request)
        except Exception as err:  # noqa: BLE001 - any unreadable file: recompute and replace it
            log.warning("the scores cache file %s is unreadable (%s): recomputing", path, type(err).__name__)
    cached = parallel.from_main(cached)
    if cached is not None:
        log.info("importance: the scores cache holds this teacher's scores (%s)", cache_file(request))
    return cached


def keep(scores: ImportanceScores, request: dict) -> None:
    """Save `scores` (computed for `request`) in the cache (on rank 0, the caller's)."""
    path = cache_file(request)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(path)
