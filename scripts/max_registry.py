"""What the installed MAX registers, read from its source files without importing it.

MAX declares its built-in architectures in one table in
``max/pipelines/architectures/__init__.py`` (a list of ``_LazyArch(name,
module, symbol, speculates_on=...)`` entries). This module parses that table
with ``ast`` and follows each entry to the ``SupportedArchitecture(...)`` call
that defines it, to learn its task, pipeline model and config class. Importing
``max.pipelines`` instead takes seconds and pulls in torch.

It also holds the donor facts (:data:`DONOR_TRAITS`, :data:`DONOR_MEASUREMENTS`)
and :func:`config_keys_read`, which lists the Hugging Face config keys a MAX
package reads. Used by list-archs, inspect and check-walls.
"""

from __future__ import annotations

import ast
import bisect
import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cli_support
import max_compat

MODULE_V3_SUFFIX = "_ModuleV3"
TEXT_GENERATION = "text_generation"

# The MAX version the measurements and traits below were taken on.
MEASURED_MAX_VERSION = max_compat.CHECKED_MAX_RELEASE

# How each donor's native MAX graph did on the CPU in float32 against transformers,
# measured on MAX 26.7 by serving a strong-init 2-layer fp32 replica
# (make_tiny_model defaults: weight std 0.3, random norm weights) and comparing
# echo logprobs with compare_layers. "match": within tolerance, "diverged":
# builds and serves but disagrees with HF, "fail": does not build or serve.
# "max_abs_diff" is the max |delta logprob| over all scored prompt positions.
# Default-init replicas (std 0.02, norm weights 1) hide graph bugs, so earlier
# "match" claims made with them were re-measured. Donors not listed are "unmeasured".
REPLICA_DESCRIPTION = "strong-init 2-layer fp32 replica (make_tiny_model defaults)"
DONOR_MEASUREMENTS: dict[str, dict[str, Any]] = {
    "llama3": {"cpu_fp32": "match", "max_abs_diff": 1.7e-5},
    "phi3": {"cpu_fp32": "fail",
             "why": "graph build fails for a Phi-4-mini-style config (partial_rotary_factor 0.75 + LongRoPE): "
                    "MAX's phi3 ignores partial_rotary_factor, so the LongRoPE factor list is shorter than "
                    "head_dim/2 (DivOp shape error); a full-rotary Phi-3 config is unmeasured with strong init"},
    "qwen2": {"cpu_fp32": "match", "max_abs_diff": 5.8e-5},
    "olmo": {"cpu_fp32": "match", "max_abs_diff": 1.1e-5},
    "olmo2": {"cpu_fp32": "match", "max_abs_diff": 8.0e-6,
              "why": "QK-norm eps is fixed at 1e-6 (olmo2.py never passes rms_norm_eps to Olmo2Attention); "
                     "a 0.398 divergence seen once on another replica was not reproduced"},
    "granite": {"cpu_fp32": "match", "max_abs_diff": 1.4e-5},
    "qwen3": {"cpu_fp32": "fail", "why": "creates GPU allreduce devices"},
    "mistral": {"cpu_fp32": "fail", "why": "no float32 encoding"},
    "gemma3": {"cpu_fp32": "fail", "why": "no float32 encoding"},
}


def measurement_note(measured: dict[str, Any]) -> str | None:
    """One line saying what was measured for a donor, on which MAX, with which replica; None if unmeasured."""
    if not measured:
        return None
    if measured["cpu_fp32"] == "fail":
        return f"{measured['why']} (MAX {MEASURED_MAX_VERSION})"
    note = (f"max |delta logprob| {measured['max_abs_diff']:.2g} vs HF, {REPLICA_DESCRIPTION}, "
            f"MAX {MEASURED_MAX_VERSION}")
    return f"{note}; {measured['why']}" if "why" in measured else note


@dataclass(frozen=True)
class DonorTraits:
    """The block shape of a MAX text-generation family, read from MAX 26.7 source.

    ``features`` are the ``delta_signals`` codes the family's graph implements
    (plus the router kinds ``topk_softmax_router``, Mixtral-style softmax, top-k, renormalized,
    and ``sigmoid_router``, per-expert sigmoid scores).
    ``optional`` is the subset the graph switches on only when the config or
    the weights ask for it, so a model without them costs nothing to remove.
    """

    attention: str
    mlp: str
    norm: str
    features: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()


