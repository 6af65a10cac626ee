"""Output safety: a stage writes only where it cannot destroy what it did not create.

`claim_output(path, stage, inputs)` is called by every stage before it does any work. It refuses,
with a `UserError` naming the key, an output directory that
- is the current directory or one of its parents,
- is one of the stage's inputs, lies inside one, or contains one,
- is a file, or a non-empty directory that is not an earlier output of the same stage.
An earlier output of the same stage is recognised by the `metadata.json` of a checkpoint directory
(its `stage`) or by the marker file `nemo_minitron_output.json` that `claim_output` writes into
every other output directory (training runs, searches, pipelines, Hugging Face exports). Re-running
a stage into its own earlier output resumes or replaces it as that stage documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from nemo_minitron import atomic, parallel
from nemo_minitron.errors import UserError

MARKER_FILE = "nemo_minitron_output.json"
_METADATA_FILE = "metadata.json"  # checkpoint.METADATA_FILE (checkpoint imports this module)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _owner(path: Path) -> str | None:
    """The stage that wrote directory `path`, from its marker or its checkpoint metadata."""
    for name in (MARKER_FILE, _METADATA_FILE):
        try:
            return json.loads((path / name).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def check_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (), key: str = "output_dir") -> Path:
    """The resolved `path` if `stage` may write it (see the module docstring); UserError otherwise."""
    out = _resolved(path)
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
        owner = _owner(out)
        if owner != stage:
            what = f"the output of the {owner} stage" if owner else "files nemo-minitron did not write"
            raise UserError(f"{key}={path} is not empty and holds {what}: {stage} writes only into a new or "
                            f"empty directory or its own earlier output; choose another {key}")
    return out


def claim_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (),
                 key: str = "output_dir") -> Path:
    """`check_output` on every rank, then rank 0 marks the directory as `stage`'s (collective: call
    it after `parallel.initialize`), for outputs that are not a checkpoint directory (those carry
    their stage in metadata.json)."""
    out = check_output(path, stage, inputs, key)
    parallel.barrier()  # every rank has looked before rank 0 adds the marker
    if parallel.is_main_process() and not (out / MARKER_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / MARKER_FILE, json.dumps({"stage": stage}) + "\n")
    parallel.barrier()
    return out
