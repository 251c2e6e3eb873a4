"""Where a port lives and what it is called: slug rules and port-folder checks.

A port is one Python package ``DIR/<slug>/`` that ``max serve
--custom-architectures DIR/<slug>`` imports as the top-level module
``<slug>``. This module holds the rules the scaffold, the audit and the gates
share: how a slug is derived and validated, how a port folder given on the
command line is normalized (trailing slash, parent folder by mistake), and how
the port's ``arch.py`` is read with ``ast`` (no import of MAX).

Imports neither torch nor max.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path

import model_anatomy
import model_source
from cli_support import ScriptError
from input_files import describe_path_problem, load_json, parse_python, read_text

# A reviewer's note that an audit hit is true: ``[audit-ok: <reason>]`` on the hit's line (audit reads it;
# scaffold strips inherited ones, since a copied port must be reviewed afresh).
REVIEW_MARKER = re.compile(r"\[audit-ok:\s*([^\]]*\S)\s*\]")

# Files every scaffolded port has besides its graph module ``<slug>.py``.
STANDARD_MODULES = ("__init__", "arch", "model_config", "model", "weight_adapters", "computed_buffers")

# Written by the scaffold into every port; the gates read it.
MANIFEST_NAME = "scaffold_manifest.json"

# Where the skill ships verified ports, the folders ``scaffold --start-from`` accepts besides native slugs.
SKILL_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_PORTS_DIR = SKILL_ROOT / "templates" / "ports"

# How ``importable_origin`` names a namespace package (a folder without ``__init__.py``).
NAMESPACE_ORIGIN = "a namespace package"

# safetensors dtype -> the MAX encoding that serves it unchanged.
FLOAT_ENCODINGS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# How checkpoint_encoding's origin starts when it read the safetensors headers (not the config's dtype).
TENSOR_DTYPE_ORIGIN = "dominant tensor dtype"


def checkpoint_encoding(source: model_source.ModelSource, config: dict) -> tuple[str | None, str]:
    """The encoding the checkpoint's dominant dtype calls for (None if not a float one), and its origin.

    Reads safetensors headers only; without them falls back to the config's dtype.
    """
    try:
        tensors = model_source.read_tensor_infos(source)
    except ScriptError:
        tensors = {}
    if tensors:
        dominant = model_source.checkpoint_summary(tensors)["dominant_dtype"]
        return FLOAT_ENCODINGS.get(dominant), f"{TENSOR_DTYPE_ORIGIN} {dominant}"
    dtype = model_anatomy.config_view(config).dtype
    return (dtype if dtype in FLOAT_ENCODINGS.values() else None), f"config dtype {dtype}"


def slug_from_name(name: str) -> str:
    """A candidate slug from a model name: lower case, runs of other characters become ``_``."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower()
    if not slug:
        return "port"
    if slug[0].isdigit():
        slug = "m_" + slug
    return slug


