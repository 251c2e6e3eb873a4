"""Run the demo or the test suite in a pip venv, creating the venv when it is missing.

This is the pip path for machines without pixi (CI uses it). The venv lives
outside the clone, under ``$IMPORT_MODEL_VENV_ROOT`` (default
``~/.cache/import-model``), in a folder keyed by the hash of
``requirements.txt``, so every clone with the same pins reuses it. Stock pip
23.2 cannot resolve ``modular``, so pip is upgraded inside the venv first.

Tasks:
  demo   python scripts/import_model.py demo  (extra arguments are passed on)
  test   python -m pytest tests -q             (extra arguments go to pytest)
  env    print the venv's path (creating it if needed)

Tests run with HF_HUB_OFFLINE=1 and MAX_SERVE_DISABLE_TELEMETRY=1; the demo
runs with telemetry disabled as well.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import cli_support

EXIT_CODES = {1: "the task failed (for test: a test failed)", 2: "not used"}

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO_ROOT / "requirements.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=("demo", "test", "env"), help="what to run")
    parser.add_argument("task_args", nargs=argparse.REMAINDER, help="arguments passed to the task")


def requirements_key() -> str:
    """Short hash of requirements.txt plus the Python version, naming the venv folder."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:16]


def venv_dir() -> Path:
    root = Path(os.environ.get("IMPORT_MODEL_VENV_ROOT", Path.home() / ".cache" / "import-model"))
    return root / f"venv-{requirements_key()}"


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create and fill the venv unless a complete one already exists."""
    path = venv_dir()
    done_marker = path / ".import-model-complete"
    if done_marker.is_file():
        return path
    print(f"creating the environment in {path} (one time, a few minutes)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = str(venv_python(path))
    steps = (
        [python, "-m", "pip", "install", "-q", "-U", "pip"],
        [python, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
    )
    for step in steps:
        result = subprocess.run(step)
        if result.returncode != 0:
            raise cli_support.ScriptError(f"environment setup failed at: {' '.join(step[2:])}")
    done_marker.write_text(requirements_key() + "\n")
    return path


def task_command(task: str, task_args: list[str], python: Path) -> list[str]:
    if task == "demo":
        return [str(python), str(REPO_ROOT / "scripts" / "import_model.py"), "demo", *task_args]
    return [str(python), "-m", "pytest", str(REPO_ROOT / "tests"), "-q", *task_args]


def task_environment(task: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MAX_SERVE_DISABLE_TELEMETRY"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if task == "test":
        env["HF_HUB_OFFLINE"] = "1"
    return env


def main(args: argparse.Namespace) -> int:
    path = ensure_venv()
    if args.task == "env":
        print(path)
        return 0
    command = task_command(args.task, list(args.task_args), venv_python(path))
    code = subprocess.run(command, cwd=REPO_ROOT, env=task_environment(args.task)).returncode
    return 0 if code == 0 else (code if code in (1, 2, 3) else 1)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
