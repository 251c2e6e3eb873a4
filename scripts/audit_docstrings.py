"""List what a port's docstrings and comments claim that the port does not do, for review.

Scans only docstrings and comments of every .py file in PORT_DIR (read with
tokenize and ast; imports and code are not scanned). A hit is a line that needs
a reviewer: a mention of the donor's or another family's name (hint Stale: the
text describes the donor, not this port) or a claim such as QK-norm, GQA,
sliding window, tied embeddings or multi-GPU that no file of the port
implements (hint Lie). Mentions the audit can settle itself are listed as
cleared, each with why: lineage ("Derived from ..."), a name the port's code
defines, a claim some file of the port implements (that file is named), a
negation or comparison ("no QK-norm", "instead of RMSNorm"). The target's own
names (slug, architecture name, model_type) and terms inside identifiers
(``input_layernorm``) are not mentions. A reviewer approves a hit with the
marker ``[audit-ok: <reason>]`` on its line, inside the docstring or in a ``#``
comment; ``--approve FILE:LINE --reason TEXT`` writes it without breaking the
file. Exit 1 while any hit has no marker.
"""

from __future__ import annotations

import argparse
import ast
import enum
import io
import os
import re
import sys
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cli_support
import input_files
import port_layout
from cli_support import ScriptError

EXIT_CODES = {1: "some hits have no [audit-ok: <reason>] marker yet", 2: "not used"}

MARKER = port_layout.REVIEW_MARKER
MARKER_SYNTAX = "[audit-ok: <reason>]"

# A reason longer than this no longer fits on the line beside the text it approves; say more in the worksheet.
REASON_MAX_CHARS = 200

# Prefix of the staging folder --approve writes a file into before moving it over the original.
STAGING_PREFIX = ".audit-approve-"


class Hint(str, enum.Enum):
    """What a hit probably is; the reviewer decides."""

    LIE = "Lie"  # a claim no file of the port implements
    STALE = "Stale"  # names the donor or another family: text about the donor, not this port


class Clearance(str, enum.Enum):
    """Why a mention needs no review."""

    LINEAGE = "lineage"  # says where the text comes from ("Derived from ...", "the donor's ...")
    PORT_CODE = "names port code"  # every family mention sits in a name the port's code defines or uses
    BACKED = "backed"  # some file of the port implements the claim
    NEGATED = "negated or compared"  # "no QK-norm", "instead of RMSNorm", "unlike Llama"


class Category(str, enum.Enum):
    """What a mention is of: a family name or a capability claim."""

    FAMILY = "family"
    CLAIM = "claim"


# Family names people write in prose, besides the MAX folder names.
FAMILY_WORDS = ("llama", "olmo", "phi", "qwen", "granite", "mistral", "mixtral", "gemma", "deepseek",
                "exaone", "gpt", "internvl", "idefics", "pixtral", "bert", "mpnet", "smollm", "falcon")

# MAX folder stems that are ordinary words (or not model families); never reported as family names.
NOT_FAMILIES = {"unified", "step", "diffusion", "speculators", "autoencoders", "eagle", "muse", "inkling", "wan",
                "dflash", "dspark", "umt", "laguna"}

# Names that contain a family word but name something else: a program and a quantization format.
NOT_FAMILY_PHRASES = re.compile(r"llama\.cpp|gpt[- ]?q\b", re.I)

# A family word is at least this long, so two-letter folder stems never match inside ordinary words.
FAMILY_MIN_CHARS = 3


@dataclass(frozen=True)
class Claim:
    """A capability the text can claim, and the code names whose use in any port file implements it."""

    text: str  # pattern of the claim in prose
    evidence: str  # pattern matched against names the port's code uses (not merely declares)


CLAIMS: dict[str, Claim] = {
    "single-GPU": Claim(r"single[- ]?(gpu|device)s?", r"$^"),  # decided by _multi_gpu_facts, see _judge_claim
    "multi-GPU": Claim(r"multi[- ]?(gpu|device)s?|tensor[- ]parallel(ism)?|data[- ]parallel(ism)?|"
                       r"(several|multiple|many)\s+(gpus|devices)",
                       r"Distributed|DataParallel|TensorParallel|split_batch|[Aa]llreduce|ShardingStrategy"),
    "RMSNorm": Claim(r"rms[- ]?norms?", r"RMSNorm|RmsNorm|(^|_)rms_?norm($|_)"),
    "LayerNorm": Claim(r"layer[- ]?norms?", r"LayerNorm|(^|_)layer_norm($|_)"),
    "QK-norm": Claim(r"qk[- ]?norms?|q_norm|k_norm|query[- /]key[- ]norm",
                     r"(^|_)(q|k|qk|query|key)_?(layer)?norm($|_)"),
    "GQA": Claim(r"gqa|mqa|grouped[- ]query([- ]attention)?|multi[- ]query([- ]attention)?",
                 r"(^|_)(n|num)_?(kv|key_value)_heads?($|_)|(^|_)num_key_value_groups($|_)"),
    "sliding-window": Claim(r"sliding[- ]window(s|ed)?|local[- ]attention", r"sliding_?window|SlidingWindow"),
    "tied-embeddings": Claim(r"tied?[- _]?(word[- _])?embeddings?|tied[- ](lm[- ])?head|weight[- ]tying|"
                             r"head\s+(is\s+)?tied|tied\s+(to|with)\s+the\s+(\w+\s+)?embeddings?|"
                             r"embeddings?\s+(are\s+)?tied|shares?\s+(its\s+)?weights?\s+with\s+the\s+(\w+\s+)?"
                             r"embeddings?",
                             r"tie_word_embeddings|tied?_embedding"),
    "partial-rotary": Claim(r"partial[- _]rotary", r"partial_rotary|rotary_dim|rotary_pct"),
    "MoE": Claim(r"\bmoe\b|mixture[- ]of[- ]experts?|expert[- ]parallel(ism)?", r"[Ee]xpert|MoE|(^|_)moe($|_)"),
}

