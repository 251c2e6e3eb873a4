"""Which model types and classes the installed transformers ships, without importing it.

Importing transformers pulls in torch and takes seconds. This module finds
the package folder with ``importlib.util.find_spec`` and reads files: the
string names in ``models/auto/*.py`` (the auto mappings) and, as a fallback,
``class Name(`` lines in ``models/<type>/`` source files.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
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


# --- source files of one model type ---------------------------------------------------------------

_AUTO_MAPPINGS = ("models", "auto", "auto_mappings.py")
_MODELING_AUTO = ("models", "auto", "modeling_auto.py")
# transformers' modules that read config keys for every family (RoPE setup, attention masks, config base).
SHARED_MODULES = {"rope": "modeling_rope_utils.py", "masking": "masking_utils.py",
                  "configuration": "configuration_utils.py"}


def _mapping_pairs(path: Path, name: str) -> dict[str, str]:
    """The ``("key", "value")`` pairs of the ``NAME = OrderedDict([...])`` literal in ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    start = text.find(f"\n{name} = OrderedDict(")
    if start < 0:
        return {}
    end = text.find("\n)", start)
    block = text[start:end if end > 0 else len(text)]
    return dict(re.findall(r"\(\s*\"([^\"]+)\"\s*,\s*\"([^\"]+)\"\s*\)", block))


@lru_cache(maxsize=1)
def config_class_names() -> dict[str, str]:
    """model_type -> configuration class name, from the auto mappings (empty without transformers)."""
    root = transformers_dir()
    return _mapping_pairs(root.joinpath(*_AUTO_MAPPINGS), "CONFIG_MAPPING_NAMES") if root else {}


@lru_cache(maxsize=1)
def _special_module_names() -> dict[str, str]:
    root = transformers_dir()
    return _mapping_pairs(root.joinpath(*_AUTO_MAPPINGS), "SPECIAL_MODEL_TYPE_TO_MODULE_NAME") if root else {}


@lru_cache(maxsize=1)
def causal_lm_classes() -> dict[str, str]:
    """model_type -> the class transformers' causal-LM auto mapping builds for it."""
    root = transformers_dir()
    return _mapping_pairs(root.joinpath(*_MODELING_AUTO), "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") if root else {}


def module_name(model_type: str) -> str:
    """The ``models/<name>`` folder name transformers uses for a model_type."""
    return _special_module_names().get(model_type) or model_type.replace("-", "_")


@dataclass(frozen=True)
class ModelFiles:
    """Where one model type's code lives in the installed transformers."""

    model_type: str
    folder: Path
    modeling: Path | None
    configuration: Path | None
    config_class: str | None
    causal_lm_class: str | None


def model_files(model_type: str) -> ModelFiles | None:
    """The modeling and configuration files of ``model_type``; None when transformers or the folder is missing."""
    root = transformers_dir()
    if root is None:
        return None
    name = module_name(model_type)
    folder = root / "models" / name
    if not folder.is_dir():
        return None

    def one(prefix: str) -> Path | None:
        # A folder can hold several models (models/data2vec: _audio, _text, _vision): the file named after the
        # model type comes first, then the folder's own name, then any file of that kind.
        for stem in dict.fromkeys((model_type.replace("-", "_"), name)):
            path = folder / f"{prefix}_{stem}.py"
            if path.is_file():
                return path
        found = sorted(folder.glob(f"{prefix}_*.py"))
        return found[0] if found else None

    return ModelFiles(model_type=model_type, folder=folder, modeling=one("modeling"),
                      configuration=one("configuration"), config_class=config_class_names().get(model_type),
                      causal_lm_class=causal_lm_classes().get(model_type))


def shared_module(kind: str) -> Path | None:
    """One of :data:`SHARED_MODULES` in the installed transformers, or None."""
    root = transformers_dir()
    path = root / SHARED_MODULES[kind] if root else None
    return path if path is not None and path.is_file() else None
