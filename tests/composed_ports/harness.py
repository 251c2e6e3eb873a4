"""What every composed-port e2e module shares: the replica source, edited copies, block checks, serving.

A composed-port module (tests/test_blocks*_e2e.py) builds one strong-init
replica from a family's default transformers config (``default_source`` then
``make_replica``), composes its port (composed_ports/compose.py), checks the
port's copied blocks against templates/blocks (``check_port_blocks``), plants
bugs as edited copies of the replica (``edited_copy``, ``mutant_copies``) so
the one compiled graph is reused, and compares MAX's answers with transformers
(``serve_and_compare``), including prompts sent alone and together
(``alone_and_together``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

from composed_ports.compose import read_spec
from conftest import REPO_ROOT, run_script

BLOCKS_DIR = REPO_ROOT / "templates" / "blocks"
WEIGHTS = "model.safetensors"  # make_tiny_model writes one safetensors file
SERVE_TIMEOUT = 3600.0  # a cold compile on 2 shared cores can take tens of minutes
CONCURRENT_TOP_K = 5  # logprobs per position asked for in the concurrency check
CONCURRENT_NEW = 8  # tokens generated per prompt in the concurrency check (decode steps with a cache)
DRY_BUILD_TIMEOUT = 900.0  # port_probe's dry-build imports max and builds the graph without compiling


def default_source(folder: Path, config_class, architecture: str) -> Path:
    """transformers' default ``config_class()`` as a bare config.json naming ``architecture``; the folder."""
    config = config_class().to_dict()
    config["architectures"] = [architecture]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def make_replica(source: Path, output: Path) -> Path:
    """make_tiny_model's strong-init replica of ``source`` in ``output``; fails the test if it cannot."""
    result = run_script("make_tiny_model", source, "--output", output, "--json")
    assert result.returncode == 0, result.stderr
    return output


def edited_copy(replica: Path, dest: Path, edit_weights=None, edit_config=None) -> Path:
    """A copy of ``replica`` with its tensors and/or config edited in place; fails if an edit changes nothing.

    ``edit_weights(tensors, config)`` edits the name -> tensor dict in place
    (it may also replace, add or remove entries); ``edit_config(config)`` returns the edited
    config dict.
    """
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(replica, dest)
    config = json.loads((dest / "config.json").read_text())
    if edit_weights is not None:
        tensors = load_file(str(dest / WEIGHTS))
        before = {name: t.clone() for name, t in tensors.items()}
        edit_weights(tensors, config)
        changed = set(before) != set(tensors) or any(not torch.equal(before[n], tensors[n]) for n in tensors)
        assert changed, "weight edit changed nothing"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(dest / WEIGHTS), metadata={"format": "pt"})
    if edit_config is not None:
        edited = edit_config(dict(config))
        assert edited != config, "config edit changed nothing"
        (dest / "config.json").write_text(json.dumps(edited, indent=2))
    return dest


def mutant_copies(replica: Path, root: Path, mutations: dict, patched: Iterable[str] = ()) -> dict[str, Path]:
    """One edited copy per ``name -> (edit_weights, edit_config)`` entry, under ``root/name``; plus an unedited
    copy per name in ``patched`` (a reference compared under an in-process patch: its own folder, so the
    reference cache never mixes it with the replica)."""
    copies = {name: edited_copy(replica, root / name, w, c) for name, (w, c) in mutations.items()}
    copies.update({name: Path(shutil.copytree(replica, root / name)) for name in patched})
    return copies


