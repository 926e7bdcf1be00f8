"""The one exception type for mistakes a user can make (bad input, bad files, bad settings)."""


class GsoptError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
