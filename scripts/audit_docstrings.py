"""List what a port's docstrings and comments say about other model families and features, for review.

Scans only docstrings and comments of every .py file in PORT_DIR (read with
tokenize and ast; imports and code are not scanned). Each mention of the
donor's or another MAX family's name, and each claim such as single-GPU,
RMSNorm or QK-norm, is listed as file:line with its text and a hint: OK
(honest lineage, e.g. "Derived from ..."), Lie (a claim the file's code does
not back) or Stale (describes the donor, not this port). A reviewer approves a
hit by writing the marker ``[audit-ok: <reason>]`` on the same line (inside the
comment or the docstring line). Exit 1 while any hit has no marker.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

import cli_support
import input_files
import port_layout
from cli_support import ScriptError

EXIT_CODES = {1: "some hits have no [audit-ok: <reason>] marker yet", 2: "not used"}

MARKER = re.compile(r"\[audit-ok:\s*([^\]]*\S)\s*\]")
MARKER_SYNTAX = "[audit-ok: <reason>]"

# Family names people write in prose, besides the MAX folder names.
FAMILY_WORDS = ("llama", "olmo", "phi", "qwen", "granite", "mistral", "mixtral", "gemma", "deepseek",
                "exaone", "gpt", "internvl", "idefics", "pixtral", "bert", "mpnet", "smollm", "falcon")

# MAX folder stems that are ordinary words (or not model families); never reported as family names.
NOT_FAMILIES = {"unified", "step", "diffusion", "speculators", "autoencoders", "eagle", "muse", "inkling", "wan",
                "dflash", "dspark", "umt", "laguna"}

# Claim -> (text pattern, code identifiers whose presence in the file backs the claim).
CLAIMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "single-GPU": (r"single[- ]?(gpu|device)", ("devices",)),
    "multi-GPU": (r"multi[- ]?(gpu|device)|tensor[- ]parallel|data[- ]parallel", ("devices", "Distributed",
                                                                                    "split_batch")),
    "RMSNorm": (r"rms[- ]?norm", ("RMSNorm", "rms_norm")),
    "LayerNorm": (r"layer[- ]?norm", ("LayerNorm", "layer_norm")),
    "QK-norm": (r"qk[- ]?norm|q_norm|k_norm", ("q_norm", "k_norm", "qk_norm")),
    "sliding-window": (r"sliding[- ]window", ("sliding_window",)),
    "tied-embeddings": (r"tie[d]?[- _]?(word[- _])?embedding", ("tie_word_embeddings",)),
    "partial-rotary": (r"partial[- _]rotary", ("partial_rotary_factor",)),
}

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LINEAGE = re.compile(r"derived from|copied (by|from)|based on|borrowed from|adapted from", re.I)


@dataclass
class Hit:
    file: str
    line: int
    kind: str  # docstring | comment
    category: str  # family | claim
    term: str
    hint: str  # OK | Lie | Stale
    context: str
    marked: bool
    reason: str | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port_dir", metavar="PORT_DIR", help="the port package folder DIR/<slug>")
    parser.add_argument("--donor", default=None,
                        help="donor family name (default: read from the port's scaffold_manifest.json)")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    if args.donor is not None and not args.donor.strip():
        raise ScriptError("--donor is empty; name the donor family (e.g. llama3) or leave the flag out")
    port = port_layout.resolve_port_dir(args.port_dir)
    manifest = read_manifest(port.path)
    donor = args.donor or manifest.get("donor")
    own_names = {port.slug, str(manifest.get("arch_name") or "")} - {""}
    families = family_terms(donor)
    sources = read_port_sources(port.path)
    port_names = set().union(*(code_identifiers(tree) for _, tree in sources.values())) if sources else set()
    hits: list[Hit] = []
    for path, (text, tree) in sources.items():
        hits.extend(scan_file(path, port.path, families, own_names, port_names, parsed=(text, tree)))
    unmarked = [h for h in hits if not h.marked]
    document = {
        "port_dir": str(port.path), "donor": donor, "marker_syntax": MARKER_SYNTAX,
        "hits": [asdict(h) for h in hits], "unmarked": len(unmarked), "marked": len(hits) - len(unmarked),
    }
    if args.json:
        cli_support.print_json(document)
    else:
        for h in hits:
            state = f"marked: {h.reason}" if h.marked else f"hint {h.hint}"
            print(f"{h.file}:{h.line}: [{h.kind}] {h.term} ({state}): {h.context}")
        print(f"{len(hits)} hit(s), {len(unmarked)} unmarked; approve a hit by adding {MARKER_SYNTAX} on its line")
    return 1 if unmarked else 0


# Manifest fields the audit reads; each must be a string when present (null means absent).
MANIFEST_STRING_FIELDS = ("donor", "arch_name")

# The scaffold's manifest nests three levels (object -> files list -> file entry); anything far deeper is not one.
MANIFEST_MAX_DEPTH = 16


def read_manifest(port_path: Path) -> dict:
    """The port's scaffold manifest ({} when the port has none); ScriptError when it is not a valid one."""
    path = port_path / port_layout.MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        return {}
    document = input_files.load_json(path, "scaffold manifest")
    input_files.check_json_depth(document, f"scaffold manifest {path}", MANIFEST_MAX_DEPTH)
    for key in MANIFEST_STRING_FIELDS:
        value = document.get(key)
        if value is not None and not isinstance(value, str):
            raise ScriptError(f"scaffold manifest {path}: {key!r} is {input_files.json_type_name(value)}, "
                              "expected a string")
    return document


