"""The worked StableLM port (templates/ports/stablelm) against Hugging Face, on the CPU.

Two tiny replicas are built with make_tiny_model from StableLM configs: one
with every optional flag off (shaped like stabilityai/stablelm-3b-4e1t) and
one with every flag on (QKV bias, per-head QK LayerNorm, parallel residual).
Each is served with the port and compared with transformers: both must
MATCH. A copy of the port with a planted bug (RoPE over the whole head
instead of its first quarter) must give DIVERGED with the first divergent
position reported. A port scaffolded from the worked port onto a new
architecture name (``scaffold --start-from templates/ports/stablelm``), served
unmodified on a renamed copy of the flags-on replica, must MATCH too: it is the
same graph as the flags-on run, so its serve is a compile-cache hit. The port
is compiled three times in all (two replicas plus the planted bug); one server
runs at a time.

The fast tests (no MAX compile) check the replicas really exercise each
flag, the port's gates and docstring audit, and that the planted bug edits
what it claims to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_script

PORT_DIR = REPO_ROOT / "templates" / "ports" / "stablelm"
GRAPH_FILE = "stablelm.py"
PROMPTS = ["The capital of France is Paris.", "Once upon a time there was a little robot"]
FLAGS = ("use_qkv_bias", "qk_layernorm", "use_parallel_residual")
SERVE_TIMEOUT = 3600.0  # a cold compile of this graph took ~30 min on 2 shared cores

# StableLM 3B 4E1T's config (every optional flag off), old config spelling.
SOURCE_CONFIG = {
    "architectures": ["StableLmForCausalLM"],
    "model_type": "stablelm",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_qkv_bias": False,
    "qk_layernorm": False,
    "use_parallel_residual": False,
    "vocab_size": 50304,
}
# Every optional flag on, with grouped-query attention (StableLM 2 12B-like shape).
FLAGS_ON = {
    "hidden_size": 5120, "intermediate_size": 13824, "num_key_value_heads": 8, "num_hidden_layers": 40,
    "vocab_size": 100352, "bos_token_id": 100257, "eos_token_id": 100257,
    "use_qkv_bias": True, "qk_layernorm": True, "use_parallel_residual": True,
}

# The planted bug: set the one RoPE width (table and rotated slice) to the
# whole head, so every dim of each head is rotated instead of the first
# partial_rotary_factor.
# The architecture name and slug of the port scaffolded from the worked port.
COPY_ARCH = "ZzStableCopyForCausalLM"
COPY_SLUG = "zz_stablelm_copy"

PLANTED_FROM = "        rotary_dim = config.rotary_dim\n"
PLANTED_TO = "        rotary_dim = config.hidden_size // config.num_attention_heads\n"


def write_source(folder: Path, overrides: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**SOURCE_CONFIG, **overrides}, indent=2))
    return folder


def plant_full_rotary(port_copy: Path) -> None:
    """Rewrite the copy's graph to rotate the whole head; fail if the line is not there."""
    graph = port_copy / GRAPH_FILE
    text = graph.read_text()
    assert text.count(PLANTED_FROM) == 1, "the port's RoPE line changed; update PLANTED_FROM"
    graph.write_text(text.replace(PLANTED_FROM, PLANTED_TO))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """{"off": dir, "on": dir}: tiny peaked replicas built by make_tiny_model."""
    root = tmp_path_factory.mktemp("stablelm")
    built = {}
    for name, overrides in (("off", {}), ("on", FLAGS_ON)):
        source = write_source(root / f"source_{name}", overrides)
        result = run_script("make_tiny_model", source, "--output", root / f"replica_{name}", "--json")
        assert result.returncode == 0, result.stderr
        built[name] = root / f"replica_{name}"
    return built


