"""Every delta signal inspect reports (config, tensors and HF code) is tied to a sensitivity mutation that moves.

For families built from transformers' default configs, shrunk by tiny: inspect's signals come from
``delta_signals.detect`` with the HF source reading, and each signal that has a tied mutation in
``replica_sensitivity`` must be applicable on the family's replica and move the logits past the
threshold. A signal whose mutation is "not applicable" (the tool missed a feature the model has) or
"did not move" (the replica is blind to it) fails here. CPU only; no MAX.
"""

from __future__ import annotations

import json

import pytest

import delta_signals
import hf_source
import model_source
from bench_family_coverage import default_config
from make_tiny_model import ReplicaOptions, build_replica
from replica_sensitivity import Outcome, sensitivity_report

FAMILIES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "phi": "PhiForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "cohere": "CohereForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "falcon": "FalconForCausalLM",
    # regressions: a shared eager function's softcap and a router class behind enable_moe_block=False were
    # reported as deltas (Gemma 4); is_moe=False (Doge) and one expert (HunYuan-MoE) route nothing
    "gemma4_text": "Gemma4ForCausalLM",
    "doge": "DogeForCausalLM",
    "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
    # latent attention: the RoPE style mutation reorders each query head's RoPE rows and the shared RoPE key
    "deepseek_v3": "DeepseekV3ForCausalLM",
    # the router is a bare Linear; the experts score its logits in route_tokens_to_experts (was a tool error)
    "aria_text": "AriaTextForCausalLM",
    # the router weight is read with F.linear (the gate module never runs) and the logits are [batch, seq, E]
    "deepseek_v2": "DeepseekV2ForCausalLM",
    # DeepSeek-V3.2 spells the expert count twice (the router reads n_routed_experts); its indexer's k_norm is
    # no QK-norm delta
    "deepseek_v32": "DeepseekV32ForCausalLM",
    # session 6 (each a tool error before): DBRX's norms sit in its norm_attn_norm wrapper and its routing is
    # top-1 renormalized; JetMoE's queries are stacked attention experts; LongCat-Flash's router returns only
    # (weights, indices), its top-1 cannot run and its MoE is a shortcut beside the later sublayers;
    # GLM-4-MoE-Lite's head_dim is an alias of qk_rope_head_dim and its shrunk expert width was 34
    "dbrx": "DbrxForCausalLM",
    "jetmoe": "JetMoeForCausalLM",
    "longcat_flash": "LongcatFlashForCausalLM",
    "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_reported_signal_has_a_mutation_that_moves(tmp_path, model_type):
    replica = tmp_path / model_type
    config, _ = default_config(model_type, FAMILIES[model_type])  # (config, the REPAIRS entry applied)
    build_replica(config, replica, ReplicaOptions())
    config = json.loads((replica / "config.json").read_text())
    tensors = model_source.read_tensor_infos(model_source.resolve(str(replica)))
    codes = {str(s.code) for s in delta_signals.detect(config, tensors, hf_source.read_model(config))}
    report = sensitivity_report(replica, raise_on_tool_error=False)
    tied: dict[str, list] = {}
    for row in report.mutations:
        if row.code:
            tied.setdefault(str(row.code), []).append(row)
    checked = sorted(codes & tied.keys())
    assert checked, f"no reported signal of {model_type} has a tied mutation: the test would prove nothing"
    unmoved = {code: [(r.name, r.outcome.value, r.reason) for r in tied[code]] for code in checked
               if not any(r.outcome is Outcome.MOVED for r in tied[code])}
    assert unmoved == {}, f"{model_type}: signals {codes}; tied mutations that did not move: {unmoved}"


@pytest.mark.parametrize("model_type", ["deepseek_v3", "youtu"])
def test_rope_style_moves_on_latent_attention(tmp_path, model_type):
    """Latent attention has no key projection of its own: the RoPE rows are the query heads' last
    rope_head_dim rows and kv_a's shared RoPE key (it was a tool error)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    replica = tmp_path / model_type
    config, _ = default_config(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    build_replica(config, replica, ReplicaOptions())
    rows = {r.name: r for r in sensitivity_report(replica, raise_on_tool_error=False).mutations}
    assert rows["RoPE style"].outcome is Outcome.MOVED, rows["RoPE style"].reason


def test_a_vision_or_audio_tower_q_proj_is_no_head_dim_signal():
    """Phi-4-multimodal: the first q_proj tensor by name is its audio encoder's (1024 rows), which was
    reported as head_dim_override for a decoder whose fused qkv_proj has hidden = heads x head_dim."""
    config = {"model_type": "phi4_multimodal", "hidden_size": 128, "num_attention_heads": 8,
              "num_key_value_heads": 2}
    info = model_source.TensorInfo
    tensors = {n: info(n, "F32", shape, "model.safetensors") for n, shape in (
        ("model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.q_proj.weight", (1024, 1024)),
        ("model.layers.0.self_attn.qkv_proj.weight", (192, 128)))}
    assert "head_dim_override" not in {s.code for s in delta_signals.detect(config, tensors)}
    decoder = {"model.layers.0.self_attn.q_proj.weight": info("model.layers.0.self_attn.q_proj.weight", "F32",
                                                               (256, 128), "model.safetensors")}
    assert "head_dim_override" in {s.code for s in delta_signals.detect(config, decoder)}
