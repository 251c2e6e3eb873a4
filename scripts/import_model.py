"""One entry point for every import-model script: ``import_model.py <subcommand> ...``.

Each subcommand is a thin alias for one script in this folder, with the same
flags and exit codes. Only the chosen script is imported, so a metadata-only
subcommand stays as light as its script. A subcommand whose script is not in
this folder is not offered.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import cli_support  # noqa: E402

# Subcommand name -> script module (scripts/<module>.py), in workflow order.
SUBCOMMANDS = {
    "list-archs": "list_native_archs",
    "inspect": "inspect_hf",
    "list-keys": "list_checkpoint_keys",
    "check-walls": "check_walls",
    "tiny": "make_tiny_model",
    "scaffold": "scaffold",
    "audit": "audit_docstrings",
    "gates": "run_oss_gates",
    "serve": "serve_port",
    "compare": "compare_layers",
    "layer-diff": "layer_diff",
    "eval": "run_evals",
    "demo": "demo",
}


def available_subcommands() -> dict[str, str]:
    """The subcommands whose scripts exist in this folder."""
    return {name: module for name, module in SUBCOMMANDS.items() if (SCRIPTS_DIR / f"{module}.py").is_file()}


def _usage(available: dict[str, str]) -> str:
    width = max(len(name) for name in available) if available else 0
    rows = "\n".join(f"  {name.ljust(width)}  scripts/{module}.py" for name, module in available.items())
    return (
        "usage: import_model.py <subcommand> [args ...]\n\n"
        f"{cli_support.first_paragraph(__doc__)}\n\nsubcommands:\n{rows}\n\n"
        "Run 'import_model.py <subcommand> --help' for the subcommand's flags and exit codes."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = available_subcommands()
    if argv and argv[0] in ("-h", "--help"):
        try:
            print(_usage(available))
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    wants_json = "--json" in argv
    fail = argparse.Namespace(json=wants_json, _prog="import_model.py")
    name = argv[0] if argv else None
    if name is None or name.startswith("-"):
        return cli_support.report_error(
            f"no subcommand given; choose from: {', '.join(available)} (see --help)", fail)
    rest = argv[1:]
    if name not in available:
        return cli_support.report_error(
            f"unknown subcommand {name!r}; choose from: {', '.join(available)}", fail)
    module = importlib.import_module(available[name])
    prog = f"import_model.py {name}"
    parser = cli_support.build_parser(
        prog, module.__doc__, module.add_arguments, getattr(module, "EXIT_CODES", {})
    )
    args = parser.parse_args(rest)
    args._prog = prog
    return cli_support.run_main(module.main, args)


if __name__ == "__main__":
    sys.exit(main())
