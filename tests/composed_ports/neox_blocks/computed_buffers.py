"""Computed buffers the GPTNeoXForCausalLM port may leave out of strict weight loading.

Composed port of the building-blocks library: this file was copied from the worked
StableLM port (templates/ports/stablelm, itself scaffolded from llama3) with the
names changed; the graph (neox_blocks.py) is built from templates/blocks.

Written by scaffold.py (not copied from MAX). The port loads weights with
strict=True: a checkpoint tensor the graph does not declare, or a graph weight
the checkpoint lacks, is an error instead of a silent zero fill. Only the
buffers below, which MAX computes itself, are dropped before loading.

TODO deltas: add a suffix only for a buffer the graph computes at build time.
"""

from __future__ import annotations

from typing import Any

# Name suffixes of tensors MAX recomputes, so checkpoints may or may not carry them.
COMPUTED_BUFFER_SUFFIXES = (
    "rope_freqs.weight",  # GGUF rope frequencies; MAX builds RoPE from the config
    "rotary_emb.inv_freq",  # older HF checkpoints saved the RoPE inverse frequencies
)


def is_computed_buffer(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in COMPUTED_BUFFER_SUFFIXES)


def drop_computed_buffers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict without the allowlisted computed buffers."""
    return {name: value for name, value in state_dict.items() if not is_computed_buffer(name)}
