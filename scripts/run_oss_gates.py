"""Run the gates a port must pass before and after its first serve: preflight, smoke and verify.

preflight (metadata only, seconds): walls (check-walls), checkpoint format and
dominant dtype against arch.py's encodings, arch.py's name against the
config's architectures[0] (read with ast), and float32 support for CPU
bring-up. smoke (before the first cold compile; one probe process imports MAX
once and forks a child per check, each importing the port fresh): import the
port as --custom-architectures does, build its config and
graph from the real config without compiling, diff the weight adapter's names
and shapes (header-only weights) against the graph's declared weights, and
check the weights format. verify: compare logits of a running server
(--base-url) with Hugging Face. Phases run in that order and stop at the first
failing phase.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cli_support
import model_source
import openai_server
import port_layout
from cli_support import ScriptError

EXIT_CODES = {1: "a gate failed (see the failing checks)", 2: "a wall blocks the port (check-walls stop finding)"}

PHASES = ("preflight", "smoke", "verify")
SMOKE_CHECKS = ("import", "dry-build", "key-diff", "weights-format")
SCRIPTS_DIR = Path(__file__).resolve().parent


class CheckStatus(str, enum.Enum):
    """How one gate check ended (the JSON shows the value)."""

    PASS = "pass"
    FAIL = "fail"
    BLOCKED = "blocked"  # a wall: the port cannot run as asked (exit 2)
    SKIPPED = "skipped"  # not run here; the summary says why and which later step checks it


# Statuses that stop the phase sequence.
BAD_STATUSES = (CheckStatus.FAIL, CheckStatus.BLOCKED)


@dataclass
class Check:
    """One gate check: pass, fail, blocked (a wall) or skipped, with a one-line summary."""

    phase: str
    name: str
    status: "CheckStatus"
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser)
    parser.add_argument("--port-dir", required=True, metavar="PORT_DIR",
                        help="the port package folder DIR/<slug> (the one passed to --custom-architectures)")
    parser.add_argument("--phase", choices=(*PHASES, "all"), default="all",
                        help="run one phase (default: all, in order, stopping at the first failing phase)")
    parser.add_argument("--encoding", default="float32",
                        help="encoding the smoke checks build for and verify compares at (default float32)")
    parser.add_argument("--base-url", default=None,
                        help="running server for verify, e.g. http://127.0.0.1:8000 (without it verify is skipped)")
    parser.add_argument("--served-name", default=None, help="model name the server serves (default: the slug)")
    parser.add_argument("--timeout", type=cli_support.positive_seconds, default=900.0,
                        help="seconds allowed for each smoke check (default 900)")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    port = port_layout.resolve_port_dir(args.port_dir, "--port-dir")
    port_layout.check_port_files(port)
    source = model_source.resolve(args.model, args.revision)
    config = model_source.read_config(source)
    phases = PHASES if args.phase == "all" else (args.phase,)
    if "smoke" in phases:
        cli_support.warn_if_untested_max()  # the smoke checks build the graph through MAX internals
    checks: list[Check] = []
    for phase in phases:
        if any(c.phase == phase for c in checks):
            continue  # smoke already ran, overlapping preflight's reference check
        if phase == "preflight" and "smoke" in phases and forking():
            checks += preflight_overlapping_smoke(args, source, config, port)
        elif phase == "preflight":
            checks += preflight(source, config, port)
        elif phase == "smoke":
            checks += smoke(args, port)
        else:
            checks.append(verify(args, port))
        if any(c.status in BAD_STATUSES for c in checks):
            break
    code = 2 if any(c.status is CheckStatus.BLOCKED for c in checks) else 1 if any(c.status is CheckStatus.FAIL for c in checks) else 0
    report(args, port, checks, code)
    return code


# Encoding names are lower-case tokens such as float32, bfloat16 or q4_k.
ENCODING_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flag values no phase could use, before any file is read."""
    if not ENCODING_NAME.fullmatch(args.encoding):
        raise ScriptError(f"--encoding {args.encoding!r} is not an encoding name (e.g. float32, bfloat16)")
    if args.served_name is not None and not args.served_name.strip():
        raise ScriptError("--served-name is empty; give the served model name or leave the flag out")
    if args.base_url is not None:
        args.base_url = openai_server.check_base_url(args.base_url)


