"""Output safety: a stage writes only where it cannot destroy what it did not create.

`claim_output(path, stage, inputs)` is called by every stage before it does any work. It refuses,
with a `UserError` naming the key, an output directory that
- is the current directory or one of its parents,
- is one of the stage's inputs, lies inside one, or contains one,
- is a file, or a non-empty directory that is not an earlier output of the same stage.
An earlier output of the same stage is recognised by the `metadata.json` of a checkpoint directory
(its `stage`) or by the marker file `nemo_minitron_output.json` that `claim_output` writes into
every other output directory (training runs, searches, pipelines, corpora, exports).

Each output records the settings that made it (`settings_of(cfg)`: the typed config as dotted keys,
without where it writes and the parallel layout). Re-running a stage into its own earlier output
with the same settings resumes it, or does nothing if it is finished; with other settings it is an
error naming the keys that differ, unless `overwrite=true`, which replaces the earlier output. Even
then only the stage's own entries go (`own`): a file the user added beside them makes it refuse.

One writer at a time: `check_output` ends by locking the directory for this process (`lock_output`),
so a second run into it, started while the first works, is refused at once instead of crashing
after all its work. The lock is an exclusive `flock` on a hidden sibling file, `.NAME.lock`, which
survives the `NAME.partial` -> `NAME` swap that publishes a checkpoint; rank 0 takes it (a
launcher ends the other ranks when rank 0 exits). The kernel releases it when the process ends,
however it ends; a stage function decorated with `@releases_output_locks` releases the locks it
took when it returns, and removes their files.

Every output is published whole (`publishing`: written into `NAME.partial`, renamed to `NAME` when
complete) and every marker has one shape (`write_marker`).
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemo_minitron import atomic, parallel
from nemo_minitron.errors import UserError

log = logging.getLogger(__name__)

MARKER_FILE = "nemo_minitron_output.json"
_METADATA_FILE = "metadata.json"  # checkpoint.METADATA_FILE (checkpoint imports this module)
# Config keys that do not change what a stage produces: where it writes, the parallel layout (results
# are layout-independent), replacing, and how progress is shown.
UNRECORDED_KEYS = frozenset({"output_dir", "work_dir", "overwrite", "tp", "pp", "progress_bar"})


def _resolved(path: str | Path, key: str = "path") -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # a symbolic link loop: RuntimeError up to Python 3.12, OSError after
        raise UserError(f"{key}={path} cannot be resolved ({err}): a symbolic link that points back at itself? "
                        f"Remove or fix the link, or choose another {key}") from None


def _record(path: Path) -> dict[str, Any]:
    """What directory `path` says about its writer: its marker, else its checkpoint metadata."""
    for name in (MARKER_FILE, _METADATA_FILE):
        try:
            record = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return {}


def content_id(path: str | Path | None) -> str | None:
    """The identity of an input checkpoint's content: the SHA-256 of its metadata.json, which lists
    the checksum of every weights file (None for anything else)."""
    try:
        return hashlib.sha256((Path(path) / _METADATA_FILE).read_bytes()).hexdigest()[:16] if path else None
    except OSError:
        return None


def settings_of(cfg, ignore: Iterable[str] = (), inputs: Iterable[str] = ()) -> dict[str, Any]:
    """The dataclass `cfg` as {dotted key: JSON value}, without `UNRECORDED_KEYS` (at any depth) and
    the dotted keys in `ignore`: what an output records about the settings that made it. For each
    key in `inputs` (a checkpoint path) `KEY.content` records the checkpoint's `content_id`, so a
    checkpoint rewritten in place counts as a different input."""
    skip = set(ignore)
    flat: dict[str, Any] = {}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            key, value = prefix + f.name, getattr(obj, f.name)
            if f.name in UNRECORDED_KEYS or key in skip:
                continue
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                flat[key] = value

    walk(cfg, "")
    flat.update({f"{key}.content": content_id(getattr(cfg, key)) for key in inputs})
    return json.loads(json.dumps(flat, default=str))  # tuples -> lists, as they read back


def changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """`key: recorded -> now` for every key whose value differs."""
    unset = "<unset>"
    return [f"{key}: {recorded.get(key, unset)!r} -> {settings.get(key, unset)!r}"
            for key in sorted(set(recorded) | set(settings)) if recorded.get(key, unset) != settings.get(key, unset)]


def check_same_settings(named: str, what: str, recorded: dict[str, Any], settings: dict[str, Any],
                        otherwise: str) -> None:
    """The one refusal of a re-run whose settings differ from those its output recorded: `named`
    (the directory, as the user gave it) holds `what` made with other settings, every changed key
    listed as `key: recorded -> now`, then `otherwise` (what else the user can do)."""
    changed = changed_settings(recorded, settings)
    if changed:
        raise UserError(f"{named} holds {what} made with other settings ({'; '.join(changed)}): repeat those "
                        f"settings, {otherwise}")


def _unwritable(path: Path) -> str | None:
    """Why directory `path` cannot be written or created (judged on it, or else on its nearest
    existing parent), or None."""
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file"
    return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"


def check_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (), key: str = "output_dir",
                 settings: dict[str, Any] | None = None, overwrite: bool = False,
                 own: Iterable[str] | None = None, retired: Iterable[str] = ()) -> Path:
    """The resolved `path` if `stage` may write it with `settings` (see the module docstring);
    UserError otherwise. `own`: the entries the stage writes, which `overwrite` may replace.
    `retired`: dotted keys that earlier versions of the stage recorded but that no longer decide its
    output; an earlier output's recorded values of them are not compared."""
    out = _resolved(path, key)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(f"{key}={path} is the current directory or one above it: {stage} would write into "
                        f"files it did not create; choose a new directory")
    for given in (i for i in inputs if i):
        source = _resolved(given)
        if out == source or source in out.parents or out in source.parents:
            raise UserError(f"{key}={path} overlaps the input {given}: a stage never writes into, inside or "
                            f"above its inputs; choose another {key}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{key}={path} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        record = _record(out)
        owner = record.get("stage")
        if owner != stage:
            what = f"the output of the {owner} stage" if owner else "files nemo-minitron did not write"
            raise UserError(f"{key}={path} is not empty and holds {what}: {stage} writes only into a new or "
                            f"empty directory or its own earlier output; choose another {key}")
        own = own if own is not None else record.get("entries", ())  # unlisted: nothing is replaceable
        recorded, retired = record.get("settings"), set(retired)
        if isinstance(recorded, dict):
            recorded = {k: v for k, v in recorded.items() if k not in retired}
        _check_earlier_output(out, path, stage, key, recorded, settings, overwrite, own)
    problem = _unwritable(out)
    if problem:
        raise UserError(f"{key}={path} cannot be written: {problem}; choose another {key}")
    lock_output(out, f"{key}={path}")
    return out


def _check_earlier_output(out: Path, path, stage: str, key: str, recorded: dict | None, settings: dict | None,
                          overwrite: bool, own: Iterable[str]) -> None:
    """`stage`'s earlier output in `out`: the same settings, or `overwrite` over only its own entries."""
    if overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in {*own, MARKER_FILE} and not _is_lock(p))
        if foreign:
            raise UserError(f"overwrite=true replaces only what {stage} wrote, but {key}={path} also holds "
                            f"{foreign}: move them away first")
        return
    if recorded is not None and settings is not None:
        check_same_settings(f"{key}={path}", f"a {stage} output", recorded, settings,
                            f"set overwrite=true to replace it, or choose another {key}")


