"""Tests for replica_sensitivity: every mutation ends moved, not applicable (with why) or a tool error.

Replicas are built here from transformers' default configs with small explicit sizes (never full size),
peaked-initialized by ``replica_init`` and saved with a trained tokenizer, so these tests do not depend
on tiny's shrinking rules. Each report is computed once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import replica_sensitivity
from replica_sensitivity import (NotDecoderOnly, Outcome, SensitivityToolError, Verdict, decoder_only_refusal,
                                 sensitivity_report)

COMMON = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
# Small sizes per layout; the comment says what layout each one stands for.
LAYOUTS: dict[str, tuple[str, dict]] = {
    # model.layers, separate q/k/v/o, GQA ratio 2
    "llama": ("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}),
    # GQA with the output projection named `dense`, parallel by construction, partial rotary
    "phi": ("phi", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 256}),
    # gpt_neox.layers, fused per-head query_key_value, rotary_pct, use_parallel_residual flag
    "gpt_neox": ("gpt_neox", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "max_position_embeddings": 256}),
    # the same layout made sequential by its flag
    "gpt_neox_sequential": ("gpt_neox", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "max_position_embeddings": 256,
                                         "use_parallel_residual": False}),
    # transformer.h, Conv1D, learned positions (no offset), activation_function gelu_new
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    # transformer.h, parallel by construction (no flag), rotary_dim with the RoPE base fixed in the code
    "gptj": ("gptj", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8}),
    # fused QKV grouped per KV head (new decoder architecture), key `activation`
    "falcon": ("falcon", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "new_decoder_architecture": True, "num_kv_heads": 2}),
    # norm_epsilon, learned-free, GQA
    "starcoder2": ("starcoder2", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                                  "sliding_window": None}),
    # weightless LayerNorm with the eps fixed in its code (no eps key)
    "olmo": ("olmo", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "max_position_embeddings": 256}),
    # logit_scale, parallel by construction, interleaved RoPE
    "cohere": ("cohere", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}),
    # explicit head_dim (heads x head_dim != hidden), per-head q/k norms
    "qwen3": ("qwen3", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256}),
    # MoE with a gated shared expert, softmax router, norm_topk_prob key
    "qwen2_moe": ("qwen2_moe", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 64, "max_position_embeddings": 256,
                                "sliding_window": None}),
    # MoE that always renormalizes (no norm_topk_prob key)
    "mixtral": ("mixtral", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                            "num_experts_per_tok": 2, "max_position_embeddings": 256, "sliding_window": None}),
    # learned positions with an offset of 2
    "opt": ("opt", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "word_embed_proj_dim": 64, "max_position_embeddings": 256}),
    # a use_parallel_residual flag
    "stablelm": ("stablelm", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
                              "use_parallel_residual": True}),
    # router returns logits only; the experts get (hidden, indices, weights) x routed_scaling_factor, sigmoid;
    # an odd head_dim (17) with partial_rotary_factor 0.5
    "glm4_moe": ("glm4_moe", {"hidden_size": 68, "intermediate_size": 64, "moe_intermediate_size": 16,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 17, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                              "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                              "max_position_embeddings": 256}),
    # router (GraniteMoeTopKGating) returns sorted flat gates and a sorting permutation
    "granitemoe": ("granitemoe", {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                                  "num_experts_per_tok": 2, "max_position_embeddings": 256}),
    # router returns dense sigmoid scores; weightless L2 qk_norm; chunked attention
    "llama4_text": ("llama4_text", {"hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1,
                                    "max_position_embeddings": 256, "attention_chunk_size": 8}),
    # sparsemixer router: scoring and top-2 fixed by construction (top-k: the last pick dropped)
    "phimoe": ("phimoe", {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                          "max_position_embeddings": 256, "sliding_window": None}),
    # rotary fraction 1.0 and modeling code that cannot run a smaller one
    "gpt_neox_japanese": ("gpt_neox_japanese", {"hidden_size": 64, "intermediate_multiple_size": 2,
                                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "max_position_embeddings": 256}),
    # experts gate x * sigmoid(1.702 x): hidden_act is not read
    "gpt_oss": ("gpt_oss", {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
                            "num_experts_per_tok": 2, "max_position_embeddings": 256, "sliding_window": 8}),
    # layer_norm_eps in the config, nn.LayerNorm(dim) with torch's eps in the code
    "biogpt": ("biogpt", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "max_position_embeddings": 256}),
    # MoE output normalized before the residual add (post_feedforward_layernorm)
    "flex_olmo": ("flex_olmo", {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
                                "num_experts_per_tok": 2, "max_position_embeddings": 256}),
}


def build(folder: Path, model_type: str, sizes: dict) -> Path:
    """A peaked replica of ``model_type`` at ``sizes`` in ``folder`` (config, weights, trained tokenizer)."""
    import torch
    import transformers

    import hf_reference
    from replica_init import PROMPT, InitOptions, initialize, quiet_transformers
    from tiny_tokenizer import train_bpe_tokenizer

    quiet_transformers()
    vocab = train_bpe_tokenizer(folder, vocab_size=512)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab, **COMMON, **sizes)
    config.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    torch.manual_seed(0)
    model = hf_reference.from_config(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    initialize(model, config, InitOptions(), torch.tensor([tokenizer(PROMPT)["input_ids"]]))
    model.save_pretrained(folder)
    return folder


class Reports:
    """Each layout's replica and report, built once on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.folders: dict[str, Path] = {}
        self.reports: dict[str, object] = {}

    def folder(self, layout: str) -> Path:
        if layout not in self.folders:
            model_type, sizes = LAYOUTS[layout]
            self.folders[layout] = build(self.root / layout, model_type, sizes)
        return self.folders[layout]

    def report(self, layout: str):
        if layout not in self.reports:
            self.reports[layout] = sensitivity_report(self.folder(layout))
        return self.reports[layout]

    def row(self, layout: str, name: str):
        return next(m for m in self.report(layout).mutations if m.name == name)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Reports:
    return Reports(tmp_path_factory.mktemp("sensitivity"))