def _traits(attention: str, mlp: str, norm: str, *features: str, optional: tuple[str, ...] = ()) -> DonorTraits:
    return DonorTraits(attention, mlp, norm, frozenset(features) | frozenset(optional), frozenset(optional))


# What every family that builds the llama3 graph (llama3/llama3.py) gets: fused qkv_proj and
# gate_up_proj are detected from the weights (llama3/model_config.py:465-470); embedding/residual/
# attention multipliers and logits_scaling (model_config.py:274-278, 323-377) and clip_qkv
# (model_config.py:375, llama3.py:172) are read from the HF config. MLP is always SiLU.
# The same config fields as code signals: attention_multiplier is the score scale, embedding_multiplier
# scales the embeddings, logits_scaling divides the logits (a multiplier needs its reciprocal).
_LLAMA3_GRAPH = ("fused_qkv", "fused_gate_up", "mup_multipliers", "attention_scaling", "attention_scale",
                 "embedding_scale", "logit_scale", "qkv_clip")

# An explicit head_dim (heads x head_dim != hidden_size) is honoured only where both the attention projections
# and the RoPE table use it. The llama3 graph does not: its q/k/v and KV cache take head_dim from the config
# (lib/interfaces/arch_config.py:241-249 via llama3/model_config.py:204), but llama3/llama3.py:95-104 calls
# create_rope_embedding(hidden_size, num_attention_heads) (llama3/model_config.py:62-104), whose table is
# dim // n_heads wide (max/nn/rotary_embedding.py:78). So llama3, granite, phi3, qwen2 and olmo (same graph) and
# lfm2 (lfm2/lfm2.py:313-322, same call) lack it. Donors that pass head_dim to their RoPE table, cited below,
# have it as an optional feature: it costs nothing on a model whose head_dim is hidden / heads.
HEAD_DIM_OVERRIDE = "head_dim_override"

