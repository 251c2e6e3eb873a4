"""Learned absolute position embeddings for ragged batches with a KV cache: each token's position is its index in its own sequence plus that sequence's cached length (plus an index offset).

Mirrors transformers: modeling_gpt2.py ``GPT2Model.wpe`` (offset 0),
modeling_opt.py ``OPTLearnedPositionalEmbedding`` (offset 2: row
``position + 2``), modeling_gpt_bigcode.py ``GPTBigCodeModel.wpe``.

MAX 26.7 APIs: ``ops.repeat_interleave``, ``ops.range``,
``ops.shape_to_tensor``, ``ops.gather``, ``TensorValue.rebind``,
``max.graph.Weight``; ``PagedCacheValues.cache_lengths`` (uint32, one per
sequence) is the number of tokens already cached. The per-token formula
``global_index - row_start + cache_length`` follows the pattern of
max/pipelines/architectures/llama4/layers.py (``_attention_temperature``).
Self-contained: imports only max, numpy and the standard library.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorValue, Weight, ops
from max.nn.layer import Module

BLOCK_VERSION = "1"


def token_positions(input_row_offsets: TensorValue, cache_lengths: TensorValue, total_tokens) -> TensorValue:
    """int64 absolute position of every token of a ragged batch (``total_tokens`` = ``tokens.shape[0]``)."""
    offsets = input_row_offsets.cast(DType.int64)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    cached = cache_lengths.cast(DType.int64).rebind(starts.shape)
    shift = ops.repeat_interleave(cached - starts, lengths, axis=0, out_dim=total_tokens)
    stop = ops.shape_to_tensor([total_tokens])[0]
    flat_index = ops.range(0, stop, 1, out_dim=total_tokens, dtype=DType.int64, device=input_row_offsets.device)
    return flat_index + shift


def token_positions_reference(row_offsets: np.ndarray, cache_lengths: np.ndarray) -> np.ndarray:
    """numpy twin of ``token_positions``, for tests."""
    return np.concatenate(
        [np.arange(int(cache_lengths[b]), int(cache_lengths[b]) + int(row_offsets[b + 1] - row_offsets[b]))
         for b in range(len(row_offsets) - 1)]
    ).astype(np.int64)


class LearnedPositionEmbedding(Module):
    """``weight[position + offset]`` per token; the weight is ``[num_positions + offset, hidden]``, named ``weight``."""

    def __init__(self, num_positions: int, hidden_size: int, dtype: DType, device: DeviceRef, *, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.weight = Weight("weight", dtype, (num_positions + offset, hidden_size), device=device)

    def __call__(self, input_row_offsets: TensorValue, cache_lengths: TensorValue, total_tokens) -> TensorValue:
        positions = token_positions(input_row_offsets, cache_lengths, total_tokens)
        if self.offset:
            positions = positions + self.offset
        return ops.gather(self.weight, positions.to(self.weight.device), axis=0)
