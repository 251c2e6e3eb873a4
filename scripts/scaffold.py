"""Copy a native MAX architecture, or a verified port, into a new editable port package DIR/<slug>/ for MODEL.

From a native slug (``--start-from llama3``) the port owns a copy of every MAX
architecture module the donor uses, including the graph classes a donor borrows
from another family (phi3, granite, qwen2 and olmo borrow llama3's), so
``<slug>.py`` is always the graph MAX compiles. Imports are rewritten to point
at the copies, weights load strictly (only the computed buffers in
``computed_buffers.py`` may be absent or extra), ``arch.py`` is renamed to the
checkpoint's architecture with float32 always supported, and each module
docstring says what the module is, which donor file it came from, and which
deltas are still TODO. The copy is single-device: multi-device graphs and
expert-parallel batch processors come only with ``--multi-device``, GGUF and
GPTQ adapters only with ``--keep-adapters``.

From a port folder (``--start-from templates/ports/stablelm``, any folder with a
``scaffold_manifest.json``) the port's files are copied with its classes, slug
and architecture name renamed, and the manifest records the lineage.

``--with NAME ...`` also copies the named building blocks of templates/blocks
(catalog names: norms, attention, ...) into ``<port>/blocks/`` with an
``__init__.py``; the manifest records each block's name, file, version and
sha256, so a later check can tell a copy that drifted from the library.

Either way the pipeline model builds its graph from the config class
``arch.py`` registers (the one ``model_config.py`` defines), and config-class
encoding defaults agree with ``arch.py``. Serve the result with
``max serve --custom-architectures DIR/<slug>``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
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
    Renames,
    SourceModule,
    architecture_imports,
    insert_after_imports,
    imports_of_modules,
    relative_prefix,
    remove_import_names,
    remove_unused_definitions,
    rename_source,
    replace_spans,
    rewrite_imports,
    stub_functions_using,
    top_level_definitions,
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
    donor: str  # the native family at the root of the lineage (what the audit calls the donor)
    default_encoding: str
    supported_encodings: list[str]
    port_dir: str
    files: list[PortFile]
    texts: dict[str, str]
    borrowed_families: list[str]
    start_from: dict = field(default_factory=dict)  # kind native|port, slug, path (and arch_name for a port)
    lineage: list[dict] = field(default_factory=list)  # oldest first, start_from last
    renames: dict[str, str] = field(default_factory=dict)
    trimmed: list[dict] = field(default_factory=list)  # what was left out, why, and the flag that keeps it
    dropped_encodings: dict = field(default_factory=dict)  # donor encodings the checkpoint cannot serve, and why
    config_wiring: dict = field(default_factory=dict)
    implements: list[dict] = field(default_factory=list)  # inherited from a port donor, to re-check
    model_type: str | None = None  # the target's config.json model_type (its own family name for the audit)
    blocks: list[dict] = field(default_factory=list)  # copied building blocks: name, file, version, sha256


# Module leaf names (after any family prefix) of multi-device graphs: copied only with --multi-device.
MULTI_DEVICE_MODULE = re.compile(r"(^|_)(distributed|data_parallel|pipeline_parallel)(_|$)")
# Class names of expert-parallel batch processors (``Llama3EpBatchProcessor``): copied only with --multi-device.
EXPERT_PARALLEL_CLASS = re.compile(r"(Ep|ExpertParallel)(?=[A-Z])")
# Top-level names of non-safetensors weight paths (GGUF files, GPTQ checkpoints): copied only with --keep-adapters.
NON_SAFETENSORS_NAME = re.compile(r"gguf|gptq", re.IGNORECASE)
# Encodings served only through those paths (GGUF block quantizations and GPTQ), dropped with them.
NON_SAFETENSORS_ENCODINGS = frozenset({"q4_0", "q4_k", "q6_k", "gptq"})
# Encodings a float safetensors checkpoint can be served in (MAX casts float weights between them). A donor's
# quantized safetensors encodings (float8_e4m3fn, float4_e2m1fnx2...) need weights quantized that way: for a
# float checkpoint they are dropped (the dogfood port declared llama3's fp8/fp4 ones it could never load).
FLOAT_WEIGHT_ENCODINGS = frozenset(port_layout.FLOAT_ENCODINGS.values())
# Names of functions that build only a multi-device graph: their bodies become a raise when the graph is left out.
MULTI_DEVICE_FUNCTION = re.compile(r"data_parallel|tensor_parallel|distributed|multi_device|pipeline_parallel")
TRIM_MESSAGE = ("not copied: the scaffold is single-device by default; rescaffold with --multi-device to keep "
                "the multi-device graphs")
# Suffixes of architecture names; what precedes one is the class-name prefix (StableLmForCausalLM -> StableLm).
ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "Model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--start-from", required=True, metavar="DONOR",
                        help="native MAX architecture slug to copy (e.g. llama3, olmo2, phi3), or a port folder "
                             "holding scaffold_manifest.json (e.g. templates/ports/stablelm); see list-archs --donors")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="folder that will hold the port package DIR/<slug>/")
    parser.add_argument("--slug", default=None,
                        help="package name of the port (default: the config's model_type, else the model's name)")
    parser.add_argument("--arch-name", default=None,
                        help="architecture name to register (default: architectures[0] of config.json)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DIR/<slug>, moving it to DIR/<slug>.bak-<timestamp> first")
    parser.add_argument("--multi-device", action="store_true",
                        help="also copy the native donor's multi-device graphs and expert-parallel batch processors")
    parser.add_argument("--keep-adapters", action="store_true",
                        help="also copy the native donor's GGUF and GPTQ weight paths and their encodings")
    parser.add_argument("--with", dest="with_blocks", nargs="+", default=[], metavar="NAME",
                        help="also copy these building blocks of templates/blocks (catalog names, e.g. norms "
                             "attention mlp) into <port>/blocks/, recorded in the manifest")
    parser.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    for flag, value in (("--slug", args.slug), ("--arch-name", args.arch_name)):
        if value is not None and not value.strip():
            raise ScriptError(f"{flag} is empty; give a name or leave the flag out")
    blocks = selected_blocks(getattr(args, "with_blocks", None) or [])  # callers may build args by hand
    output_dir = input_files.check_output_dir(args.output_dir, "--output-dir")
    check_not_in_skill(output_dir)
    port_donor = None
    if port_layout.looks_like_port_folder(args.start_from):
        port_donor = port_layout.read_port_donor(args.start_from)
        for flag, on in (("--multi-device", args.multi_device), ("--keep-adapters", args.keep_adapters)):
            if on:
                raise ScriptError(f"{flag} applies to a native donor; a port folder is copied as it is")
    source = model_source.resolve(args.model, args.revision)
    config = model_source.read_config(source)
    arch_name = args.arch_name if args.arch_name is not None else config["architectures"][0]
    if not (arch_name.isascii() and arch_name.isidentifier()):
        raise ScriptError(f"architecture name {arch_name!r} is not a valid identifier (ASCII letters, digits and _)")
    index = ModuleIndex(ARCH_PACKAGE, Path(cli_support.max_package_dir()) / "pipelines" / "architectures")
    cli_support.warn_if_untested_max()
    slug = args.slug if args.slug is not None else port_layout.default_slug(config, source.name)
    port_dir = output_dir / slug
    if port_donor is not None:
        reserved = port_reserved_names(port_donor, slug)
    else:
        donor = args.start_from.strip().strip("/")
        donor_pkg = index.find(f"{ARCH_PACKAGE}.{donor}") if donor.isidentifier() else None
        if donor_pkg is None or not donor_pkg.is_package or not (donor_pkg.path.parent / "arch.py").is_file():
            raise ScriptError(f"--start-from {args.start_from!r} is neither a MAX architecture folder with an arch.py "
                              "nor a port folder (run list-archs --donors for both kinds)")
        mapping_preview = plan_mapping(index, donor, slug, multi_device=args.multi_device)
        # The full copy's module names stay reserved too, so the same slug works with --multi-device.
        reserved = tuple(sorted(set(reserved_names(mapping_preview, slug))
                                | set(reserved_names(plan_mapping(index, donor, slug, multi_device=True), slug))))
    problem = port_layout.slug_problem(slug, reserved=reserved)
    if problem:
        raise ScriptError(problem + " (choose another with --slug)")
    if source.local_dir is not None:
        input_files.check_not_inside(port_dir, Path(source.local_dir), "the port folder", "model folder")
    if port_donor is not None and port_dir.resolve() == port_donor.path:
        raise ScriptError(f"--output-dir and --slug name the donor port {port_donor.path} itself; choose another")
    if (port_dir.exists() or port_dir.is_symlink()) and not args.force:
        raise ScriptError(f"{port_dir} already exists; pass --force to move it to a timestamped backup")
    found = port_layout.checkpoint_encoding(source, config)  # reads the safetensors headers once
    encoding = default_encoding(found)
    float_checkpoint = is_float_checkpoint(config, found)
    try:
        if port_donor is not None:
            plan = build_port_plan(port_donor, slug, arch_name, encoding, source, float_checkpoint=float_checkpoint)
        else:
            plan = build_plan(index, donor, slug, arch_name, encoding, source, mapping_preview,
                              multi_device=args.multi_device, keep_adapters=args.keep_adapters,
                              float_checkpoint=float_checkpoint)
    except ValueError as exc:
        return cli_support.report_error(f"cannot scaffold from {args.start_from}: {exc}", args, 2)
    if port_donor is not None:
        inherit_blocks(plan, port_donor)
    add_blocks(plan, blocks)
    plan.port_dir = str(port_dir)
    plan.model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
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


def is_multi_device_module(name: str) -> bool:
    """True for a module holding a multi-device graph (``distributed_llama``, ``data_parallel_llama``)."""
    return bool(MULTI_DEVICE_MODULE.search(name.rpartition(".")[2]))


def plan_mapping(index: ModuleIndex, donor: str, slug: str, *, multi_device: bool = False) -> dict[str, str]:
    """Source module name -> port module name for the donor and every architecture module it reaches.

    Without ``multi_device`` the multi-device graph modules are left out, and so is whatever only they reach.
    """
    donor_pkg = f"{ARCH_PACKAGE}.{donor}"
    donor_modules = [m for m in index.package_modules(donor_pkg)
                     if multi_device or not is_multi_device_module(m.name)]
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
            if not multi_device and is_multi_device_module(name):
                continue
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


def default_encoding(found: tuple[str | None, str]) -> str:
    """The encoding matching the checkpoint's dtype (``port_layout.checkpoint_encoding``'s answer); float32
    when it is not a float dtype MAX serves."""
    return found[0] or "float32"


def is_float_checkpoint(config: dict, found: tuple[str | None, str]) -> bool:
    """True unless the config has a ``quantization_config`` or the dominant tensor dtype (``found``, from
    ``port_layout.checkpoint_encoding``) is not a float one."""
    if "quantization_config" in config or "quantization_config" in model_source.text_config(config):
        return False
    encoding, origin = found
    return encoding is not None or not origin.startswith(port_layout.TENSOR_DTYPE_ORIGIN)


def served_encodings(declared: list[str] | tuple[str, ...], encoding: str,
                     float_checkpoint: bool) -> tuple[list[str], dict]:
    """The encodings the port declares, and the donor's quantized ones a float checkpoint cannot serve.

    The second value is ``{}`` or ``{"encodings": [...], "why": ...}`` for the manifest.
    """
    supported = set(declared) | {"float32", encoding}
    if not float_checkpoint:
        return sorted(supported), {}
    dropped = sorted(e for e in supported if e not in FLOAT_WEIGHT_ENCODINGS and e not in NON_SAFETENSORS_ENCODINGS)
    if not dropped:
        return sorted(supported), {}
    why = ("the checkpoint's weights are float (no quantization_config): a quantized encoding needs weights "
           "quantized that way; scaffold a quantized checkpoint to keep them")
    return sorted(supported - set(dropped)), {"encodings": dropped, "why": why}


def build_plan(index: ModuleIndex, donor: str, slug: str, arch_name: str, encoding: str,
               source: model_source.ModelSource, mapping: dict[str, str], *, multi_device: bool = False,
               keep_adapters: bool = False, float_checkpoint: bool = True) -> PortPlan:
    max_root = Path(cli_support.max_package_dir())
    files: list[PortFile] = []
    texts: dict[str, str] = {}
    donor_supported = donor_encodings(index, mapping)
    if not keep_adapters:
        donor_supported = [e for e in donor_supported if e not in NON_SAFETENSORS_ENCODINGS]
    supported, dropped_encodings = served_encodings(donor_supported, encoding, float_checkpoint)
    left_out = sorted(set(plan_mapping(index, donor, slug, multi_device=True)) - set(mapping))
    trimmed: list[dict] = []
    if left_out:
        trimmed.append({"what": [_max_relative(index.find(n), max_root) for n in left_out],
                        "why": "multi-device graph modules (and what only they import)", "flag": "--multi-device",
                        "stubbed": [], "placeholders": []})
    for name, port_name in sorted(mapping.items(), key=lambda kv: kv[1]):
        module = index.find(name)
        assert module is not None
        rel_path = _port_path(port_name, module.is_package)
        text = module.path.read_text(encoding="utf-8")
        if left_out:
            dropped = imports_of_modules(text, module, set(left_out), index)
            if dropped:
                text, _ = remove_import_names(text, dropped)
                text, stubbed, placeholders = stub_functions_using(text, dropped, TRIM_MESSAGE,
                                                                   MULTI_DEVICE_FUNCTION)
                trimmed[0]["stubbed"] += [f"{rel_path}:{n}" for n in stubbed]
                trimmed[0]["placeholders"] += [f"{rel_path}:{n}" for n in placeholders]
        result = rewrite_imports(text, module, port_name, mapping, index)
        text = result.text
        text, strict_loads = make_loading_strict(text, port_name, module.is_package)
        role = role_of(port_name, slug, module.is_package)
        if port_name == "arch":
            text = edit_arch(text, arch_name, encoding, supported, source, single_device=not multi_device,
                             safetensors_only=not keep_adapters)
        if port_name == "" and module.is_package:
            text = add_architectures_export(text, mapping, index)
        text = set_module_docstring(text, role, arch_name, module.path.relative_to(max_root.parent), donor,
                                    slug)
        files.append(PortFile(rel_path, str(module.path.relative_to(max_root.parent)), role,
                              result.changes, strict_loads))
        texts[rel_path] = text
    candidates: dict[str, set[str]] = {}
    for rel_path, text in texts.items():
        names = set(top_level_names(text))
        chosen = {n for n in names if not multi_device and EXPERT_PARALLEL_CLASS.search(n)}
        chosen |= {n for n in names if not keep_adapters and NON_SAFETENSORS_NAME.search(n)}
        if chosen:
            candidates[rel_path] = chosen
    texts, removed = remove_unused_definitions(texts, candidates)
    for label, pattern, flag in (("expert-parallel batch processors", EXPERT_PARALLEL_CLASS, "--multi-device"),
                                 ("GGUF and GPTQ weight paths", NON_SAFETENSORS_NAME, "--keep-adapters")):
        gone = [r for r in removed if pattern.search(r.partition(":")[2])]
        if gone:
            trimmed.append({"what": gone, "why": label, "flag": flag})
    if not keep_adapters and set(donor_encodings(index, mapping)) & NON_SAFETENSORS_ENCODINGS:
        trimmed.append({"what": sorted(set(donor_encodings(index, mapping)) & NON_SAFETENSORS_ENCODINGS),
                        "why": "encodings served only through GGUF or GPTQ weights", "flag": "--keep-adapters"})
    texts, wiring = wire_config_class(texts, slug)
    texts = align_config_encodings(texts, encoding, supported)
    allow_path = f"{ALLOWLIST_MODULE}.py"
    texts[allow_path] = ALLOWLIST_SOURCE.format(arch=arch_name)
    files.append(PortFile(allow_path, None, "computed-buffer allowlist"))
    families = sorted({n[len(ARCH_PACKAGE) + 1:].split(".")[0] for n in mapping} - {donor})
    start = {"kind": "native", "slug": donor, "path": f"max/pipelines/architectures/{donor}"}
    return PortPlan(slug, arch_name, donor, encoding, supported, "", files, texts, families, start_from=start,
                    lineage=[start], trimmed=trimmed, config_wiring=wiring, dropped_encodings=dropped_encodings)


def _max_relative(module: SourceModule | None, max_root: Path) -> str:
    return "?" if module is None else module.path.relative_to(max_root.parent).as_posix()


def top_level_names(text: str) -> list[str]:
    """Names of the module's top-level classes, functions and single-name assignments."""
    return list(top_level_definitions(ast.parse(text)))


