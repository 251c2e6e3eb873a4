"""hf_source: config keys HF reads and code-level delta signals, read from transformers' modeling code as text.

Configs are transformers' default configs (``AutoConfig.for_model(type).to_dict()``); no weights, no
network. Each expected signal names the modeling file and a pattern its evidence line must match, so a
transformers bump that moves or rewrites the line fails here instead of passing silently.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from functools import lru_cache

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import delta_signals  # noqa: E402
import hf_source  # noqa: E402
import transformers_catalog  # noqa: E402
import wall_scan  # noqa: E402
from delta_codes import DeltaCode  # noqa: E402

# family -> {signal code: line pattern}; the file is models/<family>/modeling_<family>.py. Hand-checked
# against transformers 5.12.1 with the family's default config.
EXPECTED: dict[str, dict[str, str]] = {
    "llama": {},
    "gpt_neox": {
        "fused_qkv": r"self\.query_key_value = nn\.Linear", "fused_qkv_per_head": r"3 \* self\.head_size",
        "attention_bias": r"query_key_value = nn\.Linear\(.*bias=config\.attention_bias",
        "attention_out_bias": r"self\.dense = nn\.Linear", "partial_rotary": r"q_rot, q_pass = ",
        "layernorm": r"nn\.LayerNorm\(", "parallel_block": r"self\.mlp\(self\.post_attention_layernorm\(hidden_states\)\)",
        "mlp_ungated": r"def forward\(self, hidden_states\)", "mlp_bias": r"self\.dense_h_to_4h = nn\.Linear",
    },
    "phi": {
        "attention_bias": r"self\.q_proj = nn\.Linear\(.*bias=True", "attention_out_bias": r"self\.dense = nn\.Linear",
        "partial_rotary": r"query_rot, query_pass = ", "layernorm": r"nn\.LayerNorm\(",
        "parallel_block": r"self\.mlp\(hidden_states\)", "mlp_ungated": r"def forward",
        "mlp_bias": r"self\.fc1 = nn\.Linear", "lm_head_bias": r"self\.lm_head = nn\.Linear\(.*bias=True",
    },
    "starcoder2": {
        "attention_bias": r"self\.q_proj = nn\.Linear\(.*bias=config\.use_bias",
        "attention_out_bias": r"self\.o_proj = nn\.Linear\(.*bias=config\.use_bias", "layernorm": r"nn\.LayerNorm\(",
        "mlp_ungated": r"def forward", "mlp_bias": r"self\.c_fc = nn\.Linear\(.*bias=config\.use_bias",
    },
    "cohere": {
        "rope_interleaved": r"x\[\.\.\., ::2\]", "layernorm": r"hidden_states - mean",
        "parallel_block": r"self\.mlp\(hidden_states\)", "logit_scale": r"logits \* self\.logit_scale",
    },
    "olmoe": {
        "qk_norm": r"self\.q_norm = OlmoeRMSNorm\(config\.hidden_size",
        "qk_norm_full_width": r"self\.q_norm = OlmoeRMSNorm\(config\.hidden_size",
        "moe": r"self\.experts = OlmoeExperts", "topk_softmax_router": r"softmax\(router_logits",
    },
    "gpt2": {
        "fused_qkv": r"self\.c_attn = Conv1D", "attention_bias": r"self\.c_attn = Conv1D",
        "attention_out_bias": r"self\.c_proj = Conv1D", "no_rope": r"^class GPT2Attention",
        "learned_positions": r"self\.wpe = nn\.Embedding\(config\.max_position_embeddings", "layernorm": r"nn\.LayerNorm\(",
        "mlp_ungated": r"def forward", "mlp_bias": r"self\.c_fc = Conv1D", "conv1d_weights": r"Conv1D\(",
    },
    "gptj": {
        "rope_interleaved": r"x\[:, :, :, ::2\]", "partial_rotary": r"\[:, :, :, : self\.rotary_dim\]",
        "layernorm": r"nn\.LayerNorm\(", "parallel_block": r"self\.mlp\(hidden_states\)", "mlp_ungated": r"def forward",
        "mlp_bias": r"self\.fc_in = nn\.Linear", "lm_head_bias": r"self\.lm_head = nn\.Linear\(config\.n_embd, config\.vocab_size\)",
    },
    "falcon": {
        "mqa": r"config\.multi_query", "fused_qkv": r"self\.query_key_value = FalconLinear",
        "layernorm": r"LayerNorm\(hidden_size", "parallel_block": r"self\.mlp\(mlp_layernorm_out\)",
        "mlp_ungated": r"def forward",
    },
    "mpt": {
        "fused_qkv": r"self\.Wqkv = nn\.Linear", "no_rope": r"^class MptAttention",
        "alibi": r"build_mpt_alibi_tensor\(", "layernorm": r"LayerNorm\(hidden_size", "mlp_ungated": r"def forward",
    },
    "bloom": {
        "fused_qkv": r"self\.query_key_value = nn\.Linear", "fused_qkv_per_head": r"self\.num_heads, 3, self\.head_dim",
        "attention_bias": r"query_key_value = nn\.Linear\(.*bias=True", "attention_out_bias": r"self\.dense = nn\.Linear",
        "no_rope": r"^class BloomAttention", "alibi": r"build_alibi_tensor\(", "layernorm": r"LayerNorm\(hidden_size",
        "mlp_bias": r"self\.dense_h_to_4h = nn\.Linear",
    },
    "opt": {
        "attention_bias": r"_proj = nn\.Linear\(.*bias=self\.enable_bias",
        "attention_out_bias": r"self\.out_proj = nn\.Linear", "no_rope": r"^class OPTAttention",
        "learned_positions": r"OPTLearnedPositionalEmbedding\(", "layernorm": r"nn\.LayerNorm\(",
        "mlp_ungated": r"self\.fc1 = nn\.Linear", "mlp_bias": r"self\.fc1 = nn\.Linear\(.*bias=config\.enable_bias",
    },
    "gemma": {"norm_offset": r"\(1\.0 \+ self\.weight", "embedding_scale": r"\* self\.embed_scale"},
    "gemma2": {
        "attention_scale": r"self\.scaling = config\.query_pre_attn_scalar", "attn_softcap": r"torch\.tanh\(attn_weights\)",
        "per_layer_attention": r"config\.layer_types\[layer_idx\]", "norm_offset": r"\(1\.0 \+ self\.weight",
        "sandwich_norm": r"self\.post_feedforward_layernorm = ", "embedding_scale": r"\* self\.embed_scale",
        "logit_softcap": r"logits = torch\.tanh\(logits\)",
    },
    "qwen2_moe": {
        "attention_bias": r"self\.q_proj = nn\.Linear\(.*bias=config\.qkv_bias", "moe": r"self\.experts = ",
        "shared_experts": r"self\.shared_expert = ", "shared_expert_gate": r"sigmoid\(self\.shared_expert_gate\(",
        "topk_softmax_router": r"softmax\(router_logits",
    },
    "mixtral": {
        "moe": r"self\.experts = MixtralExperts", "topk_softmax_router": r"softmax\(router_logits",
        "router_renormalize": r"router_top_value /= router_top_value\.sum",
    },
    "qwen3": {"qk_norm": r"self\.q_norm = Qwen3RMSNorm\(self\.head_dim"},
    "olmo": {"layernorm": r"F\.layer_norm\(", "layernorm_weightless": r"None, None"},
    "olmo2": {
        "qk_norm": r"self\.q_norm = Olmo2RMSNorm\(config\.num_attention_heads \* self\.head_dim",
        "qk_norm_full_width": r"self\.q_norm = Olmo2RMSNorm\(config\.num_attention_heads",
        "post_norm": r"self\.post_feedforward_layernorm = ",
    },
    "granite": {
        "attention_scale": r"self\.scaling = config\.attention_multiplier",
        "embedding_scale": r"inputs_embeds \* self\.embedding_multiplier",
        "logit_scale": r"logits / self\.config\.logits_scaling",
    },
    "phi3": {"fused_qkv": r"self\.qkv_proj = nn\.Linear", "fused_gate_up": r"self\.gate_up_proj = nn\.Linear"},
    "stablelm": {"partial_rotary": r"query_rot, query_pass = ", "layernorm": r"nn\.LayerNorm\("},
    "smollm3": {"nope_layers": r"self\.use_rope = config\.no_rope_layers\[layer_idx\]"},
    # RoPE only on sliding layers, read from an `if` around apply_rotary_pos_emb (missed before: Exaone 4 dogfood).
    "exaone4": {"qk_norm": r"self\.q_norm = ", "per_layer_attention": r"layer_types\[layer_idx\]",
                "nope_layers": r"if self\.sliding_window is None or self\.is_sliding:", "post_norm": r"post_feedforward"},
}

# Signals whose sensitivity mutation is filed under a broader code in replica_sensitivity.
MUTATION_CODE = {"rope_interleaved": "rope_style", "topk_softmax_router": "router", "sigmoid_router": "router",
                 "qk_norm_full_width": "qk_norm", "mqa": "gqa"}


@lru_cache(maxsize=None)
def default_config(model_type: str) -> str:
    """transformers' default config for a model type, as config.json would hold it (JSON text)."""
    from transformers import AutoConfig

    return json.dumps(AutoConfig.for_model(model_type).to_dict(), default=str)


