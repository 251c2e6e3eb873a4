"""Shrink a Hugging Face config into a tiny replica config, recording every change.

The replica keeps the architecture's semantics (RoPE type/theta/scaling,
norms and eps, activations, biases, softcaps, tie flag, multipliers) and
shrinks only sizes. Fields whose validity depends on the new sizes get a
rescaling rule; each rule is in ``RULES`` and every applied change is
returned as a :class:`FieldChange` for the replica manifest.

Pure dict manipulation: imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import model_source
from cli_support import ScriptError

# Why each kind of field changed; the manifest quotes these.
RULES = {
    "layers": "shortest prefix of the original layers that holds one layer of every distinct per-layer type "
              "(attention type, dense/MoE, NoPE), at least --layers; per-layer lists are cut to that prefix",
    "layers_representative": "the prefix would be too long, so the first layer of each per-layer type is kept "
                             "and per-layer fields are rewritten for the kept layers",
    "heads": "GQA ratio kept: MHA -> 4/4 heads, MQA -> 4/1, GQA (ratio g) -> 2g query heads / 2 KV heads",
    "head_dim": "set to --head-dim",
    "hidden_size": "query heads x head_dim when the original had hidden = heads x head_dim, else --hidden-size",
    "intermediate_size": "2 x the new hidden_size",
    "expert_intermediate_size": "new hidden_size / 2",
    "experts": "at most 4 experts",
    "experts_per_tok": "at most 2 experts per token (and never more than the experts kept)",
    "vocab_size": "the size of the replica's tokenizer (the real vocab size is kept with the real tokenizer)",
    "max_position_embeddings": "at most 2048 (never below original_max_position_embeddings), unchanged when "
                               "the RoPE scaling type reads it (yarn, longrope, dynamic)",
    "sliding_window": "shrunk to --sliding-window so sliding and full attention differ on a short prompt",
    "query_pre_attn_scalar": "followed head_dim (or hidden/heads) when it equalled it, else scaled by the "
                             "head_dim ratio",
    "rope_factor_list": "longrope factor lists resampled (evenly spaced entries) to rotary_dim / 2",
    "max_window_layers": "number of leading full-attention layers kept, so the same layers slide",
    "layer_index_list": "layer indices remapped to the kept layers",
    "special_token_id": "the replica tokenizer's token of the same role (bos/eos/pad)",
    "dtype": "the dtype the replica weights are saved in",
    "text_only": "the language model of a multimodal config, as its own causal-LM config",
}

# When the source is already small, its shapes are kept so the named model compiles to the same graph
# as its replica (MAX's compile cache serves the second start in seconds instead of a second cold compile).
KEEP_SHAPES_RULE = ("the source is small enough: every layer is kept by the layer rule, and hidden <= {hidden}, "
                    "intermediate and expert widths <= {intermediate}, heads and KV heads <= {heads}, head_dim <= "
                    "{head_dim}, experts <= {experts}, vocab <= {vocab}, positions <= {positions}; then hidden, "
                    "heads, head_dim, intermediate, experts, vocab, positions and windows are kept as they are "
                    "(--hidden-size, --head-dim and --sliding-window apply only when tiny shrinks; "
                    "--always-shrink forces shrinking)")
# Bounds of a "small" source. A CPU compile's time barely depends on widths; these keep its weights to
# tens of MB and a forward pass to milliseconds, so such a source is as cheap to loop on as a replica.
# 4 x the default replica hidden size (64).
SMALL_SOURCE_MAX_HIDDEN = 256
# 4 x the largest small hidden size: the usual MLP ratio (2.7-4 x hidden) fits under it.
SMALL_SOURCE_MAX_INTERMEDIATE = 1024
# Small published test models have 2-16 heads; more heads means a wide model, not a test one.
SMALL_SOURCE_MAX_HEADS = 16
# The largest head_dim MAX's CPU attention kernels are routinely run with.
SMALL_SOURCE_MAX_HEAD_DIM = 256
# 2 x the replica's expert cap (4): the router still picks among a handful.
SMALL_SOURCE_MAX_EXPERTS = 8
# A 32k vocab at hidden 256 is 8M embedding parameters (32 MB in float32).
SMALL_SOURCE_MAX_VOCAB = 32768
# RoPE tables and the KV cache for this many positions are a few MB at these widths.
SMALL_SOURCE_MAX_POSITIONS = 32768

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
INDEX_LIST_KEYS = ("mlp_only_layers",)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")
EXPERT_SIZE_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size")
TOKEN_ID_ROLES = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad"}
SCALING_READS_MAX_POSITIONS = ("yarn", "longrope", "dynamic")
MAX_PREFIX_LAYERS = 8
NOT_PER_LAYER = ("architectures", "eos_token_id", "long_factor", "short_factor")


@dataclass
class ShrinkOptions:
    """Target sizes of the replica."""

    hidden_size: int = 64
    head_dim: int = 16
    min_layers: int = 2
    sliding_window: int = 4
    max_positions: int = 2048
    experts: int = 4
    experts_per_tok: int = 2
    keep_small_source: bool = True  # keep a small source's shapes (False: always shrink)


@dataclass
class FieldChange:
    """One config field the replica changed."""

    field: str
    old: Any
    new: Any
    rule: str


@dataclass
class ShrunkConfig:
    """The replica's config.json and what changed from the original."""

    config: dict[str, Any]
    changes: list[FieldChange] = field(default_factory=list)
    kept_layers: list[int] = field(default_factory=list)
    layer_signatures: list[str] = field(default_factory=list)
    text_only: bool = False
    shapes: dict[str, Any] = field(default_factory=dict)  # kept or shrunk, the rule, and why


