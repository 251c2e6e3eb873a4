"""Follow and rewrite the imports of MAX architecture modules copied into a port.

Works on source text with ``ast`` (never by importing the code). Module names
are absolute dotted names such as ``max.pipelines.architectures.llama3.model``;
a port module is named relative to the port root, such as ``model`` or
``layers.attention``. Given a mapping from copied source modules to their port
names, :func:`rewrite_imports` makes:

- imports of copied modules point at the copies, as relative imports (whether
  the donor spelled them relative or absolute);
- parent-relative imports of code the port does not copy absolute
  ``max.pipelines.architectures.*`` imports (a relative import would point
  outside the port once the package is moved);
- every other import unchanged.

Imports neither torch nor max.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ARCH_PACKAGE = "max.pipelines.architectures"


@dataclass(frozen=True)
class SourceModule:
    """One module of the MAX source tree: its dotted name and file."""

    name: str
    path: Path

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def package(self) -> str:
        """The package relative imports in this module start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


class ModuleIndex:
    """Finds modules of one installed package tree by dotted name (files only, no imports)."""

    def __init__(self, root_package: str, root_dir: Path) -> None:
        self.root_package = root_package
        self.root_dir = Path(root_dir)

    def find(self, name: str) -> SourceModule | None:
        if name != self.root_package and not name.startswith(self.root_package + "."):
            return None
        rel = name[len(self.root_package):].lstrip(".")
        base = self.root_dir.joinpath(*rel.split(".")) if rel else self.root_dir
        if base.is_dir() and (base / "__init__.py").is_file():
            return SourceModule(name, base / "__init__.py")
        file = base.with_suffix(".py")
        if rel and file.is_file():
            return SourceModule(name, file)
        return None

    def package_modules(self, package: str) -> list[SourceModule]:
        """Every module file under a package folder (recursively), package inits included."""
        found = self.find(package)
        if found is None or not found.is_package:
            return []
        folder = found.path.parent
        modules = []
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(SourceModule(".".join([package, *parts]), path))
        return modules


