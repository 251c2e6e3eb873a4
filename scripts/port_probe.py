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

With --fork and several --check flags, this process imports MAX's heavy
modules once (never the port) and forks one child per check; each child
imports the port afresh, runs its check and sends its JSON result back over
a pipe. A child that crashes or overruns --timeout is reported as such, as a
crashed or timed-out fresh process would be.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cli_support
import input_files
import max_compat
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
    parser.add_argument("--check", required=True, choices=CHECKS, action="append",
                        help="which smoke check to run (repeat it with --fork to run several)")
    parser.add_argument("--encoding", default="float32", help="quantization encoding to build for (default float32)")
    parser.add_argument("--fork", action="store_true",
                        help="import MAX once, then run each --check in a forked child that imports the port afresh")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CHECK_TIMEOUT,
                        help=f"with --fork: seconds allowed for each check (default {DEFAULT_CHECK_TIMEOUT:.0f})")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    if args.fork:
        return main_forked(args)
    if len(args.check) != 1:
        raise ScriptError("several --check flags need --fork (a fresh process runs one check)")
    port = port_layout.resolve_port_dir(args.port_dir, "--port-dir")
    source = model_source.resolve(args.model, args.revision)
    document = run_check(args.check[0], port, source, args.encoding)
    if args.json:
        cli_support.print_json(document)
    else:
        print(f"{args.check[0]}: {'pass' if document['passed'] else 'FAIL'}: {document['summary']}")
    return 0 if document["passed"] else 1


def run_check(name: str, port: port_layout.PortDir, source: Any, encoding: str) -> dict[str, Any]:
    """One check's JSON document; a ScriptError (bad input) propagates, the port's own exceptions are findings."""
    try:
        result = RUNNERS[name](port, source, encoding)
    except ScriptError:
        raise
    except Exception as exc:  # the port's own code raised: that is the finding
        result = CheckResult(False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}",
                             {"traceback_tail": _traceback_tail(exc, port.path)})
    return {"check": name, "passed": result.passed, "summary": result.summary, **result.details}


# --- forked checks: MAX imported once, the port imported fresh in each child ----------------

# Seconds allowed for one check; a dry build of a real config takes seconds, a hung one never ends.
DEFAULT_CHECK_TIMEOUT = 900.0
# What every check's port imports anyway; importing them once in the parent (about 9 s for
# max.pipelines) is the time the forked children save. The port itself is never imported here.
PRELOAD_MODULES = ("numpy", "max.driver", "max.dtype", "max.graph", "max.graph.weights", "max.nn",
                   "max.nn.transformer", "max.pipelines", "max.pipelines.lib", "max.pipelines.lib.pipeline_args")
# The checks after a failed import are not run: they import the port too.
FIRST_CHECK = "import"
# Characters of a crashed child's last stderr line kept for its one-line summary.
CRASH_TAIL_CHARS = 300
# Grace after SIGTERM before a timed-out child is killed.
KILL_GRACE_SECONDS = 2.0


def preload_max() -> None:
    """Import MAX's heavy modules (never the port) so forked children start with them loaded."""
    for name in PRELOAD_MODULES:
        importlib.import_module(name)


