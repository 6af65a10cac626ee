"""Fetching Debian packages into a private cache.

Packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x``, so nothing
is installed on the system and no root access is needed beyond what apt itself requires.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nemo_minitron.atomic import replace_dir
from nemo_minitron.data.corpus.document import CorpusError

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "NEMO_MINITRON_CACHE"
_PACKAGE_META = ".nemo_minitron_package.json"
_COMMAND_TIMEOUT_S = 900


def default_cache_dir() -> Path:
    """``$NEMO_MINITRON_CACHE`` if set, else ``~/.cache/nemo_minitron/corpus``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "nemo_minitron" / "corpus"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(command: list[str], cwd: Path, what: str) -> str:
    """Run ``command``; turn any failure into a CorpusError that names ``what`` and the command."""
    shown = " ".join(command)
    try:
        proc = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as err:
        raise CorpusError(
            f"{what}: `{shown}` failed: {command[0]} not found (needs Debian/Ubuntu)"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise CorpusError(f"{what}: `{shown}` timed out after {_COMMAND_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise CorpusError(f"{what}: `{shown}` exited with status {proc.returncode}: {detail}")
    return proc.stdout


def fetch_package(
    package: str, cache_dir: str | os.PathLike[str] | None = None, *, source: str | None = None
) -> Path:
    """Download and unpack Debian ``package`` into the cache; return the unpacked root.

    Idempotent: an existing unpacked tree is reused. The tree is built in a temporary
    directory and renamed into place, so an interrupted fetch leaves nothing that looks
    complete.
    """
    root = _cache_root(cache_dir)
    target = root / package
    if (target / _PACKAGE_META).is_file():
        return target
    what = (
        f"corpus source {source!r} (Debian package {package!r})"
        if source
        else f"Debian package {package!r}"
    )
    work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=root))
    try:
        download = ["apt-get", "download", package]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root apt drops privileges to `_apt`, which cannot write our private temp dir.
            download[1:1] = ["-o", "APT::Sandbox::User=root"]
        logger.info("downloading Debian package %s", package)
        _run(download, work, what)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise CorpusError(
                f"{what}: `apt-get download {package}` produced {len(debs)} .deb files"
            )
        version = _run(["dpkg-deb", "--field", str(debs[0]), "Version"], work, what).strip()
        tree = work / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(tree)], work, what)
        meta = {"package": package, "version": version, "deb": debs[0].name}
        (tree / _PACKAGE_META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tree.rename(target)
        except OSError:
            if not (target / _PACKAGE_META).is_file():  # not a concurrent fetch that won the race
                replace_dir(tree, target)  # but an unfinished tree left by something else
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def package_version(package_root: Path) -> str:
    """The Debian version recorded when ``package_root`` was unpacked."""
    return json.loads((package_root / _PACKAGE_META).read_text())["version"]
