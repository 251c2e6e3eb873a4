"""Tests for make_tiny_model.py (tiny replicas) and its sensitivity report.

Replicas are built from full-size configs shaped like real Hub checkpoints
(``family_configs.py``), once per module, in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from family_configs import FAMILY_CONFIGS, write_family_config

import max_compat
import tolerances
from conftest import run_script
from make_tiny_model import MANIFEST, ReplicaOptions, build_replica
from replica_init import InitOptions
from tiny_config import ShrinkOptions, shrink_config

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "stablelm", "olmo2",
            "granite", "mixtral", "arcee"]

# Fields that must reach the replica unchanged (when the original has them).
SEMANTIC_FIELDS = ("rope_theta", "rope_scaling", "rms_norm_eps", "layer_norm_eps", "hidden_act", "hidden_activation",
                   "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings", "embedding_multiplier",
                   "residual_multiplier", "attention_multiplier", "logits_scaling", "partial_rotary_factor",
                   "use_parallel_residual", "use_qkv_bias", "attention_bias", "rope_local_base_freq",
                   "sliding_window_pattern", "norm_topk_prob", "decoder_sparse_step", "use_sliding_window")


class Replicas:
    """Builds each family's replica (and its sensitivity report) once, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, tuple[Path, dict]] = {}
        self.reports: dict[str, object] = {}

    def get(self, family: str) -> tuple[Path, dict]:
        if family not in self.built:
            config_path = write_family_config(self.root / f"src_{family}", family)
            output = self.root / f"tiny_{family}"
            self.built[family] = (output, build_replica(str(config_path), output, ReplicaOptions()))
        return self.built[family]

    def report(self, family: str):
        if family not in self.reports:
            from replica_sensitivity import sensitivity_report

            self.reports[family] = sensitivity_report(self.get(family)[0])
        return self.reports[family]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Replicas:
    return Replicas(tmp_path_factory.mktemp("replicas"))


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def _without_factor_lists(value):
    """A RoPE dict without longrope factor lists (their length follows head_dim by rule)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("long_factor", "short_factor")}
    return value


def _changed(manifest: dict) -> dict[str, dict]:
    return {change["field"]: change for change in manifest["changes"]}


# --- config shrinking rules (no torch) --------------------------------------------------------


def test_gqa_ratio_head_dim_and_sizes_follow_the_rules():
    shrunk = shrink_config(FAMILY_CONFIGS["qwen2"], ShrinkOptions()).config
    assert (shrunk["num_attention_heads"], shrunk["num_key_value_heads"]) == (14, 2)  # ratio 7 kept
    assert shrunk["hidden_size"] == 14 * 16  # original had hidden = heads x head_dim
    assert shrunk["intermediate_size"] == 2 * shrunk["hidden_size"]
    assert shrunk["max_window_layers"] == 2  # no sliding used: still "all layers full"
    mha = shrink_config(FAMILY_CONFIGS["olmo2"], ShrinkOptions()).config
    assert (mha["num_attention_heads"], mha["num_key_value_heads"], mha["hidden_size"]) == (4, 4, 64)
    gemma = shrink_config(FAMILY_CONFIGS["gemma2"], ShrinkOptions()).config
    assert gemma["head_dim"] == 16 and gemma["query_pre_attn_scalar"] == 16  # it equalled head_dim
    assert gemma["sliding_window"] == max_compat.sliding_window_floor("float32")
    moe = shrink_config(FAMILY_CONFIGS["qwen3_moe"], ShrinkOptions()).config
    assert moe["hidden_size"] == 16 * 16 // 2  # original heads x head_dim = 2 x hidden: that ratio kept
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["moe_intermediate_size"]) == (4, 2, 64)


def test_longrope_lists_follow_the_rotary_dim_and_max_positions_stay():
    shrunk = shrink_config(FAMILY_CONFIGS["phi3"], ShrinkOptions())
    scaling = shrunk.config["rope_scaling"]
    assert len(scaling["long_factor"]) == len(scaling["short_factor"]) == int(16 * 0.75) // 2
    assert scaling["long_factor"][0] == FAMILY_CONFIGS["phi3"]["rope_scaling"]["long_factor"][0]
    assert scaling["long_factor"][-1] == FAMILY_CONFIGS["phi3"]["rope_scaling"]["long_factor"][-1]
    assert shrunk.config["max_position_embeddings"] == 131072  # longrope reads it
    assert "rope_scaling.long_factor" in {c.field for c in shrunk.changes}


def test_llama3_rope_keeps_max_positions_at_least_the_pretraining_length():
    shrunk = shrink_config(FAMILY_CONFIGS["llama"], ShrinkOptions()).config
    assert shrunk["max_position_embeddings"] == 8192
    assert shrunk["rope_scaling"] == FAMILY_CONFIGS["llama"]["rope_scaling"]


def test_layers_keep_one_of_each_type_dense_and_moe():
    original = dict(FAMILY_CONFIGS["qwen3_moe"], mlp_only_layers=[0, 1, 2])
    shrunk = shrink_config(original, ShrinkOptions())
    assert shrunk.kept_layers == [0, 1, 2, 3]  # shortest prefix with a MoE layer
    assert shrunk.config["mlp_only_layers"] == [0, 1, 2]
    assert shrunk.layer_signatures == ["dense", "dense", "dense", "moe"]


def test_sliding_layers_far_away_use_representatives_and_remap_max_window_layers():
    original = dict(FAMILY_CONFIGS["qwen2"], use_sliding_window=True, max_window_layers=20)
    layer_types = ["full_attention"] * 20 + ["sliding_attention"] * 8
    shrunk = shrink_config(original, ShrinkOptions(), layer_types=layer_types)
    assert shrunk.kept_layers == [0, 20]
    assert shrunk.config["layer_types"] == ["full_attention", "sliding_attention"]
    assert shrunk.config["max_window_layers"] == 1  # layer 0 full, layer 1 slides, as before
    assert shrunk.config["num_hidden_layers"] == 2


def test_special_ids_and_multimodal_text_config():
    shrunk = shrink_config(FAMILY_CONFIGS["gemma3"], ShrinkOptions(), vocab_size=500,
                           special_ids={"bos": 1, "eos": 2, "pad": 3}, causal_lm_architecture="Gemma3ForCausalLM")
    config = shrunk.config
    assert shrunk.text_only and config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text" and "vision_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, [2], 3)
    assert config["vocab_size"] == 500 and config["torch_dtype"] == "float32"


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_input_checks_accept_every_real_family_config(family):
    from tiny_config import check_replica_sizes, check_source_config

    check_source_config(FAMILY_CONFIGS[family], family)
    check_replica_sizes(shrink_config(FAMILY_CONFIGS[family], ShrinkOptions()).config)


@pytest.mark.parametrize("edits, field", [
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ({"model_type": None, "text_config": {"model_type": 3}}, "text_config.model_type"),
    ({"partial_rotary_factor": float("inf")}, "partial_rotary_factor"),
])
def test_a_config_dict_with_a_bad_field_is_refused_before_torch(tmp_path, edits, field):
    from cli_support import ScriptError

    with pytest.raises(ScriptError, match=field.replace(".", r"\.")):
        build_replica(dict(FAMILY_CONFIGS["llama"], **edits), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_a_config_dict_nested_too_deeply_is_refused(tmp_path):
    from cli_support import ScriptError

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ScriptError, match="nests"):
        build_replica(dict(FAMILY_CONFIGS["llama"], extra=deep), tmp_path / "out")
    assert not list(tmp_path.iterdir())


# --- per family: manifest, HF load + generate, sensitivity ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_records_changes_and_keeps_semantics(replicas, family):
    output, manifest = replicas.get(family)
    original = _text(FAMILY_CONFIGS[family])
    config = json.loads((output / "config.json").read_text())
    assert json.loads((output / MANIFEST).read_text()) == manifest
    for key in SEMANTIC_FIELDS:
        if key in original:
            assert _without_factor_lists(config[key]) == _without_factor_lists(original[key]), key
    changes = _changed(manifest)
    for key, change in changes.items():
        if key in original:  # every recorded change is real and matches both files
            assert change["old"] == original[key] and change["new"] == config[key] and change["rule"], key
    for key in original:
        if key in config and config[key] != original[key] and not isinstance(original[key], dict):
            assert key in changes, f"{key} changed without a manifest entry"
    assert config["num_hidden_layers"] >= 2 and config["hidden_size"] <= 256
    assert manifest["tokenizer"]["kind"] == "trained_bpe"
    assert config["vocab_size"] == manifest["tokenizer"]["vocab_size"] <= 512
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = config.get(key)
        for token_id in ids if isinstance(ids, list) else [ids]:
            assert token_id is None or token_id < config["vocab_size"]
    if isinstance(config.get("sliding_window"), int):
        assert config["sliding_window"] < manifest["prompt_tokens"]
    assert manifest["seed"] == 0 and manifest["init"]["mode"] == "peaked" and manifest["init"]["std"] == 0.3
    assert (output / "model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_loads_and_generates_four_tokens(replicas, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, manifest = replicas.get(family)
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    assert type(model).__name__ == manifest["replica"]["architecture"]
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all()
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    assert probs.max() > 20.0 / logits.shape[-1]  # peaked, far from uniform
    assert generated.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_report_passes(replicas, family):
    report = replicas.report(family)
    assert report.threshold == tolerances.sensitivity_threshold("float32")
    assert report.rerun_delta == 0.0
    applicable = {m.name for m in report.mutations if m.applicable}
    assert {"rope_theta x0.05", "norm eps x100", "norm weight offset", "RoPE style", "one layer perturbed",
            "tie vs untie", "activation swap"} <= applicable
    failed = [(m.name, m.delta) for m in report.mutations if m.applicable and not m.passed]
    assert report.passed, failed
    assert all(m.delta >= m.threshold >= tolerances.logprob_atol("float32") for m in report.mutations
               if m.applicable)


def test_family_specific_mutations_apply(replicas):
    def applicable(family):
        return {m.name: m.kind for m in replicas.report(family).mutations if m.applicable}

    gemma2 = applicable("gemma2")
    assert gemma2["attention softcap removed"] == gemma2["final softcap removed"] == "config edit"
    assert gemma2["sliding window removed"] == "config edit"
    stablelm = applicable("stablelm")
    assert stablelm["parallel vs sequential"] == "config edit" and "partial_rotary_factor" in stablelm
    assert "GQA head mapping" not in stablelm  # MHA
    assert applicable("llama")["GQA head mapping"] == "weight edit"
    assert "sliding window removed" not in applicable("qwen2")  # use_sliding_window is false
    table = replicas.report("gemma2").table()
    assert table.splitlines()[-1] == "PASSED" and "final softcap removed" in table and "n/a" in table


def test_text_summary_lists_changed_fields(replicas):
    from make_tiny_model import describe_manifest

    summary = describe_manifest(replicas.get("gemma3")[1])
    assert "Gemma3ForCausalLM" in summary and "trained_bpe" in summary
    floor = max_compat.sliding_window_floor("float32")
    assert f"  sliding_window: 1024 -> {floor}" in summary and "  num_hidden_layers: 34 -> 6" in summary


def test_default_init_replica_fails_the_report(tmp_path):
    from replica_sensitivity import sensitivity_report

    config_path = write_family_config(tmp_path / "src", "llama")
    options = ReplicaOptions(init=InitOptions(mode="default"))
    manifest = build_replica(str(config_path), tmp_path / "default", options)
    assert manifest["init"]["mode"] == "default"
    report = sensitivity_report(tmp_path / "default")
    assert report.rerun_delta == 0.0
    assert not report.passed
    assert "rope_theta x0.05" in report.failures()
    assert report.to_dict()["passed"] is False


# --- options, real tokenizer, CLI ------------------------------------------------------------------


def test_real_tokenizer_keeps_vocab_and_bf16_weights(checkpoint_factory, tmp_path):
    import model_source

    source = checkpoint_factory("llama", config_overrides={"vocab_size": 1000})
    manifest = build_replica(str(source), tmp_path / "bf16", ReplicaOptions(dtype="bfloat16", seed=3))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert manifest["tokenizer"]["kind"] == "real" and config["vocab_size"] == 1000
    assert "vocab_size" not in _changed(manifest) and manifest["seed"] == 3
    tensors = model_source.read_tensor_infos(model_source.resolve(str(tmp_path / "bf16")))
    assert {info.dtype for info in tensors.values()} == {"BF16"}
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()


def test_cli_bad_inputs_exit_3_and_write_nothing(tmp_path):
    config_path = write_family_config(tmp_path / "src", "mistral")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    again = run_script("make_tiny_model", str(config_path), "--output", str(taken), "--json")
    assert again.returncode == 3 and "--force" in again.json()["error"] and again.json()["exit_code"] == 3
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    missing = run_script("make_tiny_model", str(tmp_path / "nope"), "--output", str(tmp_path / "o2"))
    assert missing.returncode == 3 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    odd = run_script("make_tiny_model", str(config_path), "--output", str(tmp_path / "o3"), "--head-dim", "15")
    assert odd.returncode == 3 and "even" in odd.stderr
    remote = tmp_path / "remote"
    write_family_config(remote, "llama")
    data = json.loads((remote / "config.json").read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(data))
    refused = run_script("make_tiny_model", str(remote), "--output", str(tmp_path / "o4"))
    assert refused.returncode == 3 and "--trust-remote-code" in refused.stderr
    for name in ("o2", "o3", "o4"):
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


def test_cli_sensitivity_fails_with_exit_1_for_default_init(tmp_path):
    config_path = write_family_config(tmp_path / "src", "olmo2")
    result = run_script("import_model", "tiny", str(config_path), "--output", str(tmp_path / "out"),
                                "--init", "default", "--sensitivity", "--json")
    assert result.returncode == 1, result.stderr
    document = result.json()
    assert set(document) == {"output", "manifest", "sensitivity", "passed", "backup"}
    assert document["backup"] is None
    assert document["manifest"]["replica"]["architecture"] == "Olmo2ForCausalLM"
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == document["manifest"]
    assert document["passed"] is False and document["sensitivity"]["failures"]
    rows = {row["name"]: row for row in document["sensitivity"]["mutations"]}
    assert rows["rope_theta x0.05"]["kind"] == "config edit" and rows["RoPE style"]["kind"] == "weight edit"
    assert rows["parallel vs sequential"]["applicable"] is False


def test_hub_id_uses_the_real_tokenizer_and_downloads_no_weights(hub, checkpoint_factory, tmp_path):
    hub.add_repo("org/tiny-llama", checkpoint_factory("llama"))
    result = run_script("make_tiny_model", "org/tiny-llama", "--output", str(tmp_path / "out"), "--json",
                        env=hub.env())
    assert result.returncode == 0, result.stderr
    manifest = result.json()["manifest"]
    assert manifest["source"]["model"] == "org/tiny-llama"
    assert manifest["tokenizer"]["kind"] == "real"
    downloaded = hub.downloaded_files()
    assert "org/tiny-llama/config.json" in downloaded
    assert not [name for name in downloaded if name.endswith((".safetensors", ".bin"))]


# --- a source that is already small keeps its shapes ----------------------------------------------

# Shaped like a small test checkpoint handed to a port (2 layers, window 6, 8 experts of width 64): every size
# is inside the small-source bounds, so the replica must keep each one and the named model reuse its graph.
SMALL_MOE_SOURCE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 128,
    "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000,
    "max_position_embeddings": 512, "sliding_window": 6, "use_sliding_window": False, "max_window_layers": 2,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "decoder_sparse_step": 1,
    "mlp_only_layers": [], "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                "vocab_size", "max_position_embeddings", "sliding_window")


def test_a_small_source_keeps_every_shape_and_says_why():
    shrunk = shrink_config(SMALL_MOE_SOURCE, ShrinkOptions(), vocab_size=512, special_ids={"bos": 1, "eos": 2})
    assert shrunk.shapes["kept"] is True and shrunk.shapes["reasons"] == []
    assert "small enough" in shrunk.shapes["rule"] and "256" in shrunk.shapes["rule"]
    assert {k: shrunk.config[k] for k in SHAPE_FIELDS} == {k: SMALL_MOE_SOURCE[k] for k in SHAPE_FIELDS}
    assert not any(c.field in SHAPE_FIELDS for c in shrunk.changes)


def test_a_large_source_shrinks_as_before_and_lists_what_is_too_big():
    shrunk = shrink_config(FAMILY_CONFIGS["qwen2"], ShrinkOptions())
    assert shrunk.shapes["kept"] is False
    assert any(r.startswith("hidden_size 3584 > ") for r in shrunk.shapes["reasons"])
    assert any("layers, of which the layer rule keeps 2" in r for r in shrunk.shapes["reasons"])
    # 28/4 heads (ratio 7) -> 14/2 heads of head_dim 16, as before the small-source rule.
    assert (shrunk.config["num_attention_heads"], shrunk.config["hidden_size"]) == (14, 224)
    assert shrunk.config["num_hidden_layers"] == 2 and shrunk.config["intermediate_size"] == 448


@pytest.mark.parametrize("edit, reason", [
    ({"num_hidden_layers": 4}, "4 layers, of which the layer rule keeps 2"),
    ({"hidden_size": 512}, "hidden_size 512 > 256"),
    ({"num_experts": 64}, "num_experts 64 > 8"),
    ({"vocab_size": 300}, "below the trained tokenizer's 512 tokens"),
])
def test_one_size_over_its_bound_makes_tiny_shrink(edit, reason):
    shrunk = shrink_config(dict(SMALL_MOE_SOURCE, **edit), ShrinkOptions(), vocab_size=512)
    assert shrunk.shapes["kept"] is False and any(reason in r for r in shrunk.shapes["reasons"]), shrunk.shapes
    assert shrunk.config["sliding_window"] == max_compat.sliding_window_floor("float32")  # MAX's floor


def test_always_shrink_shrinks_a_small_source():
    shrunk = shrink_config(SMALL_MOE_SOURCE, ShrinkOptions(keep_small_source=False))
    assert shrunk.shapes == {"kept": False, "rule": shrunk.shapes["rule"], "reasons": ["--always-shrink"]}
    assert shrunk.config["sliding_window"] == max_compat.sliding_window_floor("float32")
    assert shrunk.config["head_dim"] == 16


def test_a_small_checkpoint_replica_keeps_its_shapes_in_manifest_and_text(checkpoint_factory, tmp_path):
    from make_tiny_model import describe_manifest

    source = checkpoint_factory("mistral", config_overrides={"sliding_window": 6, "head_dim": 32})
    original = json.loads((source / "config.json").read_text())
    manifest = build_replica(str(source), tmp_path / "kept", ReplicaOptions())
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "max_position_embeddings")
    assert {k: config.get(k) for k in fields} == {k: original.get(k) for k in fields}
    saved = json.loads((tmp_path / "kept" / MANIFEST).read_text())
    assert saved["shapes"]["kept"] is True and saved["shapes"] == manifest["shapes"]
    assert "shapes: kept from the source" in describe_manifest(manifest)
    cli = run_script("make_tiny_model", source, "--output", tmp_path / "shrunk", "--always-shrink")
    assert cli.returncode == 0, cli.stderr
    assert "shapes: shrunk (the source is not small enough to keep: --always-shrink)" in cli.stdout
    shrunk = json.loads((tmp_path / "shrunk" / "config.json").read_text())
    assert shrunk["sliding_window"] == max_compat.sliding_window_floor("float32")
