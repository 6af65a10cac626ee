"""How a stage ends when it does not succeed, and the exit code `minitron` gives each outcome.

`UserError` means the user can fix it (a key, a path, a file's content): the command line prints it
as one `error: ...` line and exits 2. It subclasses ValueError so that library callers who catch
ValueError keep working. `TrainingDiverged` stops a training stage at the first non-finite loss or
gradient norm (exit 3). A training stage stopped by a pre-emption signal after saving a checkpoint
returns `interrupted: true` and the command exits 75 (EX_TEMPFAIL: run it again to resume), so
`minitron distill ... && minitron export-hf ...` does not go on to a `final/` that does not exist;
stopped by Ctrl-C it does the same and exits 130 (128 + SIGINT, the shell's code for it), also when a
second Ctrl-C or one outside training aborts without a checkpoint.
Anything else that escapes a stage is a bug in nemo-minitron or a library below it and keeps its
traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75
EXIT_KEYBOARD_INTERRUPT = 130


class UserError(ValueError):
    """Bad input, reported as one line that names the key or file to fix."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a training step is not finite; no `final/` was written."""


def read_json(path: str | Path, error: type[UserError] = UserError, kind: type | None = dict) -> Any:
    """The JSON value in file `path`, of type `kind` (None: any). A file that cannot be read, is not
    UTF-8, does not parse or holds another type raises `error` naming the file, in one wording for
    every JSON file a stage reads: `FILE is not valid JSON (MSG: line L column C)`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path} is not valid JSON (not UTF-8 text: byte {err.start})") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path} holds a JSON {type(value).__name__}, not a JSON {kind.__name__}")
    return value