def _remove_own(out: Path, own: Iterable[str]) -> None:
    """Delete the entries named `own` from directory `out` (what `overwrite=true` replaces)."""
    for name in own:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def claim_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (), key: str = "output_dir",
                 settings: dict[str, Any] | None = None, overwrite: bool = False,
                 own: Iterable[str] = (), retired: Iterable[str] = ()) -> Path:
    """`check_output` on every rank, then rank 0 removes the stage's `own` entries if `overwrite`
    and marks the directory as `stage`'s, with `settings` (collective: call it after
    `parallel.initialize`), for outputs that are not a checkpoint directory (those carry their stage
    and settings in metadata.json)."""
    own = tuple(own)
    out = check_output(path, stage, inputs, key, settings, overwrite, own, retired)
    parallel.barrier()  # every rank has looked before rank 0 changes anything
    if parallel.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_own(out, own)
        if overwrite or "settings" not in _record(out):
            write_marker(out, stage, settings)
    parallel.barrier()
    return out


def write_marker(directory: Path, stage: str, settings: dict[str, Any] | None, entries: Iterable[str] | None = None,
                 **extra: Any) -> None:
    """Mark `directory` as `stage`'s output made with `settings` (atomically), in the one shape every
    marker has: {"stage", "settings", "entries" (what overwrite=true may replace; absent: nothing),
    and `extra` (what the output was made from)}."""
    record = {"stage": stage, "settings": settings, **extra}
    if entries is not None:
        record["entries"] = sorted(entries)
    atomic.write_text(directory / MARKER_FILE, json.dumps(record, indent=1, default=str) + "\n")


