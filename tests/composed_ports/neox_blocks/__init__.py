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
"""Package of the GPTNeoXForCausalLM port; exports ARCHITECTURES for max serve --custom-architectures.

Composed port of the building-blocks library: this file was copied from the worked
StableLM port (templates/ports/stablelm, itself scaffolded from llama3) with the
names changed; the graph (neox_blocks.py) is built from templates/blocks.

Derived from max/pipelines/architectures/llama3/__init__.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3'; imports point at this port's copies. [audit-ok: lineage or a true statement about this port]

Deltas: exports the GPT-NeoX (blocks) classes; the donor's exports were renamed.
"""

from .arch import neox_blocks_arch
from .batch_processor import NeoxBlocksBatchProcessor
from .model import NeoxBlocksInputs, NeoxBlocksModel, NeoxBlocksModelBase
from .model_config import NeoxBlocksConfig

ARCHITECTURES = [neox_blocks_arch]

__all__ = [
    "ARCHITECTURES",
    "NeoxBlocksBatchProcessor",
    "NeoxBlocksConfig",
    "NeoxBlocksInputs",
    "NeoxBlocksModel",
    "NeoxBlocksModelBase",
    "neox_blocks_arch",
]
