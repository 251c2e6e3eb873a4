"""Test driver: run the model-source layer on MODEL and print what it found as JSON.

Tests run it as a subprocess so that ``huggingface_hub`` sees the environment
(HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME, HF_TOKEN) the test set up. It goes
through ``cli_support``, so failures are one stderr line and exit 3, like a
real script.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import cli_support  # noqa: E402
import model_source  # noqa: E402

EXIT_CODES = {1: "not used", 2: "not used"}

# "tensors" is skipped for non-safetensors weights; "headers" always reads them.
STEPS = ("config", "weights", "tensors", "headers", "download")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--steps", default="config,weights,tensors",
                        help=f"comma-separated steps to run, in order, from: {', '.join(STEPS)}")
    parser.add_argument("--no-architectures-check", action="store_true",
                        help="read config.json without requiring an 'architectures' list")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise cli_support.ScriptError(f"unknown step(s): {', '.join(unknown)}")
    source = model_source.resolve(args.model, args.revision)
    report: dict = {
        "local": source.is_local,
        "repo_id": source.repo_id,
        "revision": source.revision,
        "name": source.name,
    }
    weights = None
    if "config" in steps:
        config = model_source.read_config(source, require_architectures=not args.no_architectures_check)
        report["config"] = config
        report["normalized"] = asdict(model_source.normalize_config(config))
    if {"weights", "tensors", "headers", "download"} & set(steps):
        weights = model_source.weight_files(source)
        report["weights"] = asdict(weights)
    if "download" in steps:
        report["downloaded"] = [str(source.fetch(name).name) for name in weights.files]
    if "headers" in steps or ("tensors" in steps and weights.format == "safetensors"):
        tensors = model_source.read_tensor_infos(source, weights)
        report["tensors"] = {name: [t.dtype, list(t.shape), t.file] for name, t in sorted(tensors.items())}
        report["summary"] = model_source.checkpoint_summary(tensors)
    cli_support.print_json(report)
    return 0


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