# A statement that only a single-device setup is meant, not "also has a single-device path".
EXCLUSIVE = re.compile(r"\b(only|just|exclusively|never)\b", re.I)

LINEAGE = re.compile(r"derived from|copied (by|from)|based on|borrowed from|adapted from|\bdonor\b", re.I)

# A claim this soon after "the donor's" describes the donor's part, not this port's.
DONOR_OWNED = re.compile(r"\bdonor's\W+([\w-]+\W+){0,2}$", re.I)

# Words that negate or compare what follows them in the same clause.
NEGATION_BEFORE = re.compile(
    r"\b(no|not|never|without|instead of|unlike|rather than|in place of|neither|nor|cannot|vs\.?|versus|"
    r"compared (to|with)|differs? from|replac(e|es|ed|ing)|remov(e|es|ed|ing)|drop(s|ped|ping)?|"
    r"disabl(e|es|ed|ing)|\w+n't)\b", re.I)
NOT_A_NEGATION = re.compile(r"\bnot (only|just|merely)\b", re.I)
# Words after a term that say it is absent: "QK-norm is not applied", "paths ... were removed".
NEGATION_AFTER_WORDS = 5
NEGATION_AFTER = re.compile(
    rf"^\W*([\w-]+\W+){{0,{NEGATION_AFTER_WORDS}}}?((is|are|was|were|been|be)\s+(not|never|removed|dropped|deleted|disabled|gone)\b|"
    r"not (supported|used|implemented|applied|needed)\b|unsupported\b|removed\b|dropped\b)", re.I)
# ... or that it is the donor's: "the data-parallel paths of the donor".
DONOR_OWNED_AFTER = re.compile(r"^\W*([\w-]+\W+){0,4}?(of|from|in) the donor\b", re.I)
# A negation reaches over fewer than this many other words ("not the fused RMSNorm"), within one clause;
# the claim terms of a list ("no QK-norm, GQA or sliding window") do not count.
NEGATION_REACH_WORDS = 4
CLAUSE_END = re.compile(r"[;:!?()\[\]{}]|\.(?=\s|$)|--|\u2014")
SENTENCE_END = re.compile(r"[;!?()\[\]{}]|\.(?=\s|$)|--|\u2014")
SCOPE_BREAK = re.compile(r"\b(but|while|whereas|yet|however|though|although|because|which|that|so)\b", re.I)
# After a comma a negation goes on only through a list of terms: "no QK-norm, GQA or sliding window".
LIST_WORDS = {"and", "or", "nor", "a", "an", "the", "any"}

IDENTIFIER_CHAR = re.compile(r"[A-Za-z0-9_]")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VERSION = re.compile(r"[-\s]?v?(\d+(\.\d+)?)")


@dataclass
class Hit:
    file: str
    line: int
    kind: str  # docstring | comment
    category: Category
    term: str
    hint: Hint
    why: str
    context: str
    marked: bool
    reason: str | None


@dataclass
class Cleared:
    file: str
    line: int
    kind: str
    category: Category
    term: str
    cleared_by: Clearance
    why: str
    context: str


