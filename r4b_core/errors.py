"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero."""


class R4BError(Exception):
    """An error whose message says where and what went wrong, and the fix."""
