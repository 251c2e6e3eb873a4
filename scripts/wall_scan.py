"""The wall catalogue: what blocks or complicates a MAX port, read from metadata only.

Reads config.json (nested configs too), tokenizer_config.json, the file list,
safetensors headers and (through ``hf_source``) the HF modeling code as text;
never weights. Each finding has a stable code, a
level (stop, warn or note) and a one-line message naming the reference to
read. ``scan_walls(source)`` runs the whole catalogue on a resolved
``model_source.ModelSource`` (check-walls and gates' preflight call it), and
``exit_code_for(findings)`` turns findings into 0/1/2.

Imports neither torch nor max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import hf_source
import max_registry
import model_source
import transformers_catalog
from cli_support import ScriptError
from delta_codes import DeltaCode

STOP, WARN, NOTE = "stop", "warn", "note"
WALLS_REF = "references/recognize-walls.md"
DISTRIBUTED_REF = "references/distributed-transformer.md"
NATIVE_REF = "references/native-arch-check.md"

SSM_MODEL_TYPES = {
    "mamba", "mamba2", "falcon_mamba", "rwkv", "rwkv5", "rwkv6", "rwkv7", "jamba", "bamba", "zamba", "zamba2",
    "falcon_h1", "recurrent_gemma", "xlstm", "nemotron_h", "granitemoehybrid", "plamo2", "lfm2", "qwen3_next",
    "minimax", "hymba", "lfm2_moe",
    # Hierarchical reasoning model: two weight-shared stacks looped H_cycles x L_cycles times per token, a
    # recurrence over depth with a carried latent state (z_L/z_H); no MAX class, no block-per-layer mapping.
    "hrm_text",
}
# Wall code: several residual streams per token mixed by learned weights around every sublayer (DeepSeek-V4's
# hyper-connections, hc_mult). Gemma 3n's AltUp streams (altup_num_inputs) are no wall: the layout resolver
# records them (model_anatomy.StreamPart) and the replica tools handle them.
RESIDUAL_STREAMS = "residual_streams"  # the code as emitted below (test_docs reads the literal)
RESIDUAL_STREAM_WALL_KEYS = ("hc_mult",)
SSM_NAME_MARKERS = ("mamba", "rwkv", "jamba", "bamba", "zamba", "recurrent", "xlstm", "hymba")
SSM_KEYS = {"ssm_cfg", "ssm_state_size", "state_size", "d_state", "mamba_d_state", "mamba_d_conv", "conv_kernel",
            "layers_block_type", "hybrid_override_pattern", "attn_layer_period", "mamba_expand", "rescale_every",
            "linear_attn_config", "linear_num_value_heads"}
# Families whose causal-LM class attends both ways unless one config flag says otherwise:
# model_type -> (flag, the value that makes attention causal). From transformers 5.12's code:
# XLNet builds a causal mask only when attn_type == "uni" (modeling_xlnet.py, XLNetModel.forward; the
# default "bi" masks nothing); XLM only when causal is true (modeling_xlm.py, get_masks; default false).
CAUSAL_ONLY_WHEN = {"xlnet": ("attn_type", "uni"), "xlm": ("causal", True)}
# Families that are not a standalone decoder-only LM over one stream of text tokens, whatever the config
# says; model_type -> why (read in transformers 5.12's code).
NOT_A_TEXT_DECODER = {
    "cpmant": "attends both ways: its model sets a context flag of 1 at every position and ORs it into the "
              "attention mask, so every token sees the later ones (modeling_cpmant.py, _prepare_attention_mask)",
    "gemma4_assistant": "is a draft head for assisted decoding: its forward needs the target model's input "
                        "embeddings and KV states and ignores input_ids, not a standalone LM",
    "gemma4_unified_assistant": "is a draft head for assisted decoding: its forward needs the target model's "
                                "input embeddings and KV states and ignores input_ids, not a standalone LM",
    "musicgen": "is an audio-codebook decoder conditioned on a text encoder: each position predicts "
                "num_codebooks streams of audio codes (one LM head per codebook), not one text token stream",
    "musicgen_melody": "is an audio-codebook decoder conditioned on text and audio: each position predicts "
                       "num_codebooks streams of audio codes (one LM head per codebook), not one text token stream",
}
NOT_A_TEXT_DECODER["blt"] = (
    "is a byte latent transformer, not one decoder stack: a separate entropy model (patcher) cuts the bytes "
    "into patches, a local byte encoder cross-attends into patch states, a global transformer runs over "
    "patches and a local decoder cross-attends back (modeling_blt.py, BltModel)")
NOT_A_TEXT_DECODER["mllama"] = (
    "is the language model of a vision-language model, not one decoder stack: the layers listed in "
    "cross_attention_layers are gated cross-attention blocks whose keys and values come from the image "
    "encoder's states, and on text alone its forward skips them (modeling_mllama.py, "
    "MllamaCrossAttentionDecoderLayer and MllamaTextModel.forward)")
NOT_A_TEXT_DECODER["mllama_text_model"] = NOT_A_TEXT_DECODER["mllama"]
NOT_A_TEXT_DECODER["musicgen_decoder"] = NOT_A_TEXT_DECODER["musicgen"]
NOT_A_TEXT_DECODER["musicgen_melody_decoder"] = NOT_A_TEXT_DECODER["musicgen_melody"]
# Quantization schemes MAX 26.7 loads for MoE experts.
MOE_LOADABLE_QUANT = {"fp8", "fbgemm_fp8", "compressed-tensors", "modelopt", "mxfp4", "mxfp6", "mxfp8", "quark"}
LARGE_MODEL_PARAMETERS = 30_000_000_000


@dataclass(frozen=True)
class Finding:
    """One wall: a stable code, a level (stop/warn/note) and a one-line message naming its reference."""

    code: str
    level: str
    message: str
    reference: str


def _finding(code: str, level: str, message: str, reference: str = WALLS_REF) -> Finding:
    return Finding(code, level, f"{message} (read {reference})", reference)


def walk_config(config: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every (dotted path, key, value) in a config, descending into nested dicts."""
    if isinstance(config, dict):
        for key, value in config.items():
            here = f"{path}.{key}" if path else str(key)
            yield here, str(key), value
            if isinstance(value, dict):
                yield from walk_config(value, here)


