"""Start `max serve` for a model (optionally with a port), wait until it answers, or stop it.

Starts the server in the background on 127.0.0.1 with echo enabled, shows
compile progress (elapsed time and the phase read from the log) on stderr,
keeps the full log in a file, and prints the base URL, the served model name
and the server's pid once it is ready. With --port-dir the port package is
passed as --custom-architectures and its folder name (the slug) is the served
name. `--stop` stops servers this script started (whole process group, no
orphaned workers). A server that dies while loading gives exit 3 with the
cause classified and the log's error lines.

With --detach, serve returns once `max serve` runs (its record written, the
process alive) and prints the command that waits for it; `serve --wait --port
P --timeout S` then waits at most S seconds with progress: exit 0 when ready,
exit 3 with the classified cause when it failed (the record is removed), and
exit 3 saying "still starting" when it is alive and loading at the end of the
wait (it keeps running; call --wait again).

Safe on a shared machine: MODEL, the port folder, --log-file, --timeout and the
port (a bind test) are checked before `max serve` starts. "Ready" means the
own child is alive, the socket listening on the port belongs to the child's
process group (read from /proc) and /v1/models lists the served name; another
process on the port is exit 3, never "ready".

The server's lifetime (command, start, readiness, stop, records) is the library
module max_server; this script is its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import cli_support
from cli_support import ScriptError
from max_server import (DEFAULT_TIMEOUT, HOST, MAX_EXECUTABLE_ENV, POLL_SECONDS, RunningServer, ServeFailure,
                        cause_hint, check_log_file, check_model, check_option_text, check_port_number,
                        check_server_dir, check_timeout, classify_failure, current_phase, launch_server,
                        normalize_port_dir, parse_record, read_log, record_paths, record_state, server_dir,
                        start_server, stop_recorded, wait_until_ready, write_record)

EXIT_CODES = {1: "not used", 2: "not used"}

# One --wait call's default wait: below the few-minute cap of an agent's tool call, long enough
# that a warm-cache serve (tens of seconds) is ready within one call.
DEFAULT_WAIT_STEP = 240.0

# --detach looks at the new process this long before saying it runs: a `max` that cannot start
# (bad executable, immediate crash) is exit 3 now rather than at the first --wait.
DETACH_SETTLE_SECONDS = 1.0


# --- command line ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="Hub ID or local model directory to serve (not with --stop)")
    parser.add_argument("--port-dir", default=None,
                        help="port package folder (holds __init__.py with ARCHITECTURES); its name is the served name")
    parser.add_argument("--devices", default="cpu", help="cpu, gpu, gpu:0,1 ... (default: cpu)")
    parser.add_argument("--encoding", default="float32",
                        help="MAX --quantization-encoding: float32, bfloat16, float16 ... (default: float32)")
    parser.add_argument("--port", type=int, default=None,
                        help="HTTP port (default: a free port); it must be free before the compile starts")
    parser.add_argument("--log-file", default=None, help="where to keep the full server log (default: a temp file)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds to wait for the server to be ready (default: {DEFAULT_TIMEOUT:.0f}); with "
                             f"--wait, seconds this call waits (default: {DEFAULT_WAIT_STEP:.0f})")
    parser.add_argument("--foreground", action="store_true",
                        help="stay attached and stop the server on Ctrl-C (default: leave it running in the background)")
    parser.add_argument("--detach", action="store_true",
                        help="return as soon as max serve is running (record written), printing how to --wait for it")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the server recorded on --port (started with --detach) to be ready, at most "
                             "--timeout seconds; exit 3 says whether it failed or is still starting")
    parser.add_argument("--stop", action="store_true",
                        help="stop the server this script started on --port (every recorded one with --all)")
    parser.add_argument("--all", action="store_true", help="with --stop: stop every recorded server")
    cli_support.add_json_flag(parser)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """Turn a termination signal into SystemExit, so cleanup code runs."""
    raise SystemExit(128 + signum)


def _main_stop(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("MODEL", args.model), ("--port-dir", args.port_dir),
                                      ("--log-file", args.log_file), ("--foreground", args.foreground)) if value]
    if given:
        raise ScriptError(f"--stop takes only --port or --all, not {given[0]}")
    if args.port is None and not args.all:
        raise ScriptError(f"--stop needs --port PORT (the port serve printed) or --all (every server recorded "
                          f"in {server_dir()})")
    if args.port is not None and args.all:
        raise ScriptError("--stop takes --port or --all, not both")
    if args.port is not None:
        check_port_number(args.port)
    result = stop_recorded(args.port)
    if not args.json:
        if not any(result.values()):
            print("no recorded server to stop" + (f" on port {args.port}" if args.port else ""))
        for item in result["stopped"]:
            state = "stopped" if item["was_running"] else "was not running"
            print(f"port {item['port']} (pid {item['pid']}): {state}")
        for item in result["stale"]:
            print(f"port {item['port']} (pid {item['pid']}): stale record ({item['reason']}); removed {item['record']}")
        for item in result["not_stopped"]:
            print(f"port {item['port']} (pid {item['pid']}): not stopped ({item['reason']}); kept {item['record']}")
    if result["not_stopped"]:
        first = result["not_stopped"][0]
        message = (f"{len(result['not_stopped'])} recorded server(s) not stopped; port {first['port']} "
                   f"(pid {first['pid']}): {first['reason']}")
        if args.json:
            cli_support.print_json({**result, "error": message, "exit_code": int(cli_support.EXIT_CANNOT_RUN)})
        prog = getattr(args, "_prog", None) or os.path.basename(sys.argv[0])
        print(f"{prog}: error: {message}", file=sys.stderr)
        return cli_support.EXIT_CANNOT_RUN
    if args.json:
        cli_support.print_json(result)
    return cli_support.EXIT_OK


def main(args: argparse.Namespace) -> int:
    if args.stop:
        if args.wait or args.detach:
            raise ScriptError(f"--stop does not go with {'--wait' if args.wait else '--detach'}")
        return _main_stop(args)
    if args.all:
        raise ScriptError("--all goes with --stop")
    if args.wait:
        return _main_wait(args)
    if args.model is None:
        raise ScriptError("MODEL is required unless --stop or --wait is given")
    if args.detach and args.foreground:
        raise ScriptError("--detach and --foreground contradict each other; choose one")
    if args.port is not None:
        check_port_number(args.port)
    args.timeout = check_timeout(DEFAULT_TIMEOUT if args.timeout is None else args.timeout)
    check_option_text(args.devices, "--devices")
    check_option_text(args.encoding, "--encoding")
    if args.log_file is not None:
        check_log_file(args.log_file)
    port_dir = normalize_port_dir(args.port_dir).path if args.port_dir is not None else None
    check_model(args.model)
    if not args.foreground:
        check_server_dir()
    if MAX_EXECUTABLE_ENV not in os.environ:
        cli_support.warn_if_untested_max()
    # A SIGTERM/SIGHUP while MAX compiles must still stop the server's process group.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    if args.detach:
        return _main_detach(args, port_dir)
    server = start_server(args.model, port_dir=port_dir, devices=args.devices, encoding=args.encoding,
                          port=args.port, log_path=args.log_file, timeout=args.timeout, progress=True)
    record = server.record()
    if not args.foreground:
        try:
            record["record_path"] = str(write_record(server))
        except BaseException:
            server.stop()  # a server --stop cannot find would be orphaned
            raise
        record["stop_command"] = f"python scripts/import_model.py serve --stop --port {server.port}"
    if args.json:
        cli_support.print_json(record)
    else:
        print(f"base_url: {server.base_url}")
        print(f"served_name: {server.served_name}")
        print(f"pid: {server.pid}")
        print(f"log: {server.log_path}")
        if not args.foreground:
            print(f"stop with: {record['stop_command']}")
    if args.foreground:
        sys.stdout.flush()
        try:
            while server._process is not None and server._process.poll() is None:
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return cli_support.EXIT_OK


# --- --detach and --wait -------------------------------------------------------------


def wait_command(port: int, timeout: float | None = None) -> str:
    """The command that waits for the server detached on ``port``: this interpreter and the dispatcher by absolute
    path, so it runs from any folder (a bare ``python`` may be another environment's)."""
    dispatcher = Path(__file__).resolve().parent / "import_model.py"
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(dispatcher))} serve --wait --port {port}" + (
        f" --timeout {timeout:g}" if timeout is not None else "")