@dataclass
class PortFacts:
    """What the port's code (not its text) says, read once for all files."""

    names: set[str] = field(default_factory=set)  # every name defined, imported or used, plus module stems
    used: dict[str, set[str]] = field(default_factory=dict)  # file -> names used (loads, keywords, code strings)
    multi_gpu_flags: list[tuple[str, bool]] = field(default_factory=list)  # (file, value of multi_gpu_supported)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port_dir", metavar="PORT_DIR", help="the port package folder DIR/<slug>")
    parser.add_argument("--donor", default=None,
                        help="donor family name (default: read from the port's scaffold_manifest.json)")
    parser.add_argument("--model-type", default=None,
                        help="the target's Hugging Face model_type, never a donor mention "
                             "(default: the manifest's model_type, if any)")
    parser.add_argument("--approve", action="append", default=[], metavar="FILE:LINE",
                        help="write the marker on this hit's line (repeatable; FILE as the audit prints it); "
                             "needs --reason")
    parser.add_argument("--reason", default=None, help="the reviewed reason written into the --approve marker")
    parser.add_argument("--show-cleared", action="store_true",
                        help="also print the mentions the audit cleared itself, with why (always in --json)")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    for flag, value in (("--donor", args.donor), ("--model-type", args.model_type)):
        if value is not None and not value.strip():
            raise ScriptError(f"{flag} is empty; name it or leave the flag out")
    if args.reason is not None and not args.approve:
        raise ScriptError("--reason is only used with --approve FILE:LINE")
    port = port_layout.resolve_port_dir(args.port_dir)
    audit = Audit.of(port, args.donor, args.model_type)
    if args.approve:
        return approve(audit, args)
    hits, cleared = audit.scan()
    unmarked = [h for h in hits if not h.marked]
    document = {
        "port_dir": str(port.path), "donor": audit.donor, "own_names": sorted(audit.own_names),
        "marker_syntax": MARKER_SYNTAX, "hits": [asdict(h) for h in hits], "unmarked": len(unmarked),
        "marked": len(hits) - len(unmarked), "cleared": [asdict(c) for c in cleared],
        "library_blocks": [{"file": audit.rel(path), "name": r.get("name"), "version": r.get("version")}
                           for path, r in sorted(audit.library_blocks.items())],
    }
    if args.json:
        cli_support.print_json(document)
        return 1 if unmarked else 0
    for h in hits:
        state = f"marked: {h.reason}" if h.marked else f"hint {h.hint.value}"
        print(f"{h.file}:{h.line}: [{h.kind}] {h.term} ({state}; {h.why}): {h.context}")
    if args.show_cleared:
        for c in cleared:
            print(f"{c.file}:{c.line}: [{c.kind}] {c.term} cleared, {c.cleared_by.value}: {c.why}")
    by_reason = {r.value: sum(c.cleared_by is r for c in cleared) for r in Clearance}
    summary = ", ".join(f"{n} {r}" for r, n in by_reason.items() if n)
    print(f"{len(hits)} hit(s), {len(unmarked)} unmarked; {len(cleared)} mention(s) cleared"
          f"{f' ({summary})' if summary else ''}{'' if args.show_cleared else ', --show-cleared lists them'}")
    if audit.library_blocks:
        names = ", ".join(audit.rel(path) for path in sorted(audit.library_blocks))
        print(f"not audited: {len(audit.library_blocks)} unmodified library block file(s) ({names}); "
              "an edited block is audited")
    if unmarked:
        print(f"approve a reviewed hit: audit {port.path} --approve FILE:LINE --reason TEXT "
              f"(writes {MARKER_SYNTAX} on that line)")
    return 1 if unmarked else 0


# --- the port: its files, names and facts ---------------------------------------------------

# Manifest fields the audit reads; each must be a string when present (null means absent).
MANIFEST_STRING_FIELDS = ("donor", "arch_name", "model_type")

# The scaffold's manifest nests three levels (object -> files list -> file entry); anything far deeper is not one.
MANIFEST_MAX_DEPTH = 16


@dataclass
class Audit:
    """One port, read: its sources, its own names, the family terms and the facts of its code."""

    port: port_layout.PortDir
    donor: str | None
    donors: list[str]  # the donor and every port in the manifest's lineage: their names are donor mentions
    own_names: set[str]
    sources: dict[Path, tuple[str, ast.Module]]
    families: dict[str, re.Pattern[str]]
    facts: PortFacts
    library_blocks: dict[Path, dict] = field(default_factory=dict)  # unmodified block copies: not audited

    @classmethod
    def of(cls, port: port_layout.PortDir, donor: str | None, model_type: str | None) -> "Audit":
        manifest = read_manifest(port.path)
        donor = donor or manifest.get("donor")
        donors = [d for d in [donor, *lineage_slugs(manifest, port.path)] if d]
        sources = read_port_sources(port.path)
        own = {port.slug, str(manifest.get("arch_name") or ""), model_type or str(manifest.get("model_type") or "")}
        own.add(_arch_name(port.path, sources) or "")
        own |= {re.split(r"For[A-Z]", name)[0] for name in own if re.search(r"For[A-Z]", name)}
        own -= {""}
        blocks = unmodified_blocks(port.path, manifest)
        # A library block's options are what it can do, not what the port does: the port's own code
        # (which imports and configures the blocks) is the evidence for its docstrings.
        facts = port_facts(port.path, {p: s for p, s in sources.items() if p not in blocks})
        return cls(port, donor, donors, own, sources, family_terms(donors), facts, blocks)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.port.path))

    def scan(self, only: Path | None = None, text: str | None = None) -> tuple[list[Hit], list[Cleared]]:
        """Hits and cleared mentions of every file (or of ``only``, optionally with edited ``text``)."""
        hits: list[Hit] = []
        cleared: list[Cleared] = []
        for path, (source, tree) in self.sources.items():
            if only is not None and path != only:
                continue
            if path in self.library_blocks and text is None:
                continue  # a verbatim copy of a reviewed library block (its hash is the manifest's)
            if text is not None:
                source, tree = text, ast.parse(text)
            found = scan_file(self.rel(path), source, tree, self)
            hits.extend(f for f in found if isinstance(f, Hit))
            cleared.extend(f for f in found if isinstance(f, Cleared))
        return hits, cleared


