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
"""Config of the Qwen2MoeForCausalLM port: turns the Hugging Face config into the graph's settings.

Composed port of the building-blocks library: copied from the worked StableLM
port's model_config.py (templates/ports/stablelm, itself scaffolded from
llama3) and edited for transformers' Qwen2MoeConfig:
- full RoPE over ``head_dim`` (the config's ``head_dim`` when set, else
  ``hidden_size // num_attention_heads``); only the default RoPE type;
- ``qkv_bias`` on q/k/v (the output projection never has a bias), RMSNorm
  with ``rms_norm_eps``, grouped-query KV heads;
- the MoE settings: ``num_experts``, ``num_experts_per_tok``,
  ``norm_topk_prob``, ``moe_intermediate_size`` and the gated shared expert's
  ``shared_expert_intermediate_size``;
- which layers are sparse, as Qwen2MoeDecoderLayer decides: layer ``i`` is a
  MoE layer when ``i`` is not in ``mlp_only_layers``, ``num_experts > 0`` and
  ``(i + 1) % decoder_sparse_step == 0``; the others get the dense gated MLP
  of ``intermediate_size``;
- refused with a ValueError: sliding-window layers and any ``hidden_act``
  other than SiLU (the dense MoE's experts are SiLU-gated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from max.dtype import DType
from max.graph import DeviceRef
from max.graph.weights import WeightData
from max.nn.kv_cache import KVCacheParams
from max.nn.quant_config import QuantConfig
from max.nn.transformer import ReturnHiddenStates, ReturnLogits
from max.pipelines.kv_cache import cache_dtype_for_encoding
from max.pipelines.lib import (
    KVCacheConfig,
    MAXModelConfig,
    PipelineConfig,
    parse_quant_config,
)
from max.pipelines.lib.config.model_config import _select_quantization_encoding
from max.pipelines.lib.interfaces.arch_config import (
    ArchConfigWithKVCache,
    ArchConfigWithStoredKVParams,
)
from max.pipelines.modeling.config_enums import SupportedEncoding, supported_encoding_dtype
from transformers import AutoConfig
from typing_extensions import Self, override

DEFAULT_ROPE_THETA = 10000.0  # Qwen2MoeConfig's default
SUPPORTED_ACTIVATION = "silu"  # blocks/moe.py's experts and shared expert are SiLU-gated
SLIDING_LAYER_TYPE = "sliding_attention"


def rope_parameters(huggingface_config: AutoConfig) -> dict[str, Any]:
    """RoPE settings in one dict, from the new (``rope_parameters``) or old (``rope_theta``) spelling."""
    params = getattr(huggingface_config, "rope_parameters", None)
    merged: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
    legacy = getattr(huggingface_config, "rope_scaling", None)
    if isinstance(legacy, dict):
        for key, value in legacy.items():
            merged.setdefault(key, value)
    if "rope_theta" not in merged and getattr(huggingface_config, "rope_theta", None) is not None:
        merged["rope_theta"] = huggingface_config.rope_theta
    merged.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    return merged


def sparse_layers(huggingface_config: AutoConfig) -> tuple[bool, ...]:
    """Per layer, whether it is a MoE layer (Qwen2MoeDecoderLayer's rule) or a dense MLP layer."""
    only_dense = set(getattr(huggingface_config, "mlp_only_layers", None) or ())
    step = int(getattr(huggingface_config, "decoder_sparse_step", 1) or 1)
    experts = int(getattr(huggingface_config, "num_experts", 0) or 0)
    return tuple(
        i not in only_dense and experts > 0 and (i + 1) % step == 0
        for i in range(int(huggingface_config.num_hidden_layers))
    )


@dataclass(kw_only=True)
class Qwen2MoeBlocksConfig(ArchConfigWithStoredKVParams, ArchConfigWithKVCache):
    """Model configuration for the Qwen2-MoE graph."""

    DEFAULT_ENCODING: ClassVar[SupportedEncoding] = "float32"
    SUPPORTED_ENCODINGS: ClassVar[set[SupportedEncoding]] = {"float32", "bfloat16"}

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    rope_theta: float
    max_seq_len: int
    intermediate_size: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]
    vocab_size: int
    dtype: DType
    kv_params: KVCacheParams
    rms_norm_eps: float
    qkv_bias: bool
    attention_multiplier: float
    devices: list[DeviceRef]
    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    tie_word_embeddings: bool = False
    quant_config: QuantConfig | None = None
    data_parallel_degree: int = 1
    quantization_encoding: SupportedEncoding | None = None

    @staticmethod
    def get_head_dim(huggingface_config: AutoConfig) -> int:
        """The config's ``head_dim`` when set, else ``hidden_size // num_attention_heads`` (as HF does)."""
        head_dim = getattr(huggingface_config, "head_dim", None)
        if head_dim:
            return int(head_dim)
        return int(huggingface_config.hidden_size // huggingface_config.num_attention_heads)

    @classmethod
    def construct_kv_params(
        cls,
        huggingface_config: AutoConfig,
        pipeline_config: PipelineConfig,
        devices: list[DeviceRef],
        kv_cache_config: KVCacheConfig,
        cache_dtype: DType,
    ) -> KVCacheParams:
        """Grouped-query KV cache with the config's head size."""
        return kv_cache_config.to_params(
            dtype=cache_dtype,
            n_kv_heads=huggingface_config.num_key_value_heads,
            head_dim=cls.get_head_dim(huggingface_config),
            num_layers=cls.get_num_layers(huggingface_config),
            devices=devices,
            data_parallel_degree=pipeline_config.model.data_parallel_degree,
        )

    @staticmethod
    def get_num_layers(huggingface_config: AutoConfig) -> int:
        return huggingface_config.num_hidden_layers

    @override
    @classmethod
    def initialize(
        cls,
        pipeline_config: PipelineConfig,
        model_config: MAXModelConfig | None = None,
        *,
        max_seq_len: int,
    ) -> Self:
        model_config = model_config or pipeline_config.model
        huggingface_config = model_config.huggingface_config
        if huggingface_config is None:
            raise ValueError(
                f"HuggingFace config is required for '{model_config.model_path}', "
                "but config could not be loaded. "
                "Please ensure the model repository contains a valid config.json file."
            )
        return cls.initialize_from_config(
            pipeline_config, huggingface_config, model_config, max_seq_len=max_seq_len
        )

    @classmethod
    def initialize_from_config(
        cls,
        pipeline_config: PipelineConfig,
        huggingface_config: AutoConfig,
        model_config: MAXModelConfig | None = None,
        *,
        max_seq_len: int,
    ) -> Self:
        model_config = model_config or pipeline_config.model
        rope = rope_parameters(huggingface_config)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"the Qwen2MoeForCausalLM port supports rope_type 'default' only, not {rope_type!r}")
        hidden_act = str(getattr(huggingface_config, "hidden_act", SUPPORTED_ACTIVATION))
        if hidden_act != SUPPORTED_ACTIVATION:
            raise ValueError(f"the Qwen2MoeForCausalLM port supports hidden_act 'silu' only, not {hidden_act!r}")
        layer_types = list(getattr(huggingface_config, "layer_types", None) or ())
        if getattr(huggingface_config, "use_sliding_window", False) or SLIDING_LAYER_TYPE in layer_types:
            raise ValueError("the Qwen2MoeForCausalLM port has no sliding-window layers (use_sliding_window)")
        quantization_encoding = _select_quantization_encoding(model_config, cls.DEFAULT_ENCODING)
        cache_dtype = cache_dtype_for_encoding(quantization_encoding, model_config.kv_cache.kv_cache_format)
        device_refs = [DeviceRef(spec.device_type, spec.id) for spec in model_config.device_specs]
        head_dim = cls.get_head_dim(huggingface_config)
        return cls(
            hidden_size=huggingface_config.hidden_size,
            num_attention_heads=huggingface_config.num_attention_heads,
            num_key_value_heads=huggingface_config.num_key_value_heads,
            head_dim=head_dim,
            num_hidden_layers=huggingface_config.num_hidden_layers,
            rope_theta=float(rope["rope_theta"]),
            max_seq_len=max_seq_len,
            intermediate_size=huggingface_config.intermediate_size,
            moe_intermediate_size=huggingface_config.moe_intermediate_size,
            shared_expert_intermediate_size=huggingface_config.shared_expert_intermediate_size,
            num_experts=huggingface_config.num_experts,
            num_experts_per_tok=huggingface_config.num_experts_per_tok,
            norm_topk_prob=bool(huggingface_config.norm_topk_prob),
            sparse_layers=sparse_layers(huggingface_config),
            vocab_size=huggingface_config.vocab_size,
            dtype=supported_encoding_dtype(quantization_encoding),
            kv_params=cls.construct_kv_params(
                huggingface_config=huggingface_config,
                pipeline_config=pipeline_config,
                devices=device_refs,
                kv_cache_config=model_config.kv_cache,
                cache_dtype=cache_dtype,
            ),
            rms_norm_eps=float(huggingface_config.rms_norm_eps),
            qkv_bias=bool(getattr(huggingface_config, "qkv_bias", True)),
            attention_multiplier=head_dim**-0.5,
            devices=device_refs,
            data_parallel_degree=pipeline_config.model.data_parallel_degree,
            quantization_encoding=quantization_encoding,
        )

    def finalize(
        self,
        huggingface_config: AutoConfig,
        state_dict: Mapping[str, WeightData],
        return_logits: ReturnLogits,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        norm_method: Literal["rms_norm", "layer_norm"] = "rms_norm",
        attention_bias: bool = False,
    ) -> None:
        """Set what needs the weights: the tied LM head and the quantization config.

        ``norm_method`` and ``attention_bias`` are accepted for the pipeline's
        call signature; the config fields decide both.
        """
        weights = {name.removeprefix("model."): value for name, value in state_dict.items()}
        self.quant_config = parse_quant_config(huggingface_config, weights, self.dtype)
        if "tie_word_embeddings" in huggingface_config:
            self.tie_word_embeddings = bool(huggingface_config.tie_word_embeddings)
        else:
            self.tie_word_embeddings = "lm_head.weight" not in weights
        self.return_logits = return_logits
        self.return_hidden_states = return_hidden_states
