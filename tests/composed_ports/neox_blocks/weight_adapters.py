"""Weight adapter of the GPTNeoXForCausalLM port: maps checkpoint tensor names to graph weight names.

Composed port of the building-blocks library: written for this port (the
StableLM port's adapter shape, with a fused-QKV split). Renames, in order:
``gpt_neox.embed_in`` -> ``embed_tokens``, ``gpt_neox.final_layer_norm`` ->
``norm``, ``embed_out`` -> ``lm_head``, ``attention.dense`` ->
``self_attn.o_proj``, ``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h`` ->
``mlp.up_proj`` / ``mlp.down_proj``, and drops the ``gpt_neox.`` prefix.
``attention.query_key_value`` (weight and bias) is laid out per head as
``[q_h; k_h; v_h]`` (HF views it as ``[heads, 3 * head_dim]`` and chunks the
last axis): blocks/qkv_split.py splits it into ``self_attn.q_proj`` /
``k_proj`` / ``v_proj``, keeping the declared dtype (dry-build safe). A
float32/bfloat16 cast applies when the served encoding differs from the
checkpoint dtype; it runs before the split because numpy has no bfloat16.
"""

from __future__ import annotations

from max.graph.weights import WeightData, Weights
from max.pipelines.lib import PipelineConfig
from max.pipelines.lib.config.model_config import _select_dtype_cast
from max.pipelines.modeling.config_enums import supported_encoding_dtype

from .blocks.qkv_split import as_array, split_fused, split_per_head_interleaved
from .model_config import NeoxBlocksConfig

# Checkpoint name fragments -> graph name fragments, applied in order.
NEOX_RENAMES = (
    ("gpt_neox.embed_in.", "embed_tokens."),
    ("gpt_neox.final_layer_norm.", "norm."),
    ("embed_out.", "lm_head."),
    (".attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
    ("gpt_neox.", ""),
)
FUSED_QKV = ".attention.query_key_value."


def graph_name(checkpoint_name: str) -> str:
    """The graph weight name of a (non-fused) checkpoint tensor."""
    name = checkpoint_name
    for before, after in NEOX_RENAMES:
        name = name.replace(before, after)
    return name


def convert_safetensor_state_dict(
    state_dict: dict[str, Weights],
    huggingface_config: object,
    pipeline_config: PipelineConfig,
    **unused_kwargs: object,
) -> dict[str, WeightData]:
    """Return the checkpoint's weights under graph names, QKV split, cast to the served dtype."""
    cast_from, cast_to = _select_dtype_cast(pipeline_config.model, NeoxBlocksConfig.DEFAULT_ENCODING)
    num_heads = int(huggingface_config.num_attention_heads)
    head_dim = int(huggingface_config.hidden_size) // num_heads
    new_state_dict: dict[str, WeightData] = {}
    for checkpoint_name, value in state_dict.items():
        data = value.data()
        if cast_from and cast_to and data.dtype == supported_encoding_dtype(cast_from):
            data = data.astype(supported_encoding_dtype(cast_to))
        if FUSED_QKV in checkpoint_name:
            prefix, _, leaf = graph_name(checkpoint_name.replace(FUSED_QKV, ".self_attn.qkv.")).rpartition(".qkv.")
            names = tuple(f"{prefix}.{part}_proj.{leaf}" for part in ("q", "k", "v"))
            parts = split_per_head_interleaved(as_array(data), num_heads, head_dim)
            new_state_dict.update(split_fused(data, names, parts))
            continue
        new_state_dict[graph_name(checkpoint_name)] = data
    return new_state_dict
