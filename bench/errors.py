"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""


class BenchError(Exception):
    """Bad input or environment (unknown suite, missing data, corrupt file, unwritable output ...)."""

    exit_code = 2


class NoResults(BenchError):
    """Nothing finished to show yet (a table asked for before any cell of it finished)."""
