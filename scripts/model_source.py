"""Where a model's files come from: a local folder or the Hugging Face Hub.

Every script resolves MODEL through this module. MODEL is a Hub ID
(``org/name``), a local model directory, or a path to a ``config.json``. It
reads ``config.json``, lists the weight files, and reads safetensors headers
without downloading weights. Hub access goes through ``huggingface_hub``, so
``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the HF cache are honored.
Failures raise :class:`cli_support.ScriptError` with a one-line message.

This module imports neither torch nor max; ``huggingface_hub`` is imported
only when a Hub ID is used.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import input_files
import model_anatomy
from cli_support import ScriptError
from model_anatomy import RopeSettings  # re-exported: callers name model_source.RopeSettings

# A safetensors header larger than this is treated as corrupt (real ones are
# well under 10 MiB even for very large sharded models).
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# Bits per element of each safetensors dtype (the format's own list; F4 and F6 pack
# several elements per byte), for size checks and parameter/bytes totals.
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64, "I64": 64, "I32": 32,
    "I16": 16, "I8": 8, "U8": 8, "U16": 16, "U32": 32, "U64": 64, "BOOL": 8,
}
DTYPE_BYTES = {name: bits / 8 for name, bits in DTYPE_BITS.items()}

# Model JSON files (config, index, tokenizer config) nest 3 or 4 levels; deeper ones are
# refused before any recursive walk over them can reach Python's recursion limit.
MAX_JSON_DEPTH = 32
# A safetensors header is {name: {dtype, shape, data_offsets}}: 3 levels with the arrays.
MAX_HEADER_DEPTH = 3
# A model folder holds at most a few thousand files; listing stops beyond this so a MODEL
# that is not a model folder (a home folder, /) fails fast instead of walking the disk.
MAX_LISTED_FILES = 50_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a checkpoint: its dtype, shape, and the file holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def num_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a model and their format.

    ``format`` is one of ``safetensors``, ``bin``, ``gguf`` or ``none``.
    """

    format: str
    files: tuple[str, ...]
    sharded: bool
    index_file: str | None = None
    other_formats: tuple[str, ...] = ()


@dataclass
class ModelSource:
    """A resolved MODEL argument: a local folder or a Hub repo (plus revision)."""

    spec: str
    local_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    _files: list[str] | None = field(default=None, repr=False)

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None

    @property
    def location(self) -> str:
        """What transformers' ``from_pretrained`` takes: the local folder or the repo ID."""
        return str(self.local_dir) if self.local_dir is not None else str(self.repo_id)

    @property
    def display_name(self) -> str:
        return self.location

    @property
    def name(self) -> str:
        """The model's short name (last path or repo component)."""
        if self.local_dir is not None:
            return self.local_dir.resolve().name
        return str(self.repo_id).split("/")[-1]

    # --- files -----------------------------------------------------------

    def list_files(self) -> list[str]:
        """Relative paths of every file in the model (Hub: the repo listing)."""
        if self._files is None:
            if self.local_dir is not None:
                self._files = _local_list_files(self.local_dir)
            else:
                self._files = _hub_list_files(self)
        return list(self._files)

    def has_file(self, filename: str) -> bool:
        return filename in self.list_files()

    def read_text(self, filename: str) -> str:
        """The UTF-8 text of one (small) file of the model."""
        return input_files.read_text(self.fetch(filename), label=f"{filename} of {self.display_name}")

    def read_json(self, filename: str) -> dict[str, Any]:
        """One JSON object file of the model, refused when malformed, not an object or nested too deeply."""
        label = f"{filename} of {self.display_name}"
        document = input_files.parse_json_text(self.read_text(filename), label, expect=None)
        if not isinstance(document, dict):
            raise ScriptError(f"{label} is not a JSON object (it is {input_files.json_type_name(document)})")
        return input_files.check_json_depth(document, label, MAX_JSON_DEPTH)

    def fetch(self, filename: str) -> Path:
        """A local path to one file (Hub: downloaded into, or read from, the HF cache).

        ``filename`` is relative to the model; a name that leaves the model folder is refused.
        """
        problem = unsafe_relative_name(filename)
        if problem:
            raise ScriptError(f"refusing to read {filename!r} of {self.display_name}: {problem}")
        if self.local_dir is not None:
            path = self.local_dir / filename
            kind = input_files.describe_path_problem(path)
            if kind == "does not exist":
                raise ScriptError(f"{filename} not found in {self.local_dir}")
            if kind:
                raise ScriptError(f"{filename} of {self.local_dir} {kind}")
            return path
        return _hub_download(self, filename)