def test_every_mutation_names_a_delta_code_or_is_a_baseline():
    from delta_codes import DeltaCode

    names = [m.name for m in replica_sensitivity.MUTATIONS]
    assert len(names) == len(set(names))
    for mutation in replica_sensitivity.MUTATIONS:
        assert mutation.code is None or isinstance(mutation.code, DeltaCode)
    baseline = {m.name for m in replica_sensitivity.MUTATIONS if m.code is None}
    assert baseline == {"rope_theta x0.05", "norm eps x100", "one layer perturbed"}


# (layout, mutation, expected kind): each mutation proven on a layout where it applies.
MOVES = [
    ("llama", "rope_theta x0.05", "config edit"),
    ("gptj", "rope_theta x0.05", "structural edit"),  # base fixed in the code: sin/cos tables rebuilt
    ("gpt_neox", "partial_rotary_factor", "config edit"),
    ("gptj", "partial_rotary_factor", "config edit"),  # rotary_dim
    ("starcoder2", "norm eps x100", "config edit"),  # regression: the key is norm_epsilon
    ("olmo", "norm eps x100", "structural edit"),  # no key: measured eps of a weightless LayerNorm
    ("llama", "norm weight offset", "weight edit"),
    ("gpt2", "activation swap", "config edit"),  # regression: the key is activation_function
    ("falcon", "activation swap", "config edit"),  # regression: the key is activation
    ("gpt2", "exact vs tanh GELU", "config edit"),
    ("llama", "tie vs untie", "weight edit"),
    ("cohere", "logit scale removed", "config edit"),
    ("gptj", "parallel vs sequential", "structural edit"),  # regression: parallel by construction
    ("cohere", "parallel vs sequential", "structural edit"),
    ("phi", "parallel vs sequential", "structural edit"),
    ("gpt_neox", "parallel vs sequential", "structural edit"),  # use_parallel_residual=True
    ("falcon", "parallel vs sequential", "structural edit"),  # parallel whatever parallel_attn says
    ("stablelm", "parallel vs sequential", "structural edit"),  # use_parallel_residual=True, probed parallel
    ("gpt_neox_sequential", "parallel vs sequential", "config edit"),  # a sequential block with a flag
    ("phi", "GQA head mapping", "weight edit"),  # regression: the output projection is `dense`
    ("falcon", "GQA head mapping", "weight edit"),  # fused QKV grouped per KV head
    ("llama", "GQA head mapping", "weight edit"),
    ("qwen3", "head_dim from hidden", "structural edit"),
    ("gpt_neox", "RoPE style", "weight edit"),  # fused per-head QKV
    ("cohere", "RoPE style", "weight edit"),
    ("gpt2", "learned positions", "structural edit"),
    ("qwen2_moe", "MoE top-k", "config edit"),
    ("qwen2_moe", "router kind", "structural edit"),
    ("mixtral", "router kind", "structural edit"),
    ("qwen2_moe", "router renormalization", "structural edit"),
    ("mixtral", "router renormalization", "structural edit"),  # no key: the router always renormalizes
    ("qwen2_moe", "shared-expert gate", "structural edit"),
    ("llama", "one layer perturbed", "weight edit"),
]


