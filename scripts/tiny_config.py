"""Shrink a Hugging Face config into a tiny replica config, recording every change.

The replica keeps the architecture's semantics (RoPE type/theta/scaling,
norms and eps, activations, biases, softcaps, tie flag, multipliers) and
every relation between sizes a port must honor: head_dim x heads vs hidden
(an explicit head_dim keeps its ratio), the query/KV head ratio (MHA, GQA,
multi-query), the rotated share of each head, the per-layer pattern
(attention types, NoPE and MoE layers, KV-sharing layers, per-layer FFN
widths), a second layer count's ratio (LongCat), the top-k vs expert-count
relation. A composite config whose text config has no causal-LM class of its
own (Mllama, Emu3) keeps its composite form with text_config shrunk.
It shrinks only sizes. Every field is found through ``model_anatomy``'s one
alias table, so GPT-2 spellings (``n_embd``, ``n_head``, ``n_layer``) shrink
like Llama's. A sliding window becomes the smallest one MAX compiles with
its native mask (``max_compat``). Each rule is in ``RULES`` and every
applied change is returned as a :class:`FieldChange` for the replica
manifest.

Pure dict manipulation: imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import max_compat
import model_anatomy
import model_source
from cli_support import ScriptError

# Why each kind of field changed; the manifest quotes these.
RULES = {
    "layers": "shortest prefix of the original layers that holds one layer of every distinct per-layer type "
              "(attention type, dense/MoE, NoPE), at least --layers; per-layer lists are cut to that prefix",
    "layers_representative": "the prefix would be too long, so the first layer of each per-layer type is kept "
                             "and per-layer fields are rewritten for the kept layers",
    "heads": "query/KV head ratio kept: MHA -> 4/4 heads, multi-query -> 4/1, GQA (ratio g) -> 2g query heads / "
             "2 KV heads",
    "head_dim": "set to --head-dim, doubled while a partial rotary would rotate an odd number of dims (an "
                "explicit head_dim stays explicit)",
    "hidden_size": "query heads x head_dim when the original had hidden = heads x head_dim",
    "hidden_size_ratio": "query heads x head_dim / r, where r is the original's ratio heads x head_dim / hidden, "
                         "so an explicit head_dim still differs from hidden / heads in the same direction",
    "hidden_size_no_heads": "--hidden-size (the config names no attention heads)",
    "intermediate_size": "2 x the new hidden size",
    "width_follows_hidden": "a width tied to the hidden size, scaled by the same factor (equal stays equal)",
    "expert_intermediate_size": "new hidden size / 2, rounded down to a multiple of 8 (at least 8)",
    "experts": "at most 4 experts",
    "experts_per_tok": "at most 2 experts per token and fewer than the experts kept, unless every expert was "
                       "used (then all kept experts are)",
    "expert_groups": "group-limited routing kept with 2 groups of the kept experts (one group picked when fewer "
                     "groups than all were picked)",
    "rotary_dim": "rotated dims per head scaled with head_dim (the same share of each head, even, at least 2)",
    "vocab_size": "the size of the replica's tokenizer (the real vocab size is kept with the real tokenizer)",
    "max_position_embeddings": "at most 2048 (never below original_max_position_embeddings), unchanged when "
                               "the RoPE scaling type reads it (yarn, longrope, dynamic)",
    "sliding_window": "set to the sliding-window floor of the replica dtype (max_compat.SLIDING_WINDOW_FLOOR)",
    "sliding_window_flag": "set to --sliding-window",
    "attention_chunk": "attention chunk set like a sliding window (the floor, or --sliding-window), so the probe "
                       "prompt, twice as long, crosses a chunk boundary",
    "query_pre_attn_scalar": "followed head_dim (or hidden/heads) when it equalled it, else scaled by the "
                             "head_dim ratio",
    "rope_factor_list": "longrope factor lists resampled (evenly spaced entries) to rotary_dim / 2",
    "max_window_layers": "number of leading full-attention layers kept, so the same layers slide",
    "layer_count_ratio": "a second layer count kept in its whole-number ratio to the block count (LongCat: "
                         "num_hidden_layers = 2 x num_layers blocks); the smaller count is the block count and "
                         "gets the kept layers",
    "per_layer_widths": "each layer's FFN width scaled by one factor, so the largest is 2 x the new hidden size "
                        "(equal widths stay equal, their order is kept)",
    "vocab_follows": "the vocabulary of an embedding indexed by the same token ids, at most the new vocab size",
    "kv_shared_layers": "number of kept layers among the source's trailing KV-sharing layers",
    "encoder_tower_layers": "a vision/audio tower the causal-LM class builds keeps --layers layers (widths kept: "
                            "text-only runs never call it, so only its build time and weights shrink)",
    "latent_attention": "latent attention: the rotated part of a head set to the replica's head_dim, the other "
                        "head parts scaled by the same factor (even), qk_head_dim their sum, the low ranks scaled "
                        "with hidden (a multiple of 8, at least 8)",
    "zero_experts": "identity (zero-compute) experts scaled with the routed experts, so the same share of the "
                    "router's choices skips compute",
    "layer_index_list": "layer indices remapped to the kept layers",
    "special_token_id": "the replica tokenizer's token of the same role (bos/eos/pad)",
    "dtype": "the dtype the replica weights are saved in",
    "text_only": "the language model of a multimodal config, as its own causal-LM config",
    "text_in_composite": "the multimodal config kept, naming the causal-LM class that reads only its text_config "
                         "(the text config type has no causal-LM class of its own); only text_config is shrunk",
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

ALIASES = model_anatomy.ALIASES
# The config keys tiny reads, from model_anatomy's one alias table (first present spelling wins).
LAYER_COUNT_KEYS = ALIASES["num_layers"]
# Lists of layer indices (not one entry per layer): remapped to the kept layers.
# Layers that cross-attend to another model's states (Mllama): a per-layer type, given as indices.
CROSS_ATTENTION_LAYERS_KEY = "cross_attention_layers"
INDEX_LIST_KEYS = ALIASES["moe_dense_layers"] + ALIASES["moe_layers"] + (CROSS_ATTENTION_LAYERS_KEY,)
EXPERT_COUNT_KEYS = ALIASES["num_experts"]
TOPK_KEYS = ALIASES["experts_per_token"]
EXPERT_SIZE_KEYS = ALIASES["expert_intermediate_size"] + ALIASES["shared_expert_intermediate_size"]
# Widths defined relative to the hidden size that no alias names (OPT projects embeddings to this width;
# Gemma 3n / Gemma 4 per-layer inputs and Gemma 3n's LAuReL low-rank residual).
WIDTH_FOLLOWS_HIDDEN_KEYS = ("word_embed_proj_dim", "hidden_size_per_layer_input", "laurel_rank",
                             "ffn_config.hidden_size")  # DBRX's FFN config names a width of its own
# FFN widths a config may give per layer, as a list (Gemma 3n): scaled together, so the pattern is kept.
PER_LAYER_WIDTH_KEYS = ALIASES["intermediate_size"]
# Vocabularies of extra embeddings that index the same token ids (Gemma 3n / Gemma 4 per-layer inputs).
VOCAB_FOLLOWS_KEYS = ("vocab_size_per_layer_input",)
# The last N layers reuse the KV of an earlier layer of their type (Gemma 3n): a per-layer type.
KV_SHARED_KEY = "num_kv_shared_layers"
# Group-limited MoE routing (DeepSeek-V3): experts split into n_group groups, topk_group of them searched.
EXPERT_GROUP_KEY = "n_group"
EXPERT_TOPK_GROUP_KEY = "topk_group"
# Non-text towers a causal-LM class builds besides its language model (their layers are cut to --layers).
ENCODER_SUBCONFIGS = ("vision_config", "audio_config")
# Layer counts of those towers that no language-model alias names (Phi-4-multimodal's conformer blocks).
ENCODER_LAYER_COUNT_KEYS = ("num_blocks",)
# Chunked attention (Llama 4): layers of this type attend within chunks of ATTENTION_CHUNK_KEY tokens.
ATTENTION_CHUNK_KEY = "attention_chunk_size"
CHUNKED_LAYER_TYPE = "chunked_attention"
# Latent (MLA) attention sizes: the rotated part of a head, the other head parts, their sum, the low ranks.
MLA_ROPE_KEY = "qk_rope_head_dim"
MLA_HEAD_KEYS = ("qk_nope_head_dim", "v_head_dim")
MLA_QK_HEAD_KEY = "qk_head_dim"
MLA_RANK_KEYS = ("q_lora_rank", "kv_lora_rank")
# Identity experts the router may pick besides the routed ones (LongCat-Flash); scaled with the experts.
ZERO_EXPERTS_KEY = "zero_expert_num"
# Leading-layer counts: the first k layers are dense (DeepSeek); remapped like max_window_layers.
LEADING_DENSE_KEY = "first_k_dense_replace"
TOKEN_ID_ROLES = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad"}
SCALING_READS_MAX_POSITIONS = ("yarn", "longrope", "dynamic")
MAX_PREFIX_LAYERS = 8
NOT_PER_LAYER = ("architectures", "eos_token_id", "long_factor", "short_factor")
# The smallest hidden size a ratio-kept replica gets (below it norms and projections degenerate).
MIN_REPLICA_HIDDEN = 8
# The smallest expert FFN width (a few multiply-adds per token still route through every expert).
MIN_EXPERT_WIDTH = 8
# Shrunk expert widths and latent-attention low ranks stay whole multiples of 8, as the sources have
# them: torch's grouped_mm (transformers' fused-experts path) refuses weights whose row stride is not a
# multiple of 16 bytes ("strides should be multiple of 16 bytes": GLM-4-MoE-Lite's hidden 68 gave experts
# 34 wide), and a rank of 17 splits kv_a's output at an unaligned offset.
WIDTH_MULTIPLE = 8
LATENT_RANK_MULTIPLE = WIDTH_MULTIPLE
# Rotated dims per head come in pairs; a partial rotary keeps at least one pair.
MIN_ROTARY_DIM = 2
# Shrunk group-limited routing: two groups of the kept experts.
REPLICA_EXPERT_GROUPS = 2
# The rotated share of a head is compared at this precision (an absolute rotary_dim rounds to whole pairs).
ROTARY_SHARE_DIGITS = 4


@dataclass
class ShrinkOptions:
    """Target sizes of the replica (sliding_window None: MAX's floor for the replica dtype)."""

    hidden_size: int = 64
    head_dim: int = 16
    min_layers: int = 2
    sliding_window: int | None = None
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
    """The replica's config.json, what changed from the original, and which relations it kept."""

    config: dict[str, Any]
    changes: list[FieldChange] = field(default_factory=list)
    kept_layers: list[int] = field(default_factory=list)
    layer_signatures: list[str] = field(default_factory=list)
    text_only: bool = False
    shapes: dict[str, Any] = field(default_factory=dict)  # kept or shrunk, the rule, and why
    relations: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> source / replica values


def shrink_config(
    original: dict[str, Any],
    options: ShrinkOptions,
    *,
    layer_types: list[str] | None = None,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
    dtype: str = "float32",
    causal_lm_architecture: str | None = None,
    keep_composite: bool = False,
) -> ShrunkConfig:
    """Shrink ``original`` (a raw config.json dict).

    ``layer_types`` is the per-layer attention type as transformers computes
    it (it may be derived from pattern fields the raw config does not list).
    ``vocab_size`` replaces the vocab (None keeps it). ``special_ids`` maps the
    roles bos/eos/pad to replica token ids; ids are rewritten when given.
    ``causal_lm_architecture`` names the text-only class when ``original``
    nests a ``text_config`` (multimodal). ``keep_composite``: that class reads the
    composite config itself (Mllama, Emu3: their text config type has no causal-LM
    mapping entry), so the shrunk text_config stays nested in the composite config.
    Raises ScriptError when a per-layer pattern cannot be kept.
    """
    result = ShrunkConfig(config={})
    config = copy.deepcopy(original)
    nested = config.get("text_config")
    outer = None
    if isinstance(nested, dict) and nested and causal_lm_architecture and keep_composite:
        outer = config
        outer["architectures"] = [causal_lm_architecture]
        result.changes.append(FieldChange("(config)", f"{config.get('model_type')} (multimodal)",
                                          f"{config.get('model_type')} ({causal_lm_architecture}, text_config "
                                          "shrunk in place)", RULES["text_in_composite"]))
        config, result.text_only = copy.deepcopy(nested), True
    elif isinstance(nested, dict) and nested and causal_lm_architecture:
        text = copy.deepcopy(nested)
        text["architectures"] = [causal_lm_architecture]
        for key in ("torch_dtype", "dtype", "tie_word_embeddings", *TOKEN_ID_ROLES):
            if key in config and key not in text:
                text[key] = config[key]
        result.changes.append(FieldChange("(config)", f"{config.get('model_type')} (multimodal)",
                                          f"{text.get('model_type')} ({causal_lm_architecture})", RULES["text_only"]))
        config, result.text_only = text, True

    changes = result.changes

    def set_field(key: str, new: Any, rule: str, reason: str | None = None) -> None:
        old = model_anatomy.get_config_value(config, key)
        if old != new:
            changes.append(FieldChange(key, old, new, reason or RULES[rule]))
        model_anatomy.set_config_value(config, key, new)

    source_view = model_anatomy.config_view(config)
    too_big = small_source_problems(config, options, layer_types, vocab_size)
    keep = options.keep_small_source and not too_big
    result.shapes = {"kept": keep, "rule": keep_shapes_rule(),
                     "reasons": ["--always-shrink"] if not options.keep_small_source else too_big}
    _shrink_layers(config, options, layer_types, result, set_field)
    if not keep:
        _shrink_attention(config, source_view, options, set_field, changes)
        hidden = model_anatomy.get_config_value(config, source_view.key("hidden_size") or "") or options.hidden_size
        _shrink_widths(config, source_view, hidden, set_field)
        _shrink_latent_attention(config, source_view, options, hidden, set_field)
        _shrink_experts(config, source_view, options, set_field)
        vocab_key = source_view.key("vocab_size")
        if vocab_size is not None and vocab_key:
            set_field(vocab_key, vocab_size, "vocab_size")
        for key in VOCAB_FOLLOWS_KEYS:
            value = config.get(key)
            if vocab_size is not None and is_int(value) and value > vocab_size:
                set_field(key, vocab_size, "vocab_follows")
        _shrink_max_positions(config, source_view, options, set_field)
        _set_sliding_window(config, source_view, options, dtype, set_field)
    if not keep:
        _shrink_encoder_towers(config, options, set_field)
    _set_token_ids_and_dtype(config, special_ids, dtype, set_field)
    result.config = config
    result.relations = kept_relations(source_view, model_anatomy.config_view(config))
    _check_layer_pattern(config, layer_types, result)
    if outer is not None:
        for change in changes:
            if not change.field.startswith("("):
                change.field = f"text_config.{change.field}"
        outer["text_config"] = config
        _set_token_ids_and_dtype(outer, special_ids, dtype, lambda key, new, rule, reason=None: outer.__setitem__(
            key, new))
        result.config = outer
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
    view = model_anatomy.config_view(config)
    count = view.num_layers or 0
    kept = _kept_layers(config, options, layer_types)[0] if count else []
    if len(kept) != count:
        problems.append(f"{count} layers, of which the layer rule keeps {len(kept)}")

    def named(name: str) -> str:
        return view.key(name) or name

    limits = [("hidden_size", view.hidden_size, SMALL_SOURCE_MAX_HIDDEN),
              ("intermediate_size", view.intermediate_size, SMALL_SOURCE_MAX_INTERMEDIATE),
              ("expert_intermediate_size", view.expert_intermediate_size, SMALL_SOURCE_MAX_INTERMEDIATE),
              ("shared_expert_intermediate_size", view.shared_expert_intermediate_size, SMALL_SOURCE_MAX_INTERMEDIATE),
              ("num_heads", view.num_heads, SMALL_SOURCE_MAX_HEADS),
              ("num_kv_heads", view.num_kv_heads, SMALL_SOURCE_MAX_HEADS),
              ("head_dim", view.head_dim, SMALL_SOURCE_MAX_HEAD_DIM),
              ("num_experts", view.num_experts, SMALL_SOURCE_MAX_EXPERTS),
              ("vocab_size", view.vocab_size, SMALL_SOURCE_MAX_VOCAB),
              ("max_positions", view.max_positions, SMALL_SOURCE_MAX_POSITIONS)]
    for name, value, limit in limits:
        if is_int(value) and value > limit:
            problems.append(f"{named(name)} {value} > {limit}")
    vocab = view.vocab_size
    if tokenizer_vocab is not None and is_int(vocab) and tokenizer_vocab > vocab:
        problems.append(f"{named('vocab_size')} {vocab} is below the trained tokenizer's {tokenizer_vocab} tokens")
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
    """New (query heads, KV heads) with the same query/KV ratio."""
    if kv_heads >= heads:
        return 4, 4
    if kv_heads == 1:
        return 4, 1
    ratio = max(1, heads // kv_heads)
    return 2 * ratio, 2


def _replica_head_dim(view: model_anatomy.ConfigView, wanted: int) -> int:
    """--head-dim, doubled until a partial rotary fraction rotates a whole, even number of dims."""
    fraction = view.rotary_fraction
    if view.key("rotary_dim") or not fraction or fraction >= 1:
        return wanted
    head_dim = wanted
    while head_dim < MAX_REPLICA_HEAD_DIM and (int(head_dim * fraction) % 2 or int(head_dim * fraction) == 0):
        head_dim *= 2
    return head_dim


def _replica_hidden(view: model_anatomy.ConfigView, heads: int, head_dim: int) -> tuple[int, str]:
    """The replica's hidden size and its rule: heads x head_dim, or that over the source's ratio r."""
    if not view.head_dim_differs:
        return heads * head_dim, "hidden_size"
    ratio = Fraction(view.num_heads * view.head_dim, view.hidden_size)
    hidden = max(MIN_REPLICA_HIDDEN, round(Fraction(heads * head_dim) / ratio))
    if ratio < 1 and hidden // heads == head_dim:
        hidden = heads * (head_dim + 1)  # hidden / heads must still differ from head_dim
    if ratio > 1 and hidden >= heads * head_dim:
        hidden = heads * head_dim - heads
    return hidden, "hidden_size_ratio"


def _shrink_attention(config, view: model_anatomy.ConfigView, options: ShrinkOptions, set_field, changes) -> None:
    """Heads (ratio kept), head_dim (explicit stays explicit), hidden (the head_dim relation kept), rotary."""
    heads_key, hidden_key = view.key("num_heads"), view.key("hidden_size")
    if not heads_key or not view.num_heads:
        if hidden_key:
            set_field(hidden_key, options.hidden_size, "hidden_size_no_heads")
        return
    heads, kv_heads = _head_counts(view.num_heads, view.num_kv_heads or view.num_heads)
    head_dim = _replica_head_dim(view, options.head_dim)
    set_field(heads_key, heads, "heads")
    kv_key = view.key("num_kv_heads")
    if kv_key and not kv_key.endswith("multi_query"):  # multi_query=true already means one KV head
        set_field(kv_key, kv_heads, "heads")
    hidden, rule = _replica_hidden(view, heads, head_dim)
    if hidden_key:
        set_field(hidden_key, hidden, rule)
    if view.head_dim_explicit:
        set_field(view.key("head_dim"), head_dim, "head_dim")
    rotary_key = view.key("rotary_dim")
    if rotary_key and view.rotary_dim and view.head_dim:
        if view.rotary_dim >= view.head_dim:
            rotary = head_dim
        else:
            rotary = MIN_ROTARY_DIM * round(head_dim * view.rotary_dim / view.head_dim / MIN_ROTARY_DIM)
            rotary = min(max(MIN_ROTARY_DIM, rotary), head_dim - MIN_ROTARY_DIM)
        set_field(rotary_key, rotary, "rotary_dim")
    _rescale_query_pre_attn_scalar(config, view.head_dim, view.hidden_size, view.num_heads, head_dim, hidden,
                                   heads, set_field)
    _rescale_rope_lists(config, head_dim, changes)


def _shrink_widths(config, view: model_anatomy.ConfigView, hidden: int, set_field) -> None:
    """The FFN width, expert widths and widths tied to hidden, for the new hidden size."""
    ffn_key = view.key("intermediate_size")
    if ffn_key and is_int(model_anatomy.get_config_value(config, ffn_key)):
        set_field(ffn_key, 2 * hidden, "intermediate_size")
    for key in PER_LAYER_WIDTH_KEYS:
        widths = config.get(key)
        if isinstance(widths, list) and widths and all(is_int(w) and w > 0 for w in widths):
            scale = Fraction(2 * hidden, max(widths))
            set_field(key, [max(MIN_EXPERT_WIDTH, round(w * scale)) for w in widths], "per_layer_widths")
    old_hidden = view.hidden_size
    for key in EXPERT_SIZE_KEYS:
        value = model_anatomy.get_config_value(config, key)
        if is_int(value) and value and value == old_hidden:
            set_field(key, hidden, "width_follows_hidden")  # equal stays equal (DBRX's ffn_hidden_size)
        elif is_int(value) and value:
            width = hidden // 2 // WIDTH_MULTIPLE * WIDTH_MULTIPLE
            set_field(key, max(MIN_EXPERT_WIDTH, width), "expert_intermediate_size")
    for key in WIDTH_FOLLOWS_HIDDEN_KEYS:
        value = model_anatomy.get_config_value(config, key)
        if is_int(value) and value and old_hidden:
            new = hidden if value == old_hidden else max(MIN_ROTARY_DIM, round(value * hidden / old_hidden))
            set_field(key, new, "width_follows_hidden")


def _shrink_latent_attention(config, view: model_anatomy.ConfigView, options: ShrinkOptions, hidden: int,
                             set_field) -> None:
    """Latent (MLA) attention: the RoPE part of a head becomes the replica's head_dim, the other head parts
    keep their ratio to it, the low ranks their ratio to hidden (DeepSeek, LongCat, GLM-4-MoE-Lite)."""
    rope = config.get(MLA_ROPE_KEY)
    if not is_int(rope) or rope <= 0:
        return
    head_dim = config.get("head_dim") if is_int(config.get("head_dim")) and view.head_dim_explicit else None
    new_rope = head_dim if head_dim and head_dim != rope else options.head_dim
    factor = Fraction(new_rope, rope)
    set_field(MLA_ROPE_KEY, new_rope, "latent_attention")
    for key in MLA_HEAD_KEYS:
        value = config.get(key)
        if is_int(value) and value > 0:
            set_field(key, max(MIN_ROTARY_DIM, MIN_ROTARY_DIM * round(value * factor / MIN_ROTARY_DIM)),
                      "latent_attention")
    if is_int(config.get(MLA_QK_HEAD_KEY)):
        set_field(MLA_QK_HEAD_KEY, config.get("qk_nope_head_dim", 0) + new_rope, "latent_attention")
    old_hidden = view.hidden_size
    for key in MLA_RANK_KEYS:
        value = config.get(key)
        if is_int(value) and value > 0 and old_hidden:
            rank = LATENT_RANK_MULTIPLE * round(value * hidden / old_hidden / LATENT_RANK_MULTIPLE)
            set_field(key, max(MIN_EXPERT_WIDTH, rank), "latent_attention")


def _shrink_experts(config, view: model_anatomy.ConfigView, options: ShrinkOptions, set_field) -> None:
    """At most --experts experts; top-k below the kept experts unless every expert was picked."""
    experts_key = view.key("num_experts")
    if not experts_key or not view.num_experts:
        return
    experts = min(view.num_experts, options.experts)
    for key in view.present_keys("num_experts") or (experts_key,):  # DeepSeek-V3.2 spells it twice
        set_field(key, experts, "experts")
    zero = config.get(ZERO_EXPERTS_KEY)
    if is_int(zero) and zero > 0:
        set_field(ZERO_EXPERTS_KEY, max(1, round(zero * experts / view.num_experts)), "zero_experts")
    if not view.is_moe:
        return
    topk_key, top_k = view.key("experts_per_token"), view.experts_per_token
    if topk_key and is_int(top_k) and top_k > 0:
        new = experts if top_k >= view.num_experts else max(1, min(top_k, options.experts_per_tok, experts - 1))
        set_field(topk_key, new, "experts_per_tok")
    groups, picked = config.get(EXPERT_GROUP_KEY), config.get(EXPERT_TOPK_GROUP_KEY)
    if is_int(groups) and groups > 1 and experts % REPLICA_EXPERT_GROUPS == 0:
        set_field(EXPERT_GROUP_KEY, REPLICA_EXPERT_GROUPS, "expert_groups")
        if is_int(picked):
            set_field(EXPERT_TOPK_GROUP_KEY, REPLICA_EXPERT_GROUPS if picked >= groups else 1, "expert_groups")


def _set_sliding_window(config, view: model_anatomy.ConfigView, options: ShrinkOptions, dtype: str,
                        set_field) -> None:
    """A source with a sliding window gets MAX's floor for the replica dtype (or --sliding-window)."""
    if _attention_chunk(config):
        window = options.sliding_window or max_compat.sliding_window_floor(
            dtype if dtype in max_compat.SLIDING_WINDOW_FLOOR else "float32")
        set_field(ATTENTION_CHUNK_KEY, window, "attention_chunk")
    key = view.key("sliding_window")
    if not key or not view.sliding_window:
        return
    if options.sliding_window is not None:
        set_field(key, options.sliding_window, "sliding_window_flag")
        return
    attention_dtype = dtype if dtype in max_compat.SLIDING_WINDOW_FLOOR else "float32"
    set_field(key, max_compat.sliding_window_floor(attention_dtype), "sliding_window",
              "set to the sliding-window floor: " + max_compat.sliding_window_reason(attention_dtype))


def replica_sliding_window(config: dict[str, Any]) -> int | None:
    """The sliding window (or attention chunk, the longer of the two) of a (replica) config, None when it
    has neither; the probe prompt must reach past it."""
    text = model_source.text_config(config)
    spans = [model_anatomy.config_view(config).sliding_window, _attention_chunk(text)]
    return max((s for s in spans if s), default=None)


def _attention_chunk(config: dict[str, Any]) -> int | None:
    """The attention chunk size when some layer attends in chunks (Llama 4), else None."""
    chunk = config.get(ATTENTION_CHUNK_KEY)
    types = config.get("layer_types")
    chunked = not isinstance(types, list) or any(CHUNKED_LAYER_TYPE == t for t in types)
    return chunk if is_int(chunk) and chunk > 0 and chunked else None


def kept_relations(source: model_anatomy.ConfigView, replica: model_anatomy.ConfigView) -> dict[str, dict[str, Any]]:
    """The size relations a port must honor, on the source and on the replica (equal means kept)."""
    def head_ratio(view):
        if not (view.num_heads and view.head_dim and view.hidden_size):
            return None
        return str(Fraction(view.num_heads * view.head_dim, view.hidden_size))

    def kv_ratio(view):
        if not view.num_heads or not view.num_kv_heads:
            return None
        if view.num_kv_heads == 1 and view.num_heads > 1:
            return "multi-query"
        return str(Fraction(view.num_heads, view.num_kv_heads))

    def rotary(view):
        return None if view.rotary_fraction is None else round(view.rotary_fraction, ROTARY_SHARE_DIGITS)

    def top_k(view):
        if not view.is_moe or not view.experts_per_token:
            return None
        if view.experts_per_token >= view.num_experts:
            return "all experts"
        return "one expert" if view.experts_per_token == 1 else "some experts"

    def window(view):
        return "sliding" if view.sliding_window else None

    rows = {
        "heads x head_dim / hidden": head_ratio,
        "head_dim explicit": lambda v: v.head_dim_explicit,
        "query heads per KV head": kv_ratio,
        "rotary share of a head": rotary,
        "experts per token": top_k,
        "tie_word_embeddings": lambda v: v.tie_word_embeddings,
        "attention_bias": lambda v: v.attention_bias,
        "mlp_bias": lambda v: v.mlp_bias,
        "sliding window": window,
    }
    relations = {}
    for name, read in rows.items():
        old, new = read(source), read(replica)
        if old is not None or new is not None:
            relations[name] = {"source": old, "replica": new, "kept": old == new}
    return relations


def layer_signatures(config: dict[str, Any], layer_types: list[str] | None) -> list[str]:
    """A string per layer naming everything that makes that layer's type distinct."""
    view = model_anatomy.config_view(config)
    count = view.num_layers or 0
    types = list(layer_types) if layer_types and len(layer_types) == count else None
    if types is None and len(set(view.layer_types)) > 1 and len(view.layer_types) == count:
        types = list(view.layer_types)
    moe_layers = set(view.moe_layers)
    nope = len(set(view.rope_layers)) > 1 and len(view.rope_layers) == count
    lists = {k: v for k, v in config.items()
             if isinstance(v, list) and len(v) == count and k not in ("layer_types", *INDEX_LIST_KEYS, *NOT_PER_LAYER)
             and all(isinstance(x, (int, str, bool, float)) or x is None for x in v)}
    # Per-layer widths are compared by rank (the shrunk widths differ in value, not in pattern).
    ranks = {k: {w: n for n, w in enumerate(sorted(set(lists[k])))} for k in PER_LAYER_WIDTH_KEYS if k in lists}
    shared = config.get(KV_SHARED_KEY)
    cross = config.get(CROSS_ATTENTION_LAYERS_KEY)
    signatures = []
    for i in range(count):
        parts = []
        if types:
            parts.append(str(types[i]))
        if view.is_moe:
            parts.append("moe" if i in moe_layers else "dense")
        if nope and not view.rope_layers[i]:
            parts.append("nope")
        if is_int(shared) and shared > 0:
            parts.append("kv_shared" if i >= count - shared else "kv_own")
        if isinstance(cross, list) and cross:
            parts.append("cross_attention" if i in cross else "self_attention")
        parts.extend(f"{k}=width#{ranks[k][lists[k][i]]}" if k in ranks else f"{k}={lists[k][i]}"
                     for k in sorted(lists))
        signatures.append(",".join(parts) or "uniform")
    return signatures


def _layer_count(config: dict[str, Any]) -> int:
    return model_anatomy.config_view(config).num_layers or 0


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
    key = model_anatomy.config_view(config).key("num_layers")
    set_field(key, len(kept), rule)
    _keep_layer_count_ratio(config, key, count, len(kept), set_field)
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
    if is_int(config.get(LEADING_DENSE_KEY)):
        set_field(LEADING_DENSE_KEY, sum(1 for i in kept if i < config[LEADING_DENSE_KEY]), "layer_index_list")
    shared = config.get(KV_SHARED_KEY)
    if is_int(shared) and shared > 0:
        set_field(KV_SHARED_KEY, sum(1 for i in kept if i >= count - shared), "kv_shared_layers")


def _shrink_encoder_towers(config: dict[str, Any], options: ShrinkOptions, set_field) -> None:
    """Vision/audio towers the causal-LM class builds (Phi-4-multimodal, GIT) keep --layers layers; their
    widths stay, so their projections into the language model still match it."""
    for name in ENCODER_SUBCONFIGS:
        part = config.get(name)
        if not isinstance(part, dict):
            continue
        for key in (*LAYER_COUNT_KEYS, *ENCODER_LAYER_COUNT_KEYS):
            value = part.get(key)
            if is_int(value) and value > options.min_layers:
                set_field(f"{name}.{key}", options.min_layers, "encoder_tower_layers")


def _keep_layer_count_ratio(config: dict[str, Any], key: str, count: int, kept: int, set_field) -> None:
    """Other layer counts present (top level) keep their whole-number ratio to ``key``'s count.

    The smaller of two counts is the block count (LongCat builds ``num_layers`` blocks and reads
    ``num_hidden_layers`` as twice that): it gets ``kept`` and the larger one ``kept`` x the ratio.
    """
    for other in LAYER_COUNT_KEYS:
        value = config.get(other)
        if other == key or not is_int(value) or value <= 0:
            continue
        if count % value == 0:
            ratio = count // value
            set_field(other, kept, "layer_count_ratio")
            set_field(key, kept * ratio, "layer_count_ratio")
        elif value % count == 0:
            set_field(other, kept * (value // count), "layer_count_ratio")


def _check_layer_pattern(config: dict[str, Any], layer_types: list[str] | None, result: ShrunkConfig) -> None:
    """Refuse a replica whose layers do not have the kept layers' types (a pattern field did not follow)."""
    if not result.kept_layers:
        return
    kept_types = [layer_types[i] for i in result.kept_layers] if layer_types else None
    replica = layer_signatures(config, kept_types)
    if replica != result.layer_signatures:
        raise ScriptError(f"the replica would not keep the per-layer pattern: source layers {result.kept_layers} are "
                          f"{result.layer_signatures}, the replica's layers would be {replica} (a pattern field "
                          "such as decoder_sparse_step or no_rope_layer_interval cannot follow the kept layers); "
                          f"raise --layers to at least {result.kept_layers[-1] + 1} to keep a prefix")


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


def _shrink_max_positions(config, view: model_anatomy.ConfigView, options, set_field) -> None:
    key = view.key("max_positions")
    value = model_anatomy.get_config_value(config, key) if key else None
    if not is_int(value) or value <= options.max_positions:
        return
    rope_types = {str(p.get("rope_type") or p.get("type") or "default") for p in _rope_dicts(config)}
    if any(t.startswith(SCALING_READS_MAX_POSITIONS) for t in rope_types):
        return
    pretraining = [p.get("original_max_position_embeddings") for p in _rope_dicts(config)]
    pretraining.append(config.get("original_max_position_embeddings"))
    floor = max([options.max_positions] + [v for v in pretraining if isinstance(v, int)])
    if floor < value:
        set_field(key, floor, "max_position_embeddings")


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
# A transformer layer of width h holds about 12 h^2 weights (4 h^2 attention, 8 h^2 MLP at 4 h).
SUBCONFIG_PARAMETERS_PER_LAYER_PER_WIDTH_SQUARED = 12
# Sub-configs tiny leaves at full size (a vision tower, BLT's byte encoder/global/decoder/patcher) up to
# this many parameters still build in seconds (GIT's 85 M vision tower: 3 s); BLT's ~1.5 B held 5.8 GB
# for minutes and was killed by the coverage benchmark after 180 s.
MAX_UNSHRUNK_SUBCONFIG_PARAMETERS = 1_000_000_000

# Source size fields: name -> (smallest allowed, largest allowed). null means "not set".
SOURCE_INT_FIELDS: dict[str, tuple[int, int]] = {
    **{key: (1, MAX_SOURCE_LAYERS) for key in LAYER_COUNT_KEYS},
    **{key: (1, MAX_SOURCE_HEADS) for key in ALIASES["num_heads"] + ALIASES["num_kv_heads"]},
    **{key: (1, MAX_SOURCE_WIDTH) for key in ALIASES["hidden_size"] + ALIASES["intermediate_size"]
       + ALIASES["head_dim"] + ALIASES["rotary_dim"]},
    "vocab_size": (1, MAX_VOCAB),
    **{key: (1, MAX_POSITIONS) for key in ALIASES["max_positions"]},
    "sliding_window": (0, MAX_POSITIONS),  # 0 is "no window" (Qwen2-MoE's default config, use_sliding_window off)
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
            value = part.get(key)
            if key in PER_LAYER_WIDTH_KEYS and isinstance(value, list) and value:
                for index, item in enumerate(value):
                    check_int(item, f"{prefix}{key}[{index}]", low, high, label)
            elif value is not None:
                check_int(value, prefix + key, low, high, label)
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
    view = model_anatomy.config_view(config)
    hidden = view.hidden_size
    if is_int(hidden) and hidden > MAX_REPLICA_HIDDEN:
        raise ScriptError(f"{label} would have {view.key('hidden_size')} {hidden} (more than {MAX_REPLICA_HIDDEN}); "
                          "lower --head-dim or --hidden-size")
    nested = unshrunk_subconfigs(config)
    estimate = sum(nested.values())
    if estimate > MAX_UNSHRUNK_SUBCONFIG_PARAMETERS:
        parts = ", ".join(f"{name} (~{count / 1e6:.0f} M)" for name, count in nested.items())
        raise ScriptError(f"{label} would keep sub-configs with their own layers at full size: {parts}; tiny "
                          "shrinks the language model's config only (and text_config), so the replica would "
                          f"have about {estimate / 1e9:.1f} B parameters")


def unshrunk_subconfigs(config: dict[str, Any]) -> dict[str, int]:
    """Nested sub-configs with their own layer count (not shrunk by tiny) -> estimated parameters.

    Estimate per sub-config: 12 x layers x hidden^2 (attention 4 h^2 + an MLP of 4 h; embeddings left out).
    """
    found = {}
    for name, part in config.items():
        if name == "text_config" or not isinstance(part, dict):
            continue
        layers = next((part[k] for k in LAYER_COUNT_KEYS if is_int(part.get(k)) and part[k] > 0), None)
        width = next((part[k] for k in ALIASES["hidden_size"] if is_int(part.get(k)) and part[k] > 0), None)
        if layers and width:
            found[name] = SUBCONFIG_PARAMETERS_PER_LAYER_PER_WIDTH_SQUARED * layers * width * width
    return found
