"""Benchmark the metadata-only Phase 1 scripts (not collected by pytest).

Run: ``$PY tests/bench_metadata_scripts.py``. For each of list-archs, inspect,
list-keys and check-walls on a local tiny checkpoint it prints the wall time
and CPU time (wall time is inflated when other jobs share the cores), and
whether ``torch``, ``transformers`` or ``max.pipelines`` ended up in
``sys.modules``. It then runs list-keys on a local 256 MiB checkpoint and
prints how many bytes of that checkpoint were read (counted by wrapping file
reads) next to the file size, to show only the header is read.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path[:0] = [str(SCRIPTS), str(REPO / "tests")]

# Runs a script in-process, counting bytes read from files under WATCH, then
# reports heavy modules and the count as one JSON line on stderr.
WRAPPER = r"""
import atexit, builtins, io, json, os, runpy, sys
watch = os.environ["BENCH_WATCH"]
counter = {"bytes": 0}
real_open = io.open

class Counting:
    def __init__(self, handle): self._handle = handle
    def read(self, *a):
        data = self._handle.read(*a); counter["bytes"] += len(data); return data
    def readinto(self, b):
        n = self._handle.readinto(b); counter["bytes"] += n or 0; return n
    def __enter__(self): return self
    def __exit__(self, *exc): self._handle.close()
    def __iter__(self): return iter(self._handle)
    def __getattr__(self, name): return getattr(self._handle, name)

def counting_open(file, *args, **kwargs):
    handle = real_open(file, *args, **kwargs)
    try:
        inside = os.path.abspath(os.fspath(file)).startswith(watch)
    except TypeError:
        inside = False
    return Counting(handle) if inside else handle

io.open = builtins.open = counting_open

def report():
    heavy = [m for m in ("torch", "transformers", "max.pipelines") if m in sys.modules]
    sys.stderr.write("BENCH " + json.dumps({"heavy_modules": heavy, "checkpoint_bytes_read": counter["bytes"]}) + "\n")

atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script: str, args: list[str], watch: Path) -> dict:
    env = dict(os.environ, BENCH_WATCH=str(watch), HF_HUB_OFFLINE="1", MAX_SERVE_DISABLE_TELEMETRY="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(SCRIPTS / f"{script}.py"), *args],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next((l for l in done.stderr.splitlines() if l.startswith("BENCH ")), None)
    info = json.loads(line[6:]) if line else {"heavy_modules": ["?"], "checkpoint_bytes_read": -1}
    return {"seconds": elapsed, "cpu_seconds": cpu, "exit": done.returncode, **info}


def write_big_checkpoint(folder: Path, mib: int = 256) -> Path:
    """A llama-shaped safetensors file of ``mib`` MiB (zeros), written without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = mib * 1024 * 1024 // (4096 * 4)
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, 4096], "data_offsets": [0, rows * 4096 * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "model.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + rows * 4096 * 4)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return path


def main() -> int:
    from checkpoints import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_checkpoint(Path(tmp) / "tiny", "stablelm", tokenizer=False)
        print(f"tiny checkpoint: {tiny} (stablelm, not native in MAX)")
        print(f"{'command':<44} {'wall s':>7} {'cpu s':>6} {'exit':>4}  heavy modules imported")
        commands = [
            ("list_native_archs", []), ("list_native_archs", ["--match", "StableLmForCausalLM"]),
            ("list_native_archs", ["--donors"]), ("inspect_hf", [str(tiny)]),
            ("list_checkpoint_keys", [str(tiny), "--summary"]), ("check_walls", [str(tiny)]),
        ]
        for script, args in commands:
            result = run(script, args, tiny)
            label = " ".join([script] + [a for a in args if not a.startswith("/")])
            print(f"{label:<44} {result['seconds']:>7.2f} {result['cpu_seconds']:>6.2f} {result['exit']:>4}  "
                  f"{', '.join(result['heavy_modules']) or 'none'}")
        big = write_big_checkpoint(Path(tmp) / "big")
        size = big.stat().st_size
        result = run("list_checkpoint_keys", [str(big.parent), "--summary"], big.parent)
        print(f"\nlist-keys --summary on a {size / 2**20:.0f} MiB checkpoint: read "
              f"{result['checkpoint_bytes_read']} bytes of it ({result['seconds']:.2f} s, exit {result['exit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
