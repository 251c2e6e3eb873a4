"""The port-loop benchmark's --dry-run mode (stand-in max serve, no compile) and its cache isolation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_port_loop
from conftest import TESTS_DIR

# The dry run builds a replica, runs preflight gates and two stand-in serves: well under this.
DRY_RUN_LIMIT = 600


def test_cache_env_moves_only_the_max_cache(tmp_path):
    import huggingface_hub.constants as hub

    env = bench_port_loop.cache_env(tmp_path, "loop")
    xdg = Path(env["XDG_CACHE_HOME"])
    assert xdg.is_dir() and xdg.is_relative_to(tmp_path)
    assert env["HF_HOME"] == str(hub.HF_HOME) and not Path(env["HF_HOME"]).is_relative_to(xdg)
    assert not Path(env["TORCH_HOME"]).is_relative_to(xdg)
    assert Path(env["IMPORT_MODEL_SERVER_DIR"]).is_relative_to(tmp_path)


def test_dry_run_prints_the_loop_table_without_compiling(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(TESTS_DIR / "bench_port_loop.py"), "--dry-run", "--json",
                           "--keep", str(work)], capture_output=True, text=True, timeout=DRY_RUN_LIMIT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dry_run"] is True
    names = [step["name"] for step in result["steps"]]
    assert names == ["scaffold", "gates (preflight only)", "serve (cold)", "compare", "stop + one edit",
                     "serve (edited graph)", "compare"]
    for step in result["steps"]:
        assert abs(sum(step["split"].values()) - step["wall"]) < 0.1, step
    serve = result["steps"][2]
    assert serve["split"]["max_compile"] >= bench_port_loop.DRY_COMPILE_SECONDS * 0.9, serve  # markers were seen
    assert len(result["bare_starts_seconds"]) == 2 and result["ratio"] > 0
    assert Path(result["cache"]["XDG_CACHE_HOME"]).is_relative_to(work)
    edited = (work / "ports" / bench_port_loop.SLUG / f"{bench_port_loop.SLUG}.py").read_text()
    assert bench_port_loop.EDIT_NEW in edited
    assert not list((work / "loop" / "servers").glob("*.json"))  # both servers stopped
