"""Family coverage: do the replica tools work on every causal-LM family transformers ships? (prints a table)

Not collected by pytest. Run: ``$PY tests/bench_family_coverage.py`` (every model type in transformers'
causal-LM mapping; CPU only, no MAX, one family at a time in a child process that is restarted past a
family that hangs) or ``--only llama,gpt2`` / ``--required``
(the families that must be ok). ``--json`` prints one JSON document; ``--jsonl FILE`` writes each row
as it finishes (the file is replaced), so a long run can be read while it goes.

For each model type: refuse up front what the tools do not handle (closed list of reasons, below);
otherwise build a replica from transformers' default config (``make_tiny_model.build_replica`` shrinks
it, as ``tiny`` does), run ``replica_sensitivity.sensitivity_report`` and the HF-side capture
(``hf_hidden_states.capture_reference``), and read the delta signals ``inspect`` would report
(``delta_signals.detect`` on the replica's config and tensors). A row's status is one of:

* ok: every tool ran, no tool error, and the replica passed its sensitivity report;
* replica failed: every tool ran, but some applicable mutation did not move the logprobs enough
  (the mutation is named), or the reference is flat;
* refused: a reason from the closed list ``Refusal``: not a decoder-only causal LM over one text token
  stream (an encoder or encoder-decoder, a class that attends both ways such as XLNet, XLM or CPM-Ant, a
  draft head fed by another model's states, an audio-codebook decoder; the rule is
  ``wall_scan.not_causal_lm``, which ``tiny`` applies too, exit 2), a state-space/recurrent wall
  (``wall_scan``'s ``ssm_recurrence``), hyper-connection residual streams (``residual_streams``: DeepSeek-V4,
  whose attention the resolver does not describe either; Gemma 3n's AltUp streams are handled), or the class
  needs remote code or a package that is not installed;
* tool error: a tool could not run, a mutation ended in a tool error, or a mutation was reported not
  applicable while ``inspect`` reports its delta signal (the tool missed a feature the model has).

A default config that transformers itself cannot build a model from (a size it leaves None) is not a
refusal: ``REPAIRS`` names, per family, the keys set and why, and the row says "repaired".
"""

from __future__ import annotations

import argparse
import enum
import json
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

# The families the issue requires to be ok (transformers model types).
REQUIRED = ("llama", "mistral", "qwen2", "phi", "phi3", "gpt_neox", "gpt2", "gptj", "falcon", "opt", "starcoder2",
            "cohere", "gemma", "gemma2", "olmo", "olmo2", "olmoe", "qwen2_moe", "mixtral", "stablelm")
# One family may take at most this long (build + report + capture, plus about 5 s of imports in its own
# process); a 2-layer replica takes seconds on 2 shared cores, so a family past this (a default config the
# shrinking rules miss builds a full-size model: BLT held 5.8 GB for minutes) is a tool error, not waited for.
FAMILY_TIMEOUT_SECONDS = 180
# Failure text kept per row (one line).
MESSAGE_CHARS = 220


class Status(str, enum.Enum):
    """How one family ended."""

    OK = "ok"
    REPLICA_FAILED = "replica failed"
    REFUSED = "refused"
    TOOL_ERROR = "tool error"


class Refusal(str, enum.Enum):
    """The closed list of reasons a family is refused."""

    # wall_scan.not_causal_lm: encoder, encoder-decoder, bidirectional, draft head, audio codebooks.
    NOT_DECODER_ONLY = "not a decoder-only causal LM"
    RECURRENT_WALL = "state-space/recurrent wall"
    # wall_scan's residual_streams: DeepSeek-V4's hyper-connection streams and its attention
    RESIDUAL_STREAMS_WALL = "several residual streams (hyper-connections)"
    REMOTE_OR_PACKAGE = "needs remote code or a package not installed"


@dataclass
class Row:
    """One family's result."""

    model_type: str
    architecture: str
    status: Status
    reason: str = ""
    verdict: str = ""
    moved: int = 0
    applicable: int = 0
    not_applicable: int = 0
    blind: list[str] = field(default_factory=list)
    missed_signals: list[str] = field(default_factory=list)
    parameters: int | None = None
    seconds: float = 0.0
    repair: str = ""  # the REPAIRS entry applied to the default config, "" for none


