"""Run one pre-serve smoke check of a port inside this (fresh) process and print one JSON result.

The gates run each check in a new Python process so nothing imported by an
earlier check (a stale copy of the port, a native module of the same name) can
hide a failure. Checks: ``import`` (import the port as --custom-architectures
does), ``dry-build`` (build the port's config and graph module from the real
config, load header-only weights strictly and trace the graph, without
compiling), ``key-diff`` (names and shapes from the port's
weight adapter, fed header-only weights, against the weights the graph
declares) and ``weights-format`` (the checkpoint's format has an adapter and
its dtypes suit the encoding). Imports MAX; never reads weight bytes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cli_support
import input_files
import model_source
import port_layout
from cli_support import ScriptError

EXIT_CODES = {1: "the check failed", 2: "not used"}

CHECKS = ("import", "dry-build", "key-diff", "weights-format")

# safetensors dtype name -> max.dtype.DType attribute name.
SAFETENSORS_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--port-dir", required=True, help="the port package folder DIR/<slug>")
    parser.add_argument("--check", required=True, choices=CHECKS, help="which smoke check to run")
    parser.add_argument("--encoding", default="float32", help="quantization encoding to build for (default float32)")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    port = port_layout.resolve_port_dir(args.port_dir, "--port-dir")
    source = model_source.resolve(args.model, args.revision)
    try:
        result = RUNNERS[args.check](port, source, args.encoding)
    except ScriptError:
        raise
    except Exception as exc:  # the port's own code raised: that is the finding
        result = CheckResult(False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}",
                             {"traceback_tail": _traceback_tail(exc, port.path)})
    document = {"check": args.check, "passed": result.passed, "summary": result.summary, **result.details}
    if args.json:
        cli_support.print_json(document)
    else:
        print(f"{args.check}: {'pass' if result.passed else 'FAIL'}: {result.summary}")
    return 0 if result.passed else 1


@dataclass
class CheckResult:
    passed: bool
    summary: str
    details: dict[str, Any]


def _traceback_tail(exc: BaseException, port_path: Path) -> list[str]:
    """The last frames of a traceback, preferring the port's own files."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if str(f.filename).startswith(str(port_path))]
    chosen = (own or frames)[-3:]
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in chosen]


def import_port(port: port_layout.PortDir) -> Any:
    """Import the port the way ``--custom-architectures DIR/<slug>`` does."""
    parent = str(port.path.parent)
    if parent not in sys.path:
        sys.path.append(parent)
    return importlib.import_module(port.slug)


def check_import(port: port_layout.PortDir, source: Any, encoding: str) -> CheckResult:
    module = import_port(port)
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    if origin.parent != port.path:
        return CheckResult(False, f"import {port.slug} loaded {origin}, not the port", {})
    archs = getattr(module, "ARCHITECTURES", None)
    if not isinstance(archs, list) or not archs:
        return CheckResult(False, f"{port.slug}/__init__.py exposes no non-empty ARCHITECTURES list", {})
    names = [getattr(a, "name", None) for a in archs]
    if None in names:
        return CheckResult(False, "an ARCHITECTURES entry has no name (not a SupportedArchitecture)", {})
    return CheckResult(True, f"imported {port.slug}; ARCHITECTURES = {names}", {"architectures": names})


@dataclass
class LoadedPort:
    """The port's architecture and MAX pipeline config, resolved through MAX's registry."""

    arch: Any
    pipeline_config: Any


def load_port(port: port_layout.PortDir, source: Any, encoding: str) -> LoadedPort:
    module = import_port(port)
    from max.driver import DeviceSpec
    from max.pipelines.lib import PipelineConfig
    from max.pipelines.lib.pipeline_args import PipelineArgs

    args = PipelineArgs(model_path=str(source.local_dir or source.repo_id), device_specs=[DeviceSpec.cpu()],
                        quantization_encoding=encoding, max_length=128,
                        runtime={"custom_architectures": [port.custom_architectures_arg]})
    return LoadedPort(module.ARCHITECTURES[0], PipelineConfig.from_args(args))


