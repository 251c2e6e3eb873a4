"""Read a model's Hugging Face modeling code as text: the config keys it reads and its code-level deltas.

``read_model(config)`` finds ``modeling_<type>.py`` and ``configuration_<type>.py``
in the installed transformers (through ``transformers_catalog``), parses them
with ``ast`` and never imports them, torch or max. It returns a
:class:`SourceReading`:

* the effective HF config: the configuration class's field defaults, the
  config.json values (after ``attribute_map`` and the legacy keys the class
  translates), then the simple ``self.x = ...`` steps of ``__post_init__``;
* ``reads``: every config attribute the code reachable from the causal-LM class
  reads (``config.x``, ``self.config.x``, ``getattr(config, "x")``), plus the
  reads of the shared modules it calls (``modeling_rope_utils``,
  ``masking_utils``), each with file:line evidence;
* ``signals``: code-level deltas (:class:`delta_codes.DeltaCode`), each with the
  file and line that shows it. A delta inside an ``if`` on a config value is
  reported only when the effective config takes that branch; ``always`` marks
  a delta the code applies whatever the config says.

A text reading: it sees what the code says, not what a tensor does at run time
(see references/read-modeling-code.md for what it cannot see).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import model_anatomy
import transformers_catalog
from delta_codes import DeltaCode


class _Unknown:
    """A value the reader cannot work out from the text."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()

# Names that hold an HF config object in modeling code.
_CONFIG_NAMES = ("config", "text_config", "cfg")
_ATTR_READ = re.compile(r"\b(?:self\.)?(?:config|text_config|cfg)\.([A-Za-z]\w*)\b(?!\s*\()")
_GETATTR_READ = re.compile(r"\b(?:getattr|hasattr)\(\s*(?:self\.)?(?:config|text_config|cfg)\s*,\s*[\"'](\w+)[\"']")
# Attributes of a config object that are methods or runtime state, not config.json keys.
_NOT_KEYS = {"get_text_config", "to_dict", "get", "_attn_implementation", "_experts_implementation",
             "standardize_rope_params", "validate_rope", "default_theta", "json", "use_return_dict",
             "output_attentions", "output_hidden_states", "return_dict"}
# Top-level functions that only compute training losses (their softmax is not the router).
_LOSS_MARKER = "loss"
MAX_EVAL_DEPTH = 30  # recursion bound of the small expression evaluator


@dataclass(frozen=True)
class Evidence:
    """A line of transformers source: path relative to the transformers folder, 1-based line, its text."""

    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


@dataclass
class CodeSignal:
    """A delta read from the modeling code, with where it is and whether the config switches it on."""

    code: DeltaCode
    detail: str
    evidence: list[Evidence]
    always: bool = False  # applied by the code whatever the config says
    condition: str | None = None  # the config test that switches it on, when there is one


@dataclass
class SourceReading:
    """What the modeling and configuration code of one model type says."""

    model_type: str
    modeling_file: str | None
    configuration_file: str | None
    causal_lm_class: str | None
    config_class: str | None
    effective: dict[str, Any]
    defaults: dict[str, Any]
    attribute_map: dict[str, str]
    legacy_keys: dict[str, str]  # config.json key the config class translates -> the attribute it sets
    reads: dict[str, list[Evidence]]
    signals: list[CodeSignal]
    reads_is_decoder: bool
    notes: list[str] = field(default_factory=list)
    # The code uses sliding_window only as a flash-attention argument: eager and sdpa attend to the whole
    # prefix (Moshi: MoshiFlashAttention2 passes it, MoshiModel builds a plain causal mask).
    window_flash_only: bool = False

    def signal_codes(self) -> list[str]:
        """The codes of every reported signal, in order."""
        return [s.code.value for s in self.signals]

    def key_is_read(self, key: str) -> bool:
        """True when HF reads this config.json key (directly, through attribute_map or a legacy alias)."""
        return bool(self.key_evidence(key))

    def key_evidence(self, key: str) -> list[Evidence]:
        """Where HF reads this config.json key (empty when it never does)."""
        attrs = {key, self.attribute_map.get(key, key)}
        attrs |= {alias for alias, target in self.attribute_map.items() if target == key}
        if key in self.legacy_keys:
            attrs.add(self.legacy_keys[key])
            attrs.add("rope_parameters")  # the config class files legacy RoPE keys under rope_parameters
        if key in SHARED_ROPE_KEYS and any(e.file == self.modeling_file for e in self.reads.get("rope_parameters", [])):
            attrs.add("rope_parameters")  # only where the model's own code uses RoPE (OPT has none)
        found: list[Evidence] = []
        for attr in sorted(attrs):
            found += self.reads.get(attr, [])
        return found


# --- parsing -------------------------------------------------------------------------------------


# Top-level config.json keys transformers 5.12's shared RoPE config code (modeling_rope_utils,
# convert_rope_params_to_dict) files under ``rope_parameters`` for every config class: read when
# ``rope_parameters`` is (Nemotron's partial_rotary_factor was reported as a decoy).
SHARED_ROPE_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor")


@dataclass
class _Source:
    path: Path
    rel: str
    lines: list[str]
    tree: ast.Module
    defs: dict[str, ast.AST]
    docstrings: frozenset[int] = frozenset()


@lru_cache(maxsize=64)
def _load(path: Path) -> _Source | None:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    root = transformers_catalog.transformers_dir()
    rel = path.relative_to(root).as_posix() if root and path.is_relative_to(root) else path.name
    defs: dict[str, ast.AST] = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    for node in tree.body:  # module-level tables such as FALCON_ATTENTION_CLASSES = {...}
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Dict, ast.Call)):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id not in defs:
                    defs[target.id] = node
    docstrings = set()
    for node in ast.walk(tree):  # docstrings and bare string statements: examples, not code
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(_span(node))
    return _Source(path, rel, text.splitlines(), tree, defs, frozenset(docstrings))


def _names_in(node: ast.AST) -> set[str]:
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Attribute):
            names.add(child.attr)
    return names


# Methods that name every class of the file (weight init) without running them in the forward.
_NOT_EDGES = {"_init_weights"}


def _edges(node: ast.AST) -> set[str]:
    """Names a class or function refers to, skipping weight-init methods."""
    if isinstance(node, ast.ClassDef):
        names = {b.id for b in node.bases if isinstance(b, ast.Name)}
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name in _NOT_EDGES:
                continue
            names |= _names_in(stmt)
        return names
    return _names_in(node)


