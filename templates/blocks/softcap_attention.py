"""Self-attention with soft-capped scores, a custom score scale and a per-layer causal or sliding-window mask, formed with graph ops over MAX's paged KV cache.

Mirrors transformers: modeling_gemma2.py ``Gemma2Attention`` with
``eager_attention_forward``: scores ``q . k * scale`` (``scale`` is
``query_pre_attn_scalar ** -0.5`` there), then ``cap * tanh(scores / cap)``
(``attn_logit_softcapping``), then the causal mask, narrowed to the last
``sliding_window`` keys on ``"sliding_attention"`` layers (masking_utils.py
``sliding_window_overlay``: key ``j`` is seen by query ``i`` when ``i - window
< j <= i``), softmax in float32, the weighted sum of v and ``o_proj``. RoPE
covers the whole head (rotate-half, or interleaved pairs).

MAX 26.7 APIs: ``max.nn.linear.Linear``, ``max.nn.kernels.rope_ragged``,
``store_k_cache_ragged``, ``store_v_cache_ragged``,
``kv_cache_gather_rows_ragged`` (``KEY_CACHE_INDEX`` / ``VALUE_CACHE_INDEX``),
``ops.range``, ``ops.repeat_interleave``, ``ops.shape_to_tensor``,
``ops.max``, ``ops.min``, ``ops.where``, ``ops.matmul``, ``ops.tanh``,
``ops.softmax``, ``TensorValue.rebind``.

Why not ``flash_attention_ragged``: it has no softcap argument, so the scores
are formed here. The gather kernel reads caches with ONE head per slot, so the
port's ``KVCacheParams`` must pack every KV head into one slot:
``n_kv_heads=1`` and ``head_dim=num_kv_heads * head_dim``
(``packed_kv_cache_shape``). Each query token gathers the rows ``0 ..
context - 1`` of its own request (``context`` = the longest cached-plus-new
length in the batch); a slot past the token's own position is clamped to that
position (always stored, so inside the request's pages) and masked. Memory is
``tokens x context x num_kv_heads x head_dim`` per layer: meant for the CPU
replicas and small models, not long contexts. Self-contained: imports only max
and the standard library (the position formula is positions.py
``token_positions``, repeated here).
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, ops
from max.nn.kernels import (
    KEY_CACHE_INDEX,
    VALUE_CACHE_INDEX,
    kv_cache_gather_rows_ragged,
    rope_ragged,
    store_k_cache_ragged,
    store_v_cache_ragged,
)
from max.nn.kv_cache import KVCacheParams, PagedCacheValues
from max.nn.layer import Module
from max.nn.linear import Linear

BLOCK_VERSION = "1"

PACKED_KV_HEADS = 1  # kv_cache_gather_rows_ragged refuses a cache with more than one head per slot
CONTEXT_DIM = "softcap_attention_context"  # symbolic length of the gathered keys (longest context in the batch)
MASKED_SCORE = -1.0e30  # added where a key is hidden; far below any capped score, still finite in float32


def packed_kv_cache_shape(num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """``(n_kv_heads, head_dim)`` for the port's ``KVCacheParams``: every KV head packed into one slot."""
    return PACKED_KV_HEADS, num_kv_heads * head_dim


def token_positions(input_row_offsets: TensorValue, cache_lengths: TensorValue, total_tokens) -> TensorValue:
    """int64 absolute position of every token of a ragged batch: index in its sequence plus its cached length."""
    offsets = input_row_offsets.cast(DType.int64)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    cached = cache_lengths.cast(DType.int64).rebind(starts.shape)
    shift = ops.repeat_interleave(cached - starts, lengths, axis=0, out_dim=total_tokens)
    stop = ops.shape_to_tensor([total_tokens])[0]
    flat_index = ops.range(0, stop, 1, out_dim=total_tokens, dtype=DType.int64, device=input_row_offsets.device)
    return flat_index + shift


