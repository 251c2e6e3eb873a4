"""The lifetime of one `max serve` process: build its command, start it, wait until it is ready, stop it.

Library for serve, compare, the gates, the demo and the benchmarks (the `serve`
script is its command line). "Ready" means the own child is alive, the socket
listening on the port belongs to the child's process group (read from /proc)
and /v1/models lists the served name; another process on the port is a
failure, never "ready". A server that dies while loading raises ServeFailure
with the cause classified from its log.

Public API::

    import max_server
    with max_server.served_model(model_path, port_dir=None, devices="cpu",
                                 encoding="float32", port=None, log_path=None,
                                 timeout=1800.0, progress=True) as server:
        server.base_url      # "http://127.0.0.1:PORT"
        server.served_name   # the port's slug with port_dir, else model_path
        server.port, server.pid, server.log_path, server.command, server.startup_seconds
    # leaving the block stops the whole process group

    max_server.build_serve_command(model_path, port=..., port_dir=None, devices="cpu",
                                   encoding="float32", served_name=None) -> list[str]
        The one place `max serve` flags are built, so every caller hits the
        same compile-cache entries.
    max_server.start_server(...) -> RunningServer   (same arguments; call .stop())
    max_server.launch_server(...) -> RunningServer  (start_server without the wait or timeout)
    max_server.normalize_port_dir(path) -> port_layout.PortDir (.path, .slug)
    max_server.probe_models(base_url) -> ModelsAnswer     (GET /v1/models: answered, names, problem)
    max_server.classify_failure(log_text) -> (cause, error_lines)
    max_server.ServeFailure(ScriptError): .cause, .error_lines, .log_path
        cause is one of port-in-use, port-taken, port-import-error, weight-name-mismatch,
        shape-mismatch, unsupported-encoding, kernel-constraint, device, timeout, unknown.

Servers started from the command line are recorded in
~/.cache/import-model/servers/<port>-<pid>.json (override the folder with the
IMPORT_MODEL_SERVER_DIR environment variable) with the pid, process group and
process start time, so that a stop stops only the process it recorded and
reports a record whose process is gone (or whose pid was reused) as stale.
IMPORT_MODEL_MAX names the `max` executable to run instead of the environment's
own (tests point it at a stand-in).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import input_files
import model_source
import port_layout
from cli_support import ScriptError
from openai_server import HOST
from port_layout import PortDir

DEFAULT_TIMEOUT = 1800.0
# Longer than any compile (a cold real model on a GPU takes under an hour); a larger value is a typo.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0
STOP_GRACE_SECONDS = 20.0
# How often the readiness loop looks at the child, the port and /v1/models: a compile takes
# minutes, so a second of latency costs nothing and keeps the /proc scans cheap.
POLL_SECONDS = 1.0
# One /v1/models request; a local server answers in milliseconds once it is up.
MODELS_REQUEST_SECONDS = 2.0
# A /v1/models answer larger than this is not MAX's (it lists a handful of models).
MODELS_BODY_LIMIT = 1024 * 1024
# Non-interactive progress: print the phase at least this often.
PROGRESS_EVERY_SECONDS = 15.0
# A listening socket whose holder cannot be found (another user's process) for this many
# polls in a row is treated as foreign; one miss may be a process that is just exiting.
UNKNOWN_OWNER_POLLS = 3

SERVER_DIR_ENV = "IMPORT_MODEL_SERVER_DIR"
MAX_EXECUTABLE_ENV = "IMPORT_MODEL_MAX"
RECORD_FORMAT = 2
RECORD_NAME = re.compile(r"^(\d+)(?:-(\d+))?\.json$")  # <port>-<pid>.json, or a legacy <port>.json

# /proc/net/tcp state of a listening socket.
TCP_LISTEN = "0A"
# Local addresses whose listener receives connections to HOST.
LOOPBACK_REACHING = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("0.0.0.0"),
                     ipaddress.ip_address("::"), ipaddress.ip_address("::ffff:127.0.0.1")}

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
    ("port-in-use",
     (r"address already in use", r"\[Errno 98\]", r"network port \d+ is already in use"),
     "another process took the port before max serve could bind it; run serve again without --port "
     "(it picks a free port) or choose another --port"),
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
    pgid: int = 0
    start_time: int | None = None
    started_at: float = field(default_factory=time.time)  # wall clock, so a later --wait knows the age
    ready_timeout: float = DEFAULT_TIMEOUT
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self) -> bool:
        """Stop the whole process group; True when it was running."""
        return stop_process_group(self.pgid or self.pid, self._process)

    def record(self) -> dict:
        return {
            "format": RECORD_FORMAT, "base_url": self.base_url, "served_name": self.served_name, "port": self.port,
            "pid": self.pid, "pgid": self.pgid or self.pid, "start_time": self.start_time, "boot_id": boot_id(),
            "uid": os.getuid(), "log_path": str(self.log_path), "command": self.command, "model": self.model,
            "startup_seconds": round(self.startup_seconds, 1), "started_at": round(self.started_at, 3),
            "ready_timeout": self.ready_timeout,
        }


class ServeFailure(ScriptError):
    """The server died, timed out or lost its port while loading; carries the classified cause."""

    def __init__(self, cause: str, hint: str, error_lines: list[str], log_path: Path | None):
        self.cause = cause
        self.error_lines = error_lines
        self.log_path = log_path
        last = f": {error_lines[-1]}" if error_lines else ""
        super().__init__(f"max serve failed ({cause}: {hint}){last} [full log: {log_path}]")


# --- checks before anything starts ---------------------------------------------------


def normalize_port_dir(path: str | os.PathLike) -> PortDir:
    """Strip trailing slashes and check the folder is a port package exposing ARCHITECTURES.

    Refuses a parent folder (one that holds a port rather than being one), an
    unreadable ``__init__.py``, and a folder name that breaks the one slug rule
    (``port_layout.port_slug_problem``: ASCII identifier, not shadowed by an
    installed module).
    """
    text = str(path)
    if not text.strip():
        raise ScriptError("--port-dir is empty; name the port folder DIR/<slug>")
    text = text.rstrip("/\\") or text
    folder = Path(text).expanduser()
    problem = input_files.describe_path_problem(folder)
    if problem != "is a folder, not a file":
        raise ScriptError(f"--port-dir {path} is not a folder ({problem or 'it is a file'})")
    try:
        folder = folder.resolve()
    except (OSError, RuntimeError) as exc:
        raise ScriptError(f"--port-dir {path} cannot be resolved ({exc})") from None
    init = folder / "__init__.py"
    init_problem = input_files.describe_path_problem(init)
    if init_problem == "does not exist":
        try:
            children = sorted(p.name for p in folder.iterdir() if (p / "__init__.py").is_file())
        except OSError as exc:
            raise ScriptError(f"cannot list --port-dir {path}: {exc.strerror or exc}") from None
        hint = f"; did you mean {folder / children[0]}?" if len(children) == 1 else ""
        raise ScriptError(f"--port-dir {path} has no __init__.py defining ARCHITECTURES{hint}")
    if init_problem:
        raise ScriptError(f"--port-dir {path}: {init} {init_problem}")
    if "ARCHITECTURES" not in input_files.read_text(init, "port file"):
        raise ScriptError(f"--port-dir {path} has no __init__.py defining ARCHITECTURES")
    slug_trouble = port_layout.port_slug_problem(folder)
    if slug_trouble:
        raise ScriptError(f"--port-dir {folder}: {slug_trouble}; rename the folder")
    return PortDir(folder)


def check_model(model: str) -> None:
    """Refuse a MODEL `max serve` could not load before anything starts (missing folder, uncached Hub ID)."""
    path = Path(str(model)).expanduser()
    if path.is_file():
        raise ScriptError(f"MODEL {model} is a file; serve needs the model folder ({path.parent})")
    source = model_source.resolve(str(model))
    source.read_json("config.json")


def check_timeout(timeout: float) -> float:
    """A finite, positive number of seconds (nan, inf, 0 and negatives are refused)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ScriptError(f"--timeout {timeout} is not a positive number of seconds")
    if timeout > MAX_TIMEOUT_SECONDS:
        raise ScriptError(f"--timeout {timeout:g} is more than {MAX_TIMEOUT_SECONDS:.0f} seconds (a week)")
    return float(timeout)


