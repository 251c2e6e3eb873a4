"""Phase 1 tools: list-archs, inspect, list-keys and check-walls on tiny local and Hub checkpoints.

Checkpoints are tiny random models saved by transformers (see checkpoints.py),
native in MAX 26.7 (llama, qwen2, phi3, olmo2, granite, qwen3_moe) and not
(stablelm, arcee, gemma2, mixtral, bloom, falcon_mamba), plus .bin-only,
quantized-only, remote-code and custom-tokenizer variants made by editing a
copy. Each script's JSON answer is asserted exactly where it is stable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import REPO_ROOT, run_script

PHI3_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}


@pytest.fixture(scope="module")
def models(checkpoint_factory, tmp_path_factory):
    """Every checkpoint the tests use, by short name."""
    built = {name: checkpoint_factory(name, tokenizer=False)
             for name in ("llama", "qwen2", "olmo2", "granite", "qwen3_moe", "stablelm", "arcee", "gemma2",
                          "mixtral", "bloom", "falcon_mamba")}
    built["phi3"] = checkpoint_factory("phi3", tokenizer=False, config_overrides=PHI3_IDS)
    built["llama_bin"] = checkpoint_factory("llama", weights="bin", tokenizer=False)
    built["llama_sharded"] = checkpoint_factory("llama", tokenizer=False, max_shard_size="100KB")
    root = tmp_path_factory.mktemp("variants")

    def variant(name: str, base: str, edits: dict, remove: tuple[str, ...] = (), files: dict | None = None) -> None:
        folder = root / name
        shutil.copytree(built[base], folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(edits)
        for key in remove:
            config.pop(key, None)
        (folder / "config.json").write_text(json.dumps(config))
        for filename, content in (files or {}).items():
            (folder / filename).write_text(content)
        built[name] = folder

    variant("quant_only", "arcee", {"quantization_config": {"quant_method": "fp8"}}, remove=("dtype", "torch_dtype"))
    variant("gemma2_bf16", "gemma2", {"dtype": "bfloat16", "torch_dtype": "bfloat16"})
    variant("moe_gptq", "mixtral", {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    variant("remote_code", "arcee", {"architectures": ["AcmeForCausalLM"], "model_type": "acme",
                                     "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}})
    variant("unshipped_class", "arcee", {"architectures": ["AcmeForCausalLM"]})
    variant("custom_tokenizer", "arcee", {}, files={"tokenizer_config.json": json.dumps(
        {"tokenizer_class": "AcmeTokenizer"})})
    variant("falcon_alibi", "stablelm", {"architectures": ["FalconForCausalLM"], "model_type": "falcon",
                                         "alibi": True})
    variant("mpt_alibi", "stablelm", {"architectures": ["MptForCausalLM"], "model_type": "mpt",
                                      "attn_config": {"alibi": True, "alibi_bias_max": 8}})
    variant("encoder", "stablelm", {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    variant("seq2seq", "stablelm", {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
                                    "is_encoder_decoder": True})
    variant("nested_ssm", "stablelm", {"architectures": ["AcmeVLForConditionalGeneration"], "model_type": "acme_vl",
                                       "text_config": {"model_type": "jamba", "mamba_d_state": 16}})
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(built["arcee"] / "config.json", no_weights / "config.json")
    built["no_weights"] = no_weights
    return built


def walls(path: Path, *extra: str):
    result = run_script("check_walls", str(path), "--json", *extra)
    return result.returncode, [(f["code"], f["level"]) for f in result.json()["findings"]], result


# ------------------------------------------------------------------ list-archs

def test_list_archs_lists_every_registration_and_flags_module_v3():
    result = run_script("list_native_archs", "--json")
    assert result.returncode == 0, result.stderr
    rows = result.json()["architectures"]
    qwen3 = [(r["slug"], r["task"]) for r in rows if r["name"] == "Qwen3ForCausalLM"]
    assert qwen3 == [("qwen3", "text_generation"), ("qwen3_embedding", "embeddings_generation")]
    assert ("Qwen3MoeForCausalLM", "qwen3") in {(r["name"], r["slug"]) for r in rows}
    flagged = {r["name"] for r in rows if r["module_v3"]}
    assert "LlamaForCausalLM_ModuleV3" in flagged and "LlamaForCausalLM" not in flagged
    assert all(r["name"].endswith("_ModuleV3") == r["module_v3"] for r in rows)


def test_list_archs_match_hit_miss_and_hints():
    hit = run_script("list_native_archs", "--match", "Qwen3ForCausalLM", "--json")
    assert hit.returncode == 0
    assert [(r["slug"], r["task"]) for r in hit.json()["registrations"]] == [
        ("qwen3", "text_generation"), ("qwen3_embedding", "embeddings_generation")]
    miss = run_script("list_native_archs", "--match", "qwen3forcausallm", "--json")
    assert miss.returncode == 1
    assert miss.json()["registered"] is False and miss.json()["close_names"][0] == "Qwen3ForCausalLM"
    text = run_script("list_native_archs", "--match", "ArceeForCausalLM")
    assert text.returncode == 1 and "not registered" in text.stdout and "Close names:" in text.stdout


def test_list_archs_donors_report_measured_facts_only():
    result = run_script("list_native_archs", "--donors", "--json")
    assert result.returncode == 0
    donors = {d["slug"]: d for d in result.json()["donors"]}
    # Re-measured on MAX 26.7 with strong-init replicas (default-init ones hid the olmo2 divergence).
    assert {s for s, d in donors.items() if d["cpu_fp32"] == "match"} == {"llama3", "qwen2", "olmo", "olmo2", "granite"}
    assert not any(d["cpu_fp32"] == "diverged" for d in donors.values())
    assert {s for s, d in donors.items() if d["cpu_fp32"] == "fail"} == {"qwen3", "mistral", "gemma3", "phi3"}
    assert "allreduce" in donors["qwen3"]["cpu_fp32_note"] and "26.7" in donors["qwen3"]["cpu_fp32_note"]
    assert "partial_rotary_factor" in donors["phi3"]["cpu_fp32_note"]
    for slug, diff in (("llama3", "1.7e-05"), ("olmo2", "8e-06"), ("granite", "1.4e-05")):
        note = donors[slug]["cpu_fp32_note"]
        assert diff in note and "strong-init" in note and "MAX 26.7" in note, note
    assert donors["deepseekV3"]["cpu_fp32"] == "unmeasured" and donors["deepseekV3"]["cpu_fp32_note"] is None
    assert donors["granite"]["graph"] == "reuses llama3" and donors["llama3"]["graph"] == "own"
    assert donors["olmo2"]["graph"] == "own"
    assert not any(d["module_v3"] for d in donors.values())
    assert "eagle_llama3" not in donors  # speculative draft models are not donors
    with_v3 = run_script("list_native_archs", "--donors", "--include-module-v3", "--json").json()["donors"]
    assert "llama3_modulev3" in {d["slug"] for d in with_v3}


def test_list_archs_bad_input_and_missing_max(tmp_path):
    bad = run_script("list_native_archs", "--include-module-v3")
    assert bad.returncode == 3 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    fake = tmp_path / "max"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    missing = run_script("list_native_archs", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert missing.returncode == 3 and "error" in missing.json()


def test_list_archs_fast_path_matches_live_registry():
    """The ast fast path lists the same names and tasks that MAX's live registry holds."""
    code = ("import json; from max.pipelines import PIPELINE_REGISTRY as R; "
            "print(json.dumps(sorted({(a.name, a.task.value) for a in R.all_architectures()})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MAX_SERVE_DISABLE_TELEMETRY": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    live = {tuple(pair) for pair in json.loads(done.stdout.strip().splitlines()[-1])}
    rows = run_script("list_native_archs", "--json").json()["architectures"]
    fast = {(r["name"], r["task"]) for r in rows if not r["speculates_on"]}
    assert live <= fast
    assert {name for name, _ in live} == {name for name, _ in fast}


# ------------------------------------------------------------------ inspect

@pytest.mark.parametrize("name,arch,slug", [
    ("llama", "LlamaForCausalLM", "llama3"), ("qwen2", "Qwen2ForCausalLM", "qwen2"),
    ("phi3", "Phi3ForCausalLM", "phi3"), ("olmo2", "Olmo2ForCausalLM", "olmo2"),
    ("granite", "GraniteForCausalLM", "granite"), ("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3"),
])
def test_inspect_native_guard_stops_with_serve_command(models, name, arch, slug):
    result = run_script("inspect_hf", str(models[name]), "--json")
    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["architecture"] == arch and report["native"]["registered"] is True
    assert [r["slug"] for r in report["native"]["registrations"]] == [slug]
    assert report["native"]["serve_commands"]["cpu_fp32"] == (
        f"max serve --model {models[name]} --devices cpu --quantization-encoding float32")
    assert "delta_signals" not in report and "stop" in report


GEMMA2_SIGNALS = {"gqa", "sliding_window", "per_layer_attention", "logit_softcap", "attn_softcap", "activation",
                  "tied_embeddings", "attention_scaling", "attention_scale", "norm_offset", "embedding_scale",
                  "sandwich_norm"}
MIXTRAL_SIGNALS = {"gqa", "moe", "topk_softmax_router", "router_renormalize"}


@pytest.mark.parametrize("name,device,signals,top", [
    ("arcee", "cpu", {"gqa", "activation", "mlp_ungated"}, "llama3"),  # ReLU^2 MLP without a gate
    # olmo's LayerNorm has no weights (ConstantLayerNorm): it must not win for StableLM's weighted LayerNorm.
    ("stablelm", "cpu", {"gqa", "partial_rotary", "layernorm"}, "llama3"),
    ("gemma2_bf16", "gpu", GEMMA2_SIGNALS, "gemma3"),
    ("gemma2", "gpu", GEMMA2_SIGNALS, "llama3"),  # a float32 checkpoint: gemma3 has bfloat16 only
    ("gemma2", "cpu", GEMMA2_SIGNALS, "llama3"),  # gemma3 has no float32 encoding: last on the CPU
    ("mixtral", "gpu", MIXTRAL_SIGNALS, "qwen3"),  # Qwen3MoEGate: softmax, top-k, renormalize (as Mixtral)
    ("mixtral", "cpu", MIXTRAL_SIGNALS, "llama3"),  # every MoE donor needs GPU kernels on MAX 26.7
])
def test_inspect_delta_signals_and_donor(models, name, device, signals, top):
    report = run_script("inspect_hf", str(models[name]), "--device", device, "--json").json()
    assert report["native"]["registered"] is False
    assert {s["code"] for s in report["delta_signals"]} == signals
    assert report["donor_ranking"][0]["slug"] == top
    assert report["chosen_donor"]["slug"] == top
    keys = {row["key"] for row in report["config_keys"]}
    config = json.loads((models[name] / "config.json").read_text())
    assert set(config) <= keys  # every top-level key is mapped


@pytest.mark.parametrize("name,wall", [("mpt_alibi", "alibi"), ("falcon_alibi", "alibi"), ("bloom", "alibi"),
                                       ("falcon_mamba", "ssm_recurrence")])
def test_inspect_stops_on_walls_before_donor_advice(models, name, wall):
    """A stop finding (nested attn_config.alibi here too) ends inspect with check-walls' exit 2, no advice."""
    result = run_script("inspect_hf", str(models[name]), "--json")
    report = result.json()
    assert result.returncode == report["exit_code"] == report["walls"]["exit_code"] == 2
    assert wall in {f["code"] for f in report["walls"]["findings"] if f["level"] == "stop"}
    assert "donor_ranking" not in report and "delta_signals" not in report and "stop" in report
    text = run_script("inspect_hf", str(models[name]))
    assert text.returncode == 2 and "STOP:" in text.stdout and "Donor ranking" not in text.stdout
    assert text.stdout.index("Walls") < text.stdout.index("STOP:")


def test_inspect_moe_on_cpu_ranks_runnable_dense_donors_first(models):
    """No MoE donor (GPU-only kernels on MAX 26.7) above a CPU-measured dense donor, and the reason is printed."""
    report = run_script("inspect_hf", str(models["mixtral"]), "--json").json()
    ranking = report["donor_ranking"]
    blocked = [i for i, r in enumerate(ranking) if r["blockers"]]
    runnable = [i for i, r in enumerate(ranking) if not r["blockers"]]
    assert runnable and all(i < j for i in runnable for j in blocked)
    assert ranking[0]["cpu_fp32"] == "match"
    for donor in ranking:
        assert all(any(b in reason for reason in donor["reasons"]) for b in donor["blockers"])
    text = run_script("inspect_hf", str(models["mixtral"]), "--device", "cpu").stdout
    for donor in ranking:
        if donor["blockers"]:
            line = next(l for l in text.splitlines() if f". {donor['slug']} (score" in l)
            assert "ranked below every runnable donor on cpu" in line


def _rank(*codes: str, model_type: str | None = None, limit: int = 5, device: str = "gpu") -> list:
    """Donors ranked for these signal codes; on a GPU by default, so that the traits alone decide."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals
    import max_registry

    signals = [delta_signals.Signal(code, code) for code in codes]
    return delta_signals.rank_donors(signals, max_registry.donors(), model_type, limit=limit, device=device)


@pytest.mark.parametrize("codes,top,outscored", [
    # Mixtral: softmax top-k routing is what qwen3's Qwen3MoEGate does; minimax_m2/llama4 route by sigmoid.
    (("gqa", "moe"), "qwen3", {"minimax_m2", "gpt_oss", "llama4"}),
    # Llama-like (granite and phi3 tie with llama3: same graph; see the tie-break test).
    ((), "llama3", {"qwen2", "olmo", "mistral"}),
    (("gqa", "activation"), "llama3", {"qwen2", "olmo", "mistral"}),
    # MAX 26.7 phi3 builds full RoPE only: partial rotary gives phi3 no edge over llama3.
    (("gqa", "partial_rotary"), "llama3", {"minimax_m2", "qwen2", "olmo"}),
    # Per-head QK-norm is qwen3; full-width QK-norm with post-norm is olmo2.
    (("gqa", "qk_norm"), "qwen3", {"olmo2", "olmo3", "minimax_m2"}),
    (("qk_norm", "qk_norm_full_width", "post_norm"), "olmo2", {"qwen3"}),
    (("gqa", "sliding_window", "per_layer_attention", "logit_softcap", "attn_softcap", "activation",
      "norm_offset", "embedding_scale", "sandwich_norm", "attention_scaling"), "gemma3", {"gpt_oss"}),
    (("mla", "moe", "shared_experts", "router"), "deepseekV2", {"qwen3"}),
    # A LayerNorm with nothing to learn (no norm tensors) is what olmo's ConstantLayerNorm implements.
    (("layernorm", "layernorm_weightless"), "olmo", {"llama3", "qwen2"}),
    (("layernorm",), "llama3", {"olmo"}),
])
def test_rank_donors_top_choice(codes, top, outscored):
    ranked = _rank(*codes, limit=50)
    assert ranked[0].slug == top, [(r.slug, r.score) for r in ranked]
    scores = {r.slug: r.score for r in ranked}
    assert outscored <= set(scores)
    assert all(scores[slug] < ranked[0].score for slug in outscored), scores


def test_a_donor_covers_a_code_only_in_the_models_form():
    """olmo2's QK-norm spans all heads: for a per-head QK-norm it is work to do, not "already implements"
    (Exaone 4 dogfood); qwen3's per-head one does not cover a full-width one either."""
    per_head = {r.slug: r for r in _rank("qk_norm", "post_norm", limit=50)}
    assert "qk_norm" in per_head["olmo2"].missing and "qk_norm" not in per_head["olmo2"].covered
    assert "qk_norm" in per_head["qwen3"].covered
    full = {r.slug: r for r in _rank("qk_norm", "qk_norm_full_width", "post_norm", limit=50)}
    assert {"qk_norm", "qk_norm_full_width"} <= set(full["olmo2"].covered)
    assert "qk_norm" in full["qwen3"].missing


def test_rank_donors_ties_prefer_the_graph_owner():
    """granite builds exactly the llama3 graph, so they tie; llama3 owns it and goes first.

    phi3 builds the same graph too but fails on the CPU (partial rotary + LongRoPE), so it scores lower."""
    for codes in ((), ("gqa", "partial_rotary")):
        ranked = _rank(*codes, limit=50)
        assert [r.slug for r in ranked[:2]] == ["llama3", "granite"]
        scores = {r.slug: r.score for r in ranked}
        assert scores["llama3"] == scores["granite"] == scores["phi3"] + 2
    assert _rank(model_type="granite")[0].slug == "granite"  # the family bonus breaks the tie


def test_rank_donors_router_and_cpu_reasons():
    mixtral = {r.slug: r for r in _rank("gqa", "moe")}
    assert mixtral["qwen3"].covered == ["moe", "topk_softmax_router"]
    assert any("Mixtral-style" in reason for reason in mixtral["qwen3"].reasons)
    cpu = _rank("gqa", "moe", device="cpu", limit=50)
    qwen3 = next(r for r in cpu if r.slug == "qwen3")
    assert any("allreduce" in reason for reason in qwen3.reasons) and qwen3.blockers
    # on the CPU every donor that runs ranks above qwen3, which fails there (and needs GPU MoE kernels)
    assert all(not r.blockers for r in cpu[:cpu.index(qwen3)])
    assert any("GPU-only MoE kernels" in b for b in qwen3.blockers)
    explicit_router = {r.slug: r for r in _rank("gqa", "moe", "router", limit=50)}
    assert explicit_router["qwen3"].covered == ["moe", "router"]  # router keys present: no Mixtral assumption
    olmo2 = {r.slug: r for r in _rank("qk_norm", "qk_norm_full_width", "post_norm")}["olmo2"]
    assert olmo2.cpu_fp32 == "match" and any("matches HF on CPU fp32" in r for r in olmo2.reasons)


# The llama3-graph donors (and lfm2, which calls the same create_rope_embedding) size RoPE from hidden / heads.
HEAD_DIM_IGNORED = {"llama3", "granite", "phi3", "qwen2", "olmo", "lfm2"}
HEAD_DIM_HONOURED = {"mistral", "qwen3", "gemma3", "olmo2", "olmo3", "gpt_oss", "llama4", "minimax_m2"}


def test_an_explicit_head_dim_is_a_need_for_donors_whose_rope_ignores_it():
    """Ernie 4.5 dogfood: head_dim x heads != hidden_size was "baseline", so a llama3 port silently built a RoPE
    table hidden / heads wide. Now it is ranked: the llama3-graph donors need it, with the one-line fix."""
    ranked = {r.slug: r for r in _rank("gqa", "head_dim_override", limit=50)}
    for slug in HEAD_DIM_IGNORED & set(ranked):
        assert "head_dim_override" in ranked[slug].missing, slug
        hint = next(r for r in ranked[slug].reasons if r.startswith("fix for head_dim_override:"))
        assert "head_dim=config.kv_params.head_dim" in hint, slug
    for slug in HEAD_DIM_HONOURED:
        assert "head_dim_override" in ranked[slug].covered, slug
        assert not any(r.startswith("fix for") for r in ranked[slug].reasons), slug
    plain = {r.slug: r.score for r in _rank("gqa", limit=50)}
    assert ranked["mistral"].score == plain["mistral"] + 2 and ranked["llama3"].score == plain["llama3"] - 1
    # optional: a model whose head_dim is hidden / heads pays nothing for it (the tie-breaks stay the same)
    assert [r.slug for r in _rank(limit=50)][:2] == ["llama3", "granite"]


def test_head_dim_traits_match_the_max_source():
    """The trait is read from MAX: llama3's graph calls create_rope_embedding, which has no head_dim parameter,
    while each donor listed as honouring it passes head_dim (or MLA's qk_rope_head_dim) to its RoPE table."""
    import ast

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import max_registry

    arch = max_registry.architectures_dir()
    tree = ast.parse((arch / "llama3" / "model_config.py").read_text())
    create = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "create_rope_embedding")
    assert "head_dim" not in [a.arg for a in create.args.args + create.args.kwonlyargs]
    for slug in HEAD_DIM_IGNORED - {"granite", "phi3", "qwen2", "olmo"}:  # those four build llama3's graph
        graph = (arch / slug / f"{slug}.py").read_text()
        assert "create_rope_embedding(" in graph, slug
        assert "head_dim_override" not in max_registry.DONOR_TRAITS[slug].features, slug
    for slug, traits in max_registry.DONOR_TRAITS.items():
        if "head_dim_override" not in traits.features:
            continue
        assert "head_dim_override" in traits.optional, slug
        graph = (arch / slug / f"{slug}.py").read_text()
        assert "head_dim=" in graph or "qk_rope_head_dim" in graph or slug == "nemotron_h", slug
    assert HEAD_DIM_HONOURED <= {s for s, t in max_registry.DONOR_TRAITS.items() if "head_dim_override" in t.features}