@pytest.mark.parametrize("layout, name, kind", MOVES)
def test_mutation_moves_where_it_applies(reports, layout, name, kind):
    row = reports.row(layout, name)
    assert row.outcome is Outcome.MOVED, (row.outcome, row.delta, row.reason)
    assert row.kind == kind and row.delta >= row.threshold > 0


# Regressions of the last coverage run (each was a tool error or a blind replica): (layout, mutation, kind).
REGRESSION_MOVES = [
    ("glm4_moe", "partial_rotary_factor", "config edit"),  # was: the mutant crashed (odd rotary dim 17)
    ("glm4_moe", "router kind", "structural edit"),  # was: router returns only its logits
    ("glm4_moe", "router renormalization", "structural edit"),
    ("granitemoe", "router kind", "structural edit"),  # was: cannot find the MoE routers
    ("granitemoe", "router renormalization", "structural edit"),
    ("llama4_text", "router kind", "structural edit"),  # was: router returns dense scores
    ("llama4_text", "router renormalization", "structural edit"),
    ("llama4_text", "qk-norm eps x100", "structural edit"),  # was: not applicable (one qk_norm module)
    ("llama4_text", "sliding window removed", "config edit"),  # was: not applicable (chunked attention)
    ("gpt_oss", "activation swap", "structural edit"),  # was: blind (hidden_act is not read)
    ("biogpt", "norm eps x100", "structural edit"),  # was: blind (layer_norm_eps is not read)
    # was: not applicable while inspect reports moe (top-2 fixed in the sparsemixer): the last pick dropped
    ("phimoe", "MoE top-k", "structural edit"),
]


@pytest.mark.parametrize("layout, name, kind", REGRESSION_MOVES)
def test_regressions_of_the_coverage_run_move(reports, layout, name, kind):
    row = reports.row(layout, name)
    assert row.outcome is Outcome.MOVED, (row.outcome, row.delta, row.reason)
    assert row.kind == kind and row.delta >= row.threshold > 0


def test_the_router_probe_reads_each_convention_and_its_scale(reports):
    """GLM-4-MoE: sigmoid, renormalized, x routed_scaling_factor; Granite: softmax of the top-k logits."""
    import hf_reference

    found = {}
    for layout in ("glm4_moe", "granitemoe", "llama4_text", "qwen2_moe"):
        model = hf_reference.load(str(reports.folder(layout)))
        subject = replica_sensitivity.Subject(model.config, model, layout)
        found[layout] = replica_sensitivity._router_probe(subject)[0]
    conventions = replica_sensitivity.RouterConvention
    assert found["glm4_moe"].convention is conventions.EXPERTS_INPUT
    assert (found["glm4_moe"].kind, found["glm4_moe"].normalized) == ("sigmoid", True)
    assert found["glm4_moe"].scale == pytest.approx(model_scale(reports, "glm4_moe"), rel=1e-4)
    assert found["granitemoe"].convention is conventions.SORTED_GATES
    assert (found["granitemoe"].kind, found["granitemoe"].normalized) == ("softmax", True)
    assert found["llama4_text"].convention is conventions.DENSE_SCORES
    assert (found["llama4_text"].kind, found["llama4_text"].normalized) == ("sigmoid", False)
    assert found["qwen2_moe"].convention is conventions.ROUTER_TUPLE


