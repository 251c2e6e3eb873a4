"""model_anatomy: the config view (every alias, with its source key) and the layout resolver over shrunk models."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

import hf_reference
import model_anatomy
import model_source
from model_anatomy import ALIASES, AnatomyError, ConfigView, config_view

# --- (a) the config view ---------------------------------------------------------------


def test_gpt2_style_names_are_read_and_cited():
    view = config_view({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_inner": None,
                        "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"})
    assert (view.hidden_size, view.num_heads, view.num_layers, view.max_positions) == (768, 12, 12, 1024)
    assert (view.key("hidden_size"), view.key("num_heads"), view.key("num_layers")) == ("n_embd", "n_head", "n_layer")
    assert view.intermediate_size == 3072 and view.key("intermediate_size") is None
    assert "4 x hidden_size" in view.source("intermediate_size").note
    assert view.num_kv_heads == 12 and view.head_dim == 64 and not view.head_dim_explicit
    assert (view.norm_eps, view.key("norm_eps")) == (1e-5, "layer_norm_epsilon")
    assert (view.activation, view.key("activation")) == ("gelu_new", "activation_function")
    assert view.rope is None and view.rope_layers == (False,) * 12


@pytest.mark.parametrize(("key", "value"), [("norm_epsilon", 1e-5), ("norm_eps", 1e-6), ("rms_norm_eps", 1e-6),
                                            ("layer_norm_eps", 1e-5), ("layer_norm_epsilon", 1e-5)])
def test_every_norm_eps_spelling_is_found(key, value):
    view = config_view({"hidden_size": 64, key: value})
    assert (view.norm_eps, view.key("norm_eps")) == (value, key)


@pytest.mark.parametrize("key", ["hidden_act", "hidden_activation", "activation", "activation_function"])
def test_every_activation_spelling_is_found(key):
    view = config_view({key: "gelu"})
    assert (view.activation, view.key("activation")) == ("gelu", key)


def test_explicit_head_dim_is_kept_and_flagged():
    view = config_view({"hidden_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128})
    assert view.head_dim == 128 and view.head_dim_explicit and view.head_dim_differs
    assert view.key("head_dim") == "head_dim"
    derived = config_view({"hidden_size": 2048, "num_attention_heads": 8})
    assert derived.head_dim == 256 and not derived.head_dim_differs and derived.key("head_dim") is None


def test_kv_heads_multi_query_and_falcon_rules():
    bigcode = config_view({"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "multi_query": True})
    assert bigcode.num_kv_heads == 1 and bigcode.key("num_kv_heads") == "multi_query"
    # Falcon: num_kv_heads is ignored unless new_decoder_architecture; multi_query means one kv head.
    falcon_7b = config_view({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4,
                             "num_kv_heads": 4, "multi_query": True, "new_decoder_architecture": False})
    assert falcon_7b.num_kv_heads == 1
    falcon_40b = config_view({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4,
                              "num_kv_heads": 2, "multi_query": True, "new_decoder_architecture": True})
    assert falcon_40b.num_kv_heads == 2 and falcon_40b.key("num_kv_heads") == "num_kv_heads"
    assert falcon_40b.parallel_block
    assert config_view({"num_attention_heads": 8}).num_kv_heads == 8


def test_nested_keys_text_config_and_editing():
    mpt = config_view({"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 4,
                       "no_bias": True, "attn_config": {"qk_ln": True, "alibi": True}})
    assert mpt.intermediate_size == 256 and "expansion_ratio" in mpt.source("intermediate_size").note
    assert mpt.attention_bias is False and mpt.key("attention_bias") == "no_bias"
    assert mpt.qk_norm is True and mpt.key("qk_norm") == "attn_config.qk_ln" and mpt.alibi
    config = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "rms_norm_eps": 1e-6, "head_dim": 32}}
    view = config_view(config)
    assert view.text_prefix == "text_config." and view.key("norm_eps") == "text_config.rms_norm_eps"
    model_anatomy.set_config_value(config, view.key("norm_eps"), 1e-2)
    assert config_view(config).norm_eps == 1e-2
    assert model_anatomy.get_config_value(config, "text_config.head_dim") == 32


def test_rotary_fraction_and_dim():
    neox = config_view({"hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.25, "rope_theta": 1e4})
    assert (neox.rotary_fraction, neox.rotary_dim, neox.key("rotary_fraction")) == (0.25, 4, "rotary_pct")
    gptj = config_view({"n_embd": 64, "n_head": 2, "rotary_dim": 8})
    assert (gptj.rotary_dim, gptj.rotary_fraction) == (8, 0.25) and gptj.rope_layers == ()  # no layer count
    phi = config_view({"hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
                       "rope_theta": 1e4, "num_hidden_layers": 2})
    assert (phi.rotary_dim, phi.rope.partial_rotary_factor, phi.rope_layers) == (8, 0.5, (True, True))
    nested = config_view({"hidden_size": 64, "num_attention_heads": 4,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    assert nested.rotary_dim == 8 and nested.key("rope") == "rope_parameters"
    assert nested.key("rotary_fraction") == "rope_parameters.partial_rotary_factor"  # editable in place
    assert nested.key("rope_theta") == "rope_parameters.rope_theta"


def test_layer_types_windows_and_rope_layers():
    qwen2 = config_view({"num_hidden_layers": 4, "sliding_window": 64, "use_sliding_window": True,
                         "max_window_layers": 2})
    assert qwen2.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    off = config_view({"num_hidden_layers": 2, "sliding_window": 64, "use_sliding_window": False})
    assert off.layer_types == ("full_attention",) * 2
    mistral = config_view({"num_hidden_layers": 2, "sliding_window": 64})
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.sliding_window == 64
    gemma3_old = config_view({"num_hidden_layers": 6, "sliding_window": 8, "sliding_window_pattern": 3})
    assert gemma3_old.layer_types.count("full_attention") == 2 and gemma3_old.layer_types[2] == "full_attention"
    explicit = config_view({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]})
    assert explicit.layer_types == ("sliding_attention", "full_attention") and explicit.key("layer_types") == "layer_types"
    gpt_neo = config_view({"num_layers": 4, "attention_types": [[["global", "local"], 2]], "window_size": 16})
    assert gpt_neo.layer_types == ("full_attention", "sliding_attention") * 2 and gpt_neo.sliding_window == 16
    smollm3 = config_view({"num_hidden_layers": 4, "rope_theta": 1e4, "no_rope_layers": [1, 1, 1, 0]})
    assert smollm3.rope_layers == (True, True, True, False)
    interval = config_view({"num_hidden_layers": 4, "rope_theta": 1e4, "no_rope_layer_interval": 2})
    assert interval.rope_layers == (True, False, True, False)


def test_experts_topk_shared_and_moe_layers():
    qwen2_moe = config_view({"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
                             "shared_expert_intermediate_size": 64, "moe_intermediate_size": 16,
                             "decoder_sparse_step": 2, "mlp_only_layers": [3], "norm_topk_prob": False})
    assert (qwen2_moe.num_experts, qwen2_moe.experts_per_token, qwen2_moe.norm_topk_prob) == (8, 2, False)
    assert qwen2_moe.moe_layers == (1,) and qwen2_moe.is_moe
    assert qwen2_moe.shared_expert_intermediate_size == 64 and qwen2_moe.expert_intermediate_size == 16
    mixtral = config_view({"num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2})
    assert mixtral.moe_layers == (0, 1) and mixtral.key("num_experts") == "num_local_experts"
    deepseek = config_view({"num_hidden_layers": 4, "n_routed_experts": 8, "n_shared_experts": 1,
                            "first_k_dense_replace": 1, "moe_layer_freq": 1, "scoring_func": "sigmoid",
                            "num_experts_per_tok": 2})
    assert deepseek.moe_layers == (1, 2, 3) and deepseek.router_scoring == "sigmoid"
    assert deepseek.num_shared_experts == 1
    dbrx = config_view({"n_layers": 2, "ffn_config": {"moe_num_experts": 4, "moe_top_k": 1}})
    assert (dbrx.num_experts, dbrx.experts_per_token, dbrx.key("num_experts")) == (4, 1, "ffn_config.moe_num_experts")
    assert not config_view({"num_hidden_layers": 2}).is_moe


def test_parallel_blocks_by_flag_and_by_construction():
    assert config_view({"model_type": "gpt_neox", "use_parallel_residual": True}).parallel_block
    assert not config_view({"model_type": "gpt_neox", "use_parallel_residual": False}).parallel_block
    for family in ("gptj", "cohere", "phi", "codegen"):
        view = config_view({"model_type": family})
        assert view.parallel_block and view.key("parallel_block") is None, family
        assert "by construction" in view.source("parallel_block").note


def test_integral_floats_and_nulls():
    view = config_view({"num_hidden_layers": 2.0, "hidden_size": 64.0, "head_dim": None, "rope_theta": None})
    assert view.num_layers == 2 and isinstance(view.num_layers, int) and view.hidden_size == 64
    with pytest.raises(model_anatomy.ScriptError, match="rope_theta"):
        config_view({"rope_theta": "1e4"})
    with pytest.raises(model_anatomy.ScriptError, match="expected a JSON object"):
        config_view(["not", "a", "config"])  # type: ignore[arg-type]


def test_normalize_config_is_the_view():
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "torch_dtype": "bfloat16",
              "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    view, normalized = config_view(config), model_source.normalize_config(config)
    assert (normalized.rope, normalized.rope_by_layer_type, normalized.dtype, normalized.spelling) == (
        view.rope, view.rope_by_layer_type, view.dtype, view.spelling)
    assert model_source.RopeSettings is model_anatomy.RopeSettings


# Canonical transformers attribute names and the view field that reads them.
ATTRIBUTE_FIELDS = {"hidden_size": "hidden_size", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                    "num_key_value_heads": "num_kv_heads", "max_position_embeddings": "max_positions",
                    "num_local_experts": "num_experts", "num_experts": "num_experts",
                    "num_experts_per_tok": "experts_per_token", "layer_types": "layer_types"}
# attribute_map targets that are not a spelling of the field in a decoder config: encoder-side names of
# encoder-decoder models, MHA families mapping kv heads onto the query heads, and audio/vision names.
NOT_DECODER_SPELLINGS = {"encoder_attention_heads", "num_encoder_attention_heads", "encoder_num_attention_heads",
                         "encoder_layers", "num_attention_heads", "mask_feature_size", "moe_intermediate_size",
                         "layers"}


def test_alias_table_covers_transformers_attribute_maps():
    """Every spelling transformers' config classes map onto a field the view reads is in ALIASES."""
    from transformers import CONFIG_MAPPING

    missing = set()
    for model_type in CONFIG_MAPPING.keys():
        try:
            attribute_map = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}
        except Exception:  # noqa: BLE001 - a config class that needs a package not installed
            continue
        for canonical, spelled in attribute_map.items():
            name = ATTRIBUTE_FIELDS.get(canonical)
            if name and spelled not in ALIASES[name] and spelled not in NOT_DECODER_SPELLINGS:
                missing.add((model_type, canonical, spelled))
    assert not missing, sorted(missing)


