"""Graph of the CohereForCausalLM port: the decoder MAX compiles and runs for this architecture.

Composed port of the building-blocks library: every layer comes from the
copies of templates/blocks in ./blocks, matching transformers'
modeling_cohere.py:
- norms: ``CohereLayerNorm``, a LayerNorm with a weight and no bias computed
  in float32 (blocks/norms.py ``LayerNormF32(bias=False)``), for the one
  block norm and the final ``norm``;
- attention: no biases (``attention_bias``), RoPE over the whole head in the
  interleaved layout (Cohere's ``rotate_half`` pairs neighbours and its
  frequencies are ``repeat_interleave``d), grouped-query KV heads
  (blocks/attention.py ``BiasedAttention``, ``build_rope``,
  ``RopeLayout.INTERLEAVED``);
- MLP: gated ``down(silu(gate(x)) * up(x))`` without biases (MAX's
  ``max.nn.linear.MLP``, as ``CohereMLP``);
- residual: parallel ``x + attn(ln(x)) + mlp(ln(x))`` with ONE shared input
  norm (blocks/residual.py ``ParallelResidualBlock`` without ``mlp_norm``);
- head: tied to ``embed_tokens`` unless the config unties it; logits times
  ``logit_scale``, given to MAX as ``Transformer(logits_scaling=1 /
  logit_scale)`` because MAX divides (blocks/head.py
  ``logits_scaling_divisor``).
Refused: ``use_qk_norm`` (Cohere's per-head q/k LayerNorm has no block).
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

from .blocks.attention import BiasedAttention, RopeLayout, build_rope
from .blocks.head import logits_scaling_divisor
from .blocks.norms import LayerNormF32
from .blocks.residual import ParallelResidualBlock
from .model_config import CohereBlocksConfig

ROPE_LAYOUT = RopeLayout.INTERLEAVED  # modeling_cohere.py rotate_half: x[..., ::2] / x[..., 1::2] pairs


def _layer_norm(config: CohereBlocksConfig) -> LayerNormF32:
    return LayerNormF32(config.hidden_size, config.dtype, config.devices[0], eps=config.layer_norm_eps, bias=False)


def build_layer(config: CohereBlocksConfig) -> ParallelResidualBlock:
    """One Cohere decoder layer from the blocks: attention and MLP both read the one input norm."""
    device = config.devices[0]
    attention = BiasedAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.kv_params.head_dim,
        kv_params=config.kv_params,
        dtype=config.dtype,
        device=device,
        rotary_dim=config.rotary_dim,
        layout=ROPE_LAYOUT,
        qkv_bias=config.use_qkv_bias,
        o_bias=config.use_qkv_bias,
        scale=config.attention_multiplier,
    )
    mlp = MLP(config.dtype, None, config.hidden_size, config.intermediate_size, [device], Linear,
              activation_function=config.hidden_act)
    return ParallelResidualBlock(attention, mlp, _layer_norm(config))


class CohereBlocks(Transformer):
    """The Cohere decoder on one device."""

    def __init__(self, config: CohereBlocksConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the CohereForCausalLM port runs on a single device")
        if config.qk_layernorm:
            raise ValueError("the CohereForCausalLM port has no per-head q/k LayerNorm (use_qk_norm)")
        self.config = config
        device = config.devices[0]
        rope = build_rope(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            theta=config.rope_theta,
            max_seq_len=config.max_seq_len,
            rotary_dim=config.rotary_dim,
            layout=ROPE_LAYOUT,
        )
        embedding = Embedding(config.vocab_size, config.hidden_size, config.dtype, device)
        output = Linear(config.hidden_size, config.vocab_size, config.dtype, device)
        if config.tie_word_embeddings:
            output.set_shared_weight("weight", embedding.weight)
        super().__init__(
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            layers=[build_layer(config) for _ in range(config.num_hidden_layers)],
            norm=_layer_norm(config),
            output=output,
            embedding=embedding,
            kv_params=config.kv_params,
            rope=rope,
            return_logits=config.return_logits,
            return_hidden_states=config.return_hidden_states,
            logits_scaling=logits_scaling_divisor(config.logit_scale),
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
