"""How a `spp` run that did not succeed ends: one line on stderr and an exit code (DESIGN.md), and with
`--format json` also a JSON object {"error", "exit_code"} on stdout, so a script reading stdout sees why.

Part of the CLI (spp_cli/cli.py's run_cli calls `failure` for whatever a command raised): with render.py, the only
other module that writes to the console.
    usage error (Click)     2  "<Click's message> (see 'spp CMD --help')"
    Ctrl-C                  130  INTERRUPTED
    SppError                its exit_code (BadInput 2, CheckFailed 1, RuntimeFailure 3): its message
    anything else           3  a full disk, out of memory, or "<type>: <message> (rerun with SPP_DEBUG=1 ...)"
"""

import json
import sys

import typer

from spp_cli.errors import SppError

try:  # recent Typer vendors its own Click; older releases use the click package
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

INTERRUPTED = "spp: interrupted: rerun the same command to resume\n"


def failure(error: BaseException, wants_json: bool) -> int:
    """Write the line (and JSON object) for `error` and return the run's exit code."""
    if isinstance(error, UsageError):
        if not error.format_message().strip():  # `spp` alone: the help was shown, but no command was given
            return 2
        where = f"spp {error.ctx.info_name}" if error.ctx and error.ctx.info_name != "spp" else "spp"
        return failed(f"{usage_message(error)} (see '{where} --help')", 2, wants_json)
    if isinstance(error, (KeyboardInterrupt, typer.Abort)):
        return interrupted(wants_json)
    if isinstance(error, SppError):
        return failed(one_line(error), error.exit_code, wants_json)
    if is_disk_full(error):  # outside a stage (a stage's own says which output and its resume folder)
        where = f" while writing '{error.filename}'" if getattr(error, "filename", None) else ""
        return failed(f"the disk is full{where}: free space on that disk and rerun", 3, wants_json)
    if "out of memory" in str(error).lower():
        return failed(f"out of memory ({one_line(error)[:200]}): use a smaller batch or seqlen", 3, wants_json)
    return failed(f"{type(error).__name__}: {one_line(error)[:300]} (rerun with SPP_DEBUG=1 for the traceback)", 3,
                  wants_json)


def shows_traceback(error: BaseException) -> bool:
    """With SPP_DEBUG=1 an error raised by the work (not a usage error, not a Ctrl-C) keeps its traceback."""
    return isinstance(error, Exception) and not isinstance(error, (UsageError, typer.Abort))


def failed(message: str, exit_code: int, wants_json: bool) -> int:
    """The one stderr line "spp: error: MESSAGE"; with --format json also {"error", "exit_code"} on stdout."""
    sys.stderr.write(f"spp: error: {message}\n")
    if wants_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": exit_code}, indent=2) + "\n")
    return exit_code


def interrupted(wants_json: bool) -> int:
    sys.stderr.write(INTERRUPTED)
    if wants_json:
        sys.stdout.write(json.dumps({"error": INTERRUPTED.removeprefix("spp: ").strip(), "exit_code": 130},
                                    indent=2) + "\n")
    return 130


def one_line(text) -> str:
    return " ".join(str(text).split())


def usage_message(error: UsageError) -> str:
    """Click's message on one line, less the "Value error, " that Typer's pydantic coercion puts before a
    choice's "'x' is not one of ..." and the closing full stop (the "(see ... --help)" hint follows it)."""
    return one_line(error.format_message()).replace(": Value error, ", ": ").removesuffix(".")


def is_disk_full(error: BaseException) -> bool:
    from spp_cli.io.disk_full import is_disk_full

    return is_disk_full(error)


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for `--format json` (known before Click parses it)."""
    arguments = [str(a) for a in argv]
    return "--format=json" in arguments or any(
        a == "--format" and b == "json" for a, b in zip(arguments, arguments[1:], strict=False))
