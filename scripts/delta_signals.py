"""Delta signals: what a model does differently from a plain Llama block.

:func:`detect` reads the config (top level and nested ``text_config``) and,
when given, the checkpoint's tensor names and shapes. Each :class:`Signal`
has a stable ``code``, a one-line ``detail`` and the ``evidence`` it came
from (``config: key=value`` or ``tensor: name``). Tensors fill in what the
config leaves out: ``q_norm`` weights, fused ``qkv``/``query_key_value``,
bias tensors, expert tensors. Given a ``hf_source`` reading, config keys the HF class never
reads are dropped first (decoys), absent keys take the HF class's defaults, and the signals read
from the modeling code are merged in (``code: file:line: text`` evidence). Codes are the
``delta_codes.DeltaCode`` values.

:func:`rank_donors` scores MAX donor families against the signals, using the
features in ``max_registry.DONOR_TRAITS``. Imports neither torch nor max.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

import model_anatomy
import model_source
from model_source import TensorInfo


@dataclass
class Signal:
    """One way the model departs from a plain Llama-style decoder.

    ``evidence`` holds one-line strings (``config: ...``, ``tensor: ...``, ``code: file:line: text``);
    ``code_evidence`` the same code lines as ``{"file", "line", "text"}`` dicts; ``always`` is True when
    the modeling code applies the delta whatever the config says.
    """

    code: str
    detail: str
    evidence: list[str] = field(default_factory=list)
    code_evidence: list[dict[str, Any]] = field(default_factory=list)
    always: bool = False


_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# layer_types entries that attend through a window: sliding_attention, chunked_attention (Llama 4).
WINDOWED_LAYER_MARKS = ("sliding", "chunk")


def _value(config: dict[str, Any], text: dict[str, Any], key: str) -> Any:
    return text.get(key, config.get(key))


def _first_present(config: dict[str, Any], text: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        value = _value(config, text, key)
        if value is not None:
            return key, value
    return None


class _Collector:
    def __init__(self) -> None:
        self.signals: dict[str, Signal] = {}

    def add(self, code: str, detail: str, evidence: str) -> None:
        signal = self.signals.setdefault(code, Signal(code, detail))
        if evidence not in signal.evidence:
            signal.evidence.append(evidence)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, "none", "None")


# A norm's parameter tensor: input_layernorm.weight, norm_1.weight, norm_f.bias, ln_1.weight, ln_f.bias...
_NORM_TENSOR = re.compile(r"(norm\w*|ln_\w+|ln\d*|layernorm\w*|LayerNorm)\.(weight|bias)$")


def detect(config: dict[str, Any], tensors: dict[str, TensorInfo] | None = None,
           reading: Any = None) -> list[Signal]:
    """Every delta signal found in the config, the tensor names and (given a ``hf_source`` reading) the code.

    With a reading, config keys HF never reads (decoys) are ignored, absent keys take the HF config
    class's defaults, and the code signals are merged in with their file:line evidence.
    """
    if reading is not None:
        config = hf_view(config, reading)
    text = model_source.text_config(config)
    found = _Collector()
    _config_signals(config, text, found)
    if reading is not None:
        _merge_code_signals(reading, found)
        _drop_unit_logit_scale(text, found)
        _drop_whole_head_rotary(config, found)
        if reading.window_flash_only:
            # Moshi: only the flash-attention path windows; the eager/sdpa reference attends to the whole prefix.
            found.signals.pop("sliding_window", None)
    if tensors:
        _tensor_signals(text, tensors, found)
        layernorm = found.signals.get("layernorm")
        has_norm_tensors = any(_NORM_TENSOR.search(name) for name in tensors)
        if layernorm and not has_norm_tensors:
            # OLMo-1 style: LayerNorm with nothing to learn, unlike a LayerNorm with weights.
            found.add("layernorm_weightless", "LayerNorm with no learnable weight or bias (no norm tensors)",
                      "tensor: no norm weight or bias tensors")
        elif layernorm and not any(e.startswith(("tensor:", "code:")) for e in layernorm.evidence):
            # "layer_norm_epsilon" also names RMSNorm eps (Mamba); without norm biases trust the tensors.
            del found.signals["layernorm"]
    _drop_inactive_moe(text, found)
    return list(found.signals.values())


# Signals that mean routing between experts: none of them applies with one expert or with the experts off.
_ROUTING_CODES = ("moe", "router", "shared_experts", "shared_expert_gate", "topk_softmax_router", "sigmoid_router",
                  "router_renormalize")


def _drop_inactive_moe(text: dict[str, Any], found: "_Collector") -> None:
    """A config with one expert (HunYuan-MoE's default) or a switch turning them off (Doge's is_moe, Gemma 4's
    enable_moe_block) routes nothing: its expert code and tensors are not a MoE delta."""
    if model_anatomy.moe_active(text) is False:
        for code in _ROUTING_CODES:
            found.signals.pop(code, None)


def hf_view(config: dict[str, Any], reading: Any) -> dict[str, Any]:
    """The config as the HF class sees it: keys it reads, with its defaults; decoys dropped.

    ``reading`` is a ``hf_source.SourceReading``. Nested ``text_config`` is replaced by its view.
    """
    import hf_source

    text = model_source.text_config(config)
    view: dict[str, Any] = {}
    for key, value in reading.effective.items():
        if value is hf_source.UNKNOWN or not reading.key_is_read(key):
            continue
        if key in text or _json_safe(value):
            view[key] = text.get(key, value)
    for alias, target in reading.attribute_map.items():
        if target in view:
            view.setdefault(alias, view[target])
    for key in ("model_type", "architectures", "quantization_config", "torch_dtype", "dtype"):
        if key in text:
            view[key] = text[key]
    if text is config:
        return view
    outer = {k: v for k, v in config.items() if k != "text_config"}
    outer["text_config"] = view
    return outer


def _json_safe(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, dict)) and "UNKNOWN" not in repr(value))


def _drop_unit_logit_scale(text: dict[str, Any], found: _Collector) -> None:
    """The code scales the logits by a config value that is 1 (GraniteMoE's default logits_scaling): a port
    that ignores it matches this model, so it is no delta signal."""
    import model_anatomy

    if "logit_scale" not in found.signals:
        return
    values = [text[key] for key in model_anatomy.ALIASES["logit_scale"] if key in text]
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == 1 for v in values):
        del found.signals["logit_scale"]


def _drop_whole_head_rotary(config: dict[str, Any], found: _Collector) -> None:
    """Code that can rotate part of each head, on a config whose RoPE covers the whole head (MiniMax-M2's
    default has no partial fraction): a port ignoring the fraction matches this model, so it is no signal."""
    import model_anatomy
    from cli_support import ScriptError

    signal = found.signals.get("partial_rotary")
    if signal is None or not all(e.startswith("code:") for e in signal.evidence):
        return
    try:
        view = model_anatomy.config_view(config)
    except ScriptError:
        return
    if view.rotary_fraction == 1 and view.head_dim and view.rotary_dim == view.head_dim and not any(
            r.partial_rotary_factor not in (None, 1, 1.0) for r in view.rope_by_layer_type.values()):
        del found.signals["partial_rotary"]


def _merge_code_signals(reading: Any, found: _Collector) -> None:
    for signal in reading.signals:
        code = signal.code.value
        for ev in signal.evidence:
            found.add(code, signal.detail, f"code: {ev}")
        merged = found.signals[code]
        merged.code_evidence += [{"file": e.file, "line": e.line, "text": e.text} for e in signal.evidence
                                 if {"file": e.file, "line": e.line, "text": e.text} not in merged.code_evidence]
        merged.always = merged.always or signal.always


def _config_signals(config: dict[str, Any], text: dict[str, Any], found: _Collector) -> None:
    def ev(key: str, value: Any) -> str:
        return f"config: {key}={value!r}"

    heads = _value(config, text, "num_attention_heads")
    kv_heads = _value(config, text, "num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads != heads:
        code = "mqa" if kv_heads == 1 else "gqa"
        found.add(code, f"{heads} query heads share {kv_heads} key/value head(s)", ev("num_key_value_heads", kv_heads))
    hidden = _value(config, text, "hidden_size")
    head_dim = _value(config, text, "head_dim")
    if isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and heads:
        if head_dim * heads != hidden:
            found.add("head_dim_override", f"head_dim {head_dim} != hidden_size/heads ({hidden}/{heads} = {hidden / heads:g})",
                      ev("head_dim", head_dim))

    for key in ("qk_norm", "use_qk_norm", "qk_layernorm"):
        if _truthy(_value(config, text, key)):
            found.add("qk_norm", "queries and keys are normalized before RoPE", ev(key, _value(config, text, key)))

    norm = model_source.normalize_config(config)
    rope = norm.rope
    partial = rope.partial_rotary_factor if rope else None
    for key in ("partial_rotary_factor", "rotary_pct"):
        value = _value(config, text, key)
        if isinstance(value, (int, float)) and value < 1:
            partial = value
            found.add("partial_rotary", f"RoPE covers {value:g} of each head", ev(key, value))
    if partial is not None and partial < 1 and "partial_rotary" not in found.signals:
        found.add("partial_rotary", f"RoPE covers {partial:g} of each head", "config: rope parameters")
    rotary_dim = _value(config, text, "rotary_dim")
    if isinstance(rotary_dim, int):
        found.add("partial_rotary", f"RoPE covers {rotary_dim} dims of each head", ev("rotary_dim", rotary_dim))
    if rope and rope.rope_type not in ("default", "none"):
        found.add("rope_scaling", f"RoPE scaling type {rope.rope_type!r} {dict(rope.scaling)}",
                  f"config: rope type {rope.rope_type}")
    for key in ("rope_interleave", "rotary_interleaved", "rope_is_neox_style"):
        value = _value(config, text, key)
        if value is not None:
            found.add("rope_style", f"RoPE pairing set by {key}={value!r} (check interleaved vs rotate-half)",
                      ev(key, value))
    if norm.rope_by_layer_type and len({(r.theta, r.rope_type) for r in norm.rope_by_layer_type.values()}) > 1:
        found.add("rope_per_layer_type", "RoPE settings differ per layer type",
                  f"config: rope_parameters for {sorted(norm.rope_by_layer_type)}")

    window = _value(config, text, "sliding_window")
    use_window = _value(config, text, "use_sliding_window")
    layer_types = _value(config, text, "layer_types")
    # A per-layer list of attention kinds decides which layers window: when it has no sliding or chunked
    # layer, a sliding_window / max_window_layers value is a default no layer uses (Mellum, Dots1).
    windowed = [k for k in map(str, layer_types) if any(m in k for m in WINDOWED_LAYER_MARKS)] \
        if isinstance(layer_types, list) else None
    if windowed is None or windowed:
        if isinstance(window, int) and window > 0 and use_window is not False:
            found.add("sliding_window", f"sliding-window attention of {window} tokens", ev("sliding_window", window))
        for key in ("sliding_window_pattern", "max_window_layers", "attention_chunk_size"):
            value = _value(config, text, key)
            if value is not None and (use_window is not False or key == "attention_chunk_size"):
                found.add("sliding_window", "windowed or chunked attention on some layers", ev(key, value))
    if isinstance(layer_types, list) and len(set(map(str, layer_types))) > 1:
        kinds = sorted(set(map(str, layer_types)))
        found.add("per_layer_attention", f"layers differ in kind: {', '.join(kinds)}", f"config: layer_types {kinds}")
        if any(m in k for k in kinds for m in WINDOWED_LAYER_MARKS):
            found.add("sliding_window", "some layers use sliding-window or chunked attention",
                      f"config: layer_types {kinds}")
    for key in ("no_rope_layers", "no_rope_layer_interval", "nope_layer_interval"):
        value = _value(config, text, key)
        if _truthy(value):
            found.add("nope_layers", "some layers use no positional encoding (NoPE)", ev(key, value))

    for key, code, what in (("final_logit_softcapping", "logit_softcap", "final logits are soft-capped"),
                            ("attn_logit_softcapping", "attn_softcap", "attention scores are soft-capped")):
        value = _value(config, text, key)
        if _truthy(value):
            found.add(code, f"{what} at {value}", ev(key, value))
    for key in ("parallel_attn", "use_parallel_residual", "parallel_residual", "parallel_block"):
        value = _value(config, text, key)
        if value is True:
            found.add("parallel_block", "attention and MLP read the same input and are summed", ev(key, value))

    ln = _first_present(config, text, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))
    if ln and _value(config, text, "rms_norm_eps") is None:
        found.add("layernorm", "LayerNorm (mean-centred, maybe with bias) instead of RMSNorm", ev(*ln))
    for key in ("attention_bias", "qkv_bias", "use_qkv_bias", "bias", "add_bias_linear", "use_bias"):
        if _value(config, text, key) is True:
            found.add("attention_bias", "attention projections have biases", ev(key, True))
    if _value(config, text, "mlp_bias") is True:
        found.add("mlp_bias", "MLP projections have biases", ev("mlp_bias", True))
    act = _first_present(config, text, ("hidden_act", "hidden_activation", "activation_function"))
    if act and str(act[1]).lower() not in ("silu", "swish"):
        found.add("activation", f"activation {act[1]!r} (not SiLU)", ev(*act))
    tie = _value(config, text, "tie_word_embeddings")
    if tie is True:
        found.add("tied_embeddings", "the LM head reuses the embedding matrix", ev("tie_word_embeddings", tie))

    experts = _first_present(config, text, ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))
    if experts and isinstance(experts[1], int) and experts[1] > 1:
        topk = _first_present(config, text, ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"))
        found.add("moe", f"mixture of experts: {experts[1]} experts"
                  + (f", top-{topk[1]}" if topk else ""), ev(*experts))
    shared = _first_present(config, text, ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"))
    if shared and _truthy(shared[1]):
        found.add("shared_experts", "MoE layers also have always-on shared expert(s)", ev(*shared))
    for key in ("scoring_func", "topk_method", "norm_topk_prob", "n_group", "routed_scaling_factor"):
        value = _value(config, text, key)
        if value is not None and experts:
            found.add("router", "router details to match (scoring, grouping, normalization)", ev(key, value))
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"):
        value = _value(config, text, key)
        if _truthy(value):
            found.add("mla", "multi-head latent attention (compressed KV)", ev(key, value))

    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                "mup_width_multiplier", "width_multiplier", "scale_emb", "dim_model_base"):
        value = _value(config, text, key)
        if value is not None and value != 1 and value != 1.0:
            found.add("mup_multipliers", "MuP-style multipliers scale embeddings/residuals/attention/logits",
                      ev(key, value))
    for key in ("scale_depth", "residual_scale"):
        value = _value(config, text, key)
        if value is not None and value != 1:
            found.add("residual_scale", "residual branches are scaled", ev(key, value))
    for key in ("scale_embedding", "embedding_scale", "normalize_embedding"):
        value = _value(config, text, key)
        if _truthy(value):
            found.add("embedding_scale", "token embeddings are scaled", ev(key, value))
    for key in ("clip_qkv", "query_pre_attn_scalar", "attention_sink", "use_sinks"):
        value = _value(config, text, key)
        if _truthy(value):
            found.add("attention_scaling", "attention scores are clipped, rescaled or get sinks", ev(key, value))
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    if model_type.startswith("gemma"):
        found.add("norm_offset", "Gemma-family RMSNorm multiplies by (1 + weight)", f"config: model_type={model_type!r}")
        found.add("embedding_scale", "Gemma-family embeddings are scaled by sqrt(hidden_size)",
                  f"config: model_type={model_type!r}")
    for key, value in (("position_embedding_type", _value(config, text, "position_embedding_type")),
                       ("alibi", _value(config, text, "alibi"))):
        if value is True or (isinstance(value, str) and "alibi" in value.lower()):
            found.add("alibi", "ALiBi attention bias instead of RoPE", ev(key, value))


# Tensor names outside the language model: a vision/audio tower the causal-LM class carries (Phi-4-multimodal's
# embed_tokens_extend.audio_embed.encoder...: its 1024-wide q_proj is not the decoder's).
_NOT_TOWER = r"^(?!.*(?:vision|audio|image|img_|embed_tokens_extend|encoder))"


def _layer0(names: list[str]) -> list[str]:
    """Tensor names of the first layer, with the layer index stripped."""
    result = []
    for name in names:
        match = _LAYER_INDEX.search(name)
        if match and match.group(1) == "0":
            result.append(name[match.end():])
    return result


def _head_dim(text: dict[str, Any]) -> int | None:
    head_dim, hidden, heads = text.get("head_dim"), text.get("hidden_size"), text.get("num_attention_heads")
    if isinstance(head_dim, int):
        return head_dim
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _tensor_signals(text: dict[str, Any], tensors: dict[str, TensorInfo], found: _Collector) -> None:
    names = sorted(tensors)
    layer = _layer0(names)

    def ev(name: str) -> str:
        info = tensors.get(name)
        return f"tensor: {name} {list(info.shape)}" if info else f"tensor: {name}"

    def example(pattern: str) -> str | None:
        regex = re.compile(pattern)
        return next((n for n in names if regex.search(n)), None)

    checks = (
        # not a sparse-attention indexer's own key norm (DeepSeek-V3.2's self_attn.indexer.k_norm)
        (r"^(?!.*\.indexer\.).*\.(q_norm|k_norm|q_layernorm|k_layernorm|query_layernorm|key_layernorm)\.weight$",
         "qk_norm",
         "queries and keys are normalized before RoPE"),
        (r"\.(qkv_proj|query_key_value|qkv|Wqkv|c_attn)\.weight$", "fused_qkv",
         "query/key/value come from one fused projection"),
        (r"\.(gate_up_proj)\.weight$", "fused_gate_up", "gate and up projections are fused"),
        (r"\.(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|o_proj|dense)\.bias$", "attention_bias",
         "attention projections have biases"),
        (r"\.mlp\.(gate_proj|up_proj|down_proj|fc1|fc2|c_fc|c_proj|dense_h_to_4h|dense_4h_to_h)\.bias$",
         "mlp_bias", "MLP projections have biases"),
        (r"\.experts\.", "moe", "mixture of experts (expert tensors)"),
        (r"\.(shared_expert|shared_experts)\.", "shared_experts", "MoE layers also have shared expert(s)"),
        (r"\.(kv_a_proj_with_mqa|kv_b_proj|q_a_proj)\.weight$", "mla", "multi-head latent attention (compressed KV)"),
        (r"\.(sinks|attention_sink)$", "attention_scaling", "attention has learned sinks"),
        (r"(mixer\.|\.ssm|A_log$|\.conv1d\.)", "ssm", "state-space or convolutional mixer tensors"),
    )
    for pattern, code, detail in checks:
        name = example(pattern)
        if name:
            found.add(code, detail, ev(name))
    q_norm = example(r"\.(q_norm|q_layernorm|query_layernorm)\.weight$")
    width = _head_dim(text)
    if q_norm and width and len(tensors[q_norm].shape) == 1 and tensors[q_norm].shape[0] > width:
        found.add("qk_norm_full_width", "one QK-norm spans all heads (OLMo2-style), not one per head", ev(q_norm))

    norm_names = {n.rsplit(".", 1)[0] for n in layer if "norm" in n.lower()}
    norm_names -= {n for n in norm_names if re.search(r"(q_norm|k_norm|q_layernorm|k_layernorm)", n)}
    has = lambda fragment: any(fragment in n for n in norm_names)  # noqa: E731
    if has("pre_feedforward_layernorm") and has("post_feedforward_layernorm"):
        found.add("sandwich_norm", "norms both before and after attention and MLP", "tensor: layer-0 norm names "
                  + ", ".join(sorted(norm_names)))
    elif has("post_feedforward_layernorm") and not has("input_layernorm"):
        found.add("post_norm", "norms after attention and MLP outputs (no input norm)",
                  "tensor: layer-0 norm names " + ", ".join(sorted(norm_names)))
    norm_bias = next((n for n in names if re.search(r"(norm|ln_\w+|layernorm)\.bias$", n)), None)
    if norm_bias:
        found.add("layernorm", "LayerNorm with bias (not RMSNorm)", ev(norm_bias))
    if "lm_head.weight" not in tensors and any(n.endswith("embed_tokens.weight") or n.endswith("wte.weight")
                                               for n in names):
        found.add("tied_embeddings", "no lm_head tensor: the LM head reuses the embedding matrix",
                  "tensor: lm_head.weight absent")
    qkv = example(_NOT_TOWER + r".*\.(q_proj)\.weight$")
    head_dim = text.get("head_dim")
    heads = text.get("num_attention_heads")
    if qkv and isinstance(heads, int) and heads and not head_dim:
        rows = tensors[qkv].shape[0]
        hidden = text.get("hidden_size")
        if isinstance(hidden, int) and rows != hidden:
            found.add("head_dim_override", f"q_proj has {rows} rows, not hidden_size {hidden}", ev(qkv))


# --- donor ranking -------------------------------------------------------------

# Signals every listed donor handles: they do not shift the ranking. An explicit head_dim is not one of them:
# the llama3 graph sizes RoPE from hidden_size / heads (max_registry.HEAD_DIM_OVERRIDE says which donors do).
_BASELINE = {"gqa", "mqa", "tied_embeddings", "rope_scaling"}

# One-line fixes printed with "would need" for a code whose fix is one known edit in a port.
FIX_HINTS = {
    "head_dim_override": "the llama3 graph builds RoPE from hidden_size / num_attention_heads "
                         "(create_rope_embedding ignores head_dim): in the port's <slug>.py build "
                         "Llama3RotaryEmbedding(..., head_dim=config.kv_params.head_dim) instead, or "
                         "build_rope(rotary_dim=head_dim) from scaffold --with attention",
}


# Donor features that are always on in the donor's graph, with the cost of
# removing them when the model does not have them (structural ones cost more).
# A donor's ``optional`` features (switched on by config or weights) cost nothing.
# A state-space/conv mixer the model lacks costs the most: every layer it runs in must be rewritten (an
# attention model otherwise ranked the hybrid lfm2 above olmo2, Exaone 4 dogfood).
_ALWAYS_ON = {"ssm": 6, "mla": 3, "moe": 2, "shared_experts": 1, "sandwich_norm": 1, "post_norm": 1,
              "per_layer_attention": 1, "layernorm": 1, "layernorm_weightless": 1, "fused_qkv": 1, "fused_gate_up": 1, "norm_offset": 1,
              "embedding_scale": 1, "nope_layers": 1, "qk_norm": 1, "qk_norm_full_width": 2,
              "attention_bias": 1, "mlp_bias": 1}

# Ranking-only codes for the router kind. An MoE config without router keys routes like Mixtral
# (softmax over all experts, top-k, renormalize); scoring_func="sigmoid" routes like DeepSeek-V3.
TOPK_SOFTMAX_ROUTER = "topk_softmax_router"
SIGMOID_ROUTER = "sigmoid_router"


def _ranking_codes(signals: list[Signal]) -> list[str]:
    codes = [s.code for s in signals if s.code not in _BASELINE]
    if "moe" in codes and "router" not in codes and TOPK_SOFTMAX_ROUTER not in codes:
        codes.append(TOPK_SOFTMAX_ROUTER)
    router = next((s for s in signals if s.code == "router"), None)
    if router and any("scoring_func='sigmoid'" in e for e in router.evidence) and SIGMOID_ROUTER not in codes:
        codes.append(SIGMOID_ROUTER)
    return list(dict.fromkeys(codes))


# A code and the code that names its form: a donor covers the code only in the form the model has (olmo2's
# full-width QK-norm does not implement a per-head one; the Exaone 4 dogfood read "already implements: qk_norm").
FORM_OF = {"qk_norm": "qk_norm_full_width"}


def _covers(code: str, traits: Any, codes: list[str]) -> bool:
    """Whether a donor with ``traits`` implements ``code`` in the form the model's ``codes`` ask for."""
    if code not in traits.features:
        return False
    form = FORM_OF.get(code)
    if form is None or form in traits.optional:
        return True
    return (form in traits.features) == (form in codes)


@dataclass
class DonorRank:
    """One donor candidate with its score, the reasons for it and what stops it running here."""

    slug: str
    score: int
    reasons: list[str]
    covered: list[str]
    missing: list[str]
    cpu_fp32: str
    blockers: list[str] = field(default_factory=list)  # why it cannot run the checkpoint on this device


class Device(str, enum.Enum):
    """The hardware a port is brought up on."""

    CPU = "cpu"
    GPU = "gpu"


# The encoding a replica or checkpoint needs: the CPU loop runs float32 (MAX's CPU kernels and the
# HF reference both run it); on a GPU the checkpoint's own dtype.
CPU_ENCODING = "float32"
_DTYPE_ENCODING = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "bf16": "bfloat16",
                   "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


# How many better-scoring donors that cannot run here are still listed after the runnable ones.
MAX_BLOCKED_SHOWN = 3


def required_encoding(device: str, checkpoint_dtype: str | None) -> str | None:
    """The MAX encoding a donor must support for this device and checkpoint dtype (None: unknown)."""
    if device == Device.CPU:
        return CPU_ENCODING
    return _DTYPE_ENCODING.get(str(checkpoint_dtype).lower()) if checkpoint_dtype else None


def donor_blockers(donor: Any, device: str, checkpoint_dtype: str | None, quantized: bool) -> list[str]:
    """Why a donor cannot run this checkpoint on ``device`` (measured on MAX 26.7, or read from its code)."""
    import max_registry

    blockers = []
    if device == Device.CPU and donor.cpu_fp32 == "fail":
        blockers.append(f"measured to fail on the CPU: {donor.cpu_fp32_note}")
    runtime = max_registry.donor_runtime(donor.slug, donor.config_class_from)
    if device == Device.CPU and runtime.gpu_only:
        blockers.append("uses GPU-only MoE kernels (max.nn.moe / grouped_matmul_ragged have no CPU "
                        f"implementation in MAX {max_registry.MEASURED_MAX_VERSION}): {runtime.gpu_only[0]}")
    needed = required_encoding(device, checkpoint_dtype)
    if needed and runtime.encodings is not None and needed not in runtime.encodings:
        blockers.append(f"no {needed} encoding (supports {', '.join(sorted(runtime.encodings))})")
    if runtime.asserts_quantized and not quantized:
        blockers.append(f"its block asserts quantized weights: {runtime.asserts_quantized[0]}")
    return blockers


def rank_donors(signals: list[Signal], donors: list[Any], model_type: str | None = None,
                limit: int = 5, *, device: str = Device.CPU, checkpoint_dtype: str | None = None,
                quantized: bool = False) -> list[DonorRank]:
    """Score donors (``max_registry.Donor`` objects with known traits) against the signals.

    +2 per signal the donor already implements (more for structural ones), -1 per signal it lacks,
    minus the cost of each always-on donor feature the model lacks, +1 if its family name matches
    the model type, +1 for a measured CPU fp32 match and -1 for a measured failure. An MoE model
    without router keys also asks for ``topk_softmax_router``, one with ``scoring_func="sigmoid"``
    for ``sigmoid_router``. Ties prefer fewer always-on
    features, then a donor that owns its graph, then MAX's table order. A donor that cannot run
    the checkpoint on ``device`` (:func:`donor_blockers`) ranks below every one that can, whatever
    its score, and its reasons say why.
    """
    import max_registry

    codes = _ranking_codes(signals)
    ranked = []
    for donor in donors:
        traits = max_registry.DONOR_TRAITS.get(donor.slug)
        if traits is None:
            continue
        covered = [c for c in codes if _covers(c, traits, codes)]
        missing = [c for c in codes if c not in covered]
        always_on = traits.features - traits.optional
        extra = sorted(f for f in always_on & _ALWAYS_ON.keys() if f not in codes)
        score = (sum(2 + _ALWAYS_ON.get(c, 0) for c in covered) - len(missing)
                 - sum(_ALWAYS_ON[f] for f in extra))
        reasons = []
        if covered:
            reasons.append(f"already implements: {', '.join(covered)}")
        if missing:
            reasons.append(f"would need: {', '.join(missing)}")
            reasons += [f"fix for {c}: {FIX_HINTS[c]}" for c in missing if c in FIX_HINTS]
        if extra:
            reasons.append(f"has what the model lacks (to remove): {', '.join(extra)}")
        if TOPK_SOFTMAX_ROUTER in codes and not any(s.code == TOPK_SOFTMAX_ROUTER for s in signals):
            reasons.append("no router keys in the config: assumes Mixtral-style softmax top-k routing")
        if not codes:
            reasons.append("no delta signals: a plain Llama-style block")
        family = donor.slug.rstrip("0123456789").lower()
        if model_type and family and model_type.lower().startswith(family) and len(family) > 2:
            score += 1
            reasons.append(f"same family as model_type {model_type!r}")
        if donor.cpu_fp32 == "match":
            score += 1
            reasons.append(f"builds and matches HF on CPU fp32 (measured, MAX {max_registry.MEASURED_MAX_VERSION})")
        elif donor.cpu_fp32 == "fail":
            score -= 1
            if device != Device.CPU:  # on the CPU the blocker below says it
                reasons.append(f"fails on CPU fp32: {donor.cpu_fp32_note}")
        elif donor.cpu_fp32 == "diverged":  # builds on the CPU, but a copied graph needs the fix first
            reasons.append(f"native graph diverges from HF on CPU fp32: {donor.cpu_fp32_note}")
        else:
            reasons.append("CPU fp32 behaviour unmeasured")
        blockers = donor_blockers(donor, device, checkpoint_dtype, quantized)
        reasons += [f"ranked below every runnable donor on {device}: {b}" for b in blockers]
        tie_break = (len(always_on), getattr(donor, "graph", "own") != "own")
        ranked.append((tie_break, DonorRank(donor.slug, score, reasons, covered, missing, donor.cpu_fp32,
                                            blockers)))
    ranked.sort(key=lambda pair: (bool(pair[1].blockers), -pair[1].score, pair[0]))
    shown = [rank for _, rank in ranked[:limit]]
    # A blocked donor that outscores every runnable one stays visible (last), with why it cannot run here.
    best_runnable = max((r.score for _, r in ranked if not r.blockers), default=None)
    better_blocked = [r for _, r in ranked if r.blockers and r not in shown
                      and (best_runnable is None or r.score > best_runnable)]
    return shown + better_blocked[:MAX_BLOCKED_SHOWN]