def _reachable(source: _Source, start: str) -> list[ast.AST]:
    """Top-level classes and functions reachable from ``start`` by name, in file order."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in source.defs:
            continue
        seen.add(name)
        node = source.defs[name]
        if isinstance(node, ast.FunctionDef) and _LOSS_MARKER in name.lower():
            continue
        todo.extend(n for n in _edges(node) if n in source.defs and n not in seen)
    nodes = {id(source.defs[name]) for name in seen
             if not (isinstance(source.defs[name], ast.FunctionDef) and _LOSS_MARKER in name.lower())}
    return [n for n in source.tree.body if id(n) in nodes]


def _evidence(source: _Source, line: int) -> Evidence:
    return Evidence(source.rel, line, source.lines[line - 1].strip())


# --- the small evaluator ---------------------------------------------------------------------------


class _Env:
    """Values for the evaluator: config attributes, ``self.x`` bindings and local names."""

    def __init__(self, config: dict[str, Any], self_attrs: dict[str, ast.AST] | None = None,
                 local: dict[str, Any] | None = None) -> None:
        self.config = config
        self.self_attrs = self_attrs or {}
        self.local = local or {}


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a ** b,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_CALLS: dict[str, Callable[..., Any]] = {"bool": bool, "int": int, "float": float, "len": len, "range": range,
                                         "min": min, "max": max, "list": list, "str": str}


def _is_config_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _CONFIG_NAMES
    return (isinstance(node, ast.Attribute) and node.attr in _CONFIG_NAMES
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def evaluate(node: ast.AST | None, env: _Env, depth: int = 0) -> Any:
    """The value of a simple expression over the config, or UNKNOWN."""
    if node is None or depth > MAX_EVAL_DEPTH:
        return UNKNOWN
    try:
        return _evaluate(node, env, depth)
    except Exception:  # noqa: BLE001 - any failure of a guessed evaluation means "cannot tell"
        return UNKNOWN


def _evaluate(node: ast.AST, env: _Env, depth: int) -> Any:
    ev = lambda n: evaluate(n, env, depth + 1)  # noqa: E731
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env.local:
            return env.local[node.id]
        return {"True": True, "False": False, "None": None}.get(node.id, UNKNOWN)
    if isinstance(node, ast.Attribute):
        if _is_config_node(node.value):
            return env.config.get(node.attr, UNKNOWN)
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            if node.attr in env.self_attrs:
                return evaluate(env.self_attrs[node.attr], _Env(env.config), depth + 1)
            return env.config.get(node.attr, UNKNOWN) if not env.self_attrs else UNKNOWN
        return UNKNOWN
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        if len(node.args) >= 2 and _is_config_node(node.args[0]) and isinstance(node.args[1], ast.Constant):
            default = ev(node.args[2]) if len(node.args) > 2 else UNKNOWN
            return env.config.get(node.args[1].value, default)
        return UNKNOWN
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        owner, key = ev(node.func.value), ev(node.args[0])
        default = ev(node.args[1]) if len(node.args) > 1 else None
        if isinstance(owner, dict) and key is not UNKNOWN:
            return owner.get(key, default)
        return default if owner is None and len(node.args) > 1 else UNKNOWN
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        args = [ev(a) for a in node.args]
        return UNKNOWN if any(a is UNKNOWN for a in args) else _CALLS[node.func.id](*args)
    if isinstance(node, ast.BoolOp):
        values = [ev(v) for v in node.values]
        if isinstance(node.op, ast.And):
            if any(v is not UNKNOWN and not v for v in values):
                return next(v for v in values if v is not UNKNOWN and not v)
            return UNKNOWN if any(v is UNKNOWN for v in values) else values[-1]
        for v in values:
            if v is UNKNOWN:
                return UNKNOWN
            if v:
                return v
        return values[-1]
    if isinstance(node, ast.UnaryOp):
        value = ev(node.operand)
        if value is UNKNOWN:
            return UNKNOWN
        return {ast.Not: lambda v: not v, ast.USub: lambda v: -v, ast.UAdd: lambda v: +v}[type(node.op)](value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = ev(node.left), ev(node.right)
        return UNKNOWN if left is UNKNOWN or right is UNKNOWN else _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = ev(comparator)
            if left is UNKNOWN or right is UNKNOWN or type(op) not in _COMPARE:
                return UNKNOWN
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        test = ev(node.test)
        return UNKNOWN if test is UNKNOWN else ev(node.body if test else node.orelse)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [ev(e) for e in node.elts]
        return UNKNOWN if any(i is UNKNOWN for i in items) else list(items)
    if isinstance(node, ast.Subscript):
        value, index = ev(node.value), ev(node.slice)
        return UNKNOWN if value is UNKNOWN or index is UNKNOWN else value[index]
    if isinstance(node, ast.ListComp) and len(node.generators) == 1:
        gen = node.generators[0]
        values = ev(gen.iter)
        if values is UNKNOWN or not isinstance(gen.target, ast.Name):
            return UNKNOWN
        result = []
        for item in values:
            inner = _Env(env.config, env.self_attrs, {**env.local, gen.target.id: item})
            if all(evaluate(cond, inner, depth + 1) for cond in gen.ifs):
                value = evaluate(node.elt, inner, depth + 1)
                if value is UNKNOWN:
                    return UNKNOWN
                result.append(value)
        return result
    return UNKNOWN


# --- the configuration class ---------------------------------------------------------------------------


@dataclass
class _ConfigClass:
    name: str | None
    defaults: dict[str, Any]
    attribute_map: dict[str, str]
    legacy: dict[str, str]
    legacy_defaults: dict[str, Any]
    post_init: list[ast.stmt]


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return UNKNOWN
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, RecursionError):
        return UNKNOWN


def _config_class(path: Path | None, class_name: str | None) -> _ConfigClass:
    empty = _ConfigClass(class_name, {}, {}, {}, {}, [])
    source = _load(path) if path else None
    if source is None or not class_name or class_name not in source.defs:
        return empty
    chain: list[ast.ClassDef] = []
    node = source.defs.get(class_name)
    while isinstance(node, ast.ClassDef) and node not in chain:
        chain.insert(0, node)
        base = next((b.id for b in node.bases if isinstance(b, ast.Name) and b.id in source.defs), None)
        node = source.defs.get(base) if base else None
    result = empty
    for cls in chain:
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if stmt.value is not None and "ClassVar" not in ast.unparse(stmt.annotation):
                    result.defaults[stmt.target.id] = _literal(stmt.value)
            elif isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "attribute_map"
                                                      for t in stmt.targets):
                mapping = _literal(stmt.value)
                if isinstance(mapping, dict):
                    result.attribute_map.update(mapping)
            elif isinstance(stmt, ast.FunctionDef):
                if stmt.name == "__post_init__":
                    result.post_init = list(stmt.body)
                _legacy_pops(stmt, result)
    return result


def _legacy_pops(function: ast.FunctionDef, result: _ConfigClass) -> None:
    """``x.setdefault("attr", kwargs.pop("legacy", d))`` and ``self.attr = kwargs.pop("legacy", d)``."""
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        target = None
        if isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault" and len(node.args) == 2:
            target, value = _literal(node.args[0]), node.args[1]
        else:
            continue
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in ("pop", "get")
                and value.args and isinstance(target, str)):
            legacy = _literal(value.args[0])
            if isinstance(legacy, str):
                result.legacy[legacy] = target
                if len(value.args) > 1:
                    result.legacy_defaults[target] = _literal(value.args[1])
    for node in ast.walk(function):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr == "pop" and node.value.args):
            legacy = _literal(node.value.args[0])
            if isinstance(legacy, str) and legacy != node.targets[0].attr:
                result.legacy[legacy] = node.targets[0].attr


def _run_post_init(statements: Iterable[ast.stmt], values: dict[str, Any]) -> None:
    for stmt in statements:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                values[target.attr] = evaluate(stmt.value, _Env(values))
        elif isinstance(stmt, ast.If):
            test = evaluate(stmt.test, _Env(values))
            if test is not UNKNOWN:
                _run_post_init(stmt.body if test else stmt.orelse, values)


def effective_config(cls: _ConfigClass, config_json: dict[str, Any]) -> dict[str, Any]:
    """Attribute values after defaults, config.json (attribute_map, legacy keys) and ``__post_init__``."""
    values: dict[str, Any] = {k: v for k, v in cls.defaults.items()}
    rope = {}
    for key, value in config_json.items():
        attr = cls.attribute_map.get(key, key)
        if key in cls.legacy:
            rope[cls.legacy[key]] = value
            continue
        values[attr] = value
    for attr, default in cls.legacy_defaults.items():
        if attr not in rope and default is not UNKNOWN:
            rope[attr] = default
    params = values.get("rope_parameters") or values.get("rope_scaling")
    params = dict(params) if isinstance(params, dict) else {}
    for attr, value in rope.items():
        params.setdefault(attr, value)
    for attr in ("partial_rotary_factor", "rope_theta"):
        if attr in values and values[attr] is not UNKNOWN and attr not in params:
            params[attr] = values[attr]
    if params:
        values["rope_parameters"] = params
        if "partial_rotary_factor" in params:
            values.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    _run_post_init(cls.post_init, values)
    return values


# --- config reads ---------------------------------------------------------------------------------


def _span(node: ast.AST) -> range:
    return range(node.lineno, (node.end_lineno or node.lineno) + 1)


def _reads_in(source: _Source, nodes: Iterable[ast.AST], reads: dict[str, list[Evidence]]) -> None:
    for node in nodes:
        for line in _span(node):
            text = source.lines[line - 1]
            stripped = text.strip()
            if stripped.startswith("#") or line in source.docstrings:
                continue
            for pattern in (_ATTR_READ, _GETATTR_READ):
                for match in pattern.finditer(text.split("#", 1)[0]):
                    key = match.group(1)
                    if key in _NOT_KEYS:
                        continue
                    bucket = reads.setdefault(key, [])
                    if len(bucket) < MAX_EVIDENCE_PER_KEY:
                        bucket.append(_evidence(source, line))


MAX_EVIDENCE_PER_KEY = 3  # enough to point at the code; the full list would only repeat it


_TOP_DEF = re.compile(r"^(?:def|class)\s+(\w+)", re.MULTILINE)
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


@lru_cache(maxsize=8)
def _text_blocks(path: Path) -> tuple[str, dict[str, tuple[int, int]], list[str]] | None:
    """A shared module split into its top-level defs by text (no ast: these files are large)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    starts = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _TOP_DEF.finditer(text)]
    blocks = {}
    for index, (line, name) in enumerate(starts):
        end = starts[index + 1][0] - 1 if index + 1 < len(starts) else len(lines)
        blocks[name] = (line, end)
    root = transformers_catalog.transformers_dir()
    rel = path.relative_to(root).as_posix() if root and path.is_relative_to(root) else path.name
    return rel, blocks, lines