# Slug -> block shape, for the families a port usually starts from. Checked trait by trait
# against the MAX 26.7 source under max/pipelines/architectures/<slug>/; "unknown" marks a
# trait the code does not settle.
DONOR_TRAITS: dict[str, DonorTraits] = {
    "llama3": _traits("GQA, full RoPE (llama3/longrope scaling); optional clip_qkv and attention multiplier; "
                      "HF attention_bias is not read (always no bias)", "gated SiLU (SwiGLU)",
                      "RMSNorm, pre-norm", optional=_LLAMA3_GRAPH),
    "granite": _traits("same graph and config class as llama3 (GQA, full RoPE, attention multiplier)",
                       "gated SiLU (SwiGLU)", "RMSNorm, pre-norm; MuP multipliers read by the llama3 config",
                       optional=_LLAMA3_GRAPH),
    "phi3": _traits("llama3 graph: GQA, fused qkv_proj when present, full RoPE only (partial_rotary_factor "
                    "is not read), longrope scaling", "gated SiLU, fused gate_up_proj when present",
                    "RMSNorm, pre-norm", optional=_LLAMA3_GRAPH),
    "qwen2": _traits("llama3 graph with q/k/v bias always on, GQA, full RoPE", "gated SiLU (SwiGLU)",
                     "RMSNorm, pre-norm", "attention_bias", optional=_LLAMA3_GRAPH),
    # head_dim: qwen3/qwen3.py:306-311 (RoPE head_dim=kv_params.head_dim), kv_params from arch_config.py:241.
    "qwen3": _traits("GQA, RoPE, per-head RMSNorm QK-norm (always on)",
                     "gated SiLU, or MoE (Qwen3Moe: softmax, top-k, always renormalized) when num_experts > 0",
                     "RMSNorm, pre-norm", "qk_norm",
                     optional=("moe", "router", "topk_softmax_router", "router_renormalize", HEAD_DIM_OVERRIDE)),
    "olmo": _traits("llama3 graph: MHA/GQA, full RoPE, optional clip_qkv", "gated SiLU (SwiGLU)",
                    "LayerNorm without learnable weight or bias (ConstantLayerNorm), pre-norm", "layernorm_weightless",
                    optional=_LLAMA3_GRAPH),
    # head_dim: olmo2/olmo2.py:51-56 (RoPE head_dim=kv_params.head_dim), kv_params from arch_config.py:241.
    "olmo2": _traits("MHA/GQA, RoPE, full-width QK-norm (across all heads)", "gated SiLU (SwiGLU)",
                     "RMSNorm, post-norm (after attention and MLP, no input norm)",
                     "qk_norm", "qk_norm_full_width", "post_norm", optional=("fused_gate_up", HEAD_DIM_OVERRIDE)),
    "olmo3": _traits("GQA, full-width QK-norm (use_qk_norm), sliding/full layer types; plain RoPE on "
                     "sliding layers, YaRN on full layers", "gated SiLU (SwiGLU)", "RMSNorm, post-norm",
                     "post_norm", "sliding_window", "per_layer_attention", "rope_per_layer_type",
                     # head_dim: olmo3/olmo3.py:86-104 (both RoPE tables), olmo3/model_config.py:189.
                     optional=("qk_norm", "qk_norm_full_width", HEAD_DIM_OVERRIDE)),
    # head_dim: mistral/mistral.py:46-49 (RoPE), mistral/model_config.py:146 (KV params).
    "mistral": _traits("GQA, RoPE, explicit head_dim; no sliding window", "gated SiLU (SwiGLU)",
                       "RMSNorm, pre-norm", optional=(HEAD_DIM_OVERRIDE,)),
    "gemma3": _traits("GQA, RoPE (separate local/global theta), per-head QK-norm, sliding/global layers; "
                      "softcaps and query_pre_attn_scalar are read into the config but not used by the graph",
                      "gated MLP with configurable activation (gelu_tanh)",
                      "RMSNorm (1 + weight), sandwich norms", "qk_norm", "sliding_window", "per_layer_attention",
                      "sandwich_norm", "norm_offset", "embedding_scale", "activation", "rope_per_layer_type",
                      # head_dim: gemma3/gemma3.py:80-96 (both RoPE tables), gemma3/model_config.py:194.
                      optional=(HEAD_DIM_OVERRIDE,)),
    "deepseekV2": _traits("MLA (latent KV)",
                          "MoE with shared experts after first_k_dense_replace dense layers; softmax router, "
                          "greedy or group-limited top-k, no renormalization",
                          # MLA: RoPE is qk_rope_head_dim wide (deepseekV2/deepseekV2.py:55-56), which HF's
                          # config sets as head_dim (configuration_deepseek_v2.py: head_dim = qk_rope_head_dim).
                          "RMSNorm, pre-norm", "mla", "shared_experts", "router",
                          optional=("moe", HEAD_DIM_OVERRIDE)),
    "deepseekV3": _traits("MLA (latent KV)", "MoE with shared experts; sigmoid router with correction bias, "
                          "grouped top-k", "RMSNorm, pre-norm", "mla", "moe", "shared_experts", "router",
                          # MLA: RoPE is qk_rope_head_dim wide (deepseekV3/deepseekV3.py:786-799), HF's head_dim.
                          "sigmoid_router", optional=(HEAD_DIM_OVERRIDE,)),
    "gpt_oss": _traits("GQA, RoPE (yarn), sliding/full layers, attention sinks, optional q/k/v bias",
                       "MoE: router with bias, top-k then softmax; clamped GLU experts with biases (not SwiGLU)",
                       "RMSNorm, pre-norm", "moe", "router", "mlp_bias", "sliding_window", "per_layer_attention",
                       # head_dim: gpt_oss/gpt_oss.py:87-92 (RoPE), gpt_oss/model_config.py:336.
                       "attention_scaling", optional=("attention_bias", HEAD_DIM_OVERRIDE)),
    "llama4": _traits("GQA, chunked attention on RoPE layers, NoPE layers with temperature tuning, "
                      "weightless L2 QK-norm (use_qk_norm)",
                      "MoE on moe_layers (sigmoid top-k router, shared expert), gated SiLU MLP elsewhere",
                      "RMSNorm, pre-norm", "moe", "shared_experts", "router", "sigmoid_router", "nope_layers",
                      "sliding_window",
                      # head_dim: llama4/llama4.py:112-117 (RoPE), llama4/model_config.py:244-249.
                      optional=("qk_norm", HEAD_DIM_OVERRIDE)),
    "minimax_m2": _traits("GQA, partial RoPE (partial_rotary_factor), full-width QK-norm (across heads)",
                          "MoE on every layer: sigmoid router with correction bias, SwiGLU experts",
                          "RMSNorm, pre-norm", "moe", "router", "sigmoid_router", "qk_norm", "qk_norm_full_width",
                          # head_dim: minimax_m2/minimax_m2.py:455-460 (RoPE head_dim=kv_params.head_dim).
                          optional=("partial_rotary", HEAD_DIM_OVERRIDE)),
    "mamba": _traits("none (selective state space)", "none", "RMSNorm", "ssm"),
    "lfm2": _traits("hybrid: short convolution layers + GQA layers with per-head QK-norm (layer_types)",
                    "gated SiLU", "RMSNorm", "ssm", "qk_norm", "per_layer_attention"),
    "nemotron_h": _traits("hybrid Mamba-2 + GQA attention without RoPE (the source notes its SSD kernels are not "
                          "yet in the builtin kernel library)",
                          "non-gated relu2 MLP, or MoE (sigmoid router, shared expert) per layer pattern",
                          # head_dim: no RoPE table; attention is head_dim wide (nemotron_h/nemotron_h.py:522-526,
                          # nemotron_h/model_config.py:100-111).
                          "RMSNorm", "ssm", "nope_layers",
                          optional=("moe", "shared_experts", "router", "sigmoid_router", HEAD_DIM_OVERRIDE)),
}

