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


def read_text(path: str | Path, what: str = "", *, label: str | None = None) -> str:
    """The UTF-8 text of a file; ScriptError naming the file (or ``label``) for any other kind of file or text."""
    path = Path(path)
    label = label or (f"{what} {path}" if what else str(path))
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
    return read_python(path, what)[1]


# Python accepts a UTF-8 byte-order mark at the start of a source file; ast.parse of the decoded text does not.
_BOM = "\ufeff"


def read_python(path: str | Path, what: str = "") -> tuple[str, ast.Module]:
    """The text (without a leading byte-order mark) and ast of a Python source file; ScriptError on any failure.

    Null bytes, syntax errors and nesting too deep for the parser are all reported naming the file.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    text = read_text(path, what)
    if text.startswith(_BOM):
        text = text[len(_BOM):]
    try:
        return text, ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(f"cannot parse {label}: {exc.msg} (line {exc.lineno})") from None
    except (RecursionError, MemoryError):
        raise ScriptError(f"cannot parse {label}: nested too deeply for the Python parser") from None
    except ValueError as exc:
        raise ScriptError(f"cannot parse {label}: {exc}") from None


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


def json_depth(document: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON document (a scalar is 0); no recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_depth(document: Any, label: str, limit: int) -> Any:
    """Refuse a parsed document nested deeper than ``limit`` levels (recursive walks stay safe); return it."""
    depth = json_depth(document)
    if depth > limit:
        raise ScriptError(f"{label} nests arrays/objects {depth} levels deep (more than {limit}); it is not a "
                          "valid file of its kind")
    return document


# --- staged writes: build beside the output, then move into place ---------------------------------

# Permissions of a new folder before the umask, as ``mkdir`` would use.
_DIR_MODE = 0o777


def make_staging_dir(output: Path, prefix: str, flag: str) -> tuple[Path, list[Path]]:
    """A fresh staging folder beside ``output``, and the missing parents made for it (deepest first).

    The folder is this run's own (``tempfile.mkdtemp``), so nothing another run or the user left
    beside ``output`` is ever reused or deleted; it gets ordinary permissions, not mkdtemp's
    owner-only ones. Hand both to ``discard_staging`` on failure.
    """
    import tempfile

    made = _missing_ancestors(output.parent)
    for folder in reversed(made):
        try:
            folder.mkdir()
        except OSError as exc:
            remove_empty_dirs(made)
            raise ScriptError(f"cannot create {folder} for {flag} {output}: {exc.strerror or exc}") from None
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, _DIR_MODE & ~mask)
    except OSError as exc:
        remove_empty_dirs(made)
        raise ScriptError(f"cannot write into {output.parent} for {flag} {output}: {exc.strerror or exc}") from None
    return staging, made


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not (folder.exists() or folder.is_symlink()) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove folders this run created, deepest first, only while they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def discard_staging(staging: Path, made: list[Path]) -> None:
    """Remove this run's staging folder and the empty parents it created."""
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    remove_empty_dirs(made)


def free_backup_path(path: Path) -> Path:
    """``<path>.bak-<timestamp>`` beside ``path``, with a counter when that name is taken."""
    import time

    base = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, suffix = base, 1
    while candidate.exists() or candidate.is_symlink():
        candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return candidate


def move_into_place(staging: Path, output: Path, replace: bool) -> Path | None:
    """Rename ``staging`` to ``output``; with ``replace``, move the old ``output`` to a backup first.

    Returns the backup (or None). If the final rename fails, the old output is put back and the
    OSError propagates; an empty existing ``output`` folder is replaced without a backup.
    """
    backup = None
    if replace:
        backup = free_backup_path(output)
        output.rename(backup)
    elif output.is_dir() and not output.is_symlink():
        output.rmdir()  # empty (the caller checked); rmdir refuses if something appeared since
    try:
        staging.rename(output)
    except OSError:
        if backup is not None:
            backup.rename(output)
        raise
    return backup