def reading_for(model_type: str, **edits) -> hf_source.SourceReading:
    config = json.loads(default_config(model_type))
    config.update(edits)
    reading = hf_source.read_model(config)
    assert reading is not None, model_type
    return reading


def test_at_least_fifteen_families_with_the_required_ones():
    assert len(EXPECTED) >= 15
    assert {"gpt_neox", "phi", "starcoder2", "cohere", "olmoe"} <= set(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_code_signals_match_the_hand_checked_set(family):
    reading = reading_for(family)
    found = {s.code.value: s for s in reading.signals}
    assert set(found) == set(EXPECTED[family]), sorted(found)
    root = transformers_catalog.transformers_dir()
    folder = transformers_catalog.module_name(family)
    for code, pattern in EXPECTED[family].items():
        evidence = found[code].evidence
        assert evidence, code
        for ev in evidence[:1]:
            assert ev.file == f"models/{folder}/modeling_{folder}.py", (code, ev.file)
            line = (root / ev.file).read_text(encoding="utf-8").splitlines()[ev.line - 1]
            assert line.strip() == ev.text  # the reported line number holds the reported text
            assert re.search(pattern, line), (code, ev.line, line)


def test_expected_signals_have_a_sensitivity_mutation_or_are_listed_as_lacking_one():
    """Ties each expected code to replica_sensitivity's mutation for it (by DeltaCode)."""
    import replica_sensitivity

    mutated = {m.code.value for m in replica_sensitivity.MUTATIONS if getattr(m, "code", None) is not None}
    expected = {code for codes in EXPECTED.values() for code in codes}
    tied = {code for code in expected if MUTATION_CODE.get(code, code) in mutated}
    assert {"partial_rotary", "parallel_block", "logit_scale", "norm_offset", "learned_positions",
            "router_renormalize", "shared_expert_gate", "attn_softcap", "logit_softcap"} <= tied
    assert all(isinstance(DeltaCode(code), DeltaCode) for code in expected)


def test_conditional_rope_is_no_nope_signal_when_every_layer_slides():
    """The `if self.is_sliding: apply RoPE` form means NoPE layers only where some layers do not slide."""
    assert "nope_layers" in reading_for("exaone4").signal_codes()
    assert "nope_layers" not in reading_for("exaone4", layer_types=["sliding_attention"] * 4,
                                            num_hidden_layers=4).signal_codes()


def test_signals_follow_the_config_branch():
    assert "parallel_block" not in reading_for("gpt_neox", use_parallel_residual=False).signal_codes()
    assert "partial_rotary" not in reading_for("gpt_neox", rotary_pct=1.0,
                                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 1.0}).signal_codes()
    assert "router_renormalize" in reading_for("olmoe", norm_topk_prob=True).signal_codes()
    assert "qk_norm" in reading_for("cohere", use_qk_norm=True).signal_codes()
    falcon = reading_for("falcon", alibi=True)
    alibi = next(s for s in falcon.signals if s.code == DeltaCode.ALIBI)
    assert not alibi.always and "alibi" in (alibi.condition or "")
    mpt = next(s for s in reading_for("mpt").signals if s.code == DeltaCode.ALIBI)
    assert mpt.always  # MPT's HF code builds ALiBi whatever attn_config says