# --- scaffolding from a port folder ------------------------------------------------------------------


def class_prefix(arch_name: str) -> str:
    """The class-name prefix of an architecture name (``StableLmForCausalLM`` -> ``StableLm``)."""
    for suffix in ARCH_SUFFIXES:
        if arch_name.endswith(suffix) and len(arch_name) > len(suffix):
            return arch_name[: -len(suffix)]
    return arch_name


def port_renames(donor: port_layout.PortDonor, slug: str, arch_name: str) -> Renames:
    return Renames((class_prefix(donor.arch_name), class_prefix(arch_name)), (donor.slug, slug),
                   (donor.arch_name, arch_name))


def port_reserved_names(donor: port_layout.PortDonor, slug: str) -> tuple[str, ...]:
    """Module names the new slug must not take: the donor port's modules other than its graph module."""
    names = set()
    for path in port_layout.port_python_files(donor.path):
        rel = path.relative_to(donor.path).with_suffix("")
        if rel.parts[-1] != "__init__" and rel.as_posix() != donor.slug:
            names.add(rel.parts[-1])
    return tuple(sorted(names))


def build_port_plan(donor: port_layout.PortDonor, slug: str, arch_name: str, encoding: str,
                    source: model_source.ModelSource, *, float_checkpoint: bool = True) -> PortPlan:
    """Copy a port folder with its classes, slug and architecture name renamed (no trimming: it is a port)."""
    renames = port_renames(donor, slug, arch_name)
    declared = port_layout.read_arch_declaration(donor.path / "arch.py")
    supported, dropped_encodings = served_encodings(declared.supported_encodings or (), encoding, float_checkpoint)
    manifest = input_files.load_json(donor.path / port_layout.MANIFEST_NAME, "scaffold manifest")
    roles = {f.get("path"): f.get("role") for f in manifest.get("files", []) if isinstance(f, dict)}
    shown = port_layout.display_path(donor.path)
    originals: dict[str, str] = {}
    texts: dict[str, str] = {}
    files: list[PortFile] = []
    changes: dict[str, str] = {}
    for path in port_layout.port_python_files(donor.path):
        rel = path.relative_to(donor.path).as_posix()
        text = input_files.read_text(path, "port file")
        originals[rel] = text
        new_rel = renames.path(rel)
        text, renamed = rename_source(text, renames)
        text = strip_review_markers(text)
        changes.update(line.split(" -> ", 1) for line in renamed)  # type: ignore[arg-type]
        role = roles.get(rel) or role_of(new_rel[:-3], slug, rel.endswith("__init__.py"))
        if role == "graph" or new_rel == f"{slug}.py":
            role = "graph"
        if new_rel == "arch.py":
            text = edit_arch(text, arch_name, encoding, supported, source)
        text = add_port_lineage(text, shown, donor, arch_name)
        texts[new_rel] = text
        files.append(PortFile(new_rel, f"{shown}/{rel}", role, renamed, 0))
    check_no_rename_collisions(originals, changes)
    texts, wiring = wire_config_class(texts, slug)
    texts = align_config_encodings(texts, encoding, supported)
    start = {"kind": "port", "slug": donor.slug, "arch_name": donor.arch_name, "path": shown}
    return PortPlan(slug, arch_name, donor.donor, encoding, supported, "", files, texts,
                    list(manifest.get("borrowed_families") or []), start_from=start,
                    lineage=[*donor.lineage, start], renames=changes, config_wiring=wiring,
                    implements=list(donor.implements), dropped_encodings=dropped_encodings)