def header_weights(source: Any) -> dict[str, Any]:
    """Stand-ins for MAX ``Weights`` whose ``.data()`` has the right dtype and shape but no bytes."""
    import numpy as np
    from max.dtype import DType
    from max.graph.weights import WeightData

    class HeaderOnlyWeight:
        def __init__(self, info: model_source.TensorInfo) -> None:
            self.name = info.name
            self.info = info

        def data(self) -> WeightData:
            dtype = getattr(DType, SAFETENSORS_DTYPES.get(self.info.dtype, "uint8"))
            zeros = np.lib.stride_tricks.as_strided(np.zeros((), np.uint8), shape=self.info.shape,
                                                    strides=(0,) * len(self.info.shape))
            return WeightData(zeros, self.name, dtype, list(self.info.shape))

        def exists(self) -> bool:
            return True

    return {name: HeaderOnlyWeight(info) for name, info in model_source.read_tensor_infos(source).items()}


def adapted_state_dict(loaded: LoadedPort, source: Any) -> dict[str, Any]:
    """Run the port's safetensors weight adapter over header-only weights (no weight bytes read)."""
    from max.graph.weights import WeightsFormat

    weights = header_weights(source)
    adapter = (loaded.arch.weight_adapters or {}).get(WeightsFormat.safetensors)
    if adapter is None:
        return {name: w.data() for name, w in weights.items()}
    return adapter(weights, huggingface_config=loaded.pipeline_config.model.huggingface_config,
                   pipeline_config=loaded.pipeline_config)


def build_graph(port: port_layout.PortDir, loaded: LoadedPort, state_dict: dict[str, Any]) -> Any:
    """The port's model config and graph module, built as the pipeline model would (no compile)."""
    from max.nn.transformer import ReturnHiddenStates, ReturnLogits

    pipeline_model = object.__new__(loaded.arch.pipeline_model)
    plan = SimpleNamespace(planned_max_length=128, planned_max_batch_size=1,
                           planned_max_batch_total_tokens=None, footprint=0)
    for attribute, value in {"pipeline_config": loaded.pipeline_config, "devices": [], "memory_plan": plan,
                             "state_dict": state_dict, "return_logits": ReturnLogits.LAST_TOKEN,
                             "return_hidden_states": ReturnHiddenStates.NONE}.items():
        try:
            setattr(pipeline_model, attribute, value)
        except AttributeError:
            pass  # a read-only property of this pipeline model
    model_config = pipeline_model._create_model_config(state_dict)
    graph_class = graph_class_of(port)
    return graph_class(model_config)


def graph_class_of(port: port_layout.PortDir) -> Any:
    """The class in ``<slug>.py`` that the port's other modules build with a config."""
    import ast

    graph_module = importlib.import_module(f"{port.slug}.{port.slug}")
    called: list[str] = []
    for path in sorted(port.path.rglob("*.py")):
        if path.name == f"{port.slug}.py":
            continue
        for node in ast.walk(input_files.parse_python(path, "port file")):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
                called.append(node.func.id)
    for name in called:
        candidate = getattr(graph_module, name, None)
        if isinstance(candidate, type) and candidate.__module__ == graph_module.__name__:
            return candidate
    raise ScriptError(f"no class of {port.slug}.py is built by the port's other modules; cannot find the graph")


def check_dry_build(port: port_layout.PortDir, source: Any, encoding: str) -> CheckResult:
    loaded = load_port(port, source, encoding)
    state = adapted_state_dict(loaded, source)
    graph = build_graph(port, loaded, state)
    declared = graph.raw_state_dict()
    name = type(graph).__name__
    traced = trace_graph(graph, without_computed_buffers(port, state))
    what = "module built and graph traced" if traced else "module built (it has no trace/input_types to trace)"
    return CheckResult(True, f"{name}: {what} from the real config, {len(declared)} weights declared, not compiled",
                       {"graph_class": name, "declared_weights": len(declared), "traced": traced})


def trace_graph(graph: Any, state_dict: dict[str, Any]) -> bool:
    """Load the (header-only) weights strictly and trace the graph (no compile).

    False when the graph module offers no ``trace``/``input_types`` to trace with.
    """
    kv_params = getattr(getattr(graph, "config", None), "kv_params", None) or getattr(graph, "kv_params", None)
    if kv_params is None or not hasattr(graph, "trace") or not hasattr(graph, "input_types"):
        return False
    graph.load_state_dict(state_dict, override_quantization_encoding=True, weight_alignment=1, strict=True)
    graph.trace(*graph.input_types(kv_params))
    return True