def unmodified_blocks(port_path: Path, manifest: dict) -> dict[Path, dict]:
    """Block files the manifest records whose bytes still hash to the recorded sha256: library code reviewed with
    the skill, so their docstrings (which name the transformers code they mirror) are not the port's claims.
    A block the port edited hashes differently and is audited like any other file."""
    records = manifest.get("blocks")
    return {port_path / record["file"]: record for record in (records if isinstance(records, list) else [])
            if port_layout.block_is_unmodified(port_path, record)}


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


def _arch_name(port_path: Path, sources: dict[Path, tuple[str, ast.Module]]) -> str | None:
    """The ``name=`` of the ``SupportedArchitecture(...)`` call in arch.py, when it is a literal."""
    parsed = sources.get(port_path / "arch.py")
    if parsed is None:
        return None
    for node in ast.walk(parsed[1]):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                == "SupportedArchitecture":
            for kw in node.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    return kw.value.value
    return None


def lineage_slugs(manifest: dict, port_path: Path) -> list[str]:
    """The slugs of the manifest's ``lineage`` (oldest first); ScriptError when it is not a list of objects."""
    lineage = manifest.get("lineage")
    if lineage is None:
        return []
    path = port_path / port_layout.MANIFEST_NAME
    if not isinstance(lineage, list) or not all(isinstance(entry, dict) for entry in lineage):
        raise ScriptError(f"scaffold manifest {path}: 'lineage' is {input_files.json_type_name(lineage)}, "
                          "expected a list of objects")
    slugs = []
    for entry in lineage:
        for key in ("slug", "arch_name"):
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise ScriptError(f"scaffold manifest {path}: a lineage {key!r} is "
                                  f"{input_files.json_type_name(value)}, expected a string")
        if entry.get("slug"):
            slugs.append(entry["slug"])
    return slugs


def family_terms(donors: list[str]) -> dict[str, re.Pattern[str]]:
    """Term -> pattern for every family name (MAX folder stems plus prose spellings)."""
    words = set(FAMILY_WORDS)
    try:
        arch_dir = Path(cli_support.max_package_dir()) / "pipelines" / "architectures"
        words.update(re.sub(r"[^a-z]", "", p.name.lower().split("_")[0]) for p in arch_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("_"))
    except ScriptError:
        pass
    for donor in donors:
        words.add(re.sub(r"[^a-z]", "", Path(donor).name.lower()))
    words -= NOT_FAMILIES | {""}
    return {w: re.compile(rf"(?<![a-z]){w}(?!(?!v\d)[a-z])", re.I) for w in sorted(words)
            if len(w) >= FAMILY_MIN_CHARS}


def code_identifiers(source: str | ast.Module) -> set[str]:
    """Every name and attribute defined, imported or used in the code (not in strings or comments)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source) if isinstance(source, str) else source):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[-1])
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def used_names(tree: ast.Module) -> set[str]:
    """Names the code implements or uses: functions and classes it defines, loads, call keywords, code strings.

    A field that is only declared (``sliding_window: int | None = None``) or a type that only lists an
    option (``Literal["rms_norm", ...]``) does not implement anything, so neither counts.
    """
    annotation_nodes: set[int] = set()
    for node in ast.walk(tree):
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if isinstance(ann, ast.AST):
                annotation_nodes.update(id(n) for n in ast.walk(ann))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in annotation_nodes:
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in annotation_nodes:
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in annotation_nodes
              and WORD.fullmatch(node.value)):
            names.add(node.value)
    return names


def _multi_gpu_flags(tree: ast.Module) -> list[bool]:
    """Every literal value given to ``multi_gpu_supported`` (a keyword or an assignment)."""
    values = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "multi_gpu_supported":
            value = node.value
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not any(getattr(t, "id", getattr(t, "attr", None)) == "multi_gpu_supported" for t in targets):
                continue
            value = node.value
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, bool):
            values.append(value.value)
    return values


def port_facts(port_path: Path, sources: dict[Path, tuple[str, ast.Module]]) -> PortFacts:
    facts = PortFacts()
    for path, (_, tree) in sources.items():
        rel = str(path.relative_to(port_path))
        used = used_names(tree)
        facts.used[rel] = used
        facts.names |= code_identifiers(tree) | used | {path.stem}
        facts.multi_gpu_flags.extend((rel, value) for value in _multi_gpu_flags(tree))
    return facts


# --- the text: docstring and comment lines ---------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One line of a docstring or comment; ``block`` numbers the docstring or comment block it belongs to."""

    line: int
    kind: str  # docstring | comment
    text: str
    block: int