def test_view_of_every_shipped_default_config_agrees_with_transformers():
    """For default configs of decoder families, heads / kv heads / layers match the config object's attributes."""

    for family in ("llama", "gpt2", "gpt_neox", "gptj", "falcon", "opt", "bloom", "mpt", "phi", "starcoder2",
                   "cohere", "olmoe", "qwen2_moe", "gemma2", "gpt_bigcode", "mixtral", "stablelm", "phi3"):
        config = hf_reference.config_for_model(family)
        view = config_view(config.to_dict())
        assert view.hidden_size == config.hidden_size, family
        assert view.num_heads == config.num_attention_heads, family
        assert view.num_layers == config.num_hidden_layers, family
        assert isinstance(view, ConfigView)


# --- (b) the layout resolver, on models built from shrunk transformers default configs ---------------

SHRUNK_SIZES = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "vocab_size": 256,
                "max_positions": 128, "num_experts": 4, "experts_per_token": 2, "expert_intermediate_size": 32,
                "shared_expert_intermediate_size": 64, "sliding_window": 8}
SHRUNK_HEAD_DIM = 16  # an explicit head_dim is kept explicit, at 4 heads x 16 = hidden 64
SHRUNK_ROTARY_DIM = 8
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def shrunk_model(model_type: str, **overrides):
    """A randomly initialized model of ``model_type`` from its default config, shrunk through the view's own keys."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_reference.config_for_model(model_type).to_dict()
    view = config_view(config)
    for name, value in SHRUNK_SIZES.items():
        if view.key(name):  # every spelling present (DeepSeek-V3.2 lists num_experts and n_routed_experts)
            for key in {view.key(name), *(k for k in ALIASES[name] if k in config and "." not in k)}:
                model_anatomy.set_config_value(config, key, value)
    if view.key("num_kv_heads") and view.num_heads and view.num_kv_heads:  # keep the kv-head ratio
        ratio = view.num_heads // view.num_kv_heads
        if view.key("num_kv_heads") != "multi_query":
            model_anatomy.set_config_value(config, view.key("num_kv_heads"),
                                           max(1, SHRUNK_SIZES["num_heads"] // ratio))
    if view.head_dim_explicit:
        model_anatomy.set_config_value(config, view.key("head_dim"), SHRUNK_HEAD_DIM)
    if view.key("rotary_dim"):
        model_anatomy.set_config_value(config, view.key("rotary_dim"), SHRUNK_ROTARY_DIM)
    if view.key("layer_types"):
        kinds = sorted(set(view.layer_types))
        config[view.key("layer_types")] = (kinds * SHRUNK_SIZES["num_layers"])[:SHRUNK_SIZES["num_layers"]]
    for key in ("moe_layers", "mlp_only_layers", "no_rope_layers"):
        config.pop(key, None)
    layers = view.num_layers
    for key, value in list(config.items()):  # other per-layer lists (mlp_layer_types, attention_layers, ...)
        if key == view.key("layer_types") or not isinstance(value, list) or not layers or len(value) != layers:
            continue
        if "heads" in key:  # Laguna's num_attention_heads_per_layer
            config[key] = [SHRUNK_SIZES["num_heads"]] * SHRUNK_SIZES["num_layers"]
        else:
            kinds = sorted(set(map(str, value)), key=lambda kind: value.index(kind) if kind in value else 0)
            config[key] = (kinds * SHRUNK_SIZES["num_layers"])[:SHRUNK_SIZES["num_layers"]]
    if "word_embed_proj_dim" in config:  # OPT: the embedding width, kept equal to hidden unless overridden
        config["word_embed_proj_dim"] = SHRUNK_SIZES["hidden_size"]
    for key in TOKEN_ID_KEYS:
        if isinstance(config.get(key), int) and config[key] >= SHRUNK_SIZES["vocab_size"]:
            config[key] = 0
    config.update(overrides)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_reference.config_for_model(model_type, **fields))


# family: (blocks, qkv kind, weight storage, output projection, MLP output module, block norm roles,
#          parallel, position embedding, final norm)
LAYOUTS = {
    "llama": ("model.layers", "separate", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None, "model.norm"),
    "gpt_neox": ("gpt_neox.layers", "fused_per_head", "linear", "dense", "mlp", ("input", "pre_mlp"), True, None,
                 "gpt_neox.final_layer_norm"),
    "phi": ("model.layers", "separate", "linear", "dense", "mlp", ("shared",), True, None, "model.final_layernorm"),
    "starcoder2": ("model.layers", "separate", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None,
                   "model.norm"),
    "cohere": ("model.layers", "separate", "linear", "o_proj", "mlp", ("shared",), True, None, "model.norm"),
    "olmoe": ("model.layers", "separate", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None, "model.norm"),
    "gpt2": ("transformer.h", "fused", "conv1d", "c_proj", "mlp", ("input", "pre_mlp"), False, "transformer.wpe",
             "transformer.ln_f"),
    "gpt_bigcode": ("transformer.h", "fused_multi_query", "linear", "c_proj", "mlp", ("input", "pre_mlp"), False,
                    "transformer.wpe", "transformer.ln_f"),
    "falcon": ("transformer.h", "fused_multi_query", "linear", "dense", "mlp", ("shared",), True, None,
               "transformer.ln_f"),
    "opt": ("model.decoder.layers", "separate", "linear", "out_proj", "fc2", ("input", "pre_mlp"), False,
            "model.decoder.embed_positions", "model.decoder.final_layer_norm"),
    "qwen2_moe": ("model.layers", "separate", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None,
                  "model.norm"),
    "gemma2": ("model.layers", "separate", "linear", "o_proj", "mlp",
               ("input", "attention_output", "pre_mlp", "mlp_output"), False, None, "model.norm"),
    "cohere2": ("model.layers", "separate", "linear", "o_proj", "mlp", ("shared",), True, None, "model.norm"),
    "gptj": ("transformer.h", "separate", "linear", "out_proj", "mlp", ("shared",), True, None, "transformer.ln_f"),
    "bloom": ("transformer.h", "fused_per_head", "linear", "dense", "mlp", ("input", "pre_mlp"), False, None,
              "transformer.ln_f"),
    "mpt": ("transformer.blocks", "fused", "linear", "out_proj", "ffn", ("input", "pre_mlp"), False, None,
            "transformer.norm_f"),
    "mixtral": ("model.layers", "separate", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None, "model.norm"),
    "phi3": ("model.layers", "fused", "linear", "o_proj", "mlp", ("input", "pre_mlp"), False, None, "model.norm"),
}


@pytest.fixture(scope="module")
def models():
    return {family: shrunk_model(family) for family in LAYOUTS}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_resolver_finds_every_part(models, family):
    blocks, kind, storage, out_name, ffn_name, roles, parallel, position, final = LAYOUTS[family]
    model = models[family]
    layout = model_anatomy.resolve_layout(model)
    assert layout.blocks_path == blocks and len(layout.blocks) == 2
    assert layout.final_norm == final and layout.position_embedding == position
    block = layout.blocks[1]
    attention = block.attention
    assert attention.qkv_kind.value == kind
    assert attention.query_projection.storage.value == storage
    assert attention.o.path.rsplit(".", 1)[1] == out_name
    assert block.mlp_output_path.rsplit(".", 1)[1] == ffn_name
    assert tuple(n.role.value for n in block.norms) == roles
    assert block.parallel is parallel
    # Every path names a real module, and the LM head is the model's output embedding.
    for path in (layout.token_embedding, layout.lm_head, block.path, attention.path, attention.o.path,
                 block.mlp_output_path, *(n.path for n in block.norms)):
        model.get_submodule(path)
    assert model.get_submodule(layout.lm_head) is model.get_output_embeddings()
    # Head counts come from the weight shapes and agree with the modeling code.
    widths = [attention.qkv] if attention.qkv else [attention.q, attention.k, attention.v]
    assert len(attention.query_rows()) + 2 * len(attention.key_rows()) == sum(p.out_features for p in widths)
    module = model.get_submodule(attention.path)
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int):
        assert attention.num_heads // attention.num_kv_heads == groups


def test_moe_router_experts_shared_expert_and_gate(models):
    qwen = model_anatomy.resolve_layout(models["qwen2_moe"]).blocks[0].moe
    assert qwen is not None and qwen.num_experts == 4 and qwen.experts_fused
    assert qwen.router.endswith("mlp.gate") and qwen.experts.endswith("mlp.experts")
    assert qwen.shared_expert is not None and qwen.shared_expert.gated
    assert qwen.shared_expert_gate.endswith("mlp.shared_expert_gate")
    olmoe = model_anatomy.resolve_layout(models["olmoe"]).blocks[0]
    assert olmoe.moe is not None and olmoe.moe.shared_expert is None and olmoe.mlp is None
    assert olmoe.attention.q_norm.endswith("q_norm") and olmoe.attention.k_norm.endswith("k_norm")
    mixtral = model_anatomy.resolve_layout(models["mixtral"]).blocks[0].moe
    assert mixtral.shared_expert_gate is None and mixtral.num_experts == 4


def test_learned_positions_with_offset_and_embedding_norm(models):
    opt = model_anatomy.resolve_layout(models["opt"])
    assert opt.position_embedding == "model.decoder.embed_positions" and opt.position_offset == 2
    assert opt.blocks[0].mlp.path == opt.blocks[0].path  # fc1/fc2 sit on the block: the stage is fc2
    gpt2 = model_anatomy.resolve_layout(models["gpt2"])
    assert gpt2.position_offset == 0 and gpt2.tied and gpt2.first_norm == "transformer.h.0.ln_1"
    bloom = model_anatomy.resolve_layout(models["bloom"])
    assert bloom.embedding_norm == "transformer.word_embeddings_layernorm" and bloom.first_norm == bloom.embedding_norm


def test_opt_width_projections_and_post_ln_norms():
    layout = model_anatomy.resolve_layout(shrunk_model("opt", word_embed_proj_dim=32))
    assert layout.project_in == "model.decoder.project_in" and layout.project_out == "model.decoder.project_out"
    post_ln = model_anatomy.resolve_layout(shrunk_model("opt", do_layer_norm_before=False))  # OPT-350m
    assert post_ln.final_norm is None and post_ln.first_norm is None
    assert [n.role.value for n in post_ln.blocks[0].norms] == ["attention_residual", "mlp_residual"]


def test_git_bert_style_post_ln_blocks_beside_the_embeddings():
    """GIT's text decoder is a BERT stack: git.encoder.layer sits alone in an encoder wrapper beside
    git.embeddings (word, learned positions, LayerNorm), the attention output projection is the sibling
    attention.output.dense and each LayerNorm normalizes a residual sum; the image encoder is not run on
    text alone. Was: "cannot resolve the attention output projection of ...attention.self"."""
    import torch

    config = hf_reference.config_for_model("git", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, vocab_size=256, max_position_embeddings=64,
                                           vision_config={"hidden_size": 32, "intermediate_size": 64,
                                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                                          "image_size": 32, "patch_size": 16})
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    layout = model_anatomy.resolve_layout(AutoModelForCausalLM.from_config(config))
    block = layout.blocks[0]
    assert layout.decoder == "git" and layout.blocks_path == "git.encoder.layer"
    assert layout.position_embedding == "git.embeddings.position_embeddings"
    assert layout.embedding_norm == layout.first_norm == "git.embeddings.LayerNorm" and layout.final_norm is None
    assert block.attention.path == "git.encoder.layer.0.attention.self"
    assert block.attention.o.path == "git.encoder.layer.0.attention.output.dense"
    assert (block.mlp.up.path, block.mlp.down.path) == ("git.encoder.layer.0.intermediate.dense",
                                                        "git.encoder.layer.0.output.dense")
    assert block.mlp_output_path == "git.encoder.layer.0.output.dense" and not block.parallel
    assert [(n.path.rpartition("layer.0.")[2], n.role.value) for n in block.norms] == [
        ("attention.output.LayerNorm", "attention_residual"), ("output.LayerNorm", "mlp_residual")]


def test_per_layer_sliding_and_global_pattern(models):
    view = config_view(models["gemma2"].config.to_dict())
    assert set(view.layer_types) == {"sliding_attention", "full_attention"}
    assert view.sliding_window == SHRUNK_SIZES["sliding_window"]
    cohere2 = config_view(models["cohere2"].config.to_dict())
    assert len(set(cohere2.layer_types)) == 2


def test_explicit_head_dim_survives_the_view_and_the_resolver():
    model = shrunk_model("qwen3", head_dim=32)  # 4 heads x 32 != hidden 64
    layout = model_anatomy.resolve_layout(model)
    attention = layout.blocks[0].attention
    assert attention.head_dim == 32 and attention.q.out_features == 128 and attention.o.in_features == 128
    assert config_view(model.config.to_dict()).head_dim_differs


def _rows_of(tensor):
    return [int(v) for v in tensor.flatten().tolist()]


def test_fused_rows_match_the_modeling_code_split():
    """query_rows / key_rows select what Falcon's and Bloom's own split functions return as q and k."""
    import torch

    for family, overrides in (("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
                              ("falcon", {"multi_query": False, "new_decoder_architecture": False}),
                              ("falcon", {}), ("bloom", {})):
        model = shrunk_model(family, **overrides)
        attention = model_anatomy.resolve_layout(model).blocks[0].attention
        module = model.get_submodule(attention.path)
        width = attention.qkv.out_features
        index = torch.arange(width, dtype=torch.float32).view(1, 1, width)
        split = module._split_heads if hasattr(module, "_split_heads") else module._reshape
        query, key, _ = split(index)
        # q: [..., heads, head_dim] in head order, whatever the layout of the batch/sequence axes.
        assert sorted(_rows_of(query)) == sorted(attention.query_rows()), (family, overrides)
        assert sorted(set(_rows_of(key))) == sorted(attention.key_rows()), (family, overrides)


def test_gpt_neox_per_head_rows_match_its_view():
    import torch

    model = shrunk_model("gpt_neox")
    attention = model_anatomy.resolve_layout(model).blocks[0].attention
    width = attention.qkv.out_features
    fused = torch.arange(width).view(1, 1, width)
    # GPTNeoXAttention: view(..., heads, 3 x head_dim) then chunk(3) gives q, k, v per head.
    per_head = fused.view(1, 1, attention.num_heads, 3 * attention.head_dim)
    query, key, _ = per_head.chunk(3, dim=-1)
    assert _rows_of(query) == attention.query_rows() and _rows_of(key) == attention.key_rows()


def test_unresolvable_parts_raise_named_errors():
    import torch

    model = shrunk_model("gpt_neox")
    attention = model.gpt_neox.layers[0].attention
    dense = attention.dense
    del attention.dense
    with pytest.raises(AnatomyError, match=r"cannot resolve the attention output projection of "
                                           r"gpt_neox\.layers\.0\.attention"):
        model_anatomy.resolve_layout(model)
    attention.add_module("mystery_proj", dense)
    with pytest.raises(AnatomyError, match=r"projection gpt_neox\.layers\.0\.attention\.mystery_proj"):
        model_anatomy.resolve_layout(model)
    del attention.mystery_proj
    attention.dense = dense
    unknown = config_view({**model.config.to_dict(), "model_type": "not_a_family"})
    with pytest.raises(AnatomyError, match="fused q/k/v layout of .*query_key_value.*FUSED_QKV_LAYOUTS"):
        model_anatomy.resolve_layout(model, unknown)
    model.gpt_neox.layers[0].add_module("mystery_norm", torch.nn.LayerNorm(64))
    with pytest.raises(AnatomyError, match=r"role of the norm gpt_neox\.layers\.0\.mystery_norm"):
        model_anatomy.resolve_layout(model)
    assert issubclass(AnatomyError, model_anatomy.ScriptError)  # scripts exit 3 with the message


# --- replica_init calibration reads the model through the layout (issue 14) -------------------------------

CALIBRATION_IDS_LENGTH = 24
MIN_TOKEN_EFFECT = 0.5  # relative logit change when every token changes; the old init gave 0.000 on GPT-2


def _calibration_ids(seed: int):
    import torch

    return torch.randint(0, SHRUNK_SIZES["vocab_size"], (1, CALIBRATION_IDS_LENGTH),
                         generator=torch.Generator().manual_seed(seed))


def _peaked(family: str, **overrides):
    import replica_init

    model = shrunk_model(family, **overrides).eval()
    settings = replica_init.initialize(model, model.config, replica_init.InitOptions(), _calibration_ids(1))
    return model, settings


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_bigcode", "openai-gpt"])
def test_learned_positions_do_not_drive_the_tokens_to_zero(family):
    """Regression: the embedding loop scaled GPT-2's token embedding by 8.7e-6 (tokens no longer mattered);
    OpenAI GPT's post-LN ln_1 also reads the attention's biases, and its embeddings went to 3e-6."""
    import torch

    model, settings = _peaked(family)
    step = settings["calibration"]["embedding"]
    assert step["status"] == "applied" and "," in step["module"]  # token and position tables, one factor
    assert settings["embedding_scale"] > 1e-3
    with torch.no_grad():
        first, second = model(input_ids=_calibration_ids(1)).logits, model(input_ids=_calibration_ids(2)).logits
    assert float((first - second).norm() / first.norm()) > MIN_TOKEN_EFFECT


def test_final_logit_calibration_applies_on_gpt_neox():
    """Regression: final_norm_scale was None for GPT-NeoX (final_layer_norm was not found)."""
    _, settings = _peaked("gpt_neox")
    step = settings["calibration"]["final_logits"]
    assert step["status"] == "applied" and step["module"] == "gpt_neox.final_layer_norm"
    assert settings["final_norm_scale"] is not None and settings["final_norm_scale"] != 1.0
    assert settings["calibration"]["attention_softcap"]["status"] == "not applicable"
    assert "no attention softcap" in settings["calibration"]["attention_softcap"]["reason"]


def test_logit_calibration_without_a_final_norm_uses_an_untied_head_or_refuses():
    import replica_init

    _, untied = _peaked("opt", do_layer_norm_before=False, tie_word_embeddings=False)
    assert untied["calibration"]["final_logits"]["module"] == "lm_head"
    # tied and post-LN: the last block's residual norm is what feeds the head (OpenAI GPT's layout too)
    _, tied = _peaked("opt", do_layer_norm_before=False, tie_word_embeddings=True)
    assert tied["calibration"]["final_logits"]["module"].endswith("layers.1.final_layer_norm")
    with pytest.raises(model_anatomy.ScriptError, match="calibration step final_logits cannot apply"):
        replica_init._logit_scale_target(None, SimpleNamespace(  # no norm anywhere, tied head: nothing to scale
            final_norm=None, project_out=None, tied=True, blocks=(), lm_head="lm_head", model_class="Bare"))
    assert replica_init.StepStatus.APPLIED.value == "applied"


def test_logit_calibration_scales_the_prediction_head_norm():
    """Regression: ModernBERT-decoder's final norm was scaled, which moved the head GELU's input and left the
    replica blind to exact vs tanh GELU; the head's own norm (the one feeding the LM head) sets the scale."""
    model, settings = _peaked("modernbert-decoder")
    step = settings["calibration"]["final_logits"]
    transform = model_anatomy.resolve_layout(model).head_transform
    assert transform is not None and step["module"] == transform.norm and step["kind"] == "head_transform_norm"


