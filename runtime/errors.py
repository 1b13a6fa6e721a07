"""Errors EdgeKit reports, the exit code each carries, and the one way every CLI prints them.

    EdgeKitError            exit 2: the user's arguments or input are wrong; nothing was done
      UntrustedModel        exit 2: the model needs code to load and --trust-model was not given
    WorkFailed              exit 1: the work itself failed
      ArtifactError         a damaged, tampered or foreign artifact (checksums, schema, paths)
      ConversionError       a converter (TFLite, tf2onnx, onnxruntime) refused the model
      VerificationError     an exported file did not pass its check, a technique broke its promise
      WriteFailed           the output could not be written (disk full, permissions)
      Busy                  another run holds the output directory's lock

Every message says what was expected, what was received and what to do. The CLIs print
it as one `error:` line and exit with the class's code, never with a traceback; the
original cause (a converter's own exception, say) stays attached and `--verbose` (or
EDGEKIT_VERBOSE=1) prints it. Anything that is not an EdgeKitError is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable

from runtime.console import filter_native_stderr

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed: verification, a damaged artifact, a converter, a full disk
EXIT_USAGE = 2  # the user's arguments are wrong (the code argparse uses for a bad command line)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
VERBOSE_ENV = "EDGEKIT_VERBOSE"


class EdgeKitError(Exception):
    """A problem with the user's arguments or input, reported in one line without a traceback."""

    exit_code = EXIT_USAGE


class UntrustedModel(EdgeKitError):
    """A model file that runs code when loaded (Lambda layers, custom objects, a SavedModel graph)."""


class WorkFailed(EdgeKitError):
    """The command was used correctly, but the work failed."""

    exit_code = EXIT_FAILED


class ArtifactError(WorkFailed):
    """An artifact or model file is damaged, tampered with, or not what it claims to be."""


class ConversionError(WorkFailed):
    """A converter refused the model."""


class VerificationError(WorkFailed):
    """A result did not pass its check: an exported file, or a technique's promise in the weights. `rule` names the
    rule it broke; export stores it with the failure (the manifest's `exports.<format>.failed_rule`), and a decision
    reads the rule, never the message."""

    rule = "verification"


class NonFiniteOutputs(VerificationError):
    """Outputs that are NaN or infinite: never a result."""

    rule = "non_finite"


class FloatMismatch(VerificationError):
    """A float file's outputs outside the float tolerance of the reference's."""

    rule = "float_tolerance"


class AccuracyBudgetMissed(VerificationError):
    """A quantized file more than the accuracy budget below the reference (the pipeline then tries int8-mixed)."""

    rule = "accuracy_budget"


class LowAgreement(VerificationError):
    """A quantized file whose top-1 predictions agree with the reference's on too few images."""

    rule = "agreement"


class NotPortable(VerificationError):
    """A file EdgeKit's runtime verifies but the user's own runtime (bare LiteRT, a default onnxruntime session)
    does not run or answers otherwise."""

    rule = "portable"


class Unloadable(VerificationError):
    """The runtime cannot load the file the converter wrote."""

    rule = "unloadable"


class OverDeviceBudget(VerificationError):
    """A microcontroller's file that needs more RAM (arena) or flash than --max-ram/--max-flash."""

    rule = "device_budget"


class TFLMMismatch(VerificationError):
    """TFLM's outputs part from LiteRT's reference kernels by more than TFLM's documented rounding."""

    rule = "tflm_rounding"


class PatternNotMet(VerificationError):
    """A technique's promise not found in the weights (a 2:4 pattern, a cluster count)."""

    rule = "pattern"


class WriteFailed(WorkFailed):
    """The output could not be written (a full disk, a read-only directory)."""


class Busy(WorkFailed):
    """Another EdgeKit run holds the output directory."""


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported like every other error: one line, exit 2."""

    def error(self, message):
        hint = ""
        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:  # `runtime bnch`: name the command that was meant, as every other unknown name gets
            close = difflib.get_close_matches(wrong.group(1), re.findall(r"'([^']*)'", wrong.group(2)), n=1,
                                              cutoff=0.5)
            hint = f"; did you mean '{close[0]}'? See" if close else ""
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}{hint or '; see'} {self.prog} --help.\n")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (converters write pages of them)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def verbose_requested(argv: list[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _print_cause(exc: BaseException) -> None:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        print("(no underlying exception)", file=sys.stderr)
        return
    print("caused by:", file=sys.stderr)
    traceback.print_exception(cause, file=sys.stderr)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI entry point: an EdgeKitError becomes one line and its exit code, Ctrl-C exits 130; libraries'
    start-up chatter is kept off the console unless --verbose (runtime.console)."""
    if not verbose_requested(argv):
        filter_native_stderr()
    try:
        return main(argv)
    except EdgeKitError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        if verbose_requested(argv):
            _print_cause(exc)
        return exc.exit_code
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
