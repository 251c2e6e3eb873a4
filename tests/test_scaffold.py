"""Unit tests for scaffold.py, import_rewrite.py and port_layout.py (no MAX import, no compile)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import cli_support
import port_layout
import scaffold
from conftest import run_script
from import_rewrite import ARCH_PACKAGE, ModuleIndex, rewrite_imports

ARCH_DIR = Path(cli_support.max_package_dir()) / "pipelines" / "architectures"
INDEX = ModuleIndex(ARCH_PACKAGE, ARCH_DIR)


def plan_for(donor: str, slug: str = "zz_port", source: object = None) -> scaffold.PortPlan:
    import model_source

    mapping = scaffold.plan_mapping(INDEX, donor, slug)
    src = source or model_source.ModelSource(spec="x", local_dir=Path("."))
    return scaffold.build_plan(INDEX, donor, slug, "ZzForCausalLM", "float32", src, mapping)


def relative_imports(text: str):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node


def assert_self_contained(plan: scaffold.PortPlan) -> None:
    """Every relative import resolves to a file of the port; nothing imports the donor family by path."""
    files = set(plan.texts)
    for rel_path, text in plan.texts.items():
        parts = Path(rel_path).with_suffix("").parts
        package = list(parts[:-1])  # a package __init__ lives in its own package
        for node in relative_imports(text):
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            assert node.level - 1 <= len(package), f"{rel_path}: import climbs out of the port"
            target = [*base, *(node.module.split(".") if node.module else [])]
            candidates = {"/".join(target) + ".py", "/".join([*target, "__init__.py"])}
            for alias in node.names:
                candidates |= {"/".join([*target, alias.name]) + ".py"}
            assert candidates & files, f"{rel_path}:{node.lineno} imports {node.module!r} outside the port"
        assert f"{ARCH_PACKAGE}.{plan.donor}" not in text.replace(f"architectures/{plan.donor}/", ""), rel_path


@pytest.mark.parametrize("donor", ["llama3", "olmo2", "phi3", "granite", "qwen2", "olmo"])
def test_every_donor_gives_a_self_contained_port_with_its_own_graph(donor):
    plan = plan_for(donor)
    assert_self_contained(plan)
    for name in (*port_layout.STANDARD_MODULES, "zz_port"):
        assert f"{name}.py" in plan.texts, f"{donor}: {name}.py missing"
    for rel_path, text in plan.texts.items():
        ast.parse(text)
        assert "strict=False" not in text, rel_path
    graph = plan.texts["zz_port.py"]
    assert "class Llama3(" in graph or "class Olmo2(" in graph


def test_llama3_imports_point_at_the_copies():
    plan = plan_for("llama3")
    model = plan.texts["model.py"]
    assert "from .zz_port import Llama3" in model
    assert "from .distributed_llama import DistributedLlama3" in model
    assert "from .zz_port import Llama3" in plan.texts["data_parallel_llama.py"]
    assert plan.borrowed_families == []
    # the tensor-parallel graph is a separate copy: its docstring says so and how to refuse multi-device
    assert "Multi-device runs build the graph defined here" in plan.texts["distributed_llama.py"]
    assert "Multi-device runs" not in plan.texts["data_parallel_llama.py"]


def test_olmo2_absolute_and_parent_relative_imports_become_port_relative():
    plan = plan_for("olmo2")
    graph = plan.texts["zz_port.py"]
    # absolute imports of copied modules point at the copies
    assert "from .layers.attention import Olmo2Attention" in graph
    assert "from .llama3_graph import StackedMLP" in graph
    assert "max.pipelines.architectures" not in "".join(l for l in graph.splitlines() if "import" in l)
    # parent-relative imports of llama3 point at the copied llama3 modules
    assert "from .llama3_model import LlamaModelBase" in plan.texts["model.py"]
    assert "from . import llama3_weight_adapters" in plan.texts["arch.py"]
    assert "layers/attention.py" in plan.texts and "layers/__init__.py" in plan.texts
    assert plan.borrowed_families == ["llama3"]


def test_phi3_graph_is_a_copy_of_llama3_graph_used_by_the_port():
    plan = plan_for("phi3")
    sources = {f.path: f.source for f in plan.files}
    assert sources["zz_port.py"].endswith("llama3/llama3.py")
    assert "from .zz_port import Llama3" in plan.texts["llama3_model.py"]
    assert "from .llama3_model import LlamaModelBase" in plan.texts["model.py"]


def test_parent_relative_import_of_uncopied_code_becomes_absolute():
    module = INDEX.find(f"{ARCH_PACKAGE}.olmo2.model")
    only_olmo2 = {f"{ARCH_PACKAGE}.olmo2.model": "model", f"{ARCH_PACKAGE}.olmo2.model_config": "model_config",
                  f"{ARCH_PACKAGE}.olmo2.olmo2": "zz"}
    result = rewrite_imports(module.path.read_text(), module, "model", only_olmo2, INDEX)
    assert f"from {ARCH_PACKAGE}.llama3.model import LlamaModelBase" in result.text
    assert "from .zz import Olmo2" in result.text
    assert "from .model_config import Olmo2Config" in result.text
    assert any("..llama3.model" in change for change in result.changes)


def test_strict_loading_allowlist_and_license_and_docstrings():
    plan = plan_for("llama3")
    model = plan.texts["model.py"]
    assert model.count("drop_computed_buffers(self.state_dict)") == 2
    assert "strict=True" in model and "from .computed_buffers import drop_computed_buffers" in model
    allow = plan.texts["computed_buffers.py"]
    namespace: dict = {}
    exec(compile(allow, "computed_buffers.py", "exec"), namespace)
    kept = namespace["drop_computed_buffers"]({"rope_freqs.weight": 1, "layers.0.self_attn.rotary_emb.inv_freq": 2,
                                               "layers.0.mlp.up_proj.weight": 3})
    assert kept == {"layers.0.mlp.up_proj.weight": 3}
    for f in plan.files:
        text = plan.texts[f.path]
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "TODO deltas" in doc, f.path
        if f.source:
            assert text.startswith("# ===---"), f"{f.path}: license header lost"
            assert "Copyright (c) 2026, Modular Inc." in text.split('"""')[0]
            assert f.source in doc.replace("\n", " "), f.path