@pytest.mark.parametrize(("family", "overrides"), [("gpt2", {}), ("gpt_neox", {}),
                                                   ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2})])
def test_attention_softcap_calibration_on_fused_layouts(family, overrides):
    """The softcap step scales the query rows of fused and Conv1D projections until scores reach the cap."""
    import torch

    import replica_init

    cap = 20.0
    model = shrunk_model(family, **overrides).eval()
    layout = model_anatomy.resolve_layout(model)
    view = config_view({**model.config.to_dict(), "attn_logit_softcapping": cap})
    replica_init._draw_weights(model, replica_init.InitOptions())
    ids = _calibration_ids(3)
    with torch.no_grad():
        step = replica_init._calibrate_attention_softcap(model, layout, view, ids)
        assert step["status"] == "applied" and step["scale"] != 1.0
        # After calibration the measured mean score is near the cap.
        attention = layout.blocks[0].attention
        module = model.get_submodule(attention.path)
        captured = []
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: captured.append(replica_init._scores_of(
                m, attention, kwargs.get("hidden_states", args[0] if args else None),
                attention.head_dim ** -0.5)), with_kwargs=True)
        model(input_ids=ids)
        handle.remove()
    assert captured and cap / 3 < captured[0] < cap * 3


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "persimmon", "stablelm", "qwen3_moe", "biogpt",
                                    "llama4_text", "granitemoe", "apertus", "smollm3"])
