"""What the five command lines share: exit codes, one-line errors, --version, help that shows defaults, and
the quick switch of the README.

It lives in ``engines`` because every CLI imports that package (imports run edge_inspect -> edge_daemon ->
trainer -> engines) and it needs nothing but the standard library.

Exit codes of edge-train, edge-engines, edge-daemon, edge-bench and edge-inspect (README, docs/errors.md):

    0    ok
    1    runtime failure: the input was fine but the work failed (a child process died, an engine failed,
         frames went unanswered, a check found a problem)
    2    bad input or config: a missing or corrupt file, an invalid option or config key, a port in use,
         a backend this machine cannot run
    130  interrupted: Ctrl-C or SIGTERM (whatever was finished is kept; see each command)

An anticipated failure prints one line on stderr, ``<prog> <command>: error: <problem>; fix: <what to do>``,
and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "QUICK_ENV", "CliError", "Parser",
           "DefaultsFormatter", "RawDefaultsFormatter", "version", "add_version", "one_line", "error_line",
           "run_cli", "quick_mode", "quick_note", "positive_int", "non_negative_int", "positive_float",
           "fraction"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
QUICK_ENV = "EDGE_INSPECT_QUICK"
MAX_MESSAGE = 600


class CliError(Exception):
    """An anticipated failure with its fix and exit code (EXIT_USAGE unless said otherwise)."""

    def __init__(self, problem: str, fix: str = "", code: int = EXIT_USAGE):
        super().__init__(problem)
        self.fix, self.code = fix, code


# ---- help and parsing -----------------------------------------------------------------------------------


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option that has a default its help does not state already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS)
                or "default" in text.lower() or isinstance(action, argparse._VersionAction)):
            return text
        if isinstance(default, list) and not default:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """DefaultsFormatter that keeps the description's line breaks (module docstrings as descriptions)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line naming the fix (exit 2), with defaults shown in --help.

    Sub-parsers made with ``add_subparsers`` are of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(error_line(self.prog, message, f"see `{self.prog} --help`"), file=sys.stderr)
        sys.exit(EXIT_USAGE)


def version() -> str:
    """The installed distribution's version (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("edge-inspect")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"{parser.prog} {version()}",
                        help="print the version and exit")


# ---- argument types (argparse turns their ValueError into a one-line usage error) -------------------------


def _number(kind, text: str, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and v != float("inf"), "a number > 0")


def fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


# ---- errors -----------------------------------------------------------------------------------------------


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(prog: str, problem: str, fix: str = "") -> str:
    line = f"{prog}: error: {one_line(problem)}"
    return f"{line}; fix: {one_line(fix, 300)}" if fix else line


def _fix_for(exc: BaseException, fixes: dict[type, str]) -> str:
    if isinstance(exc, CliError):
        return exc.fix
    for kind in type(exc).__mro__:
        if kind in fixes:
            return fixes[kind]
    return ""


def _code_for(exc: BaseException, codes: dict[type, int]) -> int | None:
    """The exit code of an anticipated exception, None for one that is a bug."""
    if isinstance(exc, CliError):
        return exc.code
    for kind in type(exc).__mro__:
        if kind in codes:
            return codes[kind]
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return EXIT_USAGE  # a path the user gave
    if isinstance(exc, ValueError):
        return EXIT_USAGE  # every input/config error of the project is a ValueError (ConfigError, ...)
    if isinstance(exc, (OSError, RuntimeError)):
        return EXIT_FAILURE
    return None


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def run_cli(prog: str, func: Callable[[], int | None], *, codes: dict[type, int] | None = None,
            fixes: dict[type, str] | None = None, interrupted: str = "interrupted") -> int:
    """Run ``func`` under the shared error style: SIGTERM unwinds like Ctrl-C (finally blocks run), an
    anticipated exception becomes one line and its exit code, an interrupt prints ``interrupted`` and 130.

    ``codes`` / ``fixes`` map exception classes (matched along the MRO) to exit codes / fix texts."""
    codes, fixes = codes or {}, fixes or {}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = _code_for(exc, codes)
        if code is None:
            raise
        print(error_line(prog, str(exc) or type(exc).__name__, _fix_for(exc, fixes)), file=sys.stderr)
        return code
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)  # as it was (callers in tests, other tools)


# ---- the quick switch -------------------------------------------------------------------------------------


def quick_mode() -> bool:
    """True when EDGE_INSPECT_QUICK is set to a true value: commands run with tiny settings (README, CI)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def quick_note(prog: str, what: str) -> None:
    """Say on stderr that the quick switch changed something: never silently."""
    print(f"{prog}: {QUICK_ENV}=1: {what}", file=sys.stderr, flush=True)
