"""The one exception type for bad input.

`UserError` means the user can fix it (a key, a path, a file's content): the command line prints it
as one `error: ...` line and exits 2. Anything else that escapes a stage is a bug in nemo-minitron
or in a library below it and keeps its traceback. It subclasses ValueError so that library callers
who catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input, reported as one line that names the key or file to fix."""