# --- preflight -----------------------------------------------------------------------


def preflight(source: model_source.ModelSource, config: dict, port: port_layout.PortDir) -> list[Check]:
    return quick_preflight(source, config, port) + [reference_check(source, config)]


def quick_preflight(source: model_source.ModelSource, config: dict, port: port_layout.PortDir) -> list[Check]:
    """The preflight checks that read files only (everything but the HF reference check)."""
    arch = port_layout.read_arch_declaration(port.path / "arch.py")
    return [walls_check(source), format_check(source), dtype_check(source, config, arch),
            name_check(config, arch), encoding_check(arch)]


def preflight_overlapping_smoke(args: argparse.Namespace, source: model_source.ModelSource, config: dict,
                                port: port_layout.PortDir) -> list[Check]:
    """Preflight, with the smoke probe importing MAX while the HF reference check runs.

    The file checks run first and nothing starts when one fails. The probe is
    started only then; if the reference check fails, the probe is killed and
    its results are never read, so a failed preflight still hides smoke.
    """
    checks = quick_preflight(source, config, port)
    if any(c.status in BAD_STATUSES for c in checks):
        return checks
    probe = start_probe(args, port)
    try:
        checks.append(reference_check(source, config))
        if checks[-1].status in BAD_STATUSES:
            return checks
        return checks + finish_probe(probe, args)
    finally:
        stop_probe(probe)


# Loading at most this much float32 weight on the CPU takes seconds; a larger checkpoint's reference is
# checked by compare, which loads it anyway.
PREFLIGHT_REFERENCE_MAX_BYTES = 1 << 30
# Fixed token ids for the flatness probe (no tokenizer needed): ids spread over the vocabulary.
REFERENCE_PROBE_TOKENS = 16
REFERENCE_PROBE_STRIDE = 7


def reference_check(source: model_source.ModelSource, config: dict) -> Check:
    """The HF reference (float32, eager) is not flat, before any compile; skipped for large or remote models."""
    import hf_reference
    import tolerances

    files = model_source.weight_files(source)
    if source.local_dir is None or files.format != "safetensors" or "auto_map" in config:
        why = ("a Hub model" if source.local_dir is None else "remote code" if "auto_map" in config
               else f"{files.format} weights")
        return Check("preflight", "reference", CheckStatus.SKIPPED, f"not loaded in preflight ({why}); compare checks the "
                                                          "reference's spread after loading it")
    size = sum((source.local_dir / name).stat().st_size for name in files.files)
    if size > PREFLIGHT_REFERENCE_MAX_BYTES:
        return Check("preflight", "reference", CheckStatus.SKIPPED, f"weights are {size / 2**30:.1f} GiB; compare checks the "
                                                          "reference's spread after loading it")
    vocab = int(model_source.text_config(config).get("vocab_size") or 0)
    if vocab < 2:
        return Check("preflight", "reference", CheckStatus.SKIPPED, "config has no vocab_size to probe with")
    ids = [(1 + REFERENCE_PROBE_STRIDE * i) % vocab for i in range(REFERENCE_PROBE_TOKENS)]
    try:
        model = hf_reference.load(str(source.local_dir), dtype="float32")
        rows = hf_reference.logprob_rows(model, ids)
    except Exception as exc:  # noqa: BLE001 - a reference that cannot load or run is a failed gate, in one line
        reason = str(exc) if isinstance(exc, ScriptError) else f"the HF reference did not run: {type(exc).__name__}"
        return Check("preflight", "reference", CheckStatus.FAIL, reason)
    spread = hf_reference.reference_spread(rows)
    details = {"reference_spread": spread, "threshold": tolerances.FLAT_REFERENCE_SPREAD,
               "attn_implementation": hf_reference.DEFAULT_ATTN_IMPLEMENTATION, "token_ids": ids}
    if hf_reference.is_flat(spread):
        return Check("preflight", "reference", CheckStatus.FAIL, hf_reference.flat_reason(spread, len(ids)), details)
    return Check("preflight", "reference", CheckStatus.PASS, f"HF reference (float32, eager) spread {spread:.3g} nats, "
                                                   "not flat", details)


