"""End-to-end: a sliding-window port of a real-size config compiles, serves and honors the window (issue 14).

One compiled graph (served twice, the second time from MAX's compile cache). ``tiny`` shrinks the real Mistral-7B config (window 4096 on every layer) to two layers with
the window at MAX's CPU floor (``max_compat.sliding_window_floor``: 128 in float32) and writes a probe
prompt of at least twice the window. The port is scaffolded from llama3 and its attention is given
MAX's native ``SLIDING_WINDOW_CAUSAL_MASK`` with the config's window. Served on the CPU in float32:

- against the replica, compare must MATCH at every position, including those past the window;
- against a copy of the replica with ``sliding_window: null`` (same weights, so HF attends to the whole
  prefix, which is what a port that ignores the window computes) the same port must DIVERGE, and only
  at positions whose query sees more than a window of keys: every position up to the window agrees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SCRIPTS_DIR, run_script
from family_configs import write_family_config

pytestmark = pytest.mark.e2e

FAMILY = "mistral"  # Mistral-7B: sliding_window 4096 on every layer
ARCH_NAME = "ZzSlidingWindowForCausalLM"
SLUG = "zz_sliding_window"
DTYPE = "float32"
SERVE_TIMEOUT = 2400.0  # a cold compile on a busy 2-core runner can take many minutes
PROBE_TIMEOUT = 900.0  # one process that imports MAX and builds the graph module (no compile)
# Past the window a full-causal reference must be far outside the tolerance, not just over it.
DIVERGENCE_MARGIN = 10.0
# At least this share of the positions past the window must differ beyond the tolerance: dropping
# the oldest keys changes most rows, not a few.
MIN_DIVERGED_SHARE_PAST_WINDOW = 0.5
# Inside the window both HF references compute the same rows through differently masked kernels:
# they may differ by float32 rounding, never by more.
REFERENCE_ROUNDING = 1e-5

# The edits that give the llama3 donor a sliding window (each anchor must occur exactly once).
MODEL_CONFIG_ANCHOR = '            clip_qkv=getattr(huggingface_config, "clip_qkv", None),\n'
MODEL_CONFIG_EDIT = MODEL_CONFIG_ANCHOR + '            sliding_window=getattr(huggingface_config, "sliding_window", None),\n'
IMPORT_ANCHOR = "from max.nn.attention import (\n    AttentionWithRope,\n"
IMPORT_EDIT = IMPORT_ANCHOR + "    MHAMaskVariant,\n"
ATTENTION_ANCHOR = ("                has_bias=config.attention_bias,\n"
                    "                quant_config=config.quant_config,\n"
                    "            )\n")
ATTENTION_EDIT = ("                has_bias=config.attention_bias,\n"
                  "                quant_config=config.quant_config,\n"
                  "                mask_variant=(MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK if config.sliding_window\n"
                  "                              else MHAMaskVariant.CAUSAL_MASK),\n"
                  "                sliding_window=config.sliding_window,\n"
                  "            )\n")

# Builds the port's graph module from the replica's config as the pipeline would (no compile) and
# prints each layer's attention mask variant and window.
MASK_PROBE = """
import json, sys
from pathlib import Path
import model_source, port_layout, port_probe
port = port_layout.PortDir(Path(sys.argv[2]))
source = model_source.resolve(sys.argv[1], None)
loaded = port_probe.load_port(port, source, sys.argv[3])
graph = port_probe.build_graph(port, loaded, port_probe.adapted_state_dict(loaded, source))
print(json.dumps([[layer.self_attn.mask_variant.name, layer.self_attn.sliding_window] for layer in graph.layers]))
"""


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: the edit anchor occurs {text.count(old)} times"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sliding_window_e2e")


@pytest.fixture(scope="module")
def window() -> int:
    import max_compat

    return max_compat.sliding_window_floor(DTYPE)


@pytest.fixture(scope="module")
def replica(root, window) -> Path:
    source = write_family_config(root / "source", FAMILY).parent
    out = root / "replica"
    result = run_script("make_tiny_model", source, "--output", out, "--dtype", DTYPE)
    assert result.returncode == 0, result.stderr
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [ARCH_NAME]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def unwindowed(replica, root) -> Path:
    """The replica with ``sliding_window: null``: same weights, full causal attention in HF."""
    copy = root / "replica_no_window"
    shutil.copytree(replica, copy)
    config = json.loads((copy / "config.json").read_text())
    config["sliding_window"] = None
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


@pytest.fixture(scope="module")
def manifest(replica) -> dict:
    return json.loads((replica / "tiny_replica.json").read_text())


@pytest.fixture(scope="module")
def port(replica, root) -> Path:
    result = run_script("scaffold", replica, "--start-from", "llama3", "--output-dir", root / "ports", "--slug", SLUG)
    assert result.returncode == 0, result.stderr
    folder = root / "ports" / SLUG
    replace_once(folder / "model_config.py", MODEL_CONFIG_ANCHOR, MODEL_CONFIG_EDIT)
    replace_once(folder / f"{SLUG}.py", IMPORT_ANCHOR, IMPORT_EDIT)
    replace_once(folder / f"{SLUG}.py", ATTENTION_ANCHOR, ATTENTION_EDIT)
    return folder


def test_replica_keeps_a_window_at_the_floor_and_a_long_enough_prompt(replica, manifest, window):
    config = json.loads((replica / "config.json").read_text())
    assert window == 128  # MAX 26.7's float32 CPU floor (tests/bench_sliding_window.py)
    assert config["model_type"] == FAMILY and config["num_hidden_layers"] == 2
    assert config["sliding_window"] == window
    assert config["max_position_embeddings"] > 2 * window
    assert manifest["prompt_tokens"] >= 2 * window
    change = next(c for c in manifest["changes"] if c["field"] == "sliding_window")
    assert (change["old"], change["new"]) == (4096, window)


def test_port_dry_builds_with_the_native_window_mask(replica, port, window):
    smoke = run_script("run_oss_gates", replica, "--port-dir", port, "--phase", "smoke", "--json",
                       timeout=PROBE_TIMEOUT)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert all(check["status"] == "pass" for check in smoke.json()["checks"])
    probe = subprocess.run([sys.executable, "-c", MASK_PROBE, str(replica), str(port), DTYPE], capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT, cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR)})
    assert probe.returncode == 0, probe.stderr[-2000:]
    layers = json.loads(probe.stdout.strip().splitlines()[-1])
    assert layers == [["SLIDING_WINDOW_CAUSAL_MASK", window]] * 2


def serve_and_compare(replica: Path, port: Path, reference: Path, prompts: list[str]):
    """Serve the windowed port on the replica, compare it with HF on ``reference``; (report, seconds to ready).

    One server per compare: MAX's prefix cache (on by default, 128-token pages) would serve a repeated
    prompt's first pages from the cache and echo no logprobs for them, which compare refuses.
    """
    import port_compare
    import max_server

    started = time.monotonic()
    with max_server.served_model(str(replica), port_dir=str(port), timeout=SERVE_TIMEOUT, progress=False) as server:
        ready = time.monotonic() - started
        report = port_compare.run_compare(str(reference), server.base_url, server.served_name, prompts=prompts,
                                          chat_template=False)
    return report, ready


@pytest.fixture(scope="module")
def served(replica, unwindowed, port, manifest):
    """One compiled graph, served twice (the second serve hits the compile cache): the windowed port
    compared with HF on the replica, then with HF on its window-less copy."""
    prompts = [manifest["prompt"]]
    windowed, cold = serve_and_compare(replica, port, replica, prompts)
    ignored, warm = serve_and_compare(replica, port, unwindowed, prompts)
    print(f"\nsliding-window port: server ready after {cold:.0f} s (cold compile), {warm:.0f} s (second serve); "
          f"windowed max |d| {windowed.max_abs_diff:.3g}, window ignored max |d| {ignored.max_abs_diff:.3g}")
    return windowed, ignored


def test_windowed_port_matches_hf_past_the_window(served, manifest, window):
    windowed, _ = served
    (run,) = windowed.to_dict()["prompts"]
    assert windowed.verdict == "MATCH", (windowed.max_abs_diff, windowed.first_divergence)
    assert len(run["prompt_ids"]) >= 2 * window
    positions = run["positions"]
    assert all(p["ok"] for p in positions)
    assert sum(p["position"] > window for p in positions) >= window  # as many scored positions past it as inside


def test_ignoring_the_window_diverges_only_past_it(served, window):
    windowed, ignored = served
    assert ignored.verdict == "DIVERGED"
    (run,) = ignored.to_dict()["prompts"]
    atol = ignored.atol
    inside = [p for p in run["positions"] if p["position"] <= window]
    past = [p for p in run["positions"] if p["position"] > window]
    # A query at index i < window sees every key in both references: identical to the windowed compare.
    assert len(inside) == window and all(p["ok"] and p["abs_diff"] <= atol for p in inside)
    (windowed_run,) = windowed.to_dict()["prompts"]
    windowed_inside = [p for p in windowed_run["positions"] if p["position"] <= window]
    assert all(abs(a["abs_diff"] - b["abs_diff"]) <= REFERENCE_ROUNDING for a, b in zip(inside, windowed_inside))
    assert ignored.first_divergence["position"] > window
    diverged = [p for p in past if not p["ok"]]
    assert len(diverged) >= MIN_DIVERGED_SHARE_PAST_WINDOW * len(past), (len(diverged), len(past))
    assert max(p["abs_diff"] for p in past) > DIVERGENCE_MARGIN * atol