def _shared_reads(modeling: _Source, scope: list[ast.AST], reads: dict[str, list[Evidence]]) -> list[str]:
    """Add reads of the shared modules the scope calls into; returns the functions followed."""
    used: set[str] = set()
    for node in scope:
        used |= _names_in(node)
    followed = []
    for kind in ("rope", "masking"):
        path = transformers_catalog.shared_module(kind)
        parsed = _text_blocks(path) if path else None
        if parsed is None:
            continue
        rel, blocks, lines = parsed
        todo = [n for n in used if n in blocks]
        if kind == "rope":  # the config base class standardizes RoPE through these for every family
            todo += [n for n in blocks if n.startswith("_compute_")]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            first, last = blocks[name]
            body = "\n".join(lines[first - 1:last])
            todo += [w for w in set(_WORD.findall(body)) if w in blocks and w not in seen]
        for name in sorted(seen):
            first, last = blocks[name]
            for number in range(first, last + 1):
                text = lines[number - 1].split("#", 1)[0]
                for pattern in (_ATTR_READ, _GETATTR_READ):
                    for match in pattern.finditer(text):
                        key = match.group(1)
                        bucket = reads.setdefault(key, []) if key not in _NOT_KEYS else None
                        if bucket is not None and len(bucket) < MAX_EVIDENCE_PER_KEY:
                            bucket.append(Evidence(rel, number, lines[number - 1].strip()))
            followed.append(f"{rel}:{name}")
    return followed


