"""Capture the Hugging Face reference's per-block hidden states for the stages layer-diff compares.

The modules to tap come from ``model_anatomy.resolve_layout``, whatever the
family calls them: the token embedding (``embed_tokens``, ``embed_in``,
``word_embeddings``, ``wte``), each block, its attention (``self_attn``,
``attention``, ``self_attention``, ``attn``) and feed-forward output (the MLP
or MoE module, or the down projection when it sits on the block, as in OPT),
and the final norm (``norm``, ``final_layer_norm``, ``final_layernorm``,
``ln_f``). Forward hooks record them in one forward pass, plus the logits.
Hooks are needed because transformers 5 replaces the last entry of
``hidden_states`` with the final norm's output, so the last block's own
output is not in that tuple.

A stage the layout has no module for (a model without a final norm), or a
block output that is a stack of residual streams (Gemma 3n's AltUp), is
listed in ``HFCapture.missing`` with the reason; layer-diff reports it as not
compared.

The model comes from ``hf_reference.load`` (eager attention unless asked
otherwise), like every other reference in the skill; layer-diff checks its
logits for flatness before the MAX capture graph is built.

Imports torch and transformers (only when called).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import model_anatomy


@dataclass
class HFCapture:
    """Every tapped stage's output (float32 numpy, [tokens, ...]), the logits, and the stages not tapped."""

    stages: dict[str, Any]
    logits: Any
    num_blocks: int
    missing: dict[str, str] = field(default_factory=dict)  # stage name -> why it has no HF module


def tap_paths(layout: model_anatomy.ModelLayout, sublayer: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Stage name -> module path for every stage the layout has a module for, and stage -> reason for the rest."""
    paths: dict[str, str] = {"embedding": layout.token_embedding}
    missing: dict[str, str] = {}
    several = layout.single_stream_refusal()
    for block in layout.blocks:
        if several:  # the block outputs a stack of streams (Gemma 3n); its attention and MLP read one
            missing[f"block.{block.index}"] = f"{block.path}: {several}"
        else:
            paths[f"block.{block.index}"] = block.path
        if sublayer:
            paths[f"block.{block.index}.attention"] = block.attention.path
            feed_forward = block.mlp_output_path
            if feed_forward is None:
                missing[f"block.{block.index}.mlp"] = f"{block.path} has no MLP"
            else:
                paths[f"block.{block.index}.mlp"] = feed_forward
    if layout.final_norm is None:
        missing["final_norm"] = f"{layout.decoder or 'the model'} has no final norm"
    else:
        paths["final_norm"] = layout.final_norm
    return paths, missing


def capture_reference(hf: Any, token_ids: list[int], sublayer: bool) -> HFCapture:
    """Run ``hf`` once on ``token_ids`` and return the tapped outputs and logits."""
    import torch

    layout = model_anatomy.resolve_layout(hf)
    paths, missing = tap_paths(layout, sublayer)
    captured: dict[str, Any] = {}
    handles = []

    def record(name: str):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            value = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(value):
                captured[name] = value.detach()
        return hook

    for name, path in paths.items():
        handles.append(hf.get_submodule(path).register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            output = hf(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    for name in paths:
        if name not in captured:
            missing[name] = f"{paths[name]} returned no tensor in the forward pass"
    stages = {name: _rows(value) for name, value in captured.items()}
    return HFCapture(stages=stages, logits=_rows(output.logits), num_blocks=len(layout.blocks), missing=missing)


def _rows(value: Any) -> Any:
    """A [1, tokens, ...] or [tokens, ...] tensor as a float32 numpy array [tokens, ...]."""
    array = value.float().cpu().numpy()
    return array[0] if array.ndim >= 3 and array.shape[0] == 1 else array