@pytest.mark.parametrize("family,decoys", [
    ("gpt_neox", {"num_key_value_heads": 2, "qk_layernorm": True, "multi_query": True}),
    ("mpt", {"num_key_value_heads": 2, "intermediate_size": 99}),
    ("opt", {"num_key_value_heads": 2, "partial_rotary_factor": 0.5}),
    ("gpt_bigcode", {"num_key_value_heads": 4}),
    ("gpt2", {"num_key_value_heads": 2, "intermediate_size": 99, "rms_norm_eps": 1e-6}),
    ("falcon", {"num_key_value_heads": 3}),
])
def test_no_decoy_key_is_reported_as_a_delta(family, decoys):
    config = json.loads(default_config(family))
    config.update(decoys)
    reading = hf_source.read_model(config)
    for key in decoys:
        assert not reading.key_is_read(key), key
    signals = delta_signals.detect(config, None, reading)
    cited = {e.split("=", 1)[0] for s in signals for e in s.evidence if e.startswith("config: ")}
    assert not {f"config: {key}" for key in decoys} & cited, cited
    codes = {s.code for s in signals}
    assert "gqa" not in codes  # kv heads are not num_key_value_heads for any of these families
    if family == "gpt_bigcode":
        assert "mqa" in codes
    # without the reading the old config-only signals fall for the decoy
    if "num_key_value_heads" in decoys and "num_attention_heads" in config and family != "gpt_bigcode":
        assert {"gqa", "mqa"} & {s.code for s in delta_signals.detect(config)}


