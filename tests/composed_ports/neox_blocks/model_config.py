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
"""Config of the GPTNeoXForCausalLM port: turns the Hugging Face config into the graph's settings.

Composed port of the building-blocks library: copied from the worked StableLM
port's model_config.py (templates/ports/stablelm, itself scaffolded from
llama3) and edited for transformers' GPTNeoXConfig:
- ``rotary_dim = int(head_dim * partial_rotary_factor)`` from
  ``rope_parameters`` (transformers 5) or ``rotary_pct`` / ``rotary_emb_base``
  (older configs); only the default RoPE type is accepted;
- ``attention_bias`` (q/k/v and dense), ``use_parallel_residual``,
  ``hidden_act`` and ``layer_norm_eps`` are carried to the graph;
- the head is ``hidden_size // num_attention_heads`` wide and there are as
  many KV heads as query heads (GPT-NeoX has no grouped-query attention).
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

DEFAULT_PARTIAL_ROTARY_FACTOR = 0.25  # GPTNeoXConfig's default
DEFAULT_ROPE_THETA = 10000.0


def rope_parameters(huggingface_config: AutoConfig) -> dict[str, Any]:
    """RoPE settings in one dict, from the new (``rope_parameters``) or old spelling."""
    params = getattr(huggingface_config, "rope_parameters", None)
    merged: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
    legacy = getattr(huggingface_config, "rope_scaling", None)
    if isinstance(legacy, dict):
        for key, value in legacy.items():
            merged.setdefault(key, value)
    for key, old_key in (("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")):
        for name in (key, old_key):
            if key not in merged and getattr(huggingface_config, name, None) is not None:
                merged[key] = getattr(huggingface_config, name)
    merged.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    merged.setdefault("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)
    return merged


@dataclass(kw_only=True)
class NeoxBlocksConfig(ArchConfigWithStoredKVParams, ArchConfigWithKVCache):
    """Model configuration for the StableLM graph."""

    DEFAULT_ENCODING: ClassVar[SupportedEncoding] = "float32"
    SUPPORTED_ENCODINGS: ClassVar[set[SupportedEncoding]] = {"float32", "bfloat16"}

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    rope_theta: float
    rotary_dim: int
    max_seq_len: int
    intermediate_size: int
    vocab_size: int
    dtype: DType
    kv_params: KVCacheParams
    layer_norm_eps: float
    attention_bias: bool
    use_parallel_residual: bool
    hidden_act: str
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
        """HF StableLM ignores any ``head_dim`` key: a head is hidden_size / num_attention_heads wide."""
        return int(huggingface_config.hidden_size // huggingface_config.num_attention_heads)

    @staticmethod
    def get_rotary_dim(huggingface_config: AutoConfig) -> int:
        """Leading dims of each head that RoPE rotates (HF ``rotary_ndims``)."""
        factor = float(rope_parameters(huggingface_config)["partial_rotary_factor"])
        return int(NeoxBlocksConfig.get_head_dim(huggingface_config) * factor)

    @classmethod
    def construct_kv_params(
        cls,
        huggingface_config: AutoConfig,
        pipeline_config: PipelineConfig,
        devices: list[DeviceRef],
        kv_cache_config: KVCacheConfig,
        cache_dtype: DType,
    ) -> KVCacheParams:
        """Grouped-query KV cache with StableLM's head size."""
        return kv_cache_config.to_params(
            dtype=cache_dtype,
            n_kv_heads=huggingface_config.num_attention_heads,
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
            raise ValueError(
                f"the NeoxBlocksForCausalLM port supports rope_type 'default' only, not {rope_type!r}"
            )
        quantization_encoding = _select_quantization_encoding(model_config, cls.DEFAULT_ENCODING)
        cache_dtype = cache_dtype_for_encoding(
            quantization_encoding, model_config.kv_cache.kv_cache_format
        )
        device_refs = [DeviceRef(spec.device_type, spec.id) for spec in model_config.device_specs]
        head_dim = cls.get_head_dim(huggingface_config)
        return cls(
            hidden_size=huggingface_config.hidden_size,
            num_attention_heads=huggingface_config.num_attention_heads,
            num_key_value_heads=huggingface_config.num_attention_heads,
            num_hidden_layers=huggingface_config.num_hidden_layers,
            rope_theta=float(rope["rope_theta"]),
            rotary_dim=cls.get_rotary_dim(huggingface_config),
            max_seq_len=max_seq_len,
            intermediate_size=huggingface_config.intermediate_size,
            vocab_size=huggingface_config.vocab_size,
            dtype=supported_encoding_dtype(quantization_encoding),
            kv_params=cls.construct_kv_params(
                huggingface_config=huggingface_config,
                pipeline_config=pipeline_config,
                devices=device_refs,
                kv_cache_config=model_config.kv_cache,
                cache_dtype=cache_dtype,
            ),
            layer_norm_eps=float(huggingface_config.layer_norm_eps),
            attention_bias=bool(getattr(huggingface_config, "attention_bias", True)),
            use_parallel_residual=bool(getattr(huggingface_config, "use_parallel_residual", True)),
            hidden_act=str(getattr(huggingface_config, "hidden_act", "gelu")),
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
        norm_method: Literal["rms_norm", "layer_norm"] = "layer_norm",
        attention_bias: bool = False,
    ) -> None:
        """Set what needs the weights: the tied LM head and the quantization config.

        ``norm_method`` and ``attention_bias`` are accepted for the pipeline's
        call signature; the config fields decide both.
        """
        weights = {name.removeprefix("gpt_neox."): value for name, value in state_dict.items()}
        self.quant_config = parse_quant_config(huggingface_config, weights, self.dtype)
        if "tie_word_embeddings" in huggingface_config:
            self.tie_word_embeddings = bool(huggingface_config.tie_word_embeddings)
        else:
            self.tie_word_embeddings = "embed_out.weight" not in weights
        self.return_logits = return_logits
        self.return_hidden_states = return_hidden_states
