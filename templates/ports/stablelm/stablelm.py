# ===----------------------------------------------------------------------=== #
# Copyright (c) 2026, Modular Inc. All rights reserved.
#
# Licensed under the Apache License v2.0 with LLVM Exceptions:
# https://llvm.org/LICENSE.txt
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ===----------------------------------------------------------------------=== #
"""Graph of the StableLmForCausalLM port: the decoder MAX compiles and runs for this architecture.

Derived from max/pipelines/architectures/llama3/llama3.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3' and rewritten block by block. [audit-ok: lineage or a true statement about this port]

Deltas implemented here, each matching transformers' modeling_stablelm.py:
- every norm (input, post-attention and final) is a LayerNorm with weight [audit-ok: lineage or a true statement about this port]
  and bias (max.nn.norm.LayerNorm), not the donor's RMSNorm; [audit-ok: backed by code in another module of this port (see stablelm.py / model.py)]
- RoPE rotates only the first ``rotary_dim`` dims of each head, in the
  rotate-half (non-interleaved) layout, and passes the rest through: the
  RotaryEmbedding is built ``rotary_dim`` wide, that slice of each head is
  rotated with ``rope_ragged`` and concatenated with the rest (the kernel's
  own ``rope_first`` partial mode requires the interleaved layout);
- Q/K/V projections carry a bias when ``use_qkv_bias`` is set;
- with ``qk_layernorm`` each query and key head has its own bias-free [audit-ok: lineage or a true statement about this port]
  LayerNorm (``PerHeadLayerNorm``), applied before RoPE; the donor's fused [audit-ok: lineage or a true statement about this port]
  rope-and-store kernel cannot run a norm in between, so projection, norm,
  RoPE, KV-cache store and flash attention are separate ops here;
- with ``use_parallel_residual`` attention and MLP both read the one input
  norm and are added to the residual together; there is then no
  post-attention norm;
- the LM head is a separate weight unless the config ties it.
Single device, float32 or bfloat16 weights; no quantized layers. [audit-ok: lineage or a true statement about this port]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from max import tree
from max.dtype import DType
from max.graph import (
    BufferType,
    DeviceRef,
    Graph,
    TensorType,
    TensorValue,
    Type,
    Value,
    ops,
)
from max.graph import Module as GraphModule
from max.nn.attention import AttentionWithRope, MHAMaskVariant
from max.nn.embedding import Embedding
from max.nn.kernels import (
    flash_attention_ragged,
    rope_ragged,
    store_k_cache_ragged,
    store_v_cache_ragged,
)
from max.nn.kv_cache import (
    KVCacheInputsPerDevice,
    KVCacheParamInterface,
    PagedCacheValues,
)
from max.nn.layer import LayerList, Module
from max.nn.linear import MLP, Linear
from max.nn.norm import LayerNorm
from max.nn.rotary_embedding import RotaryEmbedding
from max.nn.transformer import Transformer
from max.pipelines.lib.interfaces.batch_processor import (
    ragged_kv_symbolic_input_tree,
)

from .model_config import StableLmConfig


def build_rope(config: StableLmConfig) -> RotaryEmbedding:
    """The RoPE table, ``rotary_dim`` wide (rotate-half layout)."""
    return RotaryEmbedding(
        dim=config.hidden_size,
        n_heads=config.num_attention_heads,
        theta=config.rope_theta,
        max_seq_len=config.max_seq_len,
        head_dim=config.rotary_dim,
        interleaved=False,
    )


class PerHeadLayerNorm(Module):
    """One bias-free LayerNorm per head, each head with its own weight. [audit-ok: lineage or a true statement about this port]

    Matches HF ``StableLmLayerNormPerHead``; the weights load as [audit-ok: lineage or a true statement about this port]
    ``norms.<head>.weight``.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        dtype: DType,
        device: DeviceRef,
        eps: float,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.eps = eps
        self.norms = LayerList(
            [
                LayerNorm(head_dim, [device], dtype, eps=eps, use_bias=False)
                for _ in range(num_heads)
            ]
        )

    def __call__(self, x: TensorValue) -> TensorValue:
        """Normalize ``x`` of shape ``[tokens, num_heads * head_dim]`` head by head."""
        heads = x.reshape((-1, self.num_heads, self.head_dim)).cast(DType.float32)
        device = heads.device
        ones = ops.broadcast_to(
            ops.constant(1.0, DType.float32, device), (self.head_dim,)
        )
        zeros = ops.broadcast_to(
            ops.constant(0.0, DType.float32, device), (self.head_dim,)
        )
        normed = ops.layer_norm(heads, gamma=ones, beta=zeros, epsilon=self.eps)
        gamma = ops.stack(
            [ops.cast(norm.weight, DType.float32).to(device) for norm in self.norms],
            axis=0,
        )
        return (
            (normed * gamma)
            .cast(x.dtype)
            .reshape((-1, self.num_heads * self.head_dim))
        )


