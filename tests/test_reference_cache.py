"""compare's reference cache: a second compare of an unchanged model scores from disk, never a stale one.

The served side is the loopback stand-in (tests/openai_standin.py) answering with HF's own rows, so
these tests compile nothing.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import hf_reference
import port_compare
import reference_cache
from openai_standin import OpenAIStandin

PROMPT = "The capital of France is Paris. Once upon a time"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "reference-cache"
    monkeypatch.setenv(reference_cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A strong-init 2-layer Llama replica (a default-init one would be flat: no verdict at all)."""
    import transformers
    from make_tiny_model import ReplicaOptions, build_replica

    config = transformers.LlamaConfig().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    folder = tmp_path_factory.mktemp("reference-cache-model") / "llama"
    build_replica(config, folder, ReplicaOptions())
    return folder


def standin_for(model_dir) -> OpenAIStandin:
    import transformers

    hf = hf_reference.load(str(model_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = int(hf.get_output_embeddings().weight.shape[0])
    decoded = tokenizer.batch_decode([[i] for i in range(rows)], skip_special_tokens=True)
    return OpenAIStandin(lambda ids: hf_reference.logprob_rows(hf, ids), decoded, served_name="port")


def compare(model_dir, standin, **kwargs):
    return port_compare.run_compare(str(model_dir), standin.base_url, "port", [PROMPT], max_new_tokens=4, **kwargs)


def refuse_hf(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the HF reference was loaded although the cache holds its rows")

    monkeypatch.setattr(hf_reference, "load_model", fail)


def test_second_compare_scores_from_the_cache_with_the_same_verdict(model, cache, monkeypatch):
    with standin_for(model) as standin:
        first = compare(model, standin)
        assert not first.reference_cached and first.hf_load_seconds > 0
        assert list(cache.glob("*.npz")), "the first compare stored nothing"
        refuse_hf(monkeypatch)
        second = compare(model, standin)
    assert second.reference_cached and second.hf_load_seconds == 0
    assert second.verdict == first.verdict
    assert second.max_abs_diff == first.max_abs_diff
    assert second.to_dict()["reference_cached"] is True


def test_a_rewritten_weight_file_is_a_miss(model, cache, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    with standin_for(copy) as standin:
        compare(copy, standin)
        weights = next(copy.glob("*.safetensors"))
        later = time.time() + 5
        os.utime(weights, (later, later))  # same bytes, new mtime: must not be trusted
        loads = []
        real = hf_reference.load_model
        monkeypatch.setattr(hf_reference, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
        again = compare(copy, standin)
    assert loads and not again.reference_cached


def test_other_settings_and_layer_stats_are_misses(model, cache, monkeypatch):
    with standin_for(model) as standin:
        compare(model, standin)
        loads = []
        real = hf_reference.load_model
        monkeypatch.setattr(hf_reference, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
        sdpa = compare(model, standin, attn_implementation="sdpa")
        stats = compare(model, standin, layer_stats=True)
    assert len(loads) == 2 and not sdpa.reference_cached and not stats.reference_cached


def test_the_cache_can_be_turned_off(model, tmp_path, monkeypatch):
    monkeypatch.setenv(reference_cache.CACHE_ENV, "off")
    assert reference_cache.cache_dir() is None
    assert not reference_cache.store_rows("key", [1, 2], np.zeros((1, 3)), 3)
    assert reference_cache.load_rows("key", [1, 2]) is None


def test_fingerprint_covers_every_file_and_setting(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    key = reference_cache.model_fingerprint(tmp_path, dtype="float32")
    assert key == reference_cache.model_fingerprint(tmp_path, dtype="float32")
    assert key != reference_cache.model_fingerprint(tmp_path, dtype="bfloat16")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert key != reference_cache.model_fingerprint(tmp_path, dtype="float32")
    assert reference_cache.model_fingerprint(tmp_path / "missing") is None


def test_bad_entries_are_misses_and_prune_keeps_the_newest(cache):
    cache.mkdir()
    rows = np.zeros((2, 4))
    assert reference_cache.store_rows("k", [1, 2, 3], rows, 4)
    assert reference_cache.load_rows("k", [1, 2]) is None  # other ids: another entry
    entry = next(cache.glob("*.npz"))
    entry.write_bytes(b"not an npz")
    assert reference_cache.load_rows("k", [1, 2, 3]) is None
    for index in range(3):
        reference_cache.store_rows("k", [index, 9, 9], rows, 4)
        time.sleep(0.01)
    size = next(cache.glob("*.npz")).stat().st_size
    reference_cache.prune(cache, limit=size)
    left = list(cache.glob("*.npz"))
    assert len(left) == 1
    assert reference_cache.load_rows("k", [2, 9, 9]) is not None
    assert not list(cache.glob("*.tmp"))