class SoftcapAttention(Module):
    """Causal attention ``softmax(mask(cap * tanh(scale * q k^T / cap))) v`` on a packed paged KV cache.

    Weights load as ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``
    (``.weight``, and ``.bias`` when biased). ``scale`` defaults to
    ``head_dim ** -0.5``; ``softcap=None`` skips the cap; ``sliding_window``
    (keys seen, the current one included) narrows the causal mask, ``None`` is
    a global layer. ``kv_params`` must come from ``packed_kv_cache_shape``.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kv_params: KVCacheParams,
        dtype: DType,
        device: DeviceRef,
        interleaved_rope: bool = False,
        qkv_bias: bool = False,
        o_bias: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group into {num_kv_heads} KV heads")
        expected = packed_kv_cache_shape(num_kv_heads, head_dim)
        if (kv_params.n_kv_heads, kv_params.head_dim) != expected:
            raise ValueError(
                f"SoftcapAttention needs a packed KV cache (n_kv_heads, head_dim) = {expected}, got "
                f"({kv_params.n_kv_heads}, {kv_params.head_dim}): build KVCacheParams with packed_kv_cache_shape"
            )
        if softcap is not None and softcap <= 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.interleaved_rope = interleaved_rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.sliding_window = sliding_window
        q_dim = num_heads * head_dim
        kv_dim = num_kv_heads * head_dim
        self.q_proj = Linear(hidden_size, q_dim, dtype, device, has_bias=qkv_bias)
        self.k_proj = Linear(hidden_size, kv_dim, dtype, device, has_bias=qkv_bias)
        self.v_proj = Linear(hidden_size, kv_dim, dtype, device, has_bias=qkv_bias)
        self.o_proj = Linear(q_dim, hidden_size, dtype, device, has_bias=o_bias)

    def _rope(self, x: TensorValue, freqs_cis, input_row_offsets, cache_lengths) -> TensorValue:
        freqs_cis = ops.cast(freqs_cis, x.dtype).to(x.device)
        if int(freqs_cis.shape[-1]) != self.head_dim:
            raise ValueError(f"RoPE table is {int(freqs_cis.shape[-1])} wide, the head is {self.head_dim}")
        return rope_ragged(x, input_row_offsets, cache_lengths, freqs_cis, interleaved=self.interleaved_rope)

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        kv_heads, head_dim = self.num_kv_heads, self.head_dim
        group = self.num_heads // kv_heads
        cache_lengths = kv_collection.cache_lengths
        q = self.q_proj(x).reshape((-1, self.num_heads, head_dim))
        k = self.k_proj(x).reshape((-1, kv_heads, head_dim))
        v = self.v_proj(x).reshape((-1, kv_heads, head_dim))
        q = self._rope(q, freqs_cis, input_row_offsets, cache_lengths)
        k = self._rope(k, freqs_cis, input_row_offsets, cache_lengths)
        packed = (-1, PACKED_KV_HEADS, kv_heads * head_dim)
        store_k_cache_ragged(kv_collection, k.reshape(packed), input_row_offsets, layer_idx)
        store_v_cache_ragged(kv_collection, v.reshape(packed), input_row_offsets, layer_idx)

        tokens = x.shape[0]
        positions = token_positions(input_row_offsets, cache_lengths, tokens)  # [tokens] int64
        context = ops.max(positions, axis=0).reshape(()) + 1  # longest cached-plus-new length in the batch
        slots = ops.range(0, context, 1, out_dim=CONTEXT_DIM, dtype=DType.int64, device=x.device)  # [context]
        query_pos = positions.reshape((-1, 1))  # [tokens, 1]
        key_pos = slots.reshape((1, -1))  # [1, context]
        clamped = ops.min(key_pos, query_pos).cast(DType.int32)  # [tokens, context], inside each request
        visible = key_pos <= query_pos
        if self.sliding_window is not None:
            visible = visible & (key_pos > query_pos - self.sliding_window)

        def gathered(which: int) -> TensorValue:
            rows = kv_cache_gather_rows_ragged(kv_collection, clamped, input_row_offsets, layer_idx,
                                               key_or_value=which)  # [tokens, context, kv_heads * head_dim]
            rows = rows.reshape((tokens, -1, kv_heads, head_dim)).cast(DType.float32)
            return ops.permute(rows, [0, 2, 1, 3])  # [tokens, kv_heads, context, head_dim]

        keys, values = gathered(KEY_CACHE_INDEX), gathered(VALUE_CACHE_INDEX)
        queries = q.cast(DType.float32).reshape((-1, kv_heads, group, head_dim))
        scores = ops.matmul(queries, ops.permute(keys, [0, 1, 3, 2])) * self.scale  # [tokens, kv_heads, group, ctx]
        if self.softcap is not None:
            scores = ops.tanh(scores / self.softcap) * self.softcap
        hidden = ops.broadcast_to(ops.constant(MASKED_SCORE, DType.float32, x.device), scores.shape)
        scores = ops.where(visible.reshape((tokens, 1, 1, -1)), scores, hidden)
        weights = ops.softmax(scores, axis=-1)
        out = ops.matmul(weights, values)  # [tokens, kv_heads, group, head_dim]
        return self.o_proj(out.reshape((-1, self.num_heads * head_dim)).cast(x.dtype))
