"""User-facing errors: the CLI prints these as one line, without a traceback."""


class Difix3DError(Exception):
    """Bad input or an unmet precondition that the user can fix (a path, an id, a size)."""