def text_regions(source: str, tree: ast.Module | None = None) -> list[Region]:
    """Every comment line and docstring line of a module, in order.

    A docstring is any string statement; its text per line is the string's own part of that line, so a
    comment after the closing quotes is its own region. Comments on consecutive lines form one block.
    """
    tree = tree if tree is not None else ast.parse(source)
    statement_lines = {node.lineno for node in ast.walk(tree)
                       if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                       and isinstance(node.value.value, str)}
    regions: list[Region] = []
    previous = None
    block = 0
    last_comment_line = -1
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                full_line = not token.line[:token.start[1]].strip()
                if not full_line or token.start[0] != last_comment_line + 1:
                    block += 1
                last_comment_line = token.start[0] if full_line else -1
                regions.append(Region(token.start[0], "comment", token.string, block))
            elif (token.type == tokenize.STRING and token.start[0] in statement_lines
                  and (previous is None or previous.type in _STATEMENT_START
                       or previous.type == tokenize.STRING or previous.string in (";", ":"))):
                block += 1
                for offset, part in enumerate(re.split(r"\r\n|\r|\n", token.string)):
                    regions.append(Region(token.start[0] + offset, "docstring", part, block))
            if token.type not in (tokenize.NL, tokenize.COMMENT):
                previous = token
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return sorted(regions, key=lambda r: (r.line, r.kind))


_STATEMENT_START = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)


def _clause_before(text: str, start: int) -> str:
    """The text of the clause that ends where a term starts."""
    head = text[:start]
    ends = list(CLAUSE_END.finditer(head))
    return head[ends[-1].end():] if ends else head


def _clause_after(text: str, end: int) -> str:
    """The text of the clause that starts where a term ends (up to a comma or a scope-breaking word)."""
    tail = NOT_A_NEGATION.sub(" ", text[end:])
    stops = [m.start() for m in (SENTENCE_END.search(tail), re.search(",", tail), SCOPE_BREAK.search(tail)) if m]
    return tail[:min(stops)] if stops else tail


def _other_words(text: str) -> int:
    """How many words of ``text`` are not part of a claim term."""
    for spec in CLAIMS.values():
        text = re.sub(spec.text, " ", text, flags=re.I)
    return len(re.findall(r"[A-Za-z]+", text))


def _only_list_words(text: str) -> bool:
    """True when ``text`` holds nothing but claim terms and list words (the rest of "no A, B or C")."""
    for spec in CLAIMS.values():
        text = re.sub(spec.text, " ", text, flags=re.I)
    return all(w.lower() in LIST_WORDS for w in re.findall(r"[A-Za-z]+", text))


def negated(text: str, start: int, end: int) -> bool:
    """True when a negation or comparison governs the term at ``text[start:end]``."""
    before = NOT_A_NEGATION.sub(" ", _clause_before(text, start))
    last = None
    for match in NEGATION_BEFORE.finditer(before):
        last = match
    if last is not None:
        between = before[last.end():]
        listed = "," not in between or _only_list_words(between.split(",", 1)[1])
        if _other_words(between) < NEGATION_REACH_WORDS and not SCOPE_BREAK.search(between) and listed:
            return True
    after = _clause_after(text, end)
    return bool(NEGATION_AFTER.search(after) or DONOR_OWNED_AFTER.search(after))


def inside_identifier(text: str, start: int, end: int) -> bool:
    """True when ``text[start:end]`` is part of a longer identifier or dotted name (``input_layernorm``)."""
    def joined(i: int, step: int) -> bool:
        if not 0 <= i < len(text):
            return False
        if IDENTIFIER_CHAR.match(text[i]):
            return True
        return text[i] == "." and 0 <= i + step < len(text) and bool(IDENTIFIER_CHAR.match(text[i + step]))
    return joined(start - 1, -1) or joined(end, 1)


def _own_family(term: str, version: str, own_names: set[str]) -> bool:
    """True when the family word (with its version, if written) is the target's own family.

    The word must start a part of an own name (``gpt`` in ``gpt_neox`` or ``GPTNeoX``), not sit inside one
    (``llama`` in ``XLlama``); a written version must agree with the name's.
    """
    mention = version.split(".")[0]  # Qwen2.5 is of the qwen2 family line
    for name in own_names:
        for part in re.split(r"[^A-Za-z0-9]+", name):
            flat = part.lower()
            if not flat.startswith(term):
                continue
            own_version = re.match(r"\d+", flat[len(term):])
            if not mention or not own_version:
                return True
            if own_version.group() == mention:
                return True
    return False


def _blank(text: str, pattern: re.Pattern[str] | str) -> str:
    """Replace matches with spaces of the same length, so offsets keep pointing at the original text."""
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.I)
    return compiled.sub(lambda m: " " * len(m.group()), text)


def _blank_own_names(text: str, own_names: set[str]) -> str:
    for name in sorted(own_names, key=len, reverse=True):
        text = _blank(text, re.escape(name))
    return text


@dataclass(frozen=True)
class Span:
    """A term's place: the line's text (own names blanked) inside its block's joined text."""

    line_text: str
    block_text: str
    offset: int  # where the line starts in block_text

    def negated(self, start: int, end: int) -> bool:
        return negated(self.block_text, self.offset + start, self.offset + end)

    def before(self, start: int) -> str:
        return self.block_text[:self.offset + start]