def test_more_families_resolve(family):
    layout = model_anatomy.resolve_layout(shrunk_model(family))
    block = layout.blocks[-1]
    assert block.attention.o is not None and block.mlp_output_path and block.norms


@pytest.mark.parametrize(("family", "part"), [
    # its hyper-connection streams are recorded now; its attention (low-rank q, one shared kv projection,
    # grouped low-rank output, sinks, compressors) is not a layout the resolver describes
    ("deepseek_v4", "projection model.layers.0.self_attn.q_a_proj of model.layers.0.self_attn"),
])
def test_layouts_the_resolver_does_not_describe_are_named(family, part):
    with pytest.raises(AnatomyError, match=re.escape(f"cannot resolve the {part}")):
        model_anatomy.resolve_layout(shrunk_model(family))


def _gemma3n_text_model(**edits):
    """Gemma 3n's text model from its default config shrunk as ``tiny`` shrinks it (never full size)."""
    import torch
    import transformers

    import tiny_config

    source = hf_reference.config_for_model("gemma3n_text").to_dict()
    shrunk = tiny_config.shrink_config(source, tiny_config.ShrinkOptions(keep_small_source=False),
                                       vocab_size=SHRUNK_SIZES["vocab_size"], layer_types=source["layer_types"]).config
    fields = {k: v for k, v in {**shrunk, **edits}.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    return transformers.Gemma3nForCausalLM(transformers.AutoConfig.for_model("gemma3n_text", **fields))


def test_several_residual_streams_are_recorded_by_role():
    """Gemma 3n's AltUp keeps 4 residual streams: the resolver records the parts that make, mix and fold
    them (was: "cannot resolve the part model.altup_projections ... it is not an embedding, norm, block list
    or width projection"), and a step needing the one residual stream gets a reason naming them."""
    model = _gemma3n_text_model()
    layout = model_anatomy.resolve_layout(model)
    roles = {part.path: part.role for part in layout.stream_parts}
    assert layout.residual_streams == model.config.altup_num_inputs == 4
    assert roles["model.altup_projections"] is model_anatomy.StreamRole.EXPAND
    assert roles["model.altup_unembed_projections"] is model_anatomy.StreamRole.COLLAPSE
    assert all(roles[f"{block.path}.altup"] is model_anatomy.StreamRole.MIX for block in layout.blocks)
    assert layout.final_norm == "model.norm" and layout.per_layer_inputs is not None
    why = layout.single_stream_refusal()
    assert why and "keeps 4 residual streams" in why and "model.altup_projections (expand)" in why
    plain = model_anatomy.resolve_layout(shrunk_model("llama"))
    assert plain.residual_streams == 1 and plain.stream_parts == () and plain.single_stream_refusal() is None


def test_kv_sharing_layers_read_their_source_layers_keys():
    """Gemma 3n's KV-sharing layers have q and o only (was: "cannot resolve the attention key projection of
    model.layers.4.self_attn"): SHARED_KV, naming the layer whose keys and values they read."""
    model = _gemma3n_text_model()
    layout = model_anatomy.resolve_layout(model)
    shared = [b for b in layout.blocks if model.get_submodule(b.attention.path).is_kv_shared_layer]
    assert shared and len(shared) < len(layout.blocks)
    for block in layout.blocks:
        attention, module = block.attention, model.get_submodule(block.attention.path)
        if block in shared:
            assert attention.qkv_kind is model_anatomy.QKVKind.SHARED_KV and attention.k is None
            assert attention.kv_source == module.kv_shared_layer_index and attention.k_norm is None
            assert attention.query_rows() == list(range(module.q_proj.out_features))
            with pytest.raises(AnatomyError, match="has no projection of its own"):
                attention.key_rows()
            with pytest.raises(AnatomyError, match="shared_kv attention has no key rows"):
                attention.key_projection  # noqa: B018 - the property raises
        else:
            assert attention.qkv_kind is model_anatomy.QKVKind.SEPARATE and attention.kv_source is None


def test_stacked_stream_block_outputs_are_not_compared_but_sublayers_are():
    """The HF capture taps Gemma 3n's attention and MLP outputs (one stream) and the final norm, and lists each
    block output (a stack of 4 AltUp streams) as missing with the reason: layer-diff says "not compared"."""
    import hf_hidden_states
    import torch

    model = _gemma3n_text_model().eval()
    capture = hf_hidden_states.capture_reference(model, list(range(1, 9)), sublayer=True)
    blocks = len(model.model.layers)
    assert all("keeps 4 residual streams" in capture.missing[f"block.{i}"] for i in range(blocks))
    assert not any(f"block.{i}" in capture.stages for i in range(blocks))
    hidden = model.config.hidden_size
    for name in ["embedding", "final_norm"] + [f"block.{i}.{s}" for i in range(blocks) for s in ("attention", "mlp")]:
        assert capture.stages[name].shape == (8, hidden), name
    with torch.no_grad():
        final = model.model(input_ids=torch.tensor([list(range(1, 9))])).last_hidden_state[0].numpy()
    assert abs(capture.stages["final_norm"] - final).max() < 1e-5


# --- every decoder family's layout (issue 14, session 4): one row per layout the resolver learned ---------

# family: (qkv kind, block norm roles, checks on the last block) -- each failed with a named AnatomyError before.
MORE_LAYOUTS = {
    "deepseek_v3": ("latent", ("input", "pre_mlp")),
    "glm4_moe_lite": ("latent", ("input", "pre_mlp")),
    "youtu": ("latent", ("input", "pre_mlp")),
    "deepseek_v32": ("latent", ("input", "pre_mlp")),
    "afmoe": ("separate", ("input", "attention_output", "pre_mlp", "mlp_output")),
    "laguna": ("separate", ("input", "pre_mlp")),
    "doge": ("separate", ("input", "pre_mlp")),
    "jetmoe": ("mixture_of_heads", ("input", "pre_mlp")),
    "modernbert-decoder": ("separate", ("input", "pre_mlp")),
    "ctrl": ("separate", ("input", "pre_mlp")),
    "gpt_neo": ("separate", ("input", "pre_mlp")),
    "moshi": ("separate", ("input", "pre_mlp")),
    "codegen": ("fused_blocked", ("shared",)),
    "openai-gpt": ("fused", ("attention_residual", "mlp_residual")),  # post-LN: ln_1(x + a), ln_2(n + m)
    "phi4_multimodal": ("fused_multi_query", ("input", "pre_mlp")),
    "bitnet": ("separate", ("input", "pre_mlp")),
    "diffllama": ("separate", ("input", "pre_mlp")),
    "gemma4_unified_text": ("separate", ("input", "attention_output", "pre_mlp", "mlp_output")),
    "glm4": ("separate", ("input", "pre_mlp", "attention_output", "mlp_output")),
    "hyperclovax": ("separate", ("input", "pre_mlp", "attention_output", "mlp_output")),
    "aria_text": ("separate", ("input", "pre_mlp")),
}
# Overrides that keep a shrunk model small where the default config has a second vocabulary.
MORE_OVERRIDES = {"gemma4_text": {"vocab_size_per_layer_input": 256}, "phi4_multimodal": {"vision_config": None,
                                                                                         "audio_config": None}}


@pytest.fixture(scope="module")
def more_models():
    return {}


def _more(more_models, family, **overrides):
    key = (family, tuple(sorted(overrides.items())))
    if key not in more_models:
        more_models[key] = shrunk_model(family, **{**MORE_OVERRIDES.get(family, {}), **overrides})
    return more_models[key]


@pytest.mark.parametrize("family", sorted(MORE_LAYOUTS))
def test_more_decoder_layouts_resolve_with_their_kind_and_norm_roles(more_models, family):
    kind, roles = MORE_LAYOUTS[family]
    model = _more(more_models, family)
    layout = model_anatomy.resolve_layout(model)
    block = layout.blocks[-1]
    assert block.attention.qkv_kind.value == kind
    assert tuple(n.role.value for n in block.norms) == roles
    paths = [block.attention.path, block.attention.o.path, block.mlp_output_path, *(n.path for n in block.norms)]
    for part in (block.attention.q, block.attention.k, block.attention.v, block.attention.qkv,
                 block.attention.output_gate, block.attention.mask_projection):
        if part is not None:
            paths.append(part.path)
    for path in paths:
        model.get_submodule(path)  # every path names a real module


def test_latent_attention_sizes_come_from_the_shapes_and_agree_with_the_module(more_models):
    for family, overrides in (("deepseek_v3", {}), ("deepseek_v3", {"q_lora_rank": None})):
        model = _more(more_models, family, **overrides)
        attention = model_anatomy.resolve_layout(model).blocks[0].attention
        module = model.get_submodule(attention.path)
        latent = attention.latent
        assert attention.qkv_kind is model_anatomy.QKVKind.LATENT and attention.k is None and attention.qkv is None
        assert (latent.nope_head_dim, latent.rope_head_dim, latent.v_head_dim, latent.kv_lora_rank) == (
            module.qk_nope_head_dim, module.qk_rope_head_dim, module.v_head_dim, module.kv_lora_rank)
        assert attention.head_dim == module.qk_head_dim and attention.value_head_dim == module.v_head_dim
        assert latent.q_lora_rank == overrides.get("q_lora_rank", module.q_lora_rank)
        if latent.q_a is None:
            assert attention.q.path.endswith("self_attn.q_proj") and latent.q_a_norm is None
        else:
            assert attention.q.path.endswith("q_b_proj") and latent.q_a_norm.endswith("q_a_layernorm")
        assert latent.kv_a.path.endswith("kv_a_proj_with_mqa") and latent.kv_a_norm.endswith("kv_a_layernorm")
        assert len(attention.query_rows()) == attention.q.out_features
        # Keys are not rows of one projection: asking for them is a named error, never a guess.
        with pytest.raises(AnatomyError, match=r"cannot resolve the key rows of model\.layers\.0\.self_attn"):
            attention.key_rows()
        with pytest.raises(AnatomyError, match="key projection"):
            _ = attention.key_projection
    sparse = model_anatomy.resolve_layout(_more(more_models, "deepseek_v32")).blocks[0].attention
    assert sparse.indexer == "model.layers.0.self_attn.indexer"


def test_codegen_blocked_rows_match_its_own_split(more_models):
    """FUSED_BLOCKED rows select what CodeGen's forward takes as q, k and v ([q; v; k] in each of 4 blocks)."""
    import torch

    model = _more(more_models, "codegen")
    attention = model_anatomy.resolve_layout(model).blocks[0].attention
    module = model.get_submodule(attention.path)
    width, blocks = attention.qkv.out_features, attention.fused_blocks
    assert blocks == model_anatomy.FUSED_QKV_BLOCKS["codegen"]
    index = torch.arange(width).view(1, 1, width)
    local = attention.num_heads * attention.head_dim // blocks
    query, value, key = torch.split(index.reshape(1, 1, blocks, -1), local, dim=-1)
    split = [module._split_heads(part, attention.num_heads, attention.head_dim, mp_num=blocks)
             for part in (query, key, value)]
    assert _rows_of(split[0]) == attention.query_rows()
    assert _rows_of(split[1]) == attention.key_rows() and _rows_of(split[2]) == attention.value_rows()


def test_concatenated_fused_rows_for_openai_gpt_and_phi4_multimodal(more_models):
    import torch

    gpt = _more(more_models, "openai-gpt")
    attention = model_anatomy.resolve_layout(gpt).blocks[0].attention
    assert attention.qkv.storage is model_anatomy.WeightStorage.CONV1D
    module = gpt.get_submodule(attention.path)
    index = torch.arange(attention.qkv.out_features).view(1, 1, -1)
    query, key, value = index.split(module.split_size, dim=2)  # OpenAIGPT's Attention.forward split
    assert (_rows_of(query), _rows_of(key), _rows_of(value)) == (
        attention.query_rows(), attention.key_rows(), attention.value_rows())
    phi4 = model_anatomy.resolve_layout(_more(more_models, "phi4_multimodal")).blocks[0].attention
    assert phi4.num_kv_heads == phi4.qkv.out_features // phi4.head_dim - phi4.num_heads >> 1


def test_attention_output_gates_mask_projection_and_inner_norms(more_models):
    afmoe = model_anatomy.resolve_layout(_more(more_models, "afmoe")).blocks[0].attention
    assert afmoe.output_gate.path.endswith("self_attn.gate_proj") and not afmoe.output_gate_per_head
    laguna = model_anatomy.resolve_layout(_more(more_models, "laguna")).blocks[0].attention
    assert laguna.output_gate.path.endswith("self_attn.g_proj") and laguna.output_gate_per_head
    doge = model_anatomy.resolve_layout(_more(more_models, "doge")).blocks[0].attention
    assert doge.mask_projection.path.endswith("dt_proj") and doge.output_gate is None
    bitnet = model_anatomy.resolve_layout(_more(more_models, "bitnet")).blocks[0]
    assert bitnet.attention.sub_norm.endswith("self_attn.attn_sub_norm")
    assert bitnet.mlp.sub_norm.endswith("mlp.ffn_sub_norm")
    diff = model_anatomy.resolve_layout(_more(more_models, "diffllama")).blocks[0].attention
    assert diff.sub_norm.endswith("self_attn.groupnorm")
    gemma4 = model_anatomy.resolve_layout(_more(more_models, "gemma4_unified_text")).blocks[0].attention
    assert gemma4.v_norm.endswith("self_attn.v_norm") and gemma4.q_norm.endswith("q_norm")


def test_post_attention_layernorm_role_when_another_norm_owns_the_attention_output(more_models):
    """GLM-4 / HyperCLOVA X: post_attention_layernorm is the MLP input; the named post norms are the outputs."""
    for family, attention_output in (("glm4", "post_self_attn_layernorm"), ("hyperclovax", "post_norm1")):
        block = model_anatomy.resolve_layout(_more(more_models, family)).blocks[0]
        assert block.norm(model_anatomy.NormRole.PRE_MLP).path.endswith("post_attention_layernorm")
        assert block.norm(model_anatomy.NormRole.ATTENTION_OUTPUT).path.endswith(attention_output)


def test_wrapped_attention_and_wrapped_linear(more_models):
    neo = model_anatomy.resolve_layout(_more(more_models, "gpt_neo")).blocks[0].attention
    assert neo.path == "transformer.h.0.attn.attention" and neo.o.path.endswith("attn.attention.out_proj")
    moshi_model = _more(more_models, "moshi")
    moshi = model_anatomy.resolve_layout(moshi_model).blocks[0].attention
    assert moshi.o.path == "model.layers.0.self_attn.o_proj.linear"
    assert moshi_model.get_submodule(moshi.o.path).weight.ndim == 2


def test_ctrl_and_modernbert_names(more_models):
    ctrl = model_anatomy.resolve_layout(_more(more_models, "ctrl")).blocks[0]
    assert ctrl.attention.q.path.endswith("Wq") and ctrl.attention.o.path.endswith("multi_head_attention.dense")
    assert (ctrl.mlp.up.path, ctrl.mlp.down.path) == ("transformer.h.0.ffn.0", "transformer.h.0.ffn.2")
    modern = model_anatomy.resolve_layout(_more(more_models, "modernbert-decoder")).blocks[1]
    assert modern.attention.o.path.endswith("attn.Wo") and modern.mlp.gate_up.path.endswith("mlp.Wi")
    assert modern.mlp.gated and modern.mlp.down.path.endswith("mlp.Wo")


def test_grouped_experts_and_mixture_of_attention_heads(more_models):
    aria = model_anatomy.resolve_layout(_more(more_models, "aria_text")).blocks[0].moe
    assert aria.experts_fused and aria.experts.endswith("mlp.experts") and aria.shared_expert is not None
    jet_model = _more(more_models, "jetmoe")
    jet = model_anatomy.resolve_layout(jet_model).blocks[0].attention
    module = jet_model.get_submodule(jet.path)
    assert jet.q.storage is model_anatomy.WeightStorage.STACKED and jet.o.storage is model_anatomy.WeightStorage.STACKED
    assert jet.router.endswith("experts.router") and jet.qkv.path.endswith("kv_proj")
    assert (jet.num_heads, jet.num_kv_heads) == (module.num_heads, module.num_key_value_heads)
    with pytest.raises(AnatomyError, match="routed attention experts"):
        _ = jet.query_projection


def test_gemma4_per_layer_inputs(more_models):
    model = _more(more_models, "gemma4_text")
    layout = model_anatomy.resolve_layout(model)
    inputs = layout.per_layer_inputs
    assert inputs.embedding == "model.embed_tokens_per_layer" and inputs.norm == "model.per_layer_projection_norm"
    assert inputs.width == model.config.hidden_size_per_layer_input
    assert inputs.projection.out_features == len(layout.blocks) * inputs.width
    branch = layout.blocks[1].per_layer_input
    assert branch.gate.path.endswith("per_layer_input_gate") and branch.norm.endswith("post_per_layer_input_norm")
    assert layout.position_embedding is None  # the per-layer table is not a position embedding


def test_an_moe_switch_that_is_off_means_a_dense_model():
    """Regression (bench): Doge's default config has num_experts=2048 but is_moe=false builds dense MLPs."""

    view = config_view(hf_reference.config_for_model("doge").to_dict())
    assert not view.is_moe and view.num_experts is None and view.moe_layers == ()
    assert "is_moe=false" in view.source("num_experts").note
    assert config_view({"num_experts": 8, "is_moe": True, "num_hidden_layers": 2}).is_moe


def test_longcat_block_count_is_num_layers():

    config = hf_reference.config_for_model("longcat_flash").to_dict()
    view = config_view(config)
    assert view.num_layers == config["num_layers"] and view.key("num_layers") == "num_layers"
    assert config["num_hidden_layers"] == 2 * view.num_layers
    assert (view.expert_intermediate_size, view.key("expert_intermediate_size")) == (
        config["expert_ffn_hidden_size"], "expert_ffn_hidden_size")
    assert (view.zero_experts, view.key("zero_experts")) == (config["zero_expert_num"], "zero_expert_num")


def test_the_config_view_imports_neither_torch_nor_max():
    import subprocess
    import sys

    from conftest import SCRIPTS_DIR

    code = ("import sys, model_anatomy, model_source; model_anatomy.config_view({'n_embd': 8}); "
            "print(sorted(m for m in ('torch', 'max', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS_DIR, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# LongCat-Flash's multi-head latent attention sizes, shrunk together (its rotary table is head_dim wide and
# must equal qk_rope_head_dim), and a few identity experts.
LONGCAT_SHRUNK = {"qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16, "head_dim": 8, "v_head_dim": 8,
                  "kv_lora_rank": 16, "q_lora_rank": 16, "zero_expert_num": 2}


def test_longcat_two_sublayers_and_a_shortcut_moe_with_zero_experts(more_models):
    """Regression (bench): 'model.layers.0.self_attn is a list of 2 attention modules' -- each block is
    attention, MLP, attention, MLP (norms per sublayer) plus a shortcut MoE whose router also scores
    identity experts."""
    import torch

    model = _more(more_models, "longcat_flash", **LONGCAT_SHRUNK)
    block = model_anatomy.resolve_layout(model).blocks[0]
    assert [a.path for a in block.attentions] == ["model.layers.0.self_attn.0", "model.layers.0.self_attn.1"]
    assert block.attention is block.attentions[0] and block.mlp is block.mlps[0]
    assert [m.path for m in block.mlps] == ["model.layers.0.mlps.0", "model.layers.0.mlps.1"]
    assert all(a.qkv_kind is model_anatomy.QKVKind.LATENT for a in block.attentions)
    assert block.moe.path == "model.layers.0.mlp" and block.moe_shortcut and not block.parallel
    assert (block.moe.num_experts, block.moe.zero_experts) == (model.config.n_routed_experts, 2)
    assert [(n.path.rpartition("layers.0.")[2], n.role.value, n.sublayer) for n in block.norms] == [
        ("input_layernorm.0", "input", 0), ("input_layernorm.1", "input", 1),
        ("post_attention_layernorm.0", "pre_mlp", 0), ("post_attention_layernorm.1", "pre_mlp", 1)]
    assert block.norm(model_anatomy.NormRole.PRE_MLP, sublayer=1).path.endswith("post_attention_layernorm.1")
    # the order the forward pass runs them is the listed order; the MoE reads sublayer 0's pre-MLP norm output
    order, inputs = [], {}
    parts = [*(a.path for a in block.attentions), *(m.path for m in block.mlps), block.moe.path,
             block.norm(model_anatomy.NormRole.PRE_MLP).path]

    def hook_for(path):
        def hook(module, args, output):
            order.append(path)
            inputs[path] = output if path == parts[-1] else args[0] if args else None
        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p)) for p in parts]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for handle in handles:
        handle.remove()
    first = {p: order.index(p) for p in parts[:4]}
    assert first[parts[0]] < first[parts[2]] < first[parts[1]] < first[parts[3]]
    assert torch.equal(inputs[block.moe.path], inputs[parts[-1]])


