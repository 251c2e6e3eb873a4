"""A loopback stand-in for the Hugging Face Hub, for tests of the Hub code path.

It serves local folders registered under repo IDs on 127.0.0.1 (an ephemeral
port), through the endpoints ``huggingface_hub`` 1.33 calls:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``
  (model info: ``sha``, ``siblings``, ``gated``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (file listing);
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{file}`` with ``ETag``,
  ``Content-Length`` and ``X-Repo-Commit`` (what the client needs to cache a
  file), and HTTP range requests answered with 206 (the safetensors metadata
  API reads headers this way);
- errors the client maps to its exception types: 404 with ``X-Error-Code``
  ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``, and 401/403
  ``GatedRepo`` for a gated repo without an accepted token.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, at
import, so code under test runs in a subprocess whose environment comes from
:meth:`HubStandin.env`. The ``hub`` fixture gives each test an empty registry,
a fresh request log and its own ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import unquote, urlsplit

import pytest

# Files the real Hub stores with Git LFS: their ETag is the content's sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx")

# Environment variables that would make a subprocess use a cache, token or
# proxy other than the ones the stand-in sets up.
_CLEARED_ENV = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_ASSETS_CACHE",
    "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "HF_DATASETS_OFFLINE",
)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class HubRepo:
    """One fixture repo: revision name -> local folder, plus access rules."""

    repo_id: str
    revisions: dict[str, Path]
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens granted access to a gated repo

    def commit_sha(self, revision: str) -> str:
        """The (stable, made-up) 40-hex commit hash of a revision."""
        return hashlib.sha1(f"{self.repo_id}@{revision}".encode()).hexdigest()

    @property
    def sha(self) -> str:
        """The commit hash of ``main``."""
        return self.commit_sha("main")

    def folder_for(self, revision: str) -> tuple[str, Path] | None:
        """(revision name, folder) for a branch/tag name or a commit hash."""
        if revision in self.revisions:
            return revision, self.revisions[revision]
        for name, folder in self.revisions.items():
            if self.commit_sha(name) == revision:
                return name, folder
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request the stand-in answered."""

    method: str
    path: str
    status: int
    range: str | None
    authorization: str | None


def repo_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files in a fixture folder (hidden entries skipped)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def file_etag(path: Path) -> str:
    """The ETag the Hub would send: sha256 for LFS files, the git blob sha1 otherwise."""
    data = path.read_bytes()
    if path.name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandin:
    """A Hub stand-in running in a daemon thread on 127.0.0.1."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, HubRepo] = {}
        self.log: list[RequestRecord] = []
        self.hf_home: Path | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- registry --------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revisions: Mapping[str, str | Path] | None = None,
        gated: bool = False,
        tokens: tuple[str, ...] = (),
    ) -> HubRepo:
        """Serve ``folder`` as ``repo_id`` at revision ``main`` (and more revisions if given)."""
        all_revisions = {"main": Path(folder)}
        all_revisions.update({name: Path(path) for name, path in (revisions or {}).items()})
        for name, path in all_revisions.items():
            if not path.is_dir():
                raise ValueError(f"fixture folder for {repo_id}@{name} does not exist: {path}")
        repo = HubRepo(repo_id, all_revisions, gated, frozenset(tokens))
        with self._lock:
            self._repos[repo_id] = repo
        return repo

    def reset(self) -> None:
        """Forget every repo and the request log."""
        with self._lock:
            self._repos.clear()
            self.log.clear()

    def repo(self, repo_id: str) -> HubRepo | None:
        with self._lock:
            return self._repos.get(repo_id)

    # --- what the client did ---------------------------------------------------

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self.log)

    def downloaded_files(self) -> list[str]:
        """Files fetched whole (GET on resolve without a Range header), as ``repo/file``."""
        return [_resolve_target(r.path) for r in self.records()
                if r.method == "GET" and r.range is None and r.status == 200 and "/resolve/" in r.path]

    def ranged_files(self) -> list[str]:
        """Files read with a Range header (e.g. safetensors headers), as ``repo/file``."""
        return [_resolve_target(r.path) for r in self.records()
                if r.method == "GET" and r.range is not None and "/resolve/" in r.path]

    # --- environment for subprocesses -------------------------------------------

    def env(self, *, offline: bool = False, token: str | None = None,
            hf_home: str | Path | None = None) -> dict[str, str | None]:
        """Environment overrides for a subprocess using this stand-in.

        A value of ``None`` means "unset this variable" (``run_script`` and
        :func:`subprocess_env` drop them). ``HF_HOME`` defaults to the test's own
        folder, so a second call in the same test shares the cache.
        """
        home = Path(hf_home) if hf_home is not None else self.hf_home
        if home is None:
            raise ValueError("no HF_HOME: pass hf_home= or use the 'hub' fixture")
        overrides: dict[str, str | None] = {name: None for name in _CLEARED_ENV}
        overrides.update({
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_OFFLINE": "1" if offline else None,
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "10",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        return overrides


def subprocess_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` with ``overrides`` applied; ``None`` values remove the variable."""
    env = dict(os.environ)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# --- HTTP ------------------------------------------------------------------------


def _resolve_target(path: str) -> str:
    repo, _, rest = urlsplit(path).path.lstrip("/").partition("/resolve/")
    return f"{unquote(repo)}/{unquote(rest.partition('/')[2])}"