def _scannable(text: str, own_names: set[str]) -> str:
    """The text with markers, non-family phrases and the target's own names blanked out."""
    return _blank_own_names(_blank(_blank(text, MARKER), NOT_FAMILY_PHRASES), own_names)


def scan_file(rel: str, source: str, tree: ast.Module, audit: "Audit") -> list[Hit | Cleared]:
    """Every hit and cleared mention in one file's docstrings and comments."""
    regions = text_regions(source, tree)
    markers: dict[int, str] = {}
    for region in regions:
        marker = MARKER.search(region.text)
        if marker and region.line not in markers:
            markers[region.line] = marker.group(1)
    blocks: dict[int, list[Region]] = {}
    for region in regions:
        blocks.setdefault(region.block, []).append(region)
    found: list[Hit | Cleared] = []
    for members in blocks.values():
        texts = [_scannable(r.text, audit.own_names) for r in members]
        block_text = "\n".join(texts)
        offset = 0
        for region, text in zip(members, texts):
            span = Span(text, block_text, offset)
            offset += len(text) + 1
            context = " ".join(region.text.strip().lstrip("#").split())[:160]

            def add(category: Category, term: str, verdict: Hint | Clearance, why: str, line=region.line,
                    kind=region.kind, context=context) -> None:
                if isinstance(verdict, Clearance):
                    found.append(Cleared(rel, line, kind, category, term, verdict, why, context))
                else:
                    found.append(Hit(rel, line, kind, category, term, verdict, why, context, line in markers,
                                     markers.get(line)))

            for term, pattern in audit.families.items():
                verdict = _judge_family(span, term, pattern, audit)
                if verdict is not None:
                    add(Category.FAMILY, term, *verdict)
            for claim, spec in CLAIMS.items():
                verdict = _judge_claim(span, claim, spec, audit)
                if verdict is not None:
                    add(Category.CLAIM, claim, *verdict)
    return sorted(found, key=lambda f: (f.line, f.category.value, f.term))


def _judge_family(span: Span, term: str, pattern: re.Pattern[str],
                  audit: Audit) -> tuple[Hint | Clearance, str] | None:
    """The verdict on a line's mentions of one family, or None when it has none."""
    text = span.line_text
    mentions = []
    for match in pattern.finditer(text):
        version = VERSION.match(text, match.end())
        if _own_family(term, version.group(1) if version else "", audit.own_names):
            continue
        word = next((w for w in WORD.finditer(text) if w.start() <= match.start() < w.end()), None)
        mentions.append((match, word))
    if not mentions:
        return None
    if LINEAGE.search(text):
        return Clearance.LINEAGE, "says where the text comes from"
    names = {w.group() for _, w in mentions if w is not None}
    if names and all(n in audit.facts.names for n in names):
        return Clearance.PORT_CODE, f"names {', '.join(sorted(names))}, which the port's code has"
    if all(span.negated(m.start(), m.end()) for m, _ in mentions):
        return Clearance.NEGATED, "a comparison with the family, not a claim about this port"
    missing = sorted(n for n in names if n not in audit.facts.names and not re.fullmatch(rf"{term}\d*", n, re.I))
    if missing:
        return Hint.STALE, f"names {', '.join(missing)}, which the port's code does not have"
    donors = [re.sub(r"[^a-z]", "", Path(d).name.lower()) for d in audit.donors]
    return Hint.STALE, ("names the donor: text about the donor, not this port"
                        if any(d.startswith(term) for d in donors) else "names another family")


# A claim phrase followed by this many more words may spell a name of the port's code
# ("data parallel splits" for ``data_parallel_splits``).
NAME_SPELLING_WORDS = 2


def _spelled_name(span: Span, match: re.Match[str], names: set[str]) -> str | None:
    """The port code name the claim phrase plus the next words spell with underscores, if any."""
    words = re.findall(r"[A-Za-z0-9]+", match.group())
    following = re.findall(r"[A-Za-z0-9]+", span.line_text[match.end():])[:NAME_SPELLING_WORDS]
    lowered = {n.lower(): n for n in names}
    for extra in range(1, len(following) + 1):
        candidate = "_".join(words + following[:extra]).lower()
        if candidate in lowered:
            return lowered[candidate]
    return None