# --- code signals ------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    source: _Source
    scope: list[ast.AST]
    config: dict[str, Any]
    signals: dict[DeltaCode, CodeSignal]
    classes: dict[str, ast.ClassDef]
    init_attrs: dict[str, dict[str, ast.AST]]

    def add(self, code: DeltaCode, detail: str, line: int, always: bool = False,
            condition: str | None = None) -> None:
        found = self.signals.get(code)
        ev = _evidence(self.source, line)
        if found is None:
            self.signals[code] = CodeSignal(code, detail, [ev], always, condition)
        elif ev not in found.evidence and len(found.evidence) < MAX_EVIDENCE_PER_KEY:
            found.evidence.append(ev)


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _guards(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[tuple[ast.AST, bool]]:
    """The ``if`` tests around ``node``: (test, True when node is in the body, False in the else)."""
    result = []
    child = node
    parent = parents.get(child)
    while parent is not None and not isinstance(parent, ast.ClassDef):
        if isinstance(parent, (ast.If, ast.IfExp)):
            if child is not parent.test:
                body = parent.body if isinstance(parent.body, list) else [parent.body]
                result.append((parent.test, any(child is b for b in body)))
        child, parent = parent, parents.get(parent)
    return result


def _enclosing_class(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.ClassDef | None:
    parent = parents.get(node)
    while parent is not None and not isinstance(parent, ast.ClassDef):
        parent = parents.get(parent)
    return parent


def _config_dependent(test: ast.AST, self_attrs: dict[str, ast.AST]) -> bool:
    for child in ast.walk(test):
        if isinstance(child, ast.Attribute):
            if _is_config_node(child.value):
                return True
            if (isinstance(child.value, ast.Name) and child.value.id == "self" and child.attr in self_attrs
                    and _config_dependent(self_attrs[child.attr], {})):
                return True
        if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "getattr":
            if child.args and _is_config_node(child.args[0]):
                return True
    return False


@dataclass
class _Activity:
    active: bool | None  # True on, False off, None cannot tell
    always: bool
    condition: str | None


def _activity(ctx: _Ctx, node: ast.AST, parents: dict[ast.AST, ast.AST]) -> _Activity:
    """Whether the config reaches ``node``: each config-dependent ``if`` around it is evaluated."""
    cls = _enclosing_class(node, parents)
    attrs = ctx.init_attrs.get(cls.name, {}) if cls else {}
    conditions, state = [], True
    for test, in_body in _guards(node, parents):
        if not _config_dependent(test, attrs):
            continue
        text = ast.unparse(test)
        conditions.append(text if in_body else f"not ({text})")
        value = evaluate(test, _Env(ctx.config, attrs))
        if value is UNKNOWN:
            state = None if state is not False else False
        elif bool(value) != in_body:
            state = False
    return _Activity(state, not conditions, " and ".join(conditions) or None)


def _init_attrs(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """``self.x = <expr>`` assignments of a class's ``__init__`` (the last one wins)."""
    attrs: dict[str, ast.AST] = {}
    init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    if init is None:
        return attrs
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                attrs[target.attr] = node.value
    return attrs


# Line patterns for signals the text shows directly. Each: code, detail, regex, where it may be
# ("class" only inside classes, "rotate" only inside rotate_* functions, None anywhere in scope).
_LINE_RULES: tuple[tuple[DeltaCode, str, str, str | None], ...] = (
    (DeltaCode.ROPE_INTERLEAVED, "RoPE rotates interleaved pairs (x[..., ::2], x[..., 1::2])",
     r",\s*0?::2\s*\]", "rotate"),
    (DeltaCode.PARTIAL_ROTARY, "RoPE is applied to a leading slice of each head; the rest passes through",
     r"\b(?:q_pass|query_pass|k_pass|key_pass|q_rot|query_rot)\b\s*=|\[\.\.\.,\s*:\s*(?:self\.)?rotary_(?:dim|ndims)\]"
     r"|\[:, :, :, :\s*self\.rotary_dim\]", None),
    (DeltaCode.LEARNED_POSITIONS, "learned absolute position embeddings",
     r"nn\.Embedding\(\s*(?:self\.)?(?:config\.)?(?:max_position_embeddings|n_positions|max_seq_len)"
     r"|=\s*\w*(?:Learned)?Positional\w*Embedding\(", "class"),
    (DeltaCode.ALIBI, "ALiBi bias is built and added to the attention scores", r"(?<!def )\b\w*alibi\w*\(", None),
    (DeltaCode.LAYERNORM, "LayerNorm (mean-centred) instead of RMSNorm",
     r"(?<![\w.])(?:nn\.)?LayerNorm\(|\bF\.layer_norm\(|functional\.layer_norm\(|hidden_states\s*-\s*mean\b", "class"),
    (DeltaCode.LAYERNORM_WEIGHTLESS, "LayerNorm without learnable weight or bias",
     r"elementwise_affine\s*=\s*False|layer_norm\(.*,\s*None,\s*None\b", "class"),
    (DeltaCode.NORM_OFFSET, "the norm multiplies by (1 + weight)",
     r"\(\s*1(?:\.0)?\s*\+\s*self\.weight|\bself\.weight(?:\.\w+\(\))?\s*\+\s*1(?:\.0)?\b", "class"),
    (DeltaCode.EMBEDDING_SCALE, "token embeddings are multiplied by a constant",
     r"\*\s*self\.(?:embed_scale|embedding_multiplier|normalizer|scale_emb)\b|\bembed_scale\s*=\s*\S"
     r"|\*\s*normalizer\b", "class"),
    (DeltaCode.LOGIT_SCALE, "the logits are scaled by a constant",
     r"^(?!.*softcap).*(?:(?<!\w)logits\s*=\s*logits\s*[*/]|(?<!\w)logits\s*[*/]=|(?<!\w)logits\s*\*\s*self\.logit_scale"
     r"|/\s*self\.config\.logits_scaling)",
     "class"),
    (DeltaCode.LOGIT_SOFTCAP, "the final logits are soft-capped with tanh",
     r"logits\s*=\s*torch\.tanh\(\s*logits\s*\)", "class"),
    (DeltaCode.ATTN_SOFTCAP, "attention scores are soft-capped with tanh",
     r"(?:attn_weights|attn_scores|scores)\s*=\s*torch\.tanh\(", None),
    (DeltaCode.ATTENTION_SCALE_LAYER_INDEX, "attention scores are divided by the layer index + 1",
     r"/\s*float\(\s*self\.layer_idx\s*\+\s*1\s*\)|layer_idx\s*\+\s*1\)\s*$", None),
    (DeltaCode.CONV1D_WEIGHTS, "projections are Conv1D: weights stored transposed (in, out)", r"\bConv1D\(", "class"),
    (DeltaCode.QKV_CLIP, "q/k/v are clamped to +-clip_qkv", r"\.clamp_?\(\s*min\s*=\s*-\s*\S*clip_qkv", "class"),
    (DeltaCode.ATTENTION_SINKS, "attention has learned sink logits", r"self\.sinks\s*=\s*nn\.Parameter", "class"),
    (DeltaCode.MLA, "multi-head latent attention (compressed KV)", r"self\.kv_a_proj_with_mqa\s*=", "class"),
    (DeltaCode.MOE, "mixture-of-experts MLP", r"self\.experts\s*=", "class"),
    (DeltaCode.SHARED_EXPERTS, "MoE layers also run shared expert(s)", r"self\.shared_experts?\s*=", "class"),
    (DeltaCode.SHARED_EXPERT_GATE, "the shared expert's output is scaled by a sigmoid gate",
     r"sigmoid\(\s*self\.shared_expert_gate\(", "class"),
    (DeltaCode.TOPK_SOFTMAX_ROUTER, "router: softmax over the experts, then top-k",
     r"softmax\(\s*(?:router|routing)\w*", "class"),
    (DeltaCode.SIGMOID_ROUTER, "router scores each expert with a sigmoid",
     r"sigmoid\(\s*(?:router|routing)\w*|(?:router|routing)\w*\.sigmoid\(\)", "class"),
    (DeltaCode.ROUTER_RENORMALIZE, "the top-k routing weights are renormalized to sum to 1",
     r"(?:top\w*|routing_weights|router_top_value|topk_weight\w*)\s*(?:/=|=\s*\w+\s*/)\s*\(?\s*\w+\.sum\(\s*dim=-1",
     "class"),
    (DeltaCode.NOPE_LAYERS, "some layers skip RoPE (per-layer use_rope / no_rope_layers)",
     r"no_rope_layers\[|\bself\.use_rope\s*=", "class"),
    (DeltaCode.PER_LAYER_ATTENTION, "each layer's attention kind comes from config.layer_types",
     r"layer_types\[\s*(?:self\.)?layer_idx\s*\]", "class"),
    (DeltaCode.FUSED_QKV_PER_HEAD, "the fused QKV output is split per head ([q_h; k_h; v_h])",
     r"3\s*\*\s*self\.head_(?:size|dim)\b|self\.num_heads,\s*3,\s*self\.head_dim", "class"),
)

def _truthy(value: Any) -> bool | None:
    if value is UNKNOWN:
        return None
    return value not in (None, False, 0, 0.0, "", [], {})


def _partial_factor(config: dict[str, Any]) -> Any:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return params["partial_rotary_factor"]
    if "partial_rotary_factor" in config:
        return config["partial_rotary_factor"]
    return UNKNOWN


def _partial_active(config: dict[str, Any]) -> bool | None:
    factor = _partial_factor(config)
    if isinstance(factor, (int, float)):
        return factor < 1
    rotary_dim = config.get("rotary_dim", UNKNOWN)
    if isinstance(rotary_dim, int):
        heads, hidden = config.get("n_head") or config.get("num_attention_heads"), config.get("n_embd") or config.get(
            "hidden_size")
        if isinstance(heads, int) and isinstance(hidden, int) and heads:
            return rotary_dim < hidden // heads
        return True
    return None if factor is UNKNOWN and rotary_dim is UNKNOWN else False


def _layer_types_mixed(config: dict[str, Any]) -> bool | None:
    types = config.get("layer_types", UNKNOWN)
    if isinstance(types, list):
        return len(set(map(str, types))) > 1
    return None


def _no_rope_layers_active(config: dict[str, Any]) -> bool | None:
    layers = config.get("no_rope_layers", UNKNOWN)
    if isinstance(layers, list):
        return any(not v for v in layers)
    interval = config.get("no_rope_layer_interval", UNKNOWN)
    return _truthy(interval) if interval is not UNKNOWN else None


def _nested_get(config: dict[str, Any], key: str) -> Any:
    """A key at the top level or one level down (MPT keeps attention settings in attn_config)."""
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return UNKNOWN


def _key_gate(key: str, *, absent: bool | None = None) -> Callable[[dict[str, Any]], bool | None]:
    """The signal needs ``key`` set; ``absent`` is the answer when the (effective) config lacks the key."""
    def gate(config: dict[str, Any]) -> bool | None:
        value = _nested_get(config, key)
        return absent if value is UNKNOWN else _truthy(value)
    return gate


_MOE_CODES = (DeltaCode.MOE, DeltaCode.SHARED_EXPERTS, DeltaCode.SHARED_EXPERT_GATE, DeltaCode.TOPK_SOFTMAX_ROUTER,
              DeltaCode.SIGMOID_ROUTER, DeltaCode.ROUTER_RENORMALIZE)

# Config values a line rule also needs when the code does not test them on that line: False drops it.
_VALUE_GATES: dict[DeltaCode, Callable[[dict[str, Any]], bool | None]] = {
    DeltaCode.PARTIAL_ROTARY: _partial_active,
    DeltaCode.PER_LAYER_ATTENTION: _layer_types_mixed,
    DeltaCode.NOPE_LAYERS: _no_rope_layers_active,
    # The capped line is often in a shared eager function the model never calls with a cap (Gemma 4's text
    # attention; its audio tower's cap has another key): without the key in the effective config, no signal.
    DeltaCode.ATTN_SOFTCAP: _key_gate("attn_logit_softcapping", absent=False),
    DeltaCode.QKV_CLIP: _key_gate("clip_qkv"),
    **{code: model_anatomy.moe_active for code in _MOE_CODES},
}


def _nodes_at(source: _Source, scope: list[ast.AST]) -> dict[int, ast.AST]:
    """For each line in scope, the innermost statement it belongs to (continuation lines included)."""
    at: dict[int, ast.AST] = {}
    for top in scope:
        for node in ast.walk(top):  # breadth-first: a statement nested deeper overwrites its parent's lines
            if isinstance(node, ast.stmt):
                for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                    at[line] = node
    return at


def _function_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    parent = parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.FunctionDef) and not isinstance(parents.get(parent), ast.ClassDef):
            return parent.name
        parent = parents.get(parent)
    return None


def _line_signals(ctx: _Ctx, parents: dict[ast.AST, ast.AST]) -> None:
    at = _nodes_at(ctx.source, ctx.scope)
    rules = [(code, detail, re.compile(pattern), where) for code, detail, pattern, where in _LINE_RULES]
    for top in ctx.scope:
        for line in _span(top):
            text = ctx.source.lines[line - 1].split("#", 1)[0]
            if not text.strip() or line in ctx.source.docstrings:
                continue
            node = at.get(line)
            if node is None:
                continue
            for code, detail, regex, where in rules:
                if not regex.search(text):
                    continue
                in_class = _enclosing_class(node, parents) is not None
                if where == "class" and not in_class:
                    continue
                if where == "rotate" and not (_function_of(node, parents) or "").startswith("rotate"):
                    continue
                activity = _activity(ctx, node, parents)
                if activity.active is False:
                    continue
                gate = _VALUE_GATES.get(code)
                if gate is not None and gate(ctx.config) is False:
                    continue
                ctx.add(code, detail, line, always=activity.always and gate is None, condition=activity.condition)


_QKV_NAMES = {"q_proj", "k_proj", "v_proj", "query_key_value", "qkv_proj", "c_attn", "Wqkv", "qkv", "query",
              "key", "value", "q_attn", "wqkv"}
_OUT_NAMES = {"o_proj", "dense", "out_proj", "c_proj", "wo", "o"}
_FUSED_QKV_NAMES = {"query_key_value", "qkv_proj", "c_attn", "Wqkv", "qkv", "wqkv"}
_MLP_NAMES = {"fc1", "fc2", "fc_in", "fc_out", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "up_proj", "down_proj",
              "gate_proj", "w1", "w2", "w3"}
_QNORM_NAMES = {"q_norm", "q_layernorm", "query_layernorm", "q_ln"}


def _linear_bias(call: ast.Call, env: _Env) -> Any:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if name == "Conv1D":
        return True
    keyword = next((k for k in call.keywords if k.arg == "bias"), None)
    if keyword is None and len(call.args) >= 3:
        return evaluate(call.args[2], env)
    if keyword is None:
        return True if name == "Linear" else UNKNOWN
    return evaluate(keyword.value, env)


# Classes that only choose which keys a query reads (DeepSeek-V3.2's sparse-attention indexer): their k_norm
# normalizes the indexer's own keys, not the attention's, so it is no QK-norm delta.
_KEY_SELECTOR_SUFFIXES = ("indexer",)


def _projection_signals(ctx: _Ctx, parents: dict[ast.AST, ast.AST]) -> None:
    """Biases, fused QKV and QK-norm width from ``self.x = nn.Linear(...)``-style assignments."""
    for cls in ctx.classes.values():
        lowered = cls.name.lower()
        attrs = ctx.init_attrs.get(cls.name, {})
        for node in ast.walk(cls):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call)):
                continue
            target = node.targets[0]
            if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                continue
            func = node.value.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            activity = _activity(ctx, node, parents)
            if activity.active is False:
                continue
            env = _Env(ctx.config, attrs)
            if fname.endswith("Linear") or fname == "Conv1D":
                bias = _linear_bias(node.value, env)
                if target.attr == "lm_head" and bias is True:
                    ctx.add(DeltaCode.LM_HEAD_BIAS, "the LM head has a bias", node.lineno)
                elif "attention" in lowered or "attn" in lowered:
                    if target.attr in _FUSED_QKV_NAMES:
                        ctx.add(DeltaCode.FUSED_QKV, "query/key/value come from one fused projection", node.lineno)
                    if bias is True and target.attr in _QKV_NAMES:
                        ctx.add(DeltaCode.ATTENTION_BIAS, "the q/k/v projections have biases", node.lineno)
                    elif bias is True and target.attr in _OUT_NAMES:
                        ctx.add(DeltaCode.ATTENTION_OUT_BIAS, "the attention output projection has a bias",
                                node.lineno)
                elif ("mlp" in lowered or "expert" in lowered or "feedforward" in lowered
                      or target.attr in _MLP_NAMES) and bias is True:
                    ctx.add(DeltaCode.MLP_BIAS, "the MLP projections have biases", node.lineno)
                if target.attr == "gate_up_proj":
                    ctx.add(DeltaCode.FUSED_GATE_UP, "gate and up projections are one matrix", node.lineno)
            elif (target.attr in _QNORM_NAMES and (node.value.args or node.value.keywords)
                  and not lowered.endswith(_KEY_SELECTOR_SUFFIXES)):
                width = ast.unparse(node.value.args[0] if node.value.args else node.value.keywords[0].value)
                spans_heads = bool(re.search(r"hidden_size|num_heads|num_attention_heads|num_key_value_heads"
                                             r"|all_head_size", width)) and not width.startswith("(")
                if spans_heads:
                    ctx.add(DeltaCode.QK_NORM_FULL_WIDTH, "one QK-norm spans all heads", node.lineno)
                ctx.add(DeltaCode.QK_NORM, "queries and keys are normalized before attention", node.lineno)
        if "attention" in lowered or "attn" in lowered:
            _scale_signal(ctx, cls, parents)


