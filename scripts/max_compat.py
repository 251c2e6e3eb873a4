"""What the installed MAX accepts, measured once per MAX version and CPU: the one MAX-compatibility module.

Each constant names the MAX version and the CPU it was checked on, and how it
was found (a benchmark under ``tests/``, or the kernel source). Tools read the
constants; none of them measures at run time. Pure Python: imports neither
torch nor max.

Sliding windows. MAX 26.7's CPU flash attention applies its native
``SLIDING_WINDOW_CAUSAL_MASK`` to vectors of scores, and the mask refuses at
compile time any vector wider than the window ("SIMD width of sliding window
mask must be <= window size"). The CPU kernel's softmax pass reads a row of
scores in vectors of 8 x the SIMD width of the attention dtype (the unroll
factor of MAX's ``map_reduce``), so the smallest window that compiles is
8 x (vector register bytes / dtype bytes): 128 for float32 on AVX-512.
A port that builds its own mask is not bound by this.

MAX internals. The tools' uses of MAX modules that are not its public API
(layer hooks, the KV-cache manager, memory plans, pipeline arguments) are
imported only through ``internal(name)``, from the ``INTERNALS`` table, so a
MAX upgrade has one table to re-check.
"""

from __future__ import annotations

import importlib
from typing import Any

CHECKED_MAX_VERSION = "26.7.0"
CHECKED_MAX_RELEASE = "26.7"  # the major.minor form cli_support and the caches compare with

# The CPU the window floor was measured on (tests/bench_sliding_window.py prints these).
MEASURED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16")
# 512-bit vector registers: 64 bytes, 16 float32 lanes.
MEASURED_VECTOR_BYTES = 64

# MAX's map_reduce (used by the CPU attention's softmax pass) unrolls each row by this many vectors;
# the widest vector the sliding-window mask sees is this many SIMD widths.
ATTENTION_MASK_UNROLL = 8

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Smallest sliding window MAX 26.7 compiles with its native mask on the measured CPU, per attention dtype.
# float32: measured with tests/bench_sliding_window.py on 2 shared cores at load 8-9: window 127 refused
# ("mha_mask.mojo:1270:9: constraint failed: SIMD width of sliding window mask must be <= window size", after
# 811 s), window 128 compiled (405 s). The failures at 6 and 16 are below it.
# bfloat16: measured the same way: window 255 refused with the same constraint (510 s), 256 compiled (355 s).
# float16: 8 x 32 lanes by the same kernel rule (not compiled).
SLIDING_WINDOW_FLOOR = {
    dtype: ATTENTION_MASK_UNROLL * MEASURED_VECTOR_BYTES // size for dtype, size in DTYPE_BYTES.items()
}
# Which entries of SLIDING_WINDOW_FLOOR a compile confirmed (the others follow the kernel rule).
SLIDING_WINDOW_FLOOR_MEASURED = ("float32", "bfloat16")


def sliding_window_floor(dtype: str = "float32") -> int:
    """Smallest sliding window MAX compiles with its native mask when attention runs in ``dtype``."""
    if dtype not in SLIDING_WINDOW_FLOOR:
        raise ValueError(f"no sliding-window floor for dtype {dtype!r}; known: {', '.join(SLIDING_WINDOW_FLOOR)}")
    return SLIDING_WINDOW_FLOOR[dtype]


def sliding_window_reason(dtype: str = "float32") -> str:
    """Why a replica's window is the floor, for manifests and error messages."""
    how = "measured" if dtype in SLIDING_WINDOW_FLOOR_MEASURED else "derived from the kernel rule"
    return (f"the smallest window MAX {CHECKED_MAX_VERSION}'s CPU attention compiles with its native sliding-window "
            f"mask in {dtype} ({sliding_window_floor(dtype)}, {how} on {MEASURED_VECTOR_BYTES * 8}-bit vectors): "
            "smaller windows fail to compile ('SIMD width of sliding window mask must be <= window size')")


# name -> (module, attribute or None for the module itself, which tool needs it and why it is not public API).
# Checked on MAX CHECKED_MAX_VERSION; imported lazily, so this module still imports no max.
INTERNALS: dict[str, tuple[str, str | None, str]] = {
    "add_layer_hook": ("max.nn.layer", "add_layer_hook", "layer-diff taps each layer's output during the trace"),
    "layer_module": ("max.nn.layer.layer", None, "layer-diff removes only its own hook from _LAYER_HOOKS (MAX offers "
                                                 "only clear_hooks(), which drops every hook)"),
    "TokenBuffer": ("max.pipelines.context.tokens", "TokenBuffer", "layer-diff builds one request's context by hand"),
    "load_kv_manager": ("max.pipelines.kv_cache.registry", "load_kv_manager",
                        "layer-diff runs the port in-process without the serving stack"),
    "MemoryPlan": ("max.pipelines.lib.memory_estimation", "MemoryPlan", "layer-diff sizes the KV cache itself"),
    "PipelineArgs": ("max.pipelines.lib.pipeline_args", "PipelineArgs",
                     "layer-diff and the gates build a pipeline config without the CLI"),
}


def internal(name: str) -> Any:
    """The MAX internal ``name`` from ``INTERNALS`` (ImportError or AttributeError when MAX moved it)."""
    module_name, attribute, _why = INTERNALS[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
