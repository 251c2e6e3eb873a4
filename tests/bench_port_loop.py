"""Benchmark the port loop on a fresh MAX compile cache (prints figures; not collected by pytest).

Run: ``$PY tests/bench_port_loop.py`` (cold compiles: 5-40 minutes, depending on the load) or
``$PY tests/bench_port_loop.py --dry-run`` (the stand-in ``tests/fake_max.py`` serves, gates run
preflight only, compare is skipped: seconds, no compile). The loop is the one an agent runs on a
2-layer replica: scaffold -> gates -> serve -> compare -> one edit -> serve -> compare. Each step's
wall time is split into MAX compile, MAX load, gates, HF reference and the skill's own overhead;
then the same graphs are started with bare ``max serve`` on another fresh cache, and the ratio of
the loop's wall time to the sum of those bare starts is printed.

Only MAX's cache moves: ``XDG_CACHE_HOME`` points at a temporary folder (MAX keeps compiled graphs
in ``$XDG_CACHE_HOME/modular``, by default ``~/.cache/modular``), while ``HF_HOME``, ``TORCH_HOME``
and the server-record folder are pinned explicitly, so the HF cache, torch's cache and the venv
(``~/.cache/import-model``, used through this Python) are untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TESTS = REPO / "tests"
sys.path[:0] = [str(SCRIPTS), str(TESTS)]

# A small Llama-shaped source; tiny shrinks it to the usual 2-layer replica (4 layers -> 2).
SOURCE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
    "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "hidden_act": "silu",
}
SLUG = "bench_loop_llama"
PROMPT = "The capital of France is Paris. Once upon a time there was a little robot"
# The one edit: the final norm's output times 1.0. The graph changes (a cold compile), the results do not.
EDIT_OLD = "            norm=create_norm(),\n            output=output,"
EDIT_NEW = "            norm=_times_one(create_norm()),\n            output=output,"
EDIT_HELPER = '''

def _times_one(norm):
    """Benchmark edit: ``norm``'s output times 1.0 (a different graph, the same numbers)."""
    base = type(norm)

    class TimesOne(base):
        def __call__(self, x):
            return base.__call__(self, x) * 1.0

    norm.__class__ = TimesOne
    return norm
