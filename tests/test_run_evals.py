"""eval (scripts/run_evals.py) without MAX: the exit rules, the table, and the inputs it refuses.

The refusals run the script as a subprocess; the no-echo refusal talks to a small
completions stand-in on 127.0.0.1 (an OS-chosen free port) that answers like a
server started without --enable-echo.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import run_evals
import tolerances
from conftest import run_script

ATOL = tolerances.logprob_atol("float32")
REFUSAL_SECONDS = 120  # a refusal comes before any model loads; this bounds a hung stand-in, not the check


def ll_sample(doc_id: int, values: list[float], acc: float = 0.0) -> dict:
    return {"doc_id": doc_id, "resps": [[(v, False)] for v in values], "metrics": ["acc"], "acc": acc}


def gen_sample(doc_id: int, context: str, text: str, match: float = 0.0) -> dict:
    return {"doc_id": doc_id, "arguments": [(context, {"until": ["\n"]})], "filtered_resps": [text],
            "metrics": ["exact_match"], "exact_match": match}


def results(task: str, samples: list[dict], metric: str, value: float, stderr: float) -> dict:
    return {"samples": {task: samples}, "results": {task: {f"{metric},none": value, f"{metric}_stderr,none": stderr}}}


# --- the replica rule (per sample) ---------------------------------------------------------------


def replica_result(served_values, reference_values, served_ids=None, reference_ids=None):
    served = results("mc", [ll_sample(i, v) for i, v in enumerate(served_values)], "acc", 0.5, 0.1)
    reference = results("mc", [ll_sample(i, v) for i, v in enumerate(reference_values)], "acc", 0.5, 0.1)
    return run_evals.side_by_side({"mc": "multiple_choice"}, served, reference, {}, {},
                                  run_evals.Rule.REPLICA_PER_SAMPLE, ATOL, run_evals.DEFAULT_K)


def test_replica_rule_passes_within_the_tolerance():
    result = replica_result([[-1.0, -2.0], [-3.0, -0.5]], [[-1.0 + ATOL / 2, -2.0], [-3.0, -0.5 - ATOL / 3]])
    assert result.verdict is run_evals.Verdict.MATCH
    assert result.max_abs_diff == pytest.approx(ATOL / 2)


def test_replica_rule_fails_on_one_loglikelihood_beyond_the_tolerance():
    result = replica_result([[-1.0, -2.0], [-3.0, -0.5]], [[-1.0, -2.0], [-3.0, -0.5 - 2 * ATOL]])
    assert result.verdict is run_evals.Verdict.MISMATCH
    bad = [s for s in result.samples if not s.ok]
    assert [(s.doc_id, s.changed_choice) for s in bad] == [(1, False)]
    assert bad[0].abs_diff == pytest.approx(2 * ATOL)


def test_replica_rule_fails_on_a_changed_choice_even_within_the_tolerance():
    result = replica_result([[-1.0, -1.0 - ATOL / 4]], [[-1.0 - ATOL / 4, -1.0]])
    assert result.max_abs_diff <= ATOL
    assert result.verdict is run_evals.Verdict.MISMATCH
    assert result.samples[0].changed_choice


def test_replica_rule_compares_generated_token_ids():
    served = results("gen", [gen_sample(0, "One two", " three"), gen_sample(1, "Hello", " world")], "exact_match",
                     0.0, 0.0)
    reference = results("gen", [gen_sample(0, "One two", " three"), gen_sample(1, "Hello", " world")],
                        "exact_match", 0.0, 0.0)
    ids = {"One two": [5, 6, 7], "Hello": [8, 9]}
    same = run_evals.side_by_side({"gen": "generate_until"}, served, reference, ids, dict(ids),
                                  run_evals.Rule.REPLICA_PER_SAMPLE, ATOL, 2.0)
    assert same.verdict is run_evals.Verdict.MATCH
    changed = run_evals.side_by_side({"gen": "generate_until"}, served, reference, ids,
                                     {"One two": [5, 6, 7], "Hello": [8, 10]},
                                     run_evals.Rule.REPLICA_PER_SAMPLE, ATOL, 2.0)
    assert changed.verdict is run_evals.Verdict.MISMATCH
    assert [(s.doc_id, s.first_changed_token) for s in changed.samples if not s.ok] == [(1, 1)]
    missing = run_evals.side_by_side({"gen": "generate_until"}, served, reference, {}, ids,
                                     run_evals.Rule.REPLICA_PER_SAMPLE, ATOL, 2.0)
    assert missing.verdict is run_evals.Verdict.MISMATCH  # MAX returned no ids: nothing proves they agree


# --- the real-checkpoint rule (k paired standard errors) ---------------------------------------------


def checkpoint_rows(served_acc: list[float], reference_acc: list[float], k: float) -> run_evals.SideBySide:
    served = results("mc", [ll_sample(i, [-1.0, -2.0], a) for i, a in enumerate(served_acc)], "acc",
                     sum(served_acc) / len(served_acc), 0.05)
    reference = results("mc", [ll_sample(i, [-1.0, -2.0], a) for i, a in enumerate(reference_acc)], "acc",
                        sum(reference_acc) / len(reference_acc), 0.05)
    return run_evals.side_by_side({"mc": "multiple_choice"}, served, reference, {}, {},
                                  run_evals.Rule.PAIRED_STDERR, ATOL, k)


def test_paired_stderr_is_the_standard_error_of_the_per_sample_differences():
    assert run_evals.paired_stderr([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(
        math.sqrt(((0 - 0) ** 2 + (-1) ** 2 + 0 ** 2 + 1 ** 2) / 3) / 2)
    assert run_evals.paired_stderr([1], [0]) is None


def test_checkpoint_rule_allows_differences_within_k_paired_stderr():
    served = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]  # two flips in opposite directions: diff 0
    reference = [1, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    result = checkpoint_rows(served, reference, 2.0)
    assert result.verdict is run_evals.Verdict.MATCH
    row = result.metrics[0]
    assert (row.metric, row.n, row.diff) == ("acc", 10, 0.0)
    one_flip = checkpoint_rows([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1, 1, 0, 1, 1], 2.0).metrics[0]
    assert abs(one_flip.diff) == pytest.approx(0.1)
    assert abs(one_flip.diff) <= 2 * one_flip.paired_stderr  # one flip in ten is within two paired stderrs
    assert one_flip.verdict is run_evals.Verdict.MATCH


def test_metric_rows_on_a_replica_need_identical_values_not_k_stderr():
    row = run_evals.MetricRow("t", "acc", 0.9, 0.1, 1.0, 0.0, 10, 0.1, 2.0, run_evals.Rule.REPLICA_PER_SAMPLE)
    assert row.verdict is run_evals.Verdict.MISMATCH  # within 2 paired SE, but a replica must agree exactly
    assert row.to_dict()["verdict"] == "MISMATCH"
    row.rule = run_evals.Rule.PAIRED_STDERR
    assert row.verdict is run_evals.Verdict.MATCH


def test_checkpoint_rule_fails_beyond_k_paired_stderr():
    served = [0] * 6 + [1] * 4
    reference = [1] * 10  # six systematic losses: diff -0.6, paired se 0.163
    assert checkpoint_rows(served, reference, 2.0).verdict is run_evals.Verdict.MISMATCH
    assert checkpoint_rows(served, reference, 4.0).verdict is run_evals.Verdict.MATCH
    assert not run_evals.within_k_stderr(0.1, 0.0, 2.0)  # every sample moved the same way
    assert not run_evals.within_k_stderr(0.1, None, 2.0)
    assert run_evals.within_k_stderr(0.0, None, 2.0)


def test_table_shows_both_sides_the_difference_and_the_stderrs():
    result = checkpoint_rows([1, 0, 1, 1], [1, 1, 1, 0], 2.0)
    rows = [row.to_dict() for row in result.metrics]
    lines = run_evals.format_table(rows, with_control=False)
    assert lines[0].split()[:4] == ["task", "metric", "MAX", "±stderr"]
    assert "paired se" in lines[0] and "verdict" in lines[0]
    assert lines[1].split() == ["mc", "acc", "0.7500", "0.0500", "0.7500", "0.0500", "+0.0000",
                                f"{rows[0]['paired_stderr']:.4f}", "MATCH"]
    rows[0]["control"], rows[0]["control_reference"] = 0.5, 0.25
    with_control = run_evals.format_table(rows, with_control=True)
    assert with_control[0].split()[-3:] == ["control", "ctl", "HF"]
    assert with_control[1].split()[-2:] == ["0.5000", "0.2500"]


def test_isolation_reads_the_control():
    assert run_evals.isolation(run_evals.Verdict.MISMATCH, run_evals.Verdict.MISMATCH) is run_evals.Isolation.MAX_SIDE
    assert run_evals.isolation(run_evals.Verdict.MISMATCH, run_evals.Verdict.MATCH) is run_evals.Isolation.PORT_SIDE
    assert run_evals.isolation(run_evals.Verdict.MATCH, run_evals.Verdict.MISMATCH) is \
        run_evals.Isolation.PORT_MATCHES
    assert run_evals.isolation(run_evals.Verdict.MATCH, None) is run_evals.Isolation.NO_CONTROL


def test_replica_detection_reads_the_manifest(tmp_path):
    assert not run_evals.is_replica(str(tmp_path))
    (tmp_path / "tiny_replica.json").write_text("{}")
    assert run_evals.is_replica(str(tmp_path))


# --- refusals (one line, exit 3, valid --json) -------------------------------------------------------


def assert_refused(result, *fragments: str) -> dict:
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert document["exit_code"] == 3
    for fragment in fragments:
        assert fragment in document["error"], document["error"]
    return document


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("eval") / "llama", "llama")


@pytest.mark.parametrize("flags, fragment", [
    (["--limit", "0"], "--limit"),
    (["--k", "nan"], "--k"),
    (["--k", "-1"], "--k"),
    (["--tasks", ""], "empty task name"),
    (["--tasks", "missing_task.yaml"], "no such task YAML file"),
    (["--control-port", "8001"], "need --control MODEL"),
])
def test_bad_flags_are_one_line_exit_3(model_dir, flags, fragment):
    assert_refused(run_script("run_evals", str(model_dir), "--port", "9", *flags, "--json"), fragment)


def test_missing_model_is_one_line_exit_3(tmp_path):
    assert_refused(run_script("run_evals", str(tmp_path / "no_such_model"), "--port", "9", "--json"),
                   "no_such_model")


def test_unknown_task_is_one_line_exit_3(model_dir):
    # Not a shipped task: lm-eval's own task index is read to look it up (the slow part of this test).
    assert_refused(run_script("run_evals", str(model_dir), "--port", "9", "--tasks", "no_such_task_xyz", "--json",
                              timeout=600), "unknown task 'no_such_task_xyz'")


def test_task_data_not_available_offline_is_one_line_exit_3(model_dir, tmp_path):
    task = tmp_path / "hub_only.yaml"
    task.write_text("task: hub_only_task\ndataset_path: no-such-org/no-such-dataset\noutput_type: multiple_choice\n"
                    "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    assert_refused(run_script("run_evals", str(model_dir), "--port", "9", "--tasks", str(task), "--json", env=env),
                   "task", "not available offline")


class NoEchoHandler(BaseHTTPRequestHandler):
    """Answers like a MAX server started without --enable-echo: logprobs of the generated token only."""

    served_name = "model"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": self.served_name, "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"choices": [{"index": 0, "text": " x", "logprobs": {"token_logprobs": [-0.5],
                                                                         "top_logprobs": [{" x": -0.5}]}}]})


@pytest.fixture()
def no_echo_server(model_dir):
    NoEchoHandler.served_name = str(model_dir)
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoEchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_server_without_echo_is_refused_before_any_run(model_dir, no_echo_server):
    started = time.monotonic()
    result = run_script("run_evals", str(model_dir), "--base-url", no_echo_server, "--tasks", "import_model_mc",
                        "--json", timeout=REFUSAL_SECONDS)
    document = assert_refused(result, "does not echo prompt logprobs", "import_model.py serve")
    assert "generated token only" in document["error"]
    assert time.monotonic() - started < REFUSAL_SECONDS


def test_no_server_is_one_line_exit_3(model_dir):
    import max_server

    port = max_server.free_port()
    assert_refused(run_script("run_evals", str(model_dir), "--port", str(port), "--tasks", "import_model_gen",
                              "--json"), f"no MAX server answers at http://127.0.0.1:{port}")


# --- the echo layout ------------------------------------------------------------------------------------


class LayoutHandler(NoEchoHandler):
    """Echoes in the layout named by ``layout``: openai (T + 1, the first null), max (T, no null), none."""

    layout = "openai"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        count = len(body["prompt"])
        values = {"openai": [None] + [-1.0] * count, "max": [-1.0] * count, "none": [-1.0]}[self.layout]
        self._send({"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": values,
                                                                       "top_logprobs": [{"x": -1.0}] * len(values)}}]})


def test_echo_layouts_are_told_apart():
    server = ThreadingHTTPServer(("127.0.0.1", 0), LayoutHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = run_evals.Endpoint(f"http://127.0.0.1:{server.server_address[1]}", "model")
    try:
        found = {}
        for layout in ("openai", "max", "none"):
            LayoutHandler.layout = layout
            found[layout] = run_evals.echo_layout(endpoint, [5, 6, 7], timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert found["openai"] == (run_evals.EchoLayout.OPENAI, "")
    assert found["max"] == (run_evals.EchoLayout.NO_PLACEHOLDER, "")
    assert found["none"][0] is None and "generated token only" in found["none"][1]


def test_max_echo_layout_is_aligned_before_lm_eval_reads_it(model_dir):
    served_lm, _ = run_evals.completion_classes()
    lm = served_lm(base_url="http://127.0.0.1:9/v1/completions",
                   **run_evals.lm_arguments("model", str(model_dir), 64, 10, False))
    tokens, ctxlen = [5, 6, 7, 8], 2  # continuation: tokens 2 and 3
    tops = [{"a": -1.0}, {"b": -2.0}, {"c": -3.0}, {"d": -0.5}]
    max_layout = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [-1.0, -2.0, -3.0, -0.5],
                                                        "top_logprobs": list(tops)}}]}
    openai_layout = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0, -0.5],
                                                           "top_logprobs": [None] + list(tops)}}]}
    assert lm.parse_logprobs(outputs=[max_layout], tokens=[tokens], ctxlens=[ctxlen]) == [(-5.0, True)]
    assert lm.parse_logprobs(outputs=[openai_layout], tokens=[tokens], ctxlens=[ctxlen]) == [(-5.0, True)]
    assert lm.aligned == 1  # only the answer without the null was changed
