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
"""Package of the StableLmForCausalLM port; exports ARCHITECTURES for max serve --custom-architectures.

Derived from max/pipelines/architectures/llama3/__init__.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3'; imports point at this port's copies. [audit-ok: lineage or a true statement about this port]

Deltas: exports the StableLM classes; the donor's exports were renamed.
"""

from .arch import stablelm_arch
from .batch_processor import StableLmBatchProcessor
from .model import StableLmInputs, StableLmModel, StableLmModelBase
from .model_config import StableLmConfig

ARCHITECTURES = [stablelm_arch]

__all__ = [
    "ARCHITECTURES",
    "StableLmBatchProcessor",
    "StableLmConfig",
    "StableLmInputs",
    "StableLmModel",
    "StableLmModelBase",
    "stablelm_arch",
]