def model_scale(reports, layout: str) -> float:
    return json.loads((reports.folder(layout) / "config.json").read_text())["routed_scaling_factor"]


# Not applicable by construction, with the reason (was a tool error or a blind replica).
BY_CONSTRUCTION = [
    ("phimoe", "router kind", "sparsemixer"),
    ("phimoe", "router renormalization", "sparsemixer"),
    ("gpt_neox_japanese", "partial_rotary_factor", "no fraction below 1 runs"),
    ("flex_olmo", "router renormalization", "norm before the residual add"),
]


@pytest.mark.parametrize("layout, name, words", BY_CONSTRUCTION)
def test_a_feature_fixed_by_construction_is_not_applicable(reports, layout, name, words):
    row = reports.row(layout, name)
    assert row.outcome is Outcome.NOT_APPLICABLE and words in row.reason, (row.outcome, row.reason)


def test_the_fixed_by_construction_tables_name_real_families():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tables = (replica_sensitivity.ROUTER_SCORING_FIXED, replica_sensitivity.TOPK_FIXED,
              replica_sensitivity.WHOLE_HEAD_ROTARY_ONLY)
    assert all(family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES for table in tables for family in table)


# (layout, mutation, words the reason must contain)
NOT_APPLICABLE = [
    ("gpt2", "rope_theta x0.05", "no RoPE"),
    ("llama", "partial_rotary_factor", "whole head"),
    ("llama", "sliding window removed", "no sliding window"),
    ("llama", "exact vs tanh GELU", "not a GELU"),
    ("llama", "logit scale removed", "no logit scale"),
    ("llama", "parallel vs sequential", "sequential (probed"),
    ("gpt_neox", "GQA head mapping", "MHA or MQA"),
    ("llama", "head_dim from hidden", "equals hidden_size"),
    ("llama", "qk-norm eps x100", "no q/k norm"),
    ("llama", "learned positions", "no absolute position embedding"),
    ("llama", "MoE top-k", "not a mixture of experts"),
    ("llama", "router kind", "not a mixture of experts"),
    ("mixtral", "shared-expert gate", "no shared expert"),
]


@pytest.mark.parametrize("layout, name, words", NOT_APPLICABLE)
def test_not_applicable_says_why(reports, layout, name, words):
    row = reports.row(layout, name)
    assert row.outcome is Outcome.NOT_APPLICABLE and words in row.reason, (row.outcome, row.reason)
    assert row.delta is None and row.applicable is False and row.passed is None


def test_a_report_without_tool_errors_lists_every_mutation_once(reports):
    report = reports.report("phi")
    assert [m.name for m in report.mutations] == [m.name for m in replica_sensitivity.MUTATIONS]
    assert report.verdict is not Verdict.TOOL_ERROR and not report.tool_errors
    document = report.to_dict()
    assert document["verdict"] in ("PASSED", "FAILED") and document["tool_errors"] == []
    assert {row["outcome"] for row in document["mutations"]} <= {o.value for o in Outcome}
    json.dumps(document)


def test_opt_learned_position_offset_is_dropped(reports):
    row = reports.row("opt", "learned positions")
    assert row.outcome in (Outcome.MOVED, Outcome.DID_NOT_MOVE) and row.delta > 0, row.reason
    model = __import__("hf_reference").load(str(reports.folder("opt")))
    layout = replica_sensitivity.Subject(model.config, model, "opt").layout
    assert layout.position_offset == 2 and layout.position_embedding.endswith("embed_positions")
    assert model.get_submodule(layout.position_embedding).offset == 2