def test_keys_read_include_shared_modules_and_attribute_map():
    neox = reading_for("gpt_neox")
    assert neox.key_is_read("rotary_pct")  # translated by the config class into rope_parameters
    assert neox.key_is_read("rope_parameters")
    gemma2 = reading_for("gemma2")
    for key in ("sliding_window", "layer_types", "head_dim"):  # masking_utils / modeling_rope_utils readers
        assert gemma2.key_is_read(key), key
    gpt2 = reading_for("gpt2")
    assert gpt2.key_is_read("n_embd") and gpt2.key_is_read("hidden_size")  # attribute_map both ways
    assert any(e.file.endswith("masking_utils.py") for e in gemma2.key_evidence("sliding_window"))


def test_causal_lm_decided_from_config_not_from_class_suffix():
    gpt2 = json.loads(default_config("gpt2")) | {"architectures": ["GPT2LMHeadModel"]}
    assert wall_scan.not_causal_lm(gpt2, "GPT2LMHeadModel", hf_source.read_model(gpt2)) is None
    bert = json.loads(default_config("bert")) | {"architectures": ["BertLMHeadModel"]}
    why = wall_scan.not_causal_lm(bert, "BertLMHeadModel", hf_source.read_model(bert))
    assert why and "is_decoder" in why
    bert_decoder = bert | {"is_decoder": True}
    assert wall_scan.not_causal_lm(bert_decoder, "BertLMHeadModel", hf_source.read_model(bert_decoder)) is None
    t5 = json.loads(default_config("t5")) | {"architectures": ["T5ForConditionalGeneration"]}
    assert "encoder-decoder" in wall_scan.not_causal_lm(t5, "T5ForConditionalGeneration", None)


