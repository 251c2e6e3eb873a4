"""Which `max serve` settings change a replica's compile or load time (prints figures; not collected by pytest).

Run: ``$PY tests/bench_serve_settings.py`` (one cold compile, then one start per setting: 5-30 minutes,
depending on the load). On a fresh MAX cache (a temporary ``XDG_CACHE_HOME``; HF and the venv untouched)
the 2-layer llama replica of ``bench_port_loop`` is started with the flags ``serve`` builds, twice (cold,
then from the cache), then once per setting below. For each start it prints the seconds to ready,
whether it added a compiled graph to the cache (the setting changes the graph: every cached graph is
cold again), and the largest difference of the prompt's echoed logprobs from the default start (the
setting changes results). ``max warm-cache`` is timed too: it compiles without starting the server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

from bench_port_loop import SOURCE, cache_env  # noqa: E402

# (name, flags added to the default command). Each is a setting an agent might reach for to speed a start.
SETTINGS = (
    ("--max-length 128", ["--max-length", "128"]),
    ("--max-batch-size 1", ["--max-batch-size", "1"]),
    ("--no-enable-prefix-caching", ["--no-enable-prefix-caching"]),
    ("--enable-prefix-caching", ["--enable-prefix-caching"]),
    ("--device-memory-utilization 0.05", ["--device-memory-utilization", "0.05"]),
    ("--kv-cache-page-size 64", ["--kv-cache-page-size", "64"]),
)
# A start that takes longer than this is a hang (a cold compile on a loaded 2-core machine has taken 19 min).
START_TIMEOUT = 3600
POLL_SECONDS = 0.5
# serve's flags (with their values) that max warm-cache does not take: it starts no server.
WARM_CACHE_DROPPED = ("--host", "--port")
# The prompt: this many token ids spread over the replica's vocabulary (an id >= vocab kills MAX's model
# worker), no tokenizer needed; and the top-k asked for.
PROMPT_LENGTH = 12
PROMPT_STRIDE = 37
TOP_K = 5


def prompt_ids(replica: Path) -> list[int]:
    vocab = int(json.loads((replica / "config.json").read_text())["vocab_size"])
    return [1 + (i * PROMPT_STRIDE) % (vocab - 1) for i in range(PROMPT_LENGTH)]


def start(command: list[str], port: int, env: dict[str, str], log: Path) -> tuple[float, subprocess.Popen]:
    """Start ``command`` and return the seconds until /v1/models answers, with the running process."""
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while time.monotonic() - started < START_TIMEOUT:
        if process.poll() is not None:
            raise SystemExit(f"max serve exited {process.returncode}; log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return time.monotonic() - started, process
        except OSError:
            time.sleep(POLL_SECONDS)
    raise SystemExit(f"max serve not ready in {START_TIMEOUT} s; log: {log}")


def echoed_logprobs(port: int, served: str, ids: list[int]) -> list[float]:
    import openai_server

    reply = openai_server.completion(f"http://127.0.0.1:{port}", served, ids, TOP_K, 1)
    return openai_server.parse_completion(reply, ids).logprobs


def one_start(name: str, replica: Path, extra: list[str], env: dict[str, str], root: Path) -> dict:
    import max_cache
    import max_server

    port = max_server.free_port()
    command = max_server.build_serve_command(str(replica), port=port) + extra
    before = max_cache.compiled_graphs(env)
    seconds, process = start(command, port, env, root / f"{len(list(root.glob('*.log')))}.log")
    try:
        logprobs = echoed_logprobs(port, str(replica), prompt_ids(replica))
    finally:
        max_server.stop_process_group(process.pid, process)
    added = len(max_cache.compiled_graphs(env) - before)
    return {"setting": name, "seconds_to_ready": round(seconds, 1), "graphs_added": added, "logprobs": logprobs}


def warm_cache_seconds(replica: Path, env: dict[str, str]) -> float:
    import max_server

    command = warm_cache_command(max_server.build_serve_command(str(replica), port=max_server.free_port()))
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
    if done.returncode != 0:
        raise SystemExit(f"max warm-cache exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return time.monotonic() - started


def warm_cache_command(serve_command: list[str]) -> list[str]:
    """``serve``'s command as ``max warm-cache``: no server flags, and the model given as ``--model``
    (warm-cache has no ``--model-path`` spelling; an unknown flag made the last run's figure NaN)."""
    command = list(serve_command)
    command[1] = "warm-cache"
    for flag in WARM_CACHE_DROPPED:
        if flag in command:
            at = command.index(flag)
            del command[at:at + 2]
    command[command.index("--model-path")] = "--model"
    return command


def run(root: Path, only: list[str] | None = None, warm_cache: bool = True) -> dict:
    source = root / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(SOURCE))
    replica = root / "replica"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(source / "config.json"),
                    "--output", str(replica)], check=True, capture_output=True)
    env = cache_env(root, "settings")
    rows = [one_start("default (cold)", replica, [], env, root), one_start("default (cached)", replica, [], env, root)]
    chosen = [(name, extra) for name, extra in SETTINGS if not only or name in only]
    rows += [one_start(name, replica, extra, env, root) for name, extra in chosen]
    base = rows[0]["logprobs"]
    for row in rows:
        got = row.pop("logprobs")
        pairs = [(a, b) for a, b in zip(got, base) if a is not None and b is not None]
        row["max_logprob_diff"] = max((abs(a - b) for a, b in pairs), default=float("nan"))
    warm = float("nan")
    if warm_cache:
        warm_env = cache_env(root, "warm")
        warm = warm_cache_seconds(replica, warm_env)
        after_warm = one_start("default after max warm-cache", replica, [], warm_env, root)
        after_warm.pop("logprobs")
        rows.append(after_warm)
    return {"rows": rows, "warm_cache_seconds": round(warm, 1), "load_average": os.getloadavg(),
            "cpus": os.cpu_count()}


def table(result: dict) -> str:
    lines = [f"{'setting':36s} {'ready (s)':>10s} {'graphs added':>13s} {'max |dlogprob|':>15s}"]
    for row in result["rows"]:
        diff = row.get("max_logprob_diff")
        lines.append(f"{row['setting']:36s} {row['seconds_to_ready']:10.1f} {row['graphs_added']:13d} "
                     f"{'' if diff is None else format(diff, '.2e'):>15s}")
    lines.append(f"max warm-cache on a fresh cache: {result['warm_cache_seconds']} s")
    lines.append("load average " + ", ".join(f"{x:.2f}" for x in result["load_average"]) + f" on {result['cpus']} CPUs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    parser.add_argument("--only", action="append", default=None, metavar="SETTING",
                        help="measure only this setting (its name as in the table; repeatable)")
    parser.add_argument("--no-warm-cache", action="store_true", help="skip timing max warm-cache (one more compile)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-settings-") as folder:
        result = run(Path(folder), args.only, not args.no_warm_cache)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
