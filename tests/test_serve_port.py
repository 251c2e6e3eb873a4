"""Tests of serve_port and compare_layers that need no compiled MAX graph."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import compare_layers
import serve_port
from cli_support import ScriptError
from conftest import SCRIPTS_DIR, run_script


def make_port(parent: Path, slug: str = "tiny_port", body: str = "ARCHITECTURES = []\n") -> Path:
    folder = parent / slug
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(body)
    return folder


# --- port dir and command line ---------------------------------------------------------


def test_port_dir_trailing_slash_is_stripped_and_slug_is_folder_name(tmp_path):
    folder = make_port(tmp_path)
    normalized = serve_port.normalize_port_dir(str(folder) + "/")
    assert normalized.path == folder.resolve()
    assert normalized.slug == "tiny_port"
    assert not str(normalized.path).endswith("/")


def test_parent_folder_is_refused_with_a_suggestion(tmp_path):
    folder = make_port(tmp_path)
    with pytest.raises(ScriptError, match=r"no __init__\.py defining ARCHITECTURES; did you mean .*tiny_port"):
        serve_port.normalize_port_dir(tmp_path)
    assert folder.is_dir()


def test_port_without_architectures_and_missing_folder_are_refused(tmp_path):
    make_port(tmp_path, "empty_port", body="X = 1\n")
    with pytest.raises(ScriptError, match="ARCHITECTURES"):
        serve_port.normalize_port_dir(tmp_path / "empty_port")
    with pytest.raises(ScriptError, match="is not a folder"):
        serve_port.normalize_port_dir(tmp_path / "nope")


def test_slug_shadowed_by_an_installed_module_is_refused(tmp_path):
    folder = make_port(tmp_path, "json")
    with pytest.raises(ScriptError, match="would shadow the port"):
        serve_port.normalize_port_dir(folder)


def test_serve_command_is_built_in_one_place_with_echo_and_slug(tmp_path):
    folder = make_port(tmp_path)
    command = serve_port.build_serve_command("/m/model", port=8123, port_dir=str(folder) + "/")
    assert command[1] == "serve"
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--model-path"] == "/m/model"
    assert flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert flags["--devices"] == "cpu" and flags["--quantization-encoding"] == "float32"
    assert "--enable-echo" in command
    index = command.index("--custom-architectures")
    assert command[index + 1] == str(folder.resolve())
    assert command[command.index("--served-model-name") + 1] == "tiny_port"
    native = serve_port.build_serve_command("/m/model", port=8123, devices="gpu", encoding="bfloat16")
    assert "--custom-architectures" not in native and "--served-model-name" not in native
    assert native[native.index("--devices") + 1] == "gpu"
    assert native[native.index("--quantization-encoding") + 1] == "bfloat16"


def test_free_port_is_bindable():
    port = serve_port.free_port()
    assert 0 < port < 65536
    assert not serve_port.port_in_use(port)


# --- log reading -----------------------------------------------------------------------

LOG_HEAD = "18:55:05.477 INFO: Starting server...\n18:55:07.656 INFO: Waiting for model worker readiness\n"


@pytest.mark.parametrize(
    "tail, cause",
    [
        ("ValueError: Failed to import custom model from: /x/tiny_port\nModuleNotFoundError: No module named 'foo'\n",
         "port-import-error"),
        ("ValueError: Missing required weights: layers.0.mlp.gate_proj.weight\n", "weight-name-mismatch"),
        ("ValueError: Unexpected keys in state_dict: lm_head.bias\n", "weight-name-mismatch"),
        ("ValueError: Value provided to weight 'embed.weight' had different shape (expected=[512, 64], actual=[500, 64])\n",
         "shape-mismatch"),
        ("ValueError: quantization_encoding of 'float32' not supported by MAX engine.\n", "unsupported-encoding"),
        ("error: constraint failed: rope_first partial RoPE requires interleaved layout\n", "kernel-constraint"),
        ("ValueError: At least one accelerator required for Allreduce\n", "device"),
        ("RuntimeError: something else broke\n", "unknown"),
    ],
)
def test_failures_are_classified_with_their_error_lines(tail, cause):
    found, lines = serve_port.classify_failure(LOG_HEAD + "Traceback (most recent call last):\n"
                                               '  File "x.py", line 1, in <module>\n' + tail)
    assert found == cause
    assert lines and lines[-1] == tail.strip().splitlines()[-1]
    assert not any(line.lstrip().startswith("File ") for line in lines)


def test_phase_is_read_from_the_log():
    assert serve_port.current_phase("") == "starting"
    assert serve_port.current_phase(LOG_HEAD) == "starting model worker"
    assert serve_port.current_phase(LOG_HEAD + "INFO: Building, compiling, and initializing model...\n") == \
        "compiling graph"


def test_serve_failure_message_is_one_line_with_cause_and_log(tmp_path):
    error = serve_port.ServeFailure("shape-mismatch", serve_port.cause_hint("shape-mismatch"),
                                    ["a", "ValueError: had different shape"], tmp_path / "s.log")
    text = str(error)
    assert "\n" not in text
    assert text.startswith("max serve failed (shape-mismatch:")
    assert "ValueError: had different shape" in text and "s.log" in text
    assert error.exit_code == 3


# --- a fake process group, stopped without orphans ---------------------------------------


def test_stop_process_group_leaves_no_children():
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    time.sleep(1.0)
    assert serve_port._group_alive(process.pid)
    assert serve_port.stop_process_group(process.pid, process) is True
    assert not serve_port._group_alive(process.pid)
    assert serve_port.stop_process_group(process.pid, process) is False


def test_stop_without_records_is_a_no_op(tmp_path):
    result = run_script("serve_port", "--stop", "--json", env={"IMPORT_MODEL_SERVER_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.json() == {"stopped": []}


def test_serve_bad_input_exits_3_with_one_line(tmp_path):
    result = run_script("serve_port", str(tmp_path), "--port-dir", str(tmp_path), "--json")
    assert result.returncode == 3
    assert "ARCHITECTURES" in result.json()["error"]
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_script("serve_port")
    assert result.returncode == 3 and "MODEL is required" in result.stderr


# --- compare pre-flight against a stand-in server ---------------------------------------------


class _Models(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": "served_slug", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def models_only_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_check_server_accepts_the_served_name_and_picks_the_only_model(models_only_server):
    assert compare_layers.check_server(models_only_server, "served_slug", "hint").served_name == "served_slug"
    assert compare_layers.check_server(models_only_server, None, "hint").served_name == "served_slug"
    with pytest.raises(ScriptError, match=r"serves \['served_slug'\], not 'other'.*restart it with: HINT"):
        compare_layers.check_server(models_only_server, "other", "HINT")


def test_compare_wrong_name_and_no_server_fail_fast(models_only_server, checkpoint_factory):
    model = checkpoint_factory("llama")
    started = time.monotonic()
    wrong = run_script("compare_layers", str(model), "--base-url", models_only_server, "--slug", "other", "--json")
    port = serve_port.free_port()
    missing = run_script("compare_layers", str(model), "--port", str(port))
    elapsed = time.monotonic() - started
    assert wrong.returncode == 3 and missing.returncode == 3
    assert "not 'other'" in wrong.json()["error"]
    assert len(missing.stderr.strip().splitlines()) == 1
    assert f"no MAX server answers at http://127.0.0.1:{port}" in missing.stderr
    assert "import_model.py serve" in missing.stderr
    assert elapsed < 20


def test_compare_bad_arguments_exit_3(checkpoint_factory, tmp_path):
    model = checkpoint_factory("llama")
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    result = run_script("compare_layers", str(model), "--port", "1", "--prompts-file", str(empty))
    assert result.returncode == 3 and "holds no prompts" in result.stderr
    result = run_script("compare_layers", str(model))
    assert result.returncode == 3 and "--port" in result.stderr


def test_read_prompts_battery_and_file(tmp_path):
    assert compare_layers.read_prompts(None, None) == list(compare_layers.COHERENCE_BATTERY)
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n# comment\n\n  second  \n")
    assert compare_layers.read_prompts(["cli"], str(path)) == ["cli", "first prompt", "second"]


def test_parse_completion_aligns_positions_and_checks_echo():
    prompt = [5, 6, 7]
    response = {"choices": [{
        "prompt_token_ids": prompt, "token_ids": [8, 9],
        "logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0, -4.0],
                     "top_logprobs": [None, {"a": -1.0}, {"b": -2.0}, {"c": -3.0}, {"d": -4.0}]},
    }]}
    scores = compare_layers.parse_completion(response, prompt)
    assert scores.generated_ids == [8, 9]
    assert scores.logprobs == [-1.0, -2.0, -3.0, -4.0]
    assert scores.top == [{"a": -1.0}, {"b": -2.0}, {"c": -3.0}, {"d": -4.0}]
    with pytest.raises(ScriptError, match="different prompt token ids"):
        compare_layers.parse_completion(response, [1, 2, 3])
    short = {"choices": [{"prompt_token_ids": prompt, "token_ids": [8],
                          "logprobs": {"token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}]}}]}
    with pytest.raises(ScriptError, match="--enable-echo"):
        compare_layers.parse_completion(short, prompt)


def test_check_answer_rejects_foreign_ids_and_texts():
    index = {"a": [0], "b": [1], "\ufffd": [2, 3]}
    good = compare_layers.MaxScores([0, 1], [1], [-1.0, -2.0], [{"a": -1.0, "\ufffd": -3.0}, {"b": -2.0}])
    compare_layers.check_answer(good, index, 4, "HINT")
    beyond = compare_layers.MaxScores([0, 1], [7], [-1.0, -2.0], [{"a": -1.0}, {"b": -2.0}])
    with pytest.raises(ScriptError, match=r"token ids \[7\] beyond the HF vocab size 4.*HINT"):
        compare_layers.check_answer(beyond, index, 4, "HINT")
    foreign = compare_layers.MaxScores([0, 1], [1], [-1.0, -2.0], [{"zz": -1.0}, {"b": -2.0}])
    with pytest.raises(ScriptError, match="another tokenizer"):
        compare_layers.check_answer(foreign, index, 4, "HINT")


def test_run_compare_rejects_bad_options_before_contacting_a_server():
    with pytest.raises(ScriptError, match="--top-k must be between 1 and 7"):
        compare_layers.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], top_k=8)
    with pytest.raises(ScriptError, match="--max-new-tokens must be 1 or more"):
        compare_layers.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], max_new_tokens=0)
    with pytest.raises(ScriptError, match="no tolerance defined"):
        compare_layers.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], dtype="int8")


def test_sigterm_while_waiting_stops_the_server_group(tmp_path):
    """Killing a waiting `serve` CLI with SIGTERM leaves no `max serve` processes behind."""
    import os
    import signal

    pid_file = tmp_path / "fake_max.pid"
    fake_max = tmp_path / "fake_max"
    # A stand-in for `max serve` that never answers and has a child of its own.
    fake_max.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {pid_file}\n"
        "sleep 120 &\n"
        "sleep 120\n"
    )
    fake_max.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir()
    driver = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cli_support, serve_port\n"
        "serve_port.max_executable = lambda: sys.argv[2]\n"
        "sys.exit(cli_support.standalone(vars(serve_port), argv=[sys.argv[3], '--timeout', '100']))\n"
    )
    env = dict(os.environ, IMPORT_MODEL_SERVER_DIR=str(tmp_path / "records"))
    process = subprocess.Popen(
        [sys.executable, "-c", driver, str(SCRIPTS_DIR), str(fake_max), str(model)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "the fake max serve never started"
    group = int(pid_file.read_text())
    assert serve_port._group_alive(group)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 15
    while serve_port._group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not serve_port._group_alive(group)