def _main_detach(args: argparse.Namespace, port_dir: Path | None) -> int:
    """Start max serve, write its record, check it is alive, print how to wait; do not wait."""
    server = launch_server(args.model, port_dir=port_dir, devices=args.devices, encoding=args.encoding,
                           port=args.port, log_path=args.log_file, progress=True)
    server.ready_timeout = args.timeout
    record_path = None
    try:
        record_path = write_record(server)
        time.sleep(DETACH_SETTLE_SECONDS)
        if server._process.poll() is not None:
            cause, lines = classify_failure(read_log(server.log_path))
            raise ServeFailure(cause, cause_hint(cause), lines, server.log_path)
    except BaseException:
        server.stop()  # a server --stop cannot find would be orphaned
        if record_path is not None:
            record_path.unlink(missing_ok=True)
        raise
    record = {**server.record(), "state": "starting", "record_path": str(record_path),
              "wait_command": wait_command(server.port),
              "stop_command": f"python scripts/import_model.py serve --stop --port {server.port}"}
    if args.json:
        cli_support.print_json(record)
    else:
        print(f"started: max serve (pid {server.pid}) on port {server.port}, loading in the background")
        print(f"base_url: {server.base_url}")
        print(f"served_name: {server.served_name}")
        print(f"pid: {server.pid}")
        print(f"log: {server.log_path}")
        print(f"wait with: {record['wait_command']} [--timeout SECONDS]")
        print(f"stop with: {record['stop_command']}")
    return cli_support.EXIT_OK


