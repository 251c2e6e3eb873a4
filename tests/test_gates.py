"""Tests for run_oss_gates.py and port_probe.py: every gate's pass and fail paths.

Preflight and verify-skip tests are metadata only. The smoke tests start MAX
(no compile) in the forked probe: one clean port, one port whose weight adapter
renames a tensor, one port that does not import, one key diff against a
checkpoint with a missing and a transposed tensor, and checks that crash, hang,
or show each child importing the port itself.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

import port_probe
from conftest import run_script


def scaffold_port(model: Path, out: Path, slug: str, donor: str = "llama3") -> Path:
    result = run_script("scaffold", model, "--start-from", donor, "--output-dir", out, "--slug", slug)
    assert result.returncode == 0, result.stderr
    return out / slug


def gates(model: Path, port: Path | str, *extra: str):
    result = run_script("run_oss_gates", model, "--port-dir", port, "--json", *extra)
    return result, (result.json() if result.stdout.strip() else None)


def statuses(doc: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in doc["checks"]}


@pytest.fixture(scope="module")
def llama(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def clean_port(llama, tmp_path_factory) -> Path:
    return scaffold_port(llama, tmp_path_factory.mktemp("gates"), "zz_gate_clean")


# --- preflight ---------------------------------------------------------------------------


def test_preflight_passes_on_a_fresh_port_with_trailing_slash(llama, clean_port):
    result, doc = gates(llama, str(clean_port) + "/", "--phase", "preflight")
    assert result.returncode == 0, result.stderr
    assert statuses(doc) == {"walls": "pass", "checkpoint-format": "pass", "dtype": "pass", "arch-name": "pass",
                             "encoding": "pass", "reference": "pass"}
    reference = next(c for c in doc["checks"] if c["name"] == "reference")
    assert reference["details"]["attn_implementation"] == "eager"  # the flatness check runs before any compile
    assert doc["passed"] is True and doc["port_dir"] == str(clean_port.resolve())


def test_parent_folder_is_an_input_error_naming_the_port(llama, clean_port):
    result, doc = gates(llama, clean_port.parent, "--phase", "preflight")
    assert result.returncode == 3 and str(clean_port.resolve()) in doc["error"]


def edited_port(port: Path, tmp_path: Path, old: str, new: str) -> Path:
    copy = tmp_path / port.name
    import shutil

    shutil.copytree(port, copy)
    arch = copy / "arch.py"
    assert old in arch.read_text()
    arch.write_text(arch.read_text().replace(old, new))
    return copy


@pytest.mark.parametrize("old, new, failing", [
    ('name="LlamaForCausalLM"', 'name="OtherForCausalLM"', "arch-name"),
    ('"bfloat16", "float32"', '"bfloat16"', "encoding"),  # a float32 checkpoint the port does not declare
    ('default_encoding="float32"', 'default_encoding="bfloat16"', "dtype"),
])
def test_preflight_fails_on_arch_py_mistakes(llama, clean_port, tmp_path, old, new, failing):
    port = edited_port(clean_port, tmp_path, old, new)
    result, doc = gates(llama, port, "--phase", "preflight")
    assert result.returncode == 1
    assert statuses(doc)[failing] == "fail"
    assert [c["name"] for c in doc["checks"] if c["status"] == "fail"][0] in (failing, "dtype")


def test_preflight_fails_on_bin_only_checkpoint(checkpoint_factory, clean_port):
    model = checkpoint_factory("llama", weights="bin")
    result, doc = gates(model, clean_port, "--phase", "preflight")
    assert result.returncode == 2  # check-walls treats a .bin-only checkpoint as a stop
    fmt = next(c for c in doc["checks"] if c["name"] == "checkpoint-format")
    assert fmt["status"] == "fail" and "bin" in fmt["summary"]


def test_a_wall_blocks_with_exit_2(tmp_path, clean_port):
    from checkpoints import write_config

    model = write_config(tmp_path / "mamba", {"architectures": ["MambaForCausalLM"], "model_type": "mamba",
                                              "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512})
    result, doc = gates(model, clean_port, "--phase", "all")
    assert result.returncode == 2
    assert statuses(doc)["walls"] == "blocked"
    assert all(c["phase"] == "preflight" for c in doc["checks"])  # later phases never ran


# --- verify ------------------------------------------------------------------------------


def test_verify_without_server_is_skipped_and_says_how(llama, clean_port):
    result, doc = gates(llama, clean_port, "--phase", "verify")
    assert result.returncode == 0
    (check,) = doc["checks"]
    assert check["status"] == "skipped" and "--base-url" in check["summary"]


def test_verify_against_a_dead_server_cannot_run(llama, clean_port):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result, doc = gates(llama, clean_port, "--phase", "verify", "--base-url", f"http://127.0.0.1:{port}")
    assert result.returncode == 3 and doc["error"]


# --- key diff (pure) -----------------------------------------------------------------------


DECLARED = {"embed_tokens.weight": (512, 64), "layers.0.mlp.down_proj.weight": (64, 128),
            "layers.0.mlp.up_proj.weight": (128, 64), "norm.weight": (64,)}


def test_key_diff_clean_and_allowlisted_buffers():
    produced = dict(DECLARED, **{"rope_freqs.weight": (8,)})
    diff = port_probe.diff_keys(produced, DECLARED, lambda n: n.endswith("rope_freqs.weight"))
    assert diff.clean


def test_key_diff_catches_renamed_missing_and_transposed():
    produced = dict(DECLARED)
    produced["layers.0.mlp.down.weight"] = produced.pop("layers.0.mlp.down_proj.weight")  # renamed
    del produced["norm.weight"]  # missing
    produced["layers.0.mlp.up_proj.weight"] = (64, 128)  # transposed
    diff = port_probe.diff_keys(produced, DECLARED)
    assert diff.missing == ["layers.0.mlp.down_proj.weight", "norm.weight"]
    assert diff.unexpected == ["layers.0.mlp.down.weight"]
    assert diff.shape_mismatches == [{"name": "layers.0.mlp.up_proj.weight", "adapter_shape": [64, 128],
                                      "graph_shape": [128, 64]}]
    assert not diff.clean


# --- smoke (fresh MAX subprocesses, no compile) ----------------------------------------------


def test_smoke_passes_on_a_fresh_port(llama, clean_port):
    result, doc = gates(llama, clean_port, "--phase", "smoke")
    assert result.returncode == 0, (result.stderr, result.stdout)
    assert statuses(doc) == {"import": "pass", "dry-build": "pass", "key-diff": "pass", "weights-format": "pass"}
    key_diff = next(c for c in doc["checks"] if c["name"] == "key-diff")
    assert key_diff["details"]["missing"] == [] and "21 adapter tensors" in key_diff["summary"]


def test_port_with_renamed_tensor_fails_at_the_gate(llama, clean_port, tmp_path):
    import shutil

    port = tmp_path / clean_port.name
    shutil.copytree(clean_port, port)
    adapter = port / "weight_adapters.py"
    text = adapter.read_text()
    old = '"model.": "",  # Removes the "model" prefix.'
    assert old in text
    adapter.write_text(text.replace(old, old + '\n    "mlp.down_proj": "mlp.down",'))
    result, doc = gates(llama, port, "--phase", "all")
    assert result.returncode == 1
    key_diff = next(c for c in doc["checks"] if c["name"] == "key-diff")
    assert key_diff["status"] == "fail"
    assert "layers.0.mlp.down_proj.weight" in key_diff["details"]["missing"]
    assert "layers.0.mlp.down.weight" in key_diff["details"]["unexpected"]
    assert not any(c["phase"] == "verify" for c in doc["checks"])  # never reaches a serve


def test_port_that_does_not_import_stops_smoke(llama, clean_port, tmp_path):
    import shutil

    port = tmp_path / clean_port.name
    shutil.copytree(clean_port, port)
    (port / "model.py").write_text((port / "model.py").read_text() + "\nfrom .no_such_module import X\n")
    result, doc = gates(llama, port, "--phase", "smoke")
    assert result.returncode == 1
    assert statuses(doc) == {"import": "fail"}
    assert "no_such_module" in doc["checks"][0]["summary"]


def test_key_diff_probe_catches_missing_and_transposed_checkpoint_tensors(llama, clean_port, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "edited"
    import shutil

    shutil.copytree(llama, model)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.norm.weight"]
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].T.copy()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    result = run_script("port_probe", model, "--port-dir", clean_port, "--check", "key-diff", "--json")
    assert result.returncode == 1, result.stderr
    doc = result.json()
    assert doc["missing"] == ["norm.weight"] and doc["unexpected"] == []
    assert doc["shape_mismatches"] == [{"name": "layers.0.mlp.up_proj.weight", "adapter_shape": [64, 128],
                                        "graph_shape": [128, 64]}]
    assert json.loads(json.dumps(doc))["passed"] is False


# --- smoke isolation: a check that crashes or hangs its (forked) process -------------------------

ADAPTER_ENTRY = "    return _convert_safetensor_with_model_config(\n"


def port_whose_adapter_does(port: Path, tmp_path: Path, statement: str) -> Path:
    """A copy of ``port`` whose safetensors adapter runs ``statement`` first (dry-build and key-diff call it)."""
    import shutil

    copy = tmp_path / port.name
    shutil.copytree(port, copy)
    adapter = copy / "weight_adapters.py"
    text = adapter.read_text()
    assert text.count(ADAPTER_ENTRY) == 1
    adapter.write_text(text.replace(ADAPTER_ENTRY, f"    {statement}\n" + ADAPTER_ENTRY))
    return copy


def test_a_check_that_kills_its_process_is_a_crash_and_the_others_still_run(llama, clean_port, tmp_path):
    port = port_whose_adapter_does(clean_port, tmp_path, "import os; os._exit(7)")
    result, doc = gates(llama, port, "--phase", "smoke")
    assert result.returncode == 1, result.stderr
    assert statuses(doc) == {"import": "pass", "dry-build": "fail", "key-diff": "fail", "weights-format": "pass"}
    for check in doc["checks"][1:3]:
        assert check["summary"].startswith("the probe crashed (exit 7)"), check


def test_a_check_that_hangs_is_a_timeout(llama, clean_port, tmp_path):
    port = port_whose_adapter_does(clean_port, tmp_path, "import time; time.sleep(120)")
    started = time.monotonic()
    result, doc = gates(llama, port, "--phase", "smoke", "--timeout", "4")
    assert result.returncode == 1, result.stderr
    assert statuses(doc) == {"import": "pass", "dry-build": "fail", "key-diff": "fail", "weights-format": "pass"}
    assert doc["checks"][1]["summary"] == "did not finish in 4 s"
    assert time.monotonic() - started < 100  # the hung children were stopped, not waited for


def test_each_forked_check_imports_the_port_afresh(llama, clean_port, tmp_path):
    """The probe parent imports MAX but never the port: each of the four children imports it itself."""
    import os
    import shutil

    port = tmp_path / clean_port.name
    shutil.copytree(clean_port, port)
    init = port / "__init__.py"
    init.write_text(init.read_text() + "\nimport os as _os\nwith open(_os.environ['ZZ_IMPORT_LOG'], 'a') as _log:\n"
                    "    _log.write(f'{_os.getpid()}\\n')\n")
    log = tmp_path / "imports.log"
    result = run_script("run_oss_gates", llama, "--port-dir", port, "--json", "--phase", "smoke",
                        env={"ZZ_IMPORT_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) == 4 and str(os.getpid()) not in pids


def test_subprocess_mode_keeps_the_old_fresh_process_path(llama, clean_port, tmp_path):
    import shutil

    port = tmp_path / clean_port.name
    shutil.copytree(clean_port, port)
    (port / "model.py").write_text((port / "model.py").read_text() + "\nfrom .no_such_module import X\n")
    result = run_script("run_oss_gates", llama, "--port-dir", port, "--json", "--phase", "smoke",
                        env={"IMPORT_MODEL_SMOKE": "subprocess"})
    assert result.returncode == 1
    doc = result.json()
    assert statuses(doc) == {"import": "fail"} and "no_such_module" in doc["checks"][0]["summary"]


def test_several_checks_without_fork_is_an_input_error(llama, clean_port):
    result = run_script("port_probe", llama, "--port-dir", clean_port, "--check", "import", "--check", "key-diff")
    assert result.returncode == 3 and "--fork" in result.stderr


# --- preflight's reference check overlaps the smoke probe's MAX import ----------------------


class _FakeProbe:
    """Stands in for the probe's Popen: records whether it was stopped before it finished."""

    def __init__(self, events):
        self.events, self.pid, self.args, self.returncode = events, -1, ["probe"], None

    def poll(self):
        return self.returncode