def test_alibi_applied_by_code_is_a_stop_wall():
    mpt = json.loads(default_config("mpt"))
    mpt["attn_config"] = {"alibi": False}  # the flag says no; the HF code applies ALiBi anyway
    findings = wall_scan.config_walls(mpt, native=False, reading=hf_source.read_model(mpt))
    alibi = [f for f in findings if f.code == "alibi"]
    assert alibi and alibi[0].level == wall_scan.STOP and "whatever the config says" in alibi[0].message
    assert "modeling_mpt.py:" in alibi[0].message
    falcon = json.loads(default_config("falcon"))
    assert not [f for f in wall_scan.config_walls(falcon, False, hf_source.read_model(falcon)) if f.code == "alibi"]


def test_norm_weightless_only_without_norm_tensors():
    """norm_1 / norm_f weights (MPT) are norm tensors: no false layernorm_weightless."""
    from model_source import TensorInfo

    config = json.loads(default_config("mpt"))
    names = ["transformer.blocks.0.norm_1.weight", "transformer.blocks.0.norm_2.weight", "transformer.norm_f.weight"]
    tensors = {n: TensorInfo(n, "F32", (8,), "model.safetensors") for n in names}
    codes = {s.code for s in delta_signals.detect(config, tensors, hf_source.read_model(config))}
    assert "layernorm" in codes and "layernorm_weightless" not in codes


def test_reading_imports_neither_torch_nor_max():
    """Speed is tests/bench_metadata_scripts.py's figure; here only what reading a family imports.

    What the reading finds is checked in-process by the family tests above. In the full CI suite this
    child's read_model has once returned None (undiagnosed, see the closing note); the import check below
    holds either way, so it is the one this test makes.
    """
    code = ("import sys; sys.path.insert(0, %r); import hf_source; "
            "r = hf_source.read_model({'model_type': 'gpt_neox'}); print("
            "'torch' in sys.modules, 'max' in sys.modules, 'transformers' in sys.modules, r is not None)"
            % str(REPO_ROOT / "scripts"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["False", "False", "False"]


def test_unknown_model_type_reads_nothing():
    assert hf_source.read_model({"model_type": "acme_does_not_exist"}) is None
    assert hf_source.read_model({}) is None
    start = time.perf_counter()
    hf_source.read_model({"model_type": "llama"})
    assert time.perf_counter() - start < 1.0


def test_a_top_level_rope_key_the_shared_config_code_moves_is_not_a_decoy():
    """Nemotron reads partial_rotary_factor only from rope_parameters, where the shared RoPE config code puts it."""
    import transformers

    config = transformers.NemotronConfig().to_dict()
    config["architectures"] = ["NemotronForCausalLM"]
    config["partial_rotary_factor"] = 0.5
    reading = hf_source.read_model(config)
    assert reading is not None and reading.key_is_read("partial_rotary_factor")


def test_a_shared_model_folder_reads_the_model_types_own_file():
    """models/data2vec holds _audio, _text and _vision: data2vec-text read the audio file (found by the coverage
    bench: its is_decoder read was missed, so the encoder was not refused)."""
    assert transformers_catalog.model_files("data2vec-text").modeling.name == "modeling_data2vec_text.py"
    assert transformers_catalog.model_files("data2vec-audio").modeling.name == "modeling_data2vec_audio.py"


def test_a_window_used_only_by_flash_attention_is_no_sliding_window_signal():
    """Moshi's attention passes sliding_window only to _flash_attention_forward and its model builds a plain
    causal mask, so the eager/sdpa reference attends to the whole prefix: inspect reported a sliding window
    and the "sliding window removed" mutation could not move (replica failed). Mistral and Qwen2-MoE window
    through a mask function and keep the signal."""
    import delta_signals

    moshi = json.loads(default_config("moshi")) | {"architectures": ["MoshiForCausalLM"]}
    assert reading_for("moshi").window_flash_only
    codes = {s.code for s in delta_signals.detect(moshi, None, hf_source.read_model(moshi))}
    assert moshi["sliding_window"] and "sliding_window" not in codes
    for family in ("mistral", "qwen2_moe"):
        assert not reading_for(family, sliding_window=64).window_flash_only, family
    mistral = json.loads(default_config("mistral")) | {"sliding_window": 64}
    assert "sliding_window" in {s.code for s in delta_signals.detect(mistral, None, hf_source.read_model(mistral))}