@contextmanager
def publishing(target: str | Path, *subdirs: str, collective: bool = True) -> Iterator[Path]:
    """Write an output aside, publish it whole: yields a fresh `TARGET.partial` (with `subdirs` made)
    that replaces `target` when the block ends without an exception; after one, it stays as it is
    (the next publish removes it) and `target` is untouched. `collective`: every rank enters the
    block, rank 0 prepares and publishes, the others wait; otherwise the caller alone does it all."""
    target = Path(target).absolute()
    partial = target.with_name(target.name + ".partial")
    leads = parallel.is_main_process() or not collective
    if leads:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for subdir in subdirs:
            (partial / subdir).mkdir(parents=True)
    if collective:
        parallel.barrier()
    yield partial
    if collective:
        parallel.barrier()  # every rank's share is written
    if leads:
        atomic.replace_dir(partial, target)
    if collective:
        parallel.barrier()


# The output locks this process holds, innermost scope last: {output directory: lock file descriptor}.
# The first scope is the process's own, released at exit.
_held: list[dict[Path, int]] = [{}]


def lock_path(out: Path) -> Path:
    """The lock file of output directory `out`: `.NAME.lock` beside it."""
    return out.with_name(f".{out.name}.lock")


def _is_lock(entry: Path) -> bool:
    """A lock file of a sub-output (left by a killed run: it is ours, and free)."""
    return entry.name.startswith(".") and entry.name.endswith(".lock") and entry.is_file()


def lock_output(out: Path, named: str) -> None:
    """Take `out`'s lock for this process (re-entrant), or refuse naming the holder (`named`: how
    the user gave the directory). The file is reopened if its holder removed it between our open
    and our lock, so two runs never hold different files of one name. A parent where no file can
    be made gets a warning and no lock."""
    if parallel.launch_rank() != 0 or any(out in scope for scope in _held):  # rank 0 locks, before or after init
        return
    lock = lock_path(out)
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            log.warning("%s: cannot create the lock file %s (%s): nothing stops a second run from writing "
                        "there at the same time", named, lock, err.strerror)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode(errors="replace").strip() or "a process that has not yet said which"
            os.close(fd)
            raise UserError(f"{named} is being written by another run ({holder}): wait for it to end, or choose "
                            f"another directory") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _held[-1][out] = fd


def _release(scope: dict[Path, int]) -> None:
    """Remove each lock file while still holding it, then let it go."""
    for out, fd in scope.items():
        lock_path(out).unlink(missing_ok=True)
        os.close(fd)
    scope.clear()


def releases_output_locks(stage: Callable) -> Callable:
    """Decorate a stage function: the output locks it takes are released when it returns or raises
    (a lock this process already held stays with its holder)."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        _held.append({})
        try:
            return stage(*args, **kwargs)
        finally:
            _release(_held.pop())

    return run


atexit.register(lambda: _release(_held[0]))
