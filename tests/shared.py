"""Expensive test inputs built once per pytest run and shared by all its xdist workers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock


def built_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`root/name`, made by `build(root/name)` in the first process that asks, under a file lock; the
    others wait for it and reuse it. A build that failed (no `.done` marker) is removed and redone,
    so one crashed worker cannot hand a half-written directory to the rest. Users only read it."""
    path = root / name
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


def copy_tiny_teacher(source: Path, root: Path) -> Path:
    """`root/hf` and `root/teacher` copied from the `tiny_teacher_source` fixture; returns `root/teacher`."""
    shutil.copytree(source, root, dirs_exist_ok=True)
    return root / "teacher"