def check_no_rename_collisions(originals: dict[str, str], changes: dict[str, str]) -> None:
    """ValueError when a renamed identifier takes a name the donor port already uses for something else."""
    import io
    import tokenize

    existing: set[str] = set()
    for text in originals.values():
        existing |= {t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                     if t.type == tokenize.NAME}
    clashes = sorted(new for old, new in changes.items() if new in existing and new not in changes)
    if clashes:
        raise ValueError(f"renaming would reuse names the donor port already has: {', '.join(clashes)}; "
                         "choose another --arch-name or --slug")


def add_port_lineage(text: str, shown: str, donor: port_layout.PortDonor, arch_name: str) -> str:
    """Add a lineage paragraph after the first paragraph of the module docstring (or a new docstring)."""
    paragraph = (f"Copied by scaffold.py from the port {shown} {LINEAGE_MARKER}\n"
                 f"(which implements {donor.arch_name}), renamed for {arch_name}. {LINEAGE_MARKER}\n"
                 f"TODO deltas: the deltas below are {donor.arch_name}'s; re-check each against this model. "
                 f"{LINEAGE_MARKER}")
    tree = ast.parse(text)
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        lines = text.splitlines(keepends=True)
        at = first.lineno - 1 if first is not None else len(lines)
        lines.insert(at, f'"""{paragraph}\n"""\n\n')
        return "".join(lines)
    raw = ast.get_source_segment(text, first) or ""
    quote = raw[-3:] if raw[-3:] in ('"""', "'''") else raw[-1]
    body = raw[: -len(quote)]
    cut = body.find("\n\n")
    new_raw = (body[:cut] + "\n\n" + paragraph + body[cut:] + quote) if cut >= 0 else (
        body.rstrip() + "\n\n" + paragraph + "\n" + quote)
    return replace_spans(text, [(first, new_raw)])


