"""Run the skill's phases end to end on a tiny local model that the demo builds itself.

No network is used. The demo model is a strongly initialized Llama replica
registered under a new architecture name, ``DemoLlamaForCausalLM``, so MAX
does not know it: the skill must decide, plan, scaffold a port from the
``llama3`` donor, gate it, serve it on the CPU and compare it with
transformers. Because the demo's only "delta" is its name, the verdict is
expected to be MATCH. Each step prints the exact command it runs, so the demo
doubles as a tour of the scripts. Steps whose scripts are not installed are
skipped and reported.

The first run compiles the MAX graph (about 1–2 minutes on 2 CPU cores);
later runs hit MAX's compile cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cli_support

EXIT_CODES = {1: "the port did not match transformers (DIVERGED) or a gate failed", 2: "a wall blocks the port"}

SCRIPTS_DIR = Path(__file__).resolve().parent
DISPATCHER = SCRIPTS_DIR / "import_model.py"
DEMO_ARCHITECTURE = "DemoLlamaForCausalLM"
DEMO_SLUG = "demo_llama"

# The embedded source config: a Llama-3-style model in the old (4.x) spelling
# most Hub checkpoints use. The tiny-replica step shrinks it.
DEMO_SOURCE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the demo's model and port (default: a new temporary folder, removed afterwards)",
    )
    parser.add_argument("--port", type=int, default=None, help="HTTP port for max serve (default: a free one)")
    parser.add_argument("--skip-serve", action="store_true", help="stop after the gates (no MAX compile)")
    cli_support.add_json_flag(parser)


@dataclass
class StepResult:
    """One demo step: the command it ran, its exit code and a short outcome."""

    name: str
    command: list[str]
    exit_code: int | None
    outcome: str
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def _available() -> set[str]:
    sys.path.insert(0, str(SCRIPTS_DIR))
    import import_model

    return set(import_model.available_subcommands())


def _run_step(name: str, subcommand: list[str], quiet: bool) -> tuple[StepResult, Any]:
    """Run one dispatcher subcommand with ``--json``; return its result and parsed JSON."""
    command = [sys.executable, str(DISPATCHER), *subcommand, "--json"]
    shown = ["import_model.py", *subcommand]
    if not quiet:
        print(f"\n$ python scripts/{' '.join(shown)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    try:
        document = json.loads(done.stdout) if done.stdout.strip() else None
    except json.JSONDecodeError:
        document = None
    error = (done.stderr.strip().splitlines() or [""])[-1]
    outcome = f"exit {done.returncode}" + (f": {error}" if done.returncode == 3 and error else "")
    return StepResult(name, shown, done.returncode, outcome, round(elapsed, 1)), document


def _summarize(name: str, document: Any) -> str:
    """One line that says what a step's JSON answer means."""
    if not isinstance(document, dict):
        return ""
    if name == "list-archs":
        if document.get("registered"):
            return "registered natively: " + ", ".join(r.get("slug", "?") for r in document.get("registrations", []))
        return "not registered in MAX, so a port is needed"
    if name == "inspect":
        signals = [s.get("code") for s in document.get("delta_signals", [])]
        ranking = document.get("donor_ranking") or [{}]
        return f"delta signals: {', '.join(signals) or 'none'}; top donor: {ranking[0].get('slug')}"
    if name == "check-walls":
        findings = document.get("findings", [])
        return "no walls" if not findings else "; ".join(f"{f['code']} ({f['level']})" for f in findings)
    if name == "list-keys":
        return (f"{document.get('tensor_count')} tensors, {document.get('parameter_count'):,} parameters, "
                f"{document.get('dominant_dtype')}, {document.get('format')}")
    if name == "scaffold":
        return f"port package {document.get('slug')} written"
    if name == "audit":
        return (f"{document.get('unmarked')} unmarked donor mentions to review "
                f"({document.get('marked')} marked)")
    if name == "gates":
        checks = document.get("checks", [])
        return ", ".join(f"{c.get('name')}={c.get('status')}" for c in checks)
    return ""


