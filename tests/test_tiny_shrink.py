"""Faithful shrinking (issue 14): a replica keeps the size relations a port must honor.

Each test is a regression test for a measured defect of ``tiny``: an explicit head_dim reset to
hidden / heads, GPT-2 names left at full width, kv-head and rotary keys other than Llama's left
unshrunk, index lists taken for per-layer lists, a sliding window MAX cannot compile, a probe
prompt shorter than the window. Sources are transformers' default configs or full-size Hub-shaped
dicts; only the shrunk replicas are ever instantiated.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from family_configs import FAMILY_CONFIGS

import max_compat
import model_anatomy
from cli_support import ScriptError
from make_tiny_model import MANIFEST, ReplicaOptions, build_replica, check_options, probe_prompt
from tiny_config import ShrinkOptions, shrink_config

FLOOR = max_compat.sliding_window_floor("float32")
# A 2-layer GPT-2 replica at full width (768) with a 512-token vocab has 15.4 M parameters (measured
# before the fix); shrunk to hidden 64 it has about 0.2 M. A bound far below the first and far above
# the second fails only when the widths are not shrunk.
GPT2_REPLICA_MAX_PARAMETERS = 1_000_000
TRAINED_VOCAB = 512
# Gemma 3n's 6-layer replica (one layer per attention type x sparsity x KV sharing) has about 1.1 M
# parameters; with its per-layer embedding left at 262144 tokens x 256 per layer it had over 400 M.
GEMMA3N_REPLICA_MAX_PARAMETERS = 10_000_000


def _default_config(model_type: str) -> dict:
    """transformers' default config of ``model_type`` as a config.json dict with its causal-LM class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config


def _shrunk(config: dict, **kwargs) -> dict:
    return shrink_config(config, ShrinkOptions(keep_small_source=False), **kwargs).config


def _head_relation(config: dict) -> tuple[Fraction, object, bool, bool]:
    """heads x head_dim / hidden, query heads per KV head (or multi-query), hidden // heads == head_dim,
    explicit head_dim."""
    view = model_anatomy.config_view(config)
    kv = "multi-query" if view.num_kv_heads == 1 else Fraction(view.num_heads, view.num_kv_heads)
    return (Fraction(view.num_heads * view.head_dim, view.hidden_size), kv,
            view.hidden_size // view.num_heads == view.head_dim, view.head_dim_explicit)


# Llama-layout sources with an explicit head_dim that differs from hidden / heads (Gemma-7B is the MHA
# one: 16 x 256 = 4096 over hidden 3072).
EXPLICIT_HEAD_DIM_SOURCES = {
    "mha": {"num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_size": 3072},
    "gqa2": {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "hidden_size": 3072},
    "gqa4": {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 3072},
    "mqa": {"num_attention_heads": 16, "num_key_value_heads": 1, "head_dim": 128, "hidden_size": 3072},
    "narrow_heads": {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_size": 4096},
}


@pytest.mark.parametrize("case", sorted(EXPLICIT_HEAD_DIM_SOURCES))
def test_explicit_head_dim_keeps_its_ratio_to_hidden_and_the_kv_ratio(case):
    source = dict(FAMILY_CONFIGS["llama"], **EXPLICIT_HEAD_DIM_SOURCES[case])
    replica = _shrunk(source)
    ratio, kv_ratio, recomputable, explicit = _head_relation(replica)
    assert (ratio, kv_ratio) == _head_relation(source)[:2]
    assert explicit and replica["head_dim"] == ShrinkOptions().head_dim
    assert not recomputable  # a port computing head_dim = hidden // heads is wrong on the replica too


def test_falcon_kv_heads_key_shrinks_with_the_query_heads():
    # Falcon-40B: new_decoder_architecture, 128 query heads over 8 KV heads under num_kv_heads.
    source = dict(_default_config("falcon"), new_decoder_architecture=True, multi_query=False,
                  num_attention_heads=128, num_kv_heads=8, hidden_size=8192)
    replica = _shrunk(source)
    assert (replica["num_attention_heads"], replica["num_kv_heads"]) == (32, 2)  # ratio 16 kept
    assert _head_relation(replica)[:2] == _head_relation(source)[:2]


def test_multi_query_sources_stay_multi_query_at_replica_width():
    for model_type in ("gpt_bigcode", "falcon"):  # n_head / n_embd (left at 12 x 768 before) and Falcon's names
        source = _default_config(model_type)
        assert source["multi_query"] is True
        view = model_anatomy.config_view(_shrunk(source))
        assert view.num_kv_heads == 1 and view.num_heads == 4 and view.hidden_size == 4 * view.head_dim == 64


def test_gpt2_names_are_shrunk_to_a_small_replica():
    import transformers

    replica = _shrunk(_default_config("gpt2"), vocab_size=TRAINED_VOCAB)
    assert (replica["n_embd"], replica["n_head"], replica["n_layer"]) == (64, 4, 2)
    assert replica["n_inner"] is None  # 4 x n_embd by the model's own rule, as in the source
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**replica))
    assert sum(p.numel() for p in model.parameters()) < GPT2_REPLICA_MAX_PARAMETERS


