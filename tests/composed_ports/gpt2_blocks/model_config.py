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
"""Config of the GPT2LMHeadModel port: turns the Hugging Face config into the graph's settings.

Composed port of the building-blocks library: the StableLM port's
model_config.py shape (templates/ports/stablelm) edited for transformers'
GPT2Config (models/gpt2/configuration_gpt2.py):
- ``n_embd``, ``n_head``, ``n_layer``, ``n_positions`` and ``n_inner``
  (``None`` means ``4 * n_embd``) give the shapes; every head is
  ``n_embd // n_head`` wide and there are as many KV heads as query heads;
- no RoPE: positions come from the learned ``wpe`` table (offset 0), which
  holds ``n_positions`` rows, so MAX bounds the served length by it
  (``max_position_embeddings`` is GPT2Config's alias of ``n_positions``);
- the score scale per layer is ``head_dim ** -0.5`` when
  ``scale_attn_weights`` (else 1), divided by ``layer_idx + 1`` when
  ``scale_attn_by_inverse_layer_idx``, as ``GPT2Attention.scaling``;
- ``activation_function`` (default ``gelu_new``, the tanh GELU) and
  ``layer_norm_epsilon`` are carried to the graph; the head is tied to
  ``wte`` unless ``tie_word_embeddings`` is false.
``reorder_and_upcast_attn`` only changes where HF upcasts to float32, which a
float32 run does anyway; cross-attention (``add_cross_attention``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

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

MLP_WIDTH_FACTOR = 4  # GPT2MLP's width when n_inner is None: 4 * n_embd
CHECKPOINT_PREFIX = "transformer."  # GPT2LMHeadModel's backbone prefix (bare GPT2Model checkpoints have none)
HEAD_WEIGHT = "lm_head.weight"


def attention_scales(huggingface_config: AutoConfig) -> list[float]:
    """The score scale of each layer, as ``GPT2Attention.scaling`` computes it."""
    head_dim = huggingface_config.n_embd // huggingface_config.n_head
    base = head_dim**-0.5 if huggingface_config.scale_attn_weights else 1.0
    if huggingface_config.scale_attn_by_inverse_layer_idx:
        return [base / float(layer_idx + 1) for layer_idx in range(huggingface_config.n_layer)]
    return [base] * huggingface_config.n_layer


@dataclass(kw_only=True)
class Gpt2BlocksConfig(ArchConfigWithStoredKVParams, ArchConfigWithKVCache):
    """Model configuration for the GPT-2 graph."""

    DEFAULT_ENCODING: ClassVar[SupportedEncoding] = "float32"
    SUPPORTED_ENCODINGS: ClassVar[set[SupportedEncoding]] = {"float32", "bfloat16"}

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    num_positions: int
    max_seq_len: int
    intermediate_size: int
    vocab_size: int
    dtype: DType
    kv_params: KVCacheParams
    layer_norm_eps: float
    hidden_act: str
    attention_scales: list[float]
    devices: list[DeviceRef]
    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    tie_word_embeddings: bool = True
    quant_config: QuantConfig | None = None
    data_parallel_degree: int = 1
    quantization_encoding: SupportedEncoding | None = None

    @staticmethod
    def get_head_dim(huggingface_config: AutoConfig) -> int:
        """GPT-2 has no head_dim key: a head is n_embd / n_head wide."""
        return int(huggingface_config.n_embd // huggingface_config.n_head)

    @classmethod
    def construct_kv_params(
        cls,
        huggingface_config: AutoConfig,
        pipeline_config: PipelineConfig,
        devices: list[DeviceRef],
        kv_cache_config: KVCacheConfig,
        cache_dtype: DType,
    ) -> KVCacheParams:
        """KV cache with one KV head per query head (GPT-2 has no grouped-query attention)."""
        return kv_cache_config.to_params(
            dtype=cache_dtype,
            n_kv_heads=huggingface_config.n_head,
            head_dim=cls.get_head_dim(huggingface_config),
            num_layers=cls.get_num_layers(huggingface_config),
            devices=devices,
            data_parallel_degree=pipeline_config.model.data_parallel_degree,
        )

    @staticmethod
    def get_num_layers(huggingface_config: AutoConfig) -> int:
        return huggingface_config.n_layer

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
        if huggingface_config.add_cross_attention:
            raise ValueError("the GPT2LMHeadModel port has no cross-attention (add_cross_attention is set)")
        if max_seq_len > huggingface_config.n_positions:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the {huggingface_config.n_positions} learned positions"
            )
        quantization_encoding = _select_quantization_encoding(model_config, cls.DEFAULT_ENCODING)
        cache_dtype = cache_dtype_for_encoding(
            quantization_encoding, model_config.kv_cache.kv_cache_format
        )
        device_refs = [DeviceRef(spec.device_type, spec.id) for spec in model_config.device_specs]
        n_inner = huggingface_config.n_inner
        return cls(
            hidden_size=huggingface_config.n_embd,
            num_attention_heads=huggingface_config.n_head,
            num_key_value_heads=huggingface_config.n_head,
            num_hidden_layers=huggingface_config.n_layer,
            num_positions=huggingface_config.n_positions,
            max_seq_len=max_seq_len,
            intermediate_size=MLP_WIDTH_FACTOR * huggingface_config.n_embd if n_inner is None else n_inner,
            vocab_size=huggingface_config.vocab_size,
            dtype=supported_encoding_dtype(quantization_encoding),
            kv_params=cls.construct_kv_params(
                huggingface_config=huggingface_config,
                pipeline_config=pipeline_config,
                devices=device_refs,
                kv_cache_config=model_config.kv_cache,
                cache_dtype=cache_dtype,
            ),
            layer_norm_eps=float(huggingface_config.layer_norm_epsilon),
            hidden_act=str(huggingface_config.activation_function),
            attention_scales=attention_scales(huggingface_config),
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
        call signature; GPT-2 always has LayerNorm with bias and biased
        projections. The head is tied unless the config unties it; an untied
        config needs ``lm_head.weight`` in the (adapted) weights.
        """
        weights = {name.removeprefix(CHECKPOINT_PREFIX): value for name, value in state_dict.items()}
        self.quant_config = parse_quant_config(huggingface_config, weights, self.dtype)
        self.tie_word_embeddings = bool(huggingface_config.tie_word_embeddings)
        if not self.tie_word_embeddings and HEAD_WEIGHT not in weights:
            raise ValueError(f"the config unties the head but the checkpoint has no {HEAD_WEIGHT}")
        self.return_logits = return_logits
        self.return_hidden_states = return_hidden_states
