"""MAX's on-disk compile cache: where it lives and which compiled graphs it holds.

Checked on MAX 26.7 (CPU): ``max serve`` writes each compiled model or sampler
graph as one file under ``<cache>/modular/.max_cache/mof/mef/<MAX version>/``,
where ``<cache>`` is ``$XDG_CACHE_HOME`` or ``~/.cache``; kernels go to
sibling ``.mogg_cache`` / ``.mojo_cache`` folders. A serve that adds no file
there compiled no graph: its graphs came from the cache. Other MAX versions
may lay the cache out differently; ``compiled_graphs`` then finds nothing.

Imports neither torch nor max.
"""

from __future__ import annotations

import os
from pathlib import Path

import max_compat

CHECKED_MAX_VERSION = max_compat.CHECKED_MAX_RELEASE
# Compiled executables, one file per graph, in MAX 26.7's layout.
_GRAPH_FOLDER = Path(".max_cache") / "mof" / "mef"


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """The folder MAX puts its caches in: ``$XDG_CACHE_HOME/modular`` or ``~/.cache/modular``."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modular"


def compiled_graphs(environ: dict[str, str] | None = None) -> set[str]:
    """Names of the compiled graphs in the cache (``version/file``); empty when there is none."""
    root = cache_root(environ) / _GRAPH_FOLDER
    if not root.is_dir():
        return set()
    return {f"{path.parent.name}/{path.name}" for path in root.glob("*/*") if path.is_file()}