def shrink_config(
    original: dict[str, Any],
    options: ShrinkOptions,
    *,
    layer_types: list[str] | None = None,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
    dtype: str = "float32",
    causal_lm_architecture: str | None = None,
) -> ShrunkConfig:
    """Shrink ``original`` (a raw config.json dict).

    ``layer_types`` is the per-layer attention type as transformers computes
    it (it may be derived from pattern fields the raw config does not list).
    ``vocab_size`` replaces the vocab (None keeps it). ``special_ids`` maps the
    roles bos/eos/pad to replica token ids; ids are rewritten when given.
    ``causal_lm_architecture`` names the text-only class when ``original``
    nests a ``text_config`` (multimodal).
    """
    result = ShrunkConfig(config={})
    config = copy.deepcopy(original)
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested and causal_lm_architecture:
        text = copy.deepcopy(nested)
        text["architectures"] = [causal_lm_architecture]
        for key in ("torch_dtype", "dtype", "tie_word_embeddings", *TOKEN_ID_ROLES):
            if key in config and key not in text:
                text[key] = config[key]
        result.changes.append(FieldChange("(config)", f"{config.get('model_type')} (multimodal)",
                                          f"{text.get('model_type')} ({causal_lm_architecture})", RULES["text_only"]))
        config, result.text_only = text, True

    changes = result.changes

    def set_field(key: str, new: Any, rule: str) -> None:
        old = config.get(key)
        if old != new:
            changes.append(FieldChange(key, old, new, RULES[rule]))
        config[key] = new

    too_big = small_source_problems(config, options, layer_types, vocab_size)
    keep = options.keep_small_source and not too_big
    result.shapes = {"kept": keep, "rule": keep_shapes_rule(),
                     "reasons": ["--always-shrink"] if not options.keep_small_source else too_big}
    _shrink_layers(config, options, layer_types, result, set_field)
    if keep:
        _set_token_ids_and_dtype(config, special_ids, dtype, set_field)
        result.config = config
        return result
    old_heads = config.get("num_attention_heads")
    old_hidden = config.get("hidden_size")
    old_head_dim = config.get("head_dim") or (old_hidden // old_heads if old_hidden and old_heads else None)
    if old_heads:
        heads, kv_heads = _head_counts(old_heads, config.get("num_key_value_heads") or old_heads)
        set_field("num_attention_heads", heads, "heads")
        if "num_key_value_heads" in config:
            set_field("num_key_value_heads", kv_heads, "heads")
        implicit = "head_dim" not in config or config["head_dim"] is None or old_head_dim * old_heads == old_hidden
        new_hidden = heads * options.head_dim if implicit else options.hidden_size
        set_field("hidden_size", new_hidden, "hidden_size")
        if config.get("head_dim") is not None:
            set_field("head_dim", options.head_dim, "head_dim")
        _rescale_query_pre_attn_scalar(config, old_head_dim, old_hidden, old_heads, options.head_dim,
                                       new_hidden, heads, set_field)
        _rescale_rope_lists(config, options.head_dim, changes)
    hidden = config.get("hidden_size") or options.hidden_size
    if "intermediate_size" in config:
        set_field("intermediate_size", 2 * hidden, "intermediate_size")
    for key in EXPERT_SIZE_KEYS:
        if config.get(key):
            set_field(key, max(8, hidden // 2), "expert_intermediate_size")
    experts = None
    for key in EXPERT_COUNT_KEYS:
        if config.get(key):
            experts = min(config[key], options.experts)
            set_field(key, experts, "experts")
    for key in TOPK_KEYS:
        if config.get(key) and isinstance(config[key], int):
            cap = min(options.experts_per_tok, experts or options.experts_per_tok)
            set_field(key, min(config[key], cap), "experts_per_tok")
    if vocab_size is not None and "vocab_size" in config:
        set_field("vocab_size", vocab_size, "vocab_size")
    _shrink_max_positions(config, options, set_field)
    window = config.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and window > options.sliding_window:
        set_field("sliding_window", options.sliding_window, "sliding_window")
    _set_token_ids_and_dtype(config, special_ids, dtype, set_field)
    result.config = config
    return result


def keep_shapes_rule() -> str:
    """The rule deciding whether a small source keeps its shapes, with its bounds filled in."""
    return KEEP_SHAPES_RULE.format(hidden=SMALL_SOURCE_MAX_HIDDEN, intermediate=SMALL_SOURCE_MAX_INTERMEDIATE,
                                   heads=SMALL_SOURCE_MAX_HEADS, head_dim=SMALL_SOURCE_MAX_HEAD_DIM,
                                   experts=SMALL_SOURCE_MAX_EXPERTS, vocab=SMALL_SOURCE_MAX_VOCAB,
                                   positions=SMALL_SOURCE_MAX_POSITIONS)


def small_source_problems(config: dict[str, Any], options: ShrinkOptions, layer_types: list[str] | None,
                          tokenizer_vocab: int | None = None) -> list[str]:
    """Why ``config`` is not small enough to keep its shapes (empty: keep them)."""
    problems = []
    count = _layer_count(config)
    kept = _kept_layers(config, options, layer_types)[0] if count else []
    if len(kept) != count:
        problems.append(f"{count} layers, of which the layer rule keeps {len(kept)}")
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if is_int(hidden) and is_int(heads) and heads else None)
    limits = [("hidden_size", hidden, SMALL_SOURCE_MAX_HIDDEN),
              ("intermediate_size", config.get("intermediate_size"), SMALL_SOURCE_MAX_INTERMEDIATE),
              *((key, config.get(key), SMALL_SOURCE_MAX_INTERMEDIATE) for key in EXPERT_SIZE_KEYS),
              ("num_attention_heads", heads, SMALL_SOURCE_MAX_HEADS),
              ("num_key_value_heads", config.get("num_key_value_heads"), SMALL_SOURCE_MAX_HEADS),
              ("head_dim", head_dim, SMALL_SOURCE_MAX_HEAD_DIM),
              *((key, config.get(key), SMALL_SOURCE_MAX_EXPERTS) for key in EXPERT_COUNT_KEYS),
              ("vocab_size", config.get("vocab_size"), SMALL_SOURCE_MAX_VOCAB),
              ("max_position_embeddings", config.get("max_position_embeddings"), SMALL_SOURCE_MAX_POSITIONS)]
    for key, value, limit in limits:
        if is_int(value) and value > limit:
            problems.append(f"{key} {value} > {limit}")
    vocab = config.get("vocab_size")
    if tokenizer_vocab is not None and is_int(vocab) and tokenizer_vocab > vocab:
        problems.append(f"vocab_size {vocab} is below the trained tokenizer's {tokenizer_vocab} tokens")
    return problems


def _set_token_ids_and_dtype(config: dict[str, Any], special_ids: dict[str, int] | None, dtype: str,
                             set_field) -> None:
    """Point the special-token ids at the replica's tokenizer and set the weights' dtype (all a kept-shape
    replica changes)."""
    if special_ids is not None:
        for key, role in TOKEN_ID_ROLES.items():
            if config.get(key) is not None and role in special_ids:
                new = [special_ids[role]] if isinstance(config[key], list) else special_ids[role]
                set_field(key, new, "special_token_id")
    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    set_field(dtype_key, dtype, "dtype")


def _head_counts(heads: int, kv_heads: int) -> tuple[int, int]:
    """New (query heads, KV heads) with the same GQA ratio."""
    if kv_heads >= heads:
        return 4, 4
    if kv_heads == 1:
        return 4, 1
    ratio = max(1, heads // kv_heads)
    return 2 * ratio, 2


def layer_signatures(config: dict[str, Any], layer_types: list[str] | None) -> list[str]:
    """A string per layer naming everything that makes that layer's type distinct."""
    count = _layer_count(config)
    only_mlp = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step") or 1
    is_moe_model = any(config.get(k) for k in EXPERT_COUNT_KEYS)
    first_dense = config.get("first_k_dense_replace") or 0
    lists = {k: v for k, v in config.items()
             if isinstance(v, list) and len(v) == count and k not in ("layer_types", *INDEX_LIST_KEYS, *NOT_PER_LAYER)
             and all(isinstance(x, (int, str, bool, float)) or x is None for x in v)}
    signatures = []
    for i in range(count):
        parts = []
        if layer_types and len(layer_types) == count:
            parts.append(str(layer_types[i]))
        if is_moe_model:
            moe = i not in only_mlp and (i + 1) % step == 0 and i >= first_dense
            parts.append("moe" if moe else "dense")
        parts.extend(f"{k}={lists[k][i]}" for k in sorted(lists))
        signatures.append(",".join(parts) or "uniform")
    return signatures


def _layer_count(config: dict[str, Any]) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return 0


def _kept_layers(config, options, layer_types) -> tuple[list[int], str, list[str]]:
    """The layer indices the layer rule keeps, the rule's name and every layer's signature."""
    count = _layer_count(config)
    signatures = layer_signatures(config, layer_types)
    distinct = list(dict.fromkeys(signatures))
    prefix = max(min(options.min_layers, count), max(signatures.index(s) for s in distinct) + 1)
    if prefix <= MAX_PREFIX_LAYERS or prefix <= options.min_layers:
        return list(range(prefix)), "layers", signatures
    kept = sorted(signatures.index(s) for s in distinct)
    extra = [i for i in range(count) if i not in kept][: max(0, options.min_layers - len(kept))]
    return sorted(kept + extra), "layers_representative", signatures


def _shrink_layers(config, options, layer_types, result, set_field) -> None:
    count = _layer_count(config)
    if count == 0:
        return
    kept, rule, signatures = _kept_layers(config, options, layer_types)
    result.kept_layers = kept
    result.layer_signatures = [signatures[i] for i in kept]
    key = next(k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int))
    set_field(key, len(kept), rule)
    for name, value in list(config.items()):
        if isinstance(value, list) and len(value) == count and name not in INDEX_LIST_KEYS + NOT_PER_LAYER:
            set_field(name, [value[i] for i in kept], rule)
    if rule == "layers_representative" and layer_types and "layer_types" not in config:
        set_field("layer_types", [layer_types[i] for i in kept], rule)
    for name in INDEX_LIST_KEYS:
        if isinstance(config.get(name), list):
            set_field(name, [kept.index(i) for i in config[name] if i in kept], "layer_index_list")
    if isinstance(config.get("max_window_layers"), int):
        limit = config["max_window_layers"]
        sliding_used = config.get("use_sliding_window") and limit < count
        new = sum(1 for i in kept if i < limit) if sliding_used else len(kept)
        set_field("max_window_layers", new, "max_window_layers")


def _rescale_query_pre_attn_scalar(config, old_head_dim, old_hidden, old_heads, head_dim, hidden, heads,
                                   set_field) -> None:
    value = config.get("query_pre_attn_scalar")
    if not isinstance(value, (int, float)) or not old_head_dim:
        return
    if value == old_head_dim:
        new = head_dim
    elif old_hidden and old_heads and value == old_hidden // old_heads:
        new = hidden // heads
    else:
        new = value * head_dim / old_head_dim
        new = int(new) if float(new).is_integer() else new
    set_field("query_pre_attn_scalar", new, "query_pre_attn_scalar")


def rotary_dim(config: dict[str, Any], head_dim: int) -> int:
    """Rotary dimensions per head, from partial_rotary_factor in either spelling."""
    factor = config.get("partial_rotary_factor")
    for params in _rope_dicts(config):
        factor = params.get("partial_rotary_factor", factor)
    return int(head_dim * (factor if factor else 1.0))


def _rope_dicts(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every RoPE parameter dict of the config (old rope_scaling, new rope_parameters, per layer type)."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict):
            if value and all(isinstance(v, dict) for v in value.values()):
                found.extend(value.values())
            else:
                found.append(value)
    return found


def resample_factors(factors: list[Any], length: int) -> list[Any]:
    """``length`` evenly spaced entries of a longrope factor list (first and last kept)."""
    return [factors[round(i * (len(factors) - 1) / max(1, length - 1))] for i in range(length)]


def _rescale_rope_lists(config, head_dim, changes) -> None:
    half = max(1, rotary_dim(config, head_dim) // 2)
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if not isinstance(value, dict):
            continue
        sections = value.items() if value and all(isinstance(v, dict) for v in value.values()) else [(None, value)]
        for section, params in sections:
            for name in ("long_factor", "short_factor"):
                factors = params.get(name)
                if isinstance(factors, list) and len(factors) != half and factors:
                    new = resample_factors(factors, half)
                    label = f"{key}.{section + '.' if section else ''}{name}"
                    changes.append(FieldChange(label, f"{len(factors)} entries", f"{half} entries",
                                               RULES["rope_factor_list"]))
                    params[name] = new


def _shrink_max_positions(config, options, set_field) -> None:
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value <= options.max_positions:
        return
    rope_types = {str(p.get("rope_type") or p.get("type") or "default") for p in _rope_dicts(config)}
    if any(t.startswith(SCALING_READS_MAX_POSITIONS) for t in rope_types):
        return
    pretraining = [p.get("original_max_position_embeddings") for p in _rope_dicts(config)]
    pretraining.append(config.get("original_max_position_embeddings"))
    floor = max([options.max_positions] + [v for v in pretraining if isinstance(v, int)])
    if floor < value:
        set_field("max_position_embeddings", floor, "max_position_embeddings")


# --- input checks (run before torch is imported) ------------------------------------------
#
# The shrink rules walk per-layer lists and size the replica from the source's head counts, so a
# source size that is not a sane positive integer either crashes deep inside transformers or, for a
# huge layer count, loops and allocates for minutes. Each bound is far above any published model.

# Largest published decoder stacks have a few hundred layers; signatures are built per layer.
MAX_SOURCE_LAYERS = 4096
# Largest published models have 128 query heads; the replica's query heads grow with the GQA ratio.
MAX_SOURCE_HEADS = 4096
# Published GQA ratios are at most 16; the replica keeps 2 x ratio query heads, so this caps its width.
MAX_GQA_RATIO = 64
# Largest published hidden/intermediate sizes are a few tens of thousands (only read, then replaced).
MAX_SOURCE_WIDTH = 1 << 20
# Largest published vocabularies are ~262k; a kept real vocab sizes the replica's embedding.
MAX_VOCAB = 1 << 21
# Longest published context windows are ~10M tokens; kept RoPE (yarn, longrope) reads this value.
MAX_POSITIONS = 1 << 26
# A replica is for a CPU compile loop: beyond these it is no longer tiny (minutes per compile, GBs).
MAX_REPLICA_LAYERS = 64
MAX_REPLICA_HIDDEN = 8192
MAX_REPLICA_HEAD_DIM = 512

# Source size fields: name -> (smallest allowed, largest allowed). null means "not set".
SOURCE_INT_FIELDS: dict[str, tuple[int, int]] = {
    **{key: (1, MAX_SOURCE_LAYERS) for key in LAYER_COUNT_KEYS},
    "num_attention_heads": (1, MAX_SOURCE_HEADS),
    "num_key_value_heads": (1, MAX_SOURCE_HEADS),
    "hidden_size": (1, MAX_SOURCE_WIDTH),
    "intermediate_size": (1, MAX_SOURCE_WIDTH),
    "head_dim": (1, MAX_SOURCE_WIDTH),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "sliding_window": (1, MAX_POSITIONS),
    "max_window_layers": (0, MAX_SOURCE_LAYERS),
    "decoder_sparse_step": (0, MAX_SOURCE_LAYERS),
    "first_k_dense_replace": (0, MAX_SOURCE_LAYERS),
    **{key: (0, MAX_SOURCE_WIDTH) for key in EXPERT_COUNT_KEYS + EXPERT_SIZE_KEYS},
}
# Field types (strings, objects, numbers and their ranges) are model_source's one config vocabulary;
# tiny adds only the size bounds above and the list/token-id shapes it reads.
SOURCE_INT_LIST_FIELDS = INDEX_LIST_KEYS


def _show(value: Any) -> str:
    """A config value for an error message, kept short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool, not a float such as 1e9)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, low: int, high: int, label: str) -> None:
    """Refuse a value that is not an integer in [low, high], naming ``name``."""
    if not is_int(value):
        raise ScriptError(f"{label}: {name} is {_show(value)}, expected a whole number (no decimal point)")
    if not low <= value <= high:
        raise ScriptError(f"{label}: {name} is {value}, expected {low} to {high}")


def check_source_config(config: Any, label: str = "config") -> None:
    """Refuse a source config whose fields tiny reads have the wrong JSON type or an absurd size.

    Checks the top level and ``text_config``, naming the field; pure, no torch.
    """
    if not isinstance(config, dict):
        raise ScriptError(f"{label} is not a JSON object")
    model_source.check_config_fields(config, label)
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs)):
        raise ScriptError(f"{label}: architectures is {_show(archs)}, expected a list of class names")
    parts = [("", config)]
    if isinstance(config.get("text_config"), dict):
        parts.append(("text_config.", config["text_config"]))
    for prefix, part in parts:
        for key, (low, high) in SOURCE_INT_FIELDS.items():
            if part.get(key) is not None:
                check_int(part[key], prefix + key, low, high, label)
        for key in SOURCE_INT_LIST_FIELDS:
            value = part.get(key)
            if value is not None and not (isinstance(value, list) and all(is_int(v) for v in value)):
                raise ScriptError(f"{label}: {prefix}{key} is {_show(value)}, expected a list of layer indices")
        for key in TOKEN_ID_ROLES:
            value = part.get(key)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(is_int(v) and v >= 0 for v in ids):
                raise ScriptError(f"{label}: {prefix}{key} is {_show(value)}, expected a token id or a list of them")
        for key in TOPK_KEYS:
            value = part.get(key)
            if value is not None and is_int(value) and value < 0:
                raise ScriptError(f"{label}: {prefix}{key} is {value}, expected at least 0")
        if part.get("layer_types") is not None and not isinstance(part["layer_types"], list):
            raise ScriptError(f"{label}: {prefix}layer_types is {_show(part['layer_types'])}, expected a list")
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(part.get(key), dict):
                _check_rope_section(part[key], prefix + key, label)
        heads, kv_heads = part.get("num_attention_heads"), part.get("num_key_value_heads")
        if heads and kv_heads and kv_heads > 1 and heads // kv_heads > MAX_GQA_RATIO:
            raise ScriptError(f"{label}: {prefix}num_attention_heads / num_key_value_heads is {heads // kv_heads}, "
                              f"more than {MAX_GQA_RATIO} query heads per KV head")


def _check_rope_section(value: dict[str, Any], where: str, label: str) -> None:
    """RoPE dicts (one, or one per layer type): the position bound and factor lists tiny keeps.

    Types, theta and factors are checked by ``model_source.check_config_fields``.
    """
    sections = value.items() if value and all(isinstance(v, dict) for v in value.values()) else [(None, value)]
    for section, params in sections:
        name = f"{where}.{section}" if section else where
        if params.get("original_max_position_embeddings") is not None:
            check_int(params["original_max_position_embeddings"], f"{name}.original_max_position_embeddings",
                      1, MAX_POSITIONS, label)
        for key in ("long_factor", "short_factor"):
            factors = params.get(key)
            if factors is not None and not (isinstance(factors, list) and factors and all(map(is_real, factors))):
                raise ScriptError(f"{label}: {name}.{key} is {_show(factors)}, expected a list of numbers")


def check_replica_sizes(config: dict[str, Any], label: str = "the replica") -> None:
    """Refuse a shrunk config that is not tiny (too many layers or too wide for a CPU loop)."""
    layers = _layer_count(config)
    if layers > MAX_REPLICA_LAYERS:
        raise ScriptError(f"{label} would keep {layers} layers (more than {MAX_REPLICA_LAYERS}): the source has "
                          "too many distinct layer types, or --layers is too large")
    hidden = config.get("hidden_size")
    if is_int(hidden) and hidden > MAX_REPLICA_HIDDEN:
        raise ScriptError(f"{label} would have hidden_size {hidden} (more than {MAX_REPLICA_HIDDEN}); "
                          "lower --head-dim or --hidden-size")
