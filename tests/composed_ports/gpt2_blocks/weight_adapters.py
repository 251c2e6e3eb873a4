"""Weight adapter of the GPT2LMHeadModel port: maps checkpoint tensor names to graph weight names.

Composed port of the building-blocks library: written for this port (the
StableLM port's adapter shape). GPT-2 checkpoints come with or without the
``transformer.`` prefix (GPT2LMHeadModel / bare GPT2Model); it is dropped.
Renames: ``wte`` -> ``embed_tokens``, ``wpe`` stays ``wpe``, ``ln_f`` ->
``norm``, ``h.<i>`` -> ``layers.<i>``, ``ln_1`` / ``ln_2`` ->
``input_layernorm`` / ``post_attention_layernorm``, ``attn.c_proj`` ->
``self_attn.o_proj``, ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.up_proj`` /
``mlp.down_proj``. Every Conv1D weight (``pytorch_utils.Conv1D`` stores
``[in, out]``) is transposed to MAX's ``[out, in]`` with
blocks/qkv_split.py ``conv1d_transposed``, which keeps the declared dtype (the
dry-build's stand-in arrays are uint8). The fused ``attn.c_attn`` is
concatenated ``[q; k; v]`` along its output axis (``GPT2Attention`` splits the
projection's last axis into three ``n_embd`` parts): transposed, then split
with ``split_concatenated`` into ``self_attn.q_proj`` / ``k_proj`` /
``v_proj``. Dropped: the causal-mask buffers older checkpoints carry
(``attn.bias``, ``attn.masked_bias``) and ``lm_head.weight`` when the config
ties the head (the graph shares ``embed_tokens.weight``). A float32/bfloat16
cast applies when the served encoding differs from the checkpoint dtype; it
runs before the transpose because numpy has no bfloat16.
"""

from __future__ import annotations

import re

from max.graph.weights import WeightData, Weights
from max.pipelines.lib import PipelineConfig
from max.pipelines.lib.config.model_config import _select_dtype_cast
from max.pipelines.modeling.config_enums import supported_encoding_dtype

from .blocks.qkv_split import as_array, conv1d_transposed, split_concatenated, split_fused
from .model_config import CHECKPOINT_PREFIX, HEAD_WEIGHT, Gpt2BlocksConfig

TOP_LEVEL_RENAMES = {"wte.": "embed_tokens.", "wpe.": "wpe.", "ln_f.": "norm."}
# Layer-local checkpoint prefixes -> graph prefixes (after ``h.<i>.`` -> ``layers.<i>.``).
LAYER_RENAMES = {
    "ln_1.": "input_layernorm.",
    "ln_2.": "post_attention_layernorm.",
    "attn.c_proj.": "self_attn.o_proj.",
    "mlp.c_fc.": "mlp.up_proj.",
    "mlp.c_proj.": "mlp.down_proj.",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FUSED_QKV = "attn.c_attn."
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers, not weights
LAYER_NAME = re.compile(r"^h\.(\d+)\.(.+)$")


def graph_name(local: str) -> str:
    """The graph weight name of a checkpoint tensor (``transformer.`` already dropped, not the fused c_attn)."""
    layer = LAYER_NAME.match(local)
    if layer is None:
        for before, after in TOP_LEVEL_RENAMES.items():
            if local.startswith(before):
                return after + local[len(before):]
        return local
    index, rest = layer.groups()
    for before, after in LAYER_RENAMES.items():
        if rest.startswith(before):
            rest = after + rest[len(before):]
            break
    return f"layers.{index}.{rest}"


def convert_safetensor_state_dict(
    state_dict: dict[str, Weights],
    huggingface_config: object,
    pipeline_config: PipelineConfig,
    **unused_kwargs: object,
) -> dict[str, WeightData]:
    """Return the checkpoint's weights under graph names, Conv1D transposed, QKV split, cast to the served dtype."""
    cast_from, cast_to = _select_dtype_cast(pipeline_config.model, Gpt2BlocksConfig.DEFAULT_ENCODING)
    hidden = int(huggingface_config.n_embd)
    tied = bool(huggingface_config.tie_word_embeddings)
    new_state_dict: dict[str, WeightData] = {}
    for checkpoint_name, value in state_dict.items():
        local = checkpoint_name.removeprefix(CHECKPOINT_PREFIX)
        layer = LAYER_NAME.match(local)
        if (layer is not None and layer.group(2) in MASK_BUFFERS) or (tied and local == HEAD_WEIGHT):
            continue
        data = value.data()
        if cast_from and cast_to and data.dtype == supported_encoding_dtype(cast_from):
            data = data.astype(supported_encoding_dtype(cast_to))
        if layer is not None and layer.group(2) in CONV1D_WEIGHTS:
            data = conv1d_transposed(data)
        if layer is not None and layer.group(2).startswith(FUSED_QKV):
            leaf = layer.group(2)[len(FUSED_QKV):]
            names = tuple(f"layers.{layer.group(1)}.self_attn.{part}_proj.{leaf}" for part in ("q", "k", "v"))
            parts = split_concatenated(as_array(data), hidden, hidden)
            new_state_dict.update(split_fused(data, names, parts))
            continue
        new_state_dict[graph_name(local)] = data
    return new_state_dict
