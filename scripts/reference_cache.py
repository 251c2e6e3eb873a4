"""A disk cache of HF reference logprob rows, so a second compare of the same model skips loading it.

compare loads the HF model (seconds for a replica, minutes for a real
checkpoint) only to score MAX's token sequence. After an edit to the port the
model and, usually, MAX's greedy continuation are the same, so the rows are
too. An entry is keyed by everything the rows depend on:

* the model folder: every file's relative name, size and modification time
  (a rewritten weight, config or tokenizer file is a miss);
* the installed transformers and torch versions;
* dtype, device and attention implementation;
* the exact token ids scored.

Only local folders are cached (a Hub ID resolves to its snapshot folder
first); remote code is never cached, since it can change outside the folder.
``IMPORT_MODEL_REFERENCE_CACHE=off`` turns the cache off; any other value is
the folder to use (default ``$XDG_CACHE_HOME/import-model/reference``).
No torch import here: numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

CACHE_ENV = "IMPORT_MODEL_REFERENCE_CACHE"
OFF_VALUES = ("off", "0", "no", "false")
# Bumped when the stored rows change meaning (positions, dtype, layout): old entries become misses.
FORMAT_VERSION = 1
# The cache is pruned, oldest first, past this size: a few dozen prompts of a 150k-token vocabulary.
MAX_CACHE_BYTES = 512 * 1024 * 1024
# A folder with more files than this is not fingerprinted (a mistaken MODEL such as a home folder).
MAX_FINGERPRINT_FILES = 10_000


def cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """The cache folder, or None when the cache is turned off."""
    env = os.environ if environ is None else environ
    chosen = env.get(CACHE_ENV, "").strip()
    if chosen.lower() in OFF_VALUES:
        return None
    if chosen:
        return Path(chosen)
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "import-model" / "reference"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def model_fingerprint(location: str | Path, **settings: Any) -> str | None:
    """A key for the reference at ``location`` under ``settings``; None when it cannot be cached."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    files = []
    for path in sorted(folder.rglob("*")):
        if len(files) > MAX_FINGERPRINT_FILES:
            return None
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        files.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    described = {"format": FORMAT_VERSION, "folder": str(folder.resolve()), "files": files,
                 "transformers": _version("transformers"), "torch": _version("torch"),
                 "settings": {key: str(value) for key, value in sorted(settings.items())}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _entry(folder: Path, key: str, token_ids: Sequence[int]) -> Path:
    digest = hashlib.sha256(f"{key}:{','.join(str(int(i)) for i in token_ids)}".encode()).hexdigest()
    return folder / f"{digest}.npz"


def load_rows(key: str | None, token_ids: Sequence[int]) -> tuple[Any, int] | None:
    """(rows, vocab_rows) stored for ``token_ids`` under ``key``, or None on a miss or a bad entry."""
    folder = cache_dir()
    if key is None or folder is None:
        return None
    path = _entry(folder, key, token_ids)
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as stored:
            rows, vocab_rows = stored["rows"], int(stored["vocab_rows"])
    except (OSError, KeyError, ValueError):
        return None
    if rows.dtype != np.float64 or rows.ndim != 2 or rows.shape[0] != len(token_ids) - 1:
        return None
    os.utime(path)  # most recently used: pruned last
    return rows, vocab_rows


def store_rows(key: str | None, token_ids: Sequence[int], rows: Any, vocab_rows: int) -> bool:
    """Store ``rows`` for ``token_ids``; False (and nothing written) when the cache is off or unwritable."""
    folder = cache_dir()
    if key is None or folder is None:
        return False
    import numpy as np

    temporary = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, rows=np.asarray(rows, dtype=np.float64), vocab_rows=np.int64(vocab_rows))
        os.replace(temporary, _entry(folder, key, token_ids))
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        return False
    prune(folder)
    return True


def prune(folder: Path, limit: int = MAX_CACHE_BYTES) -> None:
    """Delete this cache's own entries (``*.npz``), least recently used first, until they fit in ``limit``."""
    entries = []
    for path in folder.glob("*.npz"):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            return
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
