"""Unit tests for scaffold.py, import_rewrite.py and port_layout.py (no compile).

Everything runs on source text without importing MAX, except the last test, which builds graph objects
(no compile) of scaffolded ports in one subprocess.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import cli_support
import port_layout
import scaffold
from conftest import run_script
from import_rewrite import ARCH_PACKAGE, ModuleIndex, rewrite_imports

ARCH_DIR = Path(cli_support.max_package_dir()) / "pipelines" / "architectures"
INDEX = ModuleIndex(ARCH_PACKAGE, ARCH_DIR)


def plan_for(donor: str, slug: str = "zz_port", source: object = None, *, full: bool = False) -> scaffold.PortPlan:
    """The plan for ``donor``; ``full`` keeps the multi-device modules and the GGUF/GPTQ paths."""
    import model_source

    mapping = scaffold.plan_mapping(INDEX, donor, slug, multi_device=full)
    src = source or model_source.ModelSource(spec="x", local_dir=Path("."))
    return scaffold.build_plan(INDEX, donor, slug, "ZzForCausalLM", "float32", src, mapping, multi_device=full,
                               keep_adapters=full)


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


@pytest.mark.parametrize("full", [False, True], ids=["single-device", "full"])
@pytest.mark.parametrize("donor", ["llama3", "olmo2", "phi3", "granite", "qwen2", "olmo", "mistral"])
def test_every_donor_gives_a_self_contained_port_with_its_own_graph(donor, full):
    plan = plan_for(donor, full=full)
    assert_self_contained(plan)
    for name in (*port_layout.STANDARD_MODULES, "zz_port"):
        assert f"{name}.py" in plan.texts, f"{donor}: {name}.py missing"
    for rel_path, text in plan.texts.items():
        ast.parse(text)
        assert "strict=False" not in text, rel_path
    graph = plan.texts["zz_port.py"]
    assert "class Llama3(" in graph or "class Olmo2(" in graph or "class Mistral(" in graph


def test_llama3_imports_point_at_the_copies():
    plan = plan_for("llama3", full=True)
    model = plan.texts["model.py"]
    assert "from .zz_port import Llama3" in model
    assert "from .distributed_llama import DistributedLlama3" in model
    assert "from .zz_port import Llama3" in plan.texts["data_parallel_llama.py"]
    assert plan.borrowed_families == []
    # the tensor-parallel graph is a separate copy: its docstring says so and how to refuse multi-device
    assert "Multi-device runs build the graph defined here" in plan.texts["distributed_llama.py"]
    assert "Multi-device runs" not in plan.texts["data_parallel_llama.py"]


def test_olmo2_absolute_and_parent_relative_imports_become_port_relative():
    plan = plan_for("olmo2", full=True)
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
    assert model.count("drop_computed_buffers(self.state_dict)") == 1  # the single-device load
    assert plan_for("llama3", full=True).texts["model.py"].count("drop_computed_buffers(self.state_dict)") == 2
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
    mapping = scaffold.plan_mapping(INDEX, donor, slug, multi_device=True)
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
    (["--start-from", "no_such_family"], "neither a MAX architecture folder"),
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
    assert doc["slug"] == "llama"  # the model_type, not the folder name (a replica folder is often "replica")
    assert doc["default_encoding"] == "bfloat16" and "float32" in doc["supported_encodings"]
    assert doc["borrowed_families"] == ["llama3"]


QUANTIZED_LLAMA3_ENCODINGS = {"float8_e4m3fn", "float4_e2m1fnx2"}  # what llama3's config class lists besides floats


def test_a_float_checkpoint_port_declares_only_float_encodings(tmp_path, checkpoint_factory):
    """Ernie 4.5 dogfood: the llama3-scaffolded port kept llama3's fp8/fp4 encodings, which a float checkpoint can
    never serve. They are dropped from arch.py and the config class, and named in the manifest."""
    plan = plan_for("llama3")
    (tmp_path / "arch.py").write_text(plan.texts["arch.py"])
    declared = port_layout.read_arch_declaration(tmp_path / "arch.py")
    assert declared.supported_encodings == ("bfloat16", "float32")
    assert set(plan.dropped_encodings["encodings"]) >= QUANTIZED_LLAMA3_ENCODINGS
    config_text = plan.texts["model_config.py"]
    supported = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(config_text))
                     if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == "SUPPORTED_ENCODINGS")
    assert supported == {"bfloat16", "float32"}
    # a quantized checkpoint keeps them
    quantized = scaffold.build_plan(INDEX, "llama3", "zz_port", "ZzForCausalLM", "float32",
                                    scaffold.model_source.ModelSource(spec="x", local_dir=Path(".")),
                                    scaffold.plan_mapping(INDEX, "llama3", "zz_port"), float_checkpoint=False)
    assert QUANTIZED_LLAMA3_ENCODINGS <= set(quantized.supported_encodings) and quantized.dropped_encodings == {}
    # the CLI decides from the checkpoint and writes the manifest key
    model = checkpoint_factory("llama", weights="none")
    doc = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", tmp_path / "out", "--dry-run",
                     "--json").json()
    assert doc["supported_encodings"] == ["bfloat16", "float32"]
    assert set(doc["dropped_encodings"]["encodings"]) >= QUANTIZED_LLAMA3_ENCODINGS
    human = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", tmp_path / "out",
                       "--dry-run").stdout
    assert "encodings not declared: " in human and "float8_e4m3fn" in human
    quantized_model = checkpoint_factory("llama", weights="none",
                                         raw_config_edits={"quantization_config": {"quant_method": "fp8"}})
    doc = run_script("scaffold", quantized_model, "--start-from", "llama3", "--output-dir", tmp_path / "out",
                     "--dry-run", "--json").json()
    assert QUANTIZED_LLAMA3_ENCODINGS <= set(doc["supported_encodings"]) and doc["dropped_encodings"] == {}


def test_unportable_donor_is_a_hard_stop(tmp_path, checkpoint_factory, monkeypatch, capsys):
    import argparse

    with pytest.raises(ValueError, match="SupportedArchitecture"):
        scaffold.edit_arch("x = 1\n", "Zz", "float32", ["float32"], None)

    def refuse(*args, **kwargs):
        raise ValueError("cannot rewrite 'import x.y' without 'as'")

    monkeypatch.setattr(scaffold, "build_plan", refuse)
    args = argparse.Namespace(model=str(checkpoint_factory("llama")), revision=None, start_from="llama3",
                              output_dir=str(tmp_path / "out"), slug="zz_stop", arch_name=None, force=False,
                              dry_run=False, json=True, multi_device=False, keep_adapters=False)
    assert scaffold.main(args) == 2
    assert capsys.readouterr().out and not (tmp_path / "out").exists()


# --- single-device by default: multi-device graphs, EP batch processors, GGUF/GPTQ paths left out ---------

# What the full copy of a llama3-pipeline donor has and the default one must not.
MULTI_DEVICE_AND_ADAPTER_TEXT = ("DistributedLlama3", "create_data_parallel_model", "Llama3EpBatchProcessor",
                                 "EPCommInitializer", "convert_gguf_state_dict", "GGUF_", "WeightsFormat.gguf")


def _functions(text: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("donor, model_file", [("llama3", "model.py"), ("qwen2", "llama3_model.py"),
                                               ("olmo", "llama3_model.py")])
def test_single_device_by_default_and_the_rest_only_with_flags(tmp_path, donor, model_file):
    plan, full = plan_for(donor), plan_for(donor, full=True)
    assert {"distributed_llama.py", "data_parallel_llama.py"} <= set(full.texts)
    assert not [p for p in plan.texts if scaffold.is_multi_device_module(Path(p).stem)]
    trimmed_text, full_text = "\n".join(plan.texts.values()), "\n".join(full.texts.values())
    for name in MULTI_DEVICE_AND_ADAPTER_TEXT:
        assert name in full_text and name not in trimmed_text, name
    # the multi-device graph builders keep their signatures and say how to get them back
    functions = _functions(plan.texts[model_file])
    for name in ("_data_parallel_spec", "_tensor_parallel_spec"):
        last = functions[name].body[-1]
        assert isinstance(last, ast.Raise) and "--multi-device" in ast.unparse(last), name
    assert not isinstance(functions["_single_device_spec"].body[-1], ast.Raise)
    assert "the single-device one" in ast.get_docstring(functions["graph_specs"])  # no longer claims dispatch
    (tmp_path / "arch.py").write_text(plan.texts["arch.py"])
    declared = port_layout.read_arch_declaration(tmp_path / "arch.py")
    assert not set(declared.supported_encodings) & scaffold.NON_SAFETENSORS_ENCODINGS
    assert "multi_gpu_supported=False" in plan.texts["arch.py"]
    assert {t["flag"] for t in plan.trimmed} == {"--multi-device", "--keep-adapters"} and full.trimmed == []


def test_a_shared_path_keeps_working_through_a_placeholder():
    """mistral picks its graph inline (``A(...) if several devices else B(...)``): only the left-out class raises."""
    plan = plan_for("mistral")
    model = plan.texts["model.py"]
    assert "distributed_mistral.py" not in plan.texts and "class DistributedMistral:" in model
    assert not isinstance(_functions(model)["graph_specs"].body[-1], ast.Raise)
    placeholder = next(n for n in ast.parse(model).body if isinstance(n, ast.ClassDef) and n.name == "DistributedMistral")
    namespace: dict = {}
    exec(compile(ast.Module([placeholder], []), "placeholder", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="--multi-device"):
        namespace["DistributedMistral"]("config")


def test_ep_batch_processors_stay_when_the_port_uses_them():
    plan = plan_for("qwen3")  # Qwen3BatchProcessor subclasses Llama3EpBatchProcessor
    assert "class Llama3EpBatchProcessor(" in plan.texts["llama3_batch_processor.py"]
    assert not any(t["flag"] == "--multi-device" and "batch" in t["why"] for t in plan.trimmed)


# --- the pipeline model builds the config class arch.py registers; config defaults agree with arch.py --------


@pytest.mark.parametrize("donor, config_class, status", [("qwen2", "Qwen2Config", "wired"),
                                                         ("olmo", "OlmoConfig", "wired"),
                                                         ("llama3", "Llama3Config", "already wired"),
                                                         ("phi3", "Llama3Config", "already wired")])
def test_pipeline_model_builds_the_registered_config_class(donor, config_class, status):
    plan = plan_for(donor)
    wiring = plan.config_wiring
    assert (wiring["config_class"], wiring["config_file"], wiring["status"]) == (config_class, "model_config.py",
                                                                                  status)
    for rel_path, text in plan.texts.items():
        for name, func in _functions(text).items():
            if name != "_create_model_config":
                continue
            built = [ast.unparse(c.func.value) for c in ast.walk(func)
                     if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "initialize"]
            assert built and set(built) <= {config_class, "self.model_config_cls"}, (rel_path, built)
    if status == "wired":
        assert f"model_config_cls = {config_class}" in plan.texts["model.py"]
        assert f"from .model_config import {config_class}" in plan.texts["model.py"]


@pytest.mark.parametrize("donor", ["llama3", "qwen2", "olmo"])
def test_config_class_encoding_defaults_agree_with_arch_py(tmp_path, donor):
    plan = plan_for(donor)
    (tmp_path / "arch.py").write_text(plan.texts["arch.py"])
    declared = port_layout.read_arch_declaration(tmp_path / "arch.py")
    seen = 0
    for text in plan.texts.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.target.id == "DEFAULT_ENCODING":
                    seen += 1
                    assert ast.literal_eval(node.value) == declared.default_encoding == "float32"
                elif node.target.id == "SUPPORTED_ENCODINGS":
                    assert tuple(sorted(ast.literal_eval(node.value))) == declared.supported_encodings
    assert seen  # llama3's own config said "q4_k" before the rewrite
    assert '"q4_k"' not in plan.texts["model_config.py" if donor == "llama3" else "llama3_model_config.py"]


# --- a port folder as the donor --------------------------------------------------------------------------

WORKED_PORT = Path(port_layout.SHIPPED_PORTS_DIR) / "stablelm"
NEW_ARCH = "ZzNeoStableForCausalLM"


@pytest.fixture(scope="module")
def neo_model(checkpoint_factory) -> Path:
    return checkpoint_factory("stablelm", weights="none", tokenizer=False, raw_config_edits={"architectures": [NEW_ARCH]})


def name_tokens(text: str) -> set[str]:
    import io
    import tokenize

    return {t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.NAME}


def test_scaffold_from_the_worked_port_renames_classes_slug_and_architecture(tmp_path, neo_model):
    result = run_script("scaffold", neo_model, "--start-from", WORKED_PORT, "--output-dir", tmp_path,
                        "--slug", "zz_neo", "--json")
    assert result.returncode == 0, result.stderr
    doc, port = result.json(), tmp_path / "zz_neo"
    texts = {p.relative_to(port).as_posix(): p.read_text() for p in port.rglob("*.py")}
    source_files = {p.relative_to(WORKED_PORT).as_posix() for p in WORKED_PORT.rglob("*.py")
                    if "__pycache__" not in p.parts}
    assert set(texts) == (source_files - {"stablelm.py"}) | {"zz_neo.py"}
    block_files = {b["file"] for b in doc["blocks"]}
    for rel_path, text in texts.items():
        if rel_path in block_files:  # library blocks: verbatim (no renames, no lineage paragraph)
            assert text == (WORKED_PORT / rel_path).read_text(), rel_path
            continue
        names = name_tokens(text)
        assert not [n for n in names if n.startswith("StableLm") or "stablelm" in n.lower().split("_")], rel_path
        assert "StableLmForCausalLM" in text  # the lineage paragraph names the port it came from
        assert "Copied by scaffold.py from the port templates/ports/stablelm" in (ast.get_docstring(ast.parse(text))
                                                                                   or "").replace("\n", " ")
    assert "class ZzNeoStable(Transformer)" in texts["zz_neo.py"] and "from .zz_neo import ZzNeoStable" in texts["model.py"]
    # The graph keeps the name it is compiled under, so a replica with the worked port's shapes reuses its graph.
    assert '"stablelm",' in texts["model.py"]
    declared = port_layout.read_arch_declaration(port / "arch.py")
    assert (declared.name, declared.default_encoding) == (NEW_ARCH, "float32")
    assert "ARCHITECTURES = [zz_neo_arch]" in texts["__init__.py"]
    # __all__ names what the module defines (the dogfood run found "stablelm_arch" left in it)
    exported = ast.literal_eval(next(node.value for node in ast.parse(texts["__init__.py"]).body
                                     if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"))
    assert "zz_neo_arch" in exported and not [name for name in exported if "stablelm" in name.lower()]
    # the worked port's review markers are not inherited: the renamed copy is reviewed afresh
    assert any(port_layout.REVIEW_MARKER.search(p.read_text()) for p in WORKED_PORT.rglob("*.py"))
    inherited = [(rel, m.group(0)) for rel, text in texts.items() for m in port_layout.REVIEW_MARKER.finditer(text)
                 if "lineage" not in m.group(1)]
    assert inherited == []
    worked = json.loads((WORKED_PORT / port_layout.MANIFEST_NAME).read_text())
    manifest = json.loads((port / port_layout.MANIFEST_NAME).read_text())
    assert manifest["donor"] == "llama3" and manifest["model_type"] == "stablelm"
    assert manifest["start_from"] == {"kind": "port", "slug": "stablelm", "arch_name": "StableLmForCausalLM",
                                      "path": "templates/ports/stablelm"}
    assert [step["kind"] for step in manifest["lineage"]] == ["native", "port"]
    assert manifest["implements"] == worked["implements"] and "verified" not in manifest
    assert manifest["renames"]["StableLmConfig"] == "ZzNeoStableConfig" and doc["config_wiring"]["status"] == "already wired"
    # a port of that port records the whole chain
    again = run_script("scaffold", neo_model, "--start-from", port, "--output-dir", tmp_path / "again",
                       "--slug", "zz_neo2", "--arch-name", "ZzNeoTwoForCausalLM", "--json")
    assert again.returncode == 0, again.stderr
    assert [s.get("slug") for s in again.json()["lineage"]] == ["llama3", "stablelm", "zz_neo"]
    assert "class ZzNeoTwo(Transformer)" in (tmp_path / "again" / "zz_neo2" / "zz_neo2.py").read_text()


def test_port_donor_refusals(tmp_path, neo_model):
    base = [neo_model, "--start-from", WORKED_PORT, "--output-dir", tmp_path / "out", "--json"]
    flag = run_script("scaffold", *base, "--multi-device")
    assert flag.returncode == 3 and "applies to a native donor" in flag.json()["error"]
    # a renamed class would take a name the port already uses (its PerHeadLayerNorm class)
    clash = run_script("scaffold", *base, "--arch-name", "PerHeadLayerNormForCausalLM", "--slug", "zz_clash")
    assert clash.returncode == 2 and "PerHeadLayerNorm" in clash.json()["error"]
    bare = tmp_path / "zz_bare"
    shutil.copytree(WORKED_PORT, bare, ignore=shutil.ignore_patterns("__pycache__", port_layout.MANIFEST_NAME))
    missing = run_script("scaffold", neo_model, "--start-from", bare, "--output-dir", tmp_path / "out", "--json")
    assert missing.returncode == 3 and "has no scaffold_manifest.json" in missing.json()["error"]
    assert not (tmp_path / "out").exists()


def test_verified_ports_are_listed_beside_native_donors_in_their_own_field(tmp_path):
    result = run_script("list_native_archs", "--donors", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    (port,) = [p for p in doc["verified_ports"] if p["slug"] == "stablelm"]
    assert port["path"] == "templates/ports/stablelm" and port["donor"] == "llama3"
    assert {"layernorm", "partial_rotary", "parallel_block"} <= {i["signal"] for i in port["implements"]}
    assert port["verified"]["verdict"] == "MATCH"
    assert "stablelm" not in {d["slug"] for d in doc["donors"]}  # donors stays the native list --match guards
    assert run_script("list_native_archs", "--match", "StableLmForCausalLM").returncode == 1
    # a port without a verification record is not a verified port
    shutil.copytree(WORKED_PORT, tmp_path / "zz_unverified", ignore=shutil.ignore_patterns("__pycache__"))
    manifest = tmp_path / "zz_unverified" / port_layout.MANIFEST_NAME
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "verified"}))
    assert port_layout.verified_ports(tmp_path) == []


# --- built graph objects (imports MAX in one subprocess, no compile) -----------------------------------

# Builds each port's config and graph module as the pipeline model does (port_probe), and for the ports
# marked "check" also runs the import and traced dry-build smoke checks.
BUILD_DRIVER = r"""
import json, sys
import model_source, port_layout, port_probe
report = {}
for label, model, port_dir, check in json.loads(sys.argv[1]):
    port = port_layout.resolve_port_dir(port_dir)
    source = model_source.resolve(model, None)
    loaded = port_probe.load_port(port, source, "float32")
    graph = port_probe.build_graph(port, loaded, port_probe.adapted_state_dict(loaded, source))
    first = vars(graph.layers[0])
    entry = {"final_norm_eps": float(graph.norm.eps),
             "layer_norm_eps": sorted({float(v.eps) for v in first.values() if hasattr(v, "eps")})}
    if check:
        entry["checks"] = {name: port_probe.run_check(name, port, source, "float32")["passed"]
                           for name in ("import", "dry-build")}
    report[label] = entry
