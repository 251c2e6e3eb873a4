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

"""Registers the GPTNeoXForCausalLM port with MAX (its SupportedArchitecture).

Composed port of the building-blocks library: this file was copied from the worked
StableLM port (templates/ports/stablelm, itself scaffolded from llama3) with the
names changed; the graph (neox_blocks.py) is built from templates/blocks.

Derived from max/pipelines/architectures/llama3/arch.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3'; imports point at this port's copies. [audit-ok: lineage or a true statement about this port]

Deltas: registers NeoxBlocksModel/NeoxBlocksConfig under GPTNeoXForCausalLM;
safetensors weights only (the donor's GGUF adapter was removed), float32
and bfloat16 encodings, single device (multi_gpu_supported is False). [audit-ok: backed by code in another module of this port (see neox_blocks.py / model.py)]
"""

from max.experimental.cascade.pipelines.common_textgen import (
    CommonTextGenPipeline,
)
from max.graph.weights import WeightsFormat
from max.pipelines.context import TextContext
from max.pipelines.kv_cache.memory_planner import PagedMemoryPlanner
from max.pipelines.lib import SupportedArchitecture, TextTokenizer
from max.pipelines.modeling.types import PipelineTask

from . import weight_adapters
from .batch_processor import NeoxBlocksBatchProcessor
from .model import NeoxBlocksModel
from .model_config import NeoxBlocksConfig

neox_blocks_arch = SupportedArchitecture(
    name="GPTNeoXForCausalLM",
    example_repo_ids=["EleutherAI/pythia-70m", "EleutherAI/gpt-neox-20b"],
    default_encoding="float32",
    supported_encodings={"bfloat16", "float32"},
    pipeline_model=NeoxBlocksModel,
    tokenizer=TextTokenizer,
    context_type=TextContext,
    default_weights_format=WeightsFormat.safetensors,
    multi_gpu_supported=False,
    weight_adapters={
        WeightsFormat.safetensors: weight_adapters.convert_safetensor_state_dict,
    },
    task=PipelineTask.TEXT_GENERATION,
    config=NeoxBlocksConfig,
    batching=NeoxBlocksBatchProcessor,
    memory_planner=PagedMemoryPlanner,
    cascade_pipeline_factory=CommonTextGenPipeline,
)
