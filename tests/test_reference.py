"""The HF reference every check compares against (issue 13): eager attention, no verdict when flat, cap ties.

The served side in these tests is a STAND-IN, not MAX (tests/openai_standin.py):
a loopback OpenAI-compatible server that answers in MAX's format (echo,
logprobs, at most 7 top entries keyed by decoded text) with logprobs from a
second run of the model, transformers' eager path on the same weights. The
"wrong port" variants are the same weights with a config field changed (the
attention cap removed, the final cap changed). No MAX graph is compiled here,
so these are ordinary tests; what they prove is about the reference and the
verdict rules, which is the point of the issue.

Replicas come from transformers' default Gemma-2 config (attention cap 50,
final cap 30), shrunk by ``tiny`` with its peaked init.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import port_compare
import hf_reference
import tolerances
from cli_support import ScriptError
from conftest import run_script
from openai_standin import OpenAIStandin

PROMPT = "The capital of France is Paris. Once upon a time there was a little robot"
SATURATION = 10.0  # final norm x10: logits reach 9x the final cap, where tanh is exactly 1.0 in float32
CHANGED_FINAL_CAP = 25.0


# --- replicas ------------------------------------------------------------------------------


def gemma2_source() -> dict:
    import transformers

    config = transformers.Gemma2Config().to_dict()
    config["architectures"] = ["Gemma2ForCausalLM"]
    return config


def edit_weights(base: Path, output: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(base, output)
    tensors = load_file(output / "model.safetensors")
    edit(tensors)
    save_file(tensors, output / "model.safetensors", metadata={"format": "pt"})
    return output


def _zero_embeddings(tensors: dict) -> None:
    tensors["model.embed_tokens.weight"] = np.zeros_like(tensors["model.embed_tokens.weight"])


def _saturate_final_norm(tensors: dict) -> None:
    weight = tensors["model.norm.weight"]  # Gemma norms compute x * (1 + w)
    tensors["model.norm.weight"] = ((1.0 + weight) * SATURATION - 1.0).astype(weight.dtype)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Path]:
    from make_tiny_model import ReplicaOptions, build_replica

    root = tmp_path_factory.mktemp("reference")
    base = root / "gemma2"
    build_replica(gemma2_source(), base, ReplicaOptions())
    return {"base": base, "zeroed": edit_weights(base, root / "gemma2_zeroed", _zero_embeddings),
            "saturated": edit_weights(base, root / "gemma2_saturated", _saturate_final_norm)}


def served_port(replica: Path, **config_edits):
    """A stand-in 'port' of ``replica``: transformers eager on its weights, with ``config_edits`` applied."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(replica)
    for key, value in config_edits.items():
        setattr(config, key, value)
    model = hf_reference.load(str(replica), config=config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(replica)
    rows = int(model.get_output_embeddings().weight.shape[0])
    decoded = tokenizer.batch_decode([[i] for i in range(rows)], skip_special_tokens=True)
    return OpenAIStandin(lambda ids: hf_reference.logprob_rows(model, ids), decoded, served_name="port")


def compare_cli(replica: Path, standin: OpenAIStandin, *extra: str):
    result = run_script("compare_layers", str(replica), "--base-url", standin.base_url, "--slug", "port",
                        "--prompt", PROMPT, "--max-new-tokens", "6", "--json", *extra)
    return result, (result.json() if result.stdout.strip() else None)


def compare_lib(replica: Path, standin: OpenAIStandin, **kwargs):
    return port_compare.run_compare(str(replica), standin.base_url, "port", [PROMPT], max_new_tokens=6, **kwargs)


# --- the loader ----------------------------------------------------------------------------


def test_loader_uses_eager_by_default_and_reaches_the_model(replicas):
    model = hf_reference.load(str(replicas["base"]))
    assert hf_reference.DEFAULT_ATTN_IMPLEMENTATION == "eager"
    assert model.config._attn_implementation == "eager" and not model.training
    assert next(model.parameters()).dtype.__repr__() == "torch.float32"
    sdpa = hf_reference.load(str(replicas["base"]), attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"


def test_sdpa_drops_the_attention_cap_on_gemma2(replicas, capsys):
    """The measured reason for eager: sdpa's logits are the cap-removed model's, not the model's."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(replicas["base"])
    ids = tokenizer(PROMPT)["input_ids"]
    eager = hf_reference.load(str(replicas["base"]))
    sdpa = hf_reference.load(str(replicas["base"]), attn_implementation="sdpa")
    config = transformers.AutoConfig.from_pretrained(replicas["base"])
    config.attn_logit_softcapping = None
    uncapped = hf_reference.load(str(replicas["base"]), config=config)
    with torch.no_grad():
        logits = {name: m(input_ids=torch.tensor([ids])).logits[0] for name, m in
                  (("eager", eager), ("sdpa", sdpa), ("uncapped", uncapped))}
    sdpa_vs_eager = float((logits["sdpa"] - logits["eager"]).abs().max())
    sdpa_vs_uncapped = float((logits["sdpa"] - logits["uncapped"]).abs().max())
    with capsys.disabled():
        print(f"\nGemma-2 replica logits: max |sdpa - eager| {sdpa_vs_eager:.3g}, "
              f"max |sdpa - cap removed| {sdpa_vs_uncapped:.3g}")
    assert sdpa_vs_eager > 1.0
    assert sdpa_vs_uncapped < 1e-2


def test_an_implementation_the_machine_cannot_run_is_one_line_exit_3(replicas):
    with pytest.raises(ScriptError, match="flash_attention_2") as caught:
        hf_reference.load(str(replicas["base"]), attn_implementation="flash_attention_2")
    assert "\n" not in str(caught.value)
    with pytest.raises(ScriptError, match="not one of"):
        hf_reference.load(str(replicas["base"]), attn_implementation="fast")


def test_a_model_that_reports_other_attention_is_refused_not_switched():
    class Config:
        _attn_implementation = "sdpa"

    class Model:
        config = Config()

    with pytest.raises(ScriptError, match="with attention 'sdpa', not 'eager'"):
        hf_reference._confirm(Model(), "eager", "m")


# --- flatness ----------------------------------------------------------------------------


def test_spread_is_zero_for_uniform_rows_and_shift_invariant():
    uniform = np.full((4, 512), -np.log(512))
    assert hf_reference.reference_spread(uniform) == pytest.approx(0.0, abs=1e-12)
    rows = np.array([[0.0, -1.0, -2.0], [3.0, 3.0, 0.0]])
    assert hf_reference.reference_spread(rows) == pytest.approx(hf_reference.reference_spread(rows + 7.0))
    assert hf_reference.reference_spread(rows) == pytest.approx(((0 + 1) + (3 - 2)) / 2)
    with pytest.raises(ScriptError, match=hf_reference.FLAT_MESSAGE):
        hf_reference.check_not_flat(uniform)
    assert tolerances.FLAT_REFERENCE_SPREAD == pytest.approx(0.1)


def test_zeroed_embeddings_are_flat_and_the_strong_replica_is_not(replicas, capsys):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(replicas["base"])
    ids = tokenizer(PROMPT)["input_ids"]
    spreads = {name: hf_reference.reference_spread(hf_reference.logprob_rows(hf_reference.load(str(replicas[name])),
                                                                              ids))
               for name in ("zeroed", "base")}
    with capsys.disabled():
        print(f"\nreference spread: zeroed embeddings {spreads['zeroed']:.3g}, peaked replica {spreads['base']:.3g}")
    assert hf_reference.is_flat(spreads["zeroed"]) and spreads["zeroed"] < 1e-6
    assert not hf_reference.is_flat(spreads["base"]) and spreads["base"] > 10.0
    manifest = json.loads((replicas["base"] / "tiny_replica.json").read_text())
    assert manifest["reference_spread"] > tolerances.FLAT_REFERENCE_SPREAD


def test_tiny_refuses_to_build_a_flat_replica(tmp_path, monkeypatch):
    import replica_init
    from make_tiny_model import ReplicaOptions, build_replica

    real = replica_init.initialize

    def zeroing(model, config, options, ids):
        settings = real(model, config, options, ids)
        model.get_input_embeddings().weight.data.zero_()
        return settings

    monkeypatch.setattr(replica_init, "initialize", zeroing)
    with pytest.raises(ScriptError, match=hf_reference.FLAT_MESSAGE):
        build_replica(gemma2_source(), tmp_path / "flat", ReplicaOptions())
    assert not (tmp_path / "flat").exists()


def test_sensitivity_report_fails_a_flat_replica(replicas):
    from replica_sensitivity import sensitivity_report

    report = sensitivity_report(replicas["zeroed"])
    assert report.flat and not report.passed and report.failures()[0] == "flat reference"
    assert report.to_dict()["reference_spread"] < tolerances.FLAT_REFERENCE_SPREAD
    assert "reference spread" in report.table()


# --- Done when (a): the attention cap, through compare ---------------------------------------


def test_correct_capped_port_matches_with_default_flags(replicas):
    with served_port(replicas["base"]) as standin:
        result, doc = compare_cli(replicas["base"], standin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert doc["verdict"] == "MATCH" and doc["attn_implementation"] == "eager"
    assert doc["reference_spread"] > tolerances.FLAT_REFERENCE_SPREAD


def test_compare_without_prompts_adds_the_window_probe_of_a_sliding_window_replica(replicas):
    """The CLI's default battery is shorter than any window: the replica's probe prompt must be added
    (the Exaone 4 dogfood found the CLI never added it; only the library call did)."""
    import json

    probe = json.loads((replicas["base"] / "tiny_replica.json").read_text())["prompt"]
    with served_port(replicas["base"]) as standin:
        result = run_script("compare_layers", str(replicas["base"]), "--base-url", standin.base_url, "--slug",
                            "port", "--max-new-tokens", "1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    prompts = [run["prompt"] for run in result.json()["prompts"]]
    assert probe in prompts and len(prompts) == len(port_compare.COHERENCE_BATTERY) + 1


def test_port_without_the_attention_cap_diverges_with_default_flags(replicas):
    with served_port(replicas["base"], attn_logit_softcapping=None) as standin:
        result, doc = compare_cli(replicas["base"], standin)
    assert result.returncode == 1, result.stderr[-2000:]
    assert doc["verdict"] == "DIVERGED" and doc["max_abs_diff"] > 1.0


def test_sdpa_reference_shows_the_old_bug(replicas):
    """With --attn-implementation sdpa the reference drops the cap: the correct port looks DIVERGED."""
    with served_port(replicas["base"]) as standin:
        report = compare_lib(replicas["base"], standin, attn_implementation="sdpa")
        eager = compare_lib(replicas["base"], standin)
    assert report.verdict == "DIVERGED" and report.attn_implementation == "sdpa"
    assert eager.verdict == "MATCH" and eager.max_abs_diff < tolerances.logprob_atol("float32")
    assert "attention sdpa" in port_compare.format_report(report)


# --- Done when (b): a flat reference is refused ---------------------------------------------


@pytest.fixture(scope="module")
def zeroed_port(replicas, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flatport")
    result = run_script("scaffold", replicas["zeroed"], "--start-from", "llama3", "--output-dir", out,
                        "--slug", "zz_flat_port")
    assert result.returncode == 0, result.stderr
    return out / "zz_flat_port"


def test_compare_exits_3_on_a_flat_reference(replicas):
    with served_port(replicas["zeroed"]) as standin:
        result, doc = compare_cli(replicas["zeroed"], standin)
    assert result.returncode == 3
    assert hf_reference.FLAT_MESSAGE in doc["error"] and hf_reference.REPLICA_DOCS in doc["error"]
    assert len(result.stderr.strip().splitlines()) == 1


def test_layer_diff_exits_3_on_a_flat_reference(replicas, zeroed_port):
    result = run_script("layer_diff", replicas["zeroed"], "--port-dir", zeroed_port, "--json")
    assert result.returncode == 3, result.stderr[-2000:]
    assert hf_reference.FLAT_MESSAGE in result.json()["error"]


def test_layer_diff_refuses_before_building_any_max_graph(replicas, zeroed_port, monkeypatch):
    import argparse

    import layer_diff
    import max_hidden_states

    def no_graph(*args, **kwargs):
        raise AssertionError("layer-diff built the capture graph of a flat reference")

    monkeypatch.setattr(max_hidden_states, "capture_port", no_graph)
    parser = argparse.ArgumentParser()
    layer_diff.add_arguments(parser)
    args = parser.parse_args([str(replicas["zeroed"]), "--port-dir", str(zeroed_port)])
    with pytest.raises(ScriptError, match=hf_reference.FLAT_MESSAGE):
        layer_diff.main(args)


def test_gates_preflight_fails_a_flat_reference(replicas, zeroed_port):
    result = run_script("run_oss_gates", replicas["zeroed"], "--port-dir", zeroed_port, "--phase", "preflight",
                        "--json")
    doc = result.json()
    check = next(c for c in doc["checks"] if c["name"] == "reference")
    assert result.returncode == 1 and check["status"] == "fail"
    assert hf_reference.FLAT_MESSAGE in check["summary"]


# --- Done when (c): exact ties at a final cap --------------------------------------------------


def test_port_with_many_exact_ties_at_the_final_cap_matches_with_ties_counted(replicas, capsys):
    with served_port(replicas["saturated"]) as standin:
        result, doc = compare_cli(replicas["saturated"], standin)
    assert result.returncode == 0, result.stderr[-2000:] or result.stdout[-2000:]
    run = doc["prompts"][0]
    greedy = [p for p in run["positions"] if p["phase"] == "greedy"]
    with capsys.disabled():
        print(f"\nsaturated Gemma-2 replica: {doc['tie_count']} tie positions "
              f"({sum(p['tie'] for p in greedy)} of {len(greedy)} greedy), max |d| {doc['max_abs_diff']:.3g}")
    assert doc["verdict"] == "MATCH"
    assert doc["tie_count"] == run["tie_count"] > 0
    assert any(p["tie"] and p["token_id"] != p["hf_top1"] for p in greedy)  # the greedy tokens really differ
    assert run["greedy_compared"] == 6  # compared past every accepted tie


def test_port_with_a_changed_final_cap_diverges(replicas):
    with served_port(replicas["saturated"], final_logit_softcapping=CHANGED_FINAL_CAP) as standin:
        report = compare_lib(replicas["saturated"], standin)
    assert report.verdict == "DIVERGED"
    assert report.first_divergence["reason"] == "logprob"


def test_max_config_shims_do_not_replace_transformers_classes(tmp_path):
    """Importing max.pipelines registers MAX's own deepseek_v4 config over transformers' (exist_ok=True);
    the reference still builds and reloads transformers' class. In-process: importing max here puts the shim in
    effect whatever ran before (children of the full CI suite could not import transformers; cause not found)."""
    import importlib

    import transformers

    importlib.import_module("max.pipelines.architectures")  # registers MAX's config shims

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "vocab_size": 64}))
    shim = transformers.AutoConfig.for_model("deepseek_v4")
    built = hf_reference.config_for_model("deepseek_v4")
    loaded = hf_reference.load_config(str(tmp_path))
    # the shim is in effect (if MAX stops shadowing the class this test has nothing to guard)
    assert type(shim) is not transformers.DeepseekV4Config
    assert type(built) is transformers.DeepseekV4Config and type(loaded) is transformers.DeepseekV4Config
    assert loaded.vocab_size == 64