def walls_check(source: model_source.ModelSource) -> Check:
    """check-walls' catalogue, called in-process (it is metadata only)."""
    import wall_scan

    findings = wall_scan.scan_walls(source)
    stops = [f for f in findings if f.level == wall_scan.STOP]
    warns = [f for f in findings if f.level == wall_scan.WARN]
    details = {"findings": [asdict(f) for f in findings]}
    if stops:
        return Check("preflight", "walls", CheckStatus.BLOCKED, f"{len(stops)} wall(s) block the port: {stops[0].message}",
                     details)
    return Check("preflight", "walls", CheckStatus.PASS, f"no blocking wall ({len(warns)} warning(s) to review)", details)


def format_check(source: model_source.ModelSource) -> Check:
    files = model_source.weight_files(source)
    details = {"format": files.format, "files": list(files.files), "sharded": files.sharded}
    if files.format == "safetensors":
        return Check("preflight", "checkpoint-format", CheckStatus.PASS,
                     f"safetensors, {len(files.files)} file(s)", details)
    if files.format == "gguf":
        return Check("preflight", "checkpoint-format", CheckStatus.PASS, "gguf", details)
    hint = " (re-save with transformers save_pretrained to get safetensors)" if files.format == "bin" else ""
    return Check("preflight", "checkpoint-format", CheckStatus.FAIL, f"weights format {files.format!r} cannot be loaded{hint}",
                 details)


def dtype_check(source: model_source.ModelSource, config: dict, arch: port_layout.ArchDeclaration) -> Check:
    wanted, origin = port_layout.checkpoint_encoding(source, config)
    details = {"checkpoint_encoding": wanted, "from": origin, "default_encoding": arch.default_encoding,
               "supported_encodings": arch.supported_encodings}
    if wanted is None:
        return Check("preflight", "dtype", CheckStatus.FAIL, f"{origin} has no float encoding MAX can serve", details)
    if arch.supported_encodings is not None and wanted not in arch.supported_encodings:
        return Check("preflight", "dtype", CheckStatus.FAIL,
                     f"{origin} needs encoding {wanted}, which arch.py does not list in supported_encodings", details)
    if arch.default_encoding is None:
        return Check("preflight", "dtype", CheckStatus.FAIL,
                     f"arch.py default_encoding is not a string literal; write {wanted!r} out so the gates can read it",
                     details)
    if arch.default_encoding != wanted:
        return Check("preflight", "dtype", CheckStatus.FAIL,
                     f"{origin} -> {wanted}, but arch.py default_encoding is {arch.default_encoding!r}", details)
    return Check("preflight", "dtype", CheckStatus.PASS, f"{origin} matches default_encoding {wanted}", details)


def name_check(config: dict, arch: port_layout.ArchDeclaration) -> Check:
    expected = config["architectures"][0]
    details = {"arch_py_name": arch.name, "config_architecture": expected}
    if arch.name is None:
        return Check("preflight", "arch-name", CheckStatus.FAIL,
                     f"arch.py SupportedArchitecture(name=...) is not a string literal; write {expected!r} out so "
                     "the gates can read it", details)
    if arch.name != expected:
        return Check("preflight", "arch-name", CheckStatus.FAIL,
                     f"arch.py name {arch.name!r} != config.json architectures[0] {expected!r}; MAX would not "
                     "pick the port for this checkpoint", details)
    return Check("preflight", "arch-name", CheckStatus.PASS, f"arch.py name is {expected}", details)