def test_arch_py_name_encodings_and_architectures_export(tmp_path):
    plan = plan_for("olmo2")
    (tmp_path / "arch.py").write_text(plan.texts["arch.py"])
    declared = port_layout.read_arch_declaration(tmp_path / "arch.py")
    assert (declared.name, declared.default_encoding, declared.supported_encodings) == (
        "ZzForCausalLM", "float32", ("bfloat16", "float32"))
    assert "ARCHITECTURES = [olmo2_arch]" in plan.texts["__init__.py"]
    assert '"allenai/' not in plan.texts["arch.py"]  # the donor's example repos are not this model's


# --- slugs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, slug", [("Qwen2.5-0.5B", "qwen2_5_0_5b"), ("3b-model", "m_3b_model"),
                                        ("tiny_llama", "tiny_llama"), ("--", "port")])
def test_slug_from_name(name, slug):
    assert port_layout.slug_from_name(name) == slug


@pytest.mark.parametrize("slug, words", [("bad-name", "identifier"), ("class", "keyword"), ("json", "importable"),
                                         ("model", "clashes"), ("llama3_model", "clashes"), ("", "empty"),
                                         ("modèle", "not ASCII"), ("__main__", "dunder"), ("__init__", "dunder"),
                                         ("computed_buffers", "clashes"), ("scaffold", "importable")])
def test_slug_problems(slug, words):
    assert words in port_layout.slug_problem(slug, reserved=("llama3_model",))


def test_modele_is_an_identifier_but_not_a_slug():
    assert "modèle".isidentifier() and "ASCII" in port_layout.slug_problem("modèle")


@pytest.mark.parametrize("donor, slug, clashes", [("llama3", "distributed_llama", True), ("olmo2", "llama3_graph", True),
                                                  ("olmo2", "layers", True), ("llama3", "zz_free", False),
                                                  ("phi3", "zz_free", False)])
def test_reserved_names_keep_two_modules_off_one_file(donor, slug, clashes):
    mapping = scaffold.plan_mapping(INDEX, donor, slug)
    assert (slug in scaffold.reserved_names(mapping, slug)) is clashes