def test_an_absolute_rotary_dim_keeps_its_share_of_the_head():
    source = _default_config("gptj")  # 16 heads of 256 dims, 64 of them rotated
    replica = _shrunk(source)
    view = model_anatomy.config_view(replica)
    assert view.head_dim == 16 and replica["rotary_dim"] == 4  # a quarter, as in the source
    assert view.rotary_fraction == model_anatomy.config_view(source).rotary_fraction


def test_a_width_tied_to_hidden_follows_it():
    replica = _shrunk(_default_config("opt"))  # word_embed_proj_dim == hidden: no projection
    assert replica["word_embed_proj_dim"] == replica["hidden_size"] == 64
    projected = _shrunk(dict(_default_config("opt"), hidden_size=1024, word_embed_proj_dim=512))
    assert projected["word_embed_proj_dim"] * 2 == projected["hidden_size"]  # OPT-350m's half-width projection


def test_an_index_list_of_moe_layers_is_remapped_not_cut_per_layer():
    # Llama 4: moe_layers lists 48 layer indices in a 48-layer model; taken for a per-layer list it made
    # every layer distinct and kept all 48.
    shrunk = shrink_config(_default_config("llama4_text"), ShrinkOptions(keep_small_source=False))
    assert len(shrunk.kept_layers) <= 8
    assert shrunk.config["moe_layers"] == list(range(len(shrunk.kept_layers)))
    assert any("nope" in s for s in shrunk.layer_signatures)  # the NoPE layer of the 4-layer period is kept


def test_a_pattern_that_cannot_follow_representative_layers_is_refused():
    # One MoE layer every 10: the representatives [0, 9] would become two dense layers under step 10.
    source = dict(FAMILY_CONFIGS["qwen3_moe"], decoder_sparse_step=10, num_hidden_layers=20)
    with pytest.raises(ScriptError, match="per-layer pattern"):
        shrink_config(source, ShrinkOptions())
    kept = shrink_config(source, ShrinkOptions(min_layers=10))
    assert kept.layer_signatures[-1] == "moe" and kept.config["decoder_sparse_step"] == 10


def test_top_k_keeps_its_relation_to_the_expert_count():
    # Every expert used (8 of 8) became 2 of 4 before; below, one, and a small count stay as they were.
    for experts, top_k, expected in ((8, 8, (4, 4)), (64, 8, (4, 2)), (16, 1, (4, 1)), (3, 2, (3, 2))):
        replica = _shrunk(dict(FAMILY_CONFIGS["qwen3_moe"], num_experts=experts, num_experts_per_tok=top_k))
        assert (replica["num_experts"], replica["num_experts_per_tok"]) == expected, (experts, top_k)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "phi3"])
