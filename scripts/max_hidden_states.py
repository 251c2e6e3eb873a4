"""Capture a port's per-block hidden states in-process on the CPU (MAX 26.7 internals, wrapped here).

MAX's serving API returns no hidden states, and ``ReturnHiddenStates`` in MAX
26.7 only returns block outputs (``SELECTED_LAYERS`` needs ``target_layer_ids``,
which no pipeline model sets): no embedding, no attention/MLP split, no final
norm. So this module uses MAX's layer hooks (``max.nn.layer.add_layer_hook``):
while the port's graph is traced, a hook records the outputs of the modules
named ``embed_tokens``, ``layers[i]``, their ``self_attn`` and ``mlp``, and
``norm``, and appends them to the root model's outputs. The sublayer outputs
are always captured, so one compiled graph serves runs with and without
``--sublayer``. The port needs no taps. With no hook registered (``max
serve``) the graph is the normal one.

The port is built the way ``max serve`` builds it (its own ``PipelineConfig``,
pipeline model, weight adapter and KV cache manager), with every position's
logits (``ReturnLogits.ALL``), compiled once, and run on one prompt.

Every MAX internal this file touches (the layer-hook list, pipeline-model
constructor arguments, ``TextContext``, the KV cache manager) was checked
against MAX 26.7 only; ``cli_support.warn_if_untested_max()`` warns on others.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cli_support
import max_compat
from cli_support import ScriptError

# Attribute names, first match wins, of the port's (MAX) modules the hook taps. The first
# entries are the names MAX's Transformer / TransformerBlock use. The HF side does not use
# these: hf_hidden_states finds its modules through model_anatomy.resolve_layout.
EMBEDDING_ATTRS = ("embed_tokens", "embedding", "wte")
BLOCK_LIST_ATTRS = ("layers", "blocks", "h")
FINAL_NORM_ATTRS = ("norm", "final_norm", "ln_f")
ATTENTION_ATTRS = ("self_attn", "attention", "attn")
MLP_ATTRS = ("mlp", "feed_forward", "ffn")

# KV cache memory for one short prompt on the CPU.
KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Stage:
    """One comparable point of the forward pass.

    ``name`` is ``embedding``, ``block.<i>``, ``block.<i>.attention``,
    ``block.<i>.mlp``, ``final_norm`` or ``logits``; ``part`` is the same
    without the block index.
    """

    name: str
    block: int | None
    part: str


def stage_order(num_blocks: int, sublayer: bool) -> list[Stage]:
    """Every stage in forward order (sublayers of a block come before its output)."""
    stages = [Stage("embedding", None, "embedding")]
    for index in range(num_blocks):
        if sublayer:
            stages.append(Stage(f"block.{index}.attention", index, "attention"))
            stages.append(Stage(f"block.{index}.mlp", index, "mlp"))
        stages.append(Stage(f"block.{index}", index, "block"))
    stages.append(Stage("final_norm", None, "final_norm"))
    stages.append(Stage("logits", None, "logits"))
    return stages


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def tap_names(root: Any, sublayer: bool) -> dict[int, str]:
    """Map ``id(module)`` to a stage name for the modules of ``root`` that get tapped."""
    names: dict[int, str] = {}
    embedding = _first_attr(root, EMBEDDING_ATTRS)
    if embedding is not None:
        names[id(embedding)] = "embedding"
    for index, block in enumerate(_first_attr(root, BLOCK_LIST_ATTRS) or []):
        names[id(block)] = f"block.{index}"
        if sublayer:
            for part, attrs in (("attention", ATTENTION_ATTRS), ("mlp", MLP_ATTRS)):
                module = _first_attr(block, attrs)
                if module is not None:
                    names[id(module)] = f"block.{index}.{part}"
    norm = _first_attr(root, FINAL_NORM_ATTRS)
    if norm is not None:
        names[id(norm)] = "final_norm"
    return names


def _is_root(layer: Any, outputs: Any) -> bool:
    """The model itself: it holds the block list and returns a tuple (logits, ...)."""
    blocks = _first_attr(layer, BLOCK_LIST_ATTRS)
    return isinstance(outputs, (tuple, list)) and blocks is not None and len(blocks) > 0


class CaptureHook:
    """A MAX layer hook that appends tapped module outputs to the root model's outputs.

    MAX calls it after every layer ``__call__`` while a graph is traced. It
    records each call's output; when the root model returns, it keeps, per
    tapped module, the last output that covers every token (the final norm is
    also called on the last token alone), casts them to float32 and returns the
    root's outputs with those appended. ``stage_names`` then lists what was
    appended, and ``model_output_count`` how many outputs the model had.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[int, Any]] = []
        self.stage_names: list[str] = []
        self.model_output_count: int | None = None
        self.num_blocks = 0

    def __call__(self, layer: Any, args: tuple, kwargs: dict, outputs: Any) -> Any:
        from max.graph import TensorValue

        if self.model_output_count is not None:
            return None  # one capture per trace
        if not _is_root(layer, outputs):
            if isinstance(outputs, TensorValue):
                self._calls.append((id(layer), outputs))
            return None
        return self._extend(layer, tuple(outputs))

    def _extend(self, root: Any, outputs: tuple) -> tuple:
        from max.dtype import DType
        from max.graph import ops

        names = tap_names(root, sublayer=True)
        self.num_blocks = len(_first_attr(root, BLOCK_LIST_ATTRS))
        embedding_rows = next((v.shape[0] for i, v in self._calls if names.get(i) == "embedding"), None)
        chosen: dict[str, Any] = {}
        for layer_id, value in self._calls:
            name = names.get(layer_id)
            if name is None or (embedding_rows is not None and value.shape[0] != embedding_rows):
                continue
            chosen[name] = value  # the last full-sequence call wins
        self.stage_names = list(chosen)
        self.model_output_count = len(outputs)
        extra = tuple(ops.cast(v, DType.float32) if v.dtype != DType.float32 else v for v in chosen.values())
        return outputs + extra