# Files in an architecture package that only wire things up; any other module
# (or a ``layers`` folder) means the package builds its own graph.
_WIRING_MODULES = {"__init__", "arch", "model", "model_config", "weight_adapters", "batch_processor",
                   "tokenizer", "recipes"}


@dataclass(frozen=True)
class Registration:
    """One entry of MAX's architecture table."""

    name: str
    slug: str
    symbol: str
    task: str | None = None
    speculates_on: str | None = None
    pipeline_model: str | None = None
    pipeline_model_from: str | None = None  # slug the pipeline model class is imported from
    config_class: str | None = None
    config_class_from: str | None = None  # slug the config class is imported from

    @property
    def module_v3(self) -> bool:
        return self.name.endswith(MODULE_V3_SUFFIX)


def architectures_dir() -> Path:
    """``max/pipelines/architectures`` of the installed MAX (ScriptError when missing)."""
    path = Path(cli_support.max_package_dir()) / "pipelines" / "architectures"
    if not (path / "__init__.py").is_file():
        raise cli_support.ScriptError(f"MAX is installed but {path}/__init__.py is missing")
    return path


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        return None  # NUL bytes are a ValueError; nesting too deep for the parser a RecursionError


def _const(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def read_table(arch_dir: Path | None = None) -> list[Registration]:
    """Every ``_LazyArch`` entry of MAX's table, in table order (fast: one file)."""
    arch_dir = arch_dir or architectures_dir()
    tree = _parse(arch_dir / "__init__.py")
    if tree is None:
        raise cli_support.ScriptError(f"cannot parse MAX's architecture table {arch_dir / '__init__.py'} "
                                      "(unreadable, not UTF-8 or not Python); reinstall MAX")
    entries = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_LazyArch"):
            continue
        values = [_const(a) for a in node.args]
        values += [None] * (4 - len(values))
        for keyword in node.keywords:
            index = {"name": 0, "module": 1, "symbol": 2, "speculates_on": 3}.get(keyword.arg or "")
            if index is not None:
                values[index] = _const(keyword.value)
        name, module, symbol, speculates_on = values[:4]
        if name and module and symbol:
            entries.append(Registration(name=name, slug=module.lstrip("."), symbol=symbol,
                                        speculates_on=speculates_on))
    if not entries:
        raise cli_support.ScriptError(
            f"found no architecture table in {arch_dir / '__init__.py'}; this MAX version is not supported")
    return entries


def _find_definition(package: Path, symbol: str, depth: int = 0) -> tuple[Path, ast.Module] | None:
    """The module of ``package`` that assigns ``symbol``, following ``from .x import symbol``."""
    init = package / "__init__.py"
    candidates = [init] if init.is_file() else []
    candidates += [package / "arch.py"]
    for path in candidates:
        tree = _parse(path)
        if tree is None:
            continue
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == symbol for t in targets):
                    return path, tree
            if isinstance(node, ast.ImportFrom) and node.level == 1 and depth < 3:
                if any((a.asname or a.name) == symbol for a in node.names) and node.module:
                    target = package / (node.module.replace(".", "/") + ".py")
                    if target.is_file() and target != path:
                        found = _assignment_in(target, symbol)
                        if found:
                            return found
                    sub = package / node.module.replace(".", "/")
                    if sub.is_dir():
                        return _find_definition(sub, symbol, depth + 1)
    return None


