"""Graph of the GPT2LMHeadModel port: the decoder MAX compiles and runs for this architecture.

Composed port of the building-blocks library: every layer comes from the
copies of templates/blocks in ./blocks, matching transformers'
modeling_gpt2.py:
- embeddings: ``wte(tokens) + wpe(position)`` with the learned absolute
  position of each token in its own sequence, cache included (blocks/positions.py
  ``LearnedPositionEmbedding``, offset 0, as ``GPT2Model.forward``);
- norms: LayerNorm with weight and bias in float32 (blocks/norms.py
  ``LayerNormF32``) for ``ln_1``, ``ln_2`` and ``ln_f``;
- attention: biased q/k/v (split from the fused ``c_attn`` in the adapter) and
  biased ``c_proj`` output projection, no RoPE, the per-layer score scale of
  ``GPT2Attention.scaling`` (blocks/attention.py ``BiasedAttention`` with
  ``rotary_dim=0``; ``build_rope`` gives the unused table the Transformer
  base wants);
- MLP: ungated ``c_proj(act(c_fc(x)))`` with ``activation_function``
  (blocks/mlp.py ``UngatedMLP``; ``gelu_new`` is the tanh GELU);
- residual: sequential pre-norm ``GPT2Block`` (blocks/residual.py
  ``SequentialResidualBlock``);
- head: bias-free, tied to ``wte`` unless the config unties it (blocks/head.py
  ``ScaledLMHead`` with no multiplier or cap, ``set_shared_weight``).
Single device, float32 or bfloat16 weights; no quantized layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from max import tree
from max.graph import BufferType, Graph, TensorType, TensorValue, TensorValueLike, Type, Value
from max.graph import Module as GraphModule
from max.nn.embedding import Embedding
from max.nn.kv_cache import KVCacheInputsPerDevice, KVCacheParamInterface, PagedCacheValues
from max.nn.transformer import Transformer
from max.pipelines.lib.interfaces.batch_processor import ragged_kv_symbolic_input_tree

from .blocks.attention import BiasedAttention, build_rope
from .blocks.head import ScaledLMHead
from .blocks.mlp import UngatedMLP
from .blocks.norms import LayerNormF32
from .blocks.positions import LearnedPositionEmbedding
from .blocks.residual import SequentialResidualBlock
from .model_config import Gpt2BlocksConfig

NO_ROPE = 0  # rotary_dim 0: BiasedAttention applies no RoPE
UNUSED_ROPE_THETA = 10000.0  # the stand-in table is never read; any positive base builds it
GPT2_POSITION_OFFSET = 0  # GPT2Model looks up wpe[position] (OPT would need 2)


def _layer_norm(config: Gpt2BlocksConfig) -> LayerNormF32:
    return LayerNormF32(config.hidden_size, config.dtype, config.devices[0], eps=config.layer_norm_eps)


def build_layer(config: Gpt2BlocksConfig, layer_idx: int) -> SequentialResidualBlock:
    """One GPT-2 block from the blocks: ``h = x + attn(ln_1(x))``, then ``h + mlp(ln_2(h))``."""
    device = config.devices[0]
    attention = BiasedAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        kv_params=config.kv_params,
        dtype=config.dtype,
        device=device,
        rotary_dim=NO_ROPE,
        qkv_bias=True,
        o_bias=True,
        scale=config.attention_scales[layer_idx],
    )
    mlp = UngatedMLP(
        config.hidden_size, config.intermediate_size, config.dtype, device, config.hidden_act, bias=True
    )
    return SequentialResidualBlock(attention, mlp, _layer_norm(config), _layer_norm(config))


class Gpt2Blocks(Transformer):
    """The GPT-2 decoder on one device."""

    def __init__(self, config: Gpt2BlocksConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the GPT2LMHeadModel port runs on a single device")
        self.config = config
        device = config.devices[0]
        rope = build_rope(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            theta=UNUSED_ROPE_THETA,
            max_seq_len=config.max_seq_len,
            rotary_dim=NO_ROPE,
        )
        embedding = Embedding(config.vocab_size, config.hidden_size, config.dtype, device)
        output = ScaledLMHead(config.hidden_size, config.vocab_size, config.dtype, device)
        if config.tie_word_embeddings:
            output.set_shared_weight("weight", embedding.weight)
        super().__init__(
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            layers=[build_layer(config, i) for i in range(config.num_hidden_layers)],
            norm=_layer_norm(config),
            output=output,
            embedding=embedding,
            kv_params=config.kv_params,
            rope=rope,
            return_logits=config.return_logits,
            return_hidden_states=config.return_hidden_states,
        )
        self.wpe = LearnedPositionEmbedding(
            config.num_positions, config.hidden_size, config.dtype, device, offset=GPT2_POSITION_OFFSET
        )

    def __call__(
        self,
        tokens: TensorValueLike,
        kv_collection: PagedCacheValues,
        return_n_logits: TensorValue,
        input_row_offsets: TensorValue,
        hidden_states: TensorValue | None = None,
    ) -> tuple[TensorValue, ...]:
        """Token plus learned position embeddings, then the base class's layers, final norm and head."""
        h = self.embed_tokens(tokens)
        h = h + self.wpe(input_row_offsets, kv_collection.cache_lengths, h.shape[0])
        return self._process_hidden_states(h, kv_collection, return_n_logits, input_row_offsets)

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
