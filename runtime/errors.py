"""Errors a user can cause, and the one way every EdgeKit CLI reports them.

A mistake a user can make (a wrong name, a missing file, a bad shape) raises
`EdgeKitError` with a message that says what was expected, what was received and
what to do. The CLIs turn it into one line on stderr and exit code 2, never a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable

EXIT_USAGE = 2  # same code argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class EdgeKitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the nearest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> EdgeKitError:
    """The error for a name that is not in a registry, listing the valid names."""
    choices = sorted(choices)
    return EdgeKitError(
        f"unknown {kind} '{name}'; expected one of: {', '.join(choices)}.{suggest(name, choices)}"
    )


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI entry point: user errors become one line and exit 2, Ctrl-C exits 130."""
    try:
        return main(argv)
    except EdgeKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