def _make_handler(hub: HubStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        standin = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-standin/1"
    standin: HubStandin

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    # --- routing -----------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/") if p]
        try:
            if parts[:2] == ["api", "models"]:
                status = self._api(parts[2:], head)
            elif "resolve" in parts[1:3]:
                cut = parts.index("resolve", 1)
                status = self._resolve("/".join(parts[:cut]), parts[cut + 1:], head)
            else:
                status = self._send(404, {"error": "not found"}, head, error_code=None)
        except (BrokenPipeError, ConnectionResetError):
            status = 0
        auth = self.headers.get("Authorization")
        record = RequestRecord(self.command, self.path, status, self.headers.get("Range"), auth)
        with self.standin._lock:
            self.standin.log.append(record)

    def _api(self, parts: list[str], head: bool) -> int:
        # {repo}[/revision/{rev}] or {repo}/tree/{rev}[/{path}] where repo is 1 or 2 segments.
        for width in (2, 1):
            repo_id = "/".join(parts[:width])
            rest = parts[width:]
            if len(parts) >= width and (not rest or rest[0] in ("revision", "tree")):
                break
        else:
            return self._send(404, {"error": "not found"}, head, error_code=None)
        repo = self.standin.repo(repo_id)
        if repo is None:
            return self._repo_not_found(repo_id, head)
        revision = rest[1] if len(rest) >= 2 else "main"
        found = repo.folder_for(revision)
        if found is None:
            return self._send(404, {"error": f"Invalid rev id: {revision}"}, head,
                              error_code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        name, folder = found
        if rest and rest[0] == "tree":
            denied = self._gate(repo, head)
            if denied:
                return denied
            prefix = "/".join(rest[2:])
            return self._send(200, self._tree(folder, prefix), head)
        return self._send(200, self._model_info(repo, name, folder), head)

    def _resolve(self, repo_id: str, rest: list[str], head: bool) -> int:
        repo = self.standin.repo(repo_id)
        if repo is None:
            return self._repo_not_found(repo_id, head)
        if len(rest) < 2:
            return self._send(404, {"error": "not found"}, head, error_code="EntryNotFound")
        revision, filename = rest[0], "/".join(rest[1:])
        found = repo.folder_for(revision)
        if found is None:
            return self._send(404, {"error": f"Invalid rev id: {revision}"}, head,
                              error_code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        denied = self._gate(repo, head)
        if denied:
            return denied
        name, folder = found
        commit = repo.commit_sha(name)
        path = folder / filename
        if filename not in repo_files(folder):
            return self._send(404, {"error": "Entry not found"}, head, error_code="EntryNotFound",
                              message="Entry not found", extra={"X-Repo-Commit": commit})
        return self._send_file(path, commit, head)

    # --- answers -------------------------------------------------------------------

    def _gate(self, repo: HubRepo, head: bool) -> int:
        """0 when access is allowed, else the status of the 401/403 answer sent."""
        if not repo.gated:
            return 0
        auth = self.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token and token in repo.tokens:
            return 0
        message = (f"Access to model {repo.repo_id} is restricted. You must have access to it "
                   "and be authenticated to access it. Please log in.")
        status = 403 if token else 401
        return self._send(status, {"error": message}, head, error_code="GatedRepo", message=message)

    def _repo_not_found(self, repo_id: str, head: bool) -> int:
        message = "Repository not found"
        return self._send(404, {"error": message}, head, error_code="RepoNotFound", message=message)

    def _model_info(self, repo: HubRepo, revision: str, folder: Path) -> dict:
        siblings = []
        for name in repo_files(folder):
            path = folder / name
            entry: dict = {"rfilename": name, "size": path.stat().st_size, "blobId": file_etag(path)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": file_etag(path), "size": path.stat().st_size, "pointerSize": 134}
            siblings.append(entry)
        return {
            "_id": repo.commit_sha("_id")[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": repo.commit_sha(revision),
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": ["transformers", "safetensors"],
            "library_name": "transformers", "pipeline_tag": "text-generation", "siblings": siblings,
        }

    def _tree(self, folder: Path, prefix: str) -> list[dict]:
        entries = []
        for name in repo_files(folder):
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            path = folder / name
            entry: dict = {"type": "file", "oid": file_etag(path), "size": path.stat().st_size, "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": file_etag(path), "size": path.stat().st_size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def _send_file(self, path: Path, commit: str, head: bool) -> int:
        data = path.read_bytes()
        headers = {
            "ETag": f'"{file_etag(path)}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        requested = self.headers.get("Range")
        status, body = 200, data
        if requested and not head:
            span = _parse_range(requested, len(data))
            if span is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send_raw(416, b"", head, headers)
            start, end = span
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return self._send_raw(status, body, head, headers)

    def _send(self, status: int, document: object, head: bool, error_code: str | None = None,
              message: str | None = None, extra: Mapping[str, str] | None = None) -> int:
        headers = {"Content-Type": "application/json"}
        if error_code:
            headers["X-Error-Code"] = error_code
        if message:
            headers["X-Error-Message"] = message
        headers.update(extra or {})
        return self._send_raw(status, json.dumps(document).encode(), head, headers)

    def _send_raw(self, status: int, body: bytes, head: bool, headers: Mapping[str, str]) -> int:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=`` range, or None when unsatisfiable."""
    match = _RANGE.match(value.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        count = int(last)
        if count == 0:
            return None
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


# --- pytest fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubStandin]:
    """One stand-in server for the whole session (use ``hub`` in tests)."""
    server = HubStandin()
    yield server
    server.close()


@pytest.fixture
def hub(hub_server: HubStandin, tmp_path: Path) -> Iterator[HubStandin]:
    """The Hub stand-in with no repos, an empty request log and a fresh ``HF_HOME``."""
    hub_server.reset()
    hub_server.hf_home = tmp_path / "hf_home"
    hub_server.hf_home.mkdir()
    yield hub_server
    hub_server.reset()
    hub_server.hf_home = None