def test_a_sliding_window_becomes_max_s_floor(family):
    shrunk = shrink_config(FAMILY_CONFIGS[family], ShrinkOptions())
    assert shrunk.config["sliding_window"] == FLOOR
    change = next(c for c in shrunk.changes if c.field == "sliding_window")
    assert "SIMD width of sliding window mask" in change.rule and str(FLOOR) in change.rule


def test_gpt_neo_window_size_and_bf16_floor():
    replica = _shrunk(_default_config("gpt_neo"))
    assert replica["window_size"] == FLOOR and replica["attention_layers"] == ["global", "local"]
    bf16 = shrink_config(FAMILY_CONFIGS["mistral"], ShrinkOptions(), dtype="bfloat16").config
    assert bf16["sliding_window"] == max_compat.sliding_window_floor("bfloat16") > FLOOR


def test_a_sliding_window_flag_below_the_floor_is_refused():
    with pytest.raises(ScriptError, match="--sliding-window"):
        check_options(ReplicaOptions(shrink=ShrinkOptions(sliding_window=FLOOR - 1)))
    check_options(ReplicaOptions(shrink=ShrinkOptions(sliding_window=FLOOR)))


def test_the_probe_prompt_reaches_past_the_window(tmp_path):
    from tiny_tokenizer import train_bpe_tokenizer
    from transformers import AutoTokenizer

    train_bpe_tokenizer(tmp_path, vocab_size=TRAINED_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    replica = shrink_config(FAMILY_CONFIGS["mistral"], ShrinkOptions()).config
    prompt, rule = probe_prompt(replica, count)
    assert count(prompt) >= 2 * FLOOR and str(FLOOR) in rule
    assert probe_prompt(replica, count)[0] == prompt  # the same text every time
    no_window = shrink_config(FAMILY_CONFIGS["llama"], ShrinkOptions()).config
    assert count(probe_prompt(no_window, count)[0]) < FLOOR


def test_the_manifest_lists_each_change_with_its_reason_and_the_kept_relations(tmp_path):
    source = dict(FAMILY_CONFIGS["mistral"], head_dim=256)  # explicit, 32 x 256 = 2 x hidden
    manifest = build_replica(source, tmp_path / "replica", ReplicaOptions())
    config = json.loads((tmp_path / "replica" / "config.json").read_text())
    assert json.loads((tmp_path / "replica" / MANIFEST).read_text()) == manifest
    changes = {c["field"]: c for c in manifest["changes"]}
    for key, value in config.items():
        if source.get(key) != value:
            assert key in changes and changes[key]["rule"], key
            assert changes[key]["old"] == source.get(key) and changes[key]["new"] == value
    assert "ratio" in changes["hidden_size"]["rule"] and changes["hidden_size"]["new"] == 8 * 16 // 2
    assert manifest["relations"] and all(r["kept"] for r in manifest["relations"].values()), manifest["relations"]
    assert manifest["relations"]["heads x head_dim / hidden"]["replica"] == "2"
    assert config["sliding_window"] == FLOOR < manifest["prompt_tokens"] and str(FLOOR) in manifest["prompt_rule"]


def test_compare_scores_the_replicas_window_prompt_when_the_model_slides(tmp_path):
    """compare's default battery is shorter than any window; the manifest's probe prompt is added."""
    import json

    import model_source
    import port_compare

    folder = tmp_path / "replica"
    folder.mkdir()
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 128,
              "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tiny_replica.json").write_text(json.dumps({"prompt": "long " * 300}))
    assert port_compare.window_prompts(model_source.resolve(str(folder))) == ["long " * 300]
    config["sliding_window"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert port_compare.window_prompts(model_source.resolve(str(folder))) == []


@pytest.mark.parametrize("architecture, model_type", [("BertLMHeadModel", "bert"), ("BartForCausalLM", "bart")])
def test_tiny_refuses_encoder_families_up_front_with_exit_2(tmp_path, architecture, model_type):
    """BERT/BART are in transformers' causal-LM mapping; tiny refused them only after 40-160 s of building."""
    import json

    from conftest import run_script

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": model_type, "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128}))
    result = run_script("make_tiny_model", source, "--output", tmp_path / "out", "--json")
    assert result.returncode == 2, result.stderr
    assert "decoder-only" in result.json()["error"]
    assert not (tmp_path / "out").exists()


