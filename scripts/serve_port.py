"""Start `max serve` for a model (optionally with a port), wait until it answers, or stop it.

Starts the server in the background on 127.0.0.1 with echo enabled, shows
compile progress (elapsed time and the phase read from the log) on stderr,
keeps the full log in a file, and prints the base URL and the served model
name once /v1/models answers. With --port-dir the port package is passed as
--custom-architectures and its folder name (the slug) is the served name.
`--stop` stops servers this script started (whole process group, no orphaned
workers). A server that dies while loading gives exit 3 with the cause
classified and the log's error lines.

Public API (for compare, the gates, the demo and tests)::

    import serve_port
    with serve_port.served_model(model_path, port_dir=None, devices="cpu",
                                 encoding="float32", port=None, log_path=None,
                                 timeout=1800.0, progress=True) as server:
        server.base_url      # "http://127.0.0.1:PORT"
        server.served_name   # the port's slug with port_dir, else model_path
        server.port, server.log_path, server.command, server.startup_seconds
    # leaving the block stops the whole process group

    serve_port.build_serve_command(model_path, port=..., port_dir=None, devices="cpu",
                                   encoding="float32", served_name=None) -> list[str]
        The one place `max serve` flags are built, so every caller hits the
        same compile-cache entries.
    serve_port.start_server(...) -> RunningServer   (same arguments; call .stop())
    serve_port.normalize_port_dir(path) -> port_layout.PortDir (.path, .slug)
    serve_port.serve_hint(model, port_dir=None, port=None) -> str
        The serve command to suggest in error messages.
    serve_port.classify_failure(log_text) -> (cause, error_lines)
    serve_port.ServeFailure(ScriptError): .cause, .error_lines, .log_path
        cause is one of port-import-error, weight-name-mismatch, shape-mismatch,
        unsupported-encoding, kernel-constraint, device, timeout, unknown.

Servers started from the command line are recorded in
~/.cache/import-model/servers/<port>.json (override the folder with the
IMPORT_MODEL_SERVER_DIR environment variable) so that `--stop` can find them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cli_support
from cli_support import ScriptError
from port_layout import PortDir

EXIT_CODES = {1: "not used", 2: "not used"}

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 1800.0
STOP_GRACE_SECONDS = 20.0

# Log substrings that mark a loading phase, in the order MAX logs them.
PHASES = (
    ("Auto-detected pipeline task", "reading config"),
    ("Starting server", "starting workers"),
    ("Waiting for model worker readiness", "starting model worker"),
    ("Initializing model pipeline", "loading weights"),
    ("Building, compiling, and initializing model", "compiling graph"),
    ("Building, compiling, and initializing sampler", "compiling sampler"),
    ("Server ready on", "ready"),
)

# Failure causes: (cause, patterns on the log, what to tell the user).
FAILURE_CAUSES = (
    ("port-import-error",
     (r"Failed to import custom model", r"did not expose an `ARCHITECTURES` list", r"ModuleNotFoundError",
      r"ImportError", r"SyntaxError", r"IndentationError"),
     "the port package (or something it imports) failed to import"),
    ("weight-name-mismatch",
     (r"Missing required weights", r"Unexpected keys in state_dict", r"was not initialized",
      r"did you mean '"),
     "checkpoint weight names do not match the port's weights (check the weight adapter)"),
    ("shape-mismatch",
     (r"had different shape", r"had different dtype", r"shape rank \(expected", r"dim\[\d+\]: expected"),
     "a checkpoint tensor's shape or dtype differs from what the port declares"),
    ("kernel-constraint",
     (r"constraint failed", r"requires interleaved layout"),
     "a MAX kernel rejected the graph's arguments while compiling (the smoke gate cannot see this); "
     "read the constraint in the error lines and references/pitfalls-graph.md"),
    ("unsupported-encoding",
     (r"quantization_encoding of '[^']*' not supported", r"Cannot cast from '", r"is not supported on this device"),
     "the architecture does not support this --encoding (try another, e.g. bfloat16 on GPU)"),
    ("device",
     (r"GPU-only", r"At least one accelerator required", r"No (GPU|accelerator)", r"CUDA", r"accelerator",
      r"Invalid device specs"),
     "the requested --devices is not available or not supported by this architecture"),
)

ERROR_LINE = re.compile(r"(Error|Exception|error:|ERROR|CRITICAL|Traceback|raise |failed|Failed)")


@dataclass
class RunningServer:
    """A `max serve` process group started by this module."""

    base_url: str
    served_name: str
    port: int
    pid: int
    log_path: Path
    command: list[str]
    model: str
    startup_seconds: float = 0.0
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self) -> bool:
        """Stop the whole process group; True when it was running."""
        return stop_process_group(self.pid, self._process)

    def record(self) -> dict:
        return {
            "base_url": self.base_url, "served_name": self.served_name, "port": self.port, "pid": self.pid,
            "log_path": str(self.log_path), "command": self.command, "model": self.model,
            "startup_seconds": round(self.startup_seconds, 1),
        }


class ServeFailure(ScriptError):
    """The server died or timed out while loading; carries the classified cause."""

    def __init__(self, cause: str, hint: str, error_lines: list[str], log_path: Path | None):
        self.cause = cause
        self.error_lines = error_lines
        self.log_path = log_path
        last = error_lines[-1] if error_lines else "no error line in the log"
        super().__init__(f"max serve failed ({cause}: {hint}): {last} [full log: {log_path}]")


# --- command line ------------------------------------------------------------


def normalize_port_dir(path: str | os.PathLike) -> PortDir:
    """Strip trailing slashes and check the folder is a port package exposing ARCHITECTURES.

    Refuses a parent folder (one that holds a port rather than being one) and
    a slug that an installed module of the same name would shadow.
    """
    text = str(path).rstrip("/\\") or str(path)
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ScriptError(f"--port-dir {path} is not a folder")
    init = folder / "__init__.py"
    if not init.is_file() or "ARCHITECTURES" not in init.read_text(encoding="utf-8", errors="replace"):
        children = sorted(p.name for p in folder.iterdir() if (p / "__init__.py").is_file())
        hint = f"; did you mean {folder / children[0]}?" if len(children) == 1 else ""
        raise ScriptError(f"--port-dir {path} has no __init__.py defining ARCHITECTURES{hint}")
    slug = folder.name
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", slug):
        raise ScriptError(f"--port-dir folder name {slug!r} is not a valid Python module name")
    _refuse_shadowed_slug(slug, folder)
    return PortDir(folder)


def _refuse_shadowed_slug(slug: str, folder: Path) -> None:
    # MAX appends the port's parent to sys.path, so an installed module with the same name wins.
    import importlib.util

    try:
        spec = importlib.util.find_spec(slug)
    except (ImportError, ValueError):
        return
    if spec is None or not spec.origin:
        return
    found = Path(spec.origin).resolve()
    if folder not in found.parents:
        raise ScriptError(
            f"an installed module named {slug!r} ({found}) would shadow the port at {folder}; rename the port folder"
        )


def max_executable() -> str:
    """The `max` command of the Python environment running this script."""
    beside = Path(sys.executable).parent / "max"
    if beside.is_file():
        return str(beside)
    found = shutil.which("max")
    if found:
        return found
    raise ScriptError("the `max` command is not installed in this environment (pip install modular==26.7.0)")


def build_serve_command(
    model_path: str,
    *,
    port: int,
    port_dir: str | os.PathLike | None = None,
    devices: str = "cpu",
    encoding: str = "float32",
    served_name: str | None = None,
) -> list[str]:
    """The full `max serve` command line; every caller builds it here."""
    command = [max_executable(), "serve", "--model-path", str(model_path), "--host", HOST, "--port", str(port),
               "--devices", devices, "--quantization-encoding", encoding, "--enable-echo"]
    if port_dir is not None:
        normalized = normalize_port_dir(port_dir)
        command += ["--custom-architectures", str(normalized.path)]
        served_name = served_name or normalized.slug
    if served_name:
        command += ["--served-model-name", served_name]
    return command


def serve_hint(model: str, port_dir: str | os.PathLike | None = None, port: int | None = None) -> str:
    """The serve command to suggest to a user (dispatcher form)."""
    parts = ["python scripts/import_model.py serve", str(model)]
    if port_dir is not None:
        parts += ["--port-dir", str(port_dir).rstrip("/")]
    if port is not None:
        parts += ["--port", str(port)]
    return " ".join(parts)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


# --- log reading ---------------------------------------------------------------


def current_phase(log_text: str) -> str:
    """The latest loading phase named in the log."""
    phase = "starting"
    for marker, name in PHASES:
        if marker in log_text:
            phase = name
    return phase


def classify_failure(log_text: str) -> tuple[str, list[str]]:
    """The failure cause found in a server log, and the log's error lines (at most 12)."""
    lines = [line.rstrip() for line in log_text.splitlines()]
    errors = [line for line in lines if ERROR_LINE.search(line) and not line.lstrip().startswith("File ")]
    for cause, patterns, _hint in FAILURE_CAUSES:
        if any(re.search(p, log_text) for p in patterns):
            return cause, errors[-12:]
    return "unknown", errors[-12:]


