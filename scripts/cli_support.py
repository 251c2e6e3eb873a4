"""Shared command-line plumbing for the import-model scripts.

Every script exposes ``add_arguments(parser)`` and ``main(args) -> int`` and
declares ``EXIT_CODES`` (the script's meaning of exit codes 1 and 2). This
module turns those into a parser with one error style, runs ``main`` with the
same handling whether the script runs alone or through ``import_model.py``,
and prints JSON for ``--json`` runs, including for exit 3.

Exit codes, the same in every script:
  0 ok, 1 findings or mismatch (review), 2 hard stop, 3 could not run.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import sys
from typing import Any, Callable, Mapping

import max_compat


class ExitCode(enum.IntEnum):
    """The exit codes every script shares."""

    OK = 0
    FINDINGS = 1  # findings or mismatch: review
    STOP = 2  # hard stop: a wall or a blocking gate
    CANNOT_RUN = 3  # bad input, missing model, network, or MAX missing


EXIT_OK = ExitCode.OK
EXIT_FINDINGS = ExitCode.FINDINGS
EXIT_STOP = ExitCode.STOP
EXIT_CANNOT_RUN = ExitCode.CANNOT_RUN

# The MAX releases the MAX-internal parts of the scripts were tested against (max_compat names the release).
TESTED_MAX_VERSIONS = (max_compat.CHECKED_MAX_RELEASE,)


class ScriptError(Exception):
    """An expected failure: bad input, missing model, network, or MAX missing.

    The message is one line; the script exits 3 without a traceback.
    """

    exit_code = EXIT_CANNOT_RUN


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 3, not 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": f"usage: {message}", "exit_code": int(EXIT_CANNOT_RUN)}))
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_CANNOT_RUN)


# The last error boundary: exception types that escape a script's own checks, and how each is
# reported (always exit 3, one line). A script's own ScriptError names the file or field; these
# messages are the fallback for inputs no check anticipated.
UNEXPECTED_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (RecursionError, "input nested too deeply to process"),
    (MemoryError, "out of memory"),
    (UnicodeError, "text that is not valid UTF-8"),
    (OSError, "file or system error"),
    (Exception, "unexpected error (a bug in import-model; please report it)"),
)


def describe_unexpected(exc: BaseException) -> str:
    """One line for an exception no script anticipated, per ``UNEXPECTED_ERRORS``."""
    for kind, label in UNEXPECTED_ERRORS:
        if isinstance(exc, kind):
            detail = " ".join(str(exc).split())[:300]
            return f"{label}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    return type(exc).__name__


def exit_code_epilog(exit_codes: Mapping[int, str]) -> str:
    """Render the exit-code table shown at the end of ``--help``."""
    lines = ["exit codes:", "  0  ok"]
    for code in (EXIT_FINDINGS, EXIT_STOP):
        lines.append(f"  {code}  {exit_codes.get(code, 'not used')}")
    lines.append("  3  could not run (bad input, missing model, network, or MAX missing)")
    return "\n".join(lines)


def build_parser(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    exit_codes: Mapping[int, str],
    parser_class: type[argparse.ArgumentParser] = OneLineParser,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Create the parser for one script (also used for dispatcher subparsers)."""
    parser = parser_class(
        prog=prog,
        description=first_paragraph(description),
        epilog=exit_code_epilog(exit_codes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    add_arguments(parser)
    return parser


def first_paragraph(text: str | None) -> str | None:
    """The first paragraph of a module docstring, for ``--help``."""
    if not text:
        return None
    return text.strip().split("\n\n", 1)[0]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--json`` flag."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of text"
    )


def add_model_arguments(parser: argparse.ArgumentParser, *, trust_remote_code: bool = False) -> None:
    """Add MODEL, ``--revision`` (and optionally ``--trust-remote-code``)."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="Hugging Face Hub ID (org/name), a local model directory, or a path to a config.json",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")
    if trust_remote_code:
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow running the model repo's own Python code (off by default)",
        )


HIGHEST_PORT = 65535  # TCP port numbers are 16-bit; 0 means "any" and is never a server's port


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= HIGHEST_PORT:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..{HIGHEST_PORT}")
    return port


def _finite_positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite {what} above 0")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0 (nan, inf, 0 and negatives are refused)."""
    return _finite_positive(text, "number of seconds")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (nan, inf, 0 and negatives are refused)."""
    return _finite_positive(text, "number")


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def run_main(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``main(args)``, turning expected failures into one stderr line and exit 3."""
    try:
        code = main(args)
        sys.stdout.flush()
    except ScriptError as exc:
        return report_error(str(exc), args, exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) closed stdout: stop quietly, without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SystemExit:
        raise
    except Exception as exc:  # the last boundary: never a traceback, never exit 1 for a crash
        if os.environ.get("IMPORT_MODEL_TRACEBACK"):
            raise
        return report_error(describe_unexpected(exc), args, EXIT_CANNOT_RUN)
    return EXIT_OK if code is None else int(code)


def report_error(message: str, args: argparse.Namespace | None, exit_code: int = EXIT_CANNOT_RUN) -> int:
    """Print a one-line error (and its JSON form under ``--json``); return the exit code."""
    message = " ".join(str(message).split()) or "unknown error"
    if args is not None and getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": int(exit_code)}))
    prog = getattr(args, "_prog", None) or os.path.basename(sys.argv[0]) or "import-model"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return exit_code


def standalone(module_globals: Mapping[str, Any], argv: list[str] | None = None) -> int:
    """Entry point for ``python scripts/<name>.py``: parse, run, return the exit code."""
    prog = os.path.basename(module_globals.get("__file__") or sys.argv[0])
    parser = build_parser(
        prog,
        module_globals.get("__doc__"),
        module_globals["add_arguments"],
        module_globals.get("EXIT_CODES", {}),
    )
    args = parser.parse_args(argv)
    args._prog = prog
    return run_main(module_globals["main"], args)


def print_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    print(json.dumps(document, indent=2, sort_keys=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return str(value)


def max_version() -> str | None:
    """The installed MAX version, read from package metadata without importing MAX."""
    from importlib import metadata

    for dist in ("max", "modular"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def max_package_dir() -> str:
    """Folder of the installed ``max`` package, found without importing it.

    Raises ScriptError (exit 3) when MAX is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("max")
    if spec is None or not spec.submodule_search_locations:
        raise ScriptError("MAX is not installed in this environment (pip install modular==26.7.0)")
    return list(spec.submodule_search_locations)[0]


def warn_if_untested_max() -> str | None:
    """Warn on stderr when the installed MAX is not a version the scripts were tested on."""
    version = max_version()
    if version is None:
        raise ScriptError("MAX is not installed in this environment (pip install modular==26.7.0)")
    if not any(version == v or version.startswith(v + ".") for v in TESTED_MAX_VERSIONS):
        print(
            f"warning: MAX {version} is installed; these scripts were tested on MAX "
            f"{', '.join(TESTED_MAX_VERSIONS)}; MAX internals may differ",
            file=sys.stderr,
        )
    return version
