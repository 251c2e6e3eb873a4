"""Scan a Hugging Face model for walls that block or complicate a MAX port.

Reads config.json (nested configs too), tokenizer_config.json, the file list
and safetensors headers, and the installed transformers' modeling code for
the model type as text (``hf_source``: ALiBi the code applies whatever the
config says is a stop; whether the model is a decoder-only causal LM is
decided from the config and the causal-LM mapping); never weights. Each finding has a stable code, a
level (stop, warn or note) and a one-line message naming the reference to
read. Exit 0 clean (notes only), 1 warnings to review, 2 a hard blocker.
The catalogue itself is the library ``wall_scan`` (gates' preflight uses it too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import cli_support
import model_source
from wall_scan import exit_code_for, scan_walls

EXIT_CODES = {1: "warnings: review them before porting", 2: "a hard blocker: stop until it is resolved or scoped out"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    source = model_source.resolve(args.model, args.revision)
    findings = scan_walls(source)
    code = exit_code_for(findings)
    if args.json:
        cli_support.print_json({"model": source.display_name, "exit_code": code,
                                "findings": [asdict(f) for f in findings]})
        return code
    if not findings:
        print(f"{source.display_name}: no walls found.")
    for finding in findings:
        print(f"{finding.level.upper():<5} {finding.code}: {finding.message}")
    return code


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
