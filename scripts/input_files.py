"""Reading and writing the files a user hands the scripts, with one-line errors.

Every script reads config files, JSON records, port modules and prompt files
that may be of the wrong kind (a folder, a dangling link, a link loop), not
UTF-8, nested too deeply for Python's parser, or of the wrong JSON type. The
helpers here turn each of those into a ``ScriptError`` naming the file, so a
caller never needs its own ``try`` around ``open``. The output-folder checks
(``check_output_dir``, ``check_not_inside``) refuse before anything is
written.

Imports neither torch nor max.
"""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path
from typing import Any

from cli_support import ScriptError

# JSON types as the error messages name them.
_JSON_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "true/false",
                    int: "an integer", float: "a number", type(None): "null"}


def describe_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a regular file, or None when it can."""
    try:
        if path.is_symlink() and not path.exists():
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return "is a symbolic link loop"
            return "is a dangling symbolic link"
        if not path.exists():
            return "does not exist"
        if path.is_dir():
            return "is a folder, not a file"
        if not path.is_file():
            return "is not a regular file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be examined ({exc.strerror or exc})"
    return None


def read_text(path: str | Path, what: str = "") -> str:
    """The UTF-8 text of a file; ScriptError naming the file for any other kind of file or text."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    problem = describe_path_problem(path)
    if problem:
        raise ScriptError(f"{label} {problem}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScriptError(f"{label} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ScriptError(f"cannot read {label}: {exc.strerror or exc}") from None


def parse_json_text(text: str, label: str, expect: type | None = dict) -> Any:
    """Parse JSON text; ScriptError naming ``label`` for bad JSON, deep nesting or the wrong top-level type."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{label} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ScriptError(f"{label} is nested too deeply to parse") from None
    if expect is not None and not isinstance(document, expect):
        raise ScriptError(f"{label} is {json_type_name(document)}, expected {_JSON_TYPE_NAMES.get(expect, expect)}")
    return document


def load_json(path: str | Path, what: str = "", expect: type | None = dict) -> Any:
    """Read and parse a JSON file (an object unless ``expect`` says otherwise)."""
    path = Path(path)
    return parse_json_text(read_text(path, what), f"{what} {path}" if what else str(path), expect)


def json_type_name(value: Any) -> str:
    """How an error message names the JSON type of ``value``."""
    for kind, name in _JSON_TYPE_NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def parse_python(path: str | Path, what: str = "") -> ast.Module:
    """Parse a Python source file with ast; ScriptError naming the file on any failure."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    text = read_text(path, what)
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(f"cannot parse {label}: {exc.msg} (line {exc.lineno})") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ScriptError(f"cannot parse {label}: {type(exc).__name__}") from None


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Refuse an output folder that is a file, lies below a file, or is a broken link; return it resolved.

    Nothing is created. The folder itself may be missing.
    """
    text = str(path)
    if not text.strip():
        raise ScriptError(f"{flag} is empty; name a folder")
    path = Path(text).expanduser()
    probe = path
    while True:
        if probe.is_symlink() or probe.exists():
            problem = describe_path_problem(probe)
            if problem is not None and problem != "is a folder, not a file":
                where = "" if probe == path else f" (below {probe}, which {problem})"
                raise ScriptError(f"{flag} {path} {problem}" if not where else f"{flag} {path} cannot be a folder{where}")
            if problem is None:  # a regular file
                if probe == path:
                    raise ScriptError(f"{flag} {path} is a file, not a folder")
                raise ScriptError(f"{flag} {path} cannot be a folder (below {probe}, which is a file)")
            break
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise ScriptError(f"{flag} {path} cannot be resolved ({exc})") from None


def check_not_inside(output: Path, protected: Path, output_flag: str, protected_what: str) -> None:
    """Refuse when ``output`` is ``protected`` or one of its ancestors or descendants (both resolved)."""
    output, protected = output.resolve(), protected.resolve()
    if output == protected:
        raise ScriptError(f"{output_flag} {output} is the {protected_what} itself; choose another folder")
    if output in protected.parents:
        raise ScriptError(f"{output_flag} {output} contains the {protected_what} {protected}; choose another folder")
    if protected in output.parents:
        raise ScriptError(f"{output_flag} {output} lies inside the {protected_what} {protected}; choose another folder")
