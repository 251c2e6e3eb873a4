"""Catalog of the building blocks a port copies (``scaffold --with NAME ...``): name, file, version, content hash, what it provides.

This module is metadata only (standard library; it imports no block, no max):
scaffold reads it with ``catalog()``. Each block file is self-contained (max,
numpy and the standard library only), so a port copies any subset into its
own ``blocks/`` folder and imports them relatively (``from .blocks.norms
import LayerNormF32``); a ``--custom-architectures`` port cannot import the
skill's scripts.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

BLOCKS_DIR = Path(__file__).resolve().parent
PORT_SUBPACKAGE = "blocks"  # folder inside the port that receives the copies


@dataclass(frozen=True)
class Block:
    """One copyable block: ``NAME`` for ``--with`` is ``name``; ``file`` lives next to this catalog."""

    name: str
    file: str
    provides: tuple[str, ...]
    summary: str


BLOCKS: tuple[Block, ...] = (
    Block("norms", "norms.py", ("LayerNormF32", "RMSNormF32"),
          "LayerNorm with weight and bias / weight only / weightless, RMSNorm with (1 + w), all in float32"),
    Block("attention", "attention.py", ("BiasedAttention", "RopeLayout", "build_rope", "rope_leading"),
          "attention with biased q/k/v/o; RoPE full, partial (leading slice), interleaved or none; sliding window; "
          "a norm_qk hook for QK norms"),
    Block("qkv_split", "qkv_split.py",
          ("split_concatenated", "split_per_head_interleaved", "split_grouped", "split_fused", "conv1d_transposed"),
          "weight-adapter helpers: fused QKV splits and a dtype-safe Conv1D transpose"),
    Block("mlp", "mlp.py", ("UngatedMLP", "activation", "ACTIVATIONS"),
          "ungated MLP with biases and transformers activation names (gelu, gelu_new, relu, relu2, silu, ...)"),
    Block("residual", "residual.py", ("ParallelResidualBlock", "SequentialResidualBlock"),
          "parallel residual (one shared norm or two) and sequential residual with optional post-norms"),
    Block("head", "head.py", ("ScaledLMHead", "logits_scaling_divisor"),
          "LM head with a logit multiplier and final softcap; MAX's logits_scaling divides"),
    Block("positions", "positions.py", ("LearnedPositionEmbedding", "token_positions"),
          "learned absolute positions (with an index offset) in ragged batches with a KV cache"),
    Block("moe", "moe.py", ("DenseMoE", "RouterScore", "routing_weights"),
          "CPU-safe dense MoE: softmax or sigmoid router, top-k, renormalization, shared expert with sigmoid gate"),
    Block("softcap_attention", "softcap_attention.py",
          ("SoftcapAttention", "packed_kv_cache_shape", "token_positions"),
          "attention formed with graph ops over a packed paged KV cache: soft-capped scores, any score scale, "
          "per-layer causal or sliding-window mask, full-head RoPE"),
)


def block_version(path: Path) -> str:
    """The ``BLOCK_VERSION`` string assigned at the top level of a block file (read with ast, not imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "BLOCK_VERSION"
                                                 for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise ValueError(f"{path.name} has no top-level BLOCK_VERSION string")


def content_hash(path: Path) -> str:
    """sha256 of the block file's bytes (what a port's manifest records next to the version)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find(name: str) -> Block:
    """The block called ``name``; unknown names raise ``KeyError`` listing the known ones."""
    for block in BLOCKS:
        if block.name == name:
            return block
    raise KeyError(f"unknown block {name!r}; known: {', '.join(b.name for b in BLOCKS)}")


def catalog() -> list[dict]:
    """Every block as a JSON-ready dict: name, file, path, version, sha256, provides, summary."""
    rows = []
    for block in BLOCKS:
        path = BLOCKS_DIR / block.file
        rows.append({"name": block.name, "file": block.file, "path": str(path), "version": block_version(path),
                     "sha256": content_hash(path), "provides": list(block.provides), "summary": block.summary})
    return rows
