"""Graph of the Gemma2ForCausalLM port: the decoder MAX compiles and runs for this architecture.

Composed port of the building-blocks library: every layer comes from the
copies of templates/blocks in ./blocks, matching transformers'
modeling_gemma2.py:
- embeddings: ``embed_tokens(tokens) * sqrt(hidden_size)``
  (``Gemma2TextScaledWordEmbedding``), given to MAX as
  ``Transformer(embedding_multiplier=...)``;
- norms: ``Gemma2RMSNorm``, ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in
  float32 (blocks/norms.py ``RMSNormF32(weight_offset=1.0)``), four per layer
  and the final ``norm``;
- attention: no biases, full-head rotate-half RoPE (blocks/attention.py
  ``build_rope`` sizes the table from ``head_dim``), scale
  ``query_pre_attn_scalar ** -0.5``, scores soft-capped by
  ``attn_logit_softcapping``, the sliding-window mask on
  ``"sliding_attention"`` layers and the causal mask on ``"full_attention"``
  ones (blocks/softcap_attention.py ``SoftcapAttention`` over the packed KV
  cache of ``packed_kv_cache_shape``);
- MLP: gated ``down(gelu_tanh(gate(x)) * up(x))`` without biases (MAX's
  ``max.nn.linear.MLP``, as ``Gemma2MLP``);
- residual: sandwich norms, ``h = x + post_attn(attn(input(x)))``, then
  ``h + post_ff(mlp(pre_ff(h)))`` (blocks/residual.py
  ``SequentialResidualBlock`` with both post-norms; the adapter renames
  Gemma 2's norm weights to the block's names);
- head: tied to ``embed_tokens`` unless the config unties it, logits capped
  by ``final_logit_softcapping`` (blocks/head.py ``ScaledLMHead``).
Single device, float32 or bfloat16 weights; no quantized layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from max import tree
from max.graph import BufferType, Graph, TensorType, TensorValue, Type, Value
from max.graph import Module as GraphModule
from max.nn.embedding import Embedding
from max.nn.kv_cache import KVCacheInputsPerDevice, KVCacheParamInterface
from max.nn.linear import MLP, Linear
from max.nn.transformer import Transformer
from max.pipelines.lib.interfaces.batch_processor import ragged_kv_symbolic_input_tree

from .blocks.attention import RopeLayout, build_rope
from .blocks.head import ScaledLMHead
from .blocks.norms import RMSNormF32
from .blocks.residual import SequentialResidualBlock
from .blocks.softcap_attention import SoftcapAttention
from .model_config import Gemma2BlocksConfig

GEMMA_NORM_OFFSET = 1.0  # Gemma2RMSNorm scales by (1 + w)


def _norm(config: Gemma2BlocksConfig) -> RMSNormF32:
    return RMSNormF32(config.hidden_size, config.dtype, config.devices[0], eps=config.rms_norm_eps,
                      weight_offset=GEMMA_NORM_OFFSET, scale_in_float32=True)


def build_layer(config: Gemma2BlocksConfig, layer_idx: int) -> SequentialResidualBlock:
    """One Gemma 2 decoder layer from the blocks: four norms around soft-capped attention and the gated MLP."""
    device = config.devices[0]
    attention = SoftcapAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        kv_params=config.kv_params,
        dtype=config.dtype,
        device=device,
        qkv_bias=config.attention_bias,
        o_bias=config.attention_bias,
        scale=config.attention_scale,
        softcap=config.attn_logit_softcapping,
        sliding_window=config.layer_windows[layer_idx],
    )
    mlp = MLP(config.dtype, None, config.hidden_size, config.intermediate_size, [device], Linear,
              activation_function=config.hidden_act)
    return SequentialResidualBlock(attention, mlp, _norm(config), _norm(config),
                                   post_attention_norm=_norm(config), post_mlp_norm=_norm(config))


class Gemma2Blocks(Transformer):
    """The Gemma 2 decoder on one device."""

    def __init__(self, config: Gemma2BlocksConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the Gemma2ForCausalLM port runs on a single device")
        self.config = config
        device = config.devices[0]
        rope = build_rope(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            theta=config.rope_theta,
            max_seq_len=config.max_seq_len,
            rotary_dim=config.head_dim,
            layout=RopeLayout.ROTATE_HALF,
        )
        embedding = Embedding(config.vocab_size, config.hidden_size, config.dtype, device)
        output = ScaledLMHead(config.hidden_size, config.vocab_size, config.dtype, device,
                              final_softcap=config.final_logit_softcapping)
        if config.tie_word_embeddings:
            output.set_shared_weight("weight", embedding.weight)
        super().__init__(
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            layers=[build_layer(config, i) for i in range(config.num_hidden_layers)],
            norm=_norm(config),
            output=output,
            embedding=embedding,
            kv_params=config.kv_params,
            rope=rope,
            return_logits=config.return_logits,
            return_hidden_states=config.return_hidden_states,
            embedding_multiplier=config.embedding_multiplier,
        )

    def input_tree(self, kv_params: KVCacheParamInterface) -> OrderedDict[str, object]:
        """Names the graph's inputs; its leaves are the graph's inputs."""
        return ragged_kv_symbolic_input_tree(
            kv_params=kv_params,
            device_refs=list(self.config.devices),
            include_signal_buffers=False,
            hidden_states=None,
        )

    def input_types(self, kv_params: KVCacheParamInterface) -> tuple[TensorType | BufferType, ...]:
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
                self.kv_params.unflatten_kv_inputs(iter(kv_inputs)), leaf=KVCacheInputsPerDevice
            )
            return self(tokens.tensor, kv_collections[0], return_n_logits.tensor, input_row_offsets.tensor)

        return Graph(
            type(self).__qualname__ if name is None else name,
            forward,
            input_types=input_types,
            custom_extensions=list(custom_extensions),
            module=module,
            is_device_graph=is_device_graph,
        )