def test_a_zero_sliding_window_means_no_window():
    """Qwen2-MoE's default config has sliding_window 0 (use_sliding_window off); tiny refused it."""
    import tiny_config

    config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "sliding_window": 0,
              "use_sliding_window": False, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 512}
    tiny_config.check_source_config(config)
    assert tiny_config.replica_sliding_window(config) is None


def test_second_layer_count_and_zero_experts_follow_the_kept_blocks():
    """LongCat-Flash builds num_layers blocks and reads num_hidden_layers as twice that; tiny shrank only
    num_hidden_layers (56 -> 2), so the replica built 28 blocks and the bench killed it after 87 s. Its
    identity experts (zero_expert_num) keep their share of the router's choices."""
    source = _default_config("longcat_flash")
    shrunk = _shrunk(source)
    assert shrunk["num_layers"] == 2 and shrunk["num_hidden_layers"] == 2 * shrunk["num_layers"]
    experts, zero = shrunk["n_routed_experts"], shrunk["zero_expert_num"]
    assert 0 < zero < source["zero_expert_num"]
    assert Fraction(zero, experts) == Fraction(source["zero_expert_num"], source["n_routed_experts"])


def test_per_layer_widths_kv_sharing_and_per_layer_inputs_are_shrunk_faithfully():
    """Gemma 3n gives intermediate_size per layer (a list), shares KV in its last num_kv_shared_layers
    layers and embeds every token again per layer (vocab_size_per_layer_input x hidden_size_per_layer_input
    per layer). Before the fix the list was refused, and the per-layer embedding stayed full size (Gemma 4's
    2-layer replica took 14 s to build)."""
    import transformers

    source = _default_config("gemma3n_text")
    shrunk_config = shrink_config(source, ShrinkOptions(keep_small_source=False), vocab_size=TRAINED_VOCAB,
                                  layer_types=source["layer_types"])
    shrunk = shrunk_config.config
    layers = shrunk["num_hidden_layers"]
    assert isinstance(shrunk["intermediate_size"], list) and len(shrunk["intermediate_size"]) == layers
    assert set(shrunk["intermediate_size"]) == {2 * shrunk["hidden_size"]}  # equal widths stay equal
    first_shared = source["num_hidden_layers"] - source["num_kv_shared_layers"]
    kept_shared = [i >= first_shared for i in shrunk_config.kept_layers]
    assert any(kept_shared) and not all(kept_shared)
    assert shrunk["num_kv_shared_layers"] == sum(kept_shared)
    assert shrunk["vocab_size_per_layer_input"] == TRAINED_VOCAB
    assert shrunk["hidden_size_per_layer_input"] < source["hidden_size_per_layer_input"]
    assert shrunk["laurel_rank"] < source["laurel_rank"]
    fields = {k: v for k, v in shrunk.items() if k not in ("model_type", "architectures")}
    model = transformers.Gemma3nForCausalLM(transformers.AutoConfig.for_model("gemma3n_text", **fields))
    assert sum(p.numel() for p in model.parameters()) < GEMMA3N_REPLICA_MAX_PARAMETERS
    assert [layer.self_attn.is_kv_shared_layer for layer in model.model.layers] == kept_shared