def encoding_check(arch: port_layout.ArchDeclaration) -> Check:
    supported = arch.supported_encodings
    details = {"default_encoding": arch.default_encoding, "supported_encodings": supported}
    if supported is None:
        return Check("preflight", "encoding", CheckStatus.FAIL,
                     "arch.py supported_encodings is not a literal set; write it out so the gates can read it", details)
    if "float32" not in supported:
        return Check("preflight", "encoding", CheckStatus.FAIL, "float32 is not a supported encoding (needed for CPU bring-up)",
                     details)
    if arch.default_encoding not in supported:
        return Check("preflight", "encoding", CheckStatus.FAIL,
                     f"default_encoding {arch.default_encoding!r} is not in supported_encodings", details)
    return Check("preflight", "encoding", CheckStatus.PASS, f"float32 supported; default {arch.default_encoding}", details)


# --- smoke ---------------------------------------------------------------------------


# IMPORT_MODEL_SMOKE=subprocess runs each check in its own fresh process (the slower way, for a
# platform without os.fork or to rule the fork out when a check behaves oddly).
SMOKE_MODE_ENV = "IMPORT_MODEL_SMOKE"
# Importing MAX in the probe takes about 9 s on idle cores and minutes on a loaded machine; this bounds
# a hung import without counting it against the per-check --timeout.
PROBE_IMPORT_SECONDS = 900.0


def forking() -> bool:
    """True when the smoke checks fork from one probe (the default on POSIX)."""
    return os.environ.get(SMOKE_MODE_ENV) != "subprocess" and hasattr(os, "fork")


def smoke(args: argparse.Namespace, port: port_layout.PortDir) -> list[Check]:
    """The smoke checks, each importing the port fresh: forked from one probe that imported MAX once."""
    if not forking():
        return smoke_in_subprocesses(args, port)
    return smoke_forked(args, port)


def smoke_in_subprocesses(args: argparse.Namespace, port: port_layout.PortDir) -> list[Check]:
    """Each smoke check in its own fresh Python process (port_probe.py)."""
    checks = []
    for name in SMOKE_CHECKS:
        check = run_probe(args, port, name)
        checks.append(check)
        if name == "import" and check.status is not CheckStatus.PASS:
            break  # the other checks import the port too
    return checks


def probe_command(args: argparse.Namespace, port: port_layout.PortDir, names: tuple[str, ...]) -> list[str]:
    command = [sys.executable, str(SCRIPTS_DIR / "port_probe.py"), args.model, "--port-dir", str(port.path),
               "--encoding", args.encoding, "--json"]
    for name in names:
        command += ["--check", name]
    return command + (["--revision", args.revision] if args.revision else [])


def smoke_forked(args: argparse.Namespace, port: port_layout.PortDir) -> list[Check]:
    """One probe process imports MAX, then forks a child per check (port_probe.py --fork)."""
    probe = start_probe(args, port)
    try:
        return finish_probe(probe, args)
    finally:
        stop_probe(probe)