# --- building blocks copied with --with ------------------------------------------------------------

BLOCKS_DIR = SKILL_ROOT / "templates" / "blocks"
# sys.modules name of the block catalog: its dataclass needs the module registered while it executes.
BLOCK_CATALOG_MODULE = "_import_model_block_catalog"
BLOCKS_INIT_SOURCE = '''"""Building blocks of the {arch} port, copied from the import-model skill's templates/blocks.

Written by scaffold.py --with. Each file is self-contained (max, numpy and the
standard library only) and keeps its BLOCK_VERSION; scaffold_manifest.json
records its version and sha256. Import them relatively (``from .blocks.norms
import LayerNormF32``); edit a copy only knowing it then differs from the library.

Copied:
{listing}
"""
'''


@dataclass(frozen=True)
class SelectedBlock:
    """A catalog block chosen with ``--with``: its name, file name and library path."""

    name: str
    file: str
    path: Path


def block_catalog():
    """The templates/blocks catalog module, loaded from its file (the skill's templates are not a package)."""
    module = sys.modules.get(BLOCK_CATALOG_MODULE)
    if module is not None:
        return module
    init = BLOCKS_DIR / "__init__.py"
    spec = importlib.util.spec_from_file_location(BLOCK_CATALOG_MODULE, init)
    if spec is None or spec.loader is None or not init.is_file():
        raise ScriptError(f"cannot read the block catalog {init}: the file is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[BLOCK_CATALOG_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[BLOCK_CATALOG_MODULE]
        raise ScriptError(f"cannot load the block catalog {init}: {exc}") from None
    return module


def selected_blocks(names: list[str]) -> list[SelectedBlock]:
    """The catalog blocks named by ``--with`` in the order given (repeats dropped); ScriptError on an unknown one."""
    if not names:
        return []
    catalog = block_catalog()
    known = [b.name for b in catalog.BLOCKS]
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if unknown:
        raise ScriptError(f"--with: unknown block {', '.join(repr(n) for n in unknown)}; known blocks: "
                          f"{', '.join(known)}")
    chosen = []
    for name in dict.fromkeys(names):
        block = catalog.find(name)
        chosen.append(SelectedBlock(block.name, block.file, BLOCKS_DIR / block.file))
    return chosen


def inherit_blocks(plan: PortPlan, donor: port_layout.PortDonor) -> None:
    """Keep the donor port's block records for the block files copied with it.

    A block file still matching its recorded sha256 is copied verbatim (no rename, no lineage paragraph), so
    it stays the library's bytes; an edited one keeps the port copy's edits and is hashed as written here.
    """
    recorded = input_files.load_json(donor.path / port_layout.MANIFEST_NAME, "scaffold manifest").get("blocks")
    shown = port_layout.display_path(donor.path)
    for entry in recorded if isinstance(recorded, list) else []:
        rel = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(rel, str) and rel in plan.texts:
            if port_layout.block_is_unmodified(donor.path, entry):
                plan.texts[rel] = input_files.read_text(donor.path / rel, "block file")
            plan.blocks.append({"name": entry.get("name"), "file": rel, "source": f"{shown}/{rel}",
                                "version": entry.get("version"),
                                "sha256": hashlib.sha256(plan.texts[rel].encode("utf-8")).hexdigest()})


def add_blocks(plan: PortPlan, blocks: list[SelectedBlock]) -> None:
    """Add the chosen blocks to the plan as ``blocks/<file>`` plus a generated ``blocks/__init__.py``."""
    if not blocks:
        return
    folder = block_catalog().PORT_SUBPACKAGE
    if f"{folder}.py" in plan.texts:
        raise ScriptError(f"--with: the port already has a module {folder}.py, which the {folder}/ package "
                          "of copied blocks would shadow; choose another --slug")
    catalog = block_catalog()
    for block in blocks:
        data = input_files.read_text(block.path, "block file")
        try:
            version = catalog.block_version(block.path)
        except ValueError as exc:
            raise ScriptError(f"--with {block.name}: {exc}") from None
        rel = f"{folder}/{block.file}"
        if rel in plan.texts:  # a port donor's own copy: the library's current file replaces it
            plan.files = [f for f in plan.files if f.path != rel]
            plan.blocks = [b for b in plan.blocks if b.get("file") != rel]
        plan.texts[rel] = data
        shown = port_layout.display_path(block.path)
        plan.files.append(PortFile(rel, shown, "block"))
        plan.blocks.append({"name": block.name, "file": rel, "source": shown, "version": version,
                            "sha256": hashlib.sha256(data.encode("utf-8")).hexdigest()})
    init_rel = f"{folder}/__init__.py"
    listing = "\n".join(f"- {b['name']}: {b['file']}, version {b['version']}" for b in plan.blocks)
    plan.texts[init_rel] = BLOCKS_INIT_SOURCE.format(arch=plan.arch_name, listing=listing)
    plan.files = [f for f in plan.files if f.path != init_rel]  # a port donor's copy: regenerated here
    plan.files.append(PortFile(init_rel, None, "blocks"))


# --- the port's config class reaches the graph; config defaults agree with arch.py --------------------


def _class_index(texts: dict[str, str]) -> dict[str, dict[str, ast.ClassDef]]:
    return {path: {n.name: n for n in ast.parse(text).body if isinstance(n, ast.ClassDef)}
            for path, text in texts.items()}


def _local_origin(texts: dict[str, str], path: str, name: str) -> str | None:
    """The port file that defines class ``name`` as seen from ``path`` (defined there or imported relatively)."""
    tree = ast.parse(texts[path])
    if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
        return path
    package = Path(path).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0 and any(
                (a.asname or a.name) == name and a.name == name for a in node.names):
            base = list(package[: len(package) - (node.level - 1)] if node.level > 1 else package)
            target = "/".join([*base, *(node.module or "").split(".")]) if node.module else "/".join(base)
            for candidate in (f"{target}.py", f"{target}/__init__.py"):
                if candidate in texts:
                    return _local_origin(texts, candidate, name)
    return None


def _arch_keyword(texts: dict[str, str], keyword: str) -> str | None:
    for node in ast.walk(ast.parse(texts.get("arch.py", ""))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                "SupportedArchitecture":
            for kw in node.keywords:
                if kw.arg == keyword and isinstance(kw.value, ast.Name):
                    return kw.value.id
    return None


def wire_config_class(texts: dict[str, str], slug: str) -> tuple[dict[str, str], dict]:
    """Make the pipeline model build its config (and so its graph) from the config class arch.py registers.

    Donors that borrow the llama3 pipeline inherit ``_create_model_config`` calling
    ``Llama3Config.initialize`` and ``model_config_cls = Llama3Config``, so the port's own config class
    would never be used. Such calls become ``self.model_config_cls.initialize`` and the pipeline model
    class in ``model.py`` sets ``model_config_cls`` (and ``config_class``) to the registered class.
    """
    config_name = _arch_keyword(texts, "config")
    model_name = _arch_keyword(texts, "pipeline_model")
    if config_name is None or model_name is None:
        return texts, {"status": "not applicable: arch.py names no config= or pipeline_model= class"}
    config_file = _local_origin(texts, "arch.py", config_name)
    model_file = _local_origin(texts, "arch.py", model_name)
    if config_file is None or model_file is None:
        return texts, {"status": f"not applicable: {config_name} or {model_name} is not defined in the port"}
    classes = _class_index(texts)
    chain: list[tuple[str, ast.ClassDef]] = []
    path, name = model_file, model_name
    while path is not None and name in classes.get(path, {}) and len(chain) < len(texts):
        node = classes[path][name]
        chain.append((path, node))
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        nxt = next(((p, b) for b in bases if (p := _local_origin(texts, path, b)) is not None), None)
        path, name = nxt if nxt else (None, "")
    edits: dict[str, list[tuple[ast.AST, str]]] = {}
    changes: list[str] = []
    settings = {"model_config_cls": None, "config_class": None}
    for path, node in chain:
        for stmt in node.body:
            target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id in settings and settings[target.id] is None:
                value = getattr(stmt, "value", None)
                settings[target.id] = value.id if isinstance(value, ast.Name) else "?"
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "_create_model_config":
                for call in ast.walk(stmt):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr in ("initialize", "initialize_from_config")
                            and isinstance(call.func.value, ast.Name) and call.func.value.id != config_name):
                        edits.setdefault(path, []).append((call.func.value, "self.model_config_cls"))
                        changes.append(f"{path}: {node.name}._create_model_config builds "
                                       f"self.model_config_cls instead of {call.func.value.id}")
    texts = dict(texts)
    for path, spans in edits.items():
        texts[path] = replace_spans(texts[path], spans)
    missing = [attr for attr, value in settings.items() if value is not None and value != config_name]
    if missing or edits:
        texts[model_file], added = _set_class_attributes(texts[model_file], model_name,
                                                         missing or ["model_config_cls"], config_name,
                                                         config_file, model_file)
        changes += added
    return texts, {"status": "wired" if changes else "already wired", "config_class": config_name,
                   "config_file": config_file, "pipeline_model": model_name, "model_file": model_file,
                   "changes": changes}


def _set_class_attributes(text: str, class_name: str, attributes: list[str], config_name: str,
                          config_file: str, model_file: str) -> tuple[str, list[str]]:
    """Put ``<attr> = <config_name>`` at the top of class ``class_name``'s body, importing the class if needed."""
    tree = ast.parse(text)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    anchor = body[0] if has_doc else None
    indent = " " * body[0].col_offset
    lines = [f"{indent}# The port's own config class ({config_file}) builds the graph. {LINEAGE_MARKER}\n"]
    lines += [f"{indent}{attr} = {config_name}\n" for attr in attributes]
    src = text.splitlines(keepends=True)
    at = anchor.end_lineno if anchor is not None else body[0].lineno - 1
    src[at:at] = (["\n"] if anchor is not None else []) + lines
    text = "".join(src)
    bound = {(a.asname or a.name) for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)
             for a in n.names} | {n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)}
    changes = [f"{model_file}: {class_name}.{attr} = {config_name}" for attr in attributes]
    if config_name not in bound:
        depth = model_file.count("/")
        module = config_file[:-3].replace("/", ".")
        text = insert_after_imports(text, f"from {'.' * (depth + 1)}{module} import {config_name}\n")
        changes.append(f"{model_file}: imports {config_name} from {config_file}")
    return text, changes


