"""Which model types and classes the installed transformers ships, without importing it.

Importing transformers pulls in torch and takes seconds. This module finds
the package folder with ``importlib.util.find_spec`` and reads files: the
string names in ``models/auto/*.py`` (the auto mappings) and, as a fallback,
``class Name(`` lines in ``models/<type>/`` source files.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

_QUOTED_NAME = re.compile(r"[\"']([A-Za-z_][A-Za-z0-9_\-]*)[\"']")


@lru_cache(maxsize=1)
def transformers_dir() -> Path | None:
    """The installed transformers package folder, or None when it is not installed."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def _auto_names() -> frozenset[str]:
    """Every quoted identifier in the auto-mapping files (model types and class names)."""
    root = transformers_dir()
    if root is None:
        return frozenset()
    names: set[str] = set()
    for path in sorted((root / "models" / "auto").glob("*.py")):
        try:
            names.update(_QUOTED_NAME.findall(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return frozenset(names)


def _defined_in(folder: Path, class_name: str, glob: str) -> bool:
    pattern = re.compile(rf"^class {re.escape(class_name)}\b", re.MULTILINE)
    for path in folder.glob(glob):
        try:
            if pattern.search(path.read_text(encoding="utf-8")):
                return True
        except (OSError, UnicodeDecodeError):
            continue
    return False


def ships_model_type(model_type: str) -> bool | None:
    """True when transformers has this ``model_type``; None when transformers is missing."""
    root = transformers_dir()
    if root is None:
        return None
    return model_type in _auto_names() or (root / "models" / model_type.replace("-", "_")).is_dir()


def ships_class(class_name: str, model_type: str | None = None) -> bool | None:
    """True when transformers ships this model class; None when transformers is missing."""
    root = transformers_dir()
    if root is None:
        return None
    if class_name in _auto_names():
        return True
    folders = [root / "models" / model_type.replace("-", "_")] if model_type else []
    folders = [f for f in folders if f.is_dir()] or [root / "models"]
    glob = "modeling_*.py" if folders[0] != root / "models" else "*/modeling_*.py"
    return any(_defined_in(folder, class_name, glob) for folder in folders)


def ships_tokenizer(class_name: str) -> bool | None:
    """True when transformers ships this tokenizer class (``...Fast`` names count as shipped)."""
    root = transformers_dir()
    if root is None:
        return None
    names = _auto_names()
    if class_name in names or class_name.removesuffix("Fast") in names:
        return True
    if class_name in ("PreTrainedTokenizerFast", "PreTrainedTokenizer", "TokenizersBackend", "PythonBackend"):
        return True
    return _defined_in(root / "models", class_name.removesuffix("Fast"), "*/tokenization_*.py")