def unsafe_relative_name(name: Any) -> str | None:
    """Why a file name from a model's own files (an index) cannot be read inside the model, or None."""
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if "\0" in name:
        return "the name holds a NUL byte"
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "an absolute path, outside the model folder"
    if ".." in pure.parts:
        return "a path with '..', outside the model folder"
    return None


def _local_list_files(root: Path) -> list[str]:
    """Files below a local model folder (no link is followed into a folder; .cache is skipped)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != ".cache")
        base = Path(dirpath)
        for name in filenames:
            path = base / name
            if path.is_file():  # a dangling link or a link loop is not a file
                found.append(str(path.relative_to(root)).replace(os.sep, "/"))
        if len(found) > MAX_LISTED_FILES:
            raise ScriptError(f"{root} holds more than {MAX_LISTED_FILES} files; it is not a model folder "
                              "(give the folder with config.json)")
    return sorted(found)


def resolve(model: str, revision: str | None = None) -> ModelSource:
    """Resolve MODEL: an existing local dir, a path to config.json, or a Hub ID."""
    if not model or not model.strip():
        raise ScriptError("MODEL is empty: give a Hub ID (org/name) or a local directory")
    path = Path(model).expanduser()
    if path.is_symlink() and not path.exists():
        raise ScriptError(f"MODEL {model} {input_files.describe_path_problem(path)}")
    if revision and (path.is_dir() or path.is_file()):
        raise ScriptError(f"--revision applies to Hub IDs only; {model} is a local path")
    if path.is_dir():
        return ModelSource(spec=model, local_dir=path, revision=revision)
    if path.is_file():
        if path.name == "config.json":
            return ModelSource(spec=model, local_dir=path.parent, revision=revision)
        raise ScriptError(f"{model} is a file but not a config.json; give its folder instead")
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1
    if looks_local or not _HUB_ID.match(model):
        raise ScriptError(f"model not found: {model} is neither a local directory nor a Hub ID (org/name)")
    return ModelSource(spec=model, repo_id=model, revision=revision)


# --- config ------------------------------------------------------------------


def read_config(source: ModelSource, *, require_architectures: bool = True) -> dict[str, Any]:
    """The raw ``config.json`` of the model, checked for an ``architectures`` list."""
    config = source.read_json("config.json")
    label = f"config.json of {source.display_name}"
    if require_architectures:
        archs = config.get("architectures")
        if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
            raise ScriptError(f"{label} has no 'architectures' list; cannot tell which model class it is")
        wrong = next((i for i, name in enumerate(archs) if not isinstance(name, str) or not name.strip()), None)
        if wrong is not None:
            raise ScriptError(f"{label}: architectures[{wrong}] is {_describe(archs[wrong])}, expected a class name")
    check_config_fields(config, label)
    return config


# Size fields every consumer reads as integers (null means "not set").
INTEGER_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
# Of those, the ones a config may also give per layer, as a list (Gemma 3n's intermediate_size).
PER_LAYER_INTEGER_FIELDS = ("intermediate_size",)
# Fields read as real numbers, with the range each must lie in (null means "not set").
NUMBER_FIELDS = {
    "rope_theta": "positive", "rope_local_base_freq": "positive", "partial_rotary_factor": "fraction",
    "rms_norm_eps": "non_negative", "layer_norm_eps": "non_negative", "layer_norm_epsilon": "non_negative",
    "query_pre_attn_scalar": "positive",
}
# Fields that name something and must be strings when present.
STRING_FIELDS = ("model_type", "dtype", "torch_dtype", "hidden_act", "hidden_activation")
# Fields that must be JSON objects when present.
OBJECT_FIELDS = ("text_config", "rope_scaling", "rope_parameters", "quantization_config", "auto_map")
_RANGE_TEXT = {"positive": "a finite number above 0", "fraction": "a number in (0, 1]",
               "non_negative": "a finite number at least 0"}


def _describe(value: Any) -> str:
    """A JSON value for an error message: its type and a short repr."""
    text = repr(value)
    return f"{input_files.json_type_name(value)} ({text if len(text) <= 40 else text[:37] + '...'})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value: Any, field_name: str, kind: str, label: str) -> None:
    if value is None:
        return
    ok = _is_number(value) and math.isfinite(value) and (
        value > 0 if kind == "positive" else 0 < value <= 1 if kind == "fraction" else value >= 0)
    if not ok:
        raise ScriptError(f"{label}: {field_name} is {_describe(value)}, expected {_RANGE_TEXT[kind]}")


def _check_rope_dict(params: dict[str, Any], where: str, label: str) -> None:
    """RoPE parameter dicts: numeric theta/factors, string type names."""
    for key in ("rope_type", "type"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise ScriptError(f"{label}: {where}.{key} is {_describe(params[key])}, expected a string")
    for key in ("rope_theta", "factor"):
        _check_number(params.get(key), f"{where}.{key}", "positive", label)
    _check_number(params.get("partial_rotary_factor"), f"{where}.partial_rotary_factor", "fraction", label)


def check_config_fields(config: dict[str, Any], label: str = "config") -> None:
    """Refuse config fields of the wrong JSON type or range, naming the field (top level and text_config)."""
    parts = [("", config)]
    if isinstance(config.get("text_config"), dict):
        parts.append(("text_config.", config["text_config"]))
    for prefix, part in parts:
        for key in OBJECT_FIELDS:
            if part.get(key) is not None and not isinstance(part[key], dict):
                raise ScriptError(f"{label}: {prefix}{key} is {_describe(part[key])}, expected a JSON object")
        for key in STRING_FIELDS:
            if part.get(key) is not None and not isinstance(part[key], str):
                raise ScriptError(f"{label}: {prefix}{key} is {_describe(part[key])}, expected a string")
        for key in INTEGER_FIELDS:
            value = part.get(key)
            if value is None:
                continue
            values = value if key in PER_LAYER_INTEGER_FIELDS and isinstance(value, list) and value else [value]
            for item in values:
                integral = _is_number(item) and math.isfinite(item) and float(item).is_integer()
                if not integral or item < 0:
                    expected = "a whole number >= 0" + (" or a list of them, one per layer"
                                                        if key in PER_LAYER_INTEGER_FIELDS else "")
                    raise ScriptError(f"{label}: {prefix}{key} is {_describe(value)}, expected {expected}")
        for key, kind in NUMBER_FIELDS.items():
            _check_number(part.get(key), prefix + key, kind, label)
        if isinstance(part.get("rope_scaling"), dict):
            _check_rope_dict(part["rope_scaling"], prefix + "rope_scaling", label)
        params = part.get("rope_parameters")
        if isinstance(params, dict):
            # Read as normalize_config reads it: per layer type when every value is an object.
            nested = params if params and all(isinstance(v, dict) for v in params.values()) else {"": params}
            for layer_type, sub in nested.items():
                _check_rope_dict(sub, f"{prefix}rope_parameters" + (f".{layer_type}" if layer_type else ""), label)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config: ``text_config`` when nested, else the config."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested:
        return nested
    return config


@dataclass(frozen=True)
class NormalizedConfig:
    """The config fields whose spelling differs between transformers 4.x and 5.x (a thin view).

    Kept for callers that read only these fields; the full view, with every
    alias and the key each value came from, is ``model_anatomy.config_view``.
    """

    architecture: str | None
    model_type: str | None
    dtype: str | None
    rope: RopeSettings | None
    rope_by_layer_type: dict[str, RopeSettings]
    spelling: str  # "old", "new", "mixed" or "none"


def normalize_config(config: dict[str, Any]) -> NormalizedConfig:
    """Read dtype and RoPE settings from either config spelling (ScriptError for a field of the wrong type)."""
    view = model_anatomy.config_view(config)
    return NormalizedConfig(view.architecture, view.model_type, view.dtype, view.rope,
                            dict(view.rope_by_layer_type), view.spelling)


# --- weights -----------------------------------------------------------------


def weight_files(source: ModelSource) -> WeightFiles:
    """Find the weight files: safetensors (single or sharded), ``.bin``, or GGUF."""
    files = source.list_files()
    top = [f for f in files if "/" not in f]
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    bins = sorted(f for f in top if f.endswith(".bin") and ("pytorch_model" in f or f.startswith("model")))
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    present = [name for name, group in (("safetensors", safetensors), ("bin", bins), ("gguf", ggufs)) if group]

    if safetensors or SAFETENSORS_INDEX in top:
        others = tuple(p for p in present if p != "safetensors")
        if SAFETENSORS_INDEX in top:
            index = source.read_json(SAFETENSORS_INDEX)
            shards = index_shards(index, f"{SAFETENSORS_INDEX} of {source.display_name}")
            return WeightFiles("safetensors", tuple(shards), True, SAFETENSORS_INDEX, others)
        return WeightFiles("safetensors", tuple(safetensors), len(safetensors) > 1, None, others)
    if bins or BIN_INDEX in top:
        sharded = BIN_INDEX in top or len(bins) > 1
        return WeightFiles("bin", tuple(bins), sharded, BIN_INDEX if BIN_INDEX in top else None,
                           tuple(p for p in present if p != "bin"))
    if ggufs:
        return WeightFiles("gguf", tuple(ggufs), len(ggufs) > 1, None, ())
    if not source.is_local and hub_offline():
        # Offline, the listing is the cached snapshot: weights that were never
        # downloaded are missing from it, which does not mean the repo has none.
        raise ScriptError(
            f"no weight files of {source.repo_id} are in the HF cache and HF_HUB_OFFLINE is set; "
            "unset it to list the repo's weights (no weights are downloaded)"
        )
    return WeightFiles("none", (), False, None, ())


def index_shards(index: dict[str, Any], label: str) -> list[str]:
    """The shard files a safetensors index names, checked: an object of names inside the model folder."""
    weight_map = index.get("weight_map")
    if weight_map is None:
        raise ScriptError(f"{label} has no weight_map")
    if not isinstance(weight_map, dict):
        raise ScriptError(f"{label}: weight_map is {input_files.json_type_name(weight_map)}, expected a JSON "
                          "object of tensor name -> shard file")
    if not weight_map:
        raise ScriptError(f"{label} has an empty weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ScriptError(f"{label}: weight_map[{tensor!r}] is {_describe(shard)}, expected a shard file name")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        problem = unsafe_relative_name(shard)
        if problem:
            raise ScriptError(f"{label}: weight_map names shard {shard!r}, {problem}; refusing to read it")
        if not shard.endswith(".safetensors"):
            raise ScriptError(f"{label}: weight_map names shard {shard!r}, which is not a .safetensors file")
    return shards


def read_safetensors_header(path: Path | str) -> dict[str, Any]:
    """Read one local safetensors header: the 8-byte length, then that much JSON.

    Reads no tensor data. Raises ScriptError on a truncated, oversized or
    malformed header.
    """
    return read_safetensors_file(path)[0]


def read_safetensors_file(path: Path | str) -> tuple[dict[str, Any], int]:
    """A local safetensors header and the size in bytes of the data after it (``read_safetensors_header``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ScriptError(f"{path.name}: truncated safetensors file (no header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > MAX_SAFETENSORS_HEADER_BYTES:
                raise ScriptError(
                    f"{path.name}: safetensors header length {length} is outside "
                    f"1..{MAX_SAFETENSORS_HEADER_BYTES} bytes; the file is corrupt"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise ScriptError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) < length:
        raise ScriptError(f"{path.name}: truncated safetensors header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ScriptError(f"{path.name}: safetensors header is not valid JSON; the file is corrupt") from None
    except RecursionError:
        raise ScriptError(f"{path.name}: safetensors header is nested too deeply to parse; the file is corrupt") from None
    if not isinstance(header, dict):
        raise ScriptError(f"{path.name}: safetensors header is not a JSON object")
    return header, size - 8 - length


def _tensors_from_header(header: dict[str, Any], filename: str, data_size: int | None = None,
                         label: str | None = None) -> dict[str, TensorInfo]:
    """Tensor infos from a parsed header, each entry checked against the safetensors format.

    Checks the dtype, the shape (whole numbers >= 0), that ``data_offsets`` hold exactly
    shape x dtype bytes, that no two tensors overlap and, when ``data_size`` is known, that
    every tensor ends inside the file.
    """
    where = label or filename
    tensors = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ScriptError(f"{where}: safetensors __metadata__ is {_describe(entry)}, expected a JSON "
                                  "object of strings; the file is corrupt")
            continue
        if not isinstance(entry, dict) or not all(k in entry for k in ("dtype", "shape", "data_offsets")):
            raise ScriptError(f"{where}: malformed safetensors header entry for {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise ScriptError(f"{where}: tensor {name!r} has dtype {_describe(dtype)}, not a safetensors dtype "
                              f"({', '.join(DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ScriptError(f"{where}: tensor {name!r} has shape {_describe(shape)}; every dimension must be "
                              "a whole number >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ScriptError(f"{where}: tensor {name!r} has data_offsets {_describe(offsets)}; expected "
                              "[begin, end] with 0 <= begin <= end")
        info = TensorInfo(name, dtype, tuple(shape), filename)
        expected = (info.num_elements * DTYPE_BITS[dtype] + 7) // 8
        begin, end = offsets
        if end - begin != expected:
            raise ScriptError(f"{where}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its "
                              f"data_offsets {offsets} hold {end - begin}; the file is corrupt")
        if data_size is not None and end > data_size:
            raise ScriptError(f"{where}: tensor {name!r} ends at data byte {end}, past the end of the file's "
                              f"{max(data_size, 0)} data bytes; the file is truncated or corrupt")
        spans.append((begin, end, name))
        tensors[name] = info
    spans.sort()
    for (_, first_end, first), (second_begin, _, second) in zip(spans, spans[1:]):
        if second_begin < first_end:
            raise ScriptError(f"{where}: tensors {first!r} and {second!r} overlap in the file "
                              "(data_offsets); the file is corrupt")
    return tensors


def read_tensor_infos(source: ModelSource, weights: WeightFiles | None = None) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of every tensor, from safetensors headers only.

    Local: reads each file's header. Hub: ``huggingface_hub``'s safetensors
    metadata API (HTTP range requests), or cached files when offline.
    """
    weights = weights or weight_files(source)
    if weights.format != "safetensors":
        raise ScriptError(
            f"{source.display_name} has no safetensors weights (format: {weights.format}); "
            "tensor metadata is read from safetensors headers only"
        )
    if source.is_local:
        tensors: dict[str, TensorInfo] = {}
        for filename in weights.files:
            header, data_size = read_safetensors_file(source.fetch(filename))
            tensors.update(_tensors_from_header(header, filename, data_size))
        return tensors
    return _hub_tensor_infos(source, weights)


# --- Hub -----------------------------------------------------------------------


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for offline mode."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_client() -> Any:
    """Import ``huggingface_hub`` with its warnings (e.g. retry notices) kept off stderr.

    Errors stay one line; set ``HF_HUB_VERBOSITY`` to see the client's own logs.
    """
    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging  # configures its logger on import

    if not os.environ.get("HF_HUB_VERBOSITY"):
        hub_logging.set_verbosity_error()
    return huggingface_hub


def _hub_error(source: ModelSource, exc: BaseException, what: str) -> ScriptError:
    """Translate a huggingface_hub exception into a one-line ScriptError."""
    from huggingface_hub import errors

    repo = source.repo_id
    rev = f" at revision {source.revision}" if source.revision else ""
    if isinstance(exc, errors.GatedRepoError):
        return ScriptError(
            f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN to a token with access"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = "; if it is private or gated, set HF_TOKEN" if status == 401 else ""
        return ScriptError(f"model not found: {repo} does not exist on the Hub{hint}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ScriptError(f"revision not found: {repo}{rev}")
    # LocalEntryNotFoundError subclasses EntryNotFoundError: test it first.
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or hub_offline():
        return ScriptError(
            f"{what} of {repo}{rev} is not in the HF cache and the Hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if hub_offline() else 'network error'})"
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return ScriptError(f"{what} not found in {repo}{rev}")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return ScriptError(f"unauthorized for {repo}: set HF_TOKEN to a token with access")
        return ScriptError(f"Hub request for {what} of {repo} failed (HTTP {status})")
    return ScriptError(f"cannot reach the Hub for {what} of {repo}: {type(exc).__name__}")


def _hub_download(source: ModelSource, filename: str) -> Path:
    huggingface_hub = _hub_client()

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                source.repo_id, filename, revision=source.revision, token=os.environ.get("HF_TOKEN") or None
            )
        )
    except Exception as exc:  # noqa: BLE001 - translated into a one-line error
        raise _hub_error(source, exc, filename) from None


def _cached_snapshot_dir(source: ModelSource) -> Path | None:
    """The cached snapshot folder for the repo and revision, if any."""
    import huggingface_hub

    try:
        config = huggingface_hub.hf_hub_download(
            source.repo_id, "config.json", revision=source.revision, local_files_only=True
        )
    except Exception:  # noqa: BLE001 - not cached
        return None
    return Path(config).parent


def _hub_list_files(source: ModelSource) -> list[str]:
    if hub_offline():
        snapshot = _cached_snapshot_dir(source)
        if snapshot is None:
            raise ScriptError(
                f"{source.repo_id} is not in the HF cache and HF_HUB_OFFLINE is set; "
                "unset it or download the model first"
            )
        files = [str(p.relative_to(snapshot)).replace(os.sep, "/") for p in snapshot.rglob("*") if p.is_file()]
        # An index names shards that may not be cached; list them so the format is known.
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if index_name in files:
                try:
                    index = json.loads((snapshot / index_name).read_text(encoding="utf-8"))
                    weight_map = index.get("weight_map") if isinstance(index, dict) else None
                    if isinstance(weight_map, dict):
                        files.extend({v for v in weight_map.values() if isinstance(v, str)})
                except (OSError, ValueError, RecursionError):
                    pass  # weight_files reads the index again and names what is wrong with it
        return sorted(set(files))
    HfApi = _hub_client().HfApi

    try:
        info = HfApi(token=os.environ.get("HF_TOKEN") or None).model_info(
            source.repo_id, revision=source.revision, files_metadata=False
        )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(source, exc, "the file list") from None
    return sorted(s.rfilename for s in (info.siblings or []))


def _hub_tensor_infos(source: ModelSource, weights: WeightFiles) -> dict[str, TensorInfo]:
    if hub_offline():
        import huggingface_hub

        tensors: dict[str, TensorInfo] = {}
        for filename in weights.files:
            try:
                path = huggingface_hub.hf_hub_download(
                    source.repo_id, filename, revision=source.revision, local_files_only=True
                )
            except Exception:  # noqa: BLE001
                raise ScriptError(
                    f"{filename} of {source.repo_id} is not in the HF cache and HF_HUB_OFFLINE is set; "
                    "unset it to read headers from the Hub (no weights are downloaded)"
                ) from None
            header, data_size = read_safetensors_file(path)
            tensors.update(_tensors_from_header(header, filename, data_size, f"{filename} of {source.repo_id}"))
        return tensors
    HfApi = _hub_client().HfApi
    from huggingface_hub import errors

    # One ranged read per listed file (not get_safetensors_metadata, which only
    # knows model.safetensors and the index, not other single-file names).
    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    tensors = {}
    for filename in weights.files:
        try:
            file_meta = api.parse_safetensors_file_metadata(source.repo_id, filename, revision=source.revision)
        except errors.SafetensorsParsingError:
            raise ScriptError(
                f"{filename} of {source.repo_id}: safetensors header is truncated, oversized or not valid "
                "JSON; the file is corrupt"
            ) from None
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
            # The client builds its tensor records from the header without checking it.
            raise ScriptError(f"{filename} of {source.repo_id}: malformed safetensors header; the file is corrupt") from None
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(source, exc, f"the safetensors header of {filename}") from None
        # The same checks as a local header, except the file end (a ranged read does not know it).
        header = {name: {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
                  for name, info in file_meta.tensors.items()}
        if file_meta.metadata is not None:
            header["__metadata__"] = file_meta.metadata
        tensors.update(_tensors_from_header(header, filename, None, f"{filename} of {source.repo_id}"))
    return tensors


def checkpoint_summary(tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """Tensor count, parameter count, bytes, and the dominant dtype by parameter count."""
    by_dtype: dict[str, int] = {}
    total_bytes = 0.0
    for info in tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.num_elements
        total_bytes += info.num_elements * DTYPE_BYTES.get(info.dtype, 0)
    total = sum(by_dtype.values())
    dominant = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else None
    return {
        "tensor_count": len(tensors),
        "parameter_count": total,
        "bytes": int(total_bytes),
        "dominant_dtype": dominant,
        "parameters_by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
    }


# Safetensors dtype names mapped to the torch_dtype / dtype spelling used in configs.
SAFETENSORS_TO_CONFIG_DTYPE = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
