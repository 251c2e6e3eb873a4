"""Tests of serve_port and compare_layers that need no compiled MAX graph."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import port_compare
import openai_server
import max_server
import serve_port
from cli_support import ScriptError
from conftest import SCRIPTS_DIR, run_script


TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def make_port(parent: Path, slug: str = "tiny_port", body: str = "ARCHITECTURES = []\n") -> Path:
    folder = parent / slug
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(body)
    return folder


# --- port dir and command line ---------------------------------------------------------


def test_port_dir_trailing_slash_is_stripped_and_slug_is_folder_name(tmp_path):
    folder = make_port(tmp_path)
    normalized = max_server.normalize_port_dir(str(folder) + "/")
    assert normalized.path == folder.resolve()
    assert normalized.slug == "tiny_port"
    assert not str(normalized.path).endswith("/")


def test_parent_folder_is_refused_with_a_suggestion(tmp_path):
    folder = make_port(tmp_path)
    with pytest.raises(ScriptError, match=r"no __init__\.py defining ARCHITECTURES; did you mean .*tiny_port"):
        max_server.normalize_port_dir(tmp_path)
    assert folder.is_dir()


def test_port_without_architectures_and_missing_folder_are_refused(tmp_path):
    make_port(tmp_path, "empty_port", body="X = 1\n")
    with pytest.raises(ScriptError, match="ARCHITECTURES"):
        max_server.normalize_port_dir(tmp_path / "empty_port")
    with pytest.raises(ScriptError, match="is not a folder"):
        max_server.normalize_port_dir(tmp_path / "nope")


def test_slug_shadowed_by_an_installed_module_is_refused(tmp_path):
    folder = make_port(tmp_path, "json")
    with pytest.raises(ScriptError, match=r"'json' is already importable .*rename the folder"):
        max_server.normalize_port_dir(folder)


def test_serve_command_is_built_in_one_place_with_echo_and_slug(tmp_path):
    folder = make_port(tmp_path)
    command = max_server.build_serve_command("/m/model", port=8123, port_dir=str(folder) + "/")
    assert command[1] == "serve"
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--model-path"] == "/m/model"
    assert flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert flags["--devices"] == "cpu" and flags["--quantization-encoding"] == "float32"
    assert "--enable-echo" in command
    assert "--no-enable-prefix-caching" in command  # a re-compare of a long prompt needs every echoed logprob
    index = command.index("--custom-architectures")
    assert command[index + 1] == str(folder.resolve())
    assert command[command.index("--served-model-name") + 1] == "tiny_port"
    native = max_server.build_serve_command("/m/model", port=8123, devices="gpu", encoding="bfloat16")
    assert "--custom-architectures" not in native and "--served-model-name" not in native
    assert native[native.index("--devices") + 1] == "gpu"
    assert native[native.index("--quantization-encoding") + 1] == "bfloat16"


def test_free_port_is_bindable():
    port = max_server.free_port()
    assert 0 < port < 65536
    assert not max_server.port_in_use(port)


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
    found, lines = max_server.classify_failure(LOG_HEAD + "Traceback (most recent call last):\n"
                                               '  File "x.py", line 1, in <module>\n' + tail)
    assert found == cause
    assert lines and lines[-1] == tail.strip().splitlines()[-1]
    assert not any(line.lstrip().startswith("File ") for line in lines)


def test_phase_is_read_from_the_log():
    assert max_server.current_phase("") == "starting"
    assert max_server.current_phase(LOG_HEAD) == "starting model worker"
    assert max_server.current_phase(LOG_HEAD + "INFO: Building, compiling, and initializing model...\n") == \
        "compiling graph"


def test_serve_failure_message_is_one_line_with_cause_and_log(tmp_path):
    error = max_server.ServeFailure("shape-mismatch", max_server.cause_hint("shape-mismatch"),
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
    assert max_server._group_alive(process.pid)
    assert max_server.stop_process_group(process.pid, process) is True
    assert not max_server._group_alive(process.pid)
    assert max_server.stop_process_group(process.pid, process) is False


def test_stop_without_records_is_a_no_op(tmp_path):
    result = run_script("serve_port", "--stop", "--all", "--json", env={"IMPORT_MODEL_SERVER_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.json() == {"stopped": [], "stale": [], "not_stopped": []}
    result = run_script("serve_port", "--stop", "--port", "8123", env={"IMPORT_MODEL_SERVER_DIR": str(tmp_path)})
    assert result.returncode == 0 and "no recorded server to stop on port 8123" in result.stdout


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
    assert openai_server.check_server(models_only_server, "served_slug", "hint").served_name == "served_slug"
    assert openai_server.check_server(models_only_server, None, "hint").served_name == "served_slug"
    with pytest.raises(ScriptError, match=r"serves \['served_slug'\], not 'other'.*restart it with: HINT"):
        openai_server.check_server(models_only_server, "other", "HINT")


def test_compare_wrong_name_and_no_server_fail_fast(models_only_server, checkpoint_factory):
    model = checkpoint_factory("llama")
    started = time.monotonic()
    wrong = run_script("compare_layers", str(model), "--base-url", models_only_server, "--slug", "other", "--json")
    port = max_server.free_port()
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
    assert port_compare.read_prompts(None, None) == list(port_compare.COHERENCE_BATTERY)
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n# comment\n\n  second  \n")
    assert port_compare.read_prompts(["cli"], str(path)) == ["cli", "first prompt", "second"]


def test_parse_completion_aligns_positions_and_checks_echo():
    prompt = [5, 6, 7]
    response = {"choices": [{
        "prompt_token_ids": prompt, "token_ids": [8, 9],
        "logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0, -4.0],
                     "top_logprobs": [None, {"a": -1.0}, {"b": -2.0}, {"c": -3.0}, {"d": -4.0}]},
    }]}
    scores = openai_server.parse_completion(response, prompt)
    assert scores.generated_ids == [8, 9]
    assert scores.logprobs == [-1.0, -2.0, -3.0, -4.0]
    assert scores.top == [{"a": -1.0}, {"b": -2.0}, {"c": -3.0}, {"d": -4.0}]
    with pytest.raises(ScriptError, match="different prompt token ids"):
        openai_server.parse_completion(response, [1, 2, 3])
    short = {"choices": [{"prompt_token_ids": prompt, "token_ids": [8],
                          "logprobs": {"token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}]}}]}
    with pytest.raises(ScriptError, match="--enable-echo"):
        openai_server.parse_completion(short, prompt)


def test_check_answer_rejects_foreign_ids_and_texts():
    index = {"a": [0], "b": [1], "\ufffd": [2, 3]}
    good = openai_server.MaxScores([0, 1], [1], [-1.0, -2.0], [{"a": -1.0, "\ufffd": -3.0}, {"b": -2.0}])
    port_compare.check_answer(good, index, 4, "HINT")
    beyond = openai_server.MaxScores([0, 1], [7], [-1.0, -2.0], [{"a": -1.0}, {"b": -2.0}])
    with pytest.raises(ScriptError, match=r"token ids \[7\] beyond the HF vocab size 4.*HINT"):
        port_compare.check_answer(beyond, index, 4, "HINT")
    foreign = openai_server.MaxScores([0, 1], [1], [-1.0, -2.0], [{"zz": -1.0}, {"b": -2.0}])
    with pytest.raises(ScriptError, match="another tokenizer"):
        port_compare.check_answer(foreign, index, 4, "HINT")


def test_run_compare_rejects_bad_options_before_contacting_a_server():
    with pytest.raises(ScriptError, match="--top-k must be between 1 and 7"):
        port_compare.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], top_k=8)
    with pytest.raises(ScriptError, match="--max-new-tokens must be 1 or more"):
        port_compare.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], max_new_tokens=0)
    with pytest.raises(ScriptError, match="no tolerance defined"):
        port_compare.run_compare("m", "http://127.0.0.1:1", "x", ["a b"], dtype="int8")


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
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    driver = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cli_support, max_server, serve_port\n"
        "max_server.max_executable = lambda: sys.argv[2]\n"
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
    assert max_server._group_alive(group)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 15
    while max_server._group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not max_server._group_alive(group)


# --- a shared machine: ports, ownership and records, against a stand-in `max` -----------------
#
# These run scripts/serve_port.py for real with IMPORT_MODEL_MAX pointing at tests/fake_max.py
# (no MAX compile), on 127.0.0.1 ports the OS chose free. Every wait is bounded.

from fake_max import fake_max_command  # noqa: E402

# The race: the loser's "compile" is longer, so the winner binds first; both start within
# this margin of each other even on a loaded machine.
RACE_WINNER_COMPILE = 5.0
RACE_LOSER_COMPILE = 8.0
# A stand-in that failed to bind stays alive this long, as MAX does while it tears down; without
# the ownership check, serve would take the other server's answer for its own in this window.
LINGER_SECONDS = 5.0
# Long enough for the test to bind the port while the stand-in "compiles".
FOREIGN_COMPILE = 10.0
QUICK_COMPILE = 0.3
# Upper bound for one serve run (python start, checks, fake compile, readiness polls).
SERVE_RUN_LIMIT = 60.0
STARTED_LIMIT = 30.0


def _models_handler(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_Models):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class FakeServe:
    """serve_port.py runs against the stand-in `max`, and cleanup of every group they started."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text(json.dumps(TINY_CONFIG))
        self.records = root / "records"
        self.pids = root / "pids"
        self.pids.mkdir()
        self.env = {"IMPORT_MODEL_MAX": str(fake_max_command(root)), "IMPORT_MODEL_SERVER_DIR": str(self.records),
                    "FAKE_MAX_PID_DIR": str(self.pids), "HF_HUB_OFFLINE": "1"}
        self.processes: list[subprocess.Popen] = []

    def start(self, *args: str, compile_seconds: float = QUICK_COMPILE, linger: float = 0.0,
              body: str | None = None, fail_line: str | None = None) -> subprocess.Popen:
        import os

        env = dict(os.environ, **self.env, FAKE_MAX_COMPILE_SECONDS=str(compile_seconds),
                   FAKE_MAX_LINGER_SECONDS=str(linger))
        if body is not None:
            env["FAKE_MAX_MODELS_BODY"] = body
        if fail_line is not None:
            env["FAKE_MAX_FAIL_LINE"] = fail_line
        log = self.root / f"serve-{len(self.processes)}.log"  # not a temp file in /tmp per run
        process = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / "serve_port.py"), str(self.model), "--json",
                                    "--log-file", str(log), *args],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process.started_at = time.monotonic()
        self.processes.append(process)
        return process

    def finish(self, process: subprocess.Popen, limit: float = SERVE_RUN_LIMIT) -> subprocess.CompletedProcess:
        stdout, stderr = process.communicate(timeout=limit)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        done.seconds = time.monotonic() - process.started_at
        return done

    def started(self, port: int) -> list[int]:
        """Process groups of the stand-ins started for ``port``."""
        return sorted(int(p.read_text()) for p in self.pids.glob(f"{port}-*.started"))

    def wait_started(self, port: int, count: int) -> list[int]:
        deadline = time.monotonic() + STARTED_LIMIT
        while len(self.started(port)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        groups = self.started(port)
        assert len(groups) >= count, f"only {len(groups)} stand-in max serve started for port {port}"
        return groups

    def record_names(self) -> set[str]:
        return {p.name for p in self.records.glob("*.json")} if self.records.is_dir() else set()

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        for path in self.pids.glob("*.started"):
            group = int(path.read_text())
            if max_server._group_alive(group):
                max_server.stop_process_group(group)


@pytest.fixture
def fake(tmp_path):
    helper = FakeServe(tmp_path)
    try:
        yield helper
    finally:
        helper.cleanup()


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_two_serves_racing_for_one_port_exactly_one_wins(fake):
    port = max_server.free_port()
    first = fake.start("--port", str(port), compile_seconds=RACE_WINNER_COMPILE, linger=LINGER_SECONDS)
    second = fake.start("--port", str(port), compile_seconds=RACE_LOSER_COMPILE, linger=LINGER_SECONDS)
    groups = fake.wait_started(port, 2)  # both passed the free-port check: this is the race after it
    results = [fake.finish(first), fake.finish(second)]
    assert sorted(r.returncode for r in results) == [0, 3], [(r.returncode, r.stderr) for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    line = _one_error_line(loser.stderr)
    assert f"port {port}" in line and ("port-taken" in line or "port-in-use" in line), line
    assert "serve: ready" not in loser.stderr
    assert json.loads(loser.stdout)["exit_code"] == 3
    record = json.loads(winner.stdout)
    assert record["pid"] in groups and record["port"] == port
    assert fake.record_names() == {f"{port}-{record['pid']}.json"}
    stop = run_script("serve_port", "--stop", "--port", str(port), "--json", env=fake.env)
    assert stop.returncode == 0, stop.stderr
    assert stop.json()["stopped"] == [{"port": port, "pid": record["pid"], "was_running": True}]
    assert not any(max_server._group_alive(group) for group in groups)
    assert fake.record_names() == set()


@pytest.mark.parametrize("holder", ["http-server", "bound-socket"])
def test_a_busy_port_is_refused_before_max_serve_starts(fake, holder):
    import os
    import socket

    if holder == "http-server":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _models_handler(str(fake.model)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port, close = server.server_address[1], lambda: (server.shutdown(), server.server_close())
    else:  # bound but not listening: nothing answers, yet max serve could not bind it
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port, close = sock.getsockname()[1], sock.close
    try:
        result = fake.finish(fake.start("--port", str(port)))
    finally:
        close()
    assert result.returncode == 3, result.stderr
    line = _one_error_line(result.stderr)
    assert f"port {port} is already in use" in line
    if holder == "http-server":
        assert f"pid {os.getpid()}" in line  # the holder is named
    assert "serve: ready" not in result.stderr
    assert fake.started(port) == [] and fake.record_names() == set()


def test_a_foreign_server_binding_during_the_compile_is_never_taken_for_ours(fake):
    import os

    port = max_server.free_port()
    process = fake.start("--port", str(port), compile_seconds=FOREIGN_COMPILE, linger=LINGER_SECONDS)
    [group] = fake.wait_started(port, 1)
    # Same served name as ours: only the socket's owner tells them apart.
    server = ThreadingHTTPServer(("127.0.0.1", port), _models_handler(str(fake.model)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = fake.finish(process)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 3, result.stderr
    line = _one_error_line(result.stderr)
    assert "port-taken" in line and f"pid {os.getpid()}" in line and f"port {port}" in line, line
    assert "serve: ready" not in result.stderr
    assert result.seconds < FOREIGN_COMPILE, "refused only after the compile; should be at the next poll"
    assert not max_server._group_alive(group)
    assert fake.record_names() == set()


def test_max_dying_with_address_in_use_is_classified(fake):
    import socket

    port = max_server.free_port()
    process = fake.start("--port", str(port), compile_seconds=3.0)
    [group] = fake.wait_started(port, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # not listening, so only MAX's own bind notices
        result = fake.finish(process)
    assert result.returncode == 3
    line = _one_error_line(result.stderr)
    assert "port-in-use" in line and "address already in use" in line, line
    assert not max_server._group_alive(group)


def test_stop_stops_exactly_its_own_server_and_leaves_another_running(fake):
    first, second = fake.start(), fake.start()
    results = [fake.finish(first), fake.finish(second)]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    mine, other = (json.loads(r.stdout) for r in results)
    for record in (mine, other):
        assert record["pgid"] == record["pid"] and isinstance(record["start_time"], int)
        assert max_server._group_alive(record["pid"])
    assert fake.record_names() == {f"{r['port']}-{r['pid']}.json" for r in (mine, other)}
    stop = run_script("serve_port", "--stop", "--port", str(mine["port"]), "--json", env=fake.env)
    assert stop.returncode == 0, stop.stderr
    assert stop.json() == {"stopped": [{"port": mine["port"], "pid": mine["pid"], "was_running": True}],
                           "stale": [], "not_stopped": []}
    assert not max_server._group_alive(mine["pid"])
    assert max_server._group_alive(other["pid"])
    assert fake.record_names() == {f"{other['port']}-{other['pid']}.json"}
    assert max_server.probe_models(other["base_url"]).names == [str(fake.model)]
    text = run_script("serve_port", "--stop", "--port", str(other["port"]), env=fake.env)
    assert text.returncode == 0 and f"port {other['port']} (pid {other['pid']}): stopped" in text.stdout
    assert not max_server._group_alive(other["pid"])


def _write_record(folder: Path, name: str, port: int, pid: int, start_time: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"format": 2, "port": port, "pid": pid, "pgid": pid, "start_time": start_time,
                                "base_url": f"http://127.0.0.1:{port}", "served_name": "x"}))
    return path


def test_a_record_whose_process_is_gone_is_reported_stale_and_removed(tmp_path):
    env = {"IMPORT_MODEL_SERVER_DIR": str(tmp_path)}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = _write_record(tmp_path, "8101.json", 8101, gone.pid, 12345)
    kept = _write_record(tmp_path, f"8109-{gone.pid}.json", 8109, gone.pid, 12345)  # another port: untouched
    result = run_script("serve_port", "--stop", "--port", "8101", env=env)
    assert result.returncode == 0, result.stderr
    assert f"port 8101 (pid {gone.pid}): stale record (process {gone.pid} is gone); removed {stale}" in result.stdout
    assert not stale.exists() and kept.exists()


def test_a_recycled_pid_is_reported_stale_and_never_signalled(tmp_path):
    env = {"IMPORT_MODEL_SERVER_DIR": str(tmp_path)}
    # A live process whose pid a record names, but started at another time (a recycled pid).
    # Its command line looks like `max serve`, which the old cmdline guard accepted.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "max", "serve"],
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while max_server.process_identity(bystander.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        identity = max_server.process_identity(bystander.pid)
        recycled = _write_record(tmp_path, "8102.json", 8102, bystander.pid, identity.start_time + 1)
        result = run_script("serve_port", "--stop", "--port", "8102", "--json", env=env)
        assert bystander.poll() is None, "--stop killed a process it did not start"
        assert result.returncode == 0, result.stderr
        document = result.json()
        assert document["stopped"] == [] and [s["pid"] for s in document["stale"]] == [bystander.pid]
        assert "now belongs to another process" in document["stale"][0]["reason"]
        assert not recycled.exists()
    finally:
        bystander.kill()
        bystander.wait(timeout=30)


@pytest.mark.parametrize("body, said", [
    ('[{"id": "x"}]', "a JSON array"),
    ("<html><body>not MAX</body></html>", "an HTML page"),
    ("plain words", "text that is not JSON"),
    ('{"data": "x"}', "an object without a data list"),
    ('{"data": [{"id": "other"}]}', "lists ['other']"),
])
def test_a_bad_models_answer_from_our_own_child_is_a_timeout_not_ready(fake, body, said):
    result = fake.finish(fake.start("--timeout", "2", body=body))
    assert result.returncode == 3, result.stderr
    line = _one_error_line(result.stderr)
    assert "timeout" in line and said in line, line
    assert "serve: ready" not in result.stderr
    assert fake.record_names() == set()


# --- the pieces, without processes ----------------------------------------------------------------

TCP_TABLE = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
    "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1\n"
    "   2: 0200007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1\n"
    "   3: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 444 1\n"
    "   4: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1\n"
    "   5: garbage\n"
)


def test_listen_table_keeps_listeners_that_reach_loopback_on_the_port():
    import socket
    import struct

    if struct.pack("=I", 1) != b"\x01\x00\x00\x00":
        pytest.skip("the sample table is written for a little-endian machine")
    assert max_server.parse_listen_table(TCP_TABLE, 0x1F90) == {111, 222}
    assert socket.inet_ntoa(max_server._decode_address("0100007F").packed) == "127.0.0.1"
    v6_any = "00000000000000000000000000000000"
    v6_mapped = "0000000000000000FFFF00000100007F"
    table6 = TCP_TABLE.splitlines()[0] + "\n" + "\n".join(
        f"   {i}: {addr}:1F90 {'0' * 32}:0000 0A 00000000:00000000 00:00000000 00000000 0 0 {inode} 1"
        for i, (addr, inode) in enumerate([(v6_any, 7), (v6_mapped, 8), ("0" * 31 + "1", 9)]))
    assert max_server.parse_listen_table(table6, 0x1F90) == {7, 8}


def test_listen_check_names_the_holder_and_its_group():
    import os

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    port = server.server_address[1]
    try:
        assert max_server.listen_check(port, os.getpgrp()).state == "ours"
        foreign = max_server.listen_check(port, os.getpgrp() + 100000)
        assert foreign.state == "foreign" and f"pid {os.getpid()}" in foreign.detail
        assert "already in use" in max_server.port_problem(port)
    finally:
        server.server_close()
    assert max_server.listen_check(port, os.getpgrp()).state == "none"
    assert max_server.port_problem(port) is None


def test_process_identity_reads_group_and_start_time():
    import os

    me = max_server.process_identity(os.getpid())
    assert me.pgid == os.getpgrp() and me.start_time > 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert max_server.process_identity(gone.pid) is None


def test_probe_models_reads_names_and_tells_nothing_answered(models_only_server):
    assert max_server.probe_models(models_only_server).names == ["served_slug"]
    port = max_server.free_port()
    assert max_server.probe_models(f"http://127.0.0.1:{port}").answered is False


def test_address_in_use_is_classified_as_port_in_use():
    log = LOG_HEAD + ("ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): "
                      "address already in use\n")
    cause, lines = max_server.classify_failure(log)
    assert cause == "port-in-use" and "address already in use" in lines[-1]


def test_write_record_never_replaces_a_live_record_but_replaces_a_stale_one(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("IMPORT_MODEL_SERVER_DIR", str(tmp_path))
    me = max_server.process_identity(os.getpid())
    server = max_server.RunningServer("http://127.0.0.1:8111", "x", 8111, os.getpid(), tmp_path / "l.log", [], "m",
                                      pgid=me.pgid, start_time=me.start_time)
    path = max_server.write_record(server)
    assert path.name == f"8111-{os.getpid()}.json" and json.loads(path.read_text())["start_time"] == me.start_time
    with pytest.raises(ScriptError, match="already exists for a live process"):
        max_server.write_record(server)
    _write_record(tmp_path, path.name, 8111, os.getpid(), me.start_time + 1)  # same pid, another process: stale
    assert max_server.write_record(server) == path
    assert json.loads(path.read_text())["start_time"] == me.start_time
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- serve --detach and serve --wait, against the stand-in `max` --------------------------------

# Long enough that a short --wait ends while the stand-in still "compiles", even on a loaded machine.
SLOW_COMPILE = 20.0
SHORT_WAIT = 2
# A --wait that must see the server ready (or failed) within it.
LONG_WAIT = 60


def _detach(fake: FakeServe, **kwargs) -> dict:
    done = fake.finish(fake.start("--detach", **kwargs))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "starting" and max_server._group_alive(record["pid"])
    assert record["wait_command"] == serve_port.wait_command(record["port"])
    assert record["wait_command"].startswith(shlex.quote(sys.executable) + " ")
    assert fake.record_names() == {f"{record['port']}-{record['pid']}.json"}
    return record


def _wait(fake: FakeServe, port: int, timeout: float, *extra: str):
    return run_script("serve_port", "--wait", "--port", str(port), "--timeout", str(timeout), *extra,
                      env=fake.env, timeout=SERVE_RUN_LIMIT + timeout)


def test_detach_returns_while_loading_and_wait_sees_it_ready(fake):
    record = _detach(fake, compile_seconds=3.0)
    done = _wait(fake, record["port"], LONG_WAIT, "--json")
    assert done.returncode == 0, done.stderr
    ready = done.json()
    assert ready["state"] == "ready" and ready["pid"] == record["pid"] and ready["base_url"] == record["base_url"]
    assert "serve: ready" in done.stderr
    assert max_server.probe_models(record["base_url"]).names == [str(fake.model)]
    text = _wait(fake, record["port"], SHORT_WAIT)  # already ready: answers at once, in text
    assert text.returncode == 0 and f"base_url: {record['base_url']}" in text.stdout
    stop = run_script("serve_port", "--stop", "--port", str(record["port"]), env=fake.env)
    assert stop.returncode == 0 and not max_server._group_alive(record["pid"])
    assert fake.record_names() == set()


def test_a_short_wait_during_the_compile_says_still_starting_and_leaves_it_running(fake):
    record = _detach(fake, compile_seconds=SLOW_COMPILE)
    done = _wait(fake, record["port"], SHORT_WAIT)
    assert done.returncode == 3
    line = _one_error_line(done.stderr)
    assert "still starting" in line and "not failed" in line and "compiling graph" in line, line
    assert f"wait again with: {serve_port.wait_command(record['port'], SHORT_WAIT)}" in line
    assert max_server._group_alive(record["pid"])
    assert fake.record_names() == {f"{record['port']}-{record['pid']}.json"}
    as_json = _wait(fake, record["port"], SHORT_WAIT, "--json")
    assert as_json.returncode == 3 and as_json.json()["state"] == "starting"
    assert _wait(fake, record["port"], LONG_WAIT).returncode == 0
    run_script("serve_port", "--stop", "--port", str(record["port"]), env=fake.env)


@pytest.mark.parametrize("when", ["while-waiting", "before-the-wait"])
def test_wait_reports_why_a_detached_server_died(fake, when):
    record = _detach(fake, compile_seconds=3.0,
                     fail_line="ValueError: Missing required weights: layers.0.mlp.gate_proj.weight")
    if when == "before-the-wait":
        deadline = time.monotonic() + SERVE_RUN_LIMIT
        while max_server._group_alive(record["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    done = _wait(fake, record["port"], LONG_WAIT)
    assert done.returncode == 3
    line = _one_error_line(done.stderr)
    assert "weight-name-mismatch" in line and "Missing required weights" in line, line
    assert "still starting" not in line
    assert not max_server._group_alive(record["pid"]) and fake.record_names() == set()


def test_wait_on_a_port_with_no_record_is_one_line_exit_3(fake):
    port = max_server.free_port()
    done = _wait(fake, port, SHORT_WAIT)
    assert done.returncode == 3
    assert f"no server is recorded on port {port}" in _one_error_line(done.stderr)
    assert _wait(fake, port, SHORT_WAIT, "--json").json()["exit_code"] == 3
    bad = run_script("serve_port", "--wait", env=fake.env)
    assert bad.returncode == 3 and "--wait needs --port" in bad.stderr
    both = run_script("serve_port", str(fake.model), "--detach", "--foreground", env=fake.env)
    assert both.returncode == 3 and "contradict" in both.stderr