def test_modernbert_embedding_norm_and_prediction_head(more_models):
    """Regression (bench, modernbert-decoder 'blind to 9 of 9 mutations'): the norm inside the embeddings
    container and the dense -> act -> norm head before the LM head were skipped silently, so calibration
    scaled a final norm the head renormalizes (x 5.6e10) and the logits went flat."""
    model = _more(more_models, "modernbert-decoder")
    layout = model_anatomy.resolve_layout(model)
    assert layout.embedding_norm == "model.embeddings.norm" and layout.first_norm == "model.embeddings.norm"
    assert layout.token_embedding == "model.embeddings.tok_embeddings" and layout.final_norm == "model.final_norm"
    head = layout.head_transform
    assert (head.path, head.dense.path, head.norm, layout.lm_head) == ("lm_head", "lm_head.dense", "lm_head.norm",
                                                                       "decoder")
    assert model.get_submodule(head.dense.path).out_features == model.config.hidden_size


def test_an_unknown_part_beside_the_decoder_is_named():
    import torch

    model = shrunk_model("llama")
    assert model_anatomy.resolve_layout(model).head_transform is None
    model.extra = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(AnatomyError, match=re.escape("cannot resolve the part extra of LlamaForCausalLM")):
        model_anatomy.resolve_layout(model)


