"""Build tiny random Hugging Face checkpoints for tests (no network).

``build_checkpoint`` saves a small model of a given ``model_type`` with
transformers: config, weights (safetensors single or sharded, or ``.bin``
only) and, optionally, a small trained tokenizer. These are plain
default-init checkpoints for metadata and plumbing tests; bug-catching
replicas come from ``scripts/make_tiny_model.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

# Small dimensions shared by every family.
SMALL_DIMS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

# Per-family extra fields needed to keep a tiny config valid.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "stablelm": {"partial_rotary_factor": 0.25},
}


def build_checkpoint(
    output_dir: str | Path,
    model_type: str = "llama",
    *,
    weights: str = "safetensors",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    config_overrides: dict[str, Any] | None = None,
    raw_config_edits: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny random checkpoint of ``model_type`` into ``output_dir``.

    ``weights`` is ``safetensors``, ``bin`` or ``none``. ``max_shard_size``
    (e.g. ``"100KB"``) shards the safetensors. ``raw_config_edits`` are written
    into config.json after saving (for keys transformers would not keep).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    output_dir = Path(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    fields = dict(SMALL_DIMS)
    fields.update(FAMILY_OVERRIDES.get(model_type, {}))
    fields.update(config_overrides or {})
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]  # save_pretrained of a bare config leaves it out
    if weights == "none":
        config.save_pretrained(output_dir)
    else:
        kwargs: dict[str, Any] = {}
        if max_shard_size:
            kwargs["max_shard_size"] = max_shard_size
        if weights == "bin":
            # transformers 5 always writes safetensors; write a torch pickle by hand.
            config.save_pretrained(output_dir)
            torch.save(model.state_dict(), output_dir / "pytorch_model.bin")
        else:
            model.save_pretrained(output_dir, **kwargs)
    if tokenizer:
        from tiny_tokenizer import train_bpe_tokenizer

        train_bpe_tokenizer(output_dir, vocab_size=min(512, fields["vocab_size"]))
    if raw_config_edits:
        edit_config(output_dir, raw_config_edits)
    return output_dir


def edit_config(model_dir: str | Path, edits: dict[str, Any], remove: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply key edits (and removals) to ``model_dir/config.json``; return the new config."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(edits)
    for key in remove:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def write_config(model_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write a hand-made config.json (for old-spelling fixtures); return the folder."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir
