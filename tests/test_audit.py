"""Tests for audit_docstrings.py: scope (docstrings and comments only), hints, the marker, exit codes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_script

ARCH_PY = 'from max.pipelines.lib import SupportedArchitecture\n\narch = SupportedArchitecture(name="XLlamaForCausalLM")\n'


def make_port(root: Path, files: dict[str, str], slug: str = "xllama", donor: str = "llama3") -> Path:
    port = root / slug
    port.mkdir(parents=True)
    (port / "__init__.py").write_text("ARCHITECTURES = []\n")
    (port / "arch.py").write_text(ARCH_PY)
    (port / "scaffold_manifest.json").write_text(json.dumps({"donor": donor, "arch_name": "XLlamaForCausalLM"}))
    for name, text in files.items():
        (port / name).write_text(textwrap.dedent(text))
    return port


def audit(port: Path, *extra: str):
    result = run_script("audit_docstrings", port, "--json", *extra)
    return result, (result.json() if result.stdout.strip() else None)


def test_only_docstrings_and_comments_are_scanned(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Graph module."""
        from max.pipelines.architectures.llama3 import llama3 as llama_graph
        from max.nn.norm import RMSNorm

        qwen_thing = "llama olmo2 RMSNorm single-GPU"   # plain string literal: not scanned
        def build(llama_config):
            return llama_graph.Llama3(llama_config)
        '''})
    result, doc = audit(port)
    assert result.returncode == 0, result.stderr
    assert doc["hits"] == [] and doc["unmarked"] == 0


def test_hits_have_file_line_context_and_hints(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Derived from max/pipelines/architectures/llama3/llama3.py.

        Llama 3 decoder with RMSNorm, single-GPU only.
        """
        from max.nn.norm import LayerNorm

        # XLlamaForCausalLM graph: the port's own name is not a hit
        x = LayerNorm  # QK-norm applied per head
        '''})
    result, doc = audit(port)
    assert result.returncode == 1
    found = {(h["file"], h["line"], h["term"], h["hint"], h["kind"]) for h in doc["hits"]}
    assert ("graph.py", 2, "llama", "OK", "docstring") in found  # lineage
    assert ("graph.py", 4, "llama", "Stale", "docstring") in found
    assert ("graph.py", 4, "RMSNorm", "Lie", "docstring") in found  # code has no RMSNorm
    assert ("graph.py", 4, "single-GPU", "Lie", "docstring") in found
    assert ("graph.py", 9, "QK-norm", "Lie", "comment") in found
    assert not any(h["line"] == 8 for h in doc["hits"])
    assert all(h["context"] for h in doc["hits"]) and doc["unmarked"] == len(doc["hits"])


def test_claim_backed_by_code_is_ok(tmp_path):
    port = make_port(tmp_path, {"norms.py": '''
        from max.nn.norm import RMSNorm
        norm = RMSNorm  # uses RMSNorm like the reference
        '''})
    _, doc = audit(port)
    assert [(h["term"], h["hint"]) for h in doc["hits"]] == [("RMSNorm", "OK")]


def test_marker_approves_a_hit_and_exit_turns_0(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Llama 3 decoder. [audit-ok: the graph is still llama3's, checked]"""
        # borrowed from olmo2 [audit-ok: lineage]
        # stale olmo note [audit-ok:   ]
        '''})
    result, doc = audit(port)
    assert result.returncode == 1
    marked = [h for h in doc["hits"] if h["marked"]]
    assert {h["line"] for h in marked} == {2, 3}
    assert marked[0]["reason"] == "the graph is still llama3's, checked"
    assert [h["line"] for h in doc["hits"] if not h["marked"]] == [4]  # empty reason does not count
    graph = port / "graph.py"
    graph.write_text(graph.read_text().replace("[audit-ok:   ]", "[audit-ok: kept on purpose]"))
    result, doc = audit(port)
    assert result.returncode == 0 and doc["unmarked"] == 0 and doc["marked"] == 3


def test_fresh_scaffold_has_unmarked_hits(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama")
    assert run_script("scaffold", model, "--start-from", "olmo2", "--output-dir", tmp_path,
                      "--slug", "zz_audit").returncode == 0
    result, doc = audit(tmp_path / "zz_audit")
    assert result.returncode == 1 and doc["donor"] == "olmo2"
    assert any(h["term"] == "olmo" and h["file"] == "model.py" for h in doc["hits"])
    text = run_script("audit_docstrings", tmp_path / "zz_audit")
    assert "[audit-ok: <reason>]" in text.stdout and "unmarked" in text.stdout
    # The scaffold's own lineage lines come pre-approved; the donor's text does not.
    lineage = [h for h in doc["hits"] if "Derived from" in h["context"] or "Copied by scaffold.py" in h["context"]]
    assert lineage and all(h["marked"] for h in lineage)
    assert all("Derived from" not in h["context"] for h in doc["hits"] if not h["marked"])


@pytest.mark.parametrize("which, message", [("parent", "pass the port folder"), ("missing", "not found")])
def test_bad_port_dir_exits_3(tmp_path, which, message):
    port = make_port(tmp_path, {})
    arg = tmp_path if which == "parent" else tmp_path / "nope"
    result, doc = audit(arg)
    assert result.returncode == 3 and message in doc["error"]
    if which == "parent":
        assert str(port) in doc["error"]


def test_trailing_slash_is_accepted(tmp_path):
    port = make_port(tmp_path, {})
    result, doc = audit(Path(str(port) + "/"))
    assert result.returncode == 0 and doc["port_dir"] == str(port.resolve())


def test_ordinary_words_that_are_max_folder_names_are_not_family_hits(tmp_path):
    port = make_port(tmp_path, {"helpers.py": '''
        # one step further: a unified pass, like a diffusion of ideas; GPTQ weights stay as they are
        x = 1
        '''})
    result, doc = audit(port)
    assert result.returncode == 0 and doc["hits"] == []


def test_mention_of_a_name_the_port_defines_is_hinted_ok(tmp_path):
    """A kept donor class name (defined in one file, named in another's docstring) is honest, not stale."""
    port = make_port(tmp_path, {
        "inputs.py": '''
            class Llama3Inputs:
                pass
            ''',
        "batching.py": '''
            """Batches :class:`Llama3Inputs` for the port.

            Same batching as the Llama 3 pipeline.
            """
            from .inputs import Llama3Inputs
            ''',
    })
    result, doc = audit(port)
    assert result.returncode == 1
    by_line = {(h["file"], h["line"]): h for h in doc["hits"] if h["term"] == "llama"}
    assert by_line[("batching.py", 2)]["hint"] == "OK"      # names code the port keeps
    assert by_line[("batching.py", 4)]["hint"] == "Stale"   # prose about the donor
    assert not any(h["marked"] for h in doc["hits"])        # a hint never approves a hit