def absolute_module(importer: SourceModule, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module or ""
    parts = importer.package.split(".")
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top package in {importer.name}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def defining_module(index: ModuleIndex, package: str, name: str) -> str | None:
    """The module a package's ``__init__`` re-exports ``name`` from (``from .x import name``)."""
    found = index.find(package)
    if found is None or not found.is_package:
        return None
    tree = ast.parse(found.path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return absolute_module(found, node.level, node.module)
    return None


@dataclass(frozen=True)
class ImportTarget:
    """Where one imported name comes from: a module (``symbol`` None) or a symbol of a module."""

    module: str
    symbol: str | None
    alias: str | None


def import_targets(node: ast.ImportFrom, importer: SourceModule, index: ModuleIndex) -> list[ImportTarget]:
    """Resolve each name of a from-import to the module that defines it."""
    base = absolute_module(importer, node.level, node.module)
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if alias.name != "*" and index.find(sub) is not None:
            targets.append(ImportTarget(sub, None, alias.asname))
            continue
        found = index.find(base)
        if found is not None and found.is_package and alias.name != "*":
            origin = defining_module(index, base, alias.name)
            if origin is not None and index.find(origin) is not None:
                targets.append(ImportTarget(origin, alias.name, alias.asname))
                continue
        targets.append(ImportTarget(base, alias.name, alias.asname))
    return targets


def architecture_imports(module: SourceModule, index: ModuleIndex) -> set[str]:
    """The ``max.pipelines.architectures`` modules a module imports (for the copy closure)."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for target in import_targets(node, module, index):
                if index.find(target.module) is not None:
                    found.add(target.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if index.find(alias.name) is not None:
                    found.add(alias.name)
    return found


@dataclass
class RewriteResult:
    """New source text plus one line per changed import (``old -> new``)."""

    text: str
    changes: list[str] = field(default_factory=list)


def rewrite_imports(text: str, importer: SourceModule, port_name: str, mapping: dict[str, str],
                    index: ModuleIndex) -> RewriteResult:
    """Rewrite the imports of one copied module; ``port_name`` is its name inside the port."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str, str]] = []  # (start line, end line, indent, new text)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ImportFrom, ast.Import)):
            continue
        if isinstance(node, ast.ImportFrom):
            new = _rewrite_from(node, importer, port_name, mapping, index)
        else:
            new = _rewrite_plain(node, port_name, mapping)
        if new is None:
            continue
        first = lines[node.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        edits.append((node.lineno, node.end_lineno or node.lineno, indent, new))
    changes = []
    for start, end, indent, new in sorted(edits, reverse=True):
        old = "".join(lines[start - 1:end])
        replacement = "".join(f"{indent}{line}\n" for line in new.splitlines())
        if old.strip() == replacement.strip():
            continue
        lines[start - 1:end] = [replacement]
        changes.append(f"{' '.join(old.split())} -> {' '.join(new.split())}")
    return RewriteResult("".join(lines), list(reversed(changes)))


def relative_prefix(port_name: str, is_package: bool) -> str:
    """The dots that reach the port root from module ``port_name`` ("" is the port package itself)."""
    if is_package:
        depth = port_name.count(".") + 1 if port_name else 0
    else:
        depth = port_name.count(".")
    return "." * (depth + 1)


def replace_spans(text: str, edits: list[tuple[ast.AST, str]]) -> str:
    """Replace the source of each ast node with new text (nodes must not overlap)."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def position(line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets.
        return offsets[line - 1] + len(lines[line - 1].encode("utf-8")[:col].decode("utf-8"))

    spans = sorted(
        ((position(n.lineno, n.col_offset), position(n.end_lineno, n.end_col_offset), new)  # type: ignore[attr-defined]
         for n, new in edits),
        reverse=True,
    )
    for start, end, new in spans:
        text = text[:start] + new + text[end:]
    return text


def _rewrite_from(node: ast.ImportFrom, importer: SourceModule, port_name: str, mapping: dict[str, str],
                  index: ModuleIndex) -> str | None:
    base = absolute_module(importer, node.level, node.module)
    touches_arch = base == ARCH_PACKAGE or base.startswith(ARCH_PACKAGE + ".")
    if not touches_arch:
        return None
    targets = import_targets(node, importer, index)
    dots = relative_prefix(port_name, importer.is_package)
    statements: list[str] = []
    leftovers: list[str] = []
    for target in targets:
        alias = f" as {target.alias}" if target.alias else ""
        copied = mapping.get(target.module)
        if copied is not None and target.symbol is None:
            parent, _, leaf = copied.rpartition(".")
            bound = target.alias or target.module.rpartition(".")[2]
            alias_text = f" as {bound}" if bound != leaf else ""
            statements.append(f"from {dots}{parent} import {leaf}{alias_text}")
        elif copied is not None:
            statements.append(f"from {dots}{copied} import {target.symbol}{alias}")
        else:
            name = target.symbol if target.symbol is not None else target.module.rpartition(".")[2]
            leftovers.append(f"{name}{alias}")
    if leftovers:
        statements.insert(0, _from_line(base, leftovers))
    if node.level == 0 and not any(t.module in mapping for t in targets):
        return None  # absolute import of code the port does not copy: unchanged
    return "\n".join(_merge_same_module(statements))


def _from_line(module: str, names: list[str]) -> str:
    if len(names) == 1:
        return f"from {module} import {names[0]}"
    inner = "".join(f"    {n},\n" for n in names)
    return f"from {module} import (\n{inner})"


def _merge_same_module(statements: list[str]) -> list[str]:
    """Join single-name ``from X import a`` lines that share X (keeps order of first use)."""
    grouped: dict[str, list[str]] = {}
    order: list[str] = []
    other: list[tuple[int, str]] = []
    for i, line in enumerate(statements):
        head, sep, names = line.partition(" import ")
        if "\n" in line or not sep:
            other.append((i, line))
            continue
        if head not in grouped:
            grouped[head] = []
            order.append(head)
        grouped[head].append(names)
    merged = []
    for head in order:
        names = grouped[head]
        module = head[len("from "):]
        merged.append(f"{head} import {names[0]}" if len(names) == 1 else _from_line(module, names))
    return [line for _, line in other] + merged


def _rewrite_plain(node: ast.Import, port_name: str, mapping: dict[str, str]) -> str | None:
    """``import a.b.c as x`` of a copied module -> ``from <dots>parent import leaf as x``."""
    if not any(alias.name in mapping for alias in node.names):
        return None
    dots = relative_prefix(port_name, False)
    lines = []
    for alias in node.names:
        copied = mapping.get(alias.name)
        if copied is None or alias.asname is None:
            if copied is not None:
                raise ValueError(f"cannot rewrite 'import {alias.name}' without 'as'; edit it by hand")
            lines.append(f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
            continue
        parent, _, leaf = copied.rpartition(".")
        lines.append(f"from {dots}{parent} import {leaf} as {alias.asname}")
    return "\n".join(lines)