def align_config_encodings(texts: dict[str, str], encoding: str, supported: list[str]) -> dict[str, str]:
    """Config classes' ``DEFAULT_ENCODING`` / ``SUPPORTED_ENCODINGS`` literals set to what arch.py declares."""
    new_values = {"DEFAULT_ENCODING": json.dumps(encoding),
                  "SUPPORTED_ENCODINGS": "{" + ", ".join(json.dumps(e) for e in supported) + "}"}
    out = dict(texts)
    for path, text in texts.items():
        edits: list[tuple[ast.AST, str]] = []
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                value = getattr(stmt, "value", None)
                if not (isinstance(target, ast.Name) and target.id in new_values and value is not None):
                    continue
                literal = (isinstance(value, ast.Constant) and isinstance(value.value, str)) or (
                    isinstance(value, (ast.Set, ast.List, ast.Tuple)))
                if literal and ast.get_source_segment(text, value) != new_values[target.id]:
                    edits.append((value, new_values[target.id]))
        if edits:
            out[path] = replace_spans(text, edits)
    return out


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




def edit_arch(text: str, arch_name: str, encoding: str, supported: list[str],
              source: model_source.ModelSource, *, single_device: bool = False,
              safetensors_only: bool = False) -> str:
    """Rename the SupportedArchitecture and set its encodings; optionally single-device and safetensors-only."""
    tree = ast.parse(text)
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "SupportedArchitecture"), None)
    if call is None:
        raise ValueError("the donor's arch.py has no SupportedArchitecture(...) call")
    repo_ids = [] if source is None or source.is_local else [source.repo_id]
    new_values = {
        "name": json.dumps(arch_name),
        "default_encoding": json.dumps(encoding),
        "supported_encodings": "{" + ", ".join(json.dumps(e) for e in supported) + "}",
        "example_repo_ids": json.dumps(repo_ids),
    }
    if single_device:
        new_values["multi_gpu_supported"] = "False"
    edits: list[tuple[ast.AST, str]] = []
    for kw in call.keywords:
        if kw.arg in new_values:
            edits.append((kw.value, new_values.pop(kw.arg)))
        elif safetensors_only and kw.arg == "weight_adapters" and isinstance(kw.value, ast.Dict):
            kept = [(k, v) for k, v in zip(kw.value.keys, kw.value.values)
                    if isinstance(k, ast.Attribute) and k.attr == "safetensors"]
            if len(kept) != len(kw.value.keys):
                inner = "".join(f"        {ast.get_source_segment(text, k)}: {ast.get_source_segment(text, v)},\n"
                                for k, v in kept)
                edits.append((kw.value, "{\n" + inner + "    }"))
        elif (safetensors_only and kw.arg == "default_weights_format" and isinstance(kw.value, ast.Attribute)
              and kw.value.attr != "safetensors"):
            edits.append((kw.value, "WeightsFormat.safetensors"))
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
# A stripped marker and the blanks before it, so "text [audit-ok: why]" becomes "text".
_INHERITED_MARKER = re.compile(r"[ \t]*" + port_layout.REVIEW_MARKER.pattern)