def cause_hint(cause: str) -> str:
    for name, _patterns, hint in FAILURE_CAUSES:
        if name == cause:
            return hint
    if cause == "timeout":
        return "the server did not answer /v1/models in time"
    return "see the log"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# --- process lifetime --------------------------------------------------------


def models_endpoint(base_url: str, timeout: float = 2.0) -> dict | None:
    """The JSON of GET /v1/models, or None when the server does not answer."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def start_server(
    model_path: str,
    *,
    port_dir: str | os.PathLike | None = None,
    devices: str = "cpu",
    encoding: str = "float32",
    port: int | None = None,
    log_path: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    served_name: str | None = None,
) -> RunningServer:
    """Start `max serve` in its own process group and wait until /v1/models answers.

    Raises ServeFailure (exit 3) when the server dies or does not answer in
    ``timeout`` seconds; the process group is stopped in both cases.
    """
    if port is None:
        port = free_port()
    elif port_in_use(port):
        raise ScriptError(f"port {port} is already in use on {HOST}; pick another --port or stop that server")
    command = build_serve_command(model_path, port=port, port_dir=port_dir, devices=devices, encoding=encoding,
                                  served_name=served_name)
    served = command[command.index("--served-model-name") + 1] if "--served-model-name" in command else str(model_path)
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix=f"max-serve-{port}-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MAX_SERVE_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = RunningServer(f"http://{HOST}:{port}", served, port, process.pid, log_path, command, str(model_path),
                           _process=process)
    try:
        _wait_until_ready(server, process, timeout, progress)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: RunningServer, process: subprocess.Popen, timeout: float, progress: bool) -> None:
    started = time.monotonic()
    shown_phase, shown_at = "", 0.0
    interactive = progress and sys.stderr.isatty()
    while True:
        elapsed = time.monotonic() - started
        if process.poll() is not None:
            _clear_line(interactive)
            cause, lines = classify_failure(_read(server.log_path))
            raise ServeFailure(cause, cause_hint(cause), lines, server.log_path)
        if models_endpoint(server.base_url) is not None:
            server.startup_seconds = elapsed
            _clear_line(interactive)
            if progress:
                print(f"serve: ready after {elapsed:.0f}s at {server.base_url}", file=sys.stderr)
            return
        if elapsed > timeout:
            _clear_line(interactive)
            _cause, lines = classify_failure(_read(server.log_path))
            raise ServeFailure("timeout", cause_hint("timeout") + f" ({timeout:.0f}s)", lines, server.log_path)
        if progress:
            phase = current_phase(_read(server.log_path))
            if interactive:
                print(f"\rserve: {elapsed:5.0f}s  {phase:<24}", end="", file=sys.stderr, flush=True)
            elif phase != shown_phase or elapsed - shown_at >= 15:
                print(f"serve: {elapsed:.0f}s {phase}", file=sys.stderr, flush=True)
                shown_phase, shown_at = phase, elapsed
        time.sleep(1.0)


def _clear_line(interactive: bool) -> None:
    if interactive:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)


def stop_process_group(pid: int, process: subprocess.Popen | None = None) -> bool:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left; True when it was running."""
    if process is not None:
        process.poll()
    if not _group_alive(pid):
        if process is not None:
            process.wait()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()
        if not _group_alive(pid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if process is not None:
        process.wait()
    while _group_alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.1)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies count as gone: look for a live member of the group.
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


