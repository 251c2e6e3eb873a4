"""End-to-end: serve a tiny Llama replica natively with MAX on the CPU and compare it with HF.

One server is compiled for the whole module (started and stopped through the
`serve` command line). The reference variants (other weights, another RoPE
theta, one layer's MLP changed) are different HF checkpoints compared against
that same server through ``run_compare(reference=...)`` (the library form of
compare's ``--reference``), so torch and transformers load once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import port_compare
import max_server
import tolerances
from conftest import run_script

pytestmark = pytest.mark.e2e

# A small Llama-shaped source config; make_tiny_model shrinks it (hidden 64, 2 layers, 4/2 heads, vocab 512)
# and draws peaked weights (std 0.3, random norm weights), so real bugs move logprobs far past the tolerance.
LLAMA_SOURCE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
    "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "hidden_act": "silu",
}
PROMPT = "The capital of France is Paris. Once upon a time there was a little robot"
FP32_ATOL = tolerances.logprob_atol("float32")


def build(output: Path, seed: int = 0) -> Path:
    from make_tiny_model import ReplicaOptions, build_replica

    build_replica(dict(LLAMA_SOURCE), output, ReplicaOptions(seed=seed))
    return output


def variant(base: Path, output: Path) -> Path:
    shutil.copytree(base, output)
    return output


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = build(root / "base")
    other = build(root / "other_weights", seed=1)

    rope = variant(base, root / "rope_theta")
    config = json.loads((rope / "config.json").read_text())
    config["rope_theta"] = 100.0
    (rope / "config.json").write_text(json.dumps(config, indent=2))

    from safetensors.numpy import load_file, save_file

    mlp = variant(base, root / "one_mlp")
    tensors = load_file(mlp / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = (tensors[name] * -1.0).astype(tensors[name].dtype)
    save_file(tensors, mlp / "model.safetensors", metadata={"format": "pt"})
    return {"base": base, "other": other, "rope": rope, "mlp": mlp}


@pytest.fixture(scope="module")
def server(replicas, tmp_path_factory):
    """One native MAX server for the module, through `serve` in the background, stopped with `serve --stop`."""
    state = tmp_path_factory.mktemp("servers")
    env = {"IMPORT_MODEL_SERVER_DIR": str(state)}
    log = state / "serve.log"
    started = time.monotonic()
    result = run_script("serve_port", str(replicas["base"]), "--log-file", str(log), "--json", env=env,
                        timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    record = result.json()
    record["startup_seconds_measured"] = time.monotonic() - started
    print(f"\nserve startup: {record['startup_seconds']}s (wall {record['startup_seconds_measured']:.0f}s)")
    try:
        yield record
    finally:
        stop = run_script("serve_port", "--stop", "--port", str(record["port"]), "--json", env=env)
        if stop.returncode != 0 or max_server._group_alive(record["pid"]):
            max_server.stop_process_group(record["pid"])
        assert stop.returncode == 0, stop.stderr
        assert stop.json()["stopped"] == [{"port": record["port"], "pid": record["pid"], "was_running": True}]
        assert not max_server._group_alive(record["pid"]), "max serve workers outlived --stop"


def compare_against(reference: Path, server: dict, replicas: dict):
    """compare's library entry point (one torch import for all variants), HF side = ``reference``."""
    report = port_compare.run_compare(str(replicas["base"]), server["base_url"], server["served_name"], [PROMPT],
                                        reference=str(reference))
    return report, report.to_dict()


def test_serve_prints_url_log_and_served_name(server, replicas):
    assert server["base_url"] == f"http://127.0.0.1:{server['port']}"
    assert server["served_name"] == str(replicas["base"])
    assert Path(server["log_path"]).is_file()
    assert "--enable-echo" in server["command"]
    assert max_server.probe_models(server["base_url"]).names == [server["served_name"]]