def _judge_claim(span: Span, claim: str, spec: Claim, audit: Audit) -> tuple[Hint | Clearance, str] | None:
    """The verdict on a line's claim, or None when the line does not make it."""
    text = span.line_text
    matches = [m for m in re.finditer(spec.text, text, re.I) if not inside_identifier(text, m.start(), m.end())]
    if not matches:
        return None
    if all(span.negated(m.start(), m.end()) or DONOR_OWNED.search(span.before(m.start())) for m in matches):
        return Clearance.NEGATED, "negated, compared or the donor's: not a claim about this port"
    spelled = [_spelled_name(span, m, audit.facts.names) for m in matches]
    if all(spelled):
        return Clearance.PORT_CODE, f"spells {', '.join(sorted(set(spelled)))}, a name of the port's code"
    if claim in ("single-GPU", "multi-GPU"):
        return _judge_devices(text, claim, audit)
    evidence = re.compile(spec.evidence)
    for rel, names in sorted(audit.facts.used.items()):
        hits = sorted(n for n in names if evidence.search(n))
        if hits:
            return Clearance.BACKED, f"{rel} implements it (uses {', '.join(hits[:3])})"
    return Hint.LIE, "no file of the port implements it"


def _judge_devices(text: str, claim: str, audit: Audit) -> tuple[Hint | Clearance, str]:
    """Device claims: ``multi_gpu_supported`` decides when a file sets it; else multi-device code does."""
    flags = audit.facts.multi_gpu_flags
    declared_off = [rel for rel, value in flags if not value]
    declared_on = [rel for rel, value in flags if value]
    evidence = re.compile(CLAIMS["multi-GPU"].evidence)
    code = [(rel, sorted(n for n in names if evidence.search(n))) for rel, names in sorted(audit.facts.used.items())]
    code = [(rel, names) for rel, names in code if names]
    multi = not declared_off and (declared_on or code)
    if claim == "multi-GPU":
        if declared_off:
            return Hint.LIE, f"{declared_off[0]} sets multi_gpu_supported=False"
        if declared_on:
            return Clearance.BACKED, f"{declared_on[0]} sets multi_gpu_supported=True"
        if code:
            return Clearance.BACKED, f"{code[0][0]} implements it (uses {', '.join(code[0][1][:3])})"
        return Hint.LIE, "no file of the port has multi-device code"
    if not multi:
        where = f"{declared_off[0]} sets multi_gpu_supported=False" if declared_off else "no multi-device code"
        return Clearance.BACKED, where
    if EXCLUSIVE.search(text):
        where = declared_on[0] if declared_on else code[0][0]
        return Hint.LIE, f"says single device only, but {where} supports several"
    return Clearance.BACKED, "every port has a single-device path"


# --- --approve: write a marker on a hit's line --------------------------------------------------


@dataclass
class Approval:
    file: str
    line: int
    where: str  # comment | docstring
    marker: str


def approve(audit: Audit, args: argparse.Namespace) -> int:
    """Write ``[audit-ok: <reason>]`` on each named hit's line; nothing is written unless every one is sound."""
    reason = _check_reason(args.reason)
    marker = f"[audit-ok: {reason}]"
    hits, cleared = audit.scan()
    targets: dict[Path, list[int]] = {}
    for spec in args.approve:
        path, line = _parse_target(audit, spec)
        if line in targets.get(path, []):
            raise ScriptError(f"--approve {spec} is given twice")
        rel = audit.rel(path)
        on_line = [h for h in hits if h.file == rel and h.line == line]
        if not on_line:
            why = next((c for c in cleared if c.file == rel and c.line == line), None)
            raise ScriptError(f"{rel}:{line} has no hit to approve"
                              + (f" (the audit clears it: {why.cleared_by.value}, {why.why})" if why else
                                 " (approve a FILE:LINE the audit lists)") + "; nothing written")
        if all(h.marked for h in on_line):
            raise ScriptError(f"{rel}:{line} already carries a marker ({on_line[0].reason}); "
                              "edit it by hand to change the reason; nothing written")
        targets.setdefault(path, []).append(line)
    edits: dict[Path, str] = {}
    approvals: list[Approval] = []
    for path, lines in targets.items():
        input_files.read_text(path, "port file")  # one-line errors for a file that is not UTF-8 text
        original = _read_exact(path)
        bom = original.startswith("\ufeff")
        text = original[1:] if bom else original
        for line in lines:
            text, where = _insert_marker(text, line, marker, audit.rel(path))
            approvals.append(Approval(audit.rel(path), line, where, marker))
        after, _ = audit.scan(only=path, text=text)
        unmarked = [h for h in after if h.line in lines and not h.marked]
        if unmarked:
            raise ScriptError(f"{audit.rel(path)}:{unmarked[0].line}: the written marker is not read back; "
                              "nothing written")
        edits[path] = ("\ufeff" if bom else "") + text
    for path, text in edits.items():
        _staged_write(path, text)
    document = {"port_dir": str(audit.port.path), "approved": [asdict(a) for a in approvals]}
    if args.json:
        cli_support.print_json(document)
    else:
        for a in approvals:
            print(f"{a.file}:{a.line}: wrote {a.marker} in the {a.where}")
    return 0


