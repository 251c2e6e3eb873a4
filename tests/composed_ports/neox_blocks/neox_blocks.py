"""Graph of the GPTNeoXForCausalLM port: the decoder MAX compiles and runs for this architecture.

Composed port of the building-blocks library: every layer comes from the
copies of templates/blocks in ./blocks, matching transformers'
modeling_gpt_neox.py:
- norms: LayerNorm with weight and bias in float32 (blocks/norms.py
  ``LayerNormF32``), for both block norms and ``final_layer_norm``;
- attention: biased q/k/v and biased ``dense`` output projection, RoPE on the
  leading ``rotary_dim`` columns of each head in the rotate-half layout
  (blocks/attention.py ``BiasedAttention``, ``build_rope``);
- MLP: ungated ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with the config's
  ``hidden_act`` (blocks/mlp.py ``UngatedMLP``);
- residual: parallel ``x + attn(ln1(x)) + mlp(ln2(x))`` when
  ``use_parallel_residual``, else sequential (blocks/residual.py);
- head: ``embed_out`` is its own weight unless the config ties it.
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
from max.nn.linear import Linear
from max.nn.transformer import Transformer
from max.pipelines.lib.interfaces.batch_processor import ragged_kv_symbolic_input_tree

from .blocks.attention import BiasedAttention, RopeLayout, build_rope
from .blocks.mlp import UngatedMLP
from .blocks.norms import LayerNormF32
from .blocks.residual import ParallelResidualBlock, SequentialResidualBlock
from .model_config import NeoxBlocksConfig


def _layer_norm(config: NeoxBlocksConfig) -> LayerNormF32:
    return LayerNormF32(config.hidden_size, config.dtype, config.devices[0], eps=config.layer_norm_eps)


def build_layer(config: NeoxBlocksConfig):
    """One GPT-NeoX layer from the blocks."""
    device = config.devices[0]
    head_dim = config.hidden_size // config.num_attention_heads
    attention = BiasedAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        kv_params=config.kv_params,
        dtype=config.dtype,
        device=device,
        rotary_dim=config.rotary_dim,
        layout=RopeLayout.ROTATE_HALF,
        qkv_bias=config.attention_bias,
        o_bias=config.attention_bias,
        scale=config.attention_multiplier,
    )
    mlp = UngatedMLP(
        config.hidden_size, config.intermediate_size, config.dtype, device, config.hidden_act, bias=True
    )
    if config.use_parallel_residual:
        return ParallelResidualBlock(attention, mlp, _layer_norm(config), _layer_norm(config))
    return SequentialResidualBlock(attention, mlp, _layer_norm(config), _layer_norm(config))


class NeoxBlocks(Transformer):
    """The GPT-NeoX decoder on one device."""

    def __init__(self, config: NeoxBlocksConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the GPTNeoXForCausalLM port runs on a single device")
        self.config = config
        device = config.devices[0]
        rope = build_rope(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            theta=config.rope_theta,
            max_seq_len=config.max_seq_len,
            rotary_dim=config.rotary_dim,
            layout=RopeLayout.ROTATE_HALF,
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