def _scale_signal(ctx: _Ctx, cls: ast.ClassDef, parents: dict[ast.AST, ast.AST]) -> None:
    """The last ``self.scaling = ...`` the config reaches decides the score scale."""
    final = None
    for node in sorted((n for n in ast.walk(cls) if isinstance(n, ast.Assign) and len(n.targets) == 1
                        and isinstance(n.targets[0], ast.Attribute) and n.targets[0].attr == "scaling"),
                       key=lambda n: n.lineno):
        if _activity(ctx, node, parents).active is not False:
            final = node
    if final is None or isinstance(final.value, ast.Call):
        return
    value = final.value
    while isinstance(value, ast.IfExp):  # "a if config.flag else b": the branch the config takes
        test = evaluate(value.test, _Env(ctx.config, ctx.init_attrs.get(cls.name, {})))
        if test is UNKNOWN:
            break
        value = value.body if test else value.orelse
    expr = ast.unparse(value)
    if not _DEFAULT_SCALE.fullmatch(expr):
        ctx.add(DeltaCode.ATTENTION_SCALE, f"attention score scale is {expr}", final.lineno)


# The plain score scale, as ast.unparse prints it: 1/sqrt(head_dim).
_DEFAULT_SCALE = re.compile(r"self\.head_(?:dim|size|size_per_head)\s*\*\*\s*\(?-0\.5\)?|1\s*/\s*math\.sqrt\(self\.head_(?:dim|size)\)")
_ATTENTION_ATTRS = ("self_attn", "attention", "attn", "self_attention", "mixer")


