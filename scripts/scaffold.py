"""Copy a native MAX architecture into a new, editable port package DIR/<slug>/ for MODEL.

The port owns a copy of every MAX architecture module the donor uses, including
the graph classes a donor borrows from another family (phi3, granite, qwen2 and
olmo borrow llama3's), so ``<slug>.py`` is always the graph MAX compiles. Imports
are rewritten to point at the copies, weights load strictly (only the computed
buffers in ``computed_buffers.py`` may be absent or extra), ``arch.py`` is
renamed to the checkpoint's architecture with float32 always supported, and each
module docstring says what the module is, which donor file it came from, and
which deltas are still TODO. Serve the result with
``max serve --custom-architectures DIR/<slug>``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cli_support
import input_files
import model_source
import port_layout
from cli_support import ScriptError
from import_rewrite import (
    ARCH_PACKAGE,
    ModuleIndex,
    SourceModule,
    architecture_imports,
    relative_prefix,
    replace_spans,
    rewrite_imports,
)

EXIT_CODES = {
    1: "not used",
    2: "the donor cannot become a runnable port (an import the rewrite cannot handle)",
}

ALLOWLIST_MODULE = "computed_buffers"

ROLE_TEXT = {
    "__init__": "Package of the {arch} port; exports ARCHITECTURES for max serve --custom-architectures.",
    "arch": "Registers the {arch} port with MAX (its SupportedArchitecture).",
    "model_config": "Config of the {arch} port: turns the Hugging Face config into the graph's settings.",
    "model": "Pipeline model of the {arch} port: loads the weights (strictly) and builds the graph.",
    "weight_adapters": "Weight adapter of the {arch} port: maps checkpoint tensor names to graph weight names.",
    "graph": "Graph of the {arch} port: the decoder MAX compiles and runs for this architecture.",
}

ALLOWLIST_SOURCE = '''"""Computed buffers the {arch} port may leave out of strict weight loading.

Written by scaffold.py (not copied from MAX). The port loads weights with
strict=True: a checkpoint tensor the graph does not declare, or a graph weight
the checkpoint lacks, is an error instead of a silent zero fill. Only the
buffers below, which MAX computes itself, are dropped before loading.

TODO deltas: add a suffix only for a buffer the graph computes at build time.
"""

from __future__ import annotations

from typing import Any

# Name suffixes of tensors MAX recomputes, so checkpoints may or may not carry them.
COMPUTED_BUFFER_SUFFIXES = (
    "rope_freqs.weight",  # GGUF rope frequencies; MAX builds RoPE from the config
    "rotary_emb.inv_freq",  # older HF checkpoints saved the RoPE inverse frequencies
)


def is_computed_buffer(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in COMPUTED_BUFFER_SUFFIXES)


def drop_computed_buffers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict without the allowlisted computed buffers."""
    return {{name: value for name, value in state_dict.items() if not is_computed_buffer(name)}}
