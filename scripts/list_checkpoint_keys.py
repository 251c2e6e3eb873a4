"""List a checkpoint's tensor names, dtypes and shapes from safetensors headers only.

Works on a Hub ID or local folder and never reads weight bytes: locally it
reads each file's header, on the Hub it uses the safetensors metadata API.
--summary prints tensor count, parameter count, the dominant dtype by
parameter count, sharding and file format. --group collapses layer and
expert indices (model.layers.{0..31}.mlp.up_proj.weight x 32).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

import cli_support
import model_source
from model_source import TensorInfo

EXIT_CODES = {
    1: "not used",
    2: "the weights are not safetensors (.bin, GGUF or none): names cannot be read from headers",
}

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--summary", action="store_true",
                        help="print counts, dominant dtype (by parameters), sharding and format instead of keys")
    parser.add_argument("--group", action="store_true",
                        help="collapse layer/expert indices into one row per pattern")
    parser.add_argument("--prefix", action="append", default=[], metavar="PREFIX",
                        help="only keys starting with PREFIX (repeatable)")
    parser.add_argument("--exclude-prefix", action="append", default=[], metavar="PREFIX",
                        help="drop keys starting with PREFIX (repeatable)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="print at most N rows")
    cli_support.add_json_flag(parser)


@dataclass
class KeyGroup:
    """Tensors whose names differ only in numeric indices."""

    pattern: str
    count: int
    dtypes: list[str]
    shapes: list[list[int]]


def filter_names(tensors: dict[str, TensorInfo], prefixes: list[str], excluded: list[str]) -> list[str]:
    """Sorted tensor names kept by the prefix filters."""
    names = sorted(tensors)
    if prefixes:
        names = [n for n in names if n.startswith(tuple(prefixes))]
    if excluded:
        names = [n for n in names if not n.startswith(tuple(excluded))]
    return names


def _index_range(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def group_keys(tensors: dict[str, TensorInfo], names: list[str]) -> list[KeyGroup]:
    """Collapse numeric name components; the pattern shows each index range."""
    groups: dict[str, dict[str, Any]] = {}
    for name in names:
        indices = [int(m) for m in _INDEX.findall(name)]
        skeleton = _INDEX.sub("#", name)
        group = groups.setdefault(skeleton, {"indices": [set() for _ in indices], "names": []})
        for slot, value in zip(group["indices"], indices):
            slot.add(value)
        group["names"].append(name)
    result = []
    for skeleton, group in groups.items():
        parts = iter(_index_range(s) for s in group["indices"])
        pattern = re.sub("#", lambda _: next(parts), skeleton)
        infos = [tensors[n] for n in group["names"]]
        dtypes = sorted({i.dtype for i in infos})
        shapes = sorted({i.shape for i in infos})
        result.append(KeyGroup(pattern, len(infos), dtypes, [list(s) for s in shapes]))
    return result


def main(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise cli_support.ScriptError("--limit must be at least 1")
    source = model_source.resolve(args.model, args.revision)
    weights = model_source.weight_files(source)
    if weights.format != "safetensors":
        message = (f"{source.display_name} has no safetensors weights (format: {weights.format}); "
                   "key names come from safetensors headers only (see check-walls)")
        if args.json:
            cli_support.print_json({"model": source.display_name, "format": weights.format,
                                    "files": list(weights.files), "error": message, "exit_code": 2})
        prog = getattr(args, "_prog", None) or "list_checkpoint_keys.py"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    tensors = model_source.read_tensor_infos(source, weights)
    base = {"model": source.display_name, "format": weights.format, "sharded": weights.sharded,
            "files": list(weights.files)}
    if args.summary:
        kept = filter_names(tensors, args.prefix, args.exclude_prefix)
        summary = model_source.checkpoint_summary({n: tensors[n] for n in kept})
        if args.json:
            cli_support.print_json({**base, **summary})
            return 0
        print(f"Model: {source.display_name}")
        print(f"Format: {weights.format}, {'sharded into ' + str(len(weights.files)) + ' files' if weights.sharded else 'single file'}")
        print(f"Tensors: {summary['tensor_count']}")
        print(f"Parameters: {summary['parameter_count']:,}")
        print(f"Dominant dtype (by parameters): {summary['dominant_dtype']}")
        print("Parameters by dtype: " + ", ".join(f"{d} {n:,}" for d, n in summary["parameters_by_dtype"].items()))
        return 0
    names = filter_names(tensors, args.prefix, args.exclude_prefix)
    if args.group:
        groups = group_keys(tensors, names)
        shown = groups[: args.limit] if args.limit else groups
        if args.json:
            cli_support.print_json({**base, "total": len(groups), "shown": len(shown), "groups": shown})
            return 0
        for group in shown:
            shape = " | ".join(str(s) for s in group.shapes)
            print(f"{group.pattern} x {group.count}  {'/'.join(group.dtypes)}  {shape}")
        _print_more(len(groups), len(shown), "groups")
        return 0
    shown_names = names[: args.limit] if args.limit else names
    if args.json:
        rows = [{"name": n, "dtype": tensors[n].dtype, "shape": list(tensors[n].shape), "file": tensors[n].file}
                for n in shown_names]
        cli_support.print_json({**base, "total": len(names), "shown": len(rows), "tensors": rows})
        return 0
    for name in shown_names:
        info = tensors[name]
        print(f"{name}  {info.dtype}  {list(info.shape)}")
    _print_more(len(names), len(shown_names), "keys")
    return 0


def _print_more(total: int, shown: int, what: str) -> None:
    if shown < total:
        print(f"... {total - shown} more {what} (raise --limit)")


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