@contextmanager
def layer_hook(hook: Any) -> Iterator[Any]:
    """Register ``hook`` with MAX's layer-hook list for the duration of the block only."""
    max_compat.internal("add_layer_hook")(hook)
    try:
        yield hook
    finally:
        hooks = max_compat.internal("layer_module")._LAYER_HOOKS
        if hook in hooks:
            hooks.remove(hook)


@dataclass
class PortCapture:
    """What one in-process run of the port returned."""

    token_ids: list[int]
    stages: dict[str, Any]  # stage name -> float32 numpy array [tokens, ...]
    logits: Any  # numpy [tokens, vocab]
    num_blocks: int
    build_seconds: float  # pipeline-model construction: weights, graph trace, compile
    run_seconds: float
    missing_taps: list[str] = field(default_factory=list)


def normalized_port_dir(port_dir: str) -> Path:
    """The port folder without a trailing slash, checked to be an importable package."""
    path = Path(str(port_dir).rstrip("/\\") or "/").expanduser().resolve()
    if not path.is_dir():
        raise ScriptError(f"--port-dir {port_dir} is not a folder")
    if not (path / "__init__.py").is_file():
        raise ScriptError(f"--port-dir {port_dir} has no __init__.py; give the port package folder DIR/<slug>")
    if not path.name.isidentifier():
        raise ScriptError(f"--port-dir {port_dir}: {path.name!r} is not an importable module name")
    return path


def import_port_architecture(port_path: Path) -> Any:
    """Import the port as ``--custom-architectures`` does; return its first ``ARCHITECTURES`` entry."""
    import importlib

    parent = str(port_path.parent)
    if parent not in sys.path:
        sys.path.append(parent)
    try:
        module = importlib.import_module(port_path.name)
    except Exception as exc:  # the port's own code failed to import
        raise ScriptError(f"importing the port {port_path.name} failed: {type(exc).__name__}: {exc}") from None
    origin = Path(getattr(module, "__file__", "") or "").resolve().parent
    if origin != port_path:
        raise ScriptError(f"import {port_path.name} loaded {origin}, not the port; rename the port (its slug)")
    archs = getattr(module, "ARCHITECTURES", None)
    if not isinstance(archs, list) or not archs:
        raise ScriptError(f"{port_path.name}/__init__.py exposes no non-empty ARCHITECTURES list")
    return archs[0]