def computed_buffer_rule(port: port_layout.PortDir) -> Any:
    """The port's ``is_computed_buffer(name)`` allowlist test (nothing allowed when the port has none)."""
    try:
        return importlib.import_module(f"{port.slug}.computed_buffers").is_computed_buffer
    except ImportError:
        return lambda name: False


def without_computed_buffers(port: port_layout.PortDir, state_dict: dict[str, Any]) -> dict[str, Any]:
    allowed = computed_buffer_rule(port)
    return {name: value for name, value in state_dict.items() if not allowed(name)}


@dataclass
class KeyDiff:
    """How the adapter's tensors and the graph's declared weights disagree."""

    missing: list[str]  # the graph declares it; the adapter does not produce it
    unexpected: list[str]  # the adapter produces it; the graph does not declare it
    shape_mismatches: list[dict[str, Any]]

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)


def diff_keys(produced: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]],
              allowed: Any = lambda name: False) -> KeyDiff:
    """Compare names and shapes; ``allowed(name)`` marks computed buffers either side may lack."""
    missing = sorted(n for n in declared if n not in produced and not allowed(n))
    unexpected = sorted(n for n in produced if n not in declared and not allowed(n))
    shapes = [
        {"name": n, "adapter_shape": list(produced[n]), "graph_shape": list(declared[n])}
        for n in sorted(set(produced) & set(declared)) if tuple(produced[n]) != tuple(declared[n])
    ]
    return KeyDiff(missing, unexpected, shapes)


def check_key_diff(port: port_layout.PortDir, source: Any, encoding: str) -> CheckResult:
    loaded = load_port(port, source, encoding)
    state = adapted_state_dict(loaded, source)
    graph = build_graph(port, loaded, state)
    produced = {name: tuple(int(d) for d in data.shape) for name, data in state.items()}
    declared = {name: tuple(int(d) for d in weight.shape) for name, weight in graph.raw_state_dict().items()}
    diff = diff_keys(produced, declared, computed_buffer_rule(port))
    summary = (f"{len(produced)} adapter tensors match the {len(declared)} graph weights" if diff.clean else
               f"{len(diff.missing)} missing, {len(diff.unexpected)} unexpected, "
               f"{len(diff.shape_mismatches)} shape-mismatched")
    return CheckResult(diff.clean, summary, {"missing": diff.missing, "unexpected": diff.unexpected,
                                             "shape_mismatches": diff.shape_mismatches})


def check_weights_format(port: port_layout.PortDir, source: Any, encoding: str) -> CheckResult:
    files = model_source.weight_files(source)
    module = import_port(port)
    arch = module.ARCHITECTURES[0]
    adapters = {getattr(k, "value", str(k)) for k in (arch.weight_adapters or {})}
    details = {"format": files.format, "files": list(files.files), "adapters": sorted(adapters)}
    if files.format not in ("safetensors", "gguf"):
        return CheckResult(False, f"checkpoint format {files.format!r}: MAX loads safetensors or gguf "
                                  "(convert .bin with transformers save_pretrained)", details)
    if files.format not in adapters and getattr(arch.default_weights_format, "value", None) != files.format:
        return CheckResult(False, f"the port has no weight adapter for {files.format}", details)
    if files.format == "safetensors":
        dtypes = sorted({i.dtype for i in model_source.read_tensor_infos(source).values()})
        unknown = [d for d in dtypes if d not in SAFETENSORS_DTYPES]
        details["dtypes"] = dtypes
        if unknown:
            return CheckResult(False, f"tensor dtypes MAX cannot load: {', '.join(unknown)}", details)
    if encoding not in arch.supported_encodings:
        return CheckResult(False, f"encoding {encoding} is not in the port's supported_encodings", details)
    return CheckResult(True, f"{files.format} ({len(files.files)} file(s)) with an adapter; encoding {encoding} "
                             "supported", details)


RUNNERS = {"import": check_import, "dry-build": check_dry_build, "key-diff": check_key_diff,
           "weights-format": check_weights_format}


if __name__ == "__main__":
    os.environ.setdefault("MAX_SERVE_DISABLE_TELEMETRY", "1")
    sys.exit(cli_support.standalone(globals()))