def _decoder_layers(ctx: _Ctx, with_inline_mlp: bool = False) -> list[ast.ClassDef]:
    """Classes that hold both an attention and an MLP (or, with ``with_inline_mlp``, fc1/fc2)."""
    layers = []
    mlp_attrs = ("mlp", "feed_forward", "block_sparse_moe") + (("fc1",) if with_inline_mlp else ())
    for cls in ctx.classes.values():
        attrs = ctx.init_attrs.get(cls.name, {})
        if any(a in attrs for a in _ATTENTION_ATTRS) and any(m in attrs for m in mlp_attrs):
            layers.append(cls)
    return layers


def _calls_self(node: ast.AST, names: tuple[str, ...]) -> bool:
    return any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name)
               and c.func.value.id == "self" and c.func.attr in names for c in ast.walk(node))


def _block_signals(ctx: _Ctx, parents: dict[ast.AST, ast.AST]) -> None:
    """Parallel vs sequential residual (a taint walk over the layer's forward) and norm placement."""
    for cls in _decoder_layers(ctx):
        attrs = ctx.init_attrs.get(cls.name, {})
        attn = tuple(a for a in _ATTENTION_ATTRS if a in attrs)
        mlp = tuple(a for a in ("mlp", "feed_forward", "block_sparse_moe") if a in attrs)
        forward = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward"), None)
        if forward is not None:
            walker = _TaintWalker(ctx, attrs, attn, mlp)
            walker.run(forward.body, frozenset())
            if walker.parallel_line:
                ctx.add(DeltaCode.PARALLEL_BLOCK, "attention and MLP read the same input; outputs are summed",
                        walker.parallel_line, always=not walker.conditional, condition=walker.condition)
        names = set(attrs)
        init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
        line = init.lineno if init else cls.lineno
        if {"pre_feedforward_layernorm", "post_feedforward_layernorm", "input_layernorm"} <= names:
            ctx.add(DeltaCode.SANDWICH_NORM, "norms before and after attention and MLP",
                    _attr_line(init, "post_feedforward_layernorm") or line)
        elif "post_feedforward_layernorm" in names and "input_layernorm" not in names:
            ctx.add(DeltaCode.POST_NORM, "norms after attention and MLP outputs, no input norm",
                    _attr_line(init, "post_feedforward_layernorm") or line)


