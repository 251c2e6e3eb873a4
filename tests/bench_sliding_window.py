"""Benchmark: the smallest sliding window MAX's CPU attention compiles with its native mask.

Not a pytest test (it compiles MAX graphs): run it by hand once per MAX version and CPU, and copy
the measured floor into ``scripts/max_compat.py``::

    python tests/bench_sliding_window.py [--dtype float32] [--windows 127,128]

Each candidate is one compile of the smallest graph that reaches the kernel: a single
``flash_attention_ragged`` op with ``SLIDING_WINDOW_CAUSAL_MASK`` over a paged KV cache (one
layer, one head, head_dim 16). The kernel refuses a window narrower than the widest score vector
its mask sees, and that width is a multiple of the SIMD width, so the candidates are the kernel
rule's prediction (``max_compat``: 8 x the SIMD lanes of the dtype) and one below it; when the
prediction does not compile, the search doubles upward. A compile takes minutes on a loaded
2-core machine, so the default run is two compiles. Prints the CPU flags, the load average, each
compile's verdict and time, and the floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import max_compat  # noqa: E402

# The CPU flags that decide MAX's SIMD width on x86 (printed with the result).
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "amx_bf16")
# Upward doublings tried when the predicted floor does not compile (each is one compile).
MAX_DOUBLINGS = 3
# The refusal MAX 26.7's mask gives for a window below the vector width.
REFUSAL = "SIMD width of sliding window mask must be <= window size"
HEAD_DIM = 16  # a small head: the mask width does not depend on it
DTYPES = {"float32", "bfloat16", "float16"}


def cpu_flags() -> list[str]:
    """The reported flags this CPU has (from /proc/cpuinfo; empty where that does not exist)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in REPORTED_FLAGS if flag in words]


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def build_graph(window: int, dtype_name: str):
    """One flash-attention op with the native sliding-window mask, over a one-layer paged KV cache."""
    from max import tree
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, ops
    from max.nn.attention import MHAMaskVariant
    from max.nn.kernels import flash_attention_ragged
    from max.nn.kv_cache import KVCacheInputsPerDevice, MHAKVCacheParams

    dtype = getattr(DType, dtype_name)
    cpu = DeviceRef.CPU()
    params = MHAKVCacheParams(dtype=dtype, n_kv_heads=1, head_dim=HEAD_DIM, num_layers=1, devices=[cpu])
    kv_types = tree.leaves(params.get_symbolic_inputs())

    def forward(q, row_offsets, *kv):
        collection = tree.leaves(params.unflatten_kv_inputs(iter(kv)), leaf=KVCacheInputsPerDevice)[0]
        return flash_attention_ragged(
            params, input=q.tensor, input_row_offsets=row_offsets.tensor, kv_collection=collection,
            layer_idx=ops.constant(0, DType.uint32, device=cpu),
            mask_variant=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK, scale=HEAD_DIM ** -0.5,
            local_window_size=window)

    inputs = [TensorType(dtype, ["tokens", 1, HEAD_DIM], device=cpu), TensorType(DType.uint32, ["rows"], device=cpu)]
    return Graph(f"sliding_window_{window}", forward, input_types=[*inputs, *kv_types])


def compiles(window: int, dtype_name: str) -> tuple[bool, float, str]:
    """Whether the graph compiles with ``window``, the seconds it took, and the refusal line if any."""
    from max.driver import CPU
    from max.engine import InferenceSession

    graph = build_graph(window, dtype_name)
    start = time.monotonic()
    try:
        InferenceSession(devices=[CPU()]).load(graph)
        return True, time.monotonic() - start, ""
    except Exception as exc:  # noqa: BLE001 - a refused compile is a result here
        return False, time.monotonic() - start, refusal_line(exc)


def refusal_line(exc: BaseException) -> str:
    """The kernel's refusal from an exception or its causes (MAX wraps the compiler's error in a RuntimeError)."""
    seen, lines = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines.extend(str(exc).splitlines())
        exc = exc.__cause__ or exc.__context__
    found = next((ln.strip() for ln in lines if REFUSAL in ln), "")
    return found or "other compile error: " + " | ".join(ln.strip() for ln in lines if ln.strip())[:400]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--windows", help="comma-separated windows to compile instead of the search")
    args = parser.parse_args()
    predicted = max_compat.sliding_window_floor(args.dtype)
    print(f"MAX checked version {max_compat.CHECKED_MAX_VERSION}; dtype {args.dtype}; CPU flags: "
          f"{' '.join(cpu_flags()) or 'unknown'}; cores {os.cpu_count()}; load {load_average()}")
    print(f"kernel rule: floor = {max_compat.ATTENTION_MASK_UNROLL} x SIMD lanes = {predicted}")
    results: dict[int, bool] = {}

    def run(window: int) -> bool:
        ok, seconds, refusal = compiles(window, args.dtype)
        results[window] = ok
        verdict = "compiled" if ok else f"refused ({refusal})"
        print(f"window {window:5d}: {verdict}  [{seconds:.0f} s, load {load_average()}]", flush=True)
        return ok

    if args.windows:
        for window in (int(w) for w in args.windows.split(",")):
            run(window)
    else:
        window = predicted
        for _ in range(MAX_DOUBLINGS + 1):
            if run(window):
                break
            window *= 2
        if results.get(window) and window - 1 not in results:
            run(window - 1)
    passing = sorted(w for w, ok in results.items() if ok)
    failing = sorted(w for w, ok in results.items() if not ok)
    if passing and (passing[0] - 1) in failing:
        print(f"FLOOR {passing[0]} ({args.dtype}): {passing[0] - 1} refused, {passing[0]} compiled")
        return 0
    print(f"no floor bracketed: compiled {passing or 'none'}, refused {failing or 'none'}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