@pytest.mark.parametrize(("family", "table", "offset"), [("ctrl", "transformer.pos_encoding", 0),
                                                         ("xglm", "model.embed_positions.weights", 2)])
def test_fixed_sinusoidal_position_tables(more_models, family, table, offset):
    """Regression (bench, ctrl 'blind to norm eps x100'): CTRL's non-persistent sinusoidal table (and XGLM's)
    was not in the layout; it floors the first norm's input, so calibration drove the tokens to 1.9e-9."""
    model = _more(more_models, family)
    layout = model_anatomy.resolve_layout(model)
    assert (layout.position_table, layout.position_offset, layout.position_embedding) == (table, offset, None)
    owner, _, name = table.rpartition(".")
    buffer = model.get_submodule(owner).get_buffer(name)
    assert buffer.ndim == 2 and buffer.shape[-1] == model.config.to_dict().get("n_embd", model.config.hidden_size)


def test_latent_rope_rows_are_the_rows_the_modeling_code_rotates(more_models):
    """The RoPE part of latent attention (for the RoPE-style mutation): per query head the last rope_head_dim
    rows of q (q_b_proj), and the kv_a rows after the latent; checked against DeepSeek-V3's own split."""
    import torch

    model = _more(more_models, "deepseek_v3")
    attention = model_anatomy.resolve_layout(model).blocks[0].attention
    latent, module = attention.latent, model.get_submodule(attention.path)
    hidden = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden)))
        kv = module.kv_a_proj_with_mqa(hidden)
    q_rot = q.view(1, 3, -1, module.qk_head_dim).split([module.qk_nope_head_dim, module.qk_rope_head_dim], -1)[1]
    k_rot = kv.split([module.kv_lora_rank, module.qk_rope_head_dim], -1)[1]
    assert torch.equal(q[..., latent.query_rope_rows(attention.num_heads)], q_rot.reshape(1, 3, -1))
    assert torch.equal(kv[..., latent.key_rope_rows()], k_rot)