def _assignment_in(path: Path, symbol: str) -> tuple[Path, ast.Module] | None:
    tree = _parse(path)
    if tree is None:
        return None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == symbol for t in targets):
            return path, tree
    return None


def _imported_from(tree: ast.Module, name: str, own_slug: str) -> str:
    """Slug a name is imported from (``..llama3.model`` -> llama3); own slug otherwise."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return _slug_of_import(node) or own_slug
    return own_slug


def _module_file(base_dir: Path, module: str) -> Path | None:
    """``a.b`` under ``base_dir`` as ``a/b.py`` or ``a/b/__init__.py``."""
    stem = base_dir / module.replace(".", "/")
    for path in (stem.with_suffix(".py"), stem / "__init__.py"):
        if path.is_file():
            return path
    return None


def _arch_keywords(path: Path, symbol: str, depth: int = 0) -> dict[str, ast.AST] | None:
    """Keyword arguments of the call assigned to ``symbol`` in ``path``.

    Follows ``dataclasses.replace(base, ...)``, also when ``base`` is imported
    from a sibling module or another architecture package.
    """
    tree = _parse(path)
    if tree is None or depth > 4:
        return None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level in (1, 2):
            if any((a.asname or a.name) == symbol for a in node.names):
                base_dir = path.parent if node.level == 1 else path.parent.parent
                original = next(a.name for a in node.names if (a.asname or a.name) == symbol)
                target = _module_file(base_dir, node.module)
                return _arch_keywords(target, original, depth + 1) if target else None
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
            continue
        if not any(isinstance(t, ast.Name) and t.id == symbol for t in node.targets):
            continue
        call = node.value
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        func = call.func
        func_name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if func_name == "replace" and call.args and isinstance(call.args[0], ast.Name):
            base = _arch_keywords(path, call.args[0].id, depth + 1) or {}
            return {**base, **keywords}
        return keywords
    return None


def _details(arch_dir: Path, entry: Registration) -> Registration:
    """Fill task, pipeline model and config class from the ``SupportedArchitecture(...)`` call."""
    found = _find_definition(arch_dir / entry.slug, entry.symbol)
    if found is None:
        return entry
    path, tree = found
    keywords = _arch_keywords(path, entry.symbol)
    if keywords is None:
        return entry
    task = keywords.get("task")
    task_value = task.attr.lower() if isinstance(task, ast.Attribute) else None
    model = keywords.get("pipeline_model")
    config = keywords.get("config")
    model_name = model.id if isinstance(model, ast.Name) else None
    config_name = config.id if isinstance(config, ast.Name) else None
    return Registration(
        name=entry.name, slug=entry.slug, symbol=entry.symbol, task=task_value,
        speculates_on=entry.speculates_on, pipeline_model=model_name,
        pipeline_model_from=_imported_from(tree, model_name, entry.slug) if model_name else None,
        config_class=config_name,
        config_class_from=_imported_from(tree, config_name, entry.slug) if config_name else None,
    )


def registrations(with_details: bool = True) -> list[Registration]:
    """Every registration in MAX's table; with details, also each one's task and classes."""
    arch_dir = architectures_dir()
    entries = read_table(arch_dir)
    return [_details(arch_dir, e) for e in entries] if with_details else entries


def match(name: str, entries: list[Registration]) -> list[Registration]:
    """The registrations for exactly this class name (speculators excluded)."""
    return [e for e in entries if e.name == name and not e.speculates_on]


def close_names(name: str, entries: list[Registration], limit: int = 5) -> list[str]:
    """Registered names close to ``name``: case-insensitive, substring, then fuzzy."""
    names = sorted({e.name for e in entries if not e.speculates_on})
    lowered = name.lower()
    exact_case = [n for n in names if n.lower() == lowered]
    stem = lowered.replace(MODULE_V3_SUFFIX.lower(), "")
    for suffix in ("forcausallm", "forconditionalgeneration", "model"):
        stem = stem.removesuffix(suffix) if len(stem) > len(suffix) else stem
    substring = [n for n in names if stem and stem in n.lower() and n not in exact_case]
    fuzzy = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    result: list[str] = []
    for n in exact_case + substring + fuzzy:
        if n not in result and n != name:
            result.append(n)
    return result[:limit]


def has_own_graph(arch_dir: Path, slug: str) -> bool:
    """True when the package has modules beyond wiring (arch/model/config/adapters)."""
    package = arch_dir / slug
    for child in package.iterdir():
        stem = child.stem if child.suffix == ".py" else child.name
        if child.name == "__pycache__" or stem in _WIRING_MODULES:
            continue
        if child.suffix == ".py" or (child.is_dir() and (child / "__init__.py").is_file()):
            return True
    return False


@dataclass
class Donor:
    """A text-generation family a port can start from."""

    slug: str
    names: list[str]
    module_v3: bool
    graph: str  # "own" or "reuses <slug>"
    attention: str
    mlp: str
    norm: str
    cpu_fp32: str  # "match", "diverged", "fail" or "unmeasured"
    cpu_fp32_note: str | None = None
    config_class: str | None = None
    config_class_from: str | None = None
    reuses: list[str] = field(default_factory=list)


def donors(entries: list[Registration] | None = None, include_module_v3: bool = False) -> list[Donor]:
    """The text-generation slugs usable as donors, in table order."""
    arch_dir = architectures_dir()
    entries = entries if entries is not None else registrations()
    by_slug: dict[str, list[Registration]] = {}
    for entry in entries:
        if entry.task != TEXT_GENERATION or entry.speculates_on:
            continue
        if entry.module_v3 and not include_module_v3:
            continue
        by_slug.setdefault(entry.slug, []).append(entry)
    result = []
    for slug, regs in by_slug.items():
        if all(is_draft_model(r.name) for r in regs):
            continue
        first = regs[0]
        reuses = sorted(s for s in _imported_slugs(_package_files(arch_dir / slug))
                        if s != slug and (arch_dir / s).is_dir())
        if has_own_graph(arch_dir, slug) or not reuses:
            graph = "own"
        elif first.pipeline_model_from and first.pipeline_model_from != slug:
            graph = f"reuses {first.pipeline_model_from}"
        else:
            graph = f"reuses {reuses[0]}"
        traits = DONOR_TRAITS.get(slug.removesuffix("_modulev3"))
        measured = DONOR_MEASUREMENTS.get(slug, {})
        unknown = f"not catalogued (MAX {MEASURED_MAX_VERSION})"
        result.append(Donor(
            slug=slug, names=[r.name for r in regs], module_v3=all(r.module_v3 for r in regs), graph=graph,
            attention=traits.attention if traits else unknown, mlp=traits.mlp if traits else unknown,
            norm=traits.norm if traits else unknown,
            cpu_fp32=measured.get("cpu_fp32", "unmeasured"),
            cpu_fp32_note=measurement_note(measured),
            config_class=first.config_class, config_class_from=first.config_class_from, reuses=reuses,
        ))
    return result


_DRAFT_MARKERS = ("Eagle", "Dflash", "DFlash", "DSpark", "MTP", "NextN", "Draft", "Assistant")


def is_draft_model(name: str) -> bool:
    """True for speculative-decoding draft or fused target+draft registrations (not port donors)."""
    return any(marker in name for marker in _DRAFT_MARKERS)


# --- which config keys MAX code reads -----------------------------------------

# A name or attribute chain that holds an HF config (huggingface_config, self.config, text_cfg,
# rope_scaling...), optionally called (hf.get_text_config()).
_CONFIG_OBJECT = r"(?:config|cfg|rope_scaling|rope_parameters|rope_params)(?:\(\))?"
_CHAIN = r"[\w.]*?"
_KEY_PATTERNS = [
    re.compile(_CONFIG_OBJECT + r"\.(?P<key>[A-Za-z]\w*)\b(?!\s*\()"),
    re.compile(r"\b(?:getattr|hasattr)\(\s*" + _CHAIN + _CONFIG_OBJECT + r"\s*,\s*[\"'](?P<key>\w+)[\"']"),
    re.compile(_CONFIG_OBJECT + r"\.(?:get|pop|setdefault)\(\s*[\"'](?P<key>\w+)[\"']"),
    re.compile(_CONFIG_OBJECT + r"\[\s*[\"'](?P<key>\w+)[\"']\s*\]"),
    re.compile(r"[\"'](?P<key>\w+)[\"']\s+(?:not\s+)?in\s+" + _CHAIN + _CONFIG_OBJECT + r"\b"),
]
_NON_KEYS = {"to_dict", "get", "pop", "items", "keys", "values", "update", "setdefault", "copy",
             "get_text_config", "to_json_string"}


def keys_read_in_file(path: Path) -> dict[str, list[int]]:
    """Config keys one Python file reads, with line numbers.

    Counts ``<config>.key``, ``getattr(<config>, "key")``, ``hasattr``,
    ``<config>.get("key")``, ``<config>["key"]`` and ``"key" in <config>``,
    where ``<config>`` is a name or attribute containing "config"/"cfg" (or a
    RoPE dict). A text scan: fast, and a superset of what the code reads.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    found: dict[str, list[int]] = {}
    for pattern in _KEY_PATTERNS:
        for match in pattern.finditer(text):
            key = match.group("key")
            if key in _NON_KEYS or key.startswith("_"):
                continue
            line = bisect.bisect_right(line_starts, match.start())
            found.setdefault(key, []).append(line)
    return {key: sorted(set(lines)) for key, lines in found.items()}