def main_forked(args: argparse.Namespace) -> int:
    if not hasattr(os, "fork"):
        raise ScriptError("--fork needs os.fork (POSIX); run each --check in its own process instead")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ScriptError(f"--timeout {args.timeout} must be a positive number of seconds")
    port = port_layout.resolve_port_dir(args.port_dir, "--port-dir")
    model_source.resolve(args.model, args.revision)  # bad input is exit 3 before MAX is imported
    started = time.monotonic()
    preload_max()
    preload_seconds = time.monotonic() - started
    names = list(dict.fromkeys(args.check))
    results = []
    for name in names:
        outcome = run_forked(name, args, port)
        results.append(outcome)
        document = outcome.get("document") or {}
        if "error" in document:
            break  # bad input: the caller stops with exit 3
        if name == FIRST_CHECK and not (outcome["status"] == "done" and document.get("passed")):
            break
    document = {"preload_seconds": round(preload_seconds, 2), "results": results}
    if args.json:
        cli_support.print_json(document)
    else:
        for outcome in results:
            doc = outcome.get("document") or {}
            state = ("pass" if doc.get("passed") else "FAIL") if outcome["status"] == "done" else outcome["status"]
            print(f"{outcome['check']}: {state}: {doc.get('summary') or doc.get('error') or outcome.get('detail', '')}")
    errors = [o["document"]["error"] for o in results if "error" in (o.get("document") or {})]
    if errors:  # bad input, as a fresh process reports it: one line on stderr, exit 3
        print(f"{getattr(args, '_prog', None) or 'port_probe.py'}: error: {errors[0]}", file=sys.stderr)
        return cli_support.EXIT_CANNOT_RUN
    passed = all(o["status"] == "done" and o["document"].get("passed") for o in results)
    return 0 if passed and len(results) == len(names) else 1


def run_forked(name: str, args: argparse.Namespace, port: port_layout.PortDir) -> dict[str, Any]:
    """Run one check in a forked child.

    Returns {"check", "status": done | crashed | timeout, "exit", "seconds"} plus the child's
    "document" (done) or a one-line "detail" (crashed, timeout).
    """
    started = time.monotonic()
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(name, args, write_end, err.fileno())  # never returns
        os.close(write_end)
        try:
            payload, timed_out = _read_until(read_end, args.timeout)
        finally:
            os.close(read_end)
        status = _terminate(pid) if timed_out else os.waitpid(pid, 0)[1]
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").strip().splitlines()
    base = {"check": name, "exit": os.waitstatus_to_exitcode(status), "seconds": round(time.monotonic() - started, 2)}
    if timed_out:
        return {**base, "status": "timeout", "detail": f"did not finish in {args.timeout:.0f} s"}
    try:
        document = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        document = None
    if not isinstance(document, dict):
        tail = (lines or ["no output"])[-1]
        return {**base, "status": "crashed", "detail": tail[:CRASH_TAIL_CHARS]}
    return {**base, "status": "done", "document": document}


def _child(name: str, args: argparse.Namespace, result_fd: int, err_fd: int) -> None:
    """Run ``name`` in this forked child, write its JSON document to ``result_fd`` and exit; never returns."""
    code = int(cli_support.EXIT_CANNOT_RUN)
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(err_fd, 1)  # the check's own prints go with its stderr; the result goes over the pipe
        os.dup2(err_fd, 2)
        try:
            port = port_layout.resolve_port_dir(args.port_dir, "--port-dir")
            source = model_source.resolve(args.model, args.revision)
            document = run_check(name, port, source, args.encoding)
            code = 0 if document["passed"] else 1
        except ScriptError as exc:  # as a fresh process reports it: one line, exit 3
            document = {"error": " ".join(str(exc).split()), "exit_code": int(exc.exit_code)}
            code = int(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - the fresh process's last error boundary
            document = {"error": cli_support.describe_unexpected(exc), "exit_code": code}
        view = memoryview(json.dumps(document, default=cli_support._json_default).encode("utf-8"))
        while view:
            view = view[os.write(result_fd, view):]
    except BaseException:  # noqa: BLE001 - a child must never fall back into the parent's code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# prctl(PR_SET_PDEATHSIG, ...) on Linux: the kernel signals this process when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to kill this child if the probe parent dies (killed by the gates' own timeout); best effort."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_until(fd: int, timeout: float) -> tuple[bytes, bool]:
    """Everything written to ``fd`` until the writer closes it, or until ``timeout``; (data, timed_out)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)


def _terminate(pid: int) -> int:
    """SIGTERM a timed-out child, SIGKILL it after a grace period; its wait status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


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

    args = max_compat.internal("PipelineArgs")(model_path=str(source.local_dir or source.repo_id), device_specs=[DeviceSpec.cpu()],
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