class FamilyTimeout(Exception):
    """The family ran past FAMILY_TIMEOUT_SECONDS."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:MESSAGE_CHARS]


def _missing_package(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, ImportError) or "requires the" in text or "pip install" in text or "trust_remote_code" in text


# Default configs transformers itself cannot build a model from (a size left None that the modeling code
# reads): model_type -> (the keys set, why). The minimal repair, so the tools are still tested on the family;
# the values follow the family's own convention where its code has one.
REPAIRS: dict[str, tuple[dict, str]] = {
    "dbrx": ({"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8, "ffn_config.ffn_hidden_size": 2048,
              "ffn_config.hidden_size": 3584},
             "the modeling code reads attn_config.rope_theta, which DbrxAttentionConfig does not define (Hub "
             "configs set it; 10000 = the default rope_parameters' theta); it clamps q/k/v with "
             "clamp(min=None, max=None) when clip_qkv is None, which torch refuses (8 = DBRX's Hub config); its "
             "router (Linear(ffn_hidden_size, experts)) and experts (hidden states reshaped to ffn_hidden_size) "
             "take ffn_config.ffn_hidden_size as the token width and ffn_config.hidden_size as the expert width, "
             "so the defaults (d_model 2048, ffn_hidden_size 3584, hidden_size 6144) cannot run: ffn_hidden_size "
             "= d_model, hidden_size = the default expert width 3584"),
    "deepseek_v2": ({"num_experts_per_tok": 6}, "the default leaves num_experts_per_tok None; the router's "
                    "torch.topk needs it (6 = DeepSeek-V2 and V2-Lite's Hub configs)"),
    "dots1": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
              "the default leaves the expert counts None; Dots1NaiveMoe sizes torch.empty with them"),
    "hunyuan_v1_dense": ({"head_dim": 128}, "the default leaves head_dim None; the attention reads it as "
                                            "head_dim**-0.5 (128 = hidden_size 4096 / 32 heads)"),
    "hunyuan_v1_moe": ({"head_dim": 128}, "the default leaves head_dim None; the attention reads it as "
                                          "head_dim**-0.5 (128 = hidden_size 4096 / 32 heads)"),
    "ministral": ({"head_dim": 128}, "the default leaves head_dim None; the attention reads it as head_dim**-0.5 "
                                     "(128 = hidden_size 4096 / 32 heads)"),
    "nemotron": ({"num_key_value_heads": 48}, "the default leaves num_key_value_heads None; the attention divides "
                                              "by it (48 = num_attention_heads: multi-head attention)"),
}


def default_config(model_type: str, architecture: str) -> tuple[dict, str]:
    """transformers' default config for ``model_type`` as a config.json dict naming the causal-LM class,
    and the repair applied to it ("" for none).

    Top-level fields are all written out (``to_dict``); a nested sub-config is written as transformers'
    own config.json has it (``to_diff_dict``): ``to_dict`` adds base fields such as ``_name_or_path`` to
    sub-config dicts, which DBRX's FFN config refuses when the dict is read back.
    """
    import transformers

    import hf_reference

    built = hf_reference.config_for_model(model_type)
    config, written = built.to_dict(), built.to_diff_dict()
    for key, value in config.items():
        if isinstance(getattr(built, key, None), transformers.PreTrainedConfig) and isinstance(written.get(key), dict):
            config[key] = written[key]
    config["architectures"] = [architecture]
    config["model_type"] = model_type
    repair = ""
    if model_type in REPAIRS:
        keys, why = REPAIRS[model_type]
        import model_anatomy

        for key, value in keys.items():
            model_anatomy.set_config_value(config, key, value)
        repair = f"repaired default config: set {', '.join(f'{k}={v}' for k, v in keys.items())} ({why})"
    return config, repair


def refusal(config: dict) -> tuple[Refusal, str] | None:
    """The up-front refusal for a config, from the closed list, or None."""
    import wall_scan
    from replica_sensitivity import decoder_only_refusal

    why = decoder_only_refusal(config)
    if why:
        return Refusal.NOT_DECODER_ONLY, why
    walls = {f.code: f for f in wall_scan.config_walls(config, native=False)}
    if "ssm_recurrence" in walls:
        return Refusal.RECURRENT_WALL, walls["ssm_recurrence"].message
    if wall_scan.RESIDUAL_STREAMS in walls:
        return Refusal.RESIDUAL_STREAMS_WALL, walls[wall_scan.RESIDUAL_STREAMS].message
    return None


def missed_signals(report, replica: Path) -> list[str]:
    """Delta codes inspect reports whose every tied mutation was reported not applicable."""
    import delta_signals
    import hf_source
    import model_source

    config = json.loads((replica / "config.json").read_text())
    tensors = model_source.read_tensor_infos(model_source.resolve(str(replica)))
    codes = {s.code for s in delta_signals.detect(config, tensors, hf_source.read_model(config))}
    tied: dict[str, list] = {}
    for row in report.mutations:
        if row.code:
            tied.setdefault(row.code, []).append(row)
    return sorted(code for code in codes & tied.keys()
                  if all(r.outcome.value == "not applicable" for r in tied[code]))


def run_family(model_type: str, architecture: str, work: Path) -> Row:
    """Refuse, or build, report and capture one family; every ending is a Row."""
    from cli_support import ScriptError

    row = Row(model_type, architecture, Status.TOOL_ERROR)
    try:
        config, row.repair = default_config(model_type, architecture)
    except Exception as exc:  # noqa: BLE001 - the config class itself cannot be built here
        refused = refusal({"model_type": model_type, "architectures": [architecture]})
        if refused:  # a family refused by type (its composite default config needs sub-configs)
            row.status, row.reason = Status.REFUSED, f"{refused[0].value}: {_one_line(refused[1])}"
        elif _missing_package(exc):
            row.status, row.reason = Status.REFUSED, f"{Refusal.REMOTE_OR_PACKAGE.value}: {_one_line(exc)}"
        else:
            row.reason = f"default config: {type(exc).__name__}: {_one_line(exc)}"
        return row
    refused = refusal(config)
    if refused:
        row.status, row.reason = Status.REFUSED, f"{refused[0].value}: {_one_line(refused[1])}"
        return row
    step = "build"
    try:
        from make_tiny_model import ReplicaOptions, build_replica

        replica = work / model_type
        manifest = build_replica(config, replica, ReplicaOptions(force=True))
        row.parameters = manifest["replica"]["parameters"]
        step = "sensitivity"
        from replica_sensitivity import Outcome, sensitivity_report

        report = sensitivity_report(replica, raise_on_tool_error=False)
        row.verdict = report.verdict.value
        row.moved = sum(m.outcome is Outcome.MOVED for m in report.mutations)
        row.applicable = sum(m.applicable for m in report.mutations)
        row.not_applicable = sum(m.outcome is Outcome.NOT_APPLICABLE for m in report.mutations)
        row.blind = report.failures()
        errors = [f"{m.name}: {m.reason}" for m in report.tool_errors]
        step = "capture"
        import hf_reference
        import transformers
        from hf_hidden_states import capture_reference
        from replica_init import PROMPT

        tokenizer = transformers.AutoTokenizer.from_pretrained(replica)
        capture = capture_reference(hf_reference.load(str(replica)), tokenizer(PROMPT)["input_ids"], sublayer=True)
        if not capture.stages:
            errors.append("capture: no stage captured")
        step = "signals"
        row.missed_signals = missed_signals(report, replica)
        errors += [f"not applicable while inspect reports {code}" for code in row.missed_signals]
    except FamilyTimeout:
        row.reason = f"{step}: over {FAMILY_TIMEOUT_SECONDS} s"
        return row
    except ScriptError as exc:
        text = str(exc)
        if _missing_package(exc):
            row.status, row.reason = Status.REFUSED, f"{Refusal.REMOTE_OR_PACKAGE.value}: {_one_line(text)}"
        else:
            row.reason = f"{step}: {_one_line(text)}"
        return row
    except Exception as exc:  # noqa: BLE001 - any crash of a tool is a tool error row, with its place
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        row.reason = f"{step}: {type(exc).__name__}: {_one_line(exc)} ({Path(frame.filename).name}:{frame.lineno})"
        return row
    if errors:
        row.reason = "; ".join(_one_line(e) for e in errors)
        return row
    row.status = Status.OK if report.passed else Status.REPLICA_FAILED
    row.reason = "" if report.passed else f"blind to: {', '.join(row.blind)}"
    return row


def _on_alarm(signum, frame):
    raise FamilyTimeout()


def run_supervised(wanted: list[str], mapping: dict[str, str], jsonl: Path) -> list[Row]:
    """Run the families in one child process (``--in-process``), restarted past a family that hangs.

    The child appends each row to ``jsonl``; when no row arrives for FAMILY_TIMEOUT_SECONDS, the child
    is killed, the family it was on becomes a tool error row, and a new child takes the rest.
    """
    import subprocess

    rows: list[Row] = []
    remaining = list(wanted)
    while remaining:
        command = [sys.executable, __file__, "--in-process", "--jsonl", str(jsonl), "--only", ",".join(remaining)]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last_progress, seen = time.monotonic(), 0
        while child.poll() is None:
            time.sleep(1)
            done = _read_rows(jsonl)[len(rows):]
            if len(done) > seen:
                seen, last_progress = len(done), time.monotonic()
            elif time.monotonic() - last_progress > FAMILY_TIMEOUT_SECONDS:
                child.kill()
                child.wait()
                break
        done = _read_rows(jsonl)[len(rows):]
        rows += done
        remaining = remaining[len(done):]
        if remaining and child.returncode != 0:
            stuck = remaining.pop(0)
            why = (f"over {FAMILY_TIMEOUT_SECONDS} s (killed)" if child.returncode in (-9, None)
                   else f"the family's process died (exit {child.returncode})")
            row = Row(stuck, mapping[stuck], Status.TOOL_ERROR, why, seconds=float(FAMILY_TIMEOUT_SECONDS))
            with open(jsonl, "a") as handle:
                handle.write(json.dumps(asdict(row), default=str) + "\n")
            rows.append(row)
    return rows


def _read_rows(jsonl: Path) -> list[Row]:
    rows = []
    for line in jsonl.read_text().splitlines() if jsonl.is_file() else []:
        data = json.loads(line)
        data["status"] = Status(data["status"])
        rows.append(Row(**data))
    return rows


def table(rows: list[Row]) -> str:
    """The printed table and a one-line summary per status."""
    lines = [f"{'model_type':<26} {'status':<15} {'moved/appl':>10} {'n/a':>4} {'params':>10} {'s':>6}  reason",
             "-" * 110]
    for r in rows:
        counts = f"{r.moved}/{r.applicable}" if r.verdict else "-"
        params = f"{r.parameters:,}" if r.parameters else "-"
        na = str(r.not_applicable) if r.verdict else "-"
        repaired = f" [repaired: {', '.join(REPAIRS[r.model_type][0])}]" if r.repair else ""
        lines.append(f"{r.model_type:<26} {r.status.value:<15} {counts:>10} {na:>4} {params:>10} {r.seconds:>6.1f}  "
                     f"{r.reason}{repaired}")
    lines.append("")
    for status in Status:
        members = [r.model_type for r in rows if r.status is status]
        lines.append(f"{status.value}: {len(members)}" + (f" ({', '.join(members)})" if status is not Status.OK
                                                          and members else ""))
    repaired = [r.model_type for r in rows if r.repair]
    if repaired:
        lines.append(f"repaired default configs (REPAIRS): {len(repaired)} ({', '.join(repaired)})")
    required = [r for r in rows if r.model_type in REQUIRED]
    if required:
        not_ok = [r.model_type for r in required if r.status is not Status.OK]
        lines.append(f"required families ok: {len(required) - len(not_ok)}/{len(required)}"
                     + (f" (not ok: {', '.join(not_ok)})" if not_ok else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: the whole causal-LM mapping)")
    parser.add_argument("--required", action="store_true", help="only the families that must be ok")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--jsonl", help="append each row to this file as it finishes")
    parser.add_argument("--in-process", action="store_true",
                        help="run every family in this process (faster; a family stuck in C code cannot be stopped)")
    args = parser.parse_args(argv)

    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from replica_init import quiet_transformers

    torch.set_num_threads(1)  # the machine is shared: one core per family, one family at a time
    quiet_transformers()
    mapping = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    wanted = sorted(mapping)
    if args.required:
        wanted = list(REQUIRED)
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in mapping]
    if unknown:
        print(f"not in transformers' causal-LM mapping: {', '.join(unknown)}", file=sys.stderr)
        return 3
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="family-coverage-") as folder:
        if not args.in_process:
            jsonl = Path(args.jsonl) if args.jsonl else Path(folder) / "rows.jsonl"
            if jsonl.exists():
                jsonl.unlink()
            rows = run_supervised(wanted, mapping, jsonl)
        else:
            signal.signal(signal.SIGALRM, _on_alarm)
        for model_type in wanted if args.in_process else []:
            begin = time.monotonic()
            signal.alarm(FAMILY_TIMEOUT_SECONDS)
            try:
                row = run_family(model_type, mapping[model_type], Path(folder))
            except FamilyTimeout:
                row = Row(model_type, mapping[model_type], Status.TOOL_ERROR, f"over {FAMILY_TIMEOUT_SECONDS} s")
            finally:
                signal.alarm(0)
            row.seconds = time.monotonic() - begin
            rows.append(row)
            if args.jsonl:
                with open(args.jsonl, "a") as handle:
                    handle.write(json.dumps(asdict(row), default=str) + "\n")
            if not args.json:
                print(f"  {model_type}: {row.status.value} ({row.seconds:.1f} s) {row.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "seconds": time.monotonic() - started}, default=str))
    else:
        print(table(rows))
        print(f"total {time.monotonic() - started:.0f} s, {len(rows)} model types, transformers "
              f"{__import__('transformers').__version__}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