def _package_files(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


_IMPORT_LINE = re.compile(r"^\s*from\s+(?:\.\.|max\.pipelines\.architectures\.)(\w+)", re.MULTILINE)


def _imported_slugs(files: list[Path]) -> set[str]:
    """Architecture slugs these files import from (``from ..llama3`` or the absolute spelling)."""
    slugs = set()
    for path in files:
        try:
            slugs.update(_IMPORT_LINE.findall(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return slugs


_ABSOLUTE_PREFIX = "max.pipelines.architectures."


def _slug_of_import(node: ast.ImportFrom) -> str | None:
    """The architecture slug an import reaches into (``..llama3.x`` or ``max.pipelines.architectures.llama3.x``)."""
    if node.level >= 2 and node.module:
        return node.module.split(".")[0]
    if node.level == 0 and node.module and node.module.startswith(_ABSOLUTE_PREFIX):
        return node.module[len(_ABSOLUTE_PREFIX):].split(".")[0]
    return None


@dataclass
class KeysRead:
    """Where a donor's code reads config keys: key -> ["slug/file.py:line", ...]."""

    config_class: dict[str, list[str]]
    anywhere: dict[str, list[str]]
    files_scanned: int


def config_keys_read(slug: str, config_class_from: str | None = None) -> KeysRead:
    """Config keys read by a donor's config module and by any of its code.

    ``config_class`` covers the ``model_config.py`` of the package that
    defines the donor's config class; ``anywhere`` covers every file of the
    donor package, of the families it imports from, and MAX's shared
    ``pipelines/lib`` helpers (for example the RoPE readers).
    """
    arch_dir = architectures_dir()
    package = arch_dir / slug
    if not package.is_dir():
        raise cli_support.ScriptError(f"MAX has no architecture package {slug!r}")
    files = _package_files(package)
    for other in sorted(_imported_slugs(files)):
        if (arch_dir / other).is_dir() and other != slug:
            files += _package_files(arch_dir / other)
    lib_dir = arch_dir.parent / "lib"
    shared = _package_files(lib_dir) if lib_dir.is_dir() else []

    def collect(paths: list[Path]) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for path in paths:
            rel = path.relative_to(arch_dir.parent).as_posix()
            for key, lines in keys_read_in_file(path).items():
                result.setdefault(key, []).extend(f"{rel}:{line}" for line in lines)
        return result

    config_package = arch_dir / (config_class_from or slug)
    config_files = [p for p in _package_files(config_package) if p.name == "model_config.py"]
    for parent in sorted(_imported_slugs(config_files)):  # a config class may subclass another family's
        config_files += [p for p in _package_files(arch_dir / parent) if p.name == "model_config.py"]
    return KeysRead(config_class=collect(config_files), anywhere=collect(files + shared),
                    files_scanned=len(files) + len(shared))


# --- what a donor needs to run here, read from its code ---------------------------------------------

# Imports or kernels that MAX 26.7 implements only for GPUs: its MoE layer (max.nn.moe) dispatches
# to grouped_matmul_ragged / moe_create_indices, which have no CPU kernel (max/nn/kernels.py).
GPU_ONLY_MARKERS = re.compile(r"\bmax\.nn\.moe\b|\bgrouped_matmul_ragged\b|from\s+max\.nn\s+import[^\n]*\bMoE\b")
_ENCODINGS = re.compile(r"SUPPORTED_ENCODINGS\s*(?::[^=]*)?=\s*(\{[^}]*\})", re.DOTALL)


@dataclass(frozen=True)
class DonorRuntime:
    """What a donor's code says about where it runs: encodings, GPU-only kernels, quantized-only blocks."""

    encodings: frozenset[str] | None  # None: the config class declares no SUPPORTED_ENCODINGS
    gpu_only: list[str]  # "file:line" of each GPU-only import or kernel
    asserts_quantized: list[str]  # "file:line" of an unconditional assert that the weights are quantized


_QUANT_ASSERT = re.compile(r"^(?P<indent>[ \t]*)assert\b[^\n]*quant", re.MULTILINE)


def _unconditional_quant_asserts(text: str, rel: str) -> list[str]:
    """Asserts on quantization at the top level of a function body (no ``if``/``for``/``with`` above them)."""
    lines = text.splitlines()
    found = []
    for match in _QUANT_ASSERT.finditer(text):
        number = text.count("\n", 0, match.start())
        indent = len(match.group("indent").expandtabs())
        for above in range(number - 1, -1, -1):
            line = lines[above]
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ")", "]", "}", "\"", "'")):
                continue
            if len(line) - len(line.lstrip()) < indent:
                if re.match(r"(async\s+)?def\b", stripped):
                    found.append(f"{rel}:{number + 1}")
                break
    return found


@lru_cache(maxsize=None)
def donor_runtime(slug: str, config_class_from: str | None = None) -> DonorRuntime:
    """Read a donor's own package for GPU-only kernels and quant asserts, its config class for encodings."""
    arch_dir = architectures_dir()
    package = arch_dir / slug
    files = _package_files(package) if package.is_dir() else []
    gpu_only, asserts = [], []  # the donor's own package: what a port copies from it
    for path in files:
        rel = path.relative_to(arch_dir.parent).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for match in GPU_ONLY_MARKERS.finditer(text):
            gpu_only.append(f"{rel}:{text.count(chr(10), 0, match.start()) + 1}")
        if path.parent == package:
            asserts += _unconditional_quant_asserts(text, rel)
    encodings = None
    config_file = arch_dir / (config_class_from or slug) / "model_config.py"
    try:
        match = _ENCODINGS.search(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        match = None
    if match:
        encodings = frozenset(re.findall(r"[\"'](\w+)[\"']", match.group(1)))
    return DonorRuntime(encodings, gpu_only[:3], asserts[:3])