def start_probe(args: argparse.Namespace, port: port_layout.PortDir) -> subprocess.Popen:
    """Start the forking probe (its own process group, so stopping it stops its children too)."""
    command = probe_command(args, port, SMOKE_CHECKS) + ["--fork", "--timeout", str(args.timeout)]
    env = dict(os.environ, MAX_SERVE_DISABLE_TELEMETRY="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def stop_probe(probe: subprocess.Popen) -> None:
    """Kill the probe's process group if it is still running, and reap it."""
    if probe.poll() is None:
        try:
            os.killpg(probe.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        probe.communicate()


def finish_probe(probe: subprocess.Popen, args: argparse.Namespace) -> list[Check]:
    """Wait for the probe and turn its JSON document into Checks."""
    # Each child has --timeout; the probe itself imports MAX once first.
    budget = args.timeout * len(SMOKE_CHECKS) + PROBE_IMPORT_SECONDS
    try:
        stdout, stderr = probe.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        return [Check("smoke", SMOKE_CHECKS[0], CheckStatus.FAIL, f"did not finish in {budget:.0f} s")]
    done = subprocess.CompletedProcess(probe.args, probe.returncode, stdout, stderr)
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict) and "error" in document:
        raise ScriptError(str(document["error"]))
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        return [crashed_probe(SMOKE_CHECKS[0], done.returncode, done.stderr)]
    checks = []
    for outcome in document["results"]:
        name = outcome.get("check", "?")
        if outcome.get("status") == "timeout":
            checks.append(Check("smoke", name, CheckStatus.FAIL, f"did not finish in {args.timeout:.0f} s"))
        elif outcome.get("status") == "crashed":
            checks.append(crashed_probe(name, outcome.get("exit"), outcome.get("detail") or ""))
        else:
            checks.append(check_from_document(name, outcome.get("document"), outcome.get("exit")))
    return checks


def crashed_probe(name: str, returncode: Any, stderr: str) -> Check:
    tail = " ".join((stderr.strip().splitlines() or ["no output"])[-1:])
    return Check("smoke", name, CheckStatus.FAIL, f"the probe crashed (exit {returncode}): {tail[:300]}")


def check_from_document(name: str, document: Any, returncode: Any) -> Check:
    """A probe's JSON document as a Check; its ``error`` (bad input) is exit 3 for the gates."""
    if not isinstance(document, dict):
        return Check("smoke", name, CheckStatus.FAIL, f"the probe printed {type(document).__name__} JSON, not an object "
                                            f"(exit {returncode})")
    if "error" in document:
        raise ScriptError(str(document["error"]))
    details = {k: v for k, v in document.items() if k not in ("check", "passed", "summary")}
    return Check("smoke", name, CheckStatus.PASS if document.get("passed") else CheckStatus.FAIL,
                 document.get("summary", ""), details)


def run_probe(args: argparse.Namespace, port: port_layout.PortDir, name: str) -> Check:
    command = probe_command(args, port, (name,))
    env = dict(os.environ, MAX_SERVE_DISABLE_TELEMETRY="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Check("smoke", name, CheckStatus.FAIL, f"did not finish in {args.timeout:.0f} s")
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        return crashed_probe(name, done.returncode, done.stderr)
    return check_from_document(name, document, done.returncode)


# --- verify --------------------------------------------------------------------------


def verify(args: argparse.Namespace, port: port_layout.PortDir) -> Check:
    if not args.base_url:
        return Check("verify", "logits", CheckStatus.SKIPPED,
                     f"no --base-url; serve the port (serve {args.model} --port-dir {port.path}) and rerun "
                     "with --phase verify --base-url URL")
    import port_compare

    result = port_compare.run_compare(args.model, args.base_url, args.served_name or port.slug,
                                        dtype=args.encoding, device="cpu", revision=args.revision)
    document = result.to_dict()
    if result.verdict == "MATCH":
        return Check("verify", "logits", CheckStatus.PASS, f"MATCH (max |d logprob| {result.max_abs_diff:.3g})", document)
    return Check("verify", "logits", CheckStatus.FAIL,
                 f"DIVERGED at {result.first_divergence} (max |d logprob| {result.max_abs_diff:.3g})", document)


# --- output --------------------------------------------------------------------------


def report(args: argparse.Namespace, port: port_layout.PortDir, checks: list[Check], code: int) -> None:
    if args.json:
        cli_support.print_json({"port_dir": str(port.path), "model": args.model, "phase": args.phase,
                                "passed": code == 0, "checks": [asdict(c) for c in checks]})
        return
    for c in checks:
        print(f"[{c.phase}] {c.name:15s} {c.status.upper():7s} {c.summary}")
        for key in ("missing", "unexpected", "shape_mismatches"):
            for item in c.details.get(key, [])[:20]:
                print(f"    {key}: {item}")
    verdict = {0: "all gates passed", 1: "a gate failed", 2: "blocked by a wall"}[code]
    print(verdict)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