'''
# Log markers (as max_server.PHASES reads them): the compile starts, the server is ready.
COMPILE_MARKER = "Building, compiling, and initializing model"
READY_MARKER = "Server ready on"
# How often the log watcher looks at the server log; the figures are rounded to 0.1 s anyway.
WATCH_SECONDS = 0.1
# A cold compile on a loaded 2-core machine has taken 19 minutes; an hour bounds a hung one.
SERVE_TIMEOUT = 3600
# Stand-in "compile" of the dry run, long enough for the log watcher to see both markers apart.
DRY_COMPILE_SECONDS = 1.0
CATEGORIES = ("max_compile", "max_load", "gates", "hf_reference", "overhead")


@dataclass
class Step:
    """One loop step: wall seconds and their split (the categories sum to the wall time)."""

    name: str
    wall: float
    split: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def add(self, **parts: float) -> "Step":
        for key, value in parts.items():
            self.split[key] = round(self.split.get(key, 0.0) + max(0.0, value), 2)
        self.split["overhead"] = round(max(0.0, self.wall - sum(v for k, v in self.split.items()
                                                              if k != "overhead")), 2)
        return self


def cache_env(root: Path, name: str) -> dict[str, str]:
    """Environment with a fresh MAX cache under ``root/name``; the HF, torch and record folders pinned."""
    import huggingface_hub.constants as hub

    xdg = root / name / "xdg"
    xdg.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, XDG_CACHE_HOME=str(xdg), HF_HOME=str(hub.HF_HOME),
                TORCH_HOME=os.environ.get("TORCH_HOME") or str(Path.home() / ".cache" / "torch"),
                IMPORT_MODEL_SERVER_DIR=str(root / name / "servers"), MAX_SERVE_DISABLE_TELEMETRY="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(script: str, *args: str, env: dict[str, str], check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=SERVE_TIMEOUT)
    if check and done.returncode != 0:
        raise SystemExit(f"{script} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return time.monotonic() - started, done


class LogWatcher:
    """Notes when the compile and ready markers first appear in a server log (wall clock)."""

    def __init__(self, path: Path):
        self.path, self.seen = path, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _look(self) -> None:
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            text = ""
        for marker in (COMPILE_MARKER, READY_MARKER):
            if marker in text and marker not in self.seen:
                self.seen[marker] = time.time()

    def _watch(self) -> None:
        while not self._stop.is_set() and len(self.seen) < 2:
            self._look()
            time.sleep(WATCH_SECONDS)

    def stop(self) -> None:
        """Stops watching after one last look: a marker written just before the stop still counts
        (a loaded machine can starve the watcher thread past the moment the server answers)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._look()


def serve_step(name: str, model: Path, port: Path, env: dict[str, str], log: Path) -> tuple[Step, dict]:
    """serve --detach, then serve --wait until ready; split into MAX load, MAX compile and overhead."""
    watcher = LogWatcher(log)
    started = time.monotonic()
    _, detached = run("serve_port", model, "--port-dir", port, "--detach", "--json", "--log-file", log,
                      "--timeout", str(SERVE_TIMEOUT), env=env)
    record = json.loads(detached.stdout)
    run("serve_port", "--wait", "--port", str(record["port"]), "--timeout", str(SERVE_TIMEOUT), "--json", env=env)
    wall = time.monotonic() - started
    watcher.stop()
    begun, compiling, ready = record["started_at"], watcher.seen.get(COMPILE_MARKER), watcher.seen.get(READY_MARKER)
    step = Step(name, round(wall, 2))
    if compiling and ready:
        step.add(max_load=compiling - begun, max_compile=ready - compiling)
    else:
        step.add(max_load=0.0)
        step.note = "log markers not seen; all counted as overhead"
    return step, record


def compare_step(name: str, model: Path, record: dict, env: dict[str, str], dry_run: bool) -> Step:
    """compare against the served port; the HF share is what compare itself reports (``hf_load_seconds``:
    0 when its reference cache answered, as on the second compare of an unchanged model)."""
    if dry_run:
        return Step(name, 0.0, note="skipped in --dry-run (the stand-in answers only /v1/models)").add()
    wall, done = run("compare_layers", model, "--base-url", record["base_url"], "--slug", SLUG, "--prompt", PROMPT,
                     "--json", env=env, check=False)
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"compare printed no JSON (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    hf_seconds = float(document.get("hf_load_seconds") or 0.0)
    cached = "reference from compare's cache; " if document.get("reference_cached") else ""
    return Step(name, round(wall, 2), note=f"{cached}verdict {document.get('verdict')}; overhead includes MAX's "
                                          "request time").add(hf_reference=hf_seconds)


def stop(port: int, env: dict[str, str]) -> float:
    wall, _ = run("serve_port", "--stop", "--port", str(port), env=env)
    return wall


def bare_start(model: Path, port_dir: Path, env: dict[str, str], log: Path) -> float:
    """Seconds from `max serve` (the flags serve builds) to /v1/models naming the port, on this env's cache."""
    import max_server

    number = max_server.free_port()
    command = max_server.build_serve_command(str(model), port=number, port_dir=port_dir)
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while time.monotonic() - started < SERVE_TIMEOUT:
            if process.poll() is not None:
                raise SystemExit(f"bare max serve died (exit {process.returncode}); log: {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{number}/v1/models", timeout=2) as answer:
                    if port_dir.name in answer.read().decode("utf-8", "replace"):
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(WATCH_SECONDS * 5)
        raise SystemExit(f"bare max serve not ready in {SERVE_TIMEOUT} s; log: {log}")
    finally:
        max_server.stop_process_group(process.pid, process)


def edit_port(port: Path) -> None:
    graph = port / f"{port.name}.py"
    text = graph.read_text()
    if text.count(EDIT_OLD) != 1:
        raise SystemExit(f"the edit's anchor is not in {graph} once; the donor changed")
    graph.write_text(text.replace(EDIT_OLD, EDIT_NEW) + EDIT_HELPER)


def run_loop(root: Path, dry_run: bool) -> dict:
    """The whole benchmark; returns the figures (printed by ``main``)."""
    if dry_run:
        from fake_max import fake_max_command

        os.environ["IMPORT_MODEL_MAX"] = str(fake_max_command(root))
        os.environ["FAKE_MAX_COMPILE_SECONDS"] = str(DRY_COMPILE_SECONDS)
    env = cache_env(root, "loop")
    source = root / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(SOURCE, indent=2))
    replica = root / "replica"
    setup_seconds, _ = run("make_tiny_model", source / "config.json", "--output", replica, env=env)
    # Bare starts of the same two graphs on another fresh cache, each run right after the loop's start of that
    # graph, so that both see about the same load (the sampler compiles once in each cache, as in the loop).
    bare_env = cache_env(root, "bare")
    bare: list[float] = []
    loads: list[tuple[float, float]] = []
    steps: list[Step] = []
    wall, _ = run("scaffold", replica, "--start-from", "llama3", "--output-dir", root / "ports", "--slug", SLUG,
                  env=env)
    steps.append(Step("scaffold", round(wall, 2)).add())
    port = root / "ports" / SLUG
    phases = ("--phase", "preflight") if dry_run else ()  # all phases; verify is skipped without --base-url
    gates_args = [replica, "--port-dir", port, "--json", *phases]
    wall, _ = run("run_oss_gates", *gates_args, env=env)
    steps.append(Step("gates (preflight only)" if dry_run else "gates (preflight + smoke)", round(wall, 2))
                 .add(gates=wall))
    pristine = root / "bare_ports" / SLUG
    shutil.copytree(port, pristine)
    load_before = os.getloadavg()[0]
    step, record = serve_step("serve (cold)", replica, port, env, root / "serve1.log")
    steps.append(step)
    steps.append(compare_step("compare", replica, record, env, dry_run))
    started = time.monotonic()
    stop(record["port"], env)
    pause = time.monotonic() - started
    loads.append((load_before, os.getloadavg()[0]))
    bare.append(bare_start(replica, pristine, bare_env, root / "bare1.log"))
    started = time.monotonic()
    edit_port(port)
    steps.append(Step("stop + one edit", round(pause + time.monotonic() - started, 2)).add())
    load_before = os.getloadavg()[0]
    step, record = serve_step("serve (edited graph)", replica, port, env, root / "serve2.log")
    steps.append(step)
    steps.append(compare_step("compare", replica, record, env, dry_run))
    stop(record["port"], env)
    loads.append((load_before, os.getloadavg()[0]))
    edit_port(pristine)
    bare.append(bare_start(replica, pristine, bare_env, root / "bare2.log"))
    loop_wall = sum(s.wall for s in steps)
    totals = {key: round(sum(s.split.get(key, 0.0) for s in steps), 2) for key in CATEGORIES}
    max_cache = Path(env["XDG_CACHE_HOME"]) / "modular"
    return {"dry_run": dry_run, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "setup_tiny_seconds": round(setup_seconds, 2), "steps": [asdict(s) for s in steps], "totals": totals,
            "loop_seconds": round(loop_wall, 2), "bare_starts_seconds": [round(b, 2) for b in bare],
            "load_at_each_graph": [[round(a, 2), round(b, 2)] for a, b in loads],
            "ratio": round(loop_wall / sum(bare), 2) if sum(bare) else None,
            "cache": {"XDG_CACHE_HOME": env["XDG_CACHE_HOME"], "max_cache_created": max_cache.is_dir(),
                      "HF_HOME": env["HF_HOME"], "TORCH_HOME": env["TORCH_HOME"]}}


def table(result: dict) -> str:
    """The figures as a fixed-width table."""
    head = f"{'step':28s} {'wall':>8s} " + " ".join(f"{c:>12s}" for c in CATEGORIES)
    lines = [head, "-" * len(head)]
    for step in result["steps"]:
        cells = " ".join(f"{step['split'].get(c, 0.0):12.1f}" for c in CATEGORIES)
        lines.append(f"{step['name']:28s} {step['wall']:8.1f} {cells}" + (f"  ({step['note']})" if step["note"] else ""))
    cells = " ".join(f"{result['totals'][c]:12.1f}" for c in CATEGORIES)
    lines += ["-" * len(head), f"{'loop':28s} {result['loop_seconds']:8.1f} {cells}",
              "bare max serve starts (same graphs, fresh cache): "
              + " + ".join(f"{b:.1f}" for b in result["bare_starts_seconds"]) + " s",
              f"ratio loop / bare: {result['ratio']}",
              "1-minute load before and after each graph's loop start: "
              + "; ".join(f"{a:.1f} -> {b:.1f}" for a, b in result["load_at_each_graph"]),
              f"load average {', '.join(f'{x:.2f}' for x in result['load_average'])} on {result['cpus']} CPUs; "
              f"tiny setup {result['setup_tiny_seconds']:.1f} s (not in the loop)",
              f"MAX cache: {result['cache']['XDG_CACHE_HOME']}/modular (created: {result['cache']['max_cache_created']}); "
              f"HF_HOME {result['cache']['HF_HOME']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="serve with tests/fake_max.py, gates preflight only, no compare: no compile")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.keep:
        root = Path(args.keep).resolve()
        root.mkdir(parents=True, exist_ok=False)
        result = run_loop(root, args.dry_run)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-port-loop-") as folder:
            result = run_loop(Path(folder), args.dry_run)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