# Names in an ``if`` test that make applying RoPE depend on the layer (Exaone 4: ``if self.sliding_window is None
# or self.is_sliding: apply_rotary_pos_emb(...)``), as opposed to a None check on the position embeddings.
_PER_LAYER_ROPE_TESTS = {"is_sliding", "sliding_window", "use_rope", "no_rope", "layer_idx", "layer_type",
                         "attention_type", "is_global", "use_sliding"}
_ROPE_CALL = re.compile(r"apply_rotary|rotary_pos_emb|apply_rope")


def _conditional_rope_signals(ctx: _Ctx, parents: dict[ast.AST, ast.AST]) -> None:
    """RoPE applied only under a per-layer condition: the other layers are NoPE layers."""
    for cls in ctx.classes.values():
        for node in ast.walk(cls):
            if not isinstance(node, ast.If):
                continue
            calls = [c for stmt in node.body for c in ast.walk(stmt) if isinstance(c, ast.Call)]
            if not any(_ROPE_CALL.search(ast.unparse(c.func)) for c in calls):
                continue
            tested = _names_in(node.test) & _PER_LAYER_ROPE_TESTS
            if not tested:
                continue
            activity = _activity(ctx, node, parents)
            if activity.active is False:
                continue
            sliding = {"is_sliding", "sliding_window", "use_sliding"} & tested
            if sliding and _layer_types_mixed(ctx.config) is False:
                continue  # every layer is of one kind: the condition is the same on all of them
            ctx.add(DeltaCode.NOPE_LAYERS, f"RoPE is applied only when `{ast.unparse(node.test)}`; the other "
                    "layers use no positions", node.lineno, condition=activity.condition)


def _attr_line(function: ast.FunctionDef | None, attr: str) -> int | None:
    if function is None:
        return None
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == attr for t in node.targets):
            return node.lineno
    return None


class _TaintWalker:
    """Walks a decoder layer's forward: is the MLP's input computed from the attention output?"""

    def __init__(self, ctx: _Ctx, attrs: dict[str, ast.AST], attn: tuple[str, ...], mlp: tuple[str, ...]) -> None:
        self.ctx, self.attrs, self.attn, self.mlp = ctx, attrs, attn, mlp
        self.parallel_line: int | None = None
        self.conditional = False
        self.condition: str | None = None
        self.tests: list[str] = []

    def _tainted(self, node: ast.AST, tainted: frozenset[str]) -> bool:
        return _calls_self(node, self.attn) or any(isinstance(n, ast.Name) and n.id in tainted
                                                   for n in ast.walk(node))

    def run(self, body: list[ast.stmt], tainted: frozenset[str]) -> frozenset[str]:
        for stmt in body:
            if isinstance(stmt, ast.If):
                value = evaluate(stmt.test, _Env(self.ctx.config, self.attrs))
                if value is not UNKNOWN and _config_dependent(stmt.test, self.attrs):
                    branch = stmt.body if value else stmt.orelse
                    self.tests.append(ast.unparse(stmt.test) if value else f"not ({ast.unparse(stmt.test)})")
                    tainted = self.run(branch, tainted)
                    self.tests.pop()
                else:
                    tainted = self.run(stmt.body, tainted) | self.run(stmt.orelse, tainted)
                continue
            for call in ast.walk(stmt):
                if (isinstance(call, ast.Call) and _calls_self(call, self.mlp) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in self.mlp):
                    if not any(self._tainted(arg, tainted) for arg in call.args) and self.parallel_line is None:
                        self.parallel_line = stmt.lineno
                        self.conditional = bool(self.tests)
                        self.condition = " and ".join(self.tests) or None
            if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                value = stmt.value
                if value is not None and (self._tainted(value, tainted)
                                          or (isinstance(stmt, ast.AugAssign) and names & tainted)):
                    tainted = tainted | names
                elif not isinstance(stmt, ast.AugAssign):
                    tainted = tainted - names
        return tainted


def _mlp_signals(ctx: _Ctx) -> None:
    """An MLP class whose forward never multiplies by an activation output is ungated.

    A decoder layer that holds its MLP as ``fc1``/``fc2`` itself (OPT) is ungated too.
    """
    for layer in _decoder_layers(ctx, with_inline_mlp=True):
        attrs = ctx.init_attrs.get(layer.name, {})
        if {"fc1", "fc2"} <= set(attrs) and "mlp" not in attrs:
            ctx.add(DeltaCode.MLP_UNGATED, "the MLP is fc1 -> activation -> fc2 with no gate",
                    attrs["fc1"].lineno)
    for cls in ctx.classes.values():
        if not cls.name.endswith("MLP") or {"experts", "router"} & set(ctx.init_attrs.get(cls.name, {})):
            continue
        forward = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward"), None)
        if forward is None:
            continue
        gated = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult) for n in ast.walk(forward)) or any(
            isinstance(n, ast.Attribute) and n.attr == "chunk" for n in ast.walk(forward))
        if not gated:
            ctx.add(DeltaCode.MLP_UNGATED, "the MLP is up -> activation -> down with no gate", forward.lineno)


_ROPE_MARKERS = re.compile(r"\b(?:apply_rotary_pos_emb|rotate_half|rotate_every_two|RotaryEmbedding|rotary_emb)\b")


def _position_signals(ctx: _Ctx) -> None:
    uses_rope = any(_ROPE_MARKERS.search(ctx.source.lines[line - 1]) for top in ctx.scope for line in _span(top))
    if not uses_rope:
        attention = next((c for c in ctx.classes.values() if "Attention" in c.name), None)
        line = attention.lineno if attention else ctx.scope[0].lineno
        ctx.add(DeltaCode.NO_ROPE, "no rotary embedding in the modeling code", line, always=True)


