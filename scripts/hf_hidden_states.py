"""Capture the Hugging Face reference's per-block hidden states for the stages layer-diff compares.

Forward hooks on the same modules the MAX side taps (``embed_tokens``, each
block, its ``self_attn`` and ``mlp``, the final ``norm``), plus the logits,
from one forward pass with ``output_hidden_states=True``. Hooks are needed
because transformers 5 replaces the last entry of ``hidden_states`` with the
final norm's output, so the last block's own output is not in that tuple.

The model comes from ``hf_reference.load`` (eager attention unless asked
otherwise), like every other reference in the skill; layer-diff checks its
logits for flatness before the MAX capture graph is built.

Imports torch and transformers (only when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cli_support import ScriptError
from max_hidden_states import BLOCK_LIST_ATTRS, tap_names


@dataclass
class HFCapture:
    """Every tapped stage's output (float32 numpy, [tokens, ...]) and the logits."""

    stages: dict[str, Any]
    logits: Any
    num_blocks: int


def decoder_of(hf: Any) -> Any:
    """The module holding the block list (``model.model`` for most causal LMs)."""
    candidates = []
    getter = getattr(hf, "get_decoder", None)
    if callable(getter):
        try:
            candidates.append(getter())
        except Exception:  # noqa: BLE001 - some models do not implement it
            pass
    candidates += [getattr(hf, "model", None), getattr(hf, "transformer", None), hf]
    for candidate in candidates:
        if candidate is not None and any(getattr(candidate, a, None) is not None for a in BLOCK_LIST_ATTRS):
            return candidate
    raise ScriptError(f"cannot find the block list of {type(hf).__name__} (looked for {', '.join(BLOCK_LIST_ATTRS)})")


def capture_reference(hf: Any, token_ids: list[int], sublayer: bool) -> HFCapture:
    """Run ``hf`` once on ``token_ids`` and return the tapped outputs and logits."""
    import torch

    decoder = decoder_of(hf)
    names = tap_names(decoder, sublayer)
    modules = {id(m): m for m in decoder.modules()}
    captured: dict[str, Any] = {}
    handles = []

    def record(name: str):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            value = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(value):
                captured[name] = value.detach()
        return hook

    for module_id, name in names.items():
        if module_id in modules:
            handles.append(modules[module_id].register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            output = hf(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    stages = {name: _rows(value) for name, value in captured.items()}
    num_blocks = sum(1 for name in names.values() if name.count(".") == 1)
    return HFCapture(stages=stages, logits=_rows(output.logits), num_blocks=num_blocks)


def _rows(value: Any) -> Any:
    """A [1, tokens, ...] or [tokens, ...] tensor as a float32 numpy array [tokens, ...]."""
    array = value.float().cpu().numpy()
    return array[0] if array.ndim >= 3 and array.shape[0] == 1 else array