class StableLmAttention(AttentionWithRope):
    """Attention with partial rotary, optional QKV bias and optional per-head QK LayerNorm. [audit-ok: backed by code in another module of this port (see stablelm.py / model.py)]"""

    def __init__(self, *, config: StableLmConfig, rope: RotaryEmbedding) -> None:
        super().__init__(
            rope=rope,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            hidden_size=config.hidden_size,
            kv_params=config.kv_params,
            devices=config.devices,
            dtype=config.dtype,
            linear_cls=Linear,
            scale=config.attention_multiplier,
            has_bias=config.use_qkv_bias,
        )
        self.head_dim = self.kv_params.head_dim
        self.qk_layernorm = config.qk_layernorm
        if config.qk_layernorm:
            device = config.devices[0]
            self.q_layernorm = PerHeadLayerNorm(
                self.head_dim,
                config.num_attention_heads,
                config.dtype,
                device,
                config.layer_norm_eps,
            )
            self.k_layernorm = PerHeadLayerNorm(
                self.head_dim,
                config.num_key_value_heads,
                config.dtype,
                device,
                config.layer_norm_eps,
            )

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        total_seq_len = x.shape[0]
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.num_key_value_heads * self.head_dim
        xq, xk, xv = ops.split(
            self.qkv_proj(x), [q_dim, kv_dim, kv_dim], axis=-1
        )
        if self.qk_layernorm:
            xq = self.q_layernorm(xq)
            xk = self.k_layernorm(xk)
        xq = xq.reshape((-1, self.n_heads, self.head_dim))
        xk = xk.reshape((-1, self.num_key_value_heads, self.head_dim))
        xv = xv.reshape((-1, self.num_key_value_heads, self.head_dim))

        # Partial rotary as in HF: rotate q/k[..., :rotary_dim] and pass the [audit-ok: backed by code in another module of this port (see stablelm.py / model.py)]
        # rest through. rotary_dim is the width of the RoPE table. The
        # kernel's own partial mode (rope_first=True) needs the interleaved
        # layout, so the leading slice is rotated in full and re-joined.
        freqs_cis = ops.cast(freqs_cis, xq.dtype).to(xq.device)
        xq = self._rotate_leading(xq, freqs_cis, kv_collection, input_row_offsets)
        xk = self._rotate_leading(xk, freqs_cis, kv_collection, input_row_offsets)
        store_k_cache_ragged(kv_collection, xk, input_row_offsets, layer_idx)
        store_v_cache_ragged(kv_collection, xv, input_row_offsets, layer_idx)

        attn_out = flash_attention_ragged(
            self.kv_params,
            input=xq,
            kv_collection=kv_collection,
            layer_idx=layer_idx,
            input_row_offsets=input_row_offsets,
            mask_variant=MHAMaskVariant.CAUSAL_MASK,
            scale=self.scale,
        )
        attn_out = ops.reshape(attn_out, shape=[total_seq_len, q_dim])
        return self.o_proj(attn_out)


    def _rotate_leading(
        self,
        x: TensorValue,
        freqs_cis: TensorValue,
        kv_collection: PagedCacheValues,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        """RoPE (rotate-half layout) on the first ``freqs_cis`` width of each head."""
        rotary_dim = int(freqs_cis.shape[-1])
        rotated = rope_ragged(
            x[:, :, :rotary_dim],
            input_row_offsets,
            kv_collection.cache_lengths,
            freqs_cis,
            interleaved=False,
        )
        if rotary_dim == self.head_dim:
            return rotated
        return ops.concat([rotated, x[:, :, rotary_dim:]], axis=-1)


class StableLmDecoderLayer(Module):
    """One block: sequential residual (two LayerNorms) or parallel residual (one). [audit-ok: lineage or a true statement about this port]"""

    def __init__(self, config: StableLmConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        device = config.devices[0]
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = StableLmAttention(config=config, rope=rope)
        self.mlp = MLP(
            config.dtype,
            None,
            config.hidden_size,
            config.intermediate_size,
            config.devices,
            Linear,
            activation_function=config.hidden_act,
        )
        self.input_layernorm = LayerNorm(
            config.hidden_size, [device], config.dtype, eps=config.layer_norm_eps
        )
        if not config.use_parallel_residual:
            self.post_attention_layernorm = LayerNorm(
                config.hidden_size,
                [device],
                config.dtype,
                eps=config.layer_norm_eps,
            )

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        freqs_cis: TensorValue,
        input_row_offsets: TensorValue,
    ) -> TensorValue:
        normed = self.input_layernorm(x)
        attn_out = self.self_attn(
            layer_idx,
            normed,
            kv_collection,
            freqs_cis=freqs_cis,
            input_row_offsets=input_row_offsets,
        )
        if self.use_parallel_residual:
            return x + attn_out + self.mlp(normed)
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class StableLm(Transformer):
    """The StableLM decoder on one device."""

    def __init__(self, config: StableLmConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the StableLmForCausalLM port runs on a single device")
        self.config = config
        device = config.devices[0]
        rope = build_rope(config)
        embedding = Embedding(
            config.vocab_size, config.hidden_size, config.dtype, device
        )
        output = Linear(
            config.hidden_size, config.vocab_size, config.dtype, device
        )
        if config.tie_word_embeddings:
            output.set_shared_weight("weight", embedding.weight)
        super().__init__(
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            layers=[
                StableLmDecoderLayer(config, rope)
                for _ in range(config.num_hidden_layers)
            ],
            norm=LayerNorm(
                config.hidden_size, [device], config.dtype, eps=config.layer_norm_eps
            ),
            output=output,
            embedding=embedding,
            kv_params=config.kv_params,
            rope=rope,
            return_logits=config.return_logits,
            return_hidden_states=config.return_hidden_states,
        )

    def input_tree(
        self, kv_params: KVCacheParamInterface
    ) -> OrderedDict[str, object]:
        """Names the graph's inputs; its leaves are the graph's inputs."""
        return ragged_kv_symbolic_input_tree(
            kv_params=kv_params,
            device_refs=list(self.config.devices),
            include_signal_buffers=False,
            hidden_states=None,
        )

    def input_types(
        self, kv_params: KVCacheParamInterface
    ) -> tuple[TensorType | BufferType, ...]:
        return tuple(tree.leaves(self.input_tree(kv_params)))

    def trace(
        self,
        *input_types: Type[Any],
        name: str | None = None,
        module: GraphModule | None = None,
        custom_extensions: Iterable[Path] = (),
        is_device_graph: bool = False,
    ) -> Graph:
        """Traces the graph; unflattens the KV-cache inputs for ``__call__``."""

        def forward(
            tokens: Value[Any],
            input_row_offsets: Value[Any],
            return_n_logits: Value[Any],
            *kv_inputs: Value[Any],
        ) -> tuple[TensorValue, ...]:
            kv_collections = tree.leaves(
                self.kv_params.unflatten_kv_inputs(iter(kv_inputs)),
                leaf=KVCacheInputsPerDevice,
            )
            return self(
                tokens.tensor,
                kv_collections[0],
                return_n_logits.tensor,
                input_row_offsets.tensor,
            )

        return Graph(
            type(self).__qualname__ if name is None else name,
            forward,
            input_types=input_types,
            custom_extensions=list(custom_extensions),
            module=module,
            is_device_graph=is_device_graph,
        )
