"""One exception type for problems the user can fix: the CLI prints it as one line, never a traceback."""


class ToolkitError(Exception):
    """A user-facing error. `str(err)` is the whole message; keep it short and say what to do."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message, cut to `limit` characters, for a one-line error; the
    exception's type name when it has no message (`KeyError()`, `RuntimeError("\\n")`), so that an empty message
    never turns a one-line error into an unexpected one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
