"""Weight adapter of the Qwen2MoeForCausalLM port: maps checkpoint tensor names to graph weight names.

Composed port of the building-blocks library: written for this port (the
StableLM port's adapter shape). Drops the leading ``model.`` (``lm_head`` has
none); attention, norms, router (``mlp.gate``), shared expert and its gate
keep their Hugging Face names. Qwen2-MoE checkpoints store each expert on its
own (``mlp.experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``); the graph's
blocks/moe.py ``DenseMoE`` reads them stacked, as transformers 5 holds them
in ``Qwen2MoeExperts``: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows
first, then up) and ``mlp.experts.down_proj`` ``[E, H, I]``. Checkpoints that
already hold the stacked tensors pass through. Stacked tensors keep the
declared dtype (blocks/qkv_split.py ``like``: dry-build safe). A
float32/bfloat16 cast applies when the served encoding differs from the
checkpoint dtype; it runs before stacking. Stacking needs numpy arrays, so a
bfloat16 checkpoint served as bfloat16 is refused (numpy has no bfloat16).
"""

from __future__ import annotations

import re

import numpy as np
from max.dtype import DType
from max.graph.weights import WeightData, Weights
from max.pipelines.lib import PipelineConfig
from max.pipelines.lib.config.model_config import _select_dtype_cast
from max.pipelines.modeling.config_enums import supported_encoding_dtype

from .blocks.qkv_split import as_array, like
from .model_config import Qwen2MoeBlocksConfig

CHECKPOINT_PREFIX = "model."
# <layer prefix>.mlp.experts.<expert>.<projection>.weight in the checkpoint
PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def graph_name(checkpoint_name: str) -> str:
    """The graph weight name of a (non-expert) checkpoint tensor."""
    return checkpoint_name.removeprefix(CHECKPOINT_PREFIX)


def stack_experts(prefix: str, parts: dict[tuple[int, str], WeightData], num_experts: int) -> dict[str, WeightData]:
    """The stacked ``gate_up_proj`` and ``down_proj`` of one layer's experts, dtype kept."""
    missing = [(e, p) for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")
               if (e, p) not in parts]
    if missing or len(parts) != 3 * num_experts:
        raise ValueError(f"{prefix}: expected {num_experts} experts with gate/up/down weights; missing {missing}")
    source = parts[(0, "down_proj")]
    if source.dtype == DType.bfloat16:
        raise ValueError(f"{prefix}: cannot stack bfloat16 expert weights with numpy; serve with --encoding float32")
    gate_up = np.stack([np.concatenate([as_array(parts[(e, "gate_proj")]), as_array(parts[(e, "up_proj")])])
                        for e in range(num_experts)])
    down = np.stack([as_array(parts[(e, "down_proj")]) for e in range(num_experts)])
    name = graph_name(prefix)
    return {f"{name}.gate_up_proj": like(source, gate_up, f"{name}.gate_up_proj"),
            f"{name}.down_proj": like(source, down, f"{name}.down_proj")}


def convert_safetensor_state_dict(
    state_dict: dict[str, Weights],
    huggingface_config: object,
    pipeline_config: PipelineConfig,
    **unused_kwargs: object,
) -> dict[str, WeightData]:
    """Return the checkpoint's weights under graph names, experts stacked, cast to the served dtype."""
    cast_from, cast_to = _select_dtype_cast(pipeline_config.model, Qwen2MoeBlocksConfig.DEFAULT_ENCODING)
    num_experts = int(getattr(huggingface_config, "num_experts", 0) or 0)
    new_state_dict: dict[str, WeightData] = {}
    experts: dict[str, dict[tuple[int, str], WeightData]] = {}
    for checkpoint_name, value in state_dict.items():
        data = value.data()
        if cast_from and cast_to and data.dtype == supported_encoding_dtype(cast_from):
            data = data.astype(supported_encoding_dtype(cast_to))
        match = PER_EXPERT.match(checkpoint_name)
        if match:
            experts.setdefault(match["prefix"], {})[(int(match["expert"]), match["proj"])] = data
            continue
        new_state_dict[graph_name(checkpoint_name)] = data
    for prefix, parts in experts.items():
        new_state_dict.update(stack_experts(prefix, parts, num_experts))
    return new_state_dict
