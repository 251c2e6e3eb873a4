"""A stand-in for `max serve` in tests: no compile, only what `serve` relies on.

Run as ``fake_max.py serve --model-path M --host H --port P [--served-model-name N] ...``
(``install`` in ``fake_max_command`` below writes a ``max`` wrapper that does so). It logs
MAX-like phase lines, sleeps a "compile", then a child process (same process group, like
MAX's API server) binds H:P and answers ``GET /v1/models`` with the served name. When the
port is taken the child prints uvicorn's "[Errno 98] ... address already in use" line and
the parent lingers (as MAX does while it tears down) before exiting 1.

Environment:
  FAKE_MAX_COMPILE_SECONDS   the "compile" time (default 1)
  FAKE_MAX_LINGER_SECONDS    how long to stay alive after a failed bind (default 0)
  FAKE_MAX_MODELS_BODY       raw body to answer /v1/models with instead of the served name
  FAKE_MAX_PID_DIR           write ``<port>-<pid>.started`` there when started (tests wait on it)
  FAKE_MAX_FAIL_LINE         after the "compile", log this line and exit 1 (a server that dies loading)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def fake_max_command(folder: Path) -> Path:
    """Write an executable ``max`` into ``folder`` that runs this stand-in; return its path."""
    wrapper = Path(folder) / "max"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="max")
    parser.add_argument("command")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    args, _rest = parser.parse_known_args(argv)
    return args


def _say(text: str) -> None:
    print(text, flush=True)


def api_worker(host: str, port: int, name: str) -> int:
    """Bind like uvicorn (SO_REUSEADDR) and answer /v1/models until killed."""
    body = os.environ.get("FAKE_MAX_MODELS_BODY")
    payload = (body if body is not None else json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}))
    encoded = payload.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/models":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(encoded)))
            self.end_headers()
            self.wfile.write(encoded)

        def log_message(self, *args):
            pass

    try:
        server = HTTPServer((host, port), Handler)  # allow_reuse_address is set, as in uvicorn
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _say(f"ERROR:    [Errno 98] error while attempting to bind on address ('{host}', {port}): "
                 "address already in use")
            return 1
        raise
    _say(f"INFO: Server ready on http://{host}:{port}")
    server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--api-worker"]:
        return api_worker(argv[1], int(argv[2]), argv[3])
    args = _parse(argv)
    if args.command != "serve":
        _say(f"fake max: only `serve` is implemented, not {args.command!r}")
        return 2
    name = args.served_model_name or args.model_path
    pid_dir = os.environ.get("FAKE_MAX_PID_DIR")
    if pid_dir:
        # Written whole, then renamed: a test polling for the file never reads it half-written.
        staging = Path(pid_dir) / f".{args.port}-{os.getpid()}.tmp"
        staging.write_text(str(os.getpgrp()))
        staging.rename(Path(pid_dir) / f"{args.port}-{os.getpid()}.started")
    _say("INFO: Starting server...")
    _say("INFO: Building, compiling, and initializing model...")
    time.sleep(float(os.environ.get("FAKE_MAX_COMPILE_SECONDS", "1")))
    failure = os.environ.get("FAKE_MAX_FAIL_LINE")
    if failure:
        _say("Traceback (most recent call last):")
        _say(failure)
        return 1
    worker = subprocess.Popen([sys.executable, __file__, "--api-worker", args.host, str(args.port), name])
    code = worker.wait()
    if code:
        time.sleep(float(os.environ.get("FAKE_MAX_LINGER_SECONDS", "0")))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
