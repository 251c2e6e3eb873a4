"""End-to-end: a small model's replica keeps its shapes, so serving the model after the replica compiles nothing.

The "named model" is a small strong-init Llama checkpoint (the tests/test_verify_e2e.py replica, weights and
tokenizer included). `tiny` on it must keep every shape; then, on a fresh MAX compile cache (a temporary
XDG_CACHE_HOME), the replica's serve compiles its graphs and the named model's serve adds no compiled graph to
the cache. The signal is the cache's set of compiled-graph files (scripts/max_cache.py), not a timing.
"""

from __future__ import annotations

import json

import pytest

import max_cache
import max_server
from conftest import run_script
from test_verify_e2e import build

pytestmark = pytest.mark.e2e

SERVE_TIMEOUT = 2400  # a cold compile on a busy 2-core runner can take many minutes
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    named = build(root / "named", seed=3)
    replica = root / "replica"
    done = run_script("make_tiny_model", named, "--output", replica, "--json")
    assert done.returncode == 0, done.stderr
    return {"named": named, "replica": replica, "tiny": done.json(), "root": root}


def _serve_and_stop(model, root, env) -> None:
    result = run_script("serve_port", str(model), "--log-file", str(root / f"{model.name}.log"), "--json",
                        env=env, timeout=SERVE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = result.json()
    stop = run_script("serve_port", "--stop", "--port", str(record["port"]), "--json", env=env)
    if stop.returncode != 0 or max_server._group_alive(record["pid"]):
        max_server.stop_process_group(record["pid"])
    assert stop.returncode == 0, stop.stderr


def test_tiny_keeps_a_small_sources_shapes(models):
    shapes = models["tiny"]["manifest"]["shapes"]
    assert shapes["kept"] is True, shapes
    named = json.loads((models["named"] / "config.json").read_text())
    replica = json.loads((models["replica"] / "config.json").read_text())
    assert {k: replica.get(k) for k in SHAPE_KEYS} == {k: named.get(k) for k in SHAPE_KEYS}


def test_the_named_models_serve_after_the_replicas_is_a_cache_hit(models):
    xdg = models["root"] / "xdg"
    env = {"XDG_CACHE_HOME": str(xdg), "IMPORT_MODEL_SERVER_DIR": str(models["root"] / "servers")}
    assert max_cache.compiled_graphs(env) == set()
    _serve_and_stop(models["replica"], models["root"], env)
    after_replica = max_cache.compiled_graphs(env)
    assert after_replica, f"no compiled graph under {max_cache.cache_root(env)}: MAX's cache layout changed?"
    _serve_and_stop(models["named"], models["root"], env)
    assert max_cache.compiled_graphs(env) == after_replica, "the named model compiled a graph of its own"