def test_port_folder_names_follow_the_slug_rule(tmp_path):
    for name, words in [("my-port", "identifier"), ("modèle", "ASCII"), ("__main__", "dunder"), ("model", "clashes")]:
        port = tmp_path / name
        port.mkdir()
        (port / "__init__.py").write_text("")
        (port / "arch.py").write_text("")
        with pytest.raises(cli_support.ScriptError, match=words):
            port_layout.resolve_port_dir(str(port))
    fine = tmp_path / "zz_fine_port"
    fine.mkdir()
    (fine / "__init__.py").write_text("")
    (fine / "arch.py").write_text("")
    assert port_layout.resolve_port_dir(str(fine) + "/").slug == "zz_fine_port"


def test_free_slug_has_no_problem():
    assert port_layout.slug_problem("zz_unused_port_name") is None


# --- CLI: --dry-run, --force, bad input ----------------------------------------------------


def test_dry_run_writes_nothing_and_lists_files(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama")
    result = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", tmp_path / "out",
                        "--slug", "zz_dry", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["dry_run"] is True and doc["slug"] == "zz_dry" and doc["arch_name"] == "LlamaForCausalLM"
    assert {"zz_dry.py", "model.py", "arch.py", "computed_buffers.py"} <= {f["path"] for f in doc["files"]}
    assert not (tmp_path / "out").exists()


def test_existing_port_refused_then_backed_up_with_force(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama")
    out = tmp_path / "ports"
    first = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", out, "--slug", "zz_force")
    assert first.returncode == 0, first.stderr
    graph = out / "zz_force" / "zz_force.py"
    graph.write_text(graph.read_text() + "\n# my edit\n")
    again = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", out, "--slug", "zz_force")
    assert again.returncode == 3 and "--force" in again.stderr
    assert "# my edit" in graph.read_text()
    forced = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", out, "--slug", "zz_force",
                        "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    backup = Path(forced.json()["backup"])
    assert backup.name.startswith("zz_force.bak-") and "# my edit" in (backup / "zz_force.py").read_text()
    assert "# my edit" not in graph.read_text()
    manifest = json.loads((out / "zz_force" / port_layout.MANIFEST_NAME).read_text())
    assert manifest["donor"] == "llama3" and manifest["slug"] == "zz_force"


@pytest.mark.parametrize("extra, message", [
    (["--start-from", "no_such_family"], "not a MAX architecture folder"),
    (["--start-from", "llama3", "--slug", "json"], "already importable"),
    (["--start-from", "llama3", "--slug", "bad-name"], "not a valid Python identifier"),
    (["--start-from", "llama3", "--arch-name", "Not An Id"], "not a valid identifier"),
])
def test_bad_input_exits_3_and_writes_nothing(tmp_path, checkpoint_factory, extra, message):
    model = checkpoint_factory("llama")
    result = run_script("scaffold", model, "--output-dir", tmp_path / "out", *extra, "--json")
    assert result.returncode == 3
    assert message in result.json()["error"]
    assert not (tmp_path / "out").exists()


def test_default_slug_and_encoding_from_checkpoint(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama", weights="none", raw_config_edits={"dtype": "bfloat16"})
    result = run_script("scaffold", model, "--start-from", "phi3", "--output-dir", tmp_path, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["slug"] == port_layout.slug_from_name(Path(model).name)
    assert doc["default_encoding"] == "bfloat16" and "float32" in doc["supported_encodings"]
    assert doc["borrowed_families"] == ["llama3"]


def test_unportable_donor_is_a_hard_stop(tmp_path, checkpoint_factory, monkeypatch, capsys):
    import argparse

    with pytest.raises(ValueError, match="SupportedArchitecture"):
        scaffold.edit_arch("x = 1\n", "Zz", "float32", ["float32"], None)

    def refuse(*args, **kwargs):
        raise ValueError("cannot rewrite 'import x.y' without 'as'")

    monkeypatch.setattr(scaffold, "build_plan", refuse)
    args = argparse.Namespace(model=str(checkpoint_factory("llama")), revision=None, start_from="llama3",
                              output_dir=str(tmp_path / "out"), slug="zz_stop", arch_name=None, force=False,
                              dry_run=False, json=True)
    assert scaffold.main(args) == 2
    assert capsys.readouterr().out and not (tmp_path / "out").exists()