def test_a_part_the_tool_cannot_edit_is_a_tool_error_not_a_failed_replica(reports, monkeypatch):
    folder = reports.folder("phi")
    import model_anatomy

    # As if the resolver did not know `dense`: the layout cannot be resolved, and the row names the part.
    monkeypatch.setattr(model_anatomy, "OUTPUT_NAMES", ("o_proj",))
    with pytest.raises(SensitivityToolError) as caught:
        sensitivity_report(folder)
    assert caught.value.exit_code == 3
    assert "GQA head mapping" in str(caught.value) and "dense" in str(caught.value)
    report = sensitivity_report(folder, raise_on_tool_error=False)
    row = next(m for m in report.mutations if m.name == "GQA head mapping")
    assert row.outcome is Outcome.TOOL_ERROR and "model.layers.0.self_attn.dense" in row.reason
    assert report.verdict is Verdict.TOOL_ERROR and not report.passed
    assert "GQA head mapping" not in report.failures()  # not a failed replica
    last = report.table().splitlines()[-1]
    assert last.startswith("TOOL ERROR") and "PASSED" not in last and "FAILED" not in last


def test_a_mutant_that_crashes_is_a_tool_error(reports, monkeypatch):
    def broken(subject):
        def edit(model, config):
            raise RuntimeError("shape mismatch in the mutant")
        return edit
    mutation = replica_sensitivity.Mutation("broken", None, replica_sensitivity.EditKind.WEIGHT, "raises", broken)
    monkeypatch.setattr(replica_sensitivity, "MUTATIONS", [mutation])
    report = sensitivity_report(reports.folder("llama"), raise_on_tool_error=False)
    assert report.mutations[0].outcome is Outcome.TOOL_ERROR
    assert "RuntimeError: shape mismatch" in report.mutations[0].reason


def test_an_unknown_fused_layout_is_a_tool_error(reports, monkeypatch):
    import model_anatomy

    layouts = {k: v for k, v in model_anatomy.FUSED_QKV_LAYOUTS.items() if k != "gpt_neox"}
    monkeypatch.setattr(model_anatomy, "FUSED_QKV_LAYOUTS", layouts)
    report = sensitivity_report(reports.folder("gpt_neox"), raise_on_tool_error=False)
    row = next(m for m in report.mutations if m.name == "RoPE style")
    assert row.outcome is Outcome.TOOL_ERROR and "fused q/k/v layout" in row.reason


@pytest.mark.parametrize("model_type", ["bert", "bart", "big_bird", "roberta"])
def test_encoder_and_encoder_decoder_configs_are_refused_before_loading(tmp_path, monkeypatch, model_type):
    import transformers

    import hf_reference

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(hf_reference, "load", no_load)
    with pytest.raises(NotDecoderOnly) as caught:
        sensitivity_report(tmp_path)
    assert caught.value.exit_code == 2 and "decoder-only" in str(caught.value)


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama", "gpt2", "falcon", "opt"])
def test_decoder_only_families_are_not_refused(model_type):
    import transformers

    assert decoder_only_refusal(transformers.AutoConfig.for_model(model_type).to_dict()) is None


def test_bert_with_is_decoder_true_is_a_decoder():
    assert decoder_only_refusal({"model_type": "bert", "is_decoder": True}) is None
    assert "encoder-decoder" in decoder_only_refusal({"model_type": "llama", "is_encoder_decoder": True})