def _config_mqa(ctx: _Ctx, reads: dict[str, list[Evidence]]) -> None:
    """Multi-query attention selected by a ``multi_query`` flag (no kv-head count key)."""
    if "multi_query" in reads and ctx.config.get("multi_query") is True:
        ev = reads["multi_query"][0]
        if ev.file == ctx.source.rel:
            ctx.add(DeltaCode.MQA, "multi_query=True: one key/value head for all query heads", ev.line,
                    condition="config.multi_query")


# --- entry point -----------------------------------------------------------------------------------


def text_model_type(config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The model_type whose causal-LM class runs the text, and the config dict that class reads."""
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("model_type"), str):
        if transformers_catalog.causal_lm_classes().get(text["model_type"]):
            return text["model_type"], text
    model_type = config.get("model_type")
    if isinstance(model_type, str) and not transformers_catalog.causal_lm_classes().get(model_type):
        for candidate in (f"{model_type}_text", f"{model_type}text"):
            if transformers_catalog.causal_lm_classes().get(candidate):
                return candidate, text if isinstance(text, dict) else config
    return (model_type if isinstance(model_type, str) else None), config


def read_model(config: dict[str, Any]) -> SourceReading | None:
    """Read the installed transformers' code for this config; None when transformers lacks the model type."""
    model_type, text = text_model_type(config)
    if not model_type:
        return None
    files = transformers_catalog.model_files(model_type)
    if files is None or files.modeling is None or _load(files.modeling) is None:
        return None
    return _read(files, _json_key(text))


def _json_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    import json

    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in config.items()))


@lru_cache(maxsize=32)
def _read(files: transformers_catalog.ModelFiles, config_items: tuple[tuple[str, str], ...]) -> SourceReading:
    """The reading of one model type for one config (cached: inspect and the wall scan share it)."""
    import json

    config_json = {k: json.loads(v) for k, v in config_items}
    modeling = _load(files.modeling) if files.modeling else None
    cls_info = _config_class(files.configuration, files.config_class)
    effective = effective_config(cls_info, config_json)
    notes: list[str] = []
    if modeling is None:
        raise ValueError(f"cannot parse {files.modeling}")
    start = files.causal_lm_class
    if not start or start not in modeling.defs:
        start = next((n for n in modeling.defs if n.endswith("ForCausalLM") or n.endswith("LMHeadModel")), None)
        notes.append(f"causal-LM class not in the auto mapping; read from {start or 'no class'}")
    scope = _reachable(modeling, start) if start else []
    if not scope:
        return SourceReading(files.model_type, modeling.rel, None, None, files.config_class, effective,
                             cls_info.defaults, cls_info.attribute_map, cls_info.legacy, {}, [], False,
                             notes + ["no causal-LM class in the modeling file: nothing read"])
    reads: dict[str, list[Evidence]] = {}
    _reads_in(modeling, scope, reads)
    followed = _shared_reads(modeling, scope, reads)
    if followed:
        notes.append(f"followed {len(followed)} shared function(s) in modeling_rope_utils / masking_utils")
    # The configuration class turns some keys into others in __post_init__: a key it reads there
    # counts as read when the attribute it computes is read.
    _post_init_reads(cls_info, files, reads)
    classes = {n.name: n for n in scope if isinstance(n, ast.ClassDef)}
    ctx = _Ctx(modeling, scope, effective, {}, classes, {name: _init_attrs(c) for name, c in classes.items()})
    parents: dict[ast.AST, ast.AST] = {}
    for top in scope:
        parents.update(_parents(top))
    _line_signals(ctx, parents)
    _projection_signals(ctx, parents)
    _block_signals(ctx, parents)
    _conditional_rope_signals(ctx, parents)
    _mlp_signals(ctx)
    _position_signals(ctx)
    _config_mqa(ctx, reads)
    if DeltaCode.NO_ROPE in ctx.signals:
        ctx.signals.pop(DeltaCode.PARTIAL_ROTARY, None)
        ctx.signals.pop(DeltaCode.ROPE_INTERLEAVED, None)
    if DeltaCode.LAYERNORM_WEIGHTLESS in ctx.signals:
        ctx.signals.setdefault(DeltaCode.LAYERNORM, ctx.signals[DeltaCode.LAYERNORM_WEIGHTLESS])
    order = list(DeltaCode)
    signals = sorted(ctx.signals.values(), key=lambda s: order.index(s.code))
    return SourceReading(
        model_type=files.model_type, modeling_file=modeling.rel,
        configuration_file=_load(files.configuration).rel if files.configuration and _load(files.configuration) else None,
        causal_lm_class=start, config_class=files.config_class, effective=effective, defaults=cls_info.defaults,
        attribute_map=cls_info.attribute_map, legacy_keys=cls_info.legacy, reads=reads, signals=signals,
        reads_is_decoder="is_decoder" in reads and any(e.file == modeling.rel for e in reads["is_decoder"]),
        notes=notes, window_flash_only=_window_flash_only(scope, parents))


# Calls that apply a window only in flash attention, and the name every window use is spelled with.
_FLASH_CALL_MARK = "flash"
_WINDOW_NAME = "sliding_window"


def _window_flash_only(scope: list[ast.AST], parents: dict[ast.AST, ast.AST]) -> bool:
    """True when every use of ``sliding_window`` in the causal-LM's code is an argument of a flash-attention
    call or the attribute it is stored in (``self.sliding_window = config.sliding_window``): no mask, no
    attention interface and no eager path reads the window."""
    uses = 0
    for top in scope:
        for node in ast.walk(top):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else \
                node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if _WINDOW_NAME in name and name != _WINDOW_NAME:
                return False  # a windowed mask function (create_sliding_window_causal_mask, sliding_window_overlay)
            if name != _WINDOW_NAME:
                continue
            uses += 1
            if not (_in_flash_call(node, parents) or _stores_window(node, parents)):
                return False
    return uses > 0


def _in_flash_call(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if _FLASH_CALL_MARK in name.lower():
                return True
    return False


def _stores_window(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    return isinstance(parent, ast.Assign) and all(
        isinstance(t, ast.Attribute) and t.attr == _WINDOW_NAME for t in parent.targets)


def _post_init_reads(cls_info: _ConfigClass, files: transformers_catalog.ModelFiles,
                     reads: dict[str, list[Evidence]]) -> None:
    source = _load(files.configuration) if files.configuration else None
    if source is None:
        return
    for _ in range(2):  # two rounds settle chains such as a -> b -> c
        for stmt in cls_info.post_init:
            for node in ast.walk(stmt):
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                    continue
                target = node.targets[0]
                if not (isinstance(target, ast.Attribute) and target.attr in reads):
                    continue
                for child in ast.walk(node.value):
                    if (isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name)
                            and child.value.id == "self" and child.attr not in reads):
                        reads[child.attr] = [_evidence(source, node.lineno)]