def _read_exact(path: Path) -> str:
    """The file's text with its line ends as they are (CRLF stays CRLF); ScriptError for bare CR line ends."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read port file {path}: {exc}") from None
    if re.search(r"\r(?!\n)", text):
        raise ScriptError(f"port file {path} has bare carriage-return line ends; add the marker by hand; "
                          "nothing written")
    return text


def _check_reason(reason: str | None) -> str:
    """The reason, stripped; ScriptError when it is missing or could not sit inside a marker on one line."""
    if reason is None or not reason.strip():
        raise ScriptError("--approve needs --reason TEXT (what you checked); nothing written")
    reason = " ".join(reason.split())
    if "]" in reason or "\\" in reason or any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise ScriptError("--reason must not contain ']', a backslash or control characters; nothing written")
    if len(reason) > REASON_MAX_CHARS:
        raise ScriptError(f"--reason is {len(reason)} characters; keep it under {REASON_MAX_CHARS} "
                          "(write more in the worksheet); nothing written")
    return reason


def _parse_target(audit: Audit, spec: str) -> tuple[Path, int]:
    """The port file and line named by ``FILE:LINE``; ScriptError naming what is wrong."""
    name, sep, number = spec.rpartition(":")
    if not sep or not name or not number.strip().isdigit() or int(number) < 1:
        raise ScriptError(f"--approve {spec!r} is not FILE:LINE (for example model.py:42); nothing written")
    line = int(number)
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = audit.port.path / candidate
    matches = [p for p in audit.sources if os.path.normpath(p) == os.path.normpath(candidate)
               or os.path.normpath(p.resolve()) == os.path.normpath(candidate.resolve())]
    if not matches:
        raise ScriptError(f"--approve {spec}: {name} is not a .py file of the port {audit.port.path}; nothing written")
    path = matches[0]
    if path.is_symlink():
        raise ScriptError(f"--approve {spec}: {audit.rel(path)} is a symbolic link; edit its target by hand; "
                          "nothing written")
    total = len(io.StringIO(audit.sources[path][0]).readlines())
    if line > total:
        raise ScriptError(f"--approve {spec}: {audit.rel(path)} has {total} lines; nothing written")
    return path, line


def _insert_marker(text: str, line: int, marker: str, rel: str) -> tuple[str, str]:
    """``text`` with ``marker`` on ``line``: at the end of its comment, else inside its docstring.

    The edit must leave every token but the edited one unchanged and the file parseable; otherwise
    ScriptError and nothing is written.
    """
    lines = io.StringIO(text).readlines()
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    physical = lines[line - 1]
    body = physical.rstrip("\r\n")
    comment = next((t for t in tokens if t.type == tokenize.COMMENT and t.start[0] == line), None)
    regions = {(r.line, r.kind) for r in text_regions(text)}
    if comment is not None:
        column, where = comment.end[1], "comment"
        edited = body[:column] + " " + marker + body[column:]
    elif (line, "docstring") in regions:
        string = next(t for t in tokens if t.type == tokenize.STRING and t.start[0] <= line <= t.end[0])
        where = "docstring"
        if string.end[0] > line:  # the string goes on: end this line's text with the marker
            content = body.rstrip()
            stripped = content.rstrip("\\")
            edited = stripped + (" " if stripped and not stripped.endswith(" ") else "") + marker \
                + content[len(stripped):] + body[len(content):]
        else:  # the string closes here: the marker goes before its closing quotes
            quote = '"""' if string.string.endswith('"""') else "'''" if string.string.endswith("'''") \
                else string.string[-1]
            column = string.end[1] - len(quote)
            edited = body[:column].rstrip() + " " + marker + body[column:]
    else:
        raise ScriptError(f"{rel}:{line} has no comment or docstring to hold the marker; nothing written")
    new_text = "".join(lines[:line - 1]) + edited + physical[len(body):] + "".join(lines[line:])
    _check_same_program(text, new_text, rel, line)
    return new_text, where


def _check_same_program(old: str, new: str, rel: str, line: int) -> None:
    """ScriptError unless ``new`` parses and differs from ``old`` only inside one comment or string token."""
    refusal = f"{rel}:{line}: the marker would change the file's code; nothing written"
    try:
        ast.parse(new)
        old_tokens = list(tokenize.generate_tokens(io.StringIO(old).readline))
        new_tokens = list(tokenize.generate_tokens(io.StringIO(new).readline))
    except (SyntaxError, tokenize.TokenError, IndentationError, ValueError):
        raise ScriptError(refusal.replace("change the file's code", "break the file's syntax")) from None
    if len(old_tokens) != len(new_tokens):
        raise ScriptError(refusal)
    changed = [(a, b) for a, b in zip(old_tokens, new_tokens) if (a.type, a.string) != (b.type, b.string)]
    if len(changed) != 1 or changed[0][0].type not in (tokenize.COMMENT, tokenize.STRING) \
            or changed[0][0].type != changed[0][1].type:
        raise ScriptError(refusal)


def _staged_write(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` in a staging folder of this run's own, then move it over ``path``."""
    staging, made = input_files.make_staging_dir(path, f"{STAGING_PREFIX}{path.name}-", "--approve")
    try:
        staged = staging / path.name
        with open(staged, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(staged, path.stat().st_mode & 0o7777)
        os.replace(staged, path)
    except OSError as exc:
        raise ScriptError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        input_files.discard_staging(staging, made)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
