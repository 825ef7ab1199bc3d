"""The one exception family that the CLI turns into a clean message (no traceback) and exit code 2."""


class DareError(Exception):
    """Bad input a user can act on: a malformed file, a missing folder, an option out of range."""
