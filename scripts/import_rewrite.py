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
import re
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


# --- code surgery on copied modules: drop imports, stub or remove code, rename identifiers ---------------


def bound_name(alias: ast.alias, node: ast.Import | ast.ImportFrom) -> str:
    """The name an import alias binds in the importing module."""
    if alias.asname:
        return alias.asname
    return alias.name if isinstance(node, ast.ImportFrom) else alias.name.partition(".")[0]


def names_used(nodes: list[ast.AST]) -> set[str]:
    """Every identifier the nodes read: plain names and attribute names (``x.name`` counts ``name`` too)."""
    found: set[str] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Name):
                found.add(node.id)
            elif isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                found.update(alias.name for alias in node.names)
    return found


def _statement_start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno, *(d.lineno for d in decorators)])


def _line_edits(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace whole line ranges (1-based, inclusive) with new text; ranges must not overlap."""
    lines = text.splitlines(keepends=True)
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new] if new else []
    return "".join(lines)


def _import_text(node: ast.Import | ast.ImportFrom, keep: list[ast.alias], indent: str) -> str:
    def spelled(alias: ast.alias) -> str:
        return alias.name + (f" as {alias.asname}" if alias.asname else "")

    if not keep:
        return ""
    if isinstance(node, ast.Import):
        return "".join(f"{indent}import {spelled(a)}\n" for a in keep)
    module = "." * node.level + (node.module or "")
    return "".join(f"{indent}{line}\n" for line in _from_line(module, [spelled(a) for a in keep]).splitlines())


def remove_import_names(text: str, doomed: set[str]) -> tuple[str, list[str]]:
    """Drop the import aliases that bind a name in ``doomed``; an emptied block gets ``pass``."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    removed: list[str] = []
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        keep = [a for a in node.names if bound_name(a, node) not in doomed]
        if len(keep) == len(node.names):
            continue
        removed += [bound_name(a, node) for a in node.names if a not in keep]
        first = lines[node.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        new = _import_text(node, keep, indent)
        parent = parents.get(node)
        body = getattr(parent, "body", None)
        if not new and isinstance(parent, (ast.If, ast.Try)) and body and all(
                isinstance(s, (ast.Import, ast.ImportFrom)) and all(bound_name(a, s) in doomed for a in s.names)
                for s in body) and node is body[0]:
            new = f"{indent}pass\n"
        edits.append((node.lineno, node.end_lineno or node.lineno, new))
    return _line_edits(text, edits), removed


def imports_of_modules(text: str, importer: SourceModule, modules: set[str], index: ModuleIndex) -> set[str]:
    """The names ``importer`` binds by importing any of ``modules`` (or a symbol defined in one)."""
    tree = ast.parse(text)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias, target in zip(node.names, import_targets(node, importer, index)):
                if target.module in modules:
                    names.add(bound_name(alias, node))
        elif isinstance(node, ast.Import):
            names.update(bound_name(a, node) for a in node.names if a.name in modules)
    return names


def stub_functions_using(text: str, names: set[str], message: str,
                         function_name: re.Pattern[str]) -> tuple[str, list[str], list[str]]:
    """Cut the code that reads ``names`` (bound by imports that were dropped) so the module still imports.

    A function whose name matches ``function_name`` (a multi-device path such as ``_tensor_parallel_spec``)
    and whose code reads one of ``names`` keeps its signature and docstring, and its body becomes
    ``raise NotImplementedError(message)``. A name still read anywhere else gets a placeholder class that
    raises the same error when called or instantiated, so a shared path (``A(...) if one_device else B(...)``)
    keeps working on one device. Returns the text, the stubbed functions and the placeholder names.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    stubbed: list[tuple[ast.AST, str]] = []

    def visit(node: ast.AST, qualname: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{qualname}{child.name}"
                if function_name.search(child.name) and names & names_used(child.body):
                    stubbed.append((child, name))
                    continue
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}{child.name}.")

    visit(tree, "")
    edits: list[tuple[int, int, str]] = []
    for func, _ in stubbed:
        body = func.body  # type: ignore[attr-defined]
        keep_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str))
        first = body[1] if keep_doc and len(body) > 1 else (None if keep_doc else body[0])
        indent = " " * body[0].col_offset
        raise_line = f"{indent}raise NotImplementedError({message!r})\n"
        if first is None:  # only a docstring: add the raise after it
            edits.append((body[0].end_lineno + 1, body[0].end_lineno, raise_line))
            continue
        edits.append((_statement_start(first), body[-1].end_lineno, raise_line))
    new_text = _insertions_and_edits(lines, edits)
    new_text = _redescribe_dispatchers(new_text, {name.rpartition(".")[2] for _, name in stubbed})
    still_read = sorted(names & names_used([n for n in ast.parse(new_text).body
                                            if not isinstance(n, (ast.Import, ast.ImportFrom))]))
    if still_read:
        new_text = _insert_after_imports(new_text, "".join(_placeholder(n, message) for n in still_read))
    return new_text, [name for _, name in stubbed], still_read


DISPATCHER_DOC = ("Builds the graph spec this port runs, the single-device one; every other branch below\n"
                  "raises NotImplementedError, since the scaffold copied no graph for more devices.")


def _redescribe_dispatchers(text: str, stubbed: set[str]) -> str:
    """Rewrite the docstring of each function that calls a stubbed one: it no longer dispatches as described."""
    if not stubbed:
        return text
    edits: list[tuple[ast.AST, str]] = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name in stubbed:
            continue
        calls = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", None)
                 for c in ast.walk(node) if isinstance(c, ast.Call)}
        first = node.body[0]
        if calls & stubbed and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            indent = " " * first.col_offset
            edits.append((first, '"""' + DISPATCHER_DOC.replace("\n", "\n" + indent) + '"""'))
    return replace_spans(text, edits) if edits else text


def _placeholder(name: str, message: str) -> str:
    return (f"\n\nclass {name}:\n"
            f'    """Placeholder for a name whose module was not copied; using it raises."""\n\n'
            f"    def __init__(self, *args: object, **kwargs: object) -> None:\n"
            f"        raise NotImplementedError({message!r})\n")


def insert_after_imports(text: str, line: str) -> str:
    """Insert ``line`` (ending in a newline) after the last top-level import, or at the top when there is none."""
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


def _insert_after_imports(text: str, block: str) -> str:
    """``insert_after_imports`` of ``block``, then the blank lines tidied."""
    return _tidy_blank_lines(insert_after_imports(text, block + "\n"))


def _insertions_and_edits(lines: list[str], edits: list[tuple[int, int, str]]) -> str:
    """Apply line-range edits; a range whose end precedes its start is an insertion before line ``start``."""
    for start, end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        if end < start:
            lines[start - 1:start - 1] = [new]
        else:
            lines[start - 1:end] = [new]
    return "".join(lines)


def top_level_definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Name -> statement for the module's top-level classes, functions and single-name assignments."""
    found: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def remove_unused_definitions(texts: dict[str, str], candidates: dict[str, set[str]]) -> tuple[dict[str, str], list[str]]:
    """Remove candidate top-level definitions no kept code reads, and imports only they used.

    ``candidates`` maps a file to names defined at its top level. A candidate read by any code that stays
    (in its own file or another) stays too, with everything it reads. Returns the new texts and the removed
    ``file:name`` entries.
    """
    trees = {path: ast.parse(text) for path, text in texts.items()}
    defs = {path: top_level_definitions(tree) for path, tree in trees.items()}
    pool = {(path, name) for path, names in candidates.items() for name in names if name in defs.get(path, {})}
    kept_reads: set[str] = set()
    for path, tree in trees.items():
        doomed_nodes = {id(defs[path][n]) for p, n in pool if p == path}
        kept_reads |= names_used([node for node in tree.body if id(node) not in doomed_nodes])
    removed = set(pool)
    changed = True
    while changed:
        changed = False
        for path, name in sorted(removed):
            if name in kept_reads:
                removed.discard((path, name))
                kept_reads |= names_used([defs[path][name]])
                changed = True
    new_texts = dict(texts)
    for path in sorted({p for p, _ in removed}):
        names = {n for p, n in removed if p == path}
        nodes = [defs[path][n] for n in names]
        read_by_removed = names_used(nodes)
        edits = [(_statement_start(node), node.end_lineno or node.lineno, "") for node in nodes]
        text = _tidy_blank_lines(_line_edits(texts[path], edits))
        still_read = names_used([n for n in ast.parse(text).body if not isinstance(n, (ast.Import, ast.ImportFrom))])
        imported = {bound_name(a, n) for n in ast.parse(text).body if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names}
        text, _ = remove_import_names(text, (read_by_removed & imported) - still_read - {"annotations"})
        new_texts[path] = text
    return new_texts, [f"{p}:{n}" for p, n in sorted(removed)]


def _tidy_blank_lines(text: str) -> str:
    """Collapse runs of more than two blank lines (left by removed definitions) to two."""
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.rstrip("\n") + "\n"


@dataclass(frozen=True)
class Renames:
    """How a port copied from another port is renamed.

    ``class_prefix`` maps the old class-name prefix (``StableLm``) to the new one, ``slug`` the old package
    and graph-module name to the new one, ``arch_name`` the registered architecture name. Identifiers are
    renamed in code; in strings and comments only the architecture name, prefixed class names and
    ``<slug>.py`` file names are, so string values the graph carries (its name) stay as they were.
    """

    class_prefix: tuple[str, str]
    slug: tuple[str, str]
    arch_name: tuple[str, str]

    def identifier(self, name: str) -> str:
        old_prefix, new_prefix = self.class_prefix
        if old_prefix != new_prefix and re.match(rf"{re.escape(old_prefix)}(?![a-z])", name):
            return new_prefix + name[len(old_prefix):]
        old_slug, new_slug = self.slug
        for old, new in ((old_slug, new_slug), (old_slug.upper(), new_slug.upper())):
            name = re.sub(rf"(?<![A-Za-z0-9]){re.escape(old)}(?![A-Za-z0-9])", new, name)
        return name

    def prose(self, text: str) -> str:
        old_arch, new_arch = self.arch_name
        text = re.sub(rf"\b{re.escape(old_arch)}\b", new_arch, text)
        old_prefix, new_prefix = self.class_prefix
        text = re.sub(rf"\b{re.escape(old_prefix)}(?![a-z])(\w*)", lambda m: new_prefix + m.group(1), text)
        old_slug, new_slug = self.slug
        return re.sub(rf"(?<![\w.]){re.escape(old_slug)}\.py\b", f"{new_slug}.py", text)

    def path(self, rel_path: str) -> str:
        parts = rel_path.split("/")
        parts[-1] = self.identifier(parts[-1][:-3]) + ".py" if parts[-1].endswith(".py") else parts[-1]
        return "/".join([*(self.identifier(p) for p in parts[:-1]), parts[-1]])


def rename_source(text: str, renames: Renames) -> tuple[str, list[str]]:
    """Apply ``renames`` token by token; returns the text and one ``old -> new`` line per distinct rename."""
    import io
    import tokenize

    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, int, str]] = []  # (row, start col, end col, new) on one-line tokens
    multi: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    changes: dict[str, str] = {}
    exports = _export_strings(tokens)
    for token in tokens:
        if token.type == tokenize.NAME:
            new = renames.identifier(token.string)
        elif token.type == tokenize.STRING and token.start in exports:
            quote = token.string[0]
            new = quote + renames.identifier(token.string[1:-1]) + quote
        elif token.type in (tokenize.STRING, tokenize.COMMENT):
            new = renames.prose(token.string)
        else:
            continue
        if new == token.string:
            continue
        if token.type == tokenize.NAME:
            changes[token.string] = new
        if token.start[0] == token.end[0]:
            edits.append((token.start[0], token.start[1], token.end[1], new))
        else:
            multi.append((token.start, token.end, new))
    text = _apply_token_edits(lines, edits, multi)
    return text, [f"{old} -> {new}" for old, new in sorted(changes.items())]


def _export_strings(tokens: list) -> set[tuple[int, int]]:
    """Start positions of the plain-name strings listed in a module-level ``__all__ = [...]``: names, not prose."""
    import tokenize

    found: set[tuple[int, int]] = set()
    depth, inside = 0, False
    for previous, token in zip([None, *tokens], tokens):
        if token.type == tokenize.NAME and token.string == "__all__" and token.start[1] == 0:
            inside, depth = True, 0
        elif inside and token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif inside and token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
            inside = depth > 0
        elif inside and token.type == tokenize.STRING and depth > 0 and \
                re.fullmatch(r"(['\"])[A-Za-z_]\w*\1", token.string):
            found.add(token.start)
    return found


def _apply_token_edits(lines: list[str], edits: list[tuple[int, int, int, str]],
                       multi: list[tuple[tuple[int, int], tuple[int, int], str]]) -> str:
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    text = "".join(lines)
    spans = [(offsets[r - 1] + a, offsets[r - 1] + b, new) for r, a, b, new in edits]
    spans += [(offsets[s[0] - 1] + s[1], offsets[e[0] - 1] + e[1], new) for s, e, new in multi]
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text