def test_rank_donors_sigmoid_router_picks_deepseek_v3():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals
    import max_registry

    def signals(scoring: str) -> list:
        router = delta_signals.Signal("router", "router", [f"config: scoring_func={scoring!r}"])
        return [delta_signals.Signal(code, code) for code in ("mla", "moe", "shared_experts")] + [router]

    sigmoid = delta_signals.rank_donors(signals("sigmoid"), max_registry.donors(), device="gpu")
    assert sigmoid[0].slug == "deepseekV3" and "sigmoid_router" in sigmoid[0].covered
    assert sigmoid[0].score > {r.slug: r.score for r in sigmoid}["deepseekV2"]
    softmax = delta_signals.rank_donors(signals("softmax"), max_registry.donors(), device="gpu")
    assert softmax[0].slug == "deepseekV2"  # DeepSeek-V2's gate is softmax (deepseekV2/layers/moe_gate.py)


def test_donor_traits_match_max_source():
    """Spot-checks of facts read from the MAX 26.7 source (see max_registry.DONOR_TRAITS)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import max_registry

    traits = max_registry.DONOR_TRAITS
    assert "partial_rotary" not in traits["phi3"].features and "partial_rotary" in traits["minimax_m2"].features
    assert not {"logit_softcap", "attn_softcap", "attention_scaling"} & traits["gemma3"].features
    assert {"qk_norm_full_width"} <= traits["olmo2"].features and "qk_norm_full_width" not in traits["qwen3"].features
    assert "topk_softmax_router" in traits["qwen3"].features
    assert not any("topk_softmax_router" in traits[s].features for s in ("minimax_m2", "llama4", "deepseekV3"))
    assert all("sigmoid_router" in traits[s].features for s in ("minimax_m2", "llama4", "deepseekV3", "nemotron_h"))
    assert not any("sigmoid_router" in traits[s].features for s in ("qwen3", "deepseekV2", "gpt_oss"))
    assert "moe" in traits["qwen3"].optional and "moe" not in traits["minimax_m2"].optional
    assert traits["granite"].features == traits["llama3"].features == traits["phi3"].features
    assert "attention_bias" in traits["qwen2"].features and "attention_bias" not in traits["llama3"].features
    assert all(t.optional <= t.features for t in traits.values())
    donors = {d.slug for d in max_registry.donors()}
    assert set(traits) <= donors  # every catalogued donor is a text-generation family of MAX 26.7


def test_full_width_qk_norm_signal_from_tensor_shape():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals
    from model_source import TensorInfo

    config = {"model_type": "acme", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}

    def codes(width: int) -> set[str]:
        name = "model.layers.0.self_attn.q_norm.weight"
        tensors = {name: TensorInfo(name, "F32", (width,), "model.safetensors")}
        return {s.code for s in delta_signals.detect(config, tensors)}

    assert codes(64) == {"qk_norm", "qk_norm_full_width"}
    assert codes(16) == {"qk_norm"}
    assert "qk_norm_full_width" not in {s.code for s in delta_signals.detect(config)}


def test_a_window_no_layer_uses_is_not_a_sliding_window_signal():
    """Mellum and Dots1 keep a default sliding_window while every layer type is full_attention (was a signal)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals

    base = {"model_type": "acme", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}

    def codes(**edits) -> set[str]:
        return {s.code for s in delta_signals.detect(dict(base, **edits))}

    full = ["full_attention", "full_attention"]
    assert "sliding_window" not in codes(sliding_window=1024, layer_types=full)
    assert "sliding_window" not in codes(sliding_window=4096, max_window_layers=2, layer_types=full)
    assert "sliding_window" in codes(sliding_window=1024)  # no per-layer kinds: every layer slides (Mistral)
    assert "sliding_window" in codes(sliding_window=1024, layer_types=["sliding_attention", "full_attention"])
    assert "sliding_window" in codes(attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"])


@pytest.mark.parametrize("model_type, architecture, code, edits", [
    # GraniteMoE divides the logits by logits_scaling, whose default is 1
    ("granitemoe", "GraniteMoeForCausalLM", "logit_scale", {"logits_scaling": 8.0}),
    # MiniMax-M2 slices a rotary part of each head; its default RoPE covers the whole head
    ("minimax_m2", "MiniMaxM2ForCausalLM", "partial_rotary",
     {"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5}}),
])
def test_a_code_signal_whose_config_value_changes_nothing_is_dropped(model_type, architecture, code, edits):
    """Code that scales the logits by a config value of 1 (or rotates a fraction 1 of each head) gives a port
    nothing to get wrong on this model; the bench counted the mutation's honest "not applicable" as a missed
    signal."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals
    import hf_reference
    import hf_source

    config = hf_reference.config_for_model(model_type).to_dict()
    config["architectures"] = [architecture]

    def codes(c: dict) -> set[str]:
        return {s.code for s in delta_signals.detect(c, None, hf_source.read_model(c))}

    assert code not in codes(config)
    assert code in codes(dict(config, **edits))


def test_inspect_config_map_and_candidate_deltas(models):
    report = run_script("inspect_hf", str(models["stablelm"]), "--json").json()
    rows = {row["key"]: row for row in report["config_keys"]}
    assert rows["hidden_size"]["status"] == "donor_config"
    assert rows["hidden_size"]["read_at"][0].startswith("architectures/llama3/model_config.py:")
    assert rows["initializer_range"]["status"] == "training_only"
    assert rows["rope_parameters.rope_theta"]["status"] in ("donor_config", "donor_code")
    unread = report["chosen_donor"]["unread_candidate_deltas"]
    assert {"partial_rotary_factor", "layer_norm_eps", "use_qkv_bias", "qk_layernorm"} <= set(unread)
    assert "hidden_size" not in unread
    # Signals come from tensors where the config is silent: the q_norm weights of qwen3_moe, norm biases here.
    evidence = {s["code"]: s["evidence"] for s in report["delta_signals"]}
    assert any(e.startswith("tensor: model.layers.0.input_layernorm.bias") for e in evidence["layernorm"])


def test_inspect_tensor_signals_where_config_is_silent(models):
    with_tensors = run_script("inspect_hf", str(models["mixtral"]), "--json").json()
    moe = {s["code"]: s for s in with_tensors["delta_signals"]}["moe"]
    assert any(e.startswith("tensor: ") and ".experts." in e for e in moe["evidence"])
    config_only = run_script("inspect_hf", str(models["mixtral"]), "--no-tensors", "--json").json()
    moe_config = {s["code"]: s for s in config_only["delta_signals"]}["moe"]
    assert all(e.startswith(("config: ", "code: ")) for e in moe_config["evidence"])
    assert any(e.startswith("code: models/mixtral/modeling_mixtral.py:") for e in moe_config["evidence"])
    assert config_only["tensors"] == "skipped (--no-tensors)"


def test_inspect_donor_override_and_bad_input(models, tmp_path):
    report = run_script("inspect_hf", str(models["arcee"]), "--donor", "qwen2", "--json").json()
    assert report["chosen_donor"]["slug"] == "qwen2" and report["chosen_donor"]["config_class"] == "Qwen2Config"
    bad = run_script("inspect_hf", str(models["arcee"]), "--donor", "nope", "--json")
    assert bad.returncode == 3 and "nope" in bad.json()["error"]
    missing = run_script("inspect_hf", str(tmp_path / "absent"), "--json")
    assert missing.returncode == 3 and "not found" in missing.json()["error"]
    (tmp_path / "config.json").write_text("{not json")
    broken = run_script("inspect_hf", str(tmp_path))
    assert broken.returncode == 3 and "not valid JSON" in broken.stderr and "Traceback" not in broken.stderr


# ------------------------------------------------------------------ list-keys

def _expected_parameters(folder: Path) -> tuple[int, int]:
    count = params = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():
                count += 1
                shape = handle.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                params += size
    return count, params


def test_list_keys_summary_exact(models):
    for name, sharded in (("llama", False), ("llama_sharded", True)):
        result = run_script("list_checkpoint_keys", str(models[name]), "--summary", "--json")
        assert result.returncode == 0, result.stderr
        summary = result.json()
        count, params = _expected_parameters(models[name])
        assert (summary["tensor_count"], summary["parameter_count"]) == (count, params)
        assert summary["dominant_dtype"] == "F32" and summary["format"] == "safetensors"
        assert summary["sharded"] is sharded and (len(summary["files"]) > 1) is sharded


def test_list_keys_group_prefix_exclude_limit(models):
    groups = run_script("list_checkpoint_keys", str(models["qwen3_moe"]), "--group", "--json").json()["groups"]
    by_pattern = {g["pattern"]: g for g in groups}
    assert by_pattern["model.layers.{0..1}.mlp.experts.{0..3}.up_proj.weight"]["count"] == 8
    assert by_pattern["model.layers.{0..1}.self_attn.q_norm.weight"]["shapes"] == [[16]]
    rows = run_script("list_checkpoint_keys", str(models["llama"]), "--prefix", "model.layers.1.",
                      "--exclude-prefix", "model.layers.1.mlp", "--json").json()
    assert [r["name"] for r in rows["tensors"]] == [
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    assert rows["tensors"][2]["shape"] == [32, 64] and rows["tensors"][2]["dtype"] == "F32"
    limited = run_script("list_checkpoint_keys", str(models["llama"]), "--limit", "2")
    assert limited.returncode == 0 and limited.stdout.splitlines()[-1].startswith("... ")
    assert len(limited.stdout.splitlines()) == 3


def test_list_keys_non_safetensors_and_bad_input(models):
    result = run_script("list_checkpoint_keys", str(models["llama_bin"]), "--json")
    assert result.returncode == 2 and result.json()["format"] == "bin"
    assert run_script("list_checkpoint_keys", str(models["llama"]), "--limit", "0").returncode == 3


# ------------------------------------------------------------------ check-walls

@pytest.mark.parametrize("name,code,findings", [
    ("llama", 0, [("native", "note")]),
    ("arcee", 0, []),
    ("stablelm", 0, []),
    ("gemma2", 0, []),
    ("mixtral", 0, []),
    ("bloom", 2, [("alibi", "stop")]),
    ("falcon_alibi", 2, [("alibi", "stop")]),
    ("mpt_alibi", 2, [("alibi", "stop")]),
    ("falcon_mamba", 2, [("ssm_recurrence", "stop")]),
    ("nested_ssm", 2, [("ssm_recurrence", "stop"), ("class_not_in_transformers", "warn")]),
    ("llama_bin", 2, [("bin_only", "stop"), ("native", "note")]),
    ("no_weights", 2, [("no_weights", "stop")]),
    ("quant_only", 2, [("quantized_only", "stop")]),
    ("moe_gptq", 2, [("moe_quant_unsupported", "stop"), ("quantized_weights", "note")]),
    ("remote_code", 1, [("remote_code", "warn")]),
    ("unshipped_class", 1, [("class_not_in_transformers", "warn")]),
    ("custom_tokenizer", 1, [("custom_tokenizer", "warn")]),
    ("encoder", 1, [("not_causal_lm", "warn")]),
    ("seq2seq", 1, [("not_causal_lm", "warn")]),
])
def test_check_walls_catalogue(models, name, code, findings):
    returncode, found, result = walls(models[name])
    assert (returncode, found) == (code, findings), result.stdout
    for finding in result.json()["findings"]:
        assert "\n" not in finding["message"] and finding["reference"] in finding["message"]
        assert (REPO_ROOT / finding["reference"]).is_file()


def _default_config(model_type: str, **edits) -> dict:
    """transformers' default config for ``model_type`` (config.json form, causal-LM class named), edited."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import hf_reference

    config = json.loads(json.dumps(hf_reference.config_for_model(model_type).to_diff_dict(), default=str))
    return config | {"architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]], "model_type": model_type} | edits


@pytest.mark.parametrize("model_type,edits,expected", [
    ("xlnet", {}, "attn_type"),  # XLNet's default attn_type "bi" builds no causal mask
    ("xlm", {}, "causal"),  # XLM's default causal=false: a masked LM
    ("cpmant", {}, "attends both ways"),
    ("gemma4_assistant", {}, "draft head"),
    ("gemma4_unified_assistant", {}, "draft head"),
    ("xlnet", {"attn_type": "uni"}, None),  # the causal variants are decoder-only
    ("xlm", {"causal": True}, None),
    ("gpt2", {}, None),
])
def test_not_causal_lm_refuses_bidirectional_and_draft_head_families(model_type, edits, expected):
    """The decoder-only rule refuses, from the config, families whose causal-LM class attends both ways or
    is a draft head fed by another model's states; the flag that makes XLNet/XLM causal lifts it."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import hf_source
    import wall_scan

    config = _default_config(model_type, **edits)
    why = wall_scan.not_causal_lm(config, config["architectures"][0], hf_source.read_model(config))
    assert (why is None) if expected is None else (why and expected in why), why


def test_not_causal_lm_refuses_audio_codebooks_by_type_and_lfm2_moe_is_a_recurrent_wall():
    """MusicGen's composite default config cannot be built without its text encoder, so the type alone
    refuses it; LFM2-MoE's short-conv layers are the same recurrent wall as LFM2's."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import hf_source
    import wall_scan

    for model_type, arch in (("musicgen", "MusicgenForCausalLM"), ("musicgen_melody", "MusicgenMelodyForCausalLM")):
        bare = {"model_type": model_type, "architectures": [arch]}
        assert "audio-codebook" in wall_scan.not_causal_lm(bare, arch, hf_source.read_model(bare))
    lfm2_moe = _default_config("lfm2_moe")
    assert "ssm_recurrence" in {f.code for f in wall_scan.config_walls(lfm2_moe, native=False)}


def test_blt_is_not_one_decoder_stack_and_hrm_text_is_a_recurrent_wall():
    """BLT (patcher + local encoder/decoder around a global transformer) is refused as not decoder-only;
    HRM's weight-shared stacks looped H_cycles x L_cycles times are a recurrent wall (both were tool errors)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import hf_source
    import wall_scan

    blt = _default_config("blt")
    assert "byte latent" in wall_scan.not_causal_lm(blt, blt["architectures"][0], hf_source.read_model(blt))
    hrm = _default_config("hrm_text")
    assert wall_scan.not_causal_lm(hrm, hrm["architectures"][0], hf_source.read_model(hrm)) is None
    assert "ssm_recurrence" in {f.code for f in wall_scan.config_walls(hrm, native=False)}


def test_hyper_connection_streams_are_a_stop_wall_and_altup_streams_are_not():
    """DeepSeek-V4's hyper-connections (4 residual streams mixed around every sublayer, and an attention the
    resolver does not describe) are a stop wall unless MAX registers the class (was a tool error in the
    family coverage: "cannot resolve the part model.hc_head"); Gemma 3n's AltUp streams are handled."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import wall_scan

    def codes(config, native=False):
        return {f.code: f for f in wall_scan.config_walls(config, native=native)}

    wall = codes(_default_config("deepseek_v4"))[wall_scan.RESIDUAL_STREAMS]
    assert wall.level == wall_scan.STOP and "several residual streams (hyper-connections: hc_mult=4)" in wall.message
    assert wall_scan.RESIDUAL_STREAMS not in codes(_default_config("deepseek_v4"), native=True)
    assert wall_scan.RESIDUAL_STREAMS not in codes(_default_config("deepseek_v4", hc_mult=1))  # one stream
    for model_type in ("gemma3n_text", "gemma3n", "llama"):
        assert wall_scan.RESIDUAL_STREAMS not in codes(_default_config(model_type)), model_type


def test_mllama_is_a_vision_conditioned_stack_not_one_decoder():
    """Mllama's causal-LM class mixes self-attention blocks with gated cross-attention blocks that read
    image-encoder states (skipped on text alone); it is refused as not decoder-only (was a tool error:
    "no list of 4 blocks with an attention module")."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import hf_source
    import wall_scan

    mllama = _default_config("mllama")
    arch = "MllamaForCausalLM"
    assert "cross-attention" in wall_scan.not_causal_lm(mllama, arch, hf_source.read_model(mllama))
    text = {**mllama["text_config"], "architectures": [arch]}
    assert "cross-attention" in wall_scan.not_causal_lm(text, arch, hf_source.read_model(text))


def test_check_walls_text_and_scan_function(models):
    result = run_script("check_walls", str(models["bloom"]))
    assert result.returncode == 2 and result.stdout.startswith("STOP  alibi: ")
    assert "references/recognize-walls.md" in result.stdout
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import wall_scan
    import model_source

    findings = wall_scan.scan_walls(model_source.resolve(str(models["remote_code"])))
    assert [f.code for f in findings] == ["remote_code"] and wall_scan.exit_code_for(findings) == 1


def test_check_walls_large_model_from_header_metadata(hub, tmp_path):
    """A 40B-parameter checkpoint is recognised from its safetensors header alone (on the Hub: a ranged
    read of the header; a local file this short would be refused as truncated)."""
    import struct

    size = 200000 * 200000 * 2  # BF16
    header = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [200000, 200000], "data_offsets": [0, size]}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["AcmeForCausalLM"], "model_type": "llama"}))
    hub.add_repo("org/huge", tmp_path)
    result = run_script("check_walls", "org/huge", "--json", env=hub.env())
    found = [(f["code"], f["level"]) for f in result.json()["findings"]]
    assert result.returncode == 1 and ("large_model", "warn") in found, result.stderr
    assert "references/distributed-transformer.md" in result.stdout
    local = run_script("check_walls", str(tmp_path), "--json")
    assert local.returncode == 3 and "past the end" in local.json()["error"]


# ------------------------------------------------------------------ Hub path

def test_phase1_scripts_on_the_hub_read_no_weights(hub, models):
    hub.add_repo("org/tiny-stablelm", models["stablelm"])
    hub.add_repo("org/tiny-bloom", models["bloom"])
    env = hub.env()
    keys = run_script("list_checkpoint_keys", "org/tiny-stablelm", "--summary", "--json", env=env)
    assert keys.returncode == 0, keys.stderr
    assert keys.json()["tensor_count"] == _expected_parameters(models["stablelm"])[0]
    report = run_script("inspect_hf", "org/tiny-stablelm", "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert {s["code"] for s in report.json()["delta_signals"]} == {"gqa", "partial_rotary", "layernorm"}
    wall = run_script("check_walls", "org/tiny-bloom", "--json", env=env)
    assert wall.returncode == 2 and [f["code"] for f in wall.json()["findings"]] == ["alibi"]
    assert not any(f.endswith(".safetensors") for f in hub.downloaded_files())
    absent = run_script("check_walls", "org/absent", "--json", env=env)
    assert absent.returncode == 3 and "not found" in absent.json()["error"]


def test_weightless_layernorm_signal_needs_a_checkpoint_without_norm_tensors():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals
    from model_source import TensorInfo

    def tensors(*names: str) -> dict:
        return {n: TensorInfo(n, "F32", (4,), "model.safetensors") for n in names}

    config = {"architectures": ["X"], "layer_norm_eps": 1e-5}
    weighted = tensors("model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.bias",
                       "model.layers.0.self_attn.q_proj.weight")
    assert {s.code for s in delta_signals.detect(config, weighted)} >= {"layernorm"}
    assert "layernorm_weightless" not in {s.code for s in delta_signals.detect(config, weighted)}
    # Config says LayerNorm and the checkpoint has no norm tensors at all: OLMo-1 style.
    weightless = {s.code for s in delta_signals.detect(config, tensors("model.layers.0.self_attn.q_proj.weight"))}
    assert {"layernorm", "layernorm_weightless"} <= weightless
    # RMSNorm eps spelled layer_norm_epsilon (Mamba) with norm weights: neither signal.
    mamba = {s.code for s in delta_signals.detect({"architectures": ["X"], "layer_norm_epsilon": 1e-5},
                                                  tensors("backbone.layers.0.norm.weight"))}
    assert not {"layernorm", "layernorm_weightless"} & mamba


def test_inspect_lists_verified_ports_with_the_deltas_they_cover(tmp_path, checkpoint_factory):
    """The dogfood agent never saw the worked port from inspect: it printed only native donors."""
    model = checkpoint_factory("stablelm")  # LayerNorm + partial rotary: what the worked port implements
    result = run_script("inspect_hf", model, "--json")
    assert result.returncode in (0, 1), result.stderr
    starts = result.json()["verified_ports"]
    assert starts and starts[0]["slug"] == "stablelm" and starts[0]["path"] == "templates/ports/stablelm"
    assert {"layernorm", "partial_rotary"} <= set(starts[0]["covers"])
    text = run_script("inspect_hf", model)
    assert "scaffold --start-from PATH" in text.stdout and "templates/ports/stablelm" in text.stdout


def test_head_dim_override_evidence_shows_the_exact_ratio():
    """Seed-OSS dogfood: "hidden_size/heads 6" hid that 128 / 20 heads is 6.4 (no whole head size at all)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import delta_signals

    config = {"model_type": "seed_oss", "hidden_size": 128, "num_attention_heads": 20, "num_key_value_heads": 2,
              "head_dim": 16}
    (signal,) = [s for s in delta_signals.detect(config) if s.code == "head_dim_override"]
    assert "128/20 = 6.4" in signal.detail, signal