def main(args: argparse.Namespace) -> int:
    available = _available()
    quiet = bool(args.json)
    workdir_owned = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="import-model-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    port_root = workdir / "port"
    steps: list[StepResult] = []
    verdict = "INCOMPLETE"
    try:
        source_config = workdir / "source" / "config.json"
        source_config.parent.mkdir(exist_ok=True)
        source_config.write_text(json.dumps(DEMO_SOURCE_CONFIG, indent=2))
        if "tiny" not in available:
            raise cli_support.ScriptError("the demo needs scripts/make_tiny_model.py (tiny), which is missing")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        step, _ = _run_step("tiny", ["tiny", str(source_config), "--output", str(model_dir)], quiet)
        steps.append(step)
        if step.exit_code != 0:
            raise cli_support.ScriptError(f"building the tiny model failed ({step.outcome})")
        _rename_architecture(model_dir, DEMO_ARCHITECTURE)

        plan = [
            ("list-archs", ["list-archs", "--match", DEMO_ARCHITECTURE]),
            ("inspect", ["inspect", str(model_dir)]),
            ("check-walls", ["check-walls", str(model_dir)]),
            ("list-keys", ["list-keys", str(model_dir), "--summary"]),
            ("scaffold", ["scaffold", str(model_dir), "--start-from", "llama3", "--slug", DEMO_SLUG,
                          "--output-dir", str(port_root), "--force"]),
            ("audit", ["audit", str(port_root / DEMO_SLUG)]),
            ("gates", ["gates", str(model_dir), "--port-dir", str(port_root / DEMO_SLUG),
                       "--phase", "preflight"]),
            ("gates", ["gates", str(model_dir), "--port-dir", str(port_root / DEMO_SLUG), "--phase", "smoke"]),
        ]
        for name, subcommand in plan:
            if name not in available:
                steps.append(StepResult(name, subcommand, None, "skipped: script not installed"))
                continue
            step, document = _run_step(name, subcommand, quiet)
            step.outcome += (f" ({_summarize(name, document)})" if _summarize(name, document) else "")
            steps.append(step)
            if not quiet:
                print(f"  -> {step.outcome}  [{step.seconds}s]", flush=True)
            if name in ("inspect", "check-walls") and step.exit_code == 2:
                return _finish(args, steps, "BLOCKED", workdir, workdir_owned, cli_support.EXIT_STOP)
            if name in ("scaffold", "gates") and step.exit_code not in (0,):
                return _finish(args, steps, "GATE FAILED", workdir, workdir_owned, cli_support.EXIT_FINDINGS)

        if args.skip_serve or not {"serve", "compare"} <= available:
            verdict = "SKIPPED SERVE" if args.skip_serve else "INCOMPLETE (serve/compare not installed)"
            return _finish(args, steps, verdict, workdir, workdir_owned, 0)
        verdict, code = _serve_and_compare(model_dir, port_root / DEMO_SLUG, args.port, steps, quiet)
        return _finish(args, steps, verdict, workdir, workdir_owned, code)
    finally:
        if workdir_owned:
            shutil.rmtree(workdir, ignore_errors=True)


def _serve_and_compare(model_dir: Path, port_dir: Path, port: int | None, steps: list[StepResult],
                       quiet: bool) -> tuple[str, int]:
    """Serve the port on the CPU and compare it with transformers."""
    import max_server

    if not quiet:
        print(f"\n$ python scripts/import_model.py serve {model_dir} --port-dir {port_dir} --devices cpu "
              "--encoding float32   (first compile takes 1-2 minutes)", flush=True)
    started = time.monotonic()
    with max_server.served_model(model_dir, port_dir=port_dir, devices="cpu", encoding="float32",
                                 port=port, progress=not quiet) as server:
        steps.append(StepResult("serve", ["import_model.py", "serve", str(model_dir), "--port-dir", str(port_dir)],
                                0, f"serving {server.served_name} at {server.base_url}",
                                round(time.monotonic() - started, 1)))
        step, document = _run_step(
            "compare", ["compare", str(model_dir), "--base-url", server.base_url, "--slug", server.served_name],
            quiet,
        )
    verdict = document.get("verdict", "UNKNOWN") if isinstance(document, dict) else "UNKNOWN"
    if isinstance(document, dict):
        step.details = {k: document.get(k) for k in ("verdict", "max_abs_diff", "first_divergence") if k in document}
        diff = document.get("max_abs_diff")
        shown = f"{diff:.1e}" if isinstance(diff, (int, float)) else "n/a"
        step.outcome += f" (verdict {verdict}, max |Δ logprob| {shown})"
    steps.append(step)
    if not quiet:
        print(f"  -> {step.outcome}  [{step.seconds}s]", flush=True)
    return verdict, (0 if verdict == "MATCH" else cli_support.EXIT_FINDINGS if step.exit_code == 1 else step.exit_code or 1)


def _rename_architecture(model_dir: Path, name: str) -> None:
    """Register the replica under a new architecture name, so MAX does not know it."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [name]
    path.write_text(json.dumps(config, indent=2) + "\n")


def _finish(args: argparse.Namespace, steps: list[StepResult], verdict: str, workdir: Path, owned: bool,
            code: int) -> int:
    if args.json:
        cli_support.print_json({"verdict": verdict, "exit_code": code, "steps": steps,
                                "workdir": None if owned else str(workdir)})
    else:
        print("\nsummary:")
        for step in steps:
            print(f"  {step.name:<12} {step.outcome}")
        print(f"\nverdict: {verdict}")
    return code


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
