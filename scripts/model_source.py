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
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli_support import ScriptError

# A safetensors header larger than this is treated as corrupt (real ones are
# well under 10 MiB even for very large sharded models).
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# Bytes per element of each safetensors dtype, for parameter/bytes totals.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1, "F4": 0.5, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}


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
                self._files = sorted(
                    str(p.relative_to(self.local_dir)).replace(os.sep, "/")
                    for p in self.local_dir.rglob("*")
                    if p.is_file() and ".cache" not in p.relative_to(self.local_dir).parts
                )
            else:
                self._files = _hub_list_files(self)
        return list(self._files)

    def has_file(self, filename: str) -> bool:
        return filename in self.list_files()

    def read_text(self, filename: str) -> str:
        """The text of one (small) file of the model."""
        path = self.fetch(filename)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScriptError(f"cannot read {filename} of {self.display_name}: {exc}") from None

    def read_json(self, filename: str) -> dict[str, Any]:
        text = self.read_text(filename)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScriptError(
                f"{filename} of {self.display_name} is not valid JSON "
                f"(line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        if not isinstance(document, dict):
            raise ScriptError(f"{filename} of {self.display_name} is not a JSON object")
        return document

    def fetch(self, filename: str) -> Path:
        """A local path to one file (Hub: downloaded into, or read from, the HF cache)."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if not path.is_file():
                raise ScriptError(f"{filename} not found in {self.local_dir}")
            return path
        return _hub_download(self, filename)


def resolve(model: str, revision: str | None = None) -> ModelSource:
    """Resolve MODEL: an existing local dir, a path to config.json, or a Hub ID."""
    if not model or not model.strip():
        raise ScriptError("MODEL is empty: give a Hub ID (org/name) or a local directory")
    path = Path(model).expanduser()
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
    if require_architectures:
        archs = config.get("architectures")
        if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
            raise ScriptError(
                f"config.json of {source.display_name} has no 'architectures' list; "
                "cannot tell which model class it is"
            )
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config: ``text_config`` when nested, else the config."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested:
        return nested
    return config


@dataclass(frozen=True)
class RopeSettings:
    """RoPE settings in one spelling, whichever the config used."""

    theta: float | None
    rope_type: str  # default, linear, dynamic, yarn, longrope, llama3, ...
    scaling: dict[str, Any]  # the scaling parameters other than theta and type
    partial_rotary_factor: float | None


@dataclass(frozen=True)
class NormalizedConfig:
    """The config fields whose spelling differs between transformers 4.x and 5.x.

    Old spelling (most Hub checkpoints): ``torch_dtype``, ``rope_theta``,
    ``rope_scaling``. New spelling (transformers 5.x): ``dtype`` and
    ``rope_parameters``, which may be nested per layer type.
    """

    architecture: str | None
    model_type: str | None
    dtype: str | None
    rope: RopeSettings | None
    rope_by_layer_type: dict[str, RopeSettings]
    spelling: str  # "old", "new", "mixed" or "none"


def normalize_config(config: dict[str, Any]) -> NormalizedConfig:
    """Read dtype and RoPE settings from either config spelling."""
    text = text_config(config)
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    old = any(k in text or k in config for k in ("torch_dtype", "rope_theta", "rope_scaling", "rope_local_base_freq"))
    new = any(k in text or k in config for k in ("dtype", "rope_parameters"))
    spelling = "mixed" if old and new else "old" if old else "new" if new else "none"

    partial = text.get("partial_rotary_factor")
    params = text.get("rope_parameters")
    by_layer: dict[str, RopeSettings] = {}
    rope: RopeSettings | None = None
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        for layer_type, sub in params.items():
            by_layer[layer_type] = _rope_from_params(sub, partial)
        rope = by_layer.get("full_attention") or next(iter(by_layer.values()))
    elif isinstance(params, dict) and params:
        rope = _rope_from_params(params, partial)
    else:
        scaling = text.get("rope_scaling")
        theta = text.get("rope_theta")
        if theta is not None or isinstance(scaling, dict) or partial is not None:
            merged = dict(scaling) if isinstance(scaling, dict) else {}
            if theta is not None:
                merged["rope_theta"] = theta
            rope = _rope_from_params(merged, partial)
        local_theta = text.get("rope_local_base_freq")
        if rope is not None and local_theta is not None:
            # Old gemma3 spelling: sliding-window layers use an unscaled RoPE with
            # their own base; transformers 5 nests this per layer type.
            by_layer = {
                "sliding_attention": _rope_from_params({"rope_theta": local_theta}, partial),
                "full_attention": rope,
            }
    archs = config.get("architectures") or []
    return NormalizedConfig(
        architecture=archs[0] if archs and isinstance(archs[0], str) else None,
        model_type=config.get("model_type"),
        dtype=str(dtype) if dtype is not None else None,
        rope=rope,
        rope_by_layer_type=by_layer,
        spelling=spelling,
    )


def _rope_from_params(params: dict[str, Any], partial: Any) -> RopeSettings:
    rest = dict(params)
    theta = rest.pop("rope_theta", None)
    rope_type = rest.pop("rope_type", None) or rest.pop("type", None) or "default"
    rest.pop("type", None)
    factor = rest.pop("partial_rotary_factor", None)
    if factor is None:
        factor = partial
    return RopeSettings(
        theta=float(theta) if theta is not None else None,
        rope_type=str(rope_type),
        scaling=rest,
        partial_rotary_factor=None if factor is None else float(factor),
    )


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
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise ScriptError(f"{SAFETENSORS_INDEX} of {source.display_name} has an empty weight_map")
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


def read_safetensors_header(path: Path | str) -> dict[str, Any]:
    """Read one local safetensors header: the 8-byte length, then that much JSON.

    Reads no tensor data. Raises ScriptError on a truncated, oversized or
    malformed header.
    """
    path = Path(path)
    try:
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
    if not isinstance(header, dict):
        raise ScriptError(f"{path.name}: safetensors header is not a JSON object")
    return header


def _tensors_from_header(header: dict[str, Any], filename: str) -> dict[str, TensorInfo]:
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = TensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), filename)
        except (KeyError, TypeError, ValueError):
            raise ScriptError(f"{filename}: malformed safetensors header entry for {name!r}") from None
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
            tensors.update(_tensors_from_header(read_safetensors_header(source.fetch(filename)), filename))
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
                    index = json.loads((snapshot / index_name).read_text())
                    files.extend(set((index.get("weight_map") or {}).values()))
                except (OSError, json.JSONDecodeError, AttributeError):
                    pass
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
            tensors.update(_tensors_from_header(read_safetensors_header(path), filename))
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
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(source, exc, f"the safetensors header of {filename}") from None
        for name, info in file_meta.tensors.items():
            tensors[name] = TensorInfo(name, str(info.dtype), tuple(int(d) for d in info.shape), filename)
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
