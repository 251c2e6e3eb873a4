"""End-to-end: the eval tier on a served replica port against transformers, offline.

The port is the llama3 scaffold of the tests/test_verify_e2e.py replica under a new architecture name, so MAX
runs the port's own code with the same graph (a compile-cache hit after the other e2e modules); the control is
the native replica on a second server. Both start and stop through the `serve` command line. The planted bug is
a weight-only change on the reference side (a replica with other weights as --reference), so no further graph
compiles.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

import max_server
import tolerances
from conftest import run_script
from test_verify_e2e import build

pytestmark = pytest.mark.e2e

FP32_ATOL = tolerances.logprob_atol("float32")
EVAL_TIMEOUT = 1800  # one eval run loads torch, lm-eval and the reference twice; minutes on a loaded 2-core CPU
SERVE_TIMEOUT = 2400  # a cold compile on a busy 2-core runner can take many minutes
PORT_ARCH = "EvalLlamaForCausalLM"  # unknown to MAX, so --custom-architectures serves the port's code
PORT_SLUG = "eval_llama_port"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = build(root / "base")
    port_model = root / "port_model"
    shutil.copytree(base, port_model)
    config = json.loads((port_model / "config.json").read_text())
    config["architectures"] = [PORT_ARCH]
    (port_model / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    done = run_script("scaffold", port_model, "--start-from", "llama3", "--output-dir", root / "ports",
                      "--slug", PORT_SLUG)
    assert done.returncode == 0, done.stderr
    return {"base": base, "other": build(root / "other_weights", seed=1), "port_model": port_model,
            "port_dir": root / "ports" / PORT_SLUG}


def _serve(model, state, *flags):
    """Start one server through the serve command line; yield its record; stop exactly it."""
    env = {"IMPORT_MODEL_SERVER_DIR": str(state)}
    result = run_script("serve_port", str(model), *flags, "--log-file", str(state / "serve.log"), "--json",
                        env=env, timeout=SERVE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = result.json()
    try:
        yield record
    finally:
        stop = run_script("serve_port", "--stop", "--port", str(record["port"]), "--json", env=env)
        if stop.returncode != 0 or max_server._group_alive(record["pid"]):
            max_server.stop_process_group(record["pid"])
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def server(replicas, tmp_path_factory):
    """The port, served from its folder."""
    yield from _serve(replicas["port_model"], tmp_path_factory.mktemp("port_server"),
                      "--port-dir", str(replicas["port_dir"]))


@pytest.fixture(scope="module")
def control_server(replicas, tmp_path_factory):
    """The native MAX llama replica with the same serve flags: the control."""
    yield from _serve(replicas["base"], tmp_path_factory.mktemp("control_server"))


def run_eval(replicas, server, *flags):
    started = time.monotonic()
    result = run_script("run_evals", str(replicas["port_model"]), "--base-url", server["base_url"], "--slug",
                        server["served_name"], *flags, "--json", timeout=EVAL_TIMEOUT)
    print(f"\neval {' '.join(flags) or '(shipped tasks)'}: exit {result.returncode} in "
          f"{time.monotonic() - started:.0f}s")
    return result


def test_shipped_tasks_match_transformers_sample_by_sample(server, replicas):
    result = run_eval(replicas, server)
    assert result.returncode == 0, result.stderr[-3000:] or result.stdout[-3000:]
    report = result.json()
    assert (report["verdict"], report["rule"]) == ("MATCH", "replica-per-sample")
    assert report["tasks"] == {"import_model_mc": "multiple_choice", "import_model_gen": "generate_until"}
    assert report["max_abs_diff"] < FP32_ATOL
    print(f"per-sample max |Δ loglikelihood| {report['max_abs_diff']:.3g}; timings {report['timings']}")
    loglikelihood = [s for s in report["samples"] if s["kind"] == "loglikelihood"]
    generation = [s for s in report["samples"] if s["kind"] == "generation"]
    assert len(loglikelihood) == 12 and len(generation) == 6
    assert all(s["ok"] and s["served_choice"] == s["reference_choice"] for s in loglikelihood)
    assert all(len(s["served"]) == 4 and len(s["deltas"]) == 4 for s in loglikelihood)  # one per choice
    assert all(s["ids_returned"] and s["served"] == s["reference"] and s["served"] for s in generation)
    for row in report["metrics"]:  # meaningless on a replica, but identical on both sides
        assert row["served"] == row["reference"] and row["diff"] == 0.0, row
    assert {row["metric"] for row in report["metrics"]} == {"acc", "acc_norm", "exact_match"}


def test_planted_bug_is_exit_1_and_the_control_puts_it_on_the_port(server, control_server, replicas):
    # The port's reference has other weights (the planted bug); the control is the native replica on its own
    # server against its own reference, so the control matches and the isolation says "port-side".
    result = run_eval(replicas, server, "--reference", str(replicas["other"]), "--limit", "6",
                      "--control", str(replicas["base"]), "--control-base-url", control_server["base_url"],
                      "--control-slug", control_server["served_name"])
    assert result.returncode == 1, result.stderr[-3000:]
    report = result.json()
    assert report["verdict"] == "MISMATCH"
    assert report["max_abs_diff"] > tolerances.sensitivity_threshold("float32")
    assert report["mismatched_samples"] > 0
    assert any(s["kind"] == "generation" and s["first_changed_token"] == 0 for s in report["samples"])
    control = report["control"]
    assert (control["verdict"], control["mismatched_samples"]) == ("MATCH", 0)
    assert control["max_abs_diff"] < FP32_ATOL
    assert report["isolation"] == "port-side"
    for row in report["metrics"]:  # the control column: the same weights and graph, so the port's served values
        assert row["control"] == row["served"] and row["control_reference"] is not None
