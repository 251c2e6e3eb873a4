"""Weight-adapter helpers: split fused QKV tensors into q/k/v and transpose Conv1D weights, keeping the declared dtype.

Mirrors transformers' fused layouts:
- concatenated ``[q; k; v]`` rows: modeling_phi3.py ``Phi3Attention.qkv_proj``,
  modeling_gpt2.py ``GPT2Attention.c_attn`` (after the Conv1D transpose),
  modeling_gpt_bigcode.py ``GPTBigCodeAttention.c_attn`` (multi-query: k and v
  one head wide);
- per-head interleaved ``[q_h; k_h; v_h]`` for each head h:
  modeling_gpt_neox.py ``GPTNeoXAttention.query_key_value``,
  modeling_bloom.py ``BloomAttention.query_key_value``;
- grouped ``[q_g1..q_gn; k_g; v_g]`` for each KV group g: modeling_falcon.py
  ``FalconAttention.query_key_value`` (``new_decoder_architecture``); with one
  query head per group it is the per-head interleaved layout;
- ``pytorch_utils.Conv1D`` stores ``[in, out]``: transpose to MAX's ``[out, in]``.

MAX 26.7 APIs: ``max.graph.weights.WeightData``, ``max.graph.Shape``.
Trap: ``WeightData.from_numpy(arr.T)`` re-reads the dtype from the array; in the
header-only dry-build the array is a uint8 stand-in, so the graph later fails
with "had different dtype (expected=DType.float32, actual=DType.uint8)". Every
helper here keeps the source ``WeightData``'s declared dtype. numpy has no
bfloat16: cast bfloat16 checkpoints (``WeightData.astype``) before splitting.
Self-contained: imports only max, numpy and the standard library.
"""

from __future__ import annotations

import numpy as np
from max.graph import Shape
from max.graph.weights import WeightData

BLOCK_VERSION = "1"

QKV_PARTS = 3  # query, key, value


def as_array(data: WeightData) -> np.ndarray:
    """The tensor of ``data`` as a numpy array (a view when possible)."""
    payload = data.data
    if isinstance(payload, np.ndarray):
        return payload
    return np.from_dlpack(payload)


def like(source: WeightData, arr: np.ndarray, name: str) -> WeightData:
    """``arr`` as WeightData named ``name`` with ``source``'s declared dtype (not the array's)."""
    arr = np.ascontiguousarray(arr)
    return WeightData(arr, name, source.dtype, Shape(arr.shape), source.quantization_encoding)


def conv1d_transposed(data: WeightData, name: str | None = None) -> WeightData:
    """A Conv1D ``[in, out]`` weight as ``[out, in]``, dtype kept (dry-build safe)."""
    arr = as_array(data)
    if arr.ndim != 2:
        raise ValueError(f"{data.name}: a Conv1D weight is 2-D, got shape {arr.shape}")
    return like(data, arr.T, name or data.name)


def split_concatenated(
    arr: np.ndarray, q_rows: int, kv_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[q; k; v]`` along axis 0 (weight ``[rows, in]`` or bias ``[rows]``)."""
    if arr.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"fused QKV has {arr.shape[0]} rows, expected {q_rows} + 2 * {kv_rows}")
    return arr[:q_rows], arr[q_rows : q_rows + kv_rows], arr[q_rows + kv_rows :]


def split_grouped(
    arr: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows laid out per KV group as ``[q_1..q_n, k, v]`` (n = heads per group), each ``head_dim`` rows."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group into {num_kv_heads} KV heads")
    per_group = num_heads // num_kv_heads
    rows = num_kv_heads * (per_group + 2) * head_dim
    if arr.shape[0] != rows:
        raise ValueError(f"fused QKV has {arr.shape[0]} rows, expected {rows}")
    rest = arr.shape[1:]
    groups = arr.reshape((num_kv_heads, per_group + 2, head_dim, *rest))
    q = groups[:, :per_group].reshape((num_heads * head_dim, *rest))
    k = groups[:, per_group].reshape((num_kv_heads * head_dim, *rest))
    v = groups[:, per_group + 1].reshape((num_kv_heads * head_dim, *rest))
    return q, k, v


def split_per_head_interleaved(
    arr: np.ndarray, num_heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows laid out per head as ``[q_h, k_h, v_h]`` (GPT-NeoX, Bloom)."""
    return split_grouped(arr, num_heads, num_heads, head_dim)


def split_fused(
    data: WeightData,
    names: tuple[str, str, str],
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, WeightData]:
    """Name the three parts of a split (from one of the ``split_*`` helpers), dtype kept."""
    if len(names) != QKV_PARTS or len(parts) != QKV_PARTS:
        raise ValueError("a QKV split has exactly three parts")
    return {name: like(data, part, name) for name, part in zip(names, parts)}
