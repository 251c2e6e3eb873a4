"""What a Hugging Face causal-LM config and module tree look like, in one place.

Two parts:

(a) :func:`config_view` reads a ``config.json`` dict (pure Python) into a frozen
    :class:`ConfigView`: width, heads, kv heads, head_dim, FFN size, layers,
    norm eps, activation, RoPE (theta, scaling, rotary fraction and dim, per
    layer type), experts, top-k, shared experts, layer types, sliding window,
    which layers have RoPE, tying, biases, parallel blocks. Every value records
    the config key it came from (``view.key("norm_eps")`` is
    ``"norm_epsilon"`` for Starcoder2), or how it was derived, so tools can
    cite and edit the real key (:func:`set_config_value`). :data:`ALIASES` is
    the one alias table of the skill: every spelling of every field the tools
    read, in priority order.

(b) :func:`resolve_layout` walks an instantiated HF model (torch is imported
    only there) into a :class:`ModelLayout`: the block list, token and
    position embeddings (learned, or a fixed sinusoidal table), the embedding
    and final norms, a prediction head before the LM head, and per block every
    attention and MLP sublayer (LongCat-Flash has two of each), the attention
    with its q/k/v/o projections and their storage (separate, fused
    ``[q;k;v]``, fused per head, fused per kv group, multi-query fused; Conv1D
    weights are transposed), q/k norms, the block norms and their roles, and
    the MLP or the MoE (router, experts, shared expert and its gate), and the
    parts of a model with several residual streams (Gemma 3n's AltUp: the
    modules that expand, mix and collapse them, ``StreamPart``). Parts are
    found by structure (module types, parameter shapes) with small name tables
    where structure is ambiguous; a part that exists but cannot be resolved
    raises :class:`AnatomyError` naming it. Nothing is guessed.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from cli_support import ScriptError

# --- (a) the config view -------------------------------------------------------------

# Every spelling of every config field the tools read, first match wins. A dotted key reads a
# nested dict (MPT's attn_config, DBRX's ffn_config). The view reads the language-model part
# (``text_config`` when nested); keys are reported with that prefix.
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "emb_dim", "model_dim",
                    "hidden_dim", "dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
                   "decoder_num_hidden_layers"),
    "num_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                  "decoder_attention_heads", "decoder_num_attention_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "kv_n_heads",
                     "num_query_groups", "multi_query_group_num", "decoder_num_key_value_heads",
                     "attn_config.kv_n_heads"),
    "head_dim": ("head_dim", "attention_head_dim", "kv_channels", "d_kv", "head_size", "d_head"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim", "d_ff", "decoder_ffn_dim",
                          "inner_hidden_size"),
    "ffn_ratio": ("expansion_ratio", "mlp_ratio", "ffn_ratio"),  # FFN width as a multiple of hidden
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                      "seq_length", "n_ctx", "context_length"),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
                 "rms_norm_epsilon", "layernorm_epsilon", "layernorm_eps"),
    "activation": ("hidden_act", "hidden_activation", "activation_function", "activation", "act_fn",
                   "ffn_act_fn", "decoder_hidden_act"),
    "rotary_fraction": ("partial_rotary_factor", "rotary_pct", "rotary_emb_fraction",
                        "rope_parameters.partial_rotary_factor"),
    "rotary_dim": ("rotary_dim", "rotary_emb_dim", "rope_dim"),  # rotated dims per head (absolute)
    "rope_theta": ("rope_theta", "rotary_emb_base", "rotary_base", "rope_base", "rope_parameters.rope_theta"),
    "rope_scaling": ("rope_scaling",),
    "rope_parameters": ("rope_parameters",),
    "rope_local_theta": ("rope_local_base_freq",),  # old Gemma 3: RoPE base of sliding layers
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                    "ffn_config.moe_num_experts"),
    "experts_per_token": ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk", "moe_k",
                          "top_k", "ffn_config.moe_top_k"),
    "num_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "expert_intermediate_size": ("moe_intermediate_size", "expert_intermediate_size", "ffn_config.ffn_hidden_size",
                                 "expert_ffn_hidden_size"),
    "zero_experts": ("zero_expert_num",),  # identity experts the router may pick beside the routed ones (LongCat)
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    "norm_topk_prob": ("norm_topk_prob",),
    "router_scoring": ("scoring_func", "router_scoring_func", "moe_router_activation"),
    "moe_sparse_step": ("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step"),
    "moe_dense_layers": ("mlp_only_layers",),  # layer indices that keep a dense MLP
    "moe_first_dense": ("first_k_dense_replace",),  # the first k layers keep a dense MLP
    "moe_layers": ("moe_layers",),  # explicit list of MoE layer indices
    "layer_types": ("layer_types", "layers_block_type"),
    "sliding_window": ("sliding_window", "window_size", "attention_window_size", "sliding_window_size"),
    "use_sliding_window": ("use_sliding_window",),
    "max_window_layers": ("max_window_layers",),
    "sliding_window_pattern": ("sliding_window_pattern",),
    "attention_types": ("attention_types",),  # GPT-Neo: [[["global", "local"], repeats]]
    "rope_layers": ("no_rope_layers",),  # per layer: 1 = RoPE, 0 = NoPE (SmolLM3, Llama 4)
    "nope_interval": ("no_rope_layer_interval", "nope_layer_interval"),  # every n-th layer is NoPE
    "tie_word_embeddings": ("tie_word_embeddings",),
    "attention_bias": ("attention_bias", "qkv_bias", "use_qkv_bias", "add_qkv_bias", "bias", "use_bias",
                       "enable_bias", "add_bias_linear", "no_bias"),
    "mlp_bias": ("mlp_bias", "use_bias", "bias", "enable_bias", "add_bias_linear", "no_bias"),
    "parallel_block": ("use_parallel_residual", "parallel_attn", "parallel_residual", "parallel_block"),
    "multi_query": ("multi_query",),
    "qk_norm": ("qk_norm", "use_qk_norm", "qk_layernorm", "attn_config.qk_ln"),
    "attn_softcap": ("attn_logit_softcapping",),
    "final_softcap": ("final_logit_softcapping",),
    "logit_scale": ("logit_scale", "logits_scaling", "output_multiplier_scale"),
    "embedding_scale": ("scale_embedding", "embedding_multiplier", "scale_emb"),
    "query_scale": ("query_pre_attn_scalar", "attention_multiplier"),
    "alibi": ("alibi", "attn_config.alibi"),
}

# Boolean keys that mean the opposite of the field they spell (MPT: no_bias=True has no biases).
INVERTED_KEYS = frozenset({"no_bias"})

# Boolean keys that turn the experts off whatever num_experts says (Doge's is_moe, Gemma 4's enable_moe_block).
MOE_SWITCH_KEYS = ("is_moe", "enable_moe_block")

# Families whose FFN width is 4 x hidden when the config leaves it unset (``n_inner: null``, or no
# key at all, as in Bloom); the modeling code hard-codes that multiple.
FFN_MULTIPLE_WHEN_UNSET = 4
FFN_UNSET_FAMILIES = frozenset({"gpt2", "gptj", "gpt_bigcode", "codegen", "bloom", "falcon", "gpt_neo",
                                "imagegpt", "decision_transformer"})

# Families whose block adds attention and MLP of the same input by construction (no config flag).
PARALLEL_FAMILIES = frozenset({"gptj", "codegen", "cohere", "cohere2", "phi"})

# Families whose block count is not the first layer alias: LongCat-Flash's num_hidden_layers counts its two
# attention sublayers per block (its model sets num_hidden_layers = 2 x num_layers); num_layers is the blocks.
BLOCK_COUNT_KEYS = {"longcat_flash": "num_layers"}

# Families that always use ALiBi position biases (no key says so).
ALIBI_FAMILIES = frozenset({"bloom", "mpt"})

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class Source:
    """Where one view value came from: a config key (dotted, with any ``text_config.`` prefix) or a rule."""

    key: str | None
    note: str = ""

    def describe(self) -> str:
        return self.key if self.key else (self.note or "not in the config")


@dataclass(frozen=True)
class RopeSettings:
    """RoPE settings in one spelling, whichever the config used."""

    theta: float | None
    rope_type: str  # default, linear, dynamic, yarn, longrope, llama3, ...
    scaling: dict[str, Any]  # the scaling parameters other than theta and type
    partial_rotary_factor: float | None


@dataclass(frozen=True)
class ConfigView:
    """The fields of a causal-LM config every tool reads, in one spelling, with their sources.

    ``sources[name]`` says which key each value was read from (or how it was derived);
    :meth:`key` is the dotted key to cite or edit, None when the value is derived or absent.
    """

    architecture: str | None
    model_type: str | None
    dtype: str | None
    spelling: str  # "old" (torch_dtype, rope_theta), "new" (dtype, rope_parameters), "mixed" or "none"
    text_prefix: str  # "text_config." when the language model is nested, else ""
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    head_dim_explicit: bool  # head_dim is a config key (it may differ from hidden / heads)
    intermediate_size: int | None
    vocab_size: int | None
    max_positions: int | None
    norm_eps: float | None
    activation: str | None
    rope: RopeSettings | None
    rope_by_layer_type: dict[str, RopeSettings]
    rotary_fraction: float | None  # share of each head RoPE rotates (None: no RoPE settings)
    rotary_dim: int | None  # rotated dims per head
    num_experts: int | None
    experts_per_token: int | None
    num_shared_experts: int | None
    expert_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    norm_topk_prob: bool | None
    router_scoring: str | None
    moe_layers: tuple[int, ...]  # indices of layers with a sparse MoE (empty: dense model)
    layer_types: tuple[str, ...]  # per layer: full_attention, sliding_attention, ...
    sliding_window: int | None
    rope_layers: tuple[bool, ...]  # per layer: True when the layer applies RoPE
    tie_word_embeddings: bool | None  # None: not in the config (transformers' default is True)
    attention_bias: bool | None
    mlp_bias: bool | None
    parallel_block: bool  # attention and MLP read the same input and are summed
    qk_norm: bool | None
    alibi: bool
    attn_softcap: float | None
    final_softcap: float | None
    logit_scale: float | None
    embedding_scale: Any
    query_scale: float | None
    zero_experts: int | None = None  # identity (zero-compute) experts beside the routed ones (LongCat-Flash)
    sources: dict[str, Source] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the raw text part

    def key(self, name: str) -> str | None:
        """The dotted config key a field was read from (None when derived or absent)."""
        source = self.sources.get(name)
        return source.key if source else None

    def source(self, name: str) -> Source:
        """Where a field came from."""
        return self.sources.get(name, Source(None))

    def present_keys(self, name: str) -> tuple[str, ...]:
        """Every alias of ``name`` the config spells (prefixed), in alias order.

        Some configs hold one quantity under two keys that different modules read (DeepSeek-V3.2: the
        router reads ``n_routed_experts``, the experts ``num_experts``); an edit must change them all.
        """
        prefix = self.text_prefix
        return tuple(prefix + key for key in ALIASES.get(name, ()) if has_config_key(self.text, key))

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts and self.num_experts > 1)

    @property
    def head_dim_differs(self) -> bool:
        """head_dim x heads != hidden (an explicit head_dim a port must not recompute)."""
        return (self.head_dim is not None and self.num_heads is not None and self.hidden_size is not None
                and self.head_dim * self.num_heads != self.hidden_size)


def moe_active(config: Mapping[str, Any]) -> bool | None:
    """Whether the config routes between experts: False with one expert or a switch turning them off (Doge's
    is_moe, Gemma 4's enable_moe_block), None when it names no expert count (the code decides) or cannot be read."""
    try:
        view = config_view(config)
    except Exception:  # noqa: BLE001 - a config the view cannot read: no answer
        return None
    if view.num_experts is None and not any(view.text.get(key) is False for key in MOE_SWITCH_KEYS):
        return None
    return view.is_moe


def get_config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key (``attn_config.kv_n_heads``), or None when any part is missing."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def has_config_key(config: Mapping[str, Any], key: str) -> bool:
    """True when the dotted key is present (even with a null value)."""
    *parents, last = key.split(".")
    value: Any = config
    for part in parents:
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return isinstance(value, Mapping) and last in value


def set_config_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in place (as ``ConfigView.key`` names it, ``text_config.`` prefix included)."""
    *parents, last = key.split(".")
    target: Any = config
    for part in parents:
        if not isinstance(target.get(part), dict):
            raise KeyError(f"config has no object at {part!r} of {key!r}")
        target = target[part]
    target[last] = value


def first_key(part: Mapping[str, Any], name: str, *, allow_null: bool = False) -> tuple[str, Any] | None:
    """The first alias of ``name`` present in ``part`` with a non-null value (or any value with allow_null)."""
    for key in ALIASES[name]:
        if has_config_key(part, key):
            value = get_config_value(part, key)
            if value is not None or allow_null:
                return key, value
    return None


def text_part(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The language-model part of a config and its key prefix (``text_config.`` when nested)."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested:
        return nested, "text_config."
    return dict(config), ""


def _is_int(value: Any) -> bool:
    """A whole number (an integral float such as 2.0 counts: JSON writers produce them)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# View fields that hold whole numbers (an integral float in the JSON is read as an int).
_INTEGER_FIELDS = frozenset({"hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                             "vocab_size", "max_positions", "rotary_dim", "num_experts", "experts_per_token",
                             "num_shared_experts", "expert_intermediate_size", "shared_expert_intermediate_size",
                             "zero_experts",
                             "moe_sparse_step", "moe_first_dense", "sliding_window", "max_window_layers",
                             "sliding_window_pattern", "nope_interval"})


class _Reader:
    """Reads aliases from the text part, recording the key each value came from."""

    def __init__(self, part: dict[str, Any], prefix: str, outer: Mapping[str, Any]) -> None:
        self.part, self.prefix, self.outer = part, prefix, outer
        self.sources: dict[str, Source] = {}

    def read(self, name: str, accept: Callable[[Any], bool] = lambda v: v is not None) -> Any:
        for key in ALIASES[name]:
            for where, prefix in ((self.part, self.prefix), (self.outer, "")):
                if has_config_key(where, key) and accept(get_config_value(where, key)):
                    value = get_config_value(where, key)
                    if key in INVERTED_KEYS and isinstance(value, bool):
                        value = not value
                    elif isinstance(value, float) and value.is_integer() and name in _INTEGER_FIELDS:
                        value = int(value)
                    self.sources[name] = Source(prefix + key)
                    return value
                if not prefix:
                    break  # not nested: the outer config is the part itself
        return None

    def derive(self, name: str, value: Any, note: str) -> Any:
        self.sources[name] = Source(None, note)
        return value


def config_view(config: Mapping[str, Any]) -> ConfigView:
    """The :class:`ConfigView` of a config dict (ScriptError for a field of the wrong JSON type)."""
    import input_files
    import model_source

    if not isinstance(config, Mapping):
        raise ScriptError(f"config is {input_files.json_type_name(config)}, expected a JSON object")
    config = dict(config)
    model_source.check_config_fields(config)
    part, prefix = text_part(config)
    reader = _Reader(part, prefix, config)
    model_type = part.get("model_type") if prefix else config.get("model_type")
    family = str(model_type or config.get("model_type") or "")

    hidden = reader.read("hidden_size", _is_int)
    layers = reader.read("num_layers", _is_int)
    block_key = BLOCK_COUNT_KEYS.get(family)
    if block_key and _is_int(get_config_value(part, block_key)):
        layers = int(get_config_value(part, block_key))
        reader.sources["num_layers"] = Source(prefix + block_key, f"{family}: {block_key} counts the blocks")
    heads = reader.read("num_heads", _is_int)
    kv_heads = _kv_heads(reader, part, prefix, heads)
    head_dim = reader.read("head_dim", _is_int)
    explicit = head_dim is not None
    if head_dim is None and hidden and heads:
        head_dim = reader.derive("head_dim", hidden // heads, "hidden_size / num_attention_heads")
    intermediate = _intermediate(reader, family, hidden)
    rope, by_layer = _rope(part, prefix, reader)
    reader.read("rope_theta", _is_number)  # records which key holds theta (the value is rope.theta)
    fraction, rotary_dim = _rotary(reader, rope, head_dim)
    experts = reader.read("num_experts", _is_int)
    switch = next((key for key in MOE_SWITCH_KEYS if part.get(key) is False), None)
    if experts is not None and switch:
        # Doge: num_experts is set by default, but is_moe=false builds a dense MLP in every layer.
        experts = reader.derive("num_experts", None, f"{switch}=false: dense MLP, the expert count is unused")
    eps = reader.read("norm_eps", _is_number)
    activation = reader.read("activation", lambda v: isinstance(v, str))
    layer_types = _layer_types(reader, layers)
    window = reader.read("sliding_window", lambda v: _is_int(v) and v > 0)
    parallel = bool(reader.read("parallel_block", lambda v: isinstance(v, bool)))
    if family == "falcon" and part.get("new_decoder_architecture") is True:
        parallel = reader.derive("parallel_block", True, "falcon new_decoder_architecture: parallel by construction")
    elif family in PARALLEL_FAMILIES:
        parallel = reader.derive("parallel_block", True, f"{family}: parallel block by construction")
    alibi = bool(reader.read("alibi", lambda v: isinstance(v, bool)))
    if family in ALIBI_FAMILIES:
        alibi = reader.derive("alibi", True, f"{family}: ALiBi by construction")
    tie = reader.read("tie_word_embeddings", lambda v: isinstance(v, bool))
    if tie is None:
        reader.derive("tie_word_embeddings", None, "not in the config (transformers' default is True)")

    dtype = config.get("dtype") or config.get("torch_dtype") or part.get("dtype") or part.get("torch_dtype")
    old = any(k in part or k in config for k in ("torch_dtype", "rope_theta", "rope_scaling", "rope_local_base_freq"))
    new = any(k in part or k in config for k in ("dtype", "rope_parameters"))
    archs = config.get("architectures") or []
    return ConfigView(
        architecture=archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None,
        model_type=config.get("model_type"),
        dtype=str(dtype) if dtype is not None else None,
        spelling="mixed" if old and new else "old" if old else "new" if new else "none",
        text_prefix=prefix,
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, head_dim_explicit=explicit, intermediate_size=intermediate,
        vocab_size=reader.read("vocab_size", _is_int), max_positions=reader.read("max_positions", _is_int),
        norm_eps=float(eps) if eps is not None else None, activation=activation,
        rope=rope, rope_by_layer_type=by_layer, rotary_fraction=fraction, rotary_dim=rotary_dim,
        num_experts=experts,
        experts_per_token=reader.read("experts_per_token", _is_int),
        num_shared_experts=reader.read("num_shared_experts", _is_int),
        expert_intermediate_size=reader.read("expert_intermediate_size", _is_int),
        shared_expert_intermediate_size=reader.read("shared_expert_intermediate_size", _is_int),
        norm_topk_prob=reader.read("norm_topk_prob", lambda v: isinstance(v, bool)),
        router_scoring=reader.read("router_scoring", lambda v: isinstance(v, str)),
        moe_layers=_moe_layers(reader, layers, experts),
        layer_types=layer_types,
        sliding_window=window,
        rope_layers=_rope_layers(reader, layers, rope is not None or rotary_dim is not None, alibi),
        tie_word_embeddings=tie,
        attention_bias=reader.read("attention_bias", lambda v: isinstance(v, bool)),
        mlp_bias=reader.read("mlp_bias", lambda v: isinstance(v, bool)),
        parallel_block=parallel,
        qk_norm=reader.read("qk_norm", lambda v: isinstance(v, bool)),
        alibi=alibi,
        attn_softcap=reader.read("attn_softcap", lambda v: _is_number(v) and v > 0),
        final_softcap=reader.read("final_softcap", lambda v: _is_number(v) and v > 0),
        logit_scale=reader.read("logit_scale", _is_number),
        embedding_scale=reader.read("embedding_scale"),
        query_scale=reader.read("query_scale", _is_number),
        zero_experts=reader.read("zero_experts", _is_int),
        sources=dict(reader.sources),
        text=part,
    )


def _kv_heads(reader: _Reader, part: dict[str, Any], prefix: str, heads: int | None) -> int | None:
    """kv heads: multi_query means one (Falcon only when not new_decoder_architecture), else the alias."""
    multi_query = part.get("multi_query") is True and part.get("new_decoder_architecture") is not True
    if multi_query:
        reader.sources["num_kv_heads"] = Source(prefix + "multi_query", "multi_query=true: one key/value head")
        return 1
    kv = reader.read("num_kv_heads", _is_int)
    if kv is None and heads is not None:
        return reader.derive("num_kv_heads", heads, "no kv-head key: one key/value head per query head")
    return kv


def _intermediate(reader: _Reader, family: str, hidden: int | None) -> int | None:
    value = reader.read("intermediate_size", _is_int)
    if value is not None:
        return value
    ratio = reader.read("ffn_ratio", _is_number)
    if ratio is not None and hidden:
        key = reader.sources.pop("ffn_ratio").key
        return reader.derive("intermediate_size", int(hidden * ratio), f"hidden_size x {key}")
    if family in FFN_UNSET_FAMILIES and hidden:
        return reader.derive("intermediate_size", FFN_MULTIPLE_WHEN_UNSET * hidden,
                             f"{FFN_MULTIPLE_WHEN_UNSET} x hidden_size ({family} default when unset)")
    return None


def _rope_from_params(params: Mapping[str, Any], partial: Any) -> RopeSettings:
    rest = dict(params)
    theta = rest.pop("rope_theta", None)
    rope_type = rest.pop("rope_type", None) or rest.pop("type", None) or "default"
    rest.pop("type", None)
    factor = rest.pop("partial_rotary_factor", None)
    if factor is None:
        factor = partial
    return RopeSettings(theta=float(theta) if theta is not None else None, rope_type=str(rope_type),
                        scaling=rest, partial_rotary_factor=None if factor is None else float(factor))


def _rope(part: dict[str, Any], prefix: str, reader: _Reader) -> tuple[RopeSettings | None, dict[str, RopeSettings]]:
    """RoPE settings from rope_parameters (new spelling, maybe per layer type) or rope_theta/rope_scaling."""
    first = first_key(part, "rotary_fraction")
    partial = first[1] if first and first[0] == "partial_rotary_factor" else None
    params = part.get("rope_parameters")
    by_layer: dict[str, RopeSettings] = {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        for layer_type, sub in params.items():
            by_layer[layer_type] = _rope_from_params(sub, partial)
        reader.sources["rope"] = Source(prefix + "rope_parameters")
        return by_layer.get(FULL_ATTENTION) or next(iter(by_layer.values())), by_layer
    if isinstance(params, dict) and params:
        reader.sources["rope"] = Source(prefix + "rope_parameters")
        return _rope_from_params(params, partial), by_layer
    scaling = part.get("rope_scaling")
    theta_key = next(((k, get_config_value(part, k)) for k in ALIASES["rope_theta"]
                      if _is_number(get_config_value(part, k))), None)
    theta = theta_key[1] if theta_key else None
    if theta is None and not isinstance(scaling, dict) and partial is None:
        return None, by_layer
    merged = dict(scaling) if isinstance(scaling, dict) else {}
    if theta is not None:
        merged["rope_theta"] = theta
    rope = _rope_from_params(merged, partial)
    reader.sources["rope"] = Source(prefix + (theta_key[0] if theta_key else "rope_scaling"))
    local_theta = part.get("rope_local_base_freq")
    if local_theta is not None:
        # Old Gemma 3 spelling: sliding layers use an unscaled RoPE with their own base
        # (transformers 5 nests this per layer type).
        by_layer = {SLIDING_ATTENTION: _rope_from_params({"rope_theta": local_theta}, partial), FULL_ATTENTION: rope}
    return rope, by_layer


def _rotary(reader: _Reader, rope: RopeSettings | None, head_dim: int | None) -> tuple[float | None, int | None]:
    """The rotated share of each head and its size in dims (rotary_dim wins over a fraction)."""
    dim = reader.read("rotary_dim", lambda v: _is_int(v) and v > 0)
    if dim is not None:
        fraction = dim / head_dim if head_dim else None
        reader.derive("rotary_fraction", fraction, "rotary_dim / head_dim")
        return fraction, dim
    fraction = reader.read("rotary_fraction", lambda v: _is_number(v) and 0 < v <= 1)
    if fraction is None and rope is not None and rope.partial_rotary_factor is not None:
        fraction = reader.derive("rotary_fraction", rope.partial_rotary_factor, "rope_parameters per layer type")
    if fraction is None and rope is not None:
        fraction = reader.derive("rotary_fraction", 1.0, "no partial-rotary key: RoPE rotates the whole head")
    if fraction is None or head_dim is None:
        return fraction, None
    return float(fraction), reader.derive("rotary_dim", int(head_dim * fraction), "head_dim x rotary fraction")


def _layer_types(reader: _Reader, layers: int | None) -> tuple[str, ...]:
    """Per-layer attention kind: the explicit list, or the rule of the config's window keys."""
    explicit = reader.read("layer_types", lambda v: isinstance(v, list) and v)
    if explicit:
        return tuple(str(t) for t in explicit)
    if not layers:
        return ()
    gpt_neo = reader.read("attention_types", lambda v: isinstance(v, list) and v)
    if gpt_neo:
        kinds: list[str] = []
        for item in gpt_neo:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and _is_int(item[1]):
                kinds.extend(str(k) for _ in range(item[1]) for k in item[0])
        mapped = [SLIDING_ATTENTION if k == "local" else FULL_ATTENTION for k in kinds[:layers]]
        if len(mapped) == layers:
            reader.derive("layer_types", None, "expanded from attention_types (local = sliding)")
            return tuple(mapped)
    window = reader.read("sliding_window", lambda v: _is_int(v) and v > 0)
    use = reader.read("use_sliding_window", lambda v: isinstance(v, bool))
    reader.sources.pop("sliding_window", None)
    reader.sources.pop("use_sliding_window", None)
    pattern = reader.read("sliding_window_pattern", lambda v: _is_int(v) and v > 0)
    if window and pattern:
        reader.derive("layer_types", None, "every sliding_window_pattern-th layer is full, the rest slide")
        return tuple(FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(layers))
    if window and use is not False:
        start = reader.read("max_window_layers", _is_int)
        if start is not None and use is True:
            reader.derive("layer_types", None, "layers from max_window_layers on slide")
            return tuple(SLIDING_ATTENTION if i >= start else FULL_ATTENTION for i in range(layers))
        reader.derive("layer_types", None, "sliding_window set: every layer slides")
        return (SLIDING_ATTENTION,) * layers
    reader.derive("layer_types", None, "no window keys: every layer attends fully")
    return (FULL_ATTENTION,) * layers


def _rope_layers(reader: _Reader, layers: int | None, has_rope: bool, alibi: bool) -> tuple[bool, ...]:
    if not layers:
        return ()
    explicit = reader.read("rope_layers", lambda v: isinstance(v, list) and v)
    if explicit:
        return tuple(bool(v) for v in explicit[:layers])
    interval = reader.read("nope_interval", lambda v: _is_int(v) and v > 0)
    if interval and has_rope:
        return tuple((i + 1) % interval != 0 for i in range(layers))
    note = "every layer applies RoPE" if has_rope and not alibi else "no RoPE settings: no layer applies RoPE"
    reader.derive("rope_layers", None, note)
    return (has_rope and not alibi,) * layers


def _moe_layers(reader: _Reader, layers: int | None, experts: int | None) -> tuple[int, ...]:
    """Indices of sparse-MoE layers under the config's own rule (Qwen2-MoE, DeepSeek, Llama 4 spellings)."""
    if not layers or not experts or experts <= 1:
        return ()
    explicit = reader.read("moe_layers", lambda v: isinstance(v, list))
    if explicit is not None:
        return tuple(i for i in explicit if _is_int(i) and 0 <= i < layers)
    dense = {i for i in reader.read("moe_dense_layers", lambda v: isinstance(v, list)) or [] if _is_int(i)}
    first_dense = reader.read("moe_first_dense", _is_int) or 0
    step = reader.read("moe_sparse_step", lambda v: _is_int(v) and v > 0) or 1
    step_key = reader.sources.get("moe_sparse_step", Source(None)).key or ""
    if step_key.endswith("moe_layer_freq"):  # DeepSeek: i >= k and i % freq == 0
        return tuple(i for i in range(layers) if i >= first_dense and i % step == 0 and i not in dense)
    return tuple(i for i in range(layers) if i >= first_dense and (i + 1) % step == 0 and i not in dense)


# --- (b) the layout resolver -----------------------------------------------------------


class AnatomyError(ScriptError):
    """A part the model has but the resolver cannot name; the message names the part and the module path."""


class WeightStorage(enum.Enum):
    """How a projection stores its weight."""

    LINEAR = "linear"  # torch Linear: weight [out, in]
    CONV1D = "conv1d"  # transformers Conv1D (GPT-2): weight [in, out], transposed
    STACKED = "stacked"  # one [experts, out, in] weight, an expert picked per token (JetMoE's attention experts)


class QKVKind(enum.Enum):
    """How the query, key and value projections are stored."""

    SEPARATE = "separate"  # q, k, v projections of their own
    FUSED = "fused"  # one projection, output [q; k; v]
    FUSED_PER_HEAD = "fused_per_head"  # one projection, output [q_h; k_h; v_h] for each head h (GPT-NeoX, Bloom)
    FUSED_GROUPED = "fused_grouped"  # per kv group g: [q_g1 .. q_gr; k_g; v_g] (Falcon new_decoder_architecture)
    FUSED_MULTI_QUERY = "fused_multi_query"  # [q (all heads); k; v] with one kv head (GPTBigCode, Falcon-7B)
    FUSED_BLOCKED = "fused_blocked"  # ``fused_blocks`` blocks of [q_b; v_b; k_b], each a run of heads (CodeGen)
    LATENT = "latent"  # multi-head latent attention: low-rank q and kv with a shared RoPE key (DeepSeek-V2/V3)
    MIXTURE_OF_HEADS = "mixture_of_heads"  # queries and outputs from routed attention experts, shared [k; v] (JetMoE)
    SHARED_KV = "shared_kv"  # queries only: keys and values are an earlier layer's (Gemma 3n's KV-sharing layers)


class NormRole(enum.Enum):
    """What a block norm normalizes."""

    INPUT = "input"  # the block input, before attention
    PRE_MLP = "pre_mlp"  # the MLP input (after the attention residual; or the block input in a parallel block)
    SHARED = "shared"  # one norm of the block input feeding attention and MLP (parallel block)
    ATTENTION_OUTPUT = "attention_output"  # the attention output, before the residual add (Gemma 2, OLMo 2)
    MLP_OUTPUT = "mlp_output"  # the MLP output, before the residual add
    ATTENTION_RESIDUAL = "attention_residual"  # post-LN: the residual stream after the attention add (OPT-350m)
    MLP_RESIDUAL = "mlp_residual"  # post-LN: the residual stream after the MLP add
    PER_LAYER_INPUT_OUTPUT = "per_layer_input_output"  # the per-layer-input branch's output (Gemma 3n / 4)


@dataclass(frozen=True)
class Projection:
    """One linear map: its module path, storage, sizes and bias."""

    path: str
    storage: WeightStorage
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def transposed(self) -> bool:
        return self.storage is WeightStorage.CONV1D


@dataclass(frozen=True)
class LatentAttention:
    """The low-rank parts of multi-head latent attention (DeepSeek-V2/V3 and the families built on it).

    Queries: ``q_b(q_a_norm(q_a(x)))`` (or one direct projection, ``AttentionLayout.q``, when
    ``q_lora_rank`` is None). Keys and values: ``kv_a(x)`` splits into a ``kv_lora_rank`` latent
    and one shared ``rope_head_dim`` RoPE key; ``kv_b(kv_a_norm(latent))`` gives per head
    ``[k_nope; v]``. Each query head is ``[nope_head_dim; rope_head_dim]``.
    """

    q_a: Projection | None
    q_a_norm: str | None
    kv_a: Projection
    kv_a_norm: str
    kv_b: Projection
    q_lora_rank: int | None
    kv_lora_rank: int
    nope_head_dim: int
    rope_head_dim: int
    v_head_dim: int

    def query_rope_rows(self, num_heads: int) -> list[int]:
        """Output rows of the per-head query projection that RoPE rotates (the last rope_head_dim of each head)."""
        width = self.nope_head_dim + self.rope_head_dim
        return [h * width + self.nope_head_dim + i for h in range(num_heads) for i in range(self.rope_head_dim)]

    def key_rope_rows(self) -> list[int]:
        """Output rows of ``kv_a`` holding the one shared RoPE key (after the kv_lora_rank latent)."""
        return list(range(self.kv_lora_rank, self.kv_lora_rank + self.rope_head_dim))


@dataclass(frozen=True)
class AttentionLayout:
    """The attention module of a block and its projections (q/k/v are None when fused into ``qkv``).

    LATENT: ``q`` is the per-head query projection, ``latent`` holds the rest, k/v/qkv are None.
    MIXTURE_OF_HEADS: ``q`` and ``o`` are STACKED expert weights, ``qkv`` is the shared [k; v]
    projection and ``router`` picks the experts.
    """

    path: str
    qkv_kind: QKVKind
    q: Projection | None
    k: Projection | None
    v: Projection | None
    qkv: Projection | None
    o: Projection
    q_norm: str | None
    k_norm: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused_blocks: int = 1  # FUSED_BLOCKED: how many [q; v; k] blocks the fused output has
    latent: LatentAttention | None = None  # LATENT: the low-rank projections and their norms
    output_gate: Projection | None = None  # gate on the attention output before ``o`` (per element or per head)
    mask_projection: Projection | None = None  # per-head dynamic mask from the values (Doge's dt_proj)
    v_norm: str | None = None  # a norm of each value head (Gemma 4)
    sub_norm: str | None = None  # a norm of the attention output before ``o`` (BitNet, DiffLlama's groupnorm)
    value_head_dim: int | None = None  # size of a value head when it differs from head_dim (latent attention)
    router: str | None = None  # MIXTURE_OF_HEADS: the router picking the attention experts
    indexer: str | None = None  # sparse attention: the module choosing which keys each query reads (DeepSeek-V3.2)
    kv_source: int | None = None  # SHARED_KV: the layer whose keys and values this attention reads

    @property
    def output_gate_per_head(self) -> bool:
        """The output gate has one value per head (Laguna) rather than one per output element (AFMoE)."""
        return self.output_gate is not None and self.output_gate.out_features == self.num_heads

    def _rows(self, which: str) -> list[int]:
        n, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        kind = self.qkv_kind
        if kind is QKVKind.SHARED_KV and which != "query":
            raise AnatomyError(f"cannot resolve the {which} rows of {self.path}: it reads layer {self.kv_source}'s "
                               "keys and values and has no projection of its own")
        if kind is QKVKind.MIXTURE_OF_HEADS:
            # each query expert's rows are kv heads (top-k slot s's head j reads kv head j); the shared kv
            # projection ``qkv`` is [k; v]
            start, stop = {"query": (0, kv), "key": (0, kv), "value": (kv, 2 * kv)}[which]
            return list(range(start * d, stop * d))
        if kind is QKVKind.LATENT and which != "query":
            raise AnatomyError(f"cannot resolve the {which} rows of {self.path}: {kind.value} attention has no "
                               f"{which} rows in one Linear projection")
        if kind in (QKVKind.SEPARATE, QKVKind.LATENT, QKVKind.SHARED_KV):
            return list(range((n if which == "query" else kv) * d))
        if kind in (QKVKind.FUSED, QKVKind.FUSED_MULTI_QUERY):
            start, count = {"query": (0, n), "key": (n, kv), "value": (n + kv, kv)}[which]
            return list(range(start * d, (start + count) * d))
        if kind is QKVKind.FUSED_PER_HEAD:
            offset = {"query": 0, "key": d, "value": 2 * d}[which]
            return [h * 3 * d + offset + i for h in range(n) for i in range(d)]
        if kind is QKVKind.FUSED_BLOCKED:
            local = n * d // self.fused_blocks
            offset = {"query": 0, "value": local, "key": 2 * local}[which]
            return [b * 3 * local + offset + i for b in range(self.fused_blocks) for i in range(local)]
        group = n // kv
        if which == "query":
            return [g * (group + 2) * d + i for g in range(kv) for i in range(group * d)]
        offset = group * d if which == "key" else (group + 1) * d
        return [g * (group + 2) * d + offset + i for g in range(kv) for i in range(d)]

    def query_rows(self) -> list[int]:
        """Output rows of the query projection (``q``, or the query rows of the fused ``qkv``), in head order."""
        return self._rows("query")

    def key_rows(self) -> list[int]:
        """Output rows of the key projection (``k``, or the key rows of the fused ``qkv``), in head order.

        Latent attention has no such rows (AnatomyError naming the attention); mixture of heads: the rows
        of the shared [k; v] projection ``qkv``, and ``query_rows`` are the rows of each query expert.
        """
        return self._rows("key")

    def value_rows(self) -> list[int]:
        """Output rows of the value projection (``v``, or the value rows of the fused ``qkv``), in head order."""
        return self._rows("value")

    @property
    def query_projection(self) -> Projection:
        """The projection holding the query rows."""
        if self.qkv_kind is QKVKind.MIXTURE_OF_HEADS:
            raise AnatomyError(f"cannot resolve the query projection of {self.path}: its queries come from "
                               "routed attention experts (stacked weights)")
        return self.q if self.q is not None else self.qkv  # type: ignore[return-value]

    @property
    def key_projection(self) -> Projection:
        if self.qkv_kind in (QKVKind.LATENT, QKVKind.MIXTURE_OF_HEADS, QKVKind.SHARED_KV):
            raise AnatomyError(f"cannot resolve the key projection of {self.path}: {self.qkv_kind.value} "
                               "attention has no key rows in one Linear projection")
        return self.k if self.k is not None else self.qkv  # type: ignore[return-value]


@dataclass(frozen=True)
class MLPLayout:
    """A dense MLP: ``down(act(gate(x)) * up(x))`` when gated, else ``down(act(up(x)))``."""

    path: str
    gated: bool
    up: Projection | None  # None when gate and up are fused into gate_up
    gate: Projection | None
    gate_up: Projection | None  # fused [gate; up] (Phi-3)
    down: Projection
    sub_norm: str | None = None  # a norm of the activated hidden before ``down`` (BitNet's ffn_sub_norm)


@dataclass(frozen=True)
class MoELayout:
    """A sparse MoE block: router, experts, optional shared expert and its gate."""

    path: str
    router: str
    num_experts: int
    experts: str
    experts_fused: bool  # one module with [experts, ...] weights (transformers 5) vs a list of MLPs
    expert: MLPLayout | None  # the first expert, when experts are a list of MLP modules
    shared_expert: MLPLayout | None
    shared_expert_gate: str | None
    zero_experts: int = 0  # identity experts the router scores after the routed ones (router outputs = sum)


@dataclass(frozen=True)
class NormRef:
    """A norm module and what it normalizes."""

    path: str
    role: NormRole
    eps: float | None
    sublayer: int = 0  # which attention/MLP pair of the block it serves (LongCat-Flash has two)


@dataclass(frozen=True)
class PerLayerInputs:
    """Gemma 3n / 4 per-layer inputs: a second token embedding plus a projection of the embeddings, both
    ``blocks x width`` wide; block i reads slice i (after ``norm``)."""

    embedding: str
    projection: Projection
    norm: str | None
    width: int  # per-block input width (hidden_size_per_layer_input)


@dataclass(frozen=True)
class BlockPerLayerInput:
    """A block's per-layer-input branch: ``norm(projection(act(gate(h)) * per_layer_input))`` added to ``h``."""

    gate: Projection
    projection: Projection
    norm: str | None


@dataclass(frozen=True)
class BlockLayout:
    """One decoder block.

    Most blocks have one attention and one MLP or MoE. A block with several sublayers (LongCat-Flash:
    attention, MLP, attention, MLP, each with its own norms) lists them all in ``attentions`` and
    ``mlps`` (in data-flow order; ``attention`` and ``mlp`` are the first) and tags each norm with its
    ``sublayer``. ``moe_shortcut``: the MoE is a branch beside the dense MLPs, reading sublayer 0's
    pre-MLP norm output and added to the block output (LongCat-Flash), not the block's feed-forward.
    """

    index: int
    path: str
    attention: AttentionLayout
    mlp: MLPLayout | None
    moe: MoELayout | None
    norms: tuple[NormRef, ...]
    parallel: bool  # attention and MLP read the same input and are summed
    per_layer_input: BlockPerLayerInput | None = None  # Gemma 3n / 4
    attentions: tuple[AttentionLayout, ...] = ()  # every attention sublayer (empty when built: (attention,))
    mlps: tuple[MLPLayout, ...] = ()  # every dense MLP sublayer (empty when built: (mlp,) or ())
    moe_shortcut: bool = False

    def __post_init__(self) -> None:
        if not self.attentions:
            object.__setattr__(self, "attentions", (self.attention,))
        if not self.mlps and self.mlp is not None:
            object.__setattr__(self, "mlps", (self.mlp,))
        if self.attentions[0] is not self.attention or (self.mlps and self.mlps[0] is not self.mlp):
            raise ValueError(f"{self.path}: attention and mlp must be the first of attentions and mlps")

    def norm(self, role: NormRole, sublayer: int = 0) -> NormRef | None:
        """The norm of ``role`` serving ``sublayer`` (None when the block has none)."""
        return next((n for n in self.norms if n.role is role and n.sublayer == sublayer), None)

    @property
    def mlp_output_path(self) -> str | None:
        """The module whose output is the block's feed-forward output (MLP, MoE, or the inline down projection)."""
        if self.moe is not None:
            return self.moe.path
        if self.mlp is None:
            return None
        return self.mlp.path if self.mlp.path != self.path else self.mlp.down.path


# Config keys giving the number of residual streams per token (Gemma 3n AltUp, DeepSeek-V4 hyper-connections).
STREAM_COUNT_KEYS = ("altup_num_inputs", "hc_mult")
# How many stream parts a refusal names before "and N more" (enough to show each role once).
STREAM_PARTS_NAMED = 4


class StreamRole(enum.Enum):
    """What a part of a several-residual-stream model does to the streams (Gemma 3n AltUp, DeepSeek-V4 mHC)."""

    EXPAND = "expand"  # makes the extra streams from the embeddings (Gemma 3n altup_projections)
    MIX = "mix"  # in a block: predicts / collapses / re-mixes the streams around its sublayers (altup, attn_hc)
    COLLAPSE = "collapse"  # folds the streams into one before the final norm (altup_unembed_projections, hc_head)


@dataclass(frozen=True)
class StreamPart:
    """A module that reads or writes several residual streams, and its role."""

    path: str
    role: StreamRole
    module_class: str


@dataclass(frozen=True)
class HeadTransform:
    """A prediction head before the LM head: ``norm(act(dense(h)))`` (ModernBERT-decoder's ``lm_head``)."""

    path: str
    dense: Projection
    norm: str


@dataclass(frozen=True)
class ModelLayout:
    """Where each part of an HF causal LM lives (module paths relative to the model)."""

    model_class: str
    model_type: str | None
    decoder: str  # the module holding the block list
    blocks_path: str
    blocks: tuple[BlockLayout, ...]
    token_embedding: str
    position_embedding: str | None  # learned absolute positions
    position_offset: int  # rows before position 0 (OPT: 2)
    embedding_norm: str | None  # a norm applied to the embeddings before the first block (Bloom)
    final_norm: str | None
    lm_head: str
    tied: bool  # the LM head shares the token embedding matrix
    rotary: str | None
    project_in: str | None = None  # embedding width -> hidden (OPT with word_embed_proj_dim != hidden)
    project_out: str | None = None  # hidden -> embedding width, before the LM head
    per_layer_inputs: PerLayerInputs | None = None  # Gemma 3n / 4
    # A fixed sinusoidal position table added to the embeddings: the dotted path of its buffer (CTRL:
    # transformer.pos_encoding, XGLM: model.embed_positions.weights; rows from position_offset). It is
    # not a weight: non-persistent, rebuilt at load, so a replica cannot rescale it.
    position_table: str | None = None
    head_transform: HeadTransform | None = None  # dense -> activation -> norm between final norm and LM head
    # Several residual streams per token (Gemma 3n AltUp, DeepSeek-V4 hyper-connections): how many, and every
    # module that expands, mixes or collapses them. Block outputs are then stacks of streams, not one hidden
    # state; a step that needs the one residual stream says so (single_stream_refusal).
    residual_streams: int = 1
    stream_parts: tuple[StreamPart, ...] = ()

    def single_stream_refusal(self) -> str | None:
        """Why a step that reads or edits the one residual stream cannot apply, or None when there is one."""
        if self.residual_streams == 1:
            return None
        parts = ", ".join(f"{p.path} ({p.role.value})" for p in self.stream_parts[:STREAM_PARTS_NAMED])
        more = (f" and {len(self.stream_parts) - STREAM_PARTS_NAMED} more"
                if len(self.stream_parts) > STREAM_PARTS_NAMED else "")
        return (f"{self.model_class} keeps {self.residual_streams} residual streams ({parts}{more}); "
                "a block's output is a stack of streams, not the one residual stream this step reads")

    def norm_input_floor(self) -> str | None:
        """What keeps the norms' inputs above a floor no weight scaling reaches, or None.

        A fixed sinusoidal position table (CTRL, XGLM: rebuilt at load) is added to every position; post-LN
        blocks with no norm before them (OpenAI GPT) give their first norm the attention's biases. The replica's
        calibration leaves the embeddings a share above that floor, and a norm eps far below it barely matters,
        on the replica and on the model alike.
        """
        if self.position_table:
            return f"the fixed position table {self.position_table} (not a weight)"
        if not self.first_norm and self.blocks and self.blocks[0].norms:
            return f"the attention biases of {self.blocks[0].path} before its first norm (post-LN)"
        return None

    @property
    def first_norm(self) -> str | None:
        """The first norm that reads the embeddings: the embedding norm, else block 0's input norm."""
        if self.embedding_norm:
            return self.embedding_norm
        if not self.blocks:
            return None
        first = self.blocks[0].norm(NormRole.INPUT) or self.blocks[0].norm(NormRole.SHARED)
        return first.path if first else None


# Name tables for parts whose role the shapes cannot tell (q vs k vs v vs o when every
# projection is hidden x hidden; the MLP up vs gate). Names are matched exactly.
QUERY_NAMES = ("q_proj", "query", "q", "wq", "q_lin", "Wq", "project_q")
KEY_NAMES = ("k_proj", "key", "k", "wk", "k_lin", "Wk", "project_k")
VALUE_NAMES = ("v_proj", "value", "v", "wv", "v_lin", "Wv", "project_v")
OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "proj", "Wo", "attention_out")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "att_proj", "W_pack")
# Attention projections beside q/k/v/o: a gate on the attention output (sigmoid per element in
# AFMoE and HRM, softplus per head in Laguna) and Doge's per-head dynamic-mask projection.
OUTPUT_GATE_NAMES = ("gate_proj", "g_proj")
MASK_PROJECTION_NAMES = ("dt_proj",)
# Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections and their norms.
LATENT_Q_A_NAMES = ("q_a_proj",)
LATENT_Q_B_NAMES = ("q_b_proj",)
LATENT_KV_A_NAMES = ("kv_a_proj_with_mqa",)
LATENT_KV_B_NAMES = ("kv_b_proj",)
LATENT_Q_NORM_NAMES = ("q_a_layernorm",)
LATENT_KV_NORM_NAMES = ("kv_a_layernorm",)
INDEXER_NAMES = ("indexer",)  # DeepSeek-V3.2 / GLM-MoE-DSA sparse attention: the top-k key selector
V_NORM_NAMES = ("v_norm",)
ATTENTION_SUB_NORM_NAMES = ("attn_sub_norm", "groupnorm")
MLP_SUB_NORM_NAMES = ("ffn_sub_norm",)
GATE_NAMES = ("gate_proj", "w1", "wi_0")
UP_NAMES = ("up_proj", "w3", "wi_1", "fc_in", "c_fc", "dense_h_to_4h", "fc1", "wi", "ff_proj")
GATE_UP_NAMES = ("gate_up_proj", "Wi")  # [gate; up]: the first half is activated (Phi-3, ModernBERT's chunk)
DOWN_NAMES = ("down_proj", "w2", "wo", "fc_out", "c_proj", "dense_4h_to_h", "fc2", "ff_out", "Wo")
# Gemma 3n / 4 per-layer inputs: model-level embedding, projection and norm; per-block gate and projection.
PER_LAYER_EMBEDDING_NAMES = ("embed_tokens_per_layer",)
PER_LAYER_PROJECTION_NAMES = ("per_layer_model_projection",)
PER_LAYER_NORM_NAMES = ("per_layer_projection_norm",)
BLOCK_PER_LAYER_GATE_NAMES = ("per_layer_input_gate",)
BLOCK_PER_LAYER_PROJECTION_NAMES = ("per_layer_projection",)
ROUTER_NAMES = ("gate", "router")
EXPERTS_NAMES = ("experts",)
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_EXPERT_GATE_NAMES = ("shared_expert_gate",)
WIDTH_PROJECTION_NAMES = ("project_in", "project_out")
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention", "mixer")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
Q_NORM_NAMES = ("q_norm", "q_layernorm", "query_layernorm", "q_ln")
K_NORM_NAMES = ("k_norm", "k_layernorm", "key_layernorm", "k_ln")
QK_NORM_NAMES = ("qk_norm",)  # one norm module applied to queries and keys (Llama 4's L2 norm)
NORM_ROLE_NAMES: dict[str, NormRole] = {
    **dict.fromkeys(("input_layernorm", "ln_1", "norm_1", "attention_norm", "self_attn_layer_norm", "ln_attn",
                     "attn_norm", "norm1", "pre_attention_layernorm", "attention_layernorm", "layernorm1"),
                   NormRole.INPUT),
    **dict.fromkeys(("post_attention_layernorm", "ln_2", "norm_2", "ffn_norm", "final_layer_norm", "ln_mlp",
                     "pre_feedforward_layernorm", "norm2", "pre_mlp_layernorm", "feedforward_layernorm",
                     "layernorm2", "mlp_norm"), NormRole.PRE_MLP),
    **dict.fromkeys(("post_self_attn_layernorm", "post_norm1"), NormRole.ATTENTION_OUTPUT),  # GLM-4, HyperCLOVA X
    **dict.fromkeys(("post_feedforward_layernorm", "post_mlp_layernorm", "post_norm2"), NormRole.MLP_OUTPUT),
    "post_per_layer_input_norm": NormRole.PER_LAYER_INPUT_OUTPUT,
}
# A block that has a norm after its MLP uses post_attention_layernorm on the attention output.
POST_ATTENTION_NAME = "post_attention_layernorm"
# Families whose norms can sit after the residual add (post-LN), by config flag: the role each
# norm name then has.
POST_LN_FAMILIES: dict[str, tuple[Callable[[ConfigView], bool], dict[str, NormRole]]] = {
    "opt": (lambda view: view.text.get("do_layer_norm_before") is False,
            {"self_attn_layer_norm": NormRole.ATTENTION_RESIDUAL, "final_layer_norm": NormRole.MLP_RESIDUAL}),
    # OpenAI GPT (GPT-1) is always post-LN: n = ln_1(x + attn(x)); h = ln_2(n + mlp(n))
    "openai-gpt": (lambda view: True, {"ln_1": NormRole.ATTENTION_RESIDUAL, "ln_2": NormRole.MLP_RESIDUAL}),
}


def _falcon_qkv(view: ConfigView, kv_heads: int) -> QKVKind:
    if view.text.get("new_decoder_architecture") is True:
        return QKVKind.FUSED_GROUPED
    return QKVKind.FUSED_MULTI_QUERY if kv_heads == 1 else QKVKind.FUSED_PER_HEAD


def _concatenated(view: ConfigView, kv_heads: int) -> QKVKind:
    return QKVKind.FUSED_MULTI_QUERY if kv_heads == 1 else QKVKind.FUSED


def _bigcode_qkv(view: ConfigView, kv_heads: int) -> QKVKind:
    # multi_query: [q (all heads); k; v]; otherwise the output is viewed as [heads, 3 x head_dim].
    return QKVKind.FUSED_MULTI_QUERY if kv_heads == 1 else QKVKind.FUSED_PER_HEAD


def _per_head(view: ConfigView, kv_heads: int) -> QKVKind:
    return QKVKind.FUSED_PER_HEAD


# How each family's fused q/k/v projection is laid out (the shapes cannot tell [q;k;v] from per
# head), given the view and the kv-head count the fused width implies.
FUSED_QKV_LAYOUTS: dict[str, Callable[[ConfigView, int], QKVKind]] = {
    **dict.fromkeys(("gpt2", "mpt", "phi3", "dbrx", "imagegpt", "decision_transformer"), _concatenated),
    **dict.fromkeys(("gpt_neox", "gpt_neox_japanese", "bloom", "persimmon"), _per_head),
    "gpt_bigcode": _bigcode_qkv,
    "falcon": _falcon_qkv,
    **dict.fromkeys(("openai-gpt", "phi4_multimodal"), _concatenated),  # split at [q | k | v] by their forward
    "codegen": lambda view, kv_heads: QKVKind.FUSED_BLOCKED,
}
# FUSED_BLOCKED families: how many [q; v; k] blocks the fused output holds. CodeGen hard-codes
# mp_num = 4 (the TPU model-parallel split of its original checkpoints) in CodeGenAttention.forward.
FUSED_QKV_BLOCKS = {"codegen": 4}


def _class_name(module: Any) -> str:
    return type(module).__name__


def is_norm_module(module: Any) -> bool:
    """A normalization layer: torch LayerNorm/RMSNorm/GroupNorm or a class whose name says Norm.

    A module holding an attention child is a wrapper, not a norm, whatever its name (DBRX's
    ``DbrxNormAttentionNorm`` holds norm_1, attn and norm_2).
    """
    import torch

    norm_types = tuple(t for t in (getattr(torch.nn, n, None) for n in ("LayerNorm", "RMSNorm", "GroupNorm")) if t)
    if isinstance(module, norm_types):
        return True
    return "norm" in _class_name(module).lower() and not _wraps_attention(module)


def _wraps_attention(module: Any) -> bool:
    """``module`` has a direct child that is an attention module (a norm-attention-norm wrapper)."""
    children = getattr(module, "named_children", None)
    return children is not None and any(_is_attention(name, child) for name, child in children())


# Attributes norm modules keep their eps in (transformers' RMSNorms, torch LayerNorm, others).
NORM_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def norm_eps(module: Any) -> float | None:
    """The eps a norm module uses (the first float among ``NORM_EPS_ATTRS``).

    A container of per-head norms (StableLM's ``StableLmLayerNormPerHead``) has no eps of its own: its
    children's eps counts when they all agree.
    """
    for attr in NORM_EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    children = getattr(module, "children", None)
    if children is None:
        return None
    found = {eps for eps in map(norm_eps, module.children()) if eps is not None}
    return found.pop() if len(found) == 1 else None


def _projection(module: Any, path: str) -> Projection | None:
    """The Projection of a Linear or Conv1D module, else None."""
    import torch

    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if _class_name(module) == "Conv1D" and weight is not None and weight.ndim == 2:
        return Projection(path, WeightStorage.CONV1D, int(weight.shape[0]), int(weight.shape[1]), bias is not None)
    if isinstance(module, torch.nn.Linear):
        return Projection(path, WeightStorage.LINEAR, int(module.in_features), int(module.out_features),
                          bias is not None)
    children = list(module.named_children())
    if (weight is None and len(children) == 1 and children[0][0] in WRAPPED_LINEAR_NAMES
            and isinstance(children[0][1], torch.nn.Linear) and not any(True for _ in module.parameters(recurse=False))):
        return _projection(children[0][1], _join(path, children[0][0]))  # Moshi: MoshiLinear wraps one Linear
    return None


# A module with no weight of its own wrapping exactly one Linear under this name is that Linear (MoshiLinear).
WRAPPED_LINEAR_NAMES = ("linear",)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _children(module: Any, path: str) -> list[tuple[str, str, Any]]:
    """(name, full path, module) of the direct children."""
    return [(name, _join(path, name), child) for name, child in module.named_children()]


def _projections(module: Any, path: str) -> dict[str, Projection]:
    found = {}
    for name, full, child in _children(module, path):
        projection = _projection(child, full)
        if projection is not None:
            found[name] = projection
    return found


def resolve_layout(model: Any, view: ConfigView | None = None) -> ModelLayout:
    """The :class:`ModelLayout` of an instantiated HF causal LM (AnatomyError naming any part it cannot resolve)."""
    import torch

    if view is None:
        view = config_view(_config_dict(model))
    paths = {id(module): name for name, module in model.named_modules()}
    blocks_path, block_list = _block_list(model, view)
    decoder = blocks_path.rpartition(".")[0]
    decoder_module = model.get_submodule(decoder) if decoder else model

    input_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if input_embedding is None or id(input_embedding) not in paths:
        raise AnatomyError(f"cannot resolve the token embedding of {type(model).__name__}: "
                           "get_input_embeddings() returned no module of the model")
    wrapper = decoder
    if decoder and len(list(decoder_module.children())) == 1 and \
            not any(m is input_embedding for m in decoder_module.modules()):
        # BERT-style (GIT): the block list sits alone in an encoder wrapper beside the embeddings.
        decoder = decoder.rpartition(".")[0]
        decoder_module = model.get_submodule(decoder) if decoder else model
    token_embedding = paths[id(input_embedding)]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or id(output) not in paths:
        raise AnatomyError(f"cannot resolve the LM head of {type(model).__name__}: "
                           "get_output_embeddings() returned no module of the model")
    lm_head = paths[id(output)]
    tied = getattr(output, "weight", None) is not None and output.weight is getattr(input_embedding, "weight", None)

    position, offset, embedding_norm, final, rotary, table = None, 0, None, None, None, None
    width_maps: dict[str, str] = {}
    per_layer: dict[str, Any] = {}
    norms = []
    streams: list[StreamPart] = []
    table_buffers = [n for n, b in decoder_module.named_buffers(recurse=False)
                     if b.ndim == 2 and n in POSITION_TABLE_BUFFERS]
    if table_buffers:
        table = _join(decoder, table_buffers[0])  # CTRL: a sinusoidal table kept on the decoder itself
    parts = _children(decoder_module, decoder)
    for name, full, child in parts:
        if child is input_embedding or full in (blocks_path, wrapper):
            continue
        if name in TEXT_UNUSED_TOWER_NAMES:
            continue
        if _embedding_container(child, input_embedding):
            # ModernBERT-decoder: model.embeddings holds tok_embeddings, a norm and a dropout
            parts += [(f"{EMBEDDING_CONTAINER_MARK}{n}", f, c) for n, f, c in _children(child, full)]
            continue
        if _is_position_table(child) and not any(True for _ in child.parameters()):
            buffers = [(n, b) for n, b in child.named_buffers(recurse=False) if b.ndim == 2]
            if len(buffers) != 1:
                raise AnatomyError(f"cannot resolve the position table {full} ({_class_name(child)}): it has no "
                                   f"weight and {len(buffers)} 2-D buffers, expected one fixed table")
            if table is not None:
                raise AnatomyError(f"cannot resolve the position table of {decoder or 'the model'}: both {table} "
                                   f"and {full} hold one")
            table, offset = _join(full, buffers[0][0]), int(getattr(child, "offset", 0) or 0)  # XGLM
            continue
        if name in PER_LAYER_EMBEDDING_NAMES:
            per_layer["embedding"] = full
        elif name in PER_LAYER_PROJECTION_NAMES and _projection(child, full) is not None:
            per_layer["projection"] = _projection(child, full)
        elif name in PER_LAYER_NORM_NAMES and is_norm_module(child):
            per_layer["norm"] = full
        elif "rotary" in _class_name(child).lower() or hasattr(child, "inv_freq"):
            rotary = full
        elif name in WIDTH_PROJECTION_NAMES and _projection(child, full) is not None:
            width_maps[name] = full
        elif isinstance(child, torch.nn.Embedding) or "embedding" in _class_name(child).lower():
            weight = getattr(child, "weight", None)
            if weight is not None and weight.ndim == 2:
                if position is not None:
                    raise AnatomyError(f"cannot resolve the position embedding of {decoder or 'the model'}: "
                                       f"both {position} and {full} are embeddings")
                position = full
                offset = int(getattr(child, "offset", 0) or 0)
        elif is_norm_module(child):
            norms.append((name, full))
        elif _stream_role(name, child, decoder_level=True) is not None:
            streams.append(StreamPart(full, _stream_role(name, child, decoder_level=True), _class_name(child)))
        elif any(True for _ in child.parameters()):
            raise AnatomyError(f"cannot resolve the part {full} of {decoder or 'the model'} "
                               f"({_class_name(child)}): it is not an embedding, norm, block list or width projection")
    embedding_norms = [full for name, full in norms if "emb" in name or name.startswith(EMBEDDING_CONTAINER_MARK)]
    final_norms = [full for name, full in norms if full not in embedding_norms]
    if len(embedding_norms) > 1 or len(final_norms) > 1:
        raise AnatomyError(f"cannot resolve the final norm of {decoder or 'the model'}: several norms outside "
                           f"the blocks ({', '.join(f for _, f in norms)})")
    embedding_norm = embedding_norms[0] if embedding_norms else None
    final = final_norms[0] if final_norms else None
    if position is not None and view.max_positions:
        rows = int(model.get_submodule(position).weight.shape[0])
        if rows < view.max_positions + offset:
            raise AnatomyError(f"cannot resolve the position offset of {position}: {rows} rows for "
                               f"{view.max_positions} positions and offset {offset}")

    blocks = tuple(_block(index, _join(blocks_path, str(index)), block, view)
                   for index, block in enumerate(block_list))
    per_layer_inputs = _per_layer_inputs(model, decoder, per_layer, blocks)
    head_transform = _head_transform(model, decoder, lm_head)
    residual_streams, stream_parts = _residual_streams(decoder or "the model", streams, block_list, blocks, view)
    return ModelLayout(
        model_class=type(model).__name__, model_type=view.model_type, decoder=decoder, blocks_path=blocks_path,
        blocks=blocks, token_embedding=token_embedding, position_embedding=position, position_offset=offset,
        embedding_norm=embedding_norm, final_norm=final, lm_head=lm_head, tied=bool(tied), rotary=rotary,
        project_in=width_maps.get("project_in"), project_out=width_maps.get("project_out"),
        per_layer_inputs=per_layer_inputs, position_table=table, head_transform=head_transform,
        residual_streams=residual_streams, stream_parts=stream_parts)


# Several residual streams per token. Decoder children by name: Gemma 3n's AltUp projections that make the
# extra streams from the embeddings and fold them back before the final norm.
STREAM_EXPAND_NAMES = ("altup_projections",)
STREAM_COLLAPSE_NAMES = ("altup_unembed_projections",)
# Class-name marks: DeepSeek-V4's hyper-connection head (decoder: collapses the streams) and per-sublayer
# mixers (blocks: attn_hc / ffn_hc), Gemma 3n's per-block AltUp predict/correct module.
STREAM_COLLAPSE_CLASS_MARKS = ("hyperhead",)
STREAM_MIX_CLASS_MARKS = ("hyperconnection", "altup")


def _stream_role(name: str, module: Any, decoder_level: bool) -> StreamRole | None:
    """The role of a module that expands, mixes or collapses several residual streams, else None."""
    lowered = _class_name(module).lower()
    if decoder_level and name in STREAM_EXPAND_NAMES:
        return StreamRole.EXPAND
    if decoder_level and (name in STREAM_COLLAPSE_NAMES or any(m in lowered for m in STREAM_COLLAPSE_CLASS_MARKS)):
        return StreamRole.COLLAPSE
    if not decoder_level and any(m in lowered for m in STREAM_MIX_CLASS_MARKS):
        return StreamRole.MIX
    return None


def _residual_streams(where: str, found: list[StreamPart], block_list: Any, blocks: tuple[BlockLayout, ...],
                      view: ConfigView) -> tuple[int, tuple[StreamPart, ...]]:
    """How many residual streams the model keeps and every part that handles them (decoder and blocks).

    The count comes from the config (STREAM_COUNT_KEYS); a model with stream parts but no count, or with
    a count but no part that collapses the streams, is an AnatomyError naming it.
    """
    parts = list(found)
    for block, layout in zip(block_list, blocks):
        parts += [StreamPart(full, StreamRole.MIX, _class_name(child))
                  for name, full, child in _children(block, layout.path)
                  if _stream_role(name, child, decoder_level=False) is not None]
    counts = [view.text[k] for k in STREAM_COUNT_KEYS if _is_int(view.text.get(k))]
    if not parts:
        return 1, ()
    if not counts or counts[0] < 2:
        raise AnatomyError(f"cannot resolve the residual streams of {where}: {parts[0].path} "
                           f"({parts[0].module_class}) handles several streams but no config key "
                           f"({', '.join(STREAM_COUNT_KEYS)}) gives their number")
    if not any(p.role is StreamRole.COLLAPSE for p in parts):
        raise AnatomyError(f"cannot resolve the residual streams of {where}: {counts[0]} streams but no part "
                           "collapses them before the final norm")
    return int(counts[0]), tuple(parts)
# Decoder children a text-only forward never runs: GIT's image encoder and its projection run only when
# pixel_values is given (modeling_git.py, GitModel.forward).
TEXT_UNUSED_TOWER_NAMES = ("image_encoder", "visual_projection")
# Buffers on the decoder module that are a fixed position table (CTRL's sinusoidal pos_encoding).
POSITION_TABLE_BUFFERS = ("pos_encoding",)
# Names of the children of an embeddings container, marked so their norms count as embedding norms.
EMBEDDING_CONTAINER_MARK = "embeddings/"


def _is_position_table(module: Any) -> bool:
    """A weightless positional-embedding module that is not a rotary embedding (XGLM's sinusoidal table)."""
    name = _class_name(module).lower()
    return "position" in name and "embedding" in name and "rotary" not in name and not hasattr(module, "inv_freq")


def _embedding_container(module: Any, input_embedding: Any) -> bool:
    """A module without a weight of its own that holds the token embedding (ModernBERT's ``embeddings``)."""
    return (getattr(module, "weight", None) is None
            and any(child is input_embedding for child in module.modules() if child is not module))


def _head_transform(model: Any, decoder: str, lm_head: str) -> HeadTransform | None:
    """The prediction head between the decoder and the LM head, from the model's top-level children.

    Every top-level child with weights is the decoder, the LM head (or its container) or a head of
    one projection and one norm; any other is a named AnatomyError.
    """
    if not decoder:
        return None  # the blocks sit on the model itself: every child was walked as a decoder part
    top = decoder.partition(".")[0]
    found = None
    for name, full, child in _children(model, ""):
        if full in (top, lm_head) or lm_head.startswith(full + ".") or not any(True for _ in child.parameters()):
            continue
        projections = _projections(child, full)
        norms = [f for _, f, c in _children(child, full) if is_norm_module(c)]
        weighted = [f for _, f, c in _children(child, full) if any(True for _ in c.parameters())]
        if found is not None or len(projections) != 1 or len(norms) != 1 or len(weighted) != 2:
            raise AnatomyError(f"cannot resolve the part {full} of {type(model).__name__} ({_class_name(child)}): "
                               "it is not the decoder, the LM head or a head of one projection and one norm")
        found = HeadTransform(path=full, dense=next(iter(projections.values())), norm=norms[0])
    return found


def _per_layer_inputs(model: Any, decoder: str, found: dict[str, Any],
                      blocks: tuple[BlockLayout, ...]) -> PerLayerInputs | None:
    """The model-level per-layer-input parts, checked against every block's branch (AnatomyError when partial)."""
    with_branch = [block.path for block in blocks if block.per_layer_input is not None]
    if not found and not with_branch:
        return None
    where = decoder or "the model"
    if "embedding" not in found or "projection" not in found:
        missing = "embedding" if "embedding" not in found else "projection"
        raise AnatomyError(f"cannot resolve the per-layer-input {missing} of {where}: no child named one of "
                           + ", ".join(PER_LAYER_EMBEDDING_NAMES if missing == "embedding"
                                       else PER_LAYER_PROJECTION_NAMES))
    if len(with_branch) != len(blocks):
        lacking = next(block.path for block in blocks if block.per_layer_input is None)
        raise AnatomyError(f"cannot resolve the per-layer-input branch of {lacking}: no children named "
                           f"{BLOCK_PER_LAYER_GATE_NAMES[0]} and {BLOCK_PER_LAYER_PROJECTION_NAMES[0]}")
    projection: Projection = found["projection"]
    embedding_width = int(model.get_submodule(found["embedding"]).weight.shape[1])
    width, extra = divmod(projection.out_features, len(blocks))
    gate_width = blocks[0].per_layer_input.gate.out_features  # type: ignore[union-attr]
    if extra or embedding_width != projection.out_features or width != gate_width:
        raise AnatomyError(f"cannot resolve the per-layer inputs of {where}: embedding width {embedding_width}, "
                           f"projection {projection.out_features} outputs and block gate {gate_width} outputs are "
                           f"not {len(blocks)} blocks x one width")
    return PerLayerInputs(embedding=found["embedding"], projection=projection, norm=found.get("norm"), width=width)


def _config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise AnatomyError(f"cannot read the config of {type(model).__name__}: it has no .config")
    return config.to_dict()


def _block_list(model: Any, view: ConfigView) -> tuple[str, Any]:
    """The ModuleList of decoder blocks: same-class entries, one per layer, each holding an attention module."""
    import torch

    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if view.num_layers is not None and len(module) != view.num_layers:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(_is_attention(child_name, child) for child_name, child in module[0].named_children()):
            continue
        candidates.append((name.count("."), name, module))
    if not candidates:
        raise AnatomyError(f"cannot resolve the decoder blocks of {type(model).__name__}: no list of "
                           f"{view.num_layers or 'any number of'} blocks with an attention module")
    candidates.sort(key=lambda c: c[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        raise AnatomyError(f"cannot resolve the decoder blocks of {type(model).__name__}: both "
                           f"{candidates[0][1]} and {candidates[1][1]} look like block lists")
    return candidates[0][1], candidates[0][2]


def _is_attention(name: str, module: Any) -> bool:
    return name in ATTENTION_NAMES or "attention" in _class_name(module).lower()


# Class-name marks of MLP / MoE modules whose attribute name is not in MLP_NAMES.
MLP_CLASS_MARKS = ("mlp", "feedforward", "sparsemoe", "moeblock", "moelayer")


def _is_mlp(name: str, module: Any) -> bool:
    if name in MLP_NAMES:
        return True
    if is_norm_module(module) or _is_attention(name, module):
        return False
    lowered = _class_name(module).lower()
    return any(mark in lowered for mark in MLP_CLASS_MARKS)


def _listed(name: str, full: str, child: Any, accept: Callable[[str, Any], bool]) -> list[tuple[str, Any]] | None:
    """The entries (path, module) of a ModuleList child whose entries are all one class and all ``accept``-ed
    (LongCat-Flash's ``self_attn`` / ``mlps`` / norm lists), else None."""
    import torch

    if not isinstance(child, torch.nn.ModuleList) or len(child) == 0 or len({type(e) for e in child}) != 1:
        return None
    if not all(accept(name, entry) for entry in child):
        return None
    return [(_join(full, str(i)), entry) for i, entry in enumerate(child)]


# BERT-style post-LN block (GIT's text decoder): attention.{self, output.{dense, LayerNorm}},
# intermediate.dense, output.{dense, LayerNorm}; each LayerNorm normalizes its sublayer's residual sum.
BERT_BLOCK_PARTS = ("attention", "intermediate", "output")
BERT_ATTENTION_PARTS = ("self", "output")
BERT_DENSE, BERT_NORM = "dense", "LayerNorm"


def _bert_block(index: int, path: str, block: Any, view: ConfigView) -> BlockLayout | None:
    """The layout of a BERT-style block, or None when ``block`` is not one."""
    children = dict(block.named_children())
    if not all(name in children for name in BERT_BLOCK_PARTS):
        return None
    wrapper = dict(children["attention"].named_children())
    if not all(name in wrapper for name in BERT_ATTENTION_PARTS):
        return None
    attention_out, mlp_out = dict(wrapper["output"].named_children()), dict(children["output"].named_children())
    up = getattr(children["intermediate"], BERT_DENSE, None)
    if not all(BERT_DENSE in part and BERT_NORM in part for part in (attention_out, mlp_out)) or up is None:
        return None
    prefix = _join(path, "attention")
    o = _projection(attention_out[BERT_DENSE], f"{prefix}.output.{BERT_DENSE}")
    up_proj = _projection(up, f"{path}.intermediate.{BERT_DENSE}")
    down = _projection(mlp_out[BERT_DENSE], f"{path}.output.{BERT_DENSE}")
    if o is None or up_proj is None or down is None:
        raise AnatomyError(f"cannot resolve the BERT-style block {path}: its dense parts are not Linear layers")
    attention = _attention(f"{prefix}.self", wrapper["self"], view, output=o)
    # Inline MLP (path = the block): its input is the up projection's, its output the down projection's.
    mlp = MLPLayout(path=path, gated=False, up=up_proj, gate=None, gate_up=None, down=down)
    norms = (NormRef(f"{prefix}.output.{BERT_NORM}", NormRole.ATTENTION_RESIDUAL, norm_eps(attention_out[BERT_NORM])),
             NormRef(f"{path}.output.{BERT_NORM}", NormRole.MLP_RESIDUAL, norm_eps(mlp_out[BERT_NORM])))
    return BlockLayout(index=index, path=path, attention=attention, mlp=mlp, moe=None, norms=norms, parallel=False,
                       per_layer_input=None, attentions=(attention,), mlps=(mlp,), moe_shortcut=False)


def _block(index: int, path: str, block: Any, view: ConfigView) -> BlockLayout:
    bert = _bert_block(index, path, block, view)
    if bert is not None:
        return bert
    children = _children(block, path)
    candidates = [(name, full, child) for name, full, child in children if _is_attention(name, child)]
    if len(candidates) != 1:
        raise AnatomyError(f"cannot resolve the attention of {path}: "
                           + (f"several candidates ({', '.join(f for _, f, _ in candidates)})" if candidates
                              else "no child named one of " + ", ".join(ATTENTION_NAMES)))
    name, full, child = candidates[0]
    entries = _listed(name, full, child, _is_attention)  # LongCat-Flash: self_attn is [attention, attention]
    if entries is None and _class_name(child) == "ModuleList":
        raise AnatomyError(f"cannot resolve the attention of {path}: {full} is a list that is not "
                           "one class of attention modules")
    attentions = tuple(_attention(p, m, view) for p, m in (entries or [(full, child)]))
    feed_forward: list[tuple[str, Any]] = []
    for name, full, child in children:
        if _is_attention(name, child):
            continue
        entries = _listed(name, full, child, _is_mlp)
        if entries is not None:
            feed_forward += entries
        elif _is_mlp(name, child):
            feed_forward.append((full, child))
    moes = [(full, child) for full, child in feed_forward if _moe_parts(child)]
    dense = [(full, child) for full, child in feed_forward if not _moe_parts(child)]
    sublayers = len(attentions) > 1
    if len(moes) > 1 or (not sublayers and len(feed_forward) > 1) or (sublayers and len(dense) != len(attentions)):
        raise AnatomyError(f"cannot resolve the MLP of {path}: "
                           + (f"{len(attentions)} attention sublayers but {len(dense)} dense MLPs "
                              f"({', '.join(f for f, _ in dense) or 'none'})" if sublayers and len(moes) <= 1
                              else f"several candidates ({', '.join(f for f, _ in feed_forward)})"))
    mlps = tuple(_mlp(full, module, view) for full, module in dense)
    moe = _moe(moes[0][0], moes[0][1], view) if moes else None
    mlp = mlps[0] if mlps else None
    if not feed_forward and _projections(block, path):
        mlp = _mlp(path, block, view, inline=True)  # OPT: fc1 / fc2 sit on the block itself
        mlps = (mlp,)
    norms = _block_norms(path, block, view)
    if sublayers and {n.sublayer for n in norms} != set(range(len(attentions))):
        raise AnatomyError(f"cannot resolve the norms of {path}: {len(attentions)} attention sublayers but "
                           f"norms for sublayers {sorted({n.sublayer for n in norms})}")
    has_ffn = mlp is not None or moe is not None
    roles = {n.role for n in norms}
    structural = has_ffn and len(norms) == 1 and norms[0].role is NormRole.INPUT
    if structural:
        norms = (NormRef(norms[0].path, NormRole.SHARED, norms[0].eps),)
    parallel = structural or (view.parallel_block and NormRole.ATTENTION_OUTPUT not in roles)
    return BlockLayout(index=index, path=path, attention=attentions[0], mlp=mlp, moe=moe, norms=norms,
                       parallel=parallel, per_layer_input=_block_per_layer_input(path, block, norms),
                       attentions=attentions, mlps=mlps, moe_shortcut=moe is not None and bool(mlps))


def _block_per_layer_input(path: str, block: Any, norms: tuple[NormRef, ...]) -> BlockPerLayerInput | None:
    projections = _projections(block, path)
    gate = next((projections[n] for n in BLOCK_PER_LAYER_GATE_NAMES if n in projections), None)
    projection = next((projections[n] for n in BLOCK_PER_LAYER_PROJECTION_NAMES if n in projections), None)
    if gate is None and projection is None:
        return None
    if gate is None or projection is None or gate.out_features != projection.in_features:
        raise AnatomyError(f"cannot resolve the per-layer-input branch of {path}: it needs a gate "
                           f"({', '.join(BLOCK_PER_LAYER_GATE_NAMES)}) and a projection "
                           f"({', '.join(BLOCK_PER_LAYER_PROJECTION_NAMES)}) of one width")
    norm = next((n.path for n in norms if n.role is NormRole.PER_LAYER_INPUT_OUTPUT), None)
    return BlockPerLayerInput(gate=gate, projection=projection, norm=norm)


def _block_norms(path: str, block: Any, view: ConfigView) -> tuple[NormRef, ...]:
    found: list[tuple[str, str, Any, int]] = []
    children = _children(block, path)
    for name, full, child in list(children):
        if _wraps_attention(child) and _is_attention(name, child):
            children += _children(child, full)  # DBRX: norm_attn_norm holds the input and pre-MLP norms
    for name, full, child in children:
        entries = _listed(name, full, child, lambda _, entry: is_norm_module(entry))
        if entries is not None:  # LongCat-Flash: one norm per sublayer
            found += [(name, entry_path, entry, i) for i, (entry_path, entry) in enumerate(entries)]
        elif is_norm_module(child):
            found.append((name, full, child, 0))
    names = {name for name, _, _, _ in found}
    post_ln = POST_LN_FAMILIES.get(str(view.model_type))
    post_roles = post_ln[1] if post_ln and post_ln[0](view) else {}
    refs = []
    for name, full, child, sublayer in found:
        role = post_roles.get(name) or NORM_ROLE_NAMES.get(name)
        named_output = any(NORM_ROLE_NAMES.get(n) is NormRole.ATTENTION_OUTPUT for n in names)
        if (name == POST_ATTENTION_NAME and not named_output
                and ("post_feedforward_layernorm" in names or "post_mlp_layernorm" in names)):
            role = NormRole.ATTENTION_OUTPUT  # Gemma 2, AFMoE; GLM-4 names its attention output norm apart
        if role is None:
            raise AnatomyError(f"cannot resolve the role of the norm {full}: {name!r} is not in NORM_ROLE_NAMES")
        refs.append(NormRef(full, role, norm_eps(child), sublayer))
    return tuple(refs)


def _attention(path: str, module: Any, view: ConfigView, output: Projection | None = None) -> AttentionLayout:
    """The attention at ``path``; ``output`` is its output projection when a sibling holds it (BERT-style)."""
    projections = _projections(module, path)
    inner = [(name, full, child) for name, full, child in _children(module, path) if _is_attention(name, child)]
    if not projections and len(inner) == 1:
        return _attention(inner[0][1], inner[0][2], view)  # GPT-Neo: attn wraps the attention proper (attn.attention)
    heads = _int_attr(module, ("num_heads", "num_attention_heads", "n_head")) or view.num_heads
    head_dim = _int_attr(module, ("head_dim", "head_size")) or view.head_dim
    if not (heads and head_dim):
        raise AnatomyError(f"cannot resolve the heads of {path}: the config gives heads={view.num_heads}, "
                           f"kv heads={view.num_kv_heads}, head_dim={view.head_dim}")
    heads, head_dim = int(heads), int(head_dim)
    if any(name in LATENT_KV_A_NAMES for name in projections):
        return _latent_attention(path, module, projections, heads)
    if any(name in MOH_KV_NAMES for name in projections) and any(p.ndim == 3 for p in module.parameters()):
        return _mixture_of_heads(path, module, projections, heads, head_dim, view)
    known = (QUERY_NAMES + KEY_NAMES + VALUE_NAMES + OUTPUT_NAMES + FUSED_QKV_NAMES + OUTPUT_GATE_NAMES
             + MASK_PROJECTION_NAMES)
    unknown = [p.path for name, p in projections.items() if name not in known]
    if unknown:
        raise AnatomyError(f"cannot resolve the projection {unknown[0]} of {path}: its name is not in the "
                           "attention name tables")

    def pick(names: tuple[str, ...]) -> Projection | None:
        return next((projections[n] for n in names if n in projections), None)

    q, k, v, o, qkv = pick(QUERY_NAMES), pick(KEY_NAMES), pick(VALUE_NAMES), pick(OUTPUT_NAMES), pick(FUSED_QKV_NAMES)
    for name, full, child in _children(module, path):
        if name in known and name not in projections and any(True for _ in child.parameters()):
            raise AnatomyError(f"cannot resolve the projection {full} of {path}: it is a {_class_name(child)}, "
                               "not a Linear or Conv1D")
    o = o or output
    if o is None:
        raise AnatomyError(f"cannot resolve the attention output projection of {path}: no child named one of "
                           + ", ".join(OUTPUT_NAMES))
    blocks = 1
    if qkv is not None:
        if q or k or v:
            raise AnatomyError(f"cannot resolve the q/k/v projections of {path}: both fused {qkv.path} and "
                               "separate projections")
        rule = FUSED_QKV_LAYOUTS.get(str(view.model_type))
        if rule is None:
            raise AnatomyError(f"cannot resolve the fused q/k/v layout of {qkv.path}: model type "
                               f"{view.model_type!r} is not in FUSED_QKV_LAYOUTS ([q;k;v] or per head)")
        rows, extra = divmod(qkv.out_features, head_dim)
        kv, odd = divmod(rows - heads, 2)
        if extra or odd or kv < 1 or heads % kv:
            raise AnatomyError(f"cannot resolve the fused q/k/v projection {qkv.path}: {qkv.out_features} outputs "
                               f"are not (heads {heads} + 2 x kv heads) x head_dim {head_dim}")
        kind = rule(view, kv)
        if kind is QKVKind.FUSED_BLOCKED:
            blocks = FUSED_QKV_BLOCKS[str(view.model_type)]
            if kv != heads or heads % blocks:
                raise AnatomyError(f"cannot resolve the fused q/k/v projection {qkv.path}: {heads} heads and "
                                   f"{kv} kv heads do not split into {blocks} [q; v; k] blocks")
    else:
        missing = [what for what, p in (("query", q), ("key", k), ("value", v)) if p is None]
        source = getattr(module, KV_SOURCE_ATTR, None)
        if q is not None and missing == ["key", "value"] and _is_int(source) and view.num_kv_heads:
            norms = _attention_norms(path, module, ())
            return AttentionLayout(path=path, qkv_kind=QKVKind.SHARED_KV, q=q, k=None, v=None, qkv=None, o=o,
                                   q_norm=norms["q"], k_norm=None, num_heads=heads, num_kv_heads=view.num_kv_heads,
                                   head_dim=head_dim, kv_source=int(source))
        if missing:
            raise AnatomyError(f"cannot resolve the attention {missing[0]} projection of {path}: no child named one "
                               "of " + ", ".join({"query": QUERY_NAMES, "key": KEY_NAMES, "value": VALUE_NAMES}[missing[0]]))
        kind = QKVKind.SEPARATE
        kv, extra = divmod(k.out_features, head_dim)  # type: ignore[union-attr]
        if extra or kv < 1 or heads % kv:
            raise AnatomyError(f"cannot resolve the attention key projection {k.path}: {k.out_features} outputs "  # type: ignore[union-attr]
                               f"are not a whole number of heads of head_dim {head_dim} dividing {heads} heads")
        for what, projection, want in (("query", q, heads * head_dim), ("key", k, kv * head_dim),
                                       ("value", v, kv * head_dim)):
            if projection.out_features != want:
                raise AnatomyError(f"cannot resolve the attention {what} projection {projection.path}: "
                                   f"{projection.out_features} outputs, expected {want}")
    if o.in_features != heads * head_dim:
        raise AnatomyError(f"cannot resolve the attention output projection {o.path}: {o.in_features} inputs, "
                           f"expected heads {heads} x head_dim {head_dim}")
    gate = pick(OUTPUT_GATE_NAMES)
    if gate is not None and gate.out_features not in (heads, heads * head_dim):
        raise AnatomyError(f"cannot resolve the attention output gate {gate.path}: {gate.out_features} outputs, "
                           f"neither one per head ({heads}) nor one per output ({heads * head_dim})")
    mask = pick(MASK_PROJECTION_NAMES)
    if mask is not None and mask.out_features != heads:
        raise AnatomyError(f"cannot resolve the dynamic-mask projection {mask.path}: {mask.out_features} outputs, "
                           f"expected one per head ({heads})")
    norms = _attention_norms(path, module, ())
    return AttentionLayout(path=path, qkv_kind=kind, q=q, k=k, v=v, qkv=qkv, o=o, q_norm=norms["q"],
                           k_norm=norms["k"], num_heads=heads, num_kv_heads=int(kv), head_dim=head_dim,
                           fused_blocks=blocks, output_gate=gate, mask_projection=mask, v_norm=norms["v"],
                           sub_norm=norms["sub"])


# The attribute of a KV-sharing attention naming the layer whose keys and values it reads (Gemma 3n).
KV_SOURCE_ATTR = "kv_shared_layer_index"


def _attention_norms(path: str, module: Any, latent_names: tuple[str, ...]) -> dict[str, str | None]:
    """The norms inside an attention module by role (q, k, v, sub), skipping ``latent_names``."""
    found: dict[str, str | None] = dict.fromkeys(("q", "k", "v", "sub"))
    for name, full, child in _children(module, path):
        if not is_norm_module(child) or name in latent_names:
            continue
        if name in Q_NORM_NAMES:
            found["q"] = full
        elif name in K_NORM_NAMES:
            found["k"] = full
        elif name in QK_NORM_NAMES:
            found["q"] = found["k"] = full
        elif name in V_NORM_NAMES:
            found["v"] = full
        elif name in ATTENTION_SUB_NORM_NAMES:
            found["sub"] = full
        else:
            raise AnatomyError(f"cannot resolve the norm {full} of {path}: {name!r} is not a query, key, value "
                               "or attention-output norm name")
    return found


def _latent_attention(path: str, module: Any, projections: dict[str, Projection], heads: int) -> AttentionLayout:
    """Multi-head latent attention: sizes from the projection shapes, roles from the DeepSeek names."""
    def one(names: tuple[str, ...], what: str) -> Projection:
        found = next((projections[n] for n in names if n in projections), None)
        if found is None:
            raise AnatomyError(f"cannot resolve the latent attention {what} of {path}: no child named one of "
                               + ", ".join(names))
        return found

    known = (LATENT_Q_A_NAMES + LATENT_Q_B_NAMES + LATENT_KV_A_NAMES + LATENT_KV_B_NAMES + QUERY_NAMES
             + OUTPUT_NAMES)
    unknown = [p.path for name, p in projections.items() if name not in known]
    if unknown:
        raise AnatomyError(f"cannot resolve the projection {unknown[0]} of the latent attention {path}: its name "
                           "is not in the latent attention name tables")
    q_a = next((projections[n] for n in LATENT_Q_A_NAMES if n in projections), None)
    q = one(LATENT_Q_B_NAMES if q_a is not None else QUERY_NAMES, "query projection")
    kv_a, kv_b = one(LATENT_KV_A_NAMES, "kv down projection"), one(LATENT_KV_B_NAMES, "kv up projection")
    o = one(OUTPUT_NAMES, "output projection")
    names = {name: full for name, full, child in _children(module, path) if is_norm_module(child)}
    q_a_norm = next((names[n] for n in LATENT_Q_NORM_NAMES if n in names), None)
    kv_a_norm = next((names[n] for n in LATENT_KV_NORM_NAMES if n in names), None)
    if kv_a_norm is None or (q_a is not None and q_a_norm is None):
        raise AnatomyError(f"cannot resolve the latent norms of {path}: no child named one of "
                           + ", ".join(LATENT_KV_NORM_NAMES if kv_a_norm is None else LATENT_Q_NORM_NAMES))
    v_dim, v_extra = divmod(o.in_features, heads)
    kv_b_per_head, kv_extra = divmod(kv_b.out_features, heads)
    q_per_head, q_extra = divmod(q.out_features, heads)
    nope = kv_b_per_head - v_dim
    rope = q_per_head - nope
    lora = kv_b.in_features
    if v_extra or kv_extra or q_extra or nope < 0 or rope < 0 or kv_a.out_features != lora + rope:
        raise AnatomyError(f"cannot resolve the latent attention sizes of {path}: q {q.out_features}, kv_a "
                           f"{kv_a.out_features}, kv_b {kv_b.in_features}->{kv_b.out_features}, o {o.in_features} "
                           f"inputs are not heads {heads} x [nope; rope] queries, a latent plus one RoPE key, and "
                           "heads x [nope; v]")
    if q_a is not None and q.in_features != q_a.out_features:
        raise AnatomyError(f"cannot resolve the latent query of {path}: {q_a.path} gives {q_a.out_features} "
                           f"outputs but {q.path} takes {q.in_features}")
    latent = LatentAttention(q_a=q_a, q_a_norm=q_a_norm, kv_a=kv_a, kv_a_norm=kv_a_norm, kv_b=kv_b,
                             q_lora_rank=q_a.out_features if q_a is not None else None, kv_lora_rank=lora,
                             nope_head_dim=nope, rope_head_dim=rope, v_head_dim=v_dim)
    norms = _attention_norms(path, module, LATENT_Q_NORM_NAMES + LATENT_KV_NORM_NAMES)
    indexer = None
    for name, full, child in _children(module, path):
        if name in INDEXER_NAMES:
            indexer = full
        elif name not in projections and not is_norm_module(child) and any(True for _ in child.parameters()):
            raise AnatomyError(f"cannot resolve the part {full} of the latent attention {path} ({_class_name(child)}): "
                               "it is not a projection, norm or indexer")
    return AttentionLayout(path=path, qkv_kind=QKVKind.LATENT, q=q, k=None, v=None, qkv=None, o=o,
                           q_norm=norms["q"], k_norm=norms["k"], num_heads=heads, num_kv_heads=heads,
                           head_dim=q_per_head, latent=latent, v_norm=norms["v"], sub_norm=norms["sub"],
                           value_head_dim=v_dim, indexer=indexer)


# JetMoE's mixture of attention heads: the shared key/value projection and the experts' query and output maps.
MOH_KV_NAMES = ("kv_proj",)
MOH_QUERY_NAMES = ("input_linear",)
MOH_OUTPUT_NAMES = ("output_linear",)


def _stacked_projection(module: Any, path: str) -> Projection | None:
    """A module holding one [experts, out, in] weight as a STACKED Projection, else None."""
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 3:
        return None
    return Projection(path, WeightStorage.STACKED, int(weight.shape[2]), int(weight.shape[1]),
                      getattr(module, "bias", None) is not None)


def _mixture_of_heads(path: str, module: Any, projections: dict[str, Projection], heads: int, head_dim: int,
                      view: ConfigView) -> AttentionLayout:
    """JetMoE attention: each token's queries and outputs come from its top-k attention experts."""
    kv_proj = next(projections[n] for n in MOH_KV_NAMES if n in projections)
    experts = [(name, full, child) for name, full, child in _children(module, path)
               if any(p.ndim == 3 for p in child.parameters())]
    if len(experts) != 1:
        raise AnatomyError(f"cannot resolve the attention experts of {path}: "
                           + (f"several candidates ({', '.join(f for _, f, _ in experts)})" if experts
                              else "no child with [experts, ...] weights"))
    _, experts_path, experts_module = experts[0]
    stacked = {name: _stacked_projection(child, full) for name, full, child in _children(experts_module, experts_path)}
    q = next((stacked[n] for n in MOH_QUERY_NAMES if stacked.get(n)), None)
    o = next((stacked[n] for n in MOH_OUTPUT_NAMES if stacked.get(n)), None)
    router = next((full for name, full, _ in _children(experts_module, experts_path) if name in ROUTER_NAMES), None)
    if q is None or o is None or router is None:
        what = "query experts" if q is None else "output experts" if o is None else "router"
        raise AnatomyError(f"cannot resolve the {what} of the attention experts {experts_path}: no child named one "
                           "of " + ", ".join({"query experts": MOH_QUERY_NAMES, "output experts": MOH_OUTPUT_NAMES,
                                              "router": ROUTER_NAMES}[what]))
    kv, extra = divmod(kv_proj.out_features, 2 * head_dim)
    if extra or kv < 1 or heads % kv or q.out_features != kv * head_dim or o.in_features != kv * head_dim:
        raise AnatomyError(f"cannot resolve the mixture of attention heads {path}: kv {kv_proj.out_features}, "
                           f"query experts {q.out_features}, output experts {o.in_features} outputs are not "
                           f"[k; v] and expert queries of kv heads x head_dim {head_dim}")
    norms = _attention_norms(path, module, ())
    return AttentionLayout(path=path, qkv_kind=QKVKind.MIXTURE_OF_HEADS, q=q, k=None, v=None, qkv=kv_proj, o=o,
                           q_norm=norms["q"], k_norm=norms["k"], num_heads=heads, num_kv_heads=kv,
                           head_dim=head_dim, v_norm=norms["v"], sub_norm=norms["sub"], router=router)


def _int_attr(module: Any, names: tuple[str, ...]) -> int | None:
    """The first whole-number attribute of a module among ``names`` (modeling code keeps heads there)."""
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _mlp(path: str, module: Any, view: ConfigView, inline: bool = False) -> MLPLayout:
    """The dense MLP at ``path`` (``inline``: its projections sit on the block itself, whose norms are not its own)."""
    import torch

    projections = _projections(module, path)
    if isinstance(module, torch.nn.Sequential) and all(name.isdigit() for name in projections):
        # CTRL: Sequential(Linear, ReLU, Linear): the order of the children is the data flow.
        if len(projections) != 2:
            raise AnatomyError(f"cannot resolve the MLP {path}: a Sequential with {len(projections)} projections, "
                               "expected up and down")
        up, down = projections.values()
        if view.hidden_size and down.out_features != view.hidden_size:
            raise AnatomyError(f"cannot resolve the MLP down projection {down.path}: {down.out_features} outputs, "
                               f"expected hidden_size {view.hidden_size}")
        return MLPLayout(path=path, gated=False, up=up, gate=None, gate_up=None, down=down)
    known = GATE_NAMES + UP_NAMES + GATE_UP_NAMES + DOWN_NAMES
    unknown = [p.path for name, p in projections.items() if name not in known]
    if unknown:
        raise AnatomyError(f"cannot resolve the projection {unknown[0]} of the MLP {path}: its name is not in "
                           "the MLP name tables")

    def pick(names: tuple[str, ...]) -> Projection | None:
        return next((projections[n] for n in names if n in projections), None)

    gate, up, gate_up, down = pick(GATE_NAMES), pick(UP_NAMES), pick(GATE_UP_NAMES), pick(DOWN_NAMES)
    if down is None:
        raise AnatomyError(f"cannot resolve the MLP down projection of {path}: no child named one of "
                           + ", ".join(DOWN_NAMES))
    if up is None and gate_up is None:
        raise AnatomyError(f"cannot resolve the MLP up projection of {path}: no child named one of "
                           + ", ".join(UP_NAMES + GATE_UP_NAMES))
    if view.hidden_size and down.out_features != view.hidden_size:
        raise AnatomyError(f"cannot resolve the MLP down projection {down.path}: {down.out_features} outputs, "
                           f"expected hidden_size {view.hidden_size}")
    sub_norm = None
    for name, full, child in ([] if inline else _children(module, path)):
        if is_norm_module(child):
            if name not in MLP_SUB_NORM_NAMES:
                raise AnatomyError(f"cannot resolve the norm {full} of the MLP {path}: {name!r} is not in "
                                   "MLP_SUB_NORM_NAMES")
            sub_norm = full
    return MLPLayout(path=path, gated=gate is not None or gate_up is not None, up=up, gate=gate, gate_up=gate_up,
                     down=down, sub_norm=sub_norm)


def _moe_parts(module: Any) -> bool:
    """An MoE block: it has an experts child, or a router next to children with [experts, ...] weights."""
    names = {name for name, _ in module.named_children()}
    if names & set(EXPERTS_NAMES):
        return True
    return bool(names & set(ROUTER_NAMES)) and bool(_stacked_expert_children(module))


def _stacked_expert_children(module: Any) -> list[str]:
    """Children holding [experts, ...] weights directly (GraniteMoE's input_linear / output_linear)."""
    return [name for name, child in module.named_children()
            if name not in ROUTER_NAMES and any(p.ndim == 3 for p in child.parameters(recurse=False))]


def _flat_stacked(module: Any, experts: int) -> bool:
    """DBRX's experts: every expert's rows in one 2-D [experts * ffn, hidden] weight per projection."""
    weights = [p for p in module.parameters() if p.ndim == 2]
    return experts > 1 and bool(weights) and all(p.shape[0] % experts == 0 and p.shape[0] > experts
                                                  for p in weights)


def _moe(path: str, module: Any, view: ConfigView) -> MoELayout:
    import torch

    router = experts = shared_gate = None
    shared = expert = None
    fused = False
    num_experts = 0
    for name, full, child in _children(module, path):
        if name in ROUTER_NAMES:
            weight = next((p for p in child.parameters() if p.ndim == 2), None)  # its own, or its Linear's
            if weight is None:
                raise AnatomyError(f"cannot resolve the router {full} of {path}: it has no 2-D weight")
            router, num_experts = full, int(weight.shape[0])
        elif name in EXPERTS_NAMES:
            experts = full
            if isinstance(child, torch.nn.ModuleList):
                expert = _mlp(_join(full, "0"), child[0], view)
            else:
                # [experts, ...] weights of its own, or in children (Aria's fc1 / fc2 grouped GEMMs)
                fused = any(p.ndim == 3 for p in child.parameters()) or _flat_stacked(child, num_experts)
                if not fused:
                    raise AnatomyError(f"cannot resolve the experts {full} of {path}: neither a list of MLPs nor "
                                       "[experts, ...] weights")
        elif name in SHARED_EXPERT_NAMES:
            shared = _mlp(full, child, view)
        elif name in SHARED_EXPERT_GATE_NAMES:
            shared_gate = full
    if experts is None:
        stacked = _stacked_expert_children(module)
        if stacked:
            experts, fused = ", ".join(_join(path, name) for name in stacked), True
    if router is None:
        raise AnatomyError(f"cannot resolve the router of the MoE block {path}: no child named one of "
                           + ", ".join(ROUTER_NAMES))
    zero = view.zero_experts or 0
    if view.num_experts and zero and num_experts == view.num_experts + zero:
        num_experts = view.num_experts  # LongCat-Flash: the router also scores the identity experts
    else:
        zero = 0
    if view.num_experts and num_experts != view.num_experts:
        raise AnatomyError(f"cannot resolve the router {router}: {num_experts} outputs but the config has "
                           f"{view.num_experts} experts"
                           + (f" and {view.zero_experts} zero experts" if view.zero_experts else ""))
    return MoELayout(path=path, router=router, num_experts=num_experts, experts=str(experts), experts_fused=fused,
                     expert=expert, shared_expert=shared, shared_expert_gate=shared_gate, zero_experts=zero)
