"""End-to-end: layer-diff localizes planted bugs in copies of a scaffolded llama3 port, on the CPU.

One 3-layer strong-init replica (make_tiny_model), one scaffolded port and
three copies with a planted bug each, all planted in the port's
weight_adapters.py: block 1's up_proj rows reversed, the final norm weight
offset by one, block 2's o_proj weight transposed. No bug changes a graph
op, so the module compiles ONE graph (the identity port's) and every other
run is a compile-cache hit. --sublayer does not change the compiled graph
either (sublayer outputs are always captured).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tolerances
from conftest import run_script
from test_verify_e2e import LLAMA_SOURCE

pytestmark = pytest.mark.e2e

SOURCE = dict(LLAMA_SOURCE, num_hidden_layers=3)
SLUG = "layer_diff_llama"
PROMPT = "The capital of France is Paris. Once upon a time"
TOLERANCE = tolerances.hidden_rtol("float32")
TIMEOUT = 3600

# The weight adapter's safetensors loop: every planted bug edits one adapted weight right after it is renamed,
# so no graph op changes and all four ports share one compiled graph.
SAFETENSORS_RENAME = ("        for before, after in LLAMA_SAFETENSOR_MAPPING.items():\n"
                      "            max_name = max_name.replace(before, after)\n"
                      "        new_state_dict[max_name] = value.data()\n")


def weight_edit(name: str, expression: str) -> tuple[str, str]:
    """A planting that replaces adapted weight ``name`` by ``expression`` of its numpy array ``w``."""
    return (SAFETENSORS_RENAME,
            SAFETENSORS_RENAME
            + f"        if max_name == {name!r}:\n"
            "            w = np.from_dlpack(new_state_dict[max_name].data)\n"
            f"            w = np.ascontiguousarray({expression})\n"
            "            new_state_dict[max_name] = WeightData.from_numpy(w, max_name)\n")


# Block 1's up projection rows reversed: each gate channel meets another channel's up value, so block 1's
# MLP output is wrong while its attention (and all of block 0) stays exact.
MLP_BUG = weight_edit("layers.1.mlp.up_proj.weight", "w[::-1]")
# The final norm weight read as an offset (1 + w, the Gemma convention) by a port that wants w: only the
# final norm and the logits move.
FINAL_NORM_BUG = weight_edit("norm.weight", "w + 1.0")
O_PROJ_BUG = weight_edit("layers.2.self_attn.o_proj.weight", "w.T")


def plant(port: Path, copy_root: Path, filename: str, bug: tuple[str, str]) -> Path:
    """A copy of ``port`` under ``copy_root`` with one text replacement in ``filename``."""
    target = copy_root / port.name
    shutil.copytree(port, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / filename
    text = path.read_text()
    assert text.count(bug[0]) == 1, f"planting site not unique in {filename}"
    path.write_text(text.replace(bug[0], bug[1]))
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from make_tiny_model import ReplicaOptions, build_replica
    from tiny_config import ShrinkOptions

    root = tmp_path_factory.mktemp("layer_diff")
    replica = root / "replica"
    # The source (3 layers, hidden 256) is small enough to keep its shapes; the bugs below are calibrated
    # on the shrunk replica (hidden 64), so shrink it as before.
    build_replica(dict(SOURCE), replica, ReplicaOptions(shrink=ShrinkOptions(min_layers=3,
                                                                      keep_small_source=False)))
    done = run_script("scaffold", replica, "--start-from", "llama3", "--output-dir", root / "identity",
                      "--slug", SLUG)
    assert done.returncode == 0, done.stderr
    port = root / "identity" / SLUG
    ports = {
        "identity": port,
        "mlp": plant(port, root / "mlp", "weight_adapters.py", MLP_BUG),
        "final_norm": plant(port, root / "final_norm", "weight_adapters.py", FINAL_NORM_BUG),
        "o_proj": plant(port, root / "o_proj", "weight_adapters.py", O_PROJ_BUG),
    }
    return replica, ports


def layer_diff(replica: Path, port: Path, *flags: str):
    return run_script("layer_diff", replica, "--port-dir", f"{port}/", "--prompt", PROMPT, *flags,
                      timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reports(setup):
    """One JSON run per port (the identity run without --sublayer, the others with it)."""
    replica, ports = setup
    runs = {
        "identity": layer_diff(replica, ports["identity"], "--json"),
        "mlp": layer_diff(replica, ports["mlp"], "--sublayer", "--json"),
        "final_norm": layer_diff(replica, ports["final_norm"], "--json"),
        "o_proj": layer_diff(replica, ports["o_proj"], "--sublayer", "--json"),
    }
    return runs


def by_name(document: dict) -> dict[str, dict]:
    return {stage["name"]: stage for stage in document["stages"]}


def test_identity_port_every_stage_within_tolerance(reports):
    result = reports["identity"]
    assert result.returncode == 0, result.stderr[-3000:]
    document = result.json()
    assert document["verdict"] == "MATCH" and document["first_divergence"] is None
    assert [s["name"] for s in document["stages"]] == [
        "embedding", "block.0", "block.1", "block.2", "final_norm", "logits"]
    for stage in document["stages"]:
        assert stage["within_tolerance"], stage
        assert stage["rel_error"] < TOLERANCE / 10, stage  # fp32 on the CPU agrees to ~1e-6
        assert stage["cosine"] > 0.999999, stage
    assert document["untapped"] == []
    assert len(document["token_ids"]) > 5


def check_divergence(result, stage: str, clean: list[str], anchor: str) -> tuple[dict, dict[str, dict]]:
    """Exit 1, ``stage`` named first, every ``clean`` stage within tolerance, ``anchor`` in read_next."""
    assert result.returncode == 1, result.stderr[-3000:]
    document = result.json()
    first = document["first_divergence"]
    assert document["verdict"] == "DIVERGED" and first["stage"] == stage, first
    stages = by_name(document)
    for name in clean:
        assert stages[name]["within_tolerance"] and stages[name]["rel_error"] < TOLERANCE / 10, stages[name]
    assert f"references/divergences.md#{anchor}" in first["read_next"]
    return first, stages


def test_permuted_up_proj_in_block_1_is_block_1_mlp(reports):
    clean = ["embedding", "block.0.attention", "block.0.mlp", "block.0", "block.1.attention"]
    first, stages = check_divergence(reports["mlp"], "block.1.mlp", clean, "m1-mlp-shape-or-activation")
    assert (first["block"], first["part"], first["position"]) == (1, "mlp", 0)  # not position-dependent
    assert stages["block.1.mlp"]["rel_error"] > 10 * TOLERANCE  # a permutation, not a rounding


def test_offset_final_norm_weight_is_final_norm_with_clean_blocks(reports):
    clean = ["embedding", "block.0", "block.1", "block.2"]
    first, stages = check_divergence(reports["final_norm"], "final_norm", clean, "n1-norm-kind-eps-offset")
    assert first["block"] is None and first["part"] == "final_norm"
    assert not stages["logits"]["within_tolerance"]


def test_transposed_o_proj_in_block_2_is_block_2_attention(reports):
    clean = ["embedding"] + [f"block.{i}{p}" for i in (0, 1) for p in (".attention", ".mlp", "")]
    first, _ = check_divergence(reports["o_proj"], "block.2.attention", clean,
                                "a1-attention-projections-and-heads")
    assert (first["block"], first["part"]) == (2, "attention")


def test_text_report_names_the_block(setup):
    replica, ports = setup
    result = layer_diff(replica, ports["mlp"])  # same graph as the JSON run: compile cache hit
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("block.0 ") and line.endswith(" ok") for line in lines)
    assert any(line.startswith("block.1 ") and "DIVERGED" in line for line in lines)
    assert "DIVERGED: first divergence at block 1, stage block.1," in result.stdout
    assert "re-run with --sublayer" in result.stdout
    assert "read next: references/divergences.md#b1-residual-and-block-wiring" in result.stdout


def test_graph_with_capture_off_is_the_normal_graph(setup):
    """Tracing the port with no hook gives the same graph before and after a capture; capture only adds outputs."""
    import max_hidden_states
    import model_source
    import port_layout
    import port_probe

    replica, ports = setup
    port = port_layout.resolve_port_dir(str(ports["identity"]))
    source = model_source.resolve(str(replica))
    loaded = port_probe.load_port(port, source, "float32")
    state = port_probe.adapted_state_dict(loaded, source)

    def graph_text(hook=None) -> str:
        graph = port_probe.build_graph(port, loaded, state)
        graph.load_state_dict(state, override_quantization_encoding=True, weight_alignment=1, strict=False)
        types = graph.input_types(graph.kv_params)
        if hook is None:
            return str(graph.trace(*types))
        with max_hidden_states.layer_hook(hook):
            return str(graph.trace(*types))

    normal = graph_text()
    hook = max_hidden_states.CaptureHook()
    captured = graph_text(hook)
    after = graph_text()
    assert after == normal
    assert captured != normal
    assert hook.stage_names[:4] == ["embedding", "block.0.attention", "block.0.mlp", "block.0"]
    assert "block.2" in hook.stage_names

    def without_output(text: str) -> list[str]:
        """The graph's lines without its output op and without the result types of its signature."""
        lines = text.splitlines()
        return [lines[0].split(" -> ")[0]] + [line for line in lines[1:] if "mo.output" not in line]

    assert without_output(captured) == without_output(normal)  # no op added, only outputs
    outputs = [line for line in captured.splitlines() if "mo.output" in line][0]
    normal_outputs = [line for line in normal.splitlines() if "mo.output" in line][0]
    count = lambda line: line.split(":")[0].count("%")  # noqa: E731
    assert count(outputs) == count(normal_outputs) + len(hook.stage_names)