def _model_types(config: dict[str, Any]) -> list[str]:
    return [str(v) for _, k, v in walk_config(config) if k == "model_type" and isinstance(v, str)]


def _architectures(config: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for _, key, value in walk_config(config):
        if key == "architectures" and isinstance(value, list):
            names += [str(v) for v in value]
    return names


def config_walls(config: dict[str, Any], native: bool, reading: hf_source.SourceReading | None = None) -> list[Finding]:
    """Walls visible in config.json and, given a ``hf_source`` reading, in the HF modeling code."""
    findings: list[Finding] = []
    model_types = _model_types(config)
    archs = _architectures(config)

    alibi = [p for p, k, v in walk_config(config)
             if (k == "alibi" and v is True)
             or (k == "position_embedding_type" and isinstance(v, str) and "alibi" in v.lower())]
    code_alibi = next((s for s in reading.signals if s.code == DeltaCode.ALIBI), None) if reading else None
    if code_alibi is not None:
        how = "whatever the config says" if code_alibi.always else f"when {code_alibi.condition}"
        alibi.append(f"the HF code applies it {how}: {code_alibi.evidence[0].file}:{code_alibi.evidence[0].line}")
    if alibi:
        findings.append(_finding("alibi", STOP, f"ALiBi attention bias ({', '.join(alibi)}); MAX attention has no "
                                 "ALiBi path"))

    ssm_types = [t for t in model_types if t in SSM_MODEL_TYPES]
    ssm_archs = [a for a in archs if any(m in a.lower() for m in SSM_NAME_MARKERS)]
    ssm_keys = sorted({p for p, k, _ in walk_config(config) if k in SSM_KEYS})
    if (ssm_types or ssm_archs or ssm_keys) and not native:
        evidence = ", ".join(ssm_types + ssm_archs + ssm_keys[:3])
        findings.append(_finding("ssm_recurrence", STOP, f"state-space or recurrent layers ({evidence}) and MAX "
                                 "does not register this class"))

    streams = sorted({f"{p}={v}" for p, k, v in walk_config(config)
                      if k in RESIDUAL_STREAM_WALL_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > 1})
    if streams and not native:
        findings.append(_finding("residual_streams", STOP, f"several residual streams (hyper-connections: "
                                 f"{', '.join(streams)}) mixed by learned weights around every sublayer, with an "
                                 "attention the layout resolver does not describe (low-rank queries, one shared "
                                 "key/value projection, grouped low-rank output, sinks, compressed keys), and MAX "
                                 "does not register this class"))

    quant = next((v for p, k, v in walk_config(config) if k == "quantization_config" and isinstance(v, dict)), None)
    has_dtype = any(k in ("torch_dtype", "dtype") and v for _, k, v in walk_config(config))
    is_moe = any(k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                 and isinstance(v, int) and v > 1 for _, k, v in walk_config(config))
    if quant is not None:
        method = str(quant.get("quant_method") or "unknown")
        if not has_dtype:
            findings.append(_finding("quantized_only", STOP, f"weights ship only quantized ({method}) with no "
                                     "unquantized dtype: no float reference to compare against"))
        else:
            findings.append(_finding("quantized_weights", NOTE, f"quantized checkpoint ({method}); plan encodings"))
        if is_moe and method not in MOE_LOADABLE_QUANT:
            findings.append(_finding("moe_quant_unsupported", STOP, f"MoE experts quantized with {method}, which "
                                     "MAX cannot load for experts"))

    arch = archs[0] if archs else ""
    why_not = not_causal_lm(config, arch, reading)
    if why_not:
        findings.append(_finding("not_causal_lm", WARN, f"{arch or 'model'} {why_not}"))

    if "auto_map" in config:
        findings.append(_finding("remote_code", WARN, "config.json has auto_map: the model runs its own Python "
                                 "code; read it before trusting HF outputs"))
    elif arch and model_types:
        shipped = transformers_catalog.ships_class(arch, model_types[0])
        if shipped is False:
            findings.append(_finding("class_not_in_transformers", WARN, f"{arch} is not a class the installed "
                                     "transformers ships: the reference needs remote code"))
    return findings


def not_causal_lm(config: dict[str, Any], arch: str, reading: hf_source.SourceReading | None) -> str | None:
    """Why the model is not a decoder-only causal LM, decided from the config; None when it is one.

    Encoder-decoder (``is_encoder_decoder``), diffusion, a family of ``NOT_A_TEXT_DECODER`` (bidirectional,
    a draft head, audio codebooks), a ``CAUSAL_ONLY_WHEN`` family whose flag leaves attention bidirectional,
    a class outside transformers' causal-LM mapping, or a class in it whose code reads ``is_decoder`` while
    the config leaves it False (BertLMHeadModel, by default an encoder). The class-name suffix decides nothing.
    """
    model_type, text = hf_source.text_model_type(config)
    for name in dict.fromkeys([config.get("model_type"), model_type]):
        if isinstance(name, str) and name in NOT_A_TEXT_DECODER:
            return f"({name}) {NOT_A_TEXT_DECODER[name]}"
    if config.get("is_encoder_decoder") is True or (
            reading is not None and reading.effective.get("is_encoder_decoder") is True):
        return "is encoder-decoder (seq2seq), not a causal LM"
    if "diffusion" in arch.lower() or "_diffusers_version" in config:
        return "is a diffusion model, not a causal LM"
    if model_type in CAUSAL_ONLY_WHEN:
        flag, causal = CAUSAL_ONLY_WHEN[model_type]
        value = text.get(flag, reading.effective.get(flag) if reading is not None else None)
        if value != causal:
            return (f"({model_type}) attends both ways: its code builds a causal mask only when {flag} is "
                    f"{causal!r}, and the config has {flag}={value!r}")
    mapping = transformers_catalog.causal_lm_classes()
    if not mapping or not model_type or "auto_map" in config:
        return None  # transformers missing or remote code: nothing to decide from
    if model_type not in mapping:
        return f"has model_type {model_type!r}, which transformers' causal-LM mapping does not list"
    if arch and arch != mapping[model_type] and arch not in mapping.values() and not arch.endswith(
            ("ForConditionalGeneration", "ForCausalLM")):
        return f"is not the causal-LM class of {model_type!r} ({mapping[model_type]}): a task head or bare model"
    if reading is not None and reading.reads_is_decoder and reading.effective.get("is_decoder") is not True:
        return (f"is a {model_type!r} model whose code reads is_decoder, and the config leaves it False: "
                "an encoder, not a decoder-only causal LM")
    return None


def tokenizer_walls(source: model_source.ModelSource) -> list[Finding]:
    """Custom tokenizer classes (auto_map or a class transformers does not ship)."""
    if not source.has_file("tokenizer_config.json"):
        return []
    try:
        tokenizer_config = source.read_json("tokenizer_config.json")
    except ScriptError:
        return [_finding("custom_tokenizer", WARN, "tokenizer_config.json is unreadable")]
    if "auto_map" in tokenizer_config:
        return [_finding("custom_tokenizer", WARN, "tokenizer_config.json has auto_map: a custom tokenizer class")]
    name = tokenizer_config.get("tokenizer_class")
    if isinstance(name, str) and transformers_catalog.ships_tokenizer(name) is False:
        return [_finding("custom_tokenizer", WARN, f"tokenizer class {name} is not shipped by transformers")]
    return []


def weight_walls(source: model_source.ModelSource) -> tuple[list[Finding], dict[str, Any] | None]:
    """Weights-format walls and, from safetensors headers, the parameter count."""
    weights = model_source.weight_files(source)
    if weights.format == "none":
        return [_finding("no_weights", STOP, "no weight files (safetensors, .bin or GGUF) in the model")], None
    if weights.format == "bin":
        return [_finding("bin_only", STOP, "weights are .bin (pickle) only; MAX loads safetensors: convert them "
                         "first")], None
    if weights.format == "gguf":
        return [_finding("gguf_weights", NOTE, "weights are GGUF only; the HF reference needs safetensors")], None
    findings = []
    if weights.other_formats:
        findings.append(_finding("extra_weight_formats", NOTE,
                                 f"also ships {', '.join(weights.other_formats)} weights; MAX uses safetensors"))
    summary = model_source.checkpoint_summary(model_source.read_tensor_infos(source, weights))
    if summary["parameter_count"] >= LARGE_MODEL_PARAMETERS:
        billions = summary["parameter_count"] / 1e9
        findings.append(_finding("large_model", WARN, f"{billions:.0f}B parameters ({summary['bytes'] / 2**30:.0f} "
                                 "GiB): plan how to distribute it", DISTRIBUTED_REF))
    return findings, summary


def scan_walls(source: model_source.ModelSource, config: dict[str, Any] | None = None) -> list[Finding]:
    """Run the whole wall catalogue on a resolved model; stop findings first."""
    config = config if config is not None else model_source.read_config(source)
    arch = model_source.normalize_config(config).architecture
    native = bool(arch and max_registry.match(arch, max_registry.read_table()))
    findings = []
    if native:
        findings.append(_finding("native", NOTE, f"MAX already registers {arch}: serve it instead of porting",
                                 NATIVE_REF))
    reading = None if native or "auto_map" in config else hf_source.read_model(config)
    findings += config_walls(config, native, reading)
    findings += tokenizer_walls(source)
    findings += weight_walls(source)[0]
    order = {STOP: 0, WARN: 1, NOTE: 2}
    return sorted(findings, key=lambda f: order[f.level])


def exit_code_for(findings: list[Finding]) -> int:
    """2 if any finding stops, 1 if any warns, else 0."""
    levels = {f.level for f in findings}
    return 2 if STOP in levels else 1 if WARN in levels else 0
