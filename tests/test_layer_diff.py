"""layer-diff without MAX compiles: stage comparison, divergence description, report text, bad input."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

import layer_diff
import max_hidden_states
from conftest import REPO_ROOT, run_script
from max_hidden_states import Stage, stage_order, tap_names

TOL = 1e-3


def test_stage_order_puts_sublayers_before_their_block():
    names = [s.name for s in stage_order(2, sublayer=True)]
    assert names == ["embedding", "block.0.attention", "block.0.mlp", "block.0", "block.1.attention",
                     "block.1.mlp", "block.1", "final_norm", "logits"]
    assert [s.name for s in stage_order(2, sublayer=False)] == ["embedding", "block.0", "block.1",
                                                                 "final_norm", "logits"]
    assert stage_order(2, True)[2] == Stage("block.0.mlp", 0, "mlp")


def test_tap_names_follow_the_module_attributes():
    blocks = [SimpleNamespace(self_attn=object(), mlp=object()) for _ in range(2)]
    root = SimpleNamespace(embed_tokens=object(), layers=blocks, norm=object())
    names = tap_names(root, sublayer=True)
    assert names[id(root.embed_tokens)] == "embedding"
    assert names[id(blocks[1])] == "block.1"
    assert names[id(blocks[1].self_attn)] == "block.1.attention"
    assert names[id(blocks[0].mlp)] == "block.0.mlp"
    assert names[id(root.norm)] == "final_norm"
    assert len(tap_names(root, sublayer=False)) == 4  # embedding, 2 blocks, norm


def test_compare_stage_within_and_beyond_tolerance():
    rng = np.random.default_rng(0)
    want = rng.normal(size=(5, 8)).astype(np.float32)
    close = compare(want.astype(np.float64) * (1 + 1e-6), want)
    assert close.within_tolerance and close.first_position is None
    assert close.rel_error == pytest.approx(1e-6, rel=0.05)
    assert close.cosine == pytest.approx(1.0)

    got = want.copy()
    got[3] *= 2.0  # only position 3 is wrong
    far = compare(got, want)
    assert not far.within_tolerance
    assert far.first_position == 3
    assert far.max_abs_diff == pytest.approx(float(np.max(np.abs(want[3]))), rel=1e-6)
    assert 0 < far.cosine < 1


def test_compare_stage_shape_nan_and_missing():
    want = np.ones((3, 4), np.float32)
    shape = compare(np.ones((3, 5)), want)
    assert not shape.within_tolerance and "shape" in shape.note
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    nan = compare(bad, want)
    assert not nan.within_tolerance and nan.first_position == 1 and "NaN" in nan.note
    missing = layer_diff.compare_stage(Stage("block.0.mlp", 0, "mlp"), None, want, TOL)
    assert missing.max_abs_diff is None and "MAX side" in missing.note
    # Regression (issue 14): a stage missing on one side was counted as within tolerance.
    assert not missing.within_tolerance and missing.status is layer_diff.StageStatus.NOT_COMPARED
    hf_missing = layer_diff.compare_stage(Stage("final_norm", None, "final_norm"), want, None, TOL,
                                          "model.decoder has no final norm")
    assert hf_missing.status is layer_diff.StageStatus.NOT_COMPARED
    assert "HF side" in hf_missing.note and "has no final norm" in hf_missing.note


def test_a_stage_not_compared_is_never_a_match():
    ok = diff("block.0", 0, "block", True)
    skipped = layer_diff.compare_stage(Stage("embedding", None, "embedding"), np.ones((2, 2)), None, TOL)
    assert layer_diff.verdict_of([ok]) is layer_diff.Verdict.MATCH
    assert layer_diff.verdict_of([skipped, ok]) is layer_diff.Verdict.NOT_COMPARED
    assert layer_diff.first_divergence([skipped, ok]) is None  # nothing to name as a divergence
    bad = diff("block.1", 1, "block", False)
    assert layer_diff.verdict_of([skipped, ok, bad]) is layer_diff.Verdict.DIVERGED
    assert layer_diff.first_divergence([skipped, ok, bad]) is bad
    document = {"model": "m", "port_dir": "p", "dtype": "float32", "token_ids": [1, 2], "tolerance": TOL,
                "reference": "m", "attn_implementation": "eager", "reference_spread": 11.9,
                "stages": [{**vars(skipped), "status": skipped.status.value}, vars(ok)], "first_divergence": None}
    text = layer_diff.format_report(document)
    assert "NOT COMPARED: not compared: not captured on the HF side" in text
    assert "NOT COMPARED: 1 stage(s) could not be compared (embedding)" in text and "MATCH:" not in text


def compare(got, want):
    return layer_diff.compare_stage(Stage("block.1", 1, "block"), got, want, TOL)


def diff(name, block, part, ok, position=0, rel=0.5):
    return layer_diff.StageDiff(name, block, part, 1.0, 0.0 if ok else rel, 1.0, None if ok else position, ok)


def test_describe_divergence_maps_parts_to_references():
    mlp = diff("block.1.mlp", 1, "mlp", False)
    described = layer_diff.describe_divergence(mlp, [mlp])
    assert (described["stage"], described["block"], described["part"], described["position"]) == \
        ("block.1.mlp", 1, "mlp", 0)
    assert described["read_next"][0] == "references/divergences.md#m1-mlp-shape-or-activation"
    assert "references/divergences.md#a2-mask-and-sliding-window" in described["read_next"]  # a later block
    assert "references/divergences.md#r1-rope" not in described["read_next"]  # position 0: not positional

    attention = diff("block.0.attention", 0, "attention", False, position=4)
    read = layer_diff.describe_divergence(attention, [attention])["read_next"]
    assert "references/divergences.md#a2-mask-and-sliding-window" in read  # only later positions diverge

    block = diff("block.0", 0, "block", False)
    hint = layer_diff.describe_divergence(block, [block])["hint"]
    assert "--sublayer" in hint
    split = [diff("block.0.attention", 0, "attention", True), diff("block.0.mlp", 0, "mlp", True), block]
    assert "norms and residual" in layer_diff.describe_divergence(block, split)["hint"]


def test_every_read_next_anchor_exists():
    text = (REPO_ROOT / "references" / "divergences.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.M)}
    used = {a for group in layer_diff.CAUSES_BY_PART.values() for a in group}
    used |= set(layer_diff.LATER_BLOCK_CAUSES) | set(layer_diff.LATER_POSITION_CAUSES)
    assert used <= anchors, used - anchors
    guide = (REPO_ROOT / "references" / "layer-by-layer-debugging.md").read_text()
    assert "## Reading the output" in guide


def test_format_report_lists_stages_and_verdict():
    stages = [diff("embedding", None, "embedding", True), diff("block.0", 0, "block", False, position=2)]
    first = layer_diff.describe_divergence(stages[1], stages)
    document = {"model": "m", "port_dir": "p", "dtype": "float32", "token_ids": [1, 2, 3], "tolerance": TOL,
                "reference": "m", "attn_implementation": "eager", "reference_spread": 11.9,
                "stages": [vars(s) for s in stages], "first_divergence": first}
    text = layer_diff.format_report(document)
    assert "HF reference: m (float32, attention eager, spread 11.9)" in text
    assert "embedding" in text and "DIVERGED (from position 2)" in text
    assert "first divergence at block 0, stage block.0, token position 2" in text
    document["first_divergence"] = None
    assert "MATCH" in layer_diff.format_report(document)


def test_parse_token_ids():
    assert layer_diff.parse_token_ids("1, 2,3") == [1, 2, 3]
    for bad in ("", "a,b", "-1"):
        with pytest.raises(layer_diff.ScriptError):
            layer_diff.parse_token_ids(bad)


def test_help_lists_flags_and_is_fast():
    start = time.monotonic()
    result = run_script("layer_diff", "--help")
    elapsed = time.monotonic() - start
    assert result.returncode == 0
    for flag in ("--port-dir", "--reference", "--prompt", "--token-ids", "--dtype", "--sublayer", "--json",
                 "--trust-remote-code"):
        assert flag in result.stdout
    assert "exit codes:" in result.stdout and "a stage diverges" in result.stdout
    assert elapsed < 10


def test_dispatcher_offers_layer_diff():
    result = run_script("import_model", "layer-diff", "--help")
    assert result.returncode == 0 and "--sublayer" in result.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from checkpoints import write_config

    return write_config(tmp_path_factory.mktemp("cfg"), {"architectures": ["LlamaForCausalLM"],
                                                         "model_type": "llama", "num_hidden_layers": 2})


def test_bad_port_dir_exits_3_with_one_line(model_dir, tmp_path):
    missing = run_script("layer_diff", model_dir, "--port-dir", tmp_path / "nope", "--json")
    assert missing.returncode == 3
    assert missing.json()["exit_code"] == 3 and "not a folder" in missing.json()["error"]
    assert len(missing.stderr.strip().splitlines()) == 1

    (tmp_path / "noinit").mkdir()
    no_init = run_script("layer_diff", model_dir, "--port-dir", tmp_path / "noinit")
    assert no_init.returncode == 3 and "no __init__.py" in no_init.stderr
    assert "Traceback" not in no_init.stderr


def test_bad_inputs_exit_3_before_any_model_loads(model_dir, tmp_path):
    port = tmp_path / "some_port"
    port.mkdir()
    (port / "__init__.py").write_text("")
    cases = [
        (("--dtype", "int8"), "no tolerance defined"),
        (("--token-ids", "x,y"), "--token-ids"),
        (("--reference", str(tmp_path / "missing_ref")), "model not found"),
    ]
    for flags, message in cases:
        result = run_script("layer_diff", model_dir, "--port-dir", port, *flags)
        assert result.returncode == 3, (flags, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    no_model = run_script("layer_diff", tmp_path / "no_model", "--port-dir", port, "--json")
    assert no_model.returncode == 3 and no_model.json()["exit_code"] == 3
    assert not list(tmp_path.glob("*.json"))  # nothing written


def test_port_dir_normalization(tmp_path):
    port = tmp_path / "my_port"
    port.mkdir()
    (port / "__init__.py").write_text("")
    assert max_hidden_states.normalized_port_dir(f"{port}/") == port.resolve()
    bad = tmp_path / "my-port"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    with pytest.raises(max_hidden_states.ScriptError, match="not an importable module name"):
        max_hidden_states.normalized_port_dir(str(bad))


# --- the HF side finds every stage through model_anatomy (issue 14: embed_in, word_embeddings,
# final_layer_norm, final_layernorm and self_attention were not tapped) ------------------------------


@pytest.mark.parametrize("family", ["gpt_neox", "phi", "bloom", "falcon", "gpt2", "opt", "llama"])
def test_hf_capture_taps_every_stage(family):
    import hf_hidden_states
    from test_model_anatomy import shrunk_model

    model = shrunk_model(family)
    capture = hf_hidden_states.capture_reference(model.eval(), [1, 2, 3, 4], sublayer=True)
    expected = {s.name for s in stage_order(capture.num_blocks, sublayer=True)} - {"logits"}
    assert set(capture.stages) == expected and not capture.missing, family
    hidden = model.config.hidden_size
    assert all(value.shape == (4, hidden) for value in capture.stages.values()), family


def test_hf_capture_names_a_stage_the_model_lacks():
    import hf_hidden_states
    from test_model_anatomy import shrunk_model

    model = shrunk_model("opt", do_layer_norm_before=False)  # OPT-350m: no final norm
    capture = hf_hidden_states.capture_reference(model.eval(), [1, 2, 3], sublayer=False)
    assert "final_norm" not in capture.stages and "no final norm" in capture.missing["final_norm"]
    stage = Stage("final_norm", None, "final_norm")
    result = layer_diff.compare_stage(stage, np.ones((3, 64)), capture.stages.get("final_norm"), TOL,
                                      capture.missing.get("final_norm"))
    assert layer_diff.verdict_of([result]) is layer_diff.Verdict.NOT_COMPARED