@pytest.mark.parametrize("model_type, name, outcome, words", [
    ("gemma4_text", "RoPE style", Outcome.MOVED, ""),  # global layers have their own head size and rotary dim
    ("moshi", "tie vs untie", Outcome.NOT_APPLICABLE, "differ in shape"),  # was: crashed (513 vs 512 rows)
    # Emu3 keeps its composite config: rope_parameters live in text_config (was: edited nothing, delta 0)
    ("emu3", "rope_theta x0.05", Outcome.MOVED, ""),
    # Moshi windows only in its flash path; the eager reference attends to the whole prefix (was: did not move)
    ("moshi", "sliding window removed", Outcome.NOT_APPLICABLE, "flash-attention path"),
    # GIT's BERT-style blocks resolve (was: a tool error at the attention output projection)
    ("git", "learned positions", Outcome.MOVED, ""),
    ("git", "norm eps x100", Outcome.MOVED, ""),
    # Gemma 3n (was: "cannot resolve the part model.altup_projections"): its strict config refuses None for
    # final_logit_softcapping, so the cap is made unbounded; its blocks map 4 AltUp streams, so the parallel
    # probe (one block input) does not apply; its KV-sharing layers' keys are reordered in their source layer
    ("gemma3n_text", "final softcap removed", Outcome.MOVED, ""),
    ("gemma3n_text", "parallel vs sequential", Outcome.NOT_APPLICABLE, "keeps 4 residual streams"),
    ("gemma3n_text", "RoPE style", Outcome.MOVED, ""),
    # OpenAI GPT's attention returns a list (was: "can't multiply sequence by non-int of type 'float'")
    ("openai-gpt", "parallel vs sequential", Outcome.NOT_APPLICABLE, "sequential"),
    # top-1 renormalized routing: the one pick's weight is 1 under any scoring (was: a blind mutation)
    ("dbrx", "router kind", Outcome.NOT_APPLICABLE, "top-1 routing"),
    # LongCat-Flash's experts cannot run top-1: k goes 2 -> 3 (was: the mutant crashed)
    ("longcat_flash", "MoE top-k", Outcome.MOVED, ""),
    # A norm-input floor no weight reaches (fixed sinusoidal table; post-LN attention biases) bounds any eps
    # bug, on the model as on the replica: compare's tolerance is the bar (was: "blind to: norm eps x100")
    ("ctrl", "norm eps x100", Outcome.MOVED, "bounded: the fixed position table"),
    ("xglm", "norm eps x100", Outcome.MOVED, "bounded: the fixed position table"),
    ("openai-gpt", "norm eps x100", Outcome.MOVED, "bounded: the attention biases"),
    ("gpt2", "norm eps x100", Outcome.MOVED, ""),
])
def test_default_config_replicas_of_the_coverage_run(tmp_path, monkeypatch, model_type, name, outcome, words):
    """tiny's replica of transformers' default config (as the coverage bench builds it), one mutation."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from bench_family_coverage import default_config
    from make_tiny_model import ReplicaOptions, build_replica

    config, _ = default_config(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    build_replica(config, tmp_path / model_type, ReplicaOptions())
    monkeypatch.setattr(replica_sensitivity, "MUTATIONS", [m for m in replica_sensitivity.MUTATIONS if m.name == name])
    row = sensitivity_report(tmp_path / model_type, raise_on_tool_error=False).mutations[0]
    assert row.outcome is outcome and words in row.reason, (row.outcome, row.reason)


def test_an_eps_fixed_in_code_equal_to_the_key_is_edited_in_the_modules(tmp_path, monkeypatch):
    """CTRL's blocks build nn.LayerNorm(d, eps=1e-6) and layer_norm_epsilon=1e-6 reaches only the final
    norm: the key edit left the block norms alone (delta exactly 0.0); now the norms' eps are scaled."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from bench_family_coverage import default_config
    from make_tiny_model import ReplicaOptions, build_replica

    config, _ = default_config("ctrl", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["ctrl"])
    build_replica(config, tmp_path / "ctrl", ReplicaOptions())
    monkeypatch.setattr(replica_sensitivity, "MUTATIONS",
                        [m for m in replica_sensitivity.MUTATIONS if m.name == "norm eps x100"])
    row = sensitivity_report(tmp_path / "ctrl", raise_on_tool_error=False).mutations[0]
    assert row.kind == "structural edit" and row.delta > 0, (row.kind, row.delta)