def test_distinct_per_layer_widths_keep_their_order():
    """A per-layer width list with two sizes keeps two sizes, in the same order, and the layer pattern."""
    source = _default_config("gemma3n_text")
    count = source["num_hidden_layers"]
    source["intermediate_size"] = [8192 if i % 2 else 16384 for i in range(count)]
    shrunk_config = shrink_config(source, ShrinkOptions(keep_small_source=False), vocab_size=TRAINED_VOCAB,
                                  layer_types=source["layer_types"])
    widths = shrunk_config.config["intermediate_size"]
    expected = [source["intermediate_size"][i] for i in shrunk_config.kept_layers]
    assert len(set(widths)) == len(set(expected)) == 2 and max(widths) == 2 * shrunk_config.config["hidden_size"]
    assert [Fraction(w, max(widths)) for w in widths] == [Fraction(w, max(expected)) for w in expected]


@pytest.mark.parametrize("model_type,architecture", [("emu3", "Emu3ForCausalLM")])
def test_composite_whose_text_config_has_no_causal_lm_class_keeps_the_composite(tmp_path, model_type, architecture):
    """Emu3's and Mllama's text configs (emu3_text_model, mllama_text_model) have no causal-LM mapping
    entry, so tiny refused them ("no text-only causal-LM class"); their composite type's causal-LM class
    builds only the language model, so the replica keeps the composite config with text_config shrunk.
    (Mllama's replica is built in the next test: its cross-attention block is not resolved yet.)"""
    import hf_reference

    source = _default_config(model_type)
    manifest = build_replica(source, tmp_path / "replica", ReplicaOptions())
    config = json.loads((tmp_path / "replica" / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    text = config["text_config"]
    assert text["hidden_size"] < source["text_config"]["hidden_size"]
    assert text["num_hidden_layers"] < source["text_config"]["num_hidden_layers"]
    assert manifest["replica"]["parameters"] < GPT2_REPLICA_MAX_PARAMETERS
    assert type(hf_reference.load(str(tmp_path / "replica"))).__name__ == architecture


def test_full_size_sub_configs_tiny_cannot_shrink_are_refused_before_building():
    """BLT nests four sub-configs with their own layers (patcher, byte encoder, global, byte decoder) that
    tiny does not shrink; its build held 5.8 GB until the coverage benchmark killed it after 180 s. Now
    the size check refuses it in milliseconds, naming the sub-configs; GIT's small vision tower passes."""
    from tiny_config import check_replica_sizes

    blt = _shrunk(_default_config("blt"))
    with pytest.raises(ScriptError, match="global_config"):
        check_replica_sizes(blt)
    check_replica_sizes(_shrunk(_default_config("git")))


def test_attention_chunk_is_shrunk_like_a_sliding_window_and_the_probe_crosses_it():
    """Llama 4's chunked layers attend within attention_chunk_size (8192) tokens; tiny kept it, so no
    probe prompt reached a chunk boundary and the "sliding window removed" mutation could not move."""
    source = _default_config("llama4_text")
    shrunk = shrink_config(source, ShrinkOptions(keep_small_source=False), vocab_size=TRAINED_VOCAB,
                           layer_types=source["layer_types"]).config
    assert "chunked_attention" in shrunk["layer_types"]
    assert shrunk["attention_chunk_size"] == FLOOR
    prompt, rule = probe_prompt(shrunk, lambda text: len(text.split()))
    assert len(prompt.split()) >= 2 * FLOOR, rule


def test_cross_attention_layers_are_a_kept_per_layer_type():
    """Mllama's language model cross-attends in the layers cross_attention_layers lists ([3, 8, ...]);
    tiny kept the list as it was, so a 2-layer replica had no cross-attention layer at all."""
    source = _default_config("mllama")
    result = shrink_config(source, ShrinkOptions(keep_small_source=False), vocab_size=TRAINED_VOCAB,
                           causal_lm_architecture="MllamaForCausalLM", keep_composite=True,
                           special_ids={"bos": 1, "eos": 2, "pad": 3})
    text = result.config["text_config"]
    cross = text["cross_attention_layers"]
    assert cross and all(0 <= i < text["num_hidden_layers"] for i in cross)
    assert [result.kept_layers[i] for i in cross] == [i for i in result.kept_layers
                                                      if i in source["text_config"]["cross_attention_layers"]]
    import transformers

    assert result.config["model_type"] == "mllama" and result.config["architectures"] == ["MllamaForCausalLM"]
    fields = {k: v for k, v in result.config.items() if k not in ("model_type", "architectures")}
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("mllama", **fields))
    assert type(model).__name__ == "MllamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < GPT2_REPLICA_MAX_PARAMETERS


def test_vision_and_audio_towers_keep_only_the_minimum_layers():
    """Phi-4-multimodal's causal-LM class builds its 27-layer vision and 24-block audio towers; tiny left
    them whole (an 870 M-parameter replica, 93 s in the coverage benchmark; 97 M and 13 s after)."""
    source = _default_config("phi4_multimodal")
    shrunk = _shrunk(source)
    assert shrunk["vision_config"]["num_hidden_layers"] == ShrinkOptions().min_layers
    assert shrunk["audio_config"]["num_blocks"] == ShrinkOptions().min_layers
    assert shrunk["vision_config"]["hidden_size"] == source["vision_config"]["hidden_size"]  # widths kept


@pytest.mark.parametrize("model_type", ["deepseek_v3", "longcat_flash"])
def test_latent_attention_head_parts_follow_the_replica_head_dim(model_type):
    """Latent (MLA) attention: tiny set head_dim to 16 but left qk_rope_head_dim at 64, so the rotary
    table (sized from head_dim) no longer matched the rotated query part and the replica's forward
    crashed ("size of tensor a (32) must match ... b (8)"); the other head parts keep their ratio."""
    source = _default_config(model_type)
    shrunk = _shrunk(source)
    assert shrunk["qk_rope_head_dim"] == shrunk["head_dim"] < source["qk_rope_head_dim"]
    factor = Fraction(shrunk["qk_rope_head_dim"], source["qk_rope_head_dim"])
    assert shrunk["qk_nope_head_dim"] == source["qk_nope_head_dim"] * factor
    assert shrunk["v_head_dim"] == source["v_head_dim"] * factor
    assert shrunk["qk_head_dim"] == shrunk["qk_nope_head_dim"] + shrunk["qk_rope_head_dim"]
    assert shrunk["kv_lora_rank"] < source["kv_lora_rank"] and shrunk["q_lora_rank"] < source["q_lora_rank"]


def test_shrunk_expert_widths_and_latent_ranks_stay_multiples_of_8():
    """GLM-4-MoE-Lite's ratio-kept hidden of 68 gave 34-wide experts and ranks 26 / 17: torch's grouped_mm
    refused the replica ("strides should be multiple of 16 bytes"); the sources' widths are multiples of 8."""
    shrunk = _shrunk(_default_config("glm4_moe_lite"))
    for key in ("moe_intermediate_size", "q_lora_rank", "kv_lora_rank"):
        assert shrunk[key] % 8 == 0 and shrunk[key] >= 8, (key, shrunk[key])


def test_an_expert_width_equal_to_hidden_and_a_nested_ffn_width_follow_hidden():
    """DBRX (as transformers 5.12 reads it): ffn_config.ffn_hidden_size is the token width, so it must stay
    equal to d_model; ffn_config.hidden_size (the expert width) was left at full size."""
    from bench_family_coverage import default_config

    source, _ = default_config("dbrx", "DbrxForCausalLM")
    shrunk = _shrunk(source)
    assert shrunk["ffn_config"]["ffn_hidden_size"] == shrunk["d_model"] < source["d_model"]
    factor = Fraction(shrunk["d_model"], source["d_model"])
    assert shrunk["ffn_config"]["hidden_size"] == source["ffn_config"]["hidden_size"] * factor