def block_is_unmodified(port_path: Path, record: dict) -> bool:
    """Whether the block file a manifest ``blocks`` record names still hashes to the recorded sha256 (the
    library's bytes, as scaffold copied them); False for a malformed record or an unreadable file."""
    if not (isinstance(record, dict) and isinstance(record.get("file"), str) and isinstance(record.get("sha256"), str)):
        return False
    try:
        return hashlib.sha256((port_path / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    except OSError:
        return False


def default_slug(config: dict, model_name: str) -> str:
    """The slug scaffold picks without --slug: the config's model_type (a port is one architecture; a replica's
    folder is often just "replica"), or the model's name when there is none or it cannot name a port."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.strip():
        candidate = slug_from_name(model_type)
        if slug_problem(candidate) is None:
            return candidate
    return slug_from_name(model_name)


def slug_problem(slug: str, reserved: tuple[str, ...] = ()) -> str | None:
    """Why ``slug`` cannot name a port, or None when it can.

    The one slug rule for scaffold, serve, audit and gates: a non-empty ASCII
    Python identifier, not a dunder name (``__main__``), not a keyword, not one
    of the port's own module names (``reserved``), and nothing importable may
    already have that name: MAX imports the port as a top-level module, so a
    clash would import the other module instead.
    """
    problem = slug_form_problem(slug, reserved)
    if problem:
        return problem
    origin = importable_origin(slug)
    if origin is not None:
        return f"slug {slug!r} is already importable ({origin}); MAX would import that instead"
    return None


def slug_form_problem(slug: str, reserved: tuple[str, ...] = ()) -> str | None:
    """The parts of the slug rule that need no import search (see ``slug_problem``)."""
    if not slug:
        return "slug is empty"
    if not slug.isascii():
        return f"slug {slug!r} is not ASCII (use letters a-z, digits and _)"
    if not slug.isidentifier():
        return f"slug {slug!r} is not a valid Python identifier (use letters, digits and _)"
    if slug.startswith("__") and slug.endswith("__"):
        return f"slug {slug!r} is a dunder name, which Python reserves"
    if keyword.iskeyword(slug):
        return f"slug {slug!r} is a Python keyword"
    if slug in reserved or slug in STANDARD_MODULES:
        return f"slug {slug!r} clashes with a module name inside the port"
    return None


def importable_origin(slug: str) -> str | None:
    """Where an importable module named ``slug`` comes from, or None when nothing has that name."""
    try:
        found = importlib.util.find_spec(slug)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    return found.origin or NAMESPACE_ORIGIN


def port_slug_problem(port_path: Path) -> str | None:
    """The slug rule applied to an existing port folder's name (the port itself may be importable)."""
    slug = port_path.name
    problem = slug_form_problem(slug)
    if problem:
        return problem
    origin = importable_origin(slug)
    if origin is None or origin == NAMESPACE_ORIGIN:
        return None  # a regular package (the port) wins over a namespace portion of the same name
    try:
        inside = Path(origin).resolve().is_relative_to(port_path.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if inside:
        return None
    return f"slug {slug!r} is already importable ({origin}); MAX would import that instead"


@dataclass(frozen=True)
class PortDir:
    """A port package folder, normalized: ``path`` is ``DIR/<slug>`` without a trailing slash."""

    path: Path

    @property
    def slug(self) -> str:
        return self.path.name

    @property
    def custom_architectures_arg(self) -> str:
        """The value to pass to ``max serve --custom-architectures`` (never a trailing slash)."""
        return str(self.path)

    def module_path(self, module: str) -> Path:
        return self.path / f"{module.replace('.', '/')}.py"


def resolve_port_dir(value: str, flag: str = "port folder") -> PortDir:
    """Normalize a port folder argument; exit 3 (ScriptError) when it is not a port.

    A trailing slash is accepted. A parent folder holding exactly one port is
    refused with a message naming the port folder to pass instead. The folder
    name must pass the slug rule, and ``__init__.py`` and ``arch.py`` must be
    readable files.
    """
    if not str(value).strip():
        raise ScriptError(f"{flag} is empty; name the port folder DIR/<slug>")
    text = str(value).rstrip("/\\") or str(value)
    path = Path(text).expanduser()
    problem = describe_path_problem(path)
    if problem == "does not exist":
        raise ScriptError(f"port folder not found: {value}")
    if problem != "is a folder, not a file":
        raise ScriptError(f"{flag} {value} is a file, not a folder" if problem is None else f"{flag} {value} {problem}")
    if _is_port(path):
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as exc:
            raise ScriptError(f"{flag} {value} cannot be resolved ({exc})") from None
        for name in ("__init__.py", "arch.py"):
            file_problem = describe_path_problem(resolved / name)
            if file_problem:
                raise ScriptError(f"{resolved / name} {file_problem}")
        slug_trouble = port_slug_problem(resolved)
        if slug_trouble:
            raise ScriptError(f"{flag} {resolved}: {slug_trouble}; rename the folder")
        return PortDir(resolved)
    try:
        inner = sorted(p for p in path.iterdir() if _is_port(p) and p.is_dir())
    except OSError as exc:
        raise ScriptError(f"cannot list {flag} {value}: {exc.strerror or exc}") from None
    if len(inner) == 1:
        raise ScriptError(f"{value} is the parent folder, not a port; pass the port folder {inner[0]}")
    if inner:
        names = ", ".join(str(p) for p in inner)
        raise ScriptError(f"{value} is a parent folder holding several ports; pass one of: {names}")
    raise ScriptError(f"{value} is not a port folder (no arch.py and __init__.py in it)")


def port_python_files(port_path: Path) -> list[Path]:
    """Every ``.py`` entry below the port (links and folders so named included), ``__pycache__`` aside."""
    try:
        return sorted(p for p in port_path.rglob("*.py") if "__pycache__" not in p.relative_to(port_path).parts)
    except OSError as exc:
        raise ScriptError(f"cannot list the port folder {port_path}: {exc.strerror or exc}") from None


def check_port_files(port: PortDir) -> list[Path]:
    """Read every ``.py`` of the port as UTF-8 text; ScriptError naming the first one that cannot be read."""
    paths = port_python_files(port.path)
    for path in paths:
        read_text(path, "port file")
    return paths


def _is_port(path: Path) -> bool:
    """True when ``path`` holds entries named ``arch.py`` and ``__init__.py`` (of any kind, links included)."""
    try:
        return all((path / name).is_symlink() or (path / name).exists() for name in ("arch.py", "__init__.py"))
    except OSError:
        return False


@dataclass(frozen=True)
class ArchDeclaration:
    """What ``arch.py`` declares in its ``SupportedArchitecture(...)`` call, read with ast."""

    name: str | None
    default_encoding: str | None
    supported_encodings: tuple[str, ...] | None  # None when not a literal the parser can read
    line: int


def read_arch_declaration(arch_file: Path) -> ArchDeclaration:
    """Parse ``arch.py`` without importing it; ScriptError when there is no SupportedArchitecture call."""
    tree = parse_python(arch_file, "port file")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node.func) == "SupportedArchitecture":
            fields = {kw.arg: kw.value for kw in node.keywords if kw.arg}
            return ArchDeclaration(
                name=_literal_str(fields.get("name")),
                default_encoding=_literal_str(fields.get("default_encoding")),
                supported_encodings=_literal_strings(fields.get("supported_encodings")),
                line=node.lineno,
            )
    raise ScriptError(f"{arch_file} has no SupportedArchitecture(...) call")


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _literal_str(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _literal_strings(node: ast.expr | None) -> tuple[str, ...] | None:
    if isinstance(node, (ast.Set, ast.List, ast.Tuple)):
        values = [_literal_str(elt) for elt in node.elts]
        if all(v is not None for v in values):
            return tuple(sorted(v for v in values if v is not None))
    return None


# --- ports as donors: a port folder scaffold --start-from copies, and the verified ones the skill ships ----


@dataclass(frozen=True)
class PortDonor:
    """A port folder usable as ``scaffold --start-from``: its manifest says what it is and what it implements."""

    path: Path
    slug: str
    arch_name: str
    donor: str  # the native MAX family at the root of its lineage
    implements: tuple[dict, ...]  # each: signal (a delta_signals name) and what (how the port does it)
    verified: dict | None  # how it was verified (test, verdict, versions), None when unverified
    lineage: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"slug": self.slug, "arch_name": self.arch_name, "path": display_path(self.path),
                "donor": self.donor, "implements": list(self.implements), "verified": self.verified,
                "lineage": list(self.lineage), "start_from": display_path(self.path)}


def display_path(path: Path) -> str:
    """``path`` relative to the skill root when it lies inside it (as the docs spell it), else absolute."""
    try:
        return Path(path).resolve().relative_to(SKILL_ROOT).as_posix()
    except ValueError:
        return str(path)


def looks_like_port_folder(value: str) -> bool:
    """True when a ``--start-from`` value names a folder (a path, or an existing folder) rather than a slug."""
    text = str(value).strip()
    if not text:
        return False
    return "/" in text or "\\" in text or text.startswith(".") or text.startswith("~") or Path(text).is_dir()


def read_port_donor(value: str | Path) -> PortDonor:
    """The port folder ``value`` as a donor; ScriptError when it is not a port with a scaffold manifest."""
    port = resolve_port_dir(str(value), "--start-from")
    manifest_path = port.path / MANIFEST_NAME
    problem = describe_path_problem(manifest_path)
    if problem == "does not exist":
        raise ScriptError(f"--start-from {value}: {port.path} has no {MANIFEST_NAME}; only a scaffolded port "
                          "(or a native slug, see list-archs --donors) can be a donor")
    if problem:
        raise ScriptError(f"{manifest_path} {problem}")
    manifest = load_json(manifest_path, "scaffold manifest")
    for key in ("slug", "arch_name", "donor"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise ScriptError(f"{manifest_path}: {key!r} must be a non-empty string")
    implements = manifest.get("implements", [])
    if not (isinstance(implements, list) and all(isinstance(i, dict) for i in implements)):
        raise ScriptError(f"{manifest_path}: 'implements' must be a list of objects")
    verified = manifest.get("verified")
    if verified is not None and not isinstance(verified, dict):
        raise ScriptError(f"{manifest_path}: 'verified' must be an object or absent")
    lineage = manifest.get("lineage") or [{"kind": "native", "slug": manifest["donor"]}]
    if not (isinstance(lineage, list) and all(isinstance(i, dict) for i in lineage)):
        raise ScriptError(f"{manifest_path}: 'lineage' must be a list of objects")
    return PortDonor(port.path, port.slug, manifest["arch_name"], manifest["donor"], tuple(implements),
                     verified, tuple(lineage))


def verified_ports(root: Path = SHIPPED_PORTS_DIR) -> list[PortDonor]:
    """The verified ports under ``root`` (default: the skill's templates/ports), sorted by slug.

    A port counts when its scaffold manifest carries a ``verified`` record; the rest are not listed.
    Inspect and list-archs --donors call this to show ports beside the native donors.
    """
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()):
        donor = read_port_donor(folder)
        if donor.verified is not None:
            found.append(donor)
    return found
