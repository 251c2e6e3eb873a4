"""Harness for the bad-input sweep: run a script on one bad input and check how it fails.

A bad input must end in exit 3 (or the code the case names) with exactly one
``<prog>: error:`` line on stderr, no traceback, one JSON document on stdout
under ``--json``, and no change to any folder the case protects (hashed before
and after each run). The ``tests/test_bad_inputs_*.py`` modules build their
cases with ``BadCase`` and check each with ``check_bad_case``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from conftest import REPO_ROOT, run_script


def tree_hash(root: Path) -> str:
    """A hash of every name, link target, file content and kind below ``root`` (missing root hashes too)."""
    digest = hashlib.sha256()
    root = Path(root)
    if not (root.exists() or root.is_symlink()):
        return "missing"
    entries = [root] if not root.is_dir() or root.is_symlink() else sorted(_walk(root))
    for path in entries:
        rel = str(path.relative_to(root)) if path != root else "."
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode("utf-8", "surrogateescape"))
        elif path.is_dir():
            digest.update(b"D")
        elif path.is_file():
            digest.update(b"F" + path.read_bytes())
        else:
            digest.update(b"?")
    return digest.hexdigest()


def _walk(root: Path) -> Iterable[Path]:
    """Every path below ``root`` without following links (a link loop is listed, not entered)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [name for name in dirnames if name != "__pycache__"]  # bytecode caches are not content
        base = Path(dirpath)
        yield base
        for name in dirnames + filenames:
            path = base / name
            if path.is_symlink() or not path.is_dir():
                yield path


@dataclass
class BadCase:
    """One bad input: the script, its arguments, and what the failure must look like."""

    id: str
    script: str
    args: list[str]
    exit_code: int = 3
    message: tuple[str, ...] = ()  # substrings the error line must contain (the file or field it names)
    protect: list[Path] = field(default_factory=list)  # folders that must not change
    env: dict[str, str | None] | None = None
    timeout: float = 120
    json: bool = True  # run with --json and check the one JSON document too


# Folders every case protects besides its own: the skill root (nothing is written into it).
def default_protected() -> list[Path]:
    return [REPO_ROOT / "scripts", REPO_ROOT / "references", REPO_ROOT / "templates", REPO_ROOT / "SKILL.md"]


def check_error_output(stderr: str, prog_hint: str, case_id: str) -> str:
    """Exactly one ``<prog>: error:`` line and no traceback; return that line."""
    assert "Traceback (most recent call last)" not in stderr, f"{case_id}: traceback\n{stderr}"
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, f"{case_id}: expected one error line, got {len(lines)}\n{stderr}"
    assert prog_hint in lines[0].split(": error: ")[0], f"{case_id}: error line not from {prog_hint}: {lines[0]}"
    return lines[0]


def check_bad_case(case: BadCase) -> None:
    """Run ``case`` once and assert the failure contract.

    With ``case.json`` the run adds ``--json``, which checks the error line on stderr and the one JSON
    document on stdout in a single process (the error line is printed in both modes, by one function).
    """
    protected = [*case.protect, *default_protected()]
    before = {path: tree_hash(path) for path in protected}
    runs = [[*case.args, "--json"]] if case.json else [list(case.args)]
    prog_hint = case.script if case.script != "import_model" else "import_model.py"
    env = {"PYTHONDONTWRITEBYTECODE": "1", **(case.env or {})}
    for args in runs:
        result = run_script(case.script, *args, env=env, timeout=case.timeout)
        label = f"{case.id} {' '.join(map(str, args[-1:]))}"
        assert result.returncode == case.exit_code, (
            f"{label}: exit {result.returncode}, wanted {case.exit_code}\nstdout:{result.stdout[-2000:]}\n"
            f"stderr:{result.stderr[-2000:]}")
        line = check_error_output(result.stderr, prog_hint, label)
        for text in case.message:
            assert text.lower() in line.lower(), f"{label}: {text!r} not in error line: {line}"
        if "--json" in args:
            document = json.loads(result.stdout)  # exactly one document: json.loads refuses trailing text
            assert isinstance(document, dict) and document.get("exit_code") == case.exit_code, document
            assert document.get("error"), document
        for path in protected:
            assert tree_hash(path) == before[path], f"{label}: {path} changed"