def check_port_number(port: Any, flag: str = "--port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ScriptError(f"{flag} {port} is not a TCP port number (1-65535)")
    return port


def check_log_file(value: str | os.PathLike) -> Path:
    """The --log-file path, refused when it is a folder, a link loop, a dangling link or below a file."""
    text = str(value)
    if not text.strip():
        raise ScriptError("--log-file is empty; name a file")
    path = Path(text).expanduser()
    problem = input_files.describe_path_problem(path)
    if problem == "does not exist":
        input_files.check_output_dir(path.parent, "--log-file's folder")
    elif problem:
        raise ScriptError(f"--log-file {value} {problem}")
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise ScriptError(f"--log-file {value} cannot be resolved ({exc})") from None


def check_option_text(value: str, flag: str) -> str:
    if not str(value).strip() or any(ch.isspace() for ch in str(value)):
        raise ScriptError(f"{flag} {value!r} is empty or holds spaces")
    return value


def max_executable() -> str:
    """The `max` command: $IMPORT_MODEL_MAX, else the one beside this Python, else the one on PATH."""
    override = os.environ.get(MAX_EXECUTABLE_ENV)
    if override is not None:
        if not override.strip():
            raise ScriptError(f"{MAX_EXECUTABLE_ENV} is set but empty; unset it or name the max executable")
        path = Path(override).expanduser()
        problem = input_files.describe_path_problem(path)
        if problem:
            raise ScriptError(f"{MAX_EXECUTABLE_ENV} {override} {problem}")
        if not os.access(path, os.X_OK):
            raise ScriptError(f"{MAX_EXECUTABLE_ENV} {override} is not executable")
        return str(path)
    beside = Path(sys.executable).parent / "max"
    if beside.is_file():
        return str(beside)
    found = shutil.which("max")
    if found:
        return found
    raise ScriptError("the `max` command is not installed in this environment (pip install modular==26.7.0)")


# Settings added to every `max serve` (tests/bench_serve_settings.py measured each on MAX 26.7, CPU):
# --no-enable-prefix-caching: with prefix caching on (the default, 128-token pages) a second compare of a
#   prompt of 128 tokens or more on the same server is echoed logprobs only for the uncached tail and fails;
#   turning it off compiles no new graph, starts as fast (22.6 s vs 24.1 s cached) and gives the same logprobs.
SERVE_SETTINGS = ("--no-enable-prefix-caching",)


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
               "--devices", devices, "--quantization-encoding", encoding, "--enable-echo", *SERVE_SETTINGS]
    if port_dir is not None:
        normalized = normalize_port_dir(port_dir)
        command += ["--custom-architectures", str(normalized.path)]
        served_name = served_name or normalized.slug
    if served_name:
        command += ["--served-model-name", served_name]
    return command


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_problem(port: int) -> str | None:
    """Why `max serve` could not bind ``port`` now, or None when it could.

    Binds the way MAX does (SO_REUSEADDR): first on HOST (where its HTTP server
    listens), then on all interfaces (MAX's own start-up check). Nothing listens.
    """
    for address in (HOST, ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                where = address or "all interfaces"
                if exc.errno == errno.EADDRINUSE:
                    owner = listen_check(port, None)
                    holder = f" (by {owner.detail})" if owner.state == "foreign" else ""
                    return f"is already in use on {where}{holder}"
                return f"cannot be bound on {where} ({exc.strerror or exc})"
    return None


def port_in_use(port: int) -> bool:
    return port_problem(port) is not None


# --- who listens on a port (Linux /proc) -------------------------------------------------


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A /proc/net/tcp{,6} local address (32-bit words in host byte order)."""
    try:
        raw = bytes.fromhex(hex_address)
        words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
        packed = b"".join(struct.pack("=I", int.from_bytes(word, "big")) for word in words)
        return ipaddress.ip_address(packed)
    except ValueError:
        return None


def parse_listen_table(text: str, port: int) -> set[int]:
    """Inodes of the LISTEN sockets on ``port`` in one /proc/net/tcp{,6} table that reach HOST."""
    inodes = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != TCP_LISTEN or ":" not in parts[1]:
            continue
        hex_address, _, hex_port = parts[1].partition(":")
        try:
            if int(hex_port, 16) != port or not parts[9].isdigit() or int(parts[9]) == 0:
                continue
        except ValueError:
            continue
        if _decode_address(hex_address) in LOOPBACK_REACHING:
            inodes.add(int(parts[9]))
    return inodes


def listening_inodes(port: int) -> set[int] | None:
    """Inodes of every socket listening on ``port`` (reaching HOST), or None without /proc/net/tcp."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text = Path(table).read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        readable = True
        found |= parse_listen_table(text, port)
    return found if readable else None


def socket_holders(inodes: set[int]) -> dict[int, set[int]]:
    """inode -> pids whose open files include that socket (processes this user may inspect)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    holders: dict[int, set[int]] = {inode: set() for inode in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in wanted:
                    holders[wanted[target]].add(int(entry.name))
    return holders


@dataclass
class ProcessIdentity:
    """What /proc/<pid>/stat says about a process: its group, session and start time (clock ticks)."""

    pid: int
    state: str
    pgid: int
    sid: int
    start_time: int


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of a live process, or None when there is none (zombies count as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        fields = text.rsplit(")", 1)[1].split()
        identity = ProcessIdentity(pid, fields[0], int(fields[2]), int(fields[3]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None
    return None if identity.state in ("Z", "X") else identity


def boot_id() -> str | None:
    """This boot's id (start times count from boot, so a record from an earlier boot is stale)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def describe_process(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    command = " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
    return f"pid {pid} ({command[:80]})" if command else f"pid {pid}"


@dataclass
class ListenCheck:
    """Who listens on a port: none, ours, foreign, unknown (holder not found) or unchecked (no /proc)."""

    state: str
    detail: str = ""


def listen_check(port: int, pgid: int | None) -> ListenCheck:
    """Whether every socket listening on ``port`` belongs to process group ``pgid``."""
    inodes = listening_inodes(port)
    if inodes is None:
        return ListenCheck("unchecked", "no /proc/net/tcp to read")
    if not inodes:
        return ListenCheck("none")
    holders = socket_holders(inodes)
    foreign, unknown = [], []
    for inode, pids in sorted(holders.items()):
        if not pids:
            unknown.append(inode)
        for pid in sorted(pids):
            identity = process_identity(pid)
            if identity is None or pgid is None or identity.pgid != pgid:
                foreign.append(pid)
    if foreign:
        return ListenCheck("foreign", ", ".join(describe_process(pid) for pid in foreign[:3]))
    if unknown:
        return ListenCheck("unknown", "a process this user cannot inspect")
    return ListenCheck("ours")


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


def read_log(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# --- /v1/models ------------------------------------------------------------------------


@dataclass
class ModelsAnswer:
    """One GET /v1/models: whether anything answered, the model names listed, and what was wrong."""

    answered: bool
    names: list[str] | None = None
    problem: str = ""


def probe_models(base_url: str, timeout: float = MODELS_REQUEST_SECONDS) -> ModelsAnswer:
    """GET /v1/models; never raises for a bad answer (HTTP error, HTML, non-JSON, a JSON list)."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout) as response:
            body = response.read(MODELS_BODY_LIMIT + 1)
    except urllib.error.HTTPError as exc:
        return ModelsAnswer(True, None, f"/v1/models answered HTTP {exc.code}")
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return ModelsAnswer(False, None, "nothing answered /v1/models")
    if len(body) > MODELS_BODY_LIMIT:
        return ModelsAnswer(True, None, "/v1/models answered more than 1 MiB")
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        kind = "an HTML page" if body.lstrip()[:1] == b"<" else "text that is not JSON"
        return ModelsAnswer(True, None, f"/v1/models answered {kind}")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        what = input_files.json_type_name(document) if not isinstance(document, dict) else "an object without a data list"
        return ModelsAnswer(True, None, f"/v1/models answered {what}")
    names = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return ModelsAnswer(True, names, "" if names else "/v1/models lists no model")


# --- process lifetime --------------------------------------------------------


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
    """Start `max serve` in its own process group and wait until it is ready and its own.

    Everything that can be checked before the compile is (MODEL, port folder,
    log file, timeout, a bind test on the port). Raises ServeFailure (exit 3)
    when the server dies, another process holds the port, or it is not ready
    in ``timeout`` seconds; the process group is stopped in each case.
    """
    timeout = check_timeout(timeout)
    server = launch_server(model_path, port_dir=port_dir, devices=devices, encoding=encoding, port=port,
                           log_path=log_path, progress=progress, served_name=served_name)
    try:
        wait_until_ready(server, server._process, timeout, progress)
    except BaseException:
        server.stop()
        raise
    return server


def launch_server(
    model_path: str,
    *,
    port_dir: str | os.PathLike | None = None,
    devices: str = "cpu",
    encoding: str = "float32",
    port: int | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    served_name: str | None = None,
) -> RunningServer:
    """Check the inputs and the port, then start `max serve` in its own process group; no waiting."""
    check_model(model_path)
    log_file = check_log_file(log_path) if log_path is not None else None
    if port is None:
        port = free_port()
    check_port_number(port)
    command = build_serve_command(model_path, port=port, port_dir=port_dir, devices=devices, encoding=encoding,
                                  served_name=served_name)
    problem = port_problem(port)
    if problem:
        raise ScriptError(f"port {port} {problem}; pick another --port, or leave --port out to get a free one")
    served = command[command.index("--served-model-name") + 1] if "--served-model-name" in command else str(model_path)
    if log_file is None:
        handle, name = tempfile.mkstemp(prefix=f"max-serve-{port}-", suffix=".log")
        os.close(handle)
        log_file = Path(name)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MAX_SERVE_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    identity = process_identity(process.pid)
    server = RunningServer(f"http://{HOST}:{port}", served, port, process.pid, log_file, command, str(model_path),
                           pgid=process.pid, start_time=identity.start_time if identity else None, _process=process)
    if progress:
        print(f"serve: started max serve (pid {process.pid}) on port {port}; log: {log_file}", file=sys.stderr)
    return server


def _port_taken(server: RunningServer, holder: str) -> ServeFailure:
    hint = (f"port {server.port} is held by {holder}, not by this serve's max serve (pid {server.pid}); "
            "run serve again without --port (it picks a free port) or choose another --port")
    return ServeFailure("port-taken", hint, [], server.log_path)


def wait_until_ready(server: RunningServer, process: Any, timeout: float, progress: bool,
                      already: float = 0.0) -> None:
    """Poll until ready; ``timeout`` counts from the server's start, ``already`` seconds ago."""
    started = time.monotonic() - already
    shown_phase, shown_at = "", 0.0
    interactive = progress and sys.stderr.isatty()
    unknown_polls = 0
    last_answer = "nothing answered /v1/models"
    while True:
        elapsed = time.monotonic() - started
        if process.poll() is not None:
            _clear_line(interactive)
            cause, lines = classify_failure(read_log(server.log_path))
            raise ServeFailure(cause, cause_hint(cause), lines, server.log_path)
        owner = listen_check(server.port, server.pgid)
        if owner.state == "foreign" or (owner.state == "unknown" and unknown_polls + 1 >= UNKNOWN_OWNER_POLLS):
            _clear_line(interactive)
            raise _port_taken(server, owner.detail)
        unknown_polls = unknown_polls + 1 if owner.state == "unknown" else 0
        if owner.state in ("ours", "unchecked"):
            answer = probe_models(server.base_url)
            if answer.names is not None and server.served_name not in answer.names:
                last_answer = f"/v1/models lists {answer.names}, not {server.served_name!r}"
            elif answer.names is None:
                last_answer = answer.problem
            else:
                # The answer came from whoever listens now: look again, and at the child.
                again = listen_check(server.port, server.pgid)
                if again.state == "foreign":
                    _clear_line(interactive)
                    raise _port_taken(server, again.detail)
                if again.state in ("ours", "unchecked") and process.poll() is None:
                    server.startup_seconds = elapsed
                    _clear_line(interactive)
                    if again.state == "unchecked":
                        print(f"serve: warning: {again.detail}; cannot confirm that port {server.port} is "
                              "held by this serve's max serve", file=sys.stderr)
                    if progress:
                        print(f"serve: ready after {elapsed:.0f}s at {server.base_url} (pid {server.pid})",
                              file=sys.stderr)
                    return
        if elapsed > timeout:
            _clear_line(interactive)
            _cause, lines = classify_failure(read_log(server.log_path))
            hint = f"{cause_hint('timeout')} ({timeout:.0f}s; last: {last_answer})"
            raise ServeFailure("timeout", hint, lines, server.log_path)
        if progress:
            phase = current_phase(read_log(server.log_path))
            if interactive:
                print(f"\rserve: {elapsed:5.0f}s  {phase:<24}", end="", file=sys.stderr, flush=True)
            elif phase != shown_phase or elapsed - shown_at >= PROGRESS_EVERY_SECONDS:
                print(f"serve: {elapsed:.0f}s {phase}", file=sys.stderr, flush=True)
                shown_phase, shown_at = phase, elapsed
        time.sleep(POLL_SECONDS)


def _clear_line(interactive: bool) -> None:
    if interactive:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)


def stop_process_group(pid: int, process: subprocess.Popen | None = None) -> bool:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left; True when it was running.

    PermissionError propagates (the group belongs to another user).
    """
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
    return Path(os.environ.get(SERVER_DIR_ENV) or Path.home() / ".cache" / "import-model" / "servers")


def check_server_dir() -> Path:
    """The record folder, refused (before any compile) when it cannot hold records."""
    return input_files.check_output_dir(server_dir(), f"server record folder ({SERVER_DIR_ENV})")


def write_record(server: RunningServer) -> Path:
    """Write ``<port>-<pid>.json``; never replaces an existing file (the record appears whole or not at all)."""
    folder = check_server_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{server.port}-{server.pid}.json"
    handle, staging = tempfile.mkstemp(prefix=f".{server.port}-{server.pid}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(server.record(), indent=2) + "\n")
        try:
            os.link(staging, path)
        except FileExistsError:
            # Only a stale record (its process gone, the pid now ours) may be replaced.
            state, _reason = record_state(parse_record(path))
            if state != "stale":
                raise ScriptError(f"server record {path} already exists for a live process; not replacing it") \
                    from None
            path.unlink()
            os.link(staging, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)
    return path


def record_paths(port: int | None) -> list[Path]:
    """Record files for ``port`` (all ports when None), sorted."""
    folder = server_dir()
    problem = input_files.describe_path_problem(folder)
    if problem == "does not exist":
        return []
    if problem != "is a folder, not a file":
        raise ScriptError(f"server record folder {folder} ({SERVER_DIR_ENV}) "
                          f"{problem or 'is a file, not a folder'}")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise ScriptError(f"cannot list server record folder {folder}: {exc.strerror or exc}") from None
    found = []
    for name in names:
        match = RECORD_NAME.match(name)
        if match and (port is None or int(match.group(1)) == port):
            found.append(folder / name)
    return found


_RECORD_INTEGERS = {"port": "a TCP port number", "pid": "a positive integer", "pgid": "a positive integer",
                    "start_time": "a non-negative integer"}


def parse_record(path: Path) -> dict:
    """A server record, checked; ScriptError naming the file when it is malformed (it is left in place)."""
    record = input_files.load_json(path, "server record")
    keep = "; check it and remove it by hand"
    for key, expected in _RECORD_INTEGERS.items():
        if key not in record:
            older = " (written by an older serve, without process identity)" if key in ("pgid", "start_time") else ""
            raise ScriptError(f"server record {path} has no {key!r}{older}{keep}")
        value = record[key]
        low = 0 if key == "start_time" else 1
        high = 65535 if key == "port" else None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise ScriptError(f"server record {path}: {key!r} is {input_files.json_type_name(value)} "
                              f"({str(value)[:40]}), expected {expected}{keep}")
    if record.get("boot_id") is not None and not isinstance(record["boot_id"], str):
        raise ScriptError(f"server record {path}: 'boot_id' is {input_files.json_type_name(record['boot_id'])}, "
                          f"expected a string{keep}")
    match = RECORD_NAME.match(path.name)
    if match and (int(match.group(1)) != record["port"] or (match.group(2) and int(match.group(2)) != record["pid"])):
        raise ScriptError(f"server record {path} names port {record['port']} and pid {record['pid']}, "
                          f"which its file name contradicts{keep}")
    return record


def record_state(record: dict) -> tuple[str, str]:
    """("live" | "orphaned" | "stale", reason) for a parsed record; nothing is signalled."""
    pid, pgid = record["pid"], record["pgid"]
    same_boot = record.get("boot_id") is None or boot_id() is None or record["boot_id"] == boot_id()
    if not same_boot:
        return "stale", "it was written before the last reboot"
    identity = process_identity(pid)
    if identity is None:
        # A pid is not reused while its process group lives on, so a live group is still the recorded one.
        if pgid == pid and _group_alive(pgid):
            return "orphaned", f"pid {pid} is gone but workers of its process group {pgid} still run"
        return "stale", f"process {pid} is gone"
    if identity.start_time != record["start_time"]:
        return "stale", f"pid {pid} now belongs to another process (started at tick {identity.start_time}, " \
                        f"not {record['start_time']})"
    if identity.pgid != pgid:
        return "moved", f"pid {pid} left process group {pgid} (now in {identity.pgid}); not stopping it"
    return "live", ""


def stop_recorded(port: int | None) -> dict[str, list[dict]]:
    """Stop the servers recorded by this script (one port, or all).

    Every record is parsed first (a malformed one is an error naming the file
    and nothing is stopped). A record is removed only when its server was
    stopped or it is stale; a live process that does not match its record, or
    that this user may not signal, is left running with its record.
    """
    records = [(path, parse_record(path)) for path in record_paths(port)]
    result: dict[str, list[dict]] = {"stopped": [], "stale": [], "not_stopped": []}
    for path, record in records:
        entry = {"port": record["port"], "pid": record["pid"]}
        state, reason = record_state(record)
        if state == "stale":
            result["stale"].append({**entry, "record": str(path), "reason": reason})
            path.unlink(missing_ok=True)
            continue
        if state == "moved":
            result["not_stopped"].append({**entry, "record": str(path), "reason": reason})
            continue
        try:
            was_running = stop_process_group(record["pgid"])
        except PermissionError:
            result["not_stopped"].append({**entry, "record": str(path),
                                          "reason": f"process group {record['pgid']} belongs to another user"})
            continue
        result["stopped"].append({**entry, "was_running": bool(was_running)})
        path.unlink(missing_ok=True)
    return result