def capture_port(model_path: str, port_dir: str, token_ids: list[int], *, encoding: str = "float32",
                 revision: str | None = None, trust_remote_code: bool = False) -> PortCapture:
    """Build, compile and run the port on ``token_ids``; return every stage's output (sublayers too) and the logits."""
    cli_support.warn_if_untested_max()
    os.environ.setdefault("MAX_SERVE_DISABLE_TELEMETRY", "1")
    port_path = normalized_port_dir(port_dir)
    arch = import_port_architecture(port_path)

    import numpy as np
    from max.driver import CPU, DeviceSpec
    from max.engine import InferenceSession
    from max.graph.weights import load_weights, weights_format
    from max.nn.transformer import ReturnLogits
    from max.pipelines.context import TextContext
    from max.pipelines.lib import PipelineConfig

    TokenBuffer, load_kv_manager, MemoryPlan, PipelineArgs = (max_compat.internal(name) for name in (
        "TokenBuffer", "load_kv_manager", "MemoryPlan", "PipelineArgs"))

    max_length = max(64, len(token_ids) + 1)
    try:
        config = PipelineConfig.from_args(PipelineArgs(
            model_path=str(model_path), quantization_encoding=encoding, device_specs=[DeviceSpec.cpu()],
            max_length=max_length, trust_remote_code=trust_remote_code,
            **({"huggingface_model_revision": revision} if revision else {}),
            runtime={"custom_architectures": [str(port_path)], "max_batch_size": 1}))
    except Exception as exc:
        raise ScriptError(f"MAX rejected the pipeline config: {type(exc).__name__}: {exc}") from None
    weight_paths = config.model.resolved_weight_paths()
    devices = [CPU()]
    session = InferenceSession(devices=devices)
    plan = MemoryPlan(planned_max_batch_size=1, footprint=0, planned_max_length=max_length,
                      available_cache_memory=KV_CACHE_BYTES, device_specs=(DeviceSpec.cpu(),))
    hook = CaptureHook()
    start = time.perf_counter()
    with layer_hook(hook):
        model = arch.pipeline_model(
            pipeline_config=config, session=session, devices=devices, kv_cache_config=config.model.kv_cache,
            weights=load_weights(weight_paths), adapter=(arch.weight_adapters or {}).get(weights_format(weight_paths)),
            return_logits=ReturnLogits.ALL, max_batch_size=1, memory_plan=plan)
    build_seconds = time.perf_counter() - start
    if hook.model_output_count is None:
        raise ScriptError("the port's graph was built without a call to a model holding a 'layers' list; "
                          "layer-diff cannot tap it (see references/layer-by-layer-debugging.md#manual-taps)")

    kv_manager = load_kv_manager(params=model.kv_params, max_batch_size=1, max_seq_len=model.max_seq_len,
                                 session=session, available_cache_memory=KV_CACHE_BYTES, is_di_enabled=False,
                                 model_name=port_path.name, max_num_input_tokens=None)
    context = TextContext(max_length=max_length, tokens=TokenBuffer(np.asarray(token_ids, dtype=np.int64)))
    kv_manager.claim(context)
    kv_manager.alloc(context)
    inputs = model.prepare_initial_token_inputs([[context]], kv_cache_inputs=kv_manager.runtime_inputs([[context]]))
    start = time.perf_counter()
    outputs = model.model.execute(*inputs.buffers)
    run_seconds = time.perf_counter() - start
    kv_manager.release(context)

    arrays = [_to_numpy(value) for value in outputs]
    logits = arrays[1] if hook.model_output_count >= 3 else arrays[0]
    stages = dict(zip(hook.stage_names, arrays[hook.model_output_count:]))
    expected = [s.name for s in stage_order(hook.num_blocks, sublayer=True) if s.name != "logits"]
    return PortCapture(
        token_ids=list(token_ids), stages=stages, logits=logits, num_blocks=hook.num_blocks,
        build_seconds=build_seconds, run_seconds=run_seconds,
        missing_taps=[name for name in expected if name not in stages],
    )


def _to_numpy(value: Any) -> Any:
    buffer = getattr(value, "to_numpy", None)
    if buffer is None:
        raise ScriptError(f"unexpected MAX output type {type(value).__name__}")
    return value.to_numpy()