def read_port_sources(port_path: Path) -> dict[Path, tuple[str, ast.Module]]:
    """Text and ast of every ``.py`` entry below the port (``__pycache__`` aside); ScriptError naming a bad one."""
    return {path: input_files.read_python(path, "port file") for path in port_layout.port_python_files(port_path)}


def family_terms(donor: str | None) -> dict[str, re.Pattern[str]]:
    """Term -> pattern for every family name (MAX folder stems plus prose spellings)."""
    words = set(FAMILY_WORDS)
    try:
        arch_dir = Path(cli_support.max_package_dir()) / "pipelines" / "architectures"
        words.update(re.sub(r"[^a-z]", "", p.name.lower().split("_")[0]) for p in arch_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("_"))
    except ScriptError:
        pass
    if donor:
        words.add(re.sub(r"[^a-z]", "", donor.lower()))
    words -= NOT_FAMILIES | {""}
    return {w: re.compile(rf"(?<![a-z]){w}(?!(?!v\d)[a-z])", re.I) for w in sorted(words) if len(w) >= 3}


def text_regions(source: str, tree: ast.Module | None = None) -> list[tuple[int, str, str]]:
    """(line, kind, text) for every comment line and docstring line of a module."""
    regions: list[tuple[int, str, str]] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                regions.append((token.start[0], "comment", token.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    tree = tree if tree is not None else ast.parse(source)
    source_lines = source.splitlines()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            lines = source_lines[node.lineno - 1:node.end_lineno]
            for offset, line in enumerate(lines):
                regions.append((node.lineno + offset, "docstring", line))
    return sorted(regions)


def code_identifiers(source: str | ast.Module) -> set[str]:
    """Every name and attribute used in the code (not in strings or comments)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source) if isinstance(source, str) else source):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[-1])
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


def _identifiers_of(path: Path) -> set[str]:
    """The code identifiers of one file; a file that cannot be read or parsed is reported as exit 3."""
    return code_identifiers(input_files.read_python(path, "port file")[1])


def names_only_port_code(text: str, pattern: re.Pattern[str], port_names: set[str]) -> bool:
    """True when every mention of a family in ``text`` sits inside a name the port's code defines or imports.

    Such a mention (e.g. a kept ``Llama3Inputs`` class) names real code, so it is honest, not stale.
    """
    words = [w for w in WORD.findall(text) if pattern.search(w)]
    return bool(words) and all(w in port_names for w in words)


def scan_file(path: Path, root: Path, families: dict[str, re.Pattern[str]], own_names: set[str],
              port_names: set[str] = frozenset(), parsed: tuple[str, ast.Module] | None = None) -> list[Hit]:
    source, tree = parsed if parsed is not None else input_files.read_python(path, "port file")
    identifiers = code_identifiers(tree)
    rel = str(path.relative_to(root))
    hits = []
    for line, kind, text in text_regions(source, tree):
        marker = MARKER.search(text)
        scanned = _blank_own_names(MARKER.sub("", text), own_names)
        context = " ".join(text.strip().lstrip("#").split())[:160]
        for term, pattern in families.items():
            if pattern.search(scanned):
                honest = LINEAGE.search(scanned) or names_only_port_code(scanned, pattern, port_names)
                hint = "OK" if honest else "Stale"
                hits.append(Hit(rel, line, kind, "family", term, hint, context, bool(marker),
                                marker.group(1) if marker else None))
        for claim, (pattern, backing) in CLAIMS.items():
            if re.search(pattern, scanned, re.I):
                hint = "OK" if any(any(b.lower() in i.lower() for i in identifiers) for b in backing) else "Lie"
                hits.append(Hit(rel, line, kind, "claim", claim, hint, context, bool(marker),
                                marker.group(1) if marker else None))
    return hits


def _blank_own_names(text: str, own_names: set[str]) -> str:
    """Hide the port's own slug and architecture name, so they do not count as family mentions."""
    for name in sorted(own_names, key=len, reverse=True):
        text = re.sub(re.escape(name), " ", text, flags=re.I)
    return text


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
