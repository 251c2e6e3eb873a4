"""Self-attention on MAX's paged KV cache with its own q/k/v/o biases and RoPE full, partial (leading slice), interleaved or none.

Mirrors transformers:
- modeling_gpt_neox.py ``GPTNeoXAttention`` (biased q/k/v and ``dense``,
  partial rotate-half RoPE on the leading ``rotary_ndims`` of each head);
- modeling_phi.py ``PhiAttention`` (biased projections, partial RoPE);
- modeling_gptj.py ``GPTJAttention`` (partial interleaved RoPE,
  ``rotate_every_two``);
- modeling_gpt2.py ``GPT2Attention`` / modeling_opt.py ``OPTAttention`` (no RoPE:
  positions come from a learned embedding, see positions.py);
- modeling_mistral.py ``MistralAttention`` (sliding-window causal mask).

MAX 26.7 APIs: ``max.nn.linear.Linear`` (``has_bias``),
``max.nn.kernels.rope_ragged``, ``store_k_cache_ragged``,
``store_v_cache_ragged``, ``flash_attention_ragged``,
``max.nn.attention.MHAMaskVariant``, ``max.nn.rotary_embedding.RotaryEmbedding``.

Why not ``AttentionWithRope``: it never gives the output projection a bias,
and ``RaggedAttention`` raises on ``has_bias=True``. Why the slice:
``rope_ragged`` rotates the *trailing* columns when the table is narrower
than the head, and its ``rope_first`` mode needs the interleaved layout, so
the leading ``rotary_dim`` columns are cut out, rotated as a whole and joined
back. Softcapped scores are not supported (the ragged flash kernel has no
softcap argument). Self-contained: imports only max and the standard library.
"""

from __future__ import annotations

from enum import Enum

from max.dtype import DType
from max.graph import TensorValue, ops
from max.nn.attention import MHAMaskVariant
from max.nn.kernels import (
    flash_attention_ragged,
    rope_ragged,
    store_k_cache_ragged,
    store_v_cache_ragged,
)
from max.nn.kv_cache import KVCacheParams, PagedCacheValues
from max.nn.layer import Module
from max.nn.linear import Linear
from max.nn.rotary_embedding import RotaryEmbedding

BLOCK_VERSION = "2"  # 2: norm_qk hook between the projections and RoPE

NO_ROPE_TABLE_WIDTH = 2  # a RoPE table the Transformer base can build when no layer reads it


class RopeLayout(str, Enum):
    """How the rotated columns pair up: halves (GPT-NeoX, Llama) or neighbours (GPT-J)."""

    ROTATE_HALF = "rotate_half"
    INTERLEAVED = "interleaved"


def build_rope(
    *,
    hidden_size: int,
    num_heads: int,
    theta: float,
    max_seq_len: int,
    rotary_dim: int,
    layout: RopeLayout = RopeLayout.ROTATE_HALF,
) -> RotaryEmbedding:
    """The RoPE table ``rotary_dim`` wide; ``rotary_dim == 0`` gives an unused stand-in.

    Size it from ``rotary_dim`` (itself from the config's ``head_dim`` when it
    has one): the llama3 ``create_rope_embedding`` sizes RoPE from
    hidden/heads and ignores ``head_dim``.
    """
    return RotaryEmbedding(
        dim=hidden_size,
        n_heads=num_heads,
        theta=theta,
        max_seq_len=max_seq_len,
        head_dim=rotary_dim if rotary_dim > 0 else NO_ROPE_TABLE_WIDTH,
        interleaved=layout is RopeLayout.INTERLEAVED,
    )


def rope_leading(
    x: TensorValue,
    freqs_cis: TensorValue,
    input_row_offsets: TensorValue,
    cache_lengths: TensorValue,
    rotary_dim: int,
    layout: RopeLayout,
) -> TensorValue:
    """RoPE on the first ``rotary_dim`` columns of each head of ``x`` ``[tokens, heads, head_dim]``."""
    head_dim = int(x.shape[-1])
    if int(freqs_cis.shape[-1]) != rotary_dim:
        raise ValueError(f"RoPE table is {int(freqs_cis.shape[-1])} wide, rotary_dim is {rotary_dim}")
    freqs_cis = ops.cast(freqs_cis, x.dtype).to(x.device)
    leading = x if rotary_dim == head_dim else x[:, :, :rotary_dim]
    rotated = rope_ragged(
        leading,
        input_row_offsets,
        cache_lengths,
        freqs_cis,
        interleaved=layout is RopeLayout.INTERLEAVED,
    )
    if rotary_dim == head_dim:
        return rotated
    return ops.concat([rotated, x[:, :, rotary_dim:]], axis=-1)


class BiasedAttention(Module):
    """Causal (or sliding-window) attention with optional biases on q/k/v and on o.

    Weights load as ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``
    (``.weight`` and, when biased, ``.bias``); a fused checkpoint tensor is
    split in the weight adapter (qkv_split.py). ``rotary_dim == 0`` means no
    RoPE; ``rotary_dim == head_dim`` is full RoPE. ``scale`` defaults to
    ``head_dim ** -0.5``. ``sliding_window`` (tokens, including the current
    one) selects MAX's sliding-window causal mask. A subclass overrides
    ``norm_qk`` for a norm on queries and keys before RoPE (QK norm).
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
        device,
        rotary_dim: int,
        layout: RopeLayout = RopeLayout.ROTATE_HALF,
        qkv_bias: bool = True,
        o_bias: bool = True,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rotary_dim <= head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and between 0 and head_dim {head_dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group into {num_kv_heads} KV heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_params = kv_params
        self.rotary_dim = rotary_dim
        self.layout = layout
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        q_dim = num_heads * head_dim
        kv_dim = num_kv_heads * head_dim
        self.q_proj = Linear(hidden_size, q_dim, dtype, device, has_bias=qkv_bias)
        self.k_proj = Linear(hidden_size, kv_dim, dtype, device, has_bias=qkv_bias)
        self.v_proj = Linear(hidden_size, kv_dim, dtype, device, has_bias=qkv_bias)
        self.o_proj = Linear(q_dim, hidden_size, dtype, device, has_bias=o_bias)

    def norm_qk(self, q: TensorValue, k: TensorValue) -> tuple[TensorValue, TensorValue]:
        """Queries and keys ``[tokens, heads, head_dim]`` before RoPE; unchanged here, a port's QK norm overrides it."""
        return q, k

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        q = self.q_proj(x).reshape((-1, self.num_heads, self.head_dim))
        k = self.k_proj(x).reshape((-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape((-1, self.num_kv_heads, self.head_dim))
        q, k = self.norm_qk(q, k)
        if self.rotary_dim:
            cache_lengths = kv_collection.cache_lengths
            q = rope_leading(q, freqs_cis, input_row_offsets, cache_lengths, self.rotary_dim, self.layout)
            k = rope_leading(k, freqs_cis, input_row_offsets, cache_lengths, self.rotary_dim, self.layout)
        store_k_cache_ragged(kv_collection, k, input_row_offsets, layer_idx)
        store_v_cache_ragged(kv_collection, v, input_row_offsets, layer_idx)
        if self.sliding_window is None:
            mask, window = MHAMaskVariant.CAUSAL_MASK, -1
        else:
            mask, window = MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK, self.sliding_window
        out = flash_attention_ragged(
            self.kv_params,
            input=q,
            input_row_offsets=input_row_offsets,
            kv_collection=kv_collection,
            layer_idx=layer_idx,
            mask_variant=mask,
            scale=self.scale,
            local_window_size=window,
        )
        return self.o_proj(out.reshape((-1, self.num_heads * self.head_dim)))
