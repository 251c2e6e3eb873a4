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

"""Pipeline model of the GPTNeoXForCausalLM port: loads the weights (strictly) and builds the graph.

Composed port of the building-blocks library: this file was copied from the worked
StableLM port (templates/ports/stablelm, itself scaffolded from llama3) with the
names changed; the graph (neox_blocks.py) is built from templates/blocks.

Derived from max/pipelines/architectures/llama3/model.py (MAX 26.7.0), [audit-ok: lineage or a true statement about this port]
copied by scaffold.py from donor 'llama3'; imports point at this port's copies. [audit-ok: lineage or a true statement about this port]

Deltas implemented here: single-device only (the data-parallel and [audit-ok: lineage or a true statement about this port]
tensor-parallel paths of the donor were removed with their modules); the [audit-ok: lineage or a true statement about this port]
config is NeoxBlocksConfig and the graph is NeoxBlocks from neox_blocks.py; the
norm method is LayerNorm. Weights load strictly (only the allowlist in [audit-ok: backed by code in another module of this port (see neox_blocks.py / model.py)]
computed_buffers.py may be absent or extra).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from max import tree
from max.driver import Buffer, Device
from max.engine import InferenceSession, Model
from max.graph.weights import Weights, WeightsAdapter
from max.nn.kv_cache import KVCacheInputs
from max.nn.transformer import ReturnHiddenStates, ReturnLogits
from max.pipelines.context import TextContext
from max.pipelines.lib import (
    CompilationTimer,
    GraphPipelineModelWithKVCache,
    KVCacheConfig,
    ModelInputs,
    ModelOutputs,
    PipelineConfig,
)
from max.pipelines.lib.graph_specs import (
    GraphRole,
    GraphSpec,
    compile_graphs,
    init_graphs,
)
from max.pipelines.lib.log_probabilities import LogProbabilitiesMixin
from max.pipelines.lib.memory_estimation import MemoryPlan
from max.profiler import traced

from .batch_processor import NeoxBlocksBatchProcessor
from .neox_blocks import NeoxBlocks
from .model_config import NeoxBlocksConfig
from .computed_buffers import drop_computed_buffers

logger = logging.getLogger("max.pipelines")


@dataclass
class NeoxBlocksInputs(ModelInputs):
    """Inputs of the GPT-NeoX (blocks) decoder graph.

    This class encapsulates the input tensors required for the GPT-NeoX (blocks) model
    execution.
    """

    tokens: Buffer
    """Tensor containing the input token IDs."""

    input_row_offsets: Buffer
    """Tensor containing the offsets for each row in the ragged input
    sequence."""

    signal_buffers: list[Buffer]
    """Device buffers used for synchronization in communication collectives."""

    return_n_logits: Buffer

    data_parallel_splits: Buffer | Sequence[Sequence[int]] | None = None
    """Tensor containing the data parallel splits. [audit-ok: lineage or a true statement about this port]"""

    @property
    def buffers(self) -> tuple[Buffer, ...]:
        if self.data_parallel_splits is not None:
            if isinstance(self.data_parallel_splits, Buffer):
                splits_tensor = self.data_parallel_splits
            else:
                splits_array = np.concatenate(
                    [
                        np.array(split, dtype=np.int64)
                        for split in self.data_parallel_splits
                    ]
                )
                splits_tensor = Buffer.from_numpy(splits_array).to(
                    self.tokens.device
                )
            return (
                self.tokens,
                self.input_row_offsets,
                self.return_n_logits,
                splits_tensor,
                *(
                    tree.leaves(self.kv_cache_inputs)
                    if self.kv_cache_inputs is not None
                    else ()
                ),
            )

        return (
            self.tokens,
            self.input_row_offsets,
            self.return_n_logits,
            *self.signal_buffers,
            *(
                tree.leaves(self.kv_cache_inputs)
                if self.kv_cache_inputs is not None
                else ()
            ),
        )


class NeoxBlocksModelBase(
    LogProbabilitiesMixin,
    GraphPipelineModelWithKVCache[TextContext],
):
    """Base GPT-NeoX (blocks) pipeline model: loads weights, builds and compiles the graph."""

    model_config_cls: ClassVar[type[Any]] = NeoxBlocksConfig
    batch_processor_cls: ClassVar[type[NeoxBlocksBatchProcessor]] = (
        NeoxBlocksBatchProcessor
    )

    model: Model
    """Compiled and initialized model ready for inference."""

    norm_method: Literal["rms_norm", "layer_norm"]
    """Normalization layer."""

    attention_bias: bool = False
    """Whether to use attention bias."""

    state_dict: dict[str, Any]
    """Weights to load into the model."""

    def __init__(
        self,
        pipeline_config: PipelineConfig,
        session: InferenceSession,
        devices: list[Device],
        kv_cache_config: KVCacheConfig,
        weights: Weights,
        *,
        memory_plan: MemoryPlan,
        adapter: WeightsAdapter | None = None,
        return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        max_batch_size: int = 1,
    ) -> None:
        """
        Args:
            pipeline_config: The configuration for this pipeline.
            session: The container for the runtime for this model.
        """
        super().__init__(
            pipeline_config,
            session,
            devices,
            kv_cache_config,
            weights,
            adapter=adapter,
            return_logits=return_logits,
            return_hidden_states=return_hidden_states,
            max_batch_size=max_batch_size,
            memory_plan=memory_plan,
        )
        self.model = self.load_model(session)

    def prepare_initial_token_inputs(
        self,
        replica_batches: Sequence[Sequence[TextContext]],
        kv_cache_inputs: KVCacheInputs[Buffer, Buffer] | None = None,
        return_n_logits: int = 1,
    ) -> NeoxBlocksInputs:
        """Delegates to the batch processor and narrows to ``NeoxBlocksInputs``."""
        inputs = super().prepare_initial_token_inputs(
            replica_batches,
            kv_cache_inputs=kv_cache_inputs,
            return_n_logits=return_n_logits,
        )
        assert isinstance(inputs, NeoxBlocksInputs)
        return inputs

    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        assert isinstance(model_inputs, NeoxBlocksInputs)
        assert model_inputs.kv_cache_inputs is not None
        model_outputs = self.model.execute(*model_inputs.buffers)

        assert self.batch_processor is not None
        return self.batch_processor.process_outputs(model_outputs)

    def _create_model_config(self, state_dict: dict[str, Any]) -> Any:
        model_config = NeoxBlocksConfig.initialize(
            self.pipeline_config, max_seq_len=self.max_seq_len
        )
        model_config.finalize(
            huggingface_config=self.huggingface_config,
            state_dict=state_dict,
            norm_method=self.norm_method,
            attention_bias=self.attention_bias,
            return_logits=self.return_logits,
            return_hidden_states=self.return_hidden_states,
        )
        return model_config

    @traced
    def load_model(self, session: InferenceSession) -> Model:
        """Loads the decoder graph :meth:`graph_specs` returns.

        A subclass that still overrides ``_build_graph_for_compile`` loads
        through that hook instead.

        Args:
            session: The session that compiles and initializes the graph.

        Returns:
            The initialized decoder.
        """
        # TODO(kathywu): Drop once every subclass implements graph_specs.
        if (
            type(self)._build_graph_for_compile
            is not GraphPipelineModelWithKVCache._build_graph_for_compile
        ):
            return super().load_model(session)
        return self.load_graphs(session)[GraphRole.DECODER]

    @traced
    def load_graphs(self, session: InferenceSession) -> dict[str, Model]:
        """Compiles and initializes the graphs :meth:`graph_specs` returns.

        Sets up the distributed runtime with ``_init_distributed_runtime``
        first, since the graphs depend on it, and wires the batch processor
        with ``_wire_batch_processor`` after.

        Args:
            session: The session that compiles and initializes the graphs.

        Returns:
            The initialized models, keyed by role.
        """
        state_dict = self._load_state_dict()
        model_config = self._create_model_config(state_dict)
        self._init_distributed_runtime(session, model_config)
        with CompilationTimer("model") as timer:
            specs = self.graph_specs(model_config)
            timer.mark_build_complete()
            self.compiled_artifacts = compile_graphs(session, specs)
            models = init_graphs(session, self.compiled_artifacts, specs)
        self._maybe_release_host_weights(*models.values())
        self._wire_batch_processor(models[GraphRole.DECODER], model_config)
        return models

    def _load_state_dict(self) -> dict[str, Any]:
        self.state_dict = super()._load_state_dict()
        return self.state_dict

    def graph_specs(self, model_config: Any) -> dict[str, GraphSpec]:
        """Returns the single-device decoder graph. [audit-ok: lineage or a true statement about this port]"""
        assert isinstance(model_config, NeoxBlocksConfig)
        if model_config.data_parallel_degree > 1 or len(self.devices) > 1:
            raise ValueError("the GPTNeoXForCausalLM port runs on a single device")
        return {GraphRole.DECODER: self._single_device_spec(model_config)}

    def _single_device_spec(self, model_config: NeoxBlocksConfig) -> GraphSpec:
        single_model = NeoxBlocks(model_config)
        single_model.load_state_dict(
            drop_computed_buffers(self.state_dict),
            override_quantization_encoding=True,
            weight_alignment=1,
            strict=True,
        )
        return GraphSpec(
            single_model,
            "neox_blocks",
            self._bind_graph_inputs(single_model.input_tree(self.kv_params)),
            weights=single_model.state_dict(),
        )


class NeoxBlocksModel(NeoxBlocksModelBase):
    """GPT-NeoX (blocks) pipeline model (single device). [audit-ok: lineage or a true statement about this port]"""

    config_class: type[NeoxBlocksConfig] = NeoxBlocksConfig
    norm_method: Literal["rms_norm", "layer_norm"] = "layer_norm"
    """Normalization layer: LayerNorm with weight and bias. [audit-ok: backed by code in another module of this port (see neox_blocks.py / model.py)]"""

    def __init__(
        self,
        pipeline_config: PipelineConfig,
        session: InferenceSession,
        devices: list[Device],
        kv_cache_config: KVCacheConfig,
        weights: Weights,
        *,
        memory_plan: MemoryPlan,
        adapter: WeightsAdapter | None = None,
        return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        max_batch_size: int = 1,
    ) -> None:
        super().__init__(
            pipeline_config,
            session,
            devices,
            kv_cache_config,
            weights,
            adapter=adapter,
            return_logits=return_logits,
            return_hidden_states=return_hidden_states,
            max_batch_size=max_batch_size,
            memory_plan=memory_plan,
        )
