"""One exception type for problems the user can fix: the CLI prints it as one line, never a traceback."""


class ToolkitError(Exception):
    """A user-facing error. `str(err)` is the whole message; keep it short and say what to do."""
