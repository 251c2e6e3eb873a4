"""Shared pytest fixtures: script runner, checkpoint factory, markers.

Tests run offline (CI sets HF_HUB_OFFLINE=1). Tests that exercise the Hub
code path run scripts as subprocesses against the loopback Hub stand-in in
``hub_standin.py`` with their own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "scripts"
TESTS_DIR = Path(__file__).resolve().parent
for path in (SCRIPTS_DIR, TESTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from checkpoints import build_checkpoint  # noqa: E402
from hub_standin import hub, hub_server, subprocess_env  # noqa: E402,F401 - fixtures for every test module

os.environ.setdefault("MAX_SERVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compare's reference cache (scripts/reference_cache.py): one fresh folder per test session, so no test
# scores against rows an earlier session stored.
os.environ.setdefault("IMPORT_MODEL_REFERENCE_CACHE", tempfile.mkdtemp(prefix="import-model-reference-"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: compiles real MAX graphs on the CPU (slow; still runs in CI)"
    )


@dataclass
class ScriptResult:
    """What a script run returned: exit code, stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_script(script: str, *args: str, env: dict[str, str | None] | None = None,
               cwd: str | Path | None = None, timeout: float = 600) -> ScriptResult:
    """Run ``scripts/<script>.py`` (or ``import_model.py``) in a fresh Python process.

    ``env`` overrides ``os.environ``; a ``None`` value unsets the variable
    (e.g. ``HF_HUB_OFFLINE``, which CI exports).
    """
    full_env = subprocess_env(env)
    command = [sys.executable, str(SCRIPTS_DIR / f"{script}.py"), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd or REPO_ROOT,
                          timeout=timeout)
    return ScriptResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per session per key) tiny random HF checkpoints.

    Call as ``checkpoint_factory("llama", weights="bin", ...)``; returns the folder.
    Keyword arguments are those of ``checkpoints.build_checkpoint``.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[str, Path] = {}

    def make(model_type: str = "llama", **kwargs: Any) -> Path:
        key = json.dumps([model_type, kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = build_checkpoint(root / f"ckpt{len(cache)}_{model_type}", model_type, **kwargs)
        return cache[key]

    return make
