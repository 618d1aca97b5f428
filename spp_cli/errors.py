"""Errors that map to the CLI's exit codes (DESIGN.md, Contracts: exit codes).

Library code raises these; only the CLI turns them into exit codes and one line on stderr.
"""


class SppError(Exception):
    """Base class: `str(error)` is the one line shown to the user (the problem and the fix)."""

    exit_code = 3


class BadInput(SppError):
    """The user's input is wrong (a flag, a file, a recipe key): exit 2, nothing left behind."""

    exit_code = 2


class CheckFailed(SppError):
    """A check found a violation (`spp verify`, a stage's own zero check): exit 1."""

    exit_code = 1


class RuntimeFailure(SppError):
    """The work itself failed (out of memory, NaN loss, Cholesky failure after retries): exit 3."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its name when it has none): what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