def strip_review_markers(text: str) -> str:
    """Drop the donor port's ``[audit-ok: ...]`` markers: its reviews do not hold for the renamed copy."""
    return _INHERITED_MARKER.sub("", text)


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
        "model_type": plan.model_type,
        "donor": plan.donor,
        "start_from": plan.start_from,
        "lineage": plan.lineage,
        "renames": plan.renames,
        "implements": plan.implements,
        "trimmed": plan.trimmed,
        "config_wiring": plan.config_wiring,
        "borrowed_families": plan.borrowed_families,
        "default_encoding": plan.default_encoding,
        "supported_encodings": plan.supported_encodings,
        "dropped_encodings": plan.dropped_encodings,
        "graph_module": f"{plan.slug}.py",
        "custom_architectures": plan.port_dir,
        "files": [asdict(f) for f in plan.files],
        "blocks": plan.blocks,
        "backup": backup,
        "dry_run": dry_run,
    }


def report(plan: PortPlan, args: argparse.Namespace, backup: str | None) -> None:
    document = manifest(plan, backup, args.dry_run)
    if args.json:
        cli_support.print_json(document)
        return
    verb = "would write" if args.dry_run else "wrote"
    origin = plan.start_from.get("path") if plan.start_from.get("kind") == "port" else plan.donor
    print(f"{verb} {plan.port_dir} ({len(plan.files)} files) from {plan.start_from.get('kind', 'native')} "
          f"donor {origin}")
    for f in plan.files:
        origin = f"<- {f.source}" if f.source else "(generated)"
        what = "names renamed" if plan.start_from.get("kind") == "port" else "imports rewritten"
        extra = f", {len(f.import_changes)} {what}" if f.import_changes else ""
        strict = f", {f.strict_loads} strict load(s)" if f.strict_loads else ""
        print(f"  {f.path:28s} {origin}{extra}{strict}")
    print(f"architecture {plan.arch_name}, default encoding {plan.default_encoding}, "
          f"supported {', '.join(plan.supported_encodings)}")
    if plan.blocks:
        print("blocks: " + ", ".join(f"{b['name']} {b['version']}" for b in plan.blocks))
    for entry in plan.trimmed:
        print(f"left out ({entry['why']}; {entry['flag']} keeps them): {', '.join(entry['what'])}")
    if plan.dropped_encodings:
        print(f"encodings not declared: {', '.join(plan.dropped_encodings['encodings'])} "
              f"({plan.dropped_encodings['why']})")
    wiring = plan.config_wiring
    print(f"config class: {wiring.get('config_class', '?')} ({wiring.get('status')})")
    for change in wiring.get("changes", []):
        print(f"  {change}")
    if backup:
        print(f"previous port moved to {backup}")
    if not args.dry_run:
        print(f"serve: max serve --model-path {args.model} --custom-architectures {plan.port_dir} "
              f"--devices cpu --quantization-encoding float32")


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