class _RecordedProcess:
    """``poll()`` for a recorded server this process did not start: None while the recorded process lives."""

    def __init__(self, record: dict):
        self.record = record

    def poll(self) -> int | None:
        return None if record_state(self.record)[0] == "live" else -1


def _server_from_record(record: dict) -> RunningServer:
    port = record["port"]
    started_at = record.get("started_at")
    return RunningServer(str(record.get("base_url") or f"http://{HOST}:{port}"),
                         str(record.get("served_name") or record.get("model") or ""), port, record["pid"],
                         Path(str(record.get("log_path") or os.devnull)), list(record.get("command") or []),
                         str(record.get("model") or ""), pgid=record["pgid"], start_time=record["start_time"],
                         started_at=started_at if isinstance(started_at, (int, float)) else time.time(),
                         ready_timeout=float(record.get("ready_timeout") or DEFAULT_TIMEOUT))


def _pick_record(port: int) -> tuple[Path, dict]:
    """The record --wait follows on ``port``: the only one, else the only live one."""
    records = [(path, parse_record(path)) for path in record_paths(port)]
    if not records:
        raise ScriptError(f"no server is recorded on port {port} in {server_dir()}; start one with "
                          f"`serve MODEL --detach` (it prints the port to wait on)")
    if len(records) == 1:
        return records[0]
    live = [(path, record) for path, record in records if record_state(record)[0] == "live"]
    if len(live) == 1:
        return live[0]
    pids = ", ".join(str(record["pid"]) for _path, record in (live or records))
    raise ScriptError(f"several servers are recorded on port {port} (pids {pids}); stop them with "
                      f"`serve --stop --port {port}` and start one again")


def _main_wait(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("MODEL", args.model), ("--port-dir", args.port_dir),
                                      ("--log-file", args.log_file), ("--foreground", args.foreground),
                                      ("--detach", args.detach)) if value]
    if given:
        raise ScriptError(f"--wait takes only --port and --timeout, not {given[0]}")
    if args.port is None:
        raise ScriptError("--wait needs --port PORT (the port `serve --detach` printed)")
    check_port_number(args.port)
    step = check_timeout(DEFAULT_WAIT_STEP if args.timeout is None else args.timeout)
    path, record = _pick_record(args.port)
    server = _server_from_record(record)
    already = max(0.0, time.time() - server.started_at)
    budget = min(already + step, server.ready_timeout)
    state, reason = record_state(record)
    try:
        if state != "live":
            cause, lines = classify_failure(read_log(server.log_path))
            raise ServeFailure(cause, f"{cause_hint(cause)}; the server is gone ({reason})", lines, server.log_path)
        wait_until_ready(server, _RecordedProcess(record), budget, progress=True, already=already)
    except ServeFailure as failure:
        ended = failure.cause != "timeout" or budget >= server.ready_timeout
        if not ended:
            return _still_starting(args, server)
        # Failed (or past the timeout given at --detach): stop what is left and drop the record.
        if record_state(record)[0] in ("live", "orphaned"):
            with contextlib.suppress(PermissionError):
                server.stop()
        path.unlink(missing_ok=True)
        raise
    document = {**record, "state": "ready", "startup_seconds": round(server.startup_seconds, 1),
                "record_path": str(path),
                "stop_command": f"python scripts/import_model.py serve --stop --port {server.port}"}
    if args.json:
        cli_support.print_json(document)
    else:
        print(f"base_url: {server.base_url}")
        print(f"served_name: {server.served_name}")
        print(f"pid: {server.pid}")
        print(f"log: {server.log_path}")
        print(f"stop with: {document['stop_command']}")
    return cli_support.EXIT_OK


def _still_starting(args: argparse.Namespace, server: RunningServer) -> int:
    """Exit 3 with a message that says the server is alive and still loading, and how to wait again."""
    elapsed = time.time() - server.started_at
    phase = current_phase(read_log(server.log_path))
    again = wait_command(server.port, args.timeout)
    message = (f"still starting: max serve (pid {server.pid}) on port {server.port} is alive and {phase} "
               f"after {elapsed:.0f}s (not failed); wait again with: {again}")
    if args.json:
        cli_support.print_json({"state": "starting", "phase": phase, "elapsed_seconds": round(elapsed, 1),
                                "port": server.port, "pid": server.pid, "log_path": str(server.log_path),
                                "wait_command": again, "error": message,
                                "exit_code": int(cli_support.EXIT_CANNOT_RUN)})
    prog = getattr(args, "_prog", None) or os.path.basename(sys.argv[0])
    print(f"{prog}: error: {message}", file=sys.stderr)
    return cli_support.EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