'''


@dataclass
class PortFile:
    """One file of the port: where it goes, where it came from, what was changed."""

    path: str  # relative to the port folder
    source: str | None  # MAX source file (relative to the max package), None when generated
    role: str
    import_changes: list[str] = field(default_factory=list)
    strict_loads: int = 0


@dataclass
class PortPlan:
    """Everything the scaffold will write, before anything is written."""

    slug: str
    arch_name: str
    donor: str
    default_encoding: str
    supported_encodings: list[str]
    port_dir: str
    files: list[PortFile]
    texts: dict[str, str]
    borrowed_families: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--start-from", required=True, metavar="DONOR",
                        help="native MAX architecture folder to copy (e.g. llama3, olmo2, phi3; see list-archs)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="folder that will hold the port package DIR/<slug>/")
    parser.add_argument("--slug", default=None,
                        help="package name of the port (default: derived from the model name)")
    parser.add_argument("--arch-name", default=None,
                        help="architecture name to register (default: architectures[0] of config.json)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DIR/<slug>, moving it to DIR/<slug>.bak-<timestamp> first")
    parser.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    for flag, value in (("--slug", args.slug), ("--arch-name", args.arch_name)):
        if value is not None and not value.strip():
            raise ScriptError(f"{flag} is empty; give a name or leave the flag out")
    output_dir = input_files.check_output_dir(args.output_dir, "--output-dir")
    check_not_in_skill(output_dir)
    source = model_source.resolve(args.model, args.revision)
    config = model_source.read_config(source)
    arch_name = args.arch_name if args.arch_name is not None else config["architectures"][0]
    if not (arch_name.isascii() and arch_name.isidentifier()):
        raise ScriptError(f"architecture name {arch_name!r} is not a valid identifier (ASCII letters, digits and _)")
    index = ModuleIndex(ARCH_PACKAGE, Path(cli_support.max_package_dir()) / "pipelines" / "architectures")
    cli_support.warn_if_untested_max()
    donor = args.start_from.strip().strip("/")
    donor_pkg = index.find(f"{ARCH_PACKAGE}.{donor}") if donor.isidentifier() else None
    if donor_pkg is None or not donor_pkg.is_package or not (donor_pkg.path.parent / "arch.py").is_file():
        raise ScriptError(f"--start-from {args.start_from!r} is not a MAX architecture folder with an arch.py "
                          "(run list-archs for the native ones)")
    slug = args.slug if args.slug is not None else port_layout.slug_from_name(source.name)
    port_dir = output_dir / slug
    mapping_preview = plan_mapping(index, donor, slug)
    problem = port_layout.slug_problem(slug, reserved=reserved_names(mapping_preview, slug))
    if problem:
        raise ScriptError(problem + " (choose another with --slug)")
    if source.local_dir is not None:
        input_files.check_not_inside(port_dir, Path(source.local_dir), "the port folder", "model folder")
    if (port_dir.exists() or port_dir.is_symlink()) and not args.force:
        raise ScriptError(f"{port_dir} already exists; pass --force to move it to a timestamped backup")
    encoding = default_encoding(source, config)
    try:
        plan = build_plan(index, donor, slug, arch_name, encoding, source, mapping_preview)
    except ValueError as exc:
        return cli_support.report_error(f"cannot scaffold from {donor}: {exc}", args, 2)
    plan.port_dir = str(port_dir)
    backup = None
    if not args.dry_run:
        backup = write_port(plan, port_dir)
    report(plan, args, backup)
    return 0


# Folders of the skill itself that a port must not be written into: the scripts folder is first on every
# script's sys.path (a port there would shadow modules), and the docs are the skill's own text.
SKILL_ROOT = Path(__file__).resolve().parent.parent
SKILL_FOLDERS = ("scripts", "references", "templates")


def check_not_in_skill(output_dir: Path) -> None:
    """Refuse ``--output-dir`` at the skill root itself or inside one of its own folders."""
    if output_dir == SKILL_ROOT:
        raise ScriptError(f"--output-dir {output_dir} is the skill's own root folder; choose another folder")
    for name in SKILL_FOLDERS:
        folder = SKILL_ROOT / name
        if output_dir == folder or folder in output_dir.parents:
            raise ScriptError(f"--output-dir {output_dir} lies in the skill's {name} folder; choose another folder")


def plan_mapping(index: ModuleIndex, donor: str, slug: str) -> dict[str, str]:
    """Source module name -> port module name for the donor and every architecture module it reaches."""
    donor_pkg = f"{ARCH_PACKAGE}.{donor}"
    donor_modules = index.package_modules(donor_pkg)
    mapping: dict[str, str] = {}
    for module in donor_modules:
        rel = module.name[len(donor_pkg):].lstrip(".")
        mapping[module.name] = slug if rel == donor else rel
    has_graph = f"{donor_pkg}.{donor}" in mapping
    queue = list(donor_modules)
    seen = {m.name for m in donor_modules}
    borrowed: list[SourceModule] = []
    while queue:
        module = queue.pop(0)
        for name in sorted(architecture_imports(module, index)):
            found = index.find(name)
            if name in seen or found is None or found.is_package:
                continue  # package inits of other families are not copied; their imports stay absolute
            seen.add(name)
            borrowed.append(found)
            queue.append(found)
    taken = set(mapping.values())
    for module in borrowed:
        family, _, rel = module.name[len(ARCH_PACKAGE) + 1:].partition(".")
        if rel == family:
            target = slug if not has_graph and slug not in taken else f"{family}_graph"
        else:
            target = rel.replace(".", "_")
            if target in taken:
                target = f"{family}_{target}"
        taken.add(target)
        mapping[module.name] = target
    return mapping


def reserved_names(mapping: dict[str, str], slug: str) -> tuple[str, ...]:
    """Port module names the slug must not take: every copied module's name, and the slug itself when a module
    other than one graph module (``<family>.<family>``) would be written to ``<slug>.py``."""
    names = {port_name for port_name in mapping.values() if port_name and port_name != slug}
    at_slug = [source_name for source_name, port_name in mapping.items() if port_name == slug]
    if len(at_slug) > 1 or (at_slug and not _is_family_graph(at_slug[0])):
        names.add(slug)
    return tuple(sorted(names))


def _is_family_graph(source_name: str) -> bool:
    parts = source_name[len(ARCH_PACKAGE) + 1:].split(".")
    return len(parts) == 2 and parts[0] == parts[1]


def default_encoding(source: model_source.ModelSource, config: dict) -> str:
    """The encoding matching the checkpoint's dtype; float32 when it is not a float dtype MAX serves."""
    return port_layout.checkpoint_encoding(source, config)[0] or "float32"


def build_plan(index: ModuleIndex, donor: str, slug: str, arch_name: str, encoding: str,
               source: model_source.ModelSource, mapping: dict[str, str]) -> PortPlan:
    max_root = Path(cli_support.max_package_dir())
    files: list[PortFile] = []
    texts: dict[str, str] = {}
    donor_supported = donor_encodings(index, mapping)
    supported = sorted(set(donor_supported) | {"float32", encoding})
    for name, port_name in sorted(mapping.items(), key=lambda kv: kv[1]):
        module = index.find(name)
        assert module is not None
        rel_path = _port_path(port_name, module.is_package)
        text = module.path.read_text(encoding="utf-8")
        result = rewrite_imports(text, module, port_name, mapping, index)
        text = result.text
        text, strict_loads = make_loading_strict(text, port_name, module.is_package)
        role = role_of(port_name, slug, module.is_package)
        if port_name == "arch":
            text = edit_arch(text, arch_name, encoding, supported, source)
        if port_name == "" and module.is_package:
            text = add_architectures_export(text, mapping, index)
        text = set_module_docstring(text, role, arch_name, module.path.relative_to(max_root.parent), donor,
                                    slug)
        files.append(PortFile(rel_path, str(module.path.relative_to(max_root.parent)), role,
                              result.changes, strict_loads))
        texts[rel_path] = text
    allow_path = f"{ALLOWLIST_MODULE}.py"
    texts[allow_path] = ALLOWLIST_SOURCE.format(arch=arch_name)
    files.append(PortFile(allow_path, None, "computed-buffer allowlist"))
    families = sorted({n[len(ARCH_PACKAGE) + 1:].split(".")[0] for n in mapping} - {donor})
    return PortPlan(slug, arch_name, donor, encoding, supported, "", files, texts, families)


def _port_path(port_name: str, is_package: bool) -> str:
    base = port_name.replace(".", "/")
    if is_package:
        return f"{base}/__init__.py" if base else "__init__.py"
    return f"{base}.py"


def role_of(port_name: str, slug: str, is_package: bool) -> str:
    if is_package:
        return "__init__" if port_name == "" else "subpackage"
    if port_name == slug:
        return "graph"
    return port_name if port_name in ROLE_TEXT else "helper"


def donor_encodings(index: ModuleIndex, mapping: dict[str, str]) -> list[str]:
    """The donor's supported encodings: arch.py's literal set, or the config class's literal it names."""
    modules = {name: index.find(name) for name in mapping}
    trees = {name: ast.parse(m.path.read_text(encoding="utf-8")) for name, m in modules.items() if m}
    arch_name = next(n for n, p in mapping.items() if p == "arch")
    value = next((kw.value for kw in ast.walk(trees[arch_name])
                  if isinstance(kw, ast.keyword) and kw.arg == "supported_encodings"), None)
    if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name):
        value = _class_attribute(trees.values(), value.value.id, value.attr)
    if isinstance(value, (ast.Set, ast.List, ast.Tuple)):
        return sorted(e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return []


def _class_attribute(trees, class_name: str, attribute: str) -> ast.expr | None:
    """The value assigned to ``attribute`` in the body of class ``class_name`` (or a base it names)."""
    for tree in trees:
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ClassDef) and node.name == class_name):
                continue
            for stmt in node.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) else None)
                if isinstance(target, ast.Name) and target.id == attribute:
                    return stmt.value  # type: ignore[union-attr]
            for base in node.bases:
                if isinstance(base, ast.Name):
                    found = _class_attribute(trees, base.id, attribute)
                    if found is not None:
                        return found
    return None


def make_loading_strict(text: str, port_name: str, is_package: bool) -> tuple[str, int]:
    """Every ``.load_state_dict(sd, ..., strict=False)`` -> strict, minus the allowlisted buffers."""
    tree = ast.parse(text)
    edits: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load_state_dict" and node.args):
            continue
        first = node.args[0]
        segment = ast.get_source_segment(text, first)
        edits.append((first, f"drop_computed_buffers({segment})"))
        for kw in node.keywords:
            if kw.arg == "strict":
                edits.append((kw.value, "True"))
    if not edits:
        return text, 0
    text = replace_spans(text, edits)
    dots = relative_prefix(port_name, is_package)
    text = insert_after_imports(text, f"from {dots}{ALLOWLIST_MODULE} import drop_computed_buffers\n")
    return text, sum(1 for _, new in edits if new.startswith("drop_computed_buffers("))


def insert_after_imports(text: str, line: str) -> str:
    """Insert a line after the last top-level import statement."""
    tree = ast.parse(text)
    last = None
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            last = node
        elif last is not None:
            break
    lines = text.splitlines(keepends=True)
    at = last.end_lineno if last is not None else 0  # type: ignore[union-attr]
    lines.insert(at, line)
    return "".join(lines)


def edit_arch(text: str, arch_name: str, encoding: str, supported: list[str],
              source: model_source.ModelSource) -> str:
    tree = ast.parse(text)
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "SupportedArchitecture"), None)
    if call is None:
        raise ValueError("the donor's arch.py has no SupportedArchitecture(...) call")
    repo_ids = [] if source.is_local else [source.repo_id]
    new_values = {
        "name": json.dumps(arch_name),
        "default_encoding": json.dumps(encoding),
        "supported_encodings": "{" + ", ".join(json.dumps(e) for e in supported) + "}",
        "example_repo_ids": json.dumps(repo_ids),
    }
    edits: list[tuple[ast.AST, str]] = []
    for kw in call.keywords:
        if kw.arg in new_values:
            edits.append((kw.value, new_values.pop(kw.arg)))
    if "name" in new_values:
        raise ValueError("the donor's SupportedArchitecture(...) has no name= keyword")
    return replace_spans(text, edits)


def add_architectures_export(text: str, mapping: dict[str, str], index: ModuleIndex) -> str:
    """Append ``ARCHITECTURES = [<arch variable>]`` to the port's ``__init__.py``."""
    arch_module = next(n for n, p in mapping.items() if p == "arch")
    found = index.find(arch_module)
    assert found is not None
    tree = ast.parse(found.path.read_text(encoding="utf-8"))
    variable = None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "SupportedArchitecture"):
            variable = node.targets[0].id  # type: ignore[attr-defined]
    if variable is None:
        raise ValueError("cannot find the SupportedArchitecture variable in the donor's arch.py")
    return text.rstrip("\n") + f"\n\nfrom .arch import {variable}  # noqa: E402\n\nARCHITECTURES = [{variable}]\n"


LINEAGE_MARKER = "[audit-ok: lineage written by scaffold]"


def set_module_docstring(text: str, role: str, arch_name: str, donor_file: Path, donor: str,
                         slug: str) -> str:
    """Replace (or add) the module docstring with the three-part form; license comments stay."""
    role_line = ROLE_TEXT.get(role, "Module of the {arch} port, copied from MAX with the rest of the donor.")
    if role == "subpackage":
        role_line = "Subpackage of the {arch} port, copied from MAX with the rest of the donor."
    if role == "helper" and builds_own_graph(text, slug):
        role_line += (f"\nMulti-device runs build the graph defined here, not {slug}.py: mirror every graph edit\n"
                      f"here, or set multi_gpu_supported=False in arch.py. {LINEAGE_MARKER}")
    # The lineage lines are true by construction, so they carry the audit's OK marker.
    body = (
        f"{role_line.format(arch=arch_name)}\n\n"
        f"Derived from {donor_file.as_posix()} (MAX {cli_support.max_version()}). {LINEAGE_MARKER}\n"
        f"Copied by scaffold.py from donor {donor!r}; imports point at this port's copies. {LINEAGE_MARKER}\n\n"
        f"TODO deltas: none recorded yet. List here each way {arch_name} differs from the donor once this\n"
        f"module implements it, and remove claims about the donor that no longer hold.\n"
    )
    docstring = '"""' + body + '"""'
    tree = ast.parse(text)
    first = tree.body[0] if tree.body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return replace_spans(text, [(first, docstring)])
    lines = text.splitlines(keepends=True)
    at = first.lineno - 1 if first is not None else len(lines)
    lines.insert(at, docstring + "\n\n")
    return "".join(lines)


def builds_own_graph(text: str, slug: str) -> bool:
    """True when a module defines a Transformer-like graph class of its own (e.g. the tensor-parallel one)."""
    tree = ast.parse(text)
    imports_slug_graph = any(isinstance(n, ast.ImportFrom) and n.module == slug for n in ast.walk(tree))
    return not imports_slug_graph and any(
        isinstance(n, ast.ClassDef) and any(getattr(b, "id", "").endswith("Transformer") for b in n.bases)
        for n in ast.walk(tree))


def write_port(plan: PortPlan, port_dir: Path) -> str | None:
    """Write into a staging folder of this run's own, then move it into place (backing up an existing port).

    The staging folder is a fresh ``tempfile.mkdtemp`` in the output folder, so nothing another run (or the
    user) left there is touched; on any failure this run removes its staging folder and the output folders it
    created, and nothing else.
    """
    staging, created = input_files.make_staging_dir(port_dir, f".{plan.slug}.scaffold-", "--output-dir")
    try:
        for rel_path, text in plan.texts.items():
            target = staging / rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        (staging / port_layout.MANIFEST_NAME).write_text(json.dumps(manifest(plan, None), indent=2) + "\n",
                                                        encoding="utf-8")
        replace = port_dir.exists() or port_dir.is_symlink()
        backup = input_files.move_into_place(staging, port_dir, replace)
    except OSError as exc:
        input_files.discard_staging(staging, created)
        raise ScriptError(f"cannot write the port {port_dir}: {exc.strerror or exc}") from None
    except BaseException:
        input_files.discard_staging(staging, created)
        raise
    return None if backup is None else str(backup)


def manifest(plan: PortPlan, backup: str | None, dry_run: bool = False) -> dict:
    return {
        "port_dir": plan.port_dir,
        "slug": plan.slug,
        "arch_name": plan.arch_name,
        "donor": plan.donor,
        "borrowed_families": plan.borrowed_families,
        "default_encoding": plan.default_encoding,
        "supported_encodings": plan.supported_encodings,
        "graph_module": f"{plan.slug}.py",
        "custom_architectures": plan.port_dir,
        "files": [asdict(f) for f in plan.files],
        "backup": backup,
        "dry_run": dry_run,
    }


def report(plan: PortPlan, args: argparse.Namespace, backup: str | None) -> None:
    document = manifest(plan, backup, args.dry_run)
    if args.json:
        cli_support.print_json(document)
        return
    verb = "would write" if args.dry_run else "wrote"
    print(f"{verb} {plan.port_dir} ({len(plan.files)} files) from donor {plan.donor}")
    for f in plan.files:
        origin = f"<- {f.source}" if f.source else "(generated)"
        extra = f", {len(f.import_changes)} imports rewritten" if f.import_changes else ""
        strict = f", {f.strict_loads} strict load(s)" if f.strict_loads else ""
        print(f"  {f.path:28s} {origin}{extra}{strict}")
    print(f"architecture {plan.arch_name}, default encoding {plan.default_encoding}, "
          f"supported {', '.join(plan.supported_encodings)}")
    if backup:
        print(f"previous port moved to {backup}")
    if not args.dry_run:
        print(f"serve: max serve --model-path {args.model} --custom-architectures {plan.port_dir} "
              f"--devices cpu --quantization-encoding float32")


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
