"""Atomic writes: a reader (or a resumed run) sees the old content or the new, never a partial one.

- `atomic_file(path)`: write a file through a temporary sibling, fsync it, rename it into place.
- `replace_dir(new, target)`: publish a fully written directory `new` (conventionally
  `target.partial`) as `target`; an old `target` is removed only after the swap.
Both rely on rename within one directory being atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (text "w" or binary "wb"); on a clean exit
    it replaces `path`, on an exception it is removed and `path` is untouched."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600; these are ordinary shared files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def replace_dir(new: Path, target: Path) -> None:
    """Swap the directory `new` into place as `target`; an old `target` is only removed after."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