def test_native_serve_matches_hf_token_for_token(server, replicas):
    result = run_script("compare_layers", str(replicas["base"]), "--base-url", server["base_url"], "--slug",
                        server["served_name"], "--prompt", PROMPT, "--max-new-tokens", "6", "--layer-stats", "--json")
    assert result.returncode == 0, result.stderr[-3000:] or result.stdout[-3000:]
    report = result.json()
    assert report["verdict"] == "MATCH"
    assert report["max_abs_diff"] < FP32_ATOL
    run = report["prompts"][0]
    scored = [p for p in run["positions"] if p["phase"] == "prompt"]
    assert [p["position"] for p in scored] == list(range(1, len(run["prompt_ids"])))
    assert len(run["max_generated_ids"]) == 6
    assert run["greedy_compared"] == 6 and run["greedy_tie_at"] is None  # greedy tokens equal HF's
    assert all(p["top1_agree"] is not False for p in run["positions"])  # None: hidden under a shared text key
    stats = run["layer_stats"]
    assert [s["layer"] for s in stats] == [0, 1, 2]  # embeddings + 2 decoder layers
    assert all(s["nan"] == 0 and s["inf"] == 0 and s["mean_token_norm"] > 0 for s in stats)


def test_other_weights_diverge_at_the_first_scored_position(server, replicas):
    result, report = compare_against(replicas["other"], server, replicas)
    assert result.verdict == "DIVERGED"
    first = report["first_divergence"]
    assert (first["prompt_index"], first["position"]) == (0, 1)
    assert first["abs_diff"] > 100 * FP32_ATOL


def test_rope_theta_only_diverges_later_not_first(server, replicas):
    result, report = compare_against(replicas["rope"], server, replicas)
    assert result.verdict == "DIVERGED"
    first = report["first_divergence"]
    assert first["position"] > 1
    assert report["prompts"][0]["positions"][0]["ok"] is True  # position 1 sees one token: RoPE cannot matter
    assert report["max_abs_diff"] > 100 * FP32_ATOL


def test_one_layer_mlp_change_diverges(server, replicas):
    result, report = compare_against(replicas["mlp"], server, replicas)
    assert result.verdict == "DIVERGED"
    assert report["max_abs_diff"] > 100 * FP32_ATOL


def test_wrong_served_name_fails_fast_before_hf_loads(server, replicas, tmp_path):
    missing_reference = tmp_path / "no_such_reference"  # loading it would fail with another message
    started = time.monotonic()
    result = run_script("compare_layers", str(replicas["base"]), "--base-url", server["base_url"],
                        "--slug", "not_the_slug", "--reference", str(missing_reference))
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not 'not_the_slug'" in lines[0] and "import_model.py serve" in lines[0]
    assert elapsed < 15


def test_server_not_running_fails_fast_before_hf_loads(replicas, tmp_path):
    port = max_server.free_port()
    started = time.monotonic()
    result = run_script("compare_layers", str(replicas["base"]), "--port", str(port), "--reference",
                        str(tmp_path / "no_such_reference"), "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert result.json()["error"].startswith(f"no MAX server answers at http://127.0.0.1:{port}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert elapsed < 15


def test_port_import_error_is_classified(replicas, tmp_path):
    # Also shows MAX accepts --custom-architectures and --served-model-name as built by build_serve_command
    # (the module server covers the other flags): an unknown flag would fail before any import.
    port = tmp_path / "broken_port"
    port.mkdir()
    (port / "__init__.py").write_text("import no_such_module_for_the_port\nARCHITECTURES = []\n")
    result = run_script("serve_port", str(replicas["base"]), "--port-dir", str(port) + "/", "--json",
                        "--log-file", str(tmp_path / "broken.log"), "--timeout", "600",
                        env={"IMPORT_MODEL_SERVER_DIR": str(tmp_path)})
    assert result.returncode == 3
    error = result.json()["error"]
    assert error.startswith("max serve failed (port-import-error:")
    assert "broken.log" in error
    assert not list(tmp_path.glob("*.json")), "a failed start must not leave a server record"
