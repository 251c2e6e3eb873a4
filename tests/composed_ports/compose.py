"""Builds a composed port at test time: scaffold from a verified port with ``--with`` blocks, then its overlay.

A composed port folder (``tests/composed_ports/<name>/``) holds only what is
specific to it: ``compose.json`` (start_from, slug, arch_name, with, overlay,
edits) and the overlay files, which replace the scaffolded files of the same
name. Each edit is a literal replacement that must occur exactly once in the
scaffolded file, so an edit that no longer applies fails instead of passing
silently. The result's scaffold_manifest.json records the overlay and edits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO_ROOT, run_script

COMPOSED_DIR = Path(__file__).resolve().parent
SPEC_NAME = "compose.json"
MANIFEST_NAME = "scaffold_manifest.json"


def read_spec(name: str) -> dict:
    """The compose.json of composed port ``name``."""
    return json.loads((COMPOSED_DIR / name / SPEC_NAME).read_text(encoding="utf-8"))


def compose_port(name: str, model: Path, output_dir: Path) -> Path:
    """Scaffold composed port ``name`` for ``model`` into ``output_dir``, apply its overlay; the port folder."""
    spec_dir = COMPOSED_DIR / name
    spec = read_spec(name)
    result = run_script("scaffold", model, "--start-from", REPO_ROOT / spec["start_from"], "--slug", spec["slug"],
                        "--arch-name", spec["arch_name"], "--with", *spec["with"], "--output-dir", output_dir,
                        "--json", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    port = output_dir / spec["slug"]
    for rel in spec["overlay"]:
        target = port / rel
        assert target.is_file(), f"overlay {rel} replaces no scaffolded file"
        shutil.copyfile(spec_dir / rel, target)
    for edit in spec["edits"]:
        target = port / edit["file"]
        text = target.read_text(encoding="utf-8")
        count = text.count(edit["old"])
        assert count == 1, f"edit of {edit['file']}: {edit['old']!r} occurs {count} times, expected once"
        target.write_text(text.replace(edit["old"], edit["new"]), encoding="utf-8")
    manifest_path = port / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    shown = spec_dir.relative_to(REPO_ROOT).as_posix()
    for entry in manifest["files"]:
        if entry["path"] in spec["overlay"]:
            entry["source"] = f"{shown}/{entry['path']}"
            entry["role"] = entry.get("role") or "overlay"
    manifest["composed"] = {"spec": f"{shown}/{SPEC_NAME}", "overlay": sorted(spec["overlay"]),
                            "edits": [{"file": e["file"], "why": e["why"]} for e in spec["edits"]]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return port