@contextlib.contextmanager
def served_model(model_path: str, **kwargs) -> Iterator[RunningServer]:
    """Context manager around start_server: the server is stopped when the block exits."""
    server = start_server(model_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# --- records for --stop ------------------------------------------------------------


def server_dir() -> Path:
    return Path(os.environ.get("IMPORT_MODEL_SERVER_DIR") or Path.home() / ".cache" / "import-model" / "servers")


def write_record(server: RunningServer) -> Path:
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{server.port}.json"
    path.write_text(json.dumps(server.record(), indent=2) + "\n")
    return path


def read_records(port: int | None = None) -> list[tuple[Path, dict]]:
    folder = server_dir()
    paths = [folder / f"{port}.json"] if port is not None else sorted(folder.glob("*.json"))
    records = []
    for path in paths:
        try:
            records.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return records


def _is_max_serve(pid: int) -> bool:
    # Guard against a recycled pid: the recorded process must still be `max serve`.
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmdline and any(part.endswith(b"max") for part in cmdline)


def stop_recorded(port: int | None) -> list[dict]:
    """Stop the servers recorded by this script (one port, or all); return what was stopped."""
    stopped = []
    for path, record in read_records(port):
        pid = int(record.get("pid", 0))
        running = pid > 0 and _is_max_serve(pid) and stop_process_group(pid)
        stopped.append({"port": record.get("port"), "pid": pid, "was_running": bool(running)})
        path.unlink(missing_ok=True)
    return stopped


# --- command line ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="Hub ID or local model directory to serve (not needed with --stop)")
    parser.add_argument("--port-dir", default=None,
                        help="port package folder (holds __init__.py with ARCHITECTURES); its name is the served name")
    parser.add_argument("--devices", default="cpu", help="cpu, gpu, gpu:0,1 ... (default: cpu)")
    parser.add_argument("--encoding", default="float32",
                        help="MAX --quantization-encoding: float32, bfloat16, float16 ... (default: float32)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free port)")
    parser.add_argument("--log-file", default=None, help="where to keep the full server log (default: a temp file)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the server to answer (default: {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--foreground", action="store_true",
                        help="stay attached and stop the server on Ctrl-C (default: leave it running in the background)")
    parser.add_argument("--stop", action="store_true",
                        help="stop the server this script started on --port (all of them without --port)")
    cli_support.add_json_flag(parser)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """Turn a termination signal into SystemExit, so cleanup code runs."""
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    if args.stop:
        stopped = stop_recorded(args.port)
        if args.json:
            cli_support.print_json({"stopped": stopped})
        elif not stopped:
            print("no recorded server to stop" + (f" on port {args.port}" if args.port else ""))
        for item in stopped if not args.json else []:
            state = "stopped" if item["was_running"] else "was not running"
            print(f"port {item['port']} (pid {item['pid']}): {state}")
        return cli_support.EXIT_OK
    if not args.model:
        raise ScriptError("MODEL is required unless --stop is given")
    if args.port is not None and not 0 < args.port < 65536:
        raise ScriptError(f"--port {args.port} is not a TCP port number")
    port_dir = normalize_port_dir(args.port_dir).path if args.port_dir else None
    cli_support.warn_if_untested_max()
    # A SIGTERM/SIGHUP while MAX compiles must still stop the server's process group.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    server = start_server(args.model, port_dir=port_dir, devices=args.devices, encoding=args.encoding,
                          port=args.port, log_path=args.log_file, timeout=args.timeout, progress=True)
    record = server.record()
    if not args.foreground:
        write_record(server)
        record["stop_command"] = f"python scripts/import_model.py serve --stop --port {server.port}"
    if args.json:
        cli_support.print_json(record)
    else:
        print(f"base_url: {server.base_url}")
        print(f"served_name: {server.served_name}")
        print(f"log: {server.log_path}")
        if not args.foreground:
            print(f"stop with: {record['stop_command']}")
    if args.foreground:
        sys.stdout.flush()
        try:
            while server._process is not None and server._process.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return cli_support.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