print(json.dumps(report))
"""

EDITED_EPS = 0.125
EPS_EDIT = '''

# Test edit of model_config.py only: every norm of the graph gets a new eps.
_finalize_before_edit = {cls}.finalize


def _finalize_with_edited_eps(self, *args, **kwargs):
    _finalize_before_edit(self, *args, **kwargs)
    self.rms_norm_eps = {eps}


{cls}.finalize = _finalize_with_edited_eps
'''


def _edit_eps(port: Path) -> None:
    config_class = json.loads((port / port_layout.MANIFEST_NAME).read_text())["config_wiring"]["config_class"]
    path = port / "model_config.py"
    path.write_text(path.read_text() + EPS_EDIT.format(cls=config_class, eps=EDITED_EPS))


def _unwire(port: Path) -> None:
    """Undo the scaffold's wiring (the pipeline builds Llama3Config again), as the scaffold once left it."""
    base = port / "llama3_model.py"
    base.write_text(base.read_text().replace("self.model_config_cls.initialize(", "Llama3Config.initialize("))
    model = port / "model.py"
    model.write_text("".join(line for line in model.read_text().splitlines(keepends=True)
                             if not line.strip().startswith(("model_config_cls = ", "config_class = "))))


def test_an_edit_of_model_config_reaches_the_built_graph_and_trimmed_ports_dry_build(tmp_path, checkpoint_factory):
    import subprocess
    import sys

    from conftest import SCRIPTS_DIR
    from hub_standin import subprocess_env

    runs = []
    for donor, model_type in (("llama3", "llama"), ("qwen2", "qwen2")):
        model = checkpoint_factory(model_type, tokenizer=False)
        for variant in ("plain", "edited", "unwired") if donor == "qwen2" else ("plain", "edited"):
            slug = f"zz_{donor}_{variant}"
            done = run_script("scaffold", model, "--start-from", donor, "--output-dir", tmp_path, "--slug", slug)
            assert done.returncode == 0, done.stderr
            if variant != "plain":
                _edit_eps(tmp_path / slug)
            if variant == "unwired":
                _unwire(tmp_path / slug)
            runs.append([f"{donor}_{variant}", str(model), str(tmp_path / slug), variant == "plain"])
    env = subprocess_env({"PYTHONPATH": str(SCRIPTS_DIR)})
    done = subprocess.run([sys.executable, "-c", BUILD_DRIVER, json.dumps(runs)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    for donor in ("llama3", "qwen2"):
        plain, edited = built[f"{donor}_plain"], built[f"{donor}_edited"]
        assert plain["checks"] == {"import": True, "dry-build": True}, donor  # the trimmed port imports and traces
        assert plain["final_norm_eps"] != EDITED_EPS
        assert edited["final_norm_eps"] == EDITED_EPS and edited["layer_norm_eps"] == [EDITED_EPS], donor
    # Control: without the wiring the same edit never reaches qwen2's graph, so this test can fail.
    assert built["qwen2_unwired"]["final_norm_eps"] == built["qwen2_plain"]["final_norm_eps"]


# --- scaffold --with NAME ...: building blocks copied into <port>/blocks/ -------------------------------------

BLOCKS_DIR = scaffold.SKILL_ROOT / "templates" / "blocks"
WITH_BLOCKS = ("attention", "norms", "mlp")


def inherited_blocks(donor, reselected) -> list[str]:
    """Names of the blocks a port donor brings along that ``--with`` does not name again (they come first)."""
    manifest_path = Path(donor) / port_layout.MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    return [b["name"] for b in json.loads(manifest_path.read_text()).get("blocks", []) if b["name"] not in reselected]


@pytest.mark.parametrize("start_from", [WORKED_PORT, "llama3"], ids=["port", "native"])
def test_with_copies_the_named_blocks_and_records_them(tmp_path, neo_model, start_from):
    import hashlib

    result = run_script("scaffold", neo_model, "--start-from", start_from, "--output-dir", tmp_path,
                        "--slug", "zz_blocks", "--with", *WITH_BLOCKS, "norms", "--json")
    assert result.returncode == 0, result.stderr
    port = tmp_path / "zz_blocks"
    library = {row["name"]: row for row in scaffold.block_catalog().catalog()}
    manifest = json.loads((port / port_layout.MANIFEST_NAME).read_text())
    assert manifest["blocks"] == result.json()["blocks"]
    inherited = inherited_blocks(start_from, WITH_BLOCKS)  # the worked port's own blocks stay, as copied
    # --with order kept, the repeat dropped, a re-named inherited block replaced by the library's file
    assert [b["name"] for b in manifest["blocks"]] == inherited + list(WITH_BLOCKS)
    for block in manifest["blocks"]:
        if block["name"] in inherited:
            assert (port / block["file"]).read_bytes() == (Path(start_from) / block["file"]).read_bytes()
            continue
        row = library[block["name"]]
        assert block["file"] == f"blocks/{row['file']}" and block["version"] == row["version"]
        copy = (port / block["file"]).read_bytes()
        assert copy == (BLOCKS_DIR / row["file"]).read_bytes()
        assert block["sha256"] == row["sha256"] == hashlib.sha256(copy).hexdigest()
    assert sorted(p.name for p in (port / "blocks").iterdir()) == sorted(
        ["__init__.py", *(library[n]["file"] for n in inherited + list(WITH_BLOCKS))])
    init = (port / "blocks" / "__init__.py").read_text()
    assert ast.get_docstring(ast.parse(init)) and all(f"- {n}: blocks/" in init for n in WITH_BLOCKS)
    listed = {f["path"]: f for f in manifest["files"]}
    assert listed["blocks/norms.py"]["source"] == "templates/blocks/norms.py"
    assert listed["blocks/__init__.py"]["source"] is None
    # the copies import as the port's own subpackage (relative imports only; no skill module needed)
    for block in manifest["blocks"]:
        tree = ast.parse((port / block["file"]).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 1], block["file"]


def test_without_with_there_is_no_blocks_folder(tmp_path, neo_model):
    result = run_script("scaffold", neo_model, "--start-from", "llama3", "--output-dir", tmp_path,
                        "--slug", "zz_plain", "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["blocks"] == [] and not (tmp_path / "zz_plain" / "blocks").exists()


def test_without_with_a_port_donor_brings_its_blocks(tmp_path, neo_model):
    result = run_script("scaffold", neo_model, "--start-from", WORKED_PORT, "--output-dir", tmp_path,
                        "--slug", "zz_plain", "--json")
    assert result.returncode == 0, result.stderr
    names = [b["name"] for b in result.json()["blocks"]]
    assert names and names == inherited_blocks(WORKED_PORT, ())
    for block in result.json()["blocks"]:
        assert (tmp_path / "zz_plain" / block["file"]).read_bytes() == (WORKED_PORT / block["file"]).read_bytes()


def test_with_dry_run_lists_the_blocks_and_writes_nothing(tmp_path, neo_model):
    out = tmp_path / "out"
    result = run_script("scaffold", neo_model, "--start-from", WORKED_PORT, "--output-dir", out, "--slug", "zz_dry",
                        "--with", "moe", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "blocks/moe.py" in result.stdout and "blocks/__init__.py" in result.stdout
    blocks_line = next(line for line in result.stdout.splitlines() if line.startswith("blocks: "))
    assert [entry.split()[0] for entry in blocks_line[len("blocks: "):].split(", ")] == [
        *inherited_blocks(WORKED_PORT, ("moe",)), "moe"]
    assert not (out / "zz_dry").exists()


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
def test_unknown_block_is_a_one_line_exit_3_before_anything_is_written(tmp_path, neo_model, json_flag):
    out = tmp_path / "out"
    result = run_script("scaffold", neo_model, "--start-from", WORKED_PORT, "--output-dir", out, "--slug", "zz_bad",
                        "--with", "norms", "no_such_block", *(["--json"] if json_flag else []))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    known = [b["name"] for b in scaffold.block_catalog().catalog()]
    assert "'no_such_block'" in lines[0] and all(name in lines[0] for name in known)
    if json_flag:
        assert result.json()["exit_code"] == 3 and "no_such_block" in result.json()["error"]
    assert not out.exists()


def test_a_slug_named_like_the_blocks_folder_is_refused(tmp_path, neo_model):
    out = tmp_path / "out"
    result = run_script("scaffold", neo_model, "--start-from", "llama3", "--output-dir", out, "--slug", "blocks",
                        "--with", "norms")
    assert result.returncode == 3 and "already has a module blocks.py" in result.stderr
    assert not (out / "blocks").exists()


def test_a_port_of_a_port_with_blocks_keeps_them_verbatim_and_recorded(tmp_path, neo_model):
    first = run_script("scaffold", neo_model, "--start-from", WORKED_PORT, "--output-dir", tmp_path / "a",
                       "--slug", "zz_first", "--with", "norms", "mlp", "--json")
    assert first.returncode == 0, first.stderr
    second = run_script("scaffold", neo_model, "--start-from", tmp_path / "a" / "zz_first", "--output-dir",
                        tmp_path / "b", "--slug", "zz_second", "--with", "moe", "--json")
    assert second.returncode == 0, second.stderr
    port = tmp_path / "b" / "zz_second"
    library = {row["name"]: row for row in scaffold.block_catalog().catalog()}
    blocks = second.json()["blocks"]
    from_worked = inherited_blocks(WORKED_PORT, ("norms", "mlp"))
    assert [b["name"] for b in blocks] == [*from_worked, "norms", "mlp", "moe"]
    first_port = tmp_path / "a" / "zz_first"
    for block in blocks:  # the lineage paragraph and renames of a port copy never touch a block file
        if block["name"] in from_worked:
            assert (port / block["file"]).read_bytes() == (first_port / block["file"]).read_bytes()
            continue
        assert (port / block["file"]).read_bytes() == (BLOCKS_DIR / library[block["name"]]["file"]).read_bytes()
        assert block["sha256"] == library[block["name"]]["sha256"]
    norms = next(b for b in blocks if b["name"] == "norms")
    assert norms["source"].endswith("zz_first/blocks/norms.py")