def test_dbrx_experts_in_flat_2d_weights_resolve():
    """DBRX keeps every expert's rows in one 2-D [experts * ffn, hidden] weight (was: neither a list of MLPs
    nor [experts, ...] weights)."""
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = DbrxConfig(d_model=32, n_heads=4, n_layers=1,
                        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2})
    moe = model_anatomy._moe("ffn", DbrxFFN(config), config_view(config.to_dict()))
    assert (moe.router, moe.experts, moe.experts_fused, moe.num_experts) == ("ffn.router", "ffn.experts", True, 4)


def test_a_norm_attention_norm_wrapper_is_resolved_through():
    """DBRX's block holds norm_attn_norm (DbrxNormAttentionNorm: norm_1, attn, norm_2), whose class name
    says Norm: it was taken for a norm and refused ("'norm_attn_norm' is not in NORM_ROLE_NAMES")."""
    import transformers

    from bench_family_coverage import default_config
    from tiny_config import ShrinkOptions, shrink_config

    config = shrink_config(default_config("dbrx", "DbrxForCausalLM")[0], ShrinkOptions()).config
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("dbrx", **fields))
    block = model_anatomy.resolve_layout(model).blocks[0]
    assert block.attention.path == "transformer.blocks.0.norm_attn_norm.attn"
    assert [(n.path.rpartition(".")[2], n.role.value) for n in block.norms] == [("norm_1", "input"),
                                                                                 ("norm_2", "pre_mlp")]
    assert not block.parallel and block.moe is not None
    assert not model_anatomy.is_norm_module(model.get_submodule("transformer.blocks.0.norm_attn_norm"))