def _overlap_run(monkeypatch, reference_status: str):
    import argparse

    import run_oss_gates as gates

    events: list[str] = []
    probe = _FakeProbe(events)
    monkeypatch.setattr(gates, "quick_preflight", lambda *a: [gates.Check("preflight", "walls", "pass", "")])
    monkeypatch.setattr(gates, "start_probe", lambda *a: events.append("probe started") or probe)

    def reference(*a):
        events.append("reference checked")
        return gates.Check("preflight", "reference", reference_status, "")

    def finish(p, args):
        events.append("probe read")
        p.returncode = 0
        return [gates.Check("smoke", "import", "pass", "")]

    monkeypatch.setattr(gates, "reference_check", reference)
    monkeypatch.setattr(gates, "finish_probe", finish)
    monkeypatch.setattr(gates, "stop_probe", lambda p: events.append("probe stopped" if p.poll() is None else "done"))
    checks = gates.preflight_overlapping_smoke(argparse.Namespace(), None, {}, None)
    return events, checks


def test_the_probe_starts_before_the_reference_check_and_is_read_after_it(monkeypatch):
    events, checks = _overlap_run(monkeypatch, "pass")
    assert events == ["probe started", "reference checked", "probe read", "done"]
    assert [c.phase for c in checks] == ["preflight", "preflight", "smoke"]


def test_a_failed_reference_check_kills_the_probe_and_hides_smoke(monkeypatch):
    events, checks = _overlap_run(monkeypatch, "fail")
    assert events == ["probe started", "reference checked", "probe stopped"]
    assert all(c.phase == "preflight" for c in checks)