def load_block(name: str):
    """templates/blocks/<name>.py loaded by path (registered in sys.modules first, for its dataclasses)."""
    module_name = f"blocks_e2e_{name.strip('_')}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BLOCKS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def check_port_blocks(port_dir: Path, port_name: str) -> None:
    """The manifest records every block the port imports, with the library's version and sha256, and the copies
    in the port hash to what the manifest says."""
    manifest = json.loads((port_dir / "scaffold_manifest.json").read_text())
    library = {row["name"]: row for row in load_block("__init__").catalog()}
    recorded = {b["name"]: b for b in manifest["blocks"]}
    assert list(recorded) == read_spec(port_name)["with"]
    for name, block in recorded.items():
        assert (block["version"], block["sha256"]) == (library[name]["version"], library[name]["sha256"]), \
            f"{name} drifted from templates/blocks"
        assert hashlib.sha256((port_dir / block["file"]).read_bytes()).hexdigest() == block["sha256"], block["file"]
    imported = set()  # blocks the port's own modules import (graph, config, adapter)
    for module in port_dir.glob("*.py"):
        imported |= {node.module.split(".", 1)[1] for node in ast.walk(ast.parse(module.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.level == 1
                     and (node.module or "").startswith("blocks.")}
    assert imported == set(recorded), (imported, set(recorded))


def check_compiled_names(port_dir: Path, port_name: str, architecture: str, graph_class: str) -> None:
    """Graph name, graph class and registered architecture are those the compile cache holds the graph under."""
    from port_layout import read_arch_declaration

    assert read_arch_declaration(port_dir / "arch.py").name == architecture
    assert f'"{port_name}",' in (port_dir / "model.py").read_text()
    assert f"class {graph_class}(Transformer)" in (port_dir / f"{port_name}.py").read_text()
    composed = json.loads((port_dir / "scaffold_manifest.json").read_text())["composed"]
    assert composed["overlay"] == sorted(read_spec(port_name)["overlay"])


def check_dry_build(replica: Path, port_dir: Path) -> None:
    """port_probe's dry-build and key-diff pass for the port on the replica (no compile)."""
    result = run_script("port_probe", replica, "--port-dir", port_dir, "--check", "dry-build", "--check",
                        "key-diff", "--fork", "--json", timeout=DRY_BUILD_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(r["document"]["passed"] for r in result.json()["results"])


def reference_logprobs(path: Path, ids):
    """transformers' log-probabilities ``[1, T, vocab]`` for ``ids`` ``[1, T]``, loaded as compare loads its
    reference (hf_reference: float32, eager attention; sdpa would drop an attention softcap)."""
    import hf_reference
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf_reference.load(str(path))(ids).logits, -1)


def check_mutations_move_hf(replica: Path, mutants: dict[str, Path], ids=None,
                            minimum: dict[str, float] | None = None, patched: dict | None = None) -> dict[str, float]:
    """transformers itself gives different logprobs on every mutant (by more than the sensitivity threshold, or
    by ``minimum[name]`` where given, for a mutation that cannot reach it); the measured max |delta| per mutant.

    ``patched[name]`` is a context manager active while mutant ``name`` runs (a patched reference module)."""
    import contextlib

    import torch
    from tolerances import sensitivity_threshold

    ids = torch.arange(2, 14).unsqueeze(0) if ids is None else ids
    moved = {}
    ref = reference_logprobs(replica, ids)
    for name, path in mutants.items():
        with (patched or {}).get(name, contextlib.nullcontext)():
            got = reference_logprobs(path, ids)
        moved[name] = float((got - ref).abs().max())
        assert moved[name] > (minimum or {}).get(name, sensitivity_threshold("float32")), (name, moved[name])
    return moved


def alone_and_together(server, prompt_ids: list[list[int]]):
    """MAX's answers for each prompt sent alone, then for all prompts sent at once (one ragged batch when the
    scheduler takes them together: different lengths, so row offsets and per-sequence cache lengths differ)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai_server

    def ask(ids):
        reply = openai_server.completion(server.base_url, server.served_name, ids, CONCURRENT_TOP_K, CONCURRENT_NEW)
        return openai_server.parse_completion(reply, ids)

    alone = [ask(ids) for ids in prompt_ids]
    with ThreadPoolExecutor(max_workers=len(prompt_ids)) as pool:
        together = list(pool.map(ask, prompt_ids))
    return alone, together


def check_alone_and_together(alone, together) -> None:
    """Each prompt's answer in the shared batch equals its answer alone (same tokens, logprobs within tolerance)."""
    from tolerances import logprob_atol

    assert len({len(a.prompt_ids) for a in alone}) == len(alone), "the prompts must differ in length"
    for one, both in zip(alone, together):
        assert both.generated_ids == one.generated_ids
        assert len(both.logprobs) == len(one.logprobs)
        assert max(abs(a - b) for a, b in zip(one.logprobs, both.logprobs)) <= logprob_atol("float32")


def serve_and_compare(replica: Path, port_dir: Path, prompts: list[str], references: dict[str, Path],
                      timings: dict[str, float], label: str = "first", served_copy: Path | None = None,
                      patched: dict | None = None) -> dict:
    """Serve ``served_copy`` (default: the replica) with the port once and compare with transformers.

    Reports: "port" (the replica as reference), "alone_and_together" (the
    port's prompts alone, then together), and one per ``references`` entry
    (the same server's answers against that reference, under ``patched[name]``
    where given: a patched reference module). ``timings`` gets
    ``<label>_serve_ready`` and ``<label>_server_total`` in seconds.
    """
    import contextlib

    import port_compare
    import max_server

    reports = {}
    started = time.monotonic()
    model = str(served_copy or replica)
    with max_server.served_model(model, port_dir=str(port_dir), devices="cpu", encoding="float32",
                                 progress=False, timeout=SERVE_TIMEOUT) as server:
        timings[f"{label}_serve_ready"] = time.monotonic() - started
        reports["port"] = port_compare.run_compare(str(replica), server.base_url, server.served_name,
                                                   prompts=prompts, chat_template=False)
        reports["alone_and_together"] = alone_and_together(server, [run.prompt_ids for run in reports["port"].runs])
        for name, path in references.items():
            with (patched or {}).get(name, contextlib.nullcontext)():
                reports[name] = port_compare.run_compare(str(replica), server.base_url, server.served_name,
                                                         prompts=prompts, chat_template=False, reference=str(path))
    timings[f"{label}_server_total"] = time.monotonic() - started
    return reports


def print_summary(port_name: str, timings: dict[str, float], reports: dict) -> None:
    """One line of timings and one of verdicts (pytest -s shows them; CI logs keep them)."""
    print(f"{port_name} e2e timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print(f"{port_name} verdicts:", json.dumps({k: [r.verdict, round(r.max_abs_diff, 4)] for k, r in reports.items()
                                               if hasattr(r, "verdict")}))


def check_diverged(report, name: str) -> None:
    """A planted bug's report is DIVERGED, names its first divergence and exceeds the tolerance."""
    assert report.verdict == "DIVERGED", (name, report.max_abs_diff)
    assert report.first_divergence is not None
    assert report.max_abs_diff > report.atol
