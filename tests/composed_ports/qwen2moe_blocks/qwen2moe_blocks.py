"""Graph of the Qwen2MoeForCausalLM port: the decoder MAX compiles and runs for this architecture.

Composed port of the building-blocks library: every layer comes from the
copies of templates/blocks in ./blocks, matching transformers'
modeling_qwen2_moe.py:
- norms: RMSNorm normalized in float32, cast back, then scaled by the weight
  (blocks/norms.py ``RMSNormF32(scale_in_float32=False)``, as
  ``Qwen2MoeRMSNorm``), for both block norms and the final ``norm``;
- attention: biased q/k/v, unbiased ``o_proj``, full rotate-half RoPE over
  ``head_dim``, grouped-query KV heads (blocks/attention.py
  ``BiasedAttention``, ``build_rope``);
- MoE (``Qwen2MoeSparseMoeBlock``): softmax router, top
  ``num_experts_per_tok`` experts, renormalized when ``norm_topk_prob``, plus
  the shared expert scaled by ``sigmoid(shared_expert_gate(x))``
  (blocks/moe.py ``DenseMoE``: every expert runs on every token, the CPU-safe
  form); layers the config makes dense get MAX's gated ``max.nn.linear.MLP``
  (``Qwen2MoeMLP``: ``down(silu(gate(x)) * up(x))``, no biases);
- residual: sequential ``h = x + attn(ln1(x))``, ``h + mlp(ln2(h))``
  (blocks/residual.py ``SequentialResidualBlock``);
- head: ``lm_head`` is its own weight unless the config ties it.
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
from .blocks.moe import DenseMoE, RouterScore
from .blocks.norms import RMSNormF32
from .blocks.residual import SequentialResidualBlock
from .model_config import Qwen2MoeBlocksConfig


def _rms_norm(config: Qwen2MoeBlocksConfig) -> RMSNormF32:
    return RMSNormF32(
        config.hidden_size, config.dtype, config.devices[0], eps=config.rms_norm_eps, scale_in_float32=False
    )


def _feed_forward(config: Qwen2MoeBlocksConfig, sparse: bool):
    """The MoE block of a sparse layer, else the dense gated MLP."""
    device = config.devices[0]
    if not sparse:
        return MLP(config.dtype, None, config.hidden_size, config.intermediate_size, [device])
    return DenseMoE(
        hidden_size=config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        dtype=config.dtype,
        device=device,
        score=RouterScore.SOFTMAX,
        renormalize=config.norm_topk_prob,
        shared_intermediate_size=config.shared_expert_intermediate_size,
        shared_expert_gate=True,
    )


def build_layer(config: Qwen2MoeBlocksConfig, sparse: bool) -> SequentialResidualBlock:
    """One Qwen2-MoE decoder layer from the blocks."""
    attention = BiasedAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        kv_params=config.kv_params,
        dtype=config.dtype,
        device=config.devices[0],
        rotary_dim=config.head_dim,
        layout=RopeLayout.ROTATE_HALF,
        qkv_bias=config.qkv_bias,
        o_bias=False,
        scale=config.attention_multiplier,
    )
    return SequentialResidualBlock(attention, _feed_forward(config, sparse), _rms_norm(config), _rms_norm(config))


class Qwen2MoeBlocks(Transformer):
    """The Qwen2-MoE decoder on one device."""

    def __init__(self, config: Qwen2MoeBlocksConfig) -> None:
        if len(config.devices) != 1:
            raise ValueError("the Qwen2MoeForCausalLM port runs on a single device")
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
        output = Linear(config.hidden_size, config.vocab_size, config.dtype, device)
        if config.tie_word_embeddings:
            output.set_shared_weight("weight", embedding.weight)
        super().__init__(
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            layers=[build_layer(config, sparse) for sparse in config.sparse_layers],
            norm=_rms_norm(config),
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
