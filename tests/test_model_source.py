"""The model-source layer (scripts/model_source.py) on local folders and on the loopback Hub.

Local cases call the module in-process. Hub cases run ``model_source_driver.py``
in a subprocess against the Hub stand-in (huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE at import), with the real client, no mocks.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import model_source
from checkpoints import edit_config, write_config
from cli_support import ScriptError
from conftest import ScriptResult
from hub_standin import subprocess_env

DRIVER = Path(__file__).resolve().parent / "model_source_driver.py"
PROG = "model_source_driver.py: error: "


def run_driver(*args: str, env: dict[str, str | None] | None = None) -> ScriptResult:
    done = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(env), timeout=300)
    return ScriptResult(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: ScriptResult, message: str) -> None:
    """Exit 3, exactly ``message`` as the only stderr line, nothing on stdout."""
    assert result.returncode == 3, result.stderr
    assert result.stderr == f"{PROG}{message}\n"
    assert result.stdout == ""


def expected_tensors(model_dir: Path) -> dict[str, list]:
    """name -> [dtype, shape, file], read with the safetensors library itself."""
    from safetensors import safe_open

    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "numpy") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                found[name] = [piece.get_dtype(), list(piece.get_shape()), path.name]
    return found


def write_raw_safetensors(path: Path, header_length: int, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", header_length) + header)
    return path


def expect_error(message: str):
    return pytest.raises(ScriptError, match=f"^{__import__('re').escape(message)}$")


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def sharded(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", max_shard_size="100KB", tokenizer=False)


@pytest.fixture(scope="module")
def bin_only(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", weights="bin", tokenizer=False)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- resolve ------------------------------------------------------------------------


def test_resolve_local_dir_config_path_and_hub_id(single: Path) -> None:
    source = model_source.resolve(str(single))
    assert source.is_local and source.local_dir == single and source.repo_id is None
    via_config = model_source.resolve(str(single / "config.json"))
    assert via_config.local_dir == single and via_config.name == single.name
    hub = model_source.resolve("org/name", "v1")
    assert (hub.is_local, hub.repo_id, hub.revision, hub.name) == (False, "org/name", "v1", "name")
    assert model_source.resolve("gpt2").repo_id == "gpt2"


def test_resolve_rejects_bad_models(tmp_path: Path, single: Path) -> None:
    with expect_error("MODEL is empty: give a Hub ID (org/name) or a local directory"):
        model_source.resolve("  ")
    missing = str(tmp_path / "missing")
    with expect_error(f"model not found: {missing} is neither a local directory nor a Hub ID (org/name)"):
        model_source.resolve(missing)
    with expect_error("model not found: a/b/c is neither a local directory nor a Hub ID (org/name)"):
        model_source.resolve("a/b/c")
    weights = str(single / "model.safetensors")
    with expect_error(f"{weights} is a file but not a config.json; give its folder instead"):
        model_source.resolve(weights)
    other_json = tmp_path / "generation.json"
    other_json.write_text("{}")
    with expect_error(f"{other_json} is a file but not a config.json; give its folder instead"):
        model_source.resolve(str(other_json))


# --- local weights ------------------------------------------------------------------


def test_local_single_safetensors(single: Path) -> None:
    source = model_source.resolve(str(single))
    weights = model_source.weight_files(source)
    assert weights == model_source.WeightFiles("safetensors", ("model.safetensors",), False, None, ())
    tensors = model_source.read_tensor_infos(source, weights)
    expected = expected_tensors(single)
    assert len(expected) == 21  # embed, 2 layers x 9, final norm, untied lm_head
    assert {n: [t.dtype, list(t.shape), t.file] for n, t in tensors.items()} == expected
    summary = model_source.checkpoint_summary(tensors)
    params = sum(int(__import__("math").prod(shape)) for _, shape, _ in expected.values())
    assert summary == {"tensor_count": 21, "parameter_count": params, "bytes": 4 * params,
                       "dominant_dtype": "F32", "parameters_by_dtype": {"F32": params}}


def test_local_sharded_safetensors(sharded: Path) -> None:
    source = model_source.resolve(str(sharded))
    weights = model_source.weight_files(source)
    index = json.loads((sharded / model_source.SAFETENSORS_INDEX).read_text())["weight_map"]
    shards = tuple(sorted(set(index.values())))
    assert len(shards) > 1
    assert weights == model_source.WeightFiles("safetensors", shards, True, model_source.SAFETENSORS_INDEX, ())
    tensors = model_source.read_tensor_infos(source, weights)
    assert {n: [t.dtype, list(t.shape), t.file] for n, t in tensors.items()} == expected_tensors(sharded)
    assert {n: t.file for n, t in tensors.items()} == index


def test_local_bin_only(bin_only: Path) -> None:
    source = model_source.resolve(str(bin_only))
    weights = model_source.weight_files(source)
    assert weights == model_source.WeightFiles("bin", ("pytorch_model.bin",), False, None, ())
    with expect_error(f"{bin_only} has no safetensors weights (format: bin); "
                      "tensor metadata is read from safetensors headers only"):
        model_source.read_tensor_infos(source, weights)


def test_local_mixed_formats_and_gguf(tmp_path: Path, single: Path) -> None:
    both = copy_model(single, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"x")
    (both / "training_args.bin").write_bytes(b"x")  # not a weight file
    weights = model_source.weight_files(model_source.resolve(str(both)))
    assert (weights.format, weights.files, weights.other_formats) == ("safetensors", ("model.safetensors",), ("bin",))
    gguf = write_config(tmp_path / "gguf", {"architectures": ["LlamaForCausalLM"]})
    (gguf / "model-q4.gguf").write_bytes(b"GGUF")
    assert model_source.weight_files(model_source.resolve(str(gguf))) == model_source.WeightFiles(
        "gguf", ("model-q4.gguf",), False, None, ())
    empty = write_config(tmp_path / "empty", {"architectures": ["LlamaForCausalLM"]})
    assert model_source.weight_files(model_source.resolve(str(empty))).format == "none"


def test_local_missing_files(tmp_path: Path, sharded: Path) -> None:
    broken = copy_model(sharded, tmp_path / "broken")
    (broken / "model-00002-of-00006.safetensors").unlink()
    source = model_source.resolve(str(broken))
    with expect_error(f"model-00002-of-00006.safetensors not found in {broken}"):
        model_source.read_tensor_infos(source)
    with expect_error(f"nope.json not found in {broken}"):
        source.fetch("nope.json")
    (broken / "config.json").unlink()
    with expect_error(f"config.json not found in {broken}"):
        model_source.read_config(model_source.resolve(str(broken)))
    edit = copy_model(sharded, tmp_path / "empty_index")
    (edit / model_source.SAFETENSORS_INDEX).write_text('{"weight_map": {}}')
    with expect_error(f"{model_source.SAFETENSORS_INDEX} of {edit} has an empty weight_map"):
        model_source.weight_files(model_source.resolve(str(edit)))


# --- local config errors ------------------------------------------------------------


def test_malformed_config_json(tmp_path: Path) -> None:
    model = tmp_path / "bad"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  oops}')
    with expect_error(f"config.json of {model} is not valid JSON "
                      "(line 2, column 3: Expecting property name enclosed in double quotes)"):
        model_source.read_config(model_source.resolve(str(model)))
    (model / "config.json").write_text('["LlamaForCausalLM"]')
    with expect_error(f"config.json of {model} is not a JSON object (it is a JSON array)"):
        model_source.read_config(model_source.resolve(str(model)))


@pytest.mark.parametrize("architectures", [None, [], "LlamaForCausalLM", [3]])
def test_config_without_architectures(tmp_path: Path, architectures) -> None:
    config = {"model_type": "llama"} if architectures is None else {"architectures": architectures}
    model = write_config(tmp_path / "noarch", config)
    source = model_source.resolve(str(model))
    with expect_error(f"config.json of {model} has no 'architectures' list; cannot tell which model class it is"):
        model_source.read_config(source)
    assert model_source.read_config(source, require_architectures=False) == config


def test_cli_errors_are_one_line_and_json(tmp_path: Path) -> None:
    model = tmp_path / "bad"
    model.mkdir()
    (model / "config.json").write_text("{")
    message = f"config.json of {model} is not valid JSON (line 1, column 2: " \
              "Expecting property name enclosed in double quotes)"
    assert_one_line_error(run_driver(model), message)
    as_json = run_driver(model, "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout) == {"error": message, "exit_code": 3}


# --- local safetensors headers --------------------------------------------------------


def test_truncated_and_oversized_headers(tmp_path: Path) -> None:
    limit = model_source.MAX_SAFETENSORS_HEADER_BYTES
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\x00\x00")
    with expect_error("short.safetensors: truncated safetensors file (no header length)"):
        model_source.read_safetensors_header(short)
    cut = write_raw_safetensors(tmp_path / "cut.safetensors", 1000, b'{"w": {"dtype"')
    with expect_error("cut.safetensors: truncated safetensors header (14 of 1000 bytes)"):
        model_source.read_safetensors_header(cut)
    huge = write_raw_safetensors(tmp_path / "huge.safetensors", 2**40, b"{}")
    with expect_error(f"huge.safetensors: safetensors header length {2**40} is outside 1..{limit} bytes; "
                      "the file is corrupt"):
        model_source.read_safetensors_header(huge)
    zero = write_raw_safetensors(tmp_path / "zero.safetensors", 0, b"")
    with expect_error(f"zero.safetensors: safetensors header length 0 is outside 1..{limit} bytes; "
                      "the file is corrupt"):
        model_source.read_safetensors_header(zero)
    garbage = write_raw_safetensors(tmp_path / "garbage.safetensors", 4, b"\xff\xfe{[")
    with expect_error("garbage.safetensors: safetensors header is not valid JSON; the file is corrupt"):
        model_source.read_safetensors_header(garbage)
    listed = write_raw_safetensors(tmp_path / "list.safetensors", 2, b"[]")
    with expect_error("list.safetensors: safetensors header is not a JSON object"):
        model_source.read_safetensors_header(listed)
    good = b'{"__metadata__": {"format": "pt"}, "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}'
    assert model_source.read_safetensors_header(
        write_raw_safetensors(tmp_path / "good.safetensors", len(good), good + b"\0" * 12)
    )["w"]["shape"] == [2, 3]


def test_malformed_header_entry_in_a_model(tmp_path: Path) -> None:
    model = write_config(tmp_path / "entry", {"architectures": ["LlamaForCausalLM"]})
    header = b'{"w": {"dtype": "F32"}}'
    write_raw_safetensors(model / "model.safetensors", len(header), header)
    with expect_error("model.safetensors: malformed safetensors header entry for 'w'"):
        model_source.read_tensor_infos(model_source.resolve(str(model)))


def test_oversized_header_in_a_model_is_exit_3(tmp_path: Path) -> None:
    model = write_config(tmp_path / "oversized", {"architectures": ["LlamaForCausalLM"]})
    write_raw_safetensors(model / "model.safetensors", 2**62, b"{}")
    assert_one_line_error(
        run_driver(model),
        f"model.safetensors: safetensors header length {2**62} is outside "
        f"1..{model_source.MAX_SAFETENSORS_HEADER_BYTES} bytes; the file is corrupt",
    )


# --- config normalization -----------------------------------------------------------

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def rope(theta, rope_type="default", scaling=None, partial=None) -> model_source.RopeSettings:
    return model_source.RopeSettings(theta, rope_type, scaling or {}, partial)


def test_normalize_old_spelling_llama3() -> None:
    # Hand-written in the spelling of most Hub checkpoints (transformers 4.x).
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}
    normalized = model_source.normalize_config(config)
    assert normalized == model_source.NormalizedConfig(
        "LlamaForCausalLM", "llama", "bfloat16", rope(500000.0, "llama3", LLAMA3_SCALING), {}, "old")


def test_normalize_old_spelling_variants() -> None:
    both_keys = {"torch_dtype": "float16", "rope_theta": 10000,
                 "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 2.0}}
    assert model_source.normalize_config(both_keys).rope == rope(10000.0, "linear", {"factor": 2.0})
    no_scaling = {"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0, "rope_scaling": None}
    normalized = model_source.normalize_config(no_scaling)
    assert (normalized.rope, normalized.dtype, normalized.spelling) == (rope(1000000.0), None, "old")
    partial = {"architectures": ["PhiForCausalLM"], "rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    assert model_source.normalize_config(partial).rope == rope(10000.0, partial=0.4)


def test_normalize_new_spelling() -> None:
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": "bfloat16",
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32768}}
    assert model_source.normalize_config(config) == model_source.NormalizedConfig(
        "Qwen3ForCausalLM", "qwen3", "bfloat16",
        rope(1000000.0, "yarn", {"factor": 4.0, "original_max_position_embeddings": 32768}), {}, "new")


def test_normalize_per_layer_type_rope_both_spellings() -> None:
    new = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "dtype": "bfloat16",
           "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}
    old = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "torch_dtype": "bfloat16",
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    full, sliding = rope(1000000.0, "linear", {"factor": 8.0}), rope(10000.0)
    for config, spelling in ((new, "new"), (old, "old")):
        normalized = model_source.normalize_config(config)
        assert normalized.rope == full
        assert normalized.rope_by_layer_type == {"sliding_attention": sliding, "full_attention": full}
        assert (normalized.dtype, normalized.spelling) == ("bfloat16", spelling)


def test_normalize_agrees_with_transformers_conversion() -> None:
    """transformers 5 rewrites old configs into rope_parameters; both must normalize alike."""
    from transformers import AutoConfig

    olds = [
        {"model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
         "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}},
        {"model_type": "gemma3_text", "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    ]
    for old in olds:
        fields = {k: v for k, v in old.items() if k != "model_type"}
        converted = AutoConfig.for_model(old["model_type"], **fields).to_dict()
        assert "rope_parameters" in converted
        ours, theirs = model_source.normalize_config(old), model_source.normalize_config(converted)
        assert (ours.rope, ours.rope_by_layer_type) == (theirs.rope, theirs.rope_by_layer_type), old["model_type"]


def test_normalize_nested_text_config_mixed_and_empty() -> None:
    multimodal = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "torch_dtype": "bfloat16", "text_config": {"model_type": "gemma3_text", "rope_theta": 1000000.0}}
    normalized = model_source.normalize_config(multimodal)
    assert (normalized.dtype, normalized.rope, normalized.model_type) == ("bfloat16", rope(1000000.0), "gemma3")
    mixed = {"torch_dtype": "float16", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert model_source.normalize_config(mixed).spelling == "mixed"
    empty = model_source.normalize_config({})
    assert (empty.architecture, empty.dtype, empty.rope, empty.rope_by_layer_type, empty.spelling) == (
        None, None, None, {}, "none")


def test_normalize_config_saved_by_transformers(single: Path) -> None:
    config = model_source.read_config(model_source.resolve(str(single)))
    normalized = model_source.normalize_config(config)
    assert (normalized.architecture, normalized.dtype, normalized.rope, normalized.spelling) == (
        "LlamaForCausalLM", "float32", rope(10000.0), "new")


# --- the loopback Hub ---------------------------------------------------------------


def local_report(model: Path) -> dict:
    result = run_driver(model, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result.json()


def test_hub_single_safetensors_reads_headers_only(hub, single: Path) -> None:
    repo = hub.add_repo("org/tiny", single)
    result = run_driver("org/tiny", env=hub.env())
    assert result.returncode == 0, result.stderr
    report, local = result.json(), local_report(single)
    assert (report["local"], report["repo_id"], report["name"]) == (False, "org/tiny", "tiny")
    for key in ("config", "normalized", "weights", "tensors", "summary"):
        assert report[key] == local[key], key
    assert report["tensors"] == expected_tensors(single)
    assert hub.downloaded_files() == ["org/tiny/config.json"]
    assert hub.ranged_files() == ["org/tiny/model.safetensors"]
    cached = Path(hub.hf_home) / "hub" / "models--org--tiny" / "snapshots" / repo.sha / "config.json"
    assert json.loads(cached.read_text()) == report["config"]


def test_hub_sharded_safetensors(hub, sharded: Path) -> None:
    hub.add_repo("org/sharded", sharded)
    result = run_driver("org/sharded", env=hub.env())
    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["weights"] == local_report(sharded)["weights"]
    assert report["weights"]["sharded"] is True
    assert report["tensors"] == expected_tensors(sharded)
    shards = report["weights"]["files"]
    assert sorted(hub.ranged_files()) == [f"org/sharded/{name}" for name in shards]
    assert not [f for f in hub.downloaded_files() if f.endswith(".safetensors")]


def test_hub_bin_only(hub, bin_only: Path) -> None:
    hub.add_repo("org/bin", bin_only)
    result = run_driver("org/bin", env=hub.env())
    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["weights"] == {"format": "bin", "files": ["pytorch_model.bin"], "sharded": False,
                                 "index_file": None, "other_formats": []}
    assert "tensors" not in report
    assert hub.downloaded_files() == ["org/bin/config.json"]
    failed = run_driver("org/bin", "--steps", "headers", env=hub.env())
    assert_one_line_error(failed, "org/bin has no safetensors weights (format: bin); "
                                  "tensor metadata is read from safetensors headers only")


def test_hub_missing_files(hub, tmp_path: Path, sharded: Path) -> None:
    broken = copy_model(sharded, tmp_path / "broken")
    (broken / "model-00003-of-00006.safetensors").unlink()
    hub.add_repo("org/broken", broken)
    assert_one_line_error(run_driver("org/broken", env=hub.env()),
                          "the safetensors header of model-00003-of-00006.safetensors not found in org/broken")
    (broken / "config.json").unlink()
    assert_one_line_error(run_driver("org/broken", env=hub.env()), "config.json not found in org/broken")


def test_hub_repo_not_found(hub) -> None:
    result = run_driver("org/nope", env=hub.env())
    assert_one_line_error(result, "model not found: org/nope does not exist on the Hub")
    as_json = run_driver("org/nope", "--json", env=hub.env())
    assert json.loads(as_json.stdout) == {"error": "model not found: org/nope does not exist on the Hub",
                                          "exit_code": 3}
    assert {r.status for r in hub.records()} == {404}


def test_hub_gated_repo(hub, single: Path) -> None:
    hub.add_repo("org/gated", single, gated=True, tokens=("hf_granted",))
    message = "org/gated is gated: accept its terms on the Hub and set HF_TOKEN to a token with access"
    assert_one_line_error(run_driver("org/gated", env=hub.env()), message)
    assert 401 in {r.status for r in hub.records()}
    assert_one_line_error(run_driver("org/gated", env=hub.env(token="hf_wrong")), message)
    assert 403 in {r.status for r in hub.records()}
    granted = run_driver("org/gated", env=hub.env(token="hf_granted"))
    assert granted.returncode == 0, granted.stderr
    assert granted.json()["tensors"] == expected_tensors(single)
    assert {r.authorization for r in hub.records() if r.status == 206} == {"Bearer hf_granted"}


def test_hub_offline_and_not_cached(hub, single: Path) -> None:
    hub.add_repo("org/tiny", single)
    result = run_driver("org/tiny", env=hub.env(offline=True))
    assert_one_line_error(result, "config.json of org/tiny is not in the HF cache and the Hub cannot be "
                                  "reached (HF_HUB_OFFLINE is set)")
    listing = run_driver("org/tiny", "--steps", "weights", env=hub.env(offline=True))
    assert_one_line_error(listing, "org/tiny is not in the HF cache and HF_HUB_OFFLINE is set; "
                                   "unset it or download the model first")
    assert hub.records() == []


def test_hub_unreachable_endpoint(hub) -> None:
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**hub.env(), "HF_ENDPOINT": dead}
    # huggingface_hub retries a failed file lookup with backoff (~20 s); its notices stay off stderr.
    assert_one_line_error(run_driver("org/tiny", env=env), "config.json of org/tiny is not in the HF cache and "
                                                            "the Hub cannot be reached (network error)")
    assert_one_line_error(run_driver("org/tiny", "--steps", "weights", env=env),
                          "cannot reach the Hub for the file list of org/tiny: ConnectError")


def test_hub_cached_then_offline(hub, sharded: Path) -> None:
    hub.add_repo("org/sharded", sharded)
    online = run_driver("org/sharded", "--steps", "config,weights", env=hub.env())
    assert online.returncode == 0, online.stderr
    seen = len(hub.records())
    offline_listing = run_driver("org/sharded", "--steps", "config,weights", env=hub.env(offline=True))
    assert offline_listing.returncode == 0, offline_listing.stderr
    assert offline_listing.json()["weights"] == online.json()["weights"]
    # Headers of shards that were never downloaded cannot be read offline.
    first_shard = online.json()["weights"]["files"][0]
    assert_one_line_error(
        run_driver("org/sharded", "--steps", "tensors", env=hub.env(offline=True)),
        f"{first_shard} of org/sharded is not in the HF cache and HF_HUB_OFFLINE is set; "
        "unset it to read headers from the Hub (no weights are downloaded)",
    )
    assert len(hub.records()) == seen
    fetched = run_driver("org/sharded", "--steps", "download", env=hub.env())
    assert fetched.returncode == 0, fetched.stderr
    seen = len(hub.records())
    offline = run_driver("org/sharded", env=hub.env(offline=True))
    assert offline.returncode == 0, offline.stderr
    assert offline.json()["tensors"] == expected_tensors(sharded)
    assert len(hub.records()) == seen


def test_hub_revision(hub, tmp_path: Path, single: Path) -> None:
    v2 = copy_model(single, tmp_path / "v2")
    edit_config(v2, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}})
    repo = hub.add_repo("org/tiny", single, revisions={"v2": v2})
    main = run_driver("org/tiny", "--steps", "config", env=hub.env())
    assert main.json()["normalized"]["rope"]["theta"] == 10000.0
    for revision in ("v2", repo.commit_sha("v2")):
        result = run_driver("org/tiny", "--revision", revision, "--steps", "config", env=hub.env())
        assert result.returncode == 0, result.stderr
        assert result.json()["revision"] == revision
        assert result.json()["normalized"]["rope"] == asdict(rope(20000.0, "linear", {"factor": 2.0}))
    assert_one_line_error(run_driver("org/tiny", "--revision", "nope", env=hub.env()),
                          "revision not found: org/tiny at revision nope")


def test_hub_config_errors(hub, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{\n")
    hub.add_repo("org/bad", bad)
    assert_one_line_error(run_driver("org/bad", env=hub.env()),
                          "config.json of org/bad is not valid JSON "
                          "(line 2, column 1: Expecting property name enclosed in double quotes)")
    hub.add_repo("org/noarch", write_config(tmp_path / "noarch", {"model_type": "llama"}))
    assert_one_line_error(run_driver("org/noarch", env=hub.env()),
                          "config.json of org/noarch has no 'architectures' list; cannot tell which model class it is")


@pytest.mark.parametrize("header_length, body", [(5000, b'{"w": '), (2**40, b"{}")],
                         ids=["truncated", "oversized"])
def test_hub_corrupt_safetensors_header(hub, tmp_path: Path, header_length: int, body: bytes) -> None:
    model = write_config(tmp_path / "corrupt", {"architectures": ["LlamaForCausalLM"]})
    write_raw_safetensors(model / "model.safetensors", header_length, body)
    hub.add_repo("org/corrupt", model)
    assert_one_line_error(run_driver("org/corrupt", env=hub.env()),
                          "model.safetensors of org/corrupt: safetensors header is truncated, oversized or "
                          "not valid JSON; the file is corrupt")
    assert "org/corrupt/model.safetensors" not in hub.downloaded_files()


def test_hub_single_file_with_another_name(hub, tmp_path: Path, single: Path) -> None:
    renamed = copy_model(single, tmp_path / "renamed")
    (renamed / "model.safetensors").rename(renamed / "weights.safetensors")
    hub.add_repo("org/renamed", renamed)
    result = run_driver("org/renamed", env=hub.env())
    assert result.returncode == 0, result.stderr
    assert {name: info[2] for name, info in result.json()["tensors"].items()} == {
        name: "weights.safetensors" for name in expected_tensors(single)}


def test_hub_offline_listing_does_not_invent_a_weightless_repo(hub, tmp_path: Path, single: Path) -> None:
    hub.add_repo("org/tiny", single)
    assert run_driver("org/tiny", "--steps", "config", env=hub.env()).returncode == 0
    # Only config.json is cached: offline, the weights cannot be listed (not "there are none").
    assert_one_line_error(
        run_driver("org/tiny", "--steps", "weights", env=hub.env(offline=True)),
        "no weight files of org/tiny are in the HF cache and HF_HUB_OFFLINE is set; "
        "unset it to list the repo's weights (no weights are downloaded)",
    )
    assert run_driver("org/tiny", "--steps", "download", env=hub.env()).returncode == 0
    offline = run_driver("org/tiny", "--steps", "weights", env=hub.env(offline=True))
    assert offline.returncode == 0, offline.stderr
    assert offline.json()["weights"]["files"] == ["model.safetensors"]
    # Online, the Hub's listing is authoritative: a repo without weights says so.
    hub.add_repo("org/config-only", write_config(tmp_path / "config_only", {"architectures": ["LlamaForCausalLM"]}))
    online = run_driver("org/config-only", env=hub.env())
    assert online.returncode == 0, online.stderr
    assert online.json()["weights"] == {"format": "none", "files": [], "sharded": False, "index_file": None,
                                        "other_formats": []}
