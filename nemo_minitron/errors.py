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

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75
EXIT_KEYBOARD_INTERRUPT = 130


class UserError(ValueError):
    """Bad input, reported as one line that names the key or file to fix."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a training step is not finite; no `final/` was written."""