@pytest.fixture(scope="module")
def planted_port(tmp_path_factory):
    """A copy of the port, same slug, with full instead of partial rotary."""
    copy = tmp_path_factory.mktemp("planted") / PORT_DIR.name
    shutil.copytree(PORT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    plant_full_rotary(copy)
    return copy


@pytest.fixture(scope="module")
def scaffolded_copy(replicas, tmp_path_factory):
    """(replica, port): the flags-on replica renamed to COPY_ARCH and a port scaffolded onto it from PORT_DIR."""
    root = tmp_path_factory.mktemp("from_port")
    replica = root / "replica_on_renamed"
    shutil.copytree(replicas["on"], replica)
    config = json.loads((replica / "config.json").read_text())
    config["architectures"] = [COPY_ARCH]
    (replica / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    result = run_script("scaffold", replica, "--start-from", PORT_DIR, "--output-dir", root / "ports",
                        "--slug", COPY_SLUG, "--json")
    assert result.returncode == 0, result.stderr
    return replica, root / "ports" / COPY_SLUG


# --- fast checks (no MAX compile) ---------------------------------------------------


def test_replicas_exercise_every_flag(replicas):
    from safetensors import safe_open

    for name, expected in (("off", False), ("on", True)):
        config = json.loads((replicas[name] / "config.json").read_text())
        assert [config[flag] for flag in FLAGS] == [expected] * 3
        assert config["partial_rotary_factor"] == 0.25
        with safe_open(str(replicas[name] / "model.safetensors"), "pt") as handle:
            keys = set(handle.keys())
        assert ("model.layers.0.self_attn.q_proj.bias" in keys) is expected
        assert ("model.layers.0.self_attn.k_layernorm.norms.0.weight" in keys) is expected
        assert ("model.layers.0.post_attention_layernorm.weight" in keys) is (not expected)
        assert "model.norm.bias" in keys and "lm_head.weight" in keys


def test_port_passes_preflight_and_audit(replicas):
    for name in ("off", "on"):
        gates = run_script("run_oss_gates", replicas[name], "--port-dir", PORT_DIR, "--phase", "preflight", "--json")
        assert gates.returncode == 0, gates.stdout + gates.stderr
    audit = run_script("audit_docstrings", PORT_DIR, "--json")
    assert audit.returncode == 0, audit.stdout
    assert audit.json()["unmarked"] == 0


def test_scaffolded_copy_is_renamed_and_passes_preflight(scaffolded_copy):
    replica, port = scaffolded_copy
    manifest = json.loads((port / "scaffold_manifest.json").read_text())
    assert manifest["arch_name"] == COPY_ARCH and manifest["start_from"]["path"] == "templates/ports/stablelm"
    assert (port / f"{COPY_SLUG}.py").is_file() and not (port / GRAPH_FILE).exists()
    gates = run_script("run_oss_gates", replica, "--port-dir", port, "--phase", "preflight", "--json")
    assert gates.returncode == 0, gates.stdout + gates.stderr


def test_port_blocks_are_recorded_unmodified_library_copies():
    """The port composes templates/blocks: each copy has its manifest's sha256 and is the library's current file."""
    import port_layout

    manifest = json.loads((PORT_DIR / "scaffold_manifest.json").read_text())
    names = [b["name"] for b in manifest["blocks"]]
    assert names == ["norms", "attention", "residual"]
    for block in manifest["blocks"]:
        assert port_layout.block_is_unmodified(PORT_DIR, block), block["file"]
        library = REPO_ROOT / "templates" / block["file"]
        assert (PORT_DIR / block["file"]).read_bytes() == library.read_bytes(), (
            f"{block['file']} differs from the library: copy it again, update the manifest, rerun the e2e")
    graph = (PORT_DIR / GRAPH_FILE).read_text()
    assert all(f"from .blocks.{name} import" in graph for name in names)


def test_planted_bug_changes_only_the_rope_width(planted_port):
    original = (PORT_DIR / GRAPH_FILE).read_text().splitlines()
    planted = (planted_port / GRAPH_FILE).read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, planted) if a != b]
    assert changed == [(PLANTED_FROM.rstrip("\n"), PLANTED_TO.rstrip("\n"))]


def test_plant_refuses_a_port_without_the_rope_line(tmp_path):
    (tmp_path / GRAPH_FILE).write_text("no rope here\n")
    with pytest.raises(AssertionError, match="PLANTED_FROM"):
        plant_full_rotary(tmp_path)


# --- e2e: serve and compare (three compiles, one server at a time) -------------------


@pytest.fixture(scope="module")
def compare_reports(replicas, planted_port):
    """{"off", "on", "planted"}: compare reports, each from its own short-lived server."""
    runs = {"off": (replicas["off"], PORT_DIR), "on": (replicas["on"], PORT_DIR),
            "planted": (replicas["on"], planted_port)}
    return {name: serve_and_compare(replica, port_dir) for name, (replica, port_dir) in runs.items()}


@pytest.fixture(scope="module")
def copy_report(scaffolded_copy):
    """The compare report of the port scaffolded from the worked port (the flags-on graph: a cache hit)."""
    return serve_and_compare(*scaffolded_copy)


def serve_and_compare(replica: Path, port_dir: Path):
    """Serve ``replica`` with ``port_dir`` on the CPU in float32 and compare it with transformers."""
    import port_compare
    import max_server

    with max_server.served_model(str(replica), port_dir=str(port_dir), devices="cpu",
                                 encoding="float32", progress=False, timeout=SERVE_TIMEOUT) as server:
        return port_compare.run_compare(str(replica), server.base_url, server.served_name, prompts=PROMPTS,
                                        chat_template=False)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["off", "on"])
def test_port_matches_hf(compare_reports, name):
    report = compare_reports[name]
    assert report.verdict == "MATCH", report.first_divergence
    assert report.first_divergence is None
    assert len(report.runs) == len(PROMPTS)


@pytest.mark.e2e
def test_port_scaffolded_from_the_worked_port_matches_hf_unmodified(copy_report):
    assert copy_report.verdict == "MATCH", copy_report.first_divergence
    assert copy_report.first_divergence is None and len(copy_report.runs) == len(PROMPTS)


@pytest.mark.e2e
def test_full_rotary_bug_diverges_with_its_position(compare_reports):
    report = compare_reports["planted"]
    assert report.verdict == "DIVERGED"
    first = report.first_divergence
    assert first is not None
    assert first["prompt_index"] == 0
    # Position 1 has one token of context, where RoPE cancels out; the bug shows from position 2.
    assert first["position"] == 2
    assert report.max_abs_diff > report.atol
