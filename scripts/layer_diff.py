"""Find the first block where a MAX port diverges from Hugging Face, in-process on the CPU, without a server.

Loads the port the way --custom-architectures does, builds it with every
stage's output captured (embedding, each block, with --sublayer each block's
attention and MLP output, final norm, logits), compiles once, runs the prompt
on the checkpoint's weights, runs HF on the same token ids, and reports per
stage max |diff|, relative error and cosine similarity. The first stage whose
relative error exceeds the dtype's tolerance is the first divergence; the
output names the references to read for it.

The port needs no taps: the capture is a MAX layer hook active only while
layer-diff traces the graph (scripts/max_hidden_states.py, MAX 26.7
internals). The relative error of a stage is ||MAX - HF|| / ||HF|| over all
its values; the first divergent position is the first token whose own
relative error exceeds the tolerance. Use compare for the logit-level verdict
once every stage is within tolerance.

The HF side is loaded by scripts/hf_reference.py (eager attention unless
--attn-implementation says otherwise) and runs first: a flat reference exits 3
before the capture graph is built or compiled.
"""

from __future__ import annotations

import argparse
import enum
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cli_support
import hf_reference
import input_files
import model_source
import tolerances
from cli_support import ScriptError
from max_hidden_states import Stage, stage_order

EXIT_CODES = {1: "a stage diverges beyond the tolerance (the first one is named), or a stage was not compared",
              2: "not used"}

DEFAULT_PROMPT = "The capital of France is"
DIVERGENCES = "references/divergences.md"
READING_GUIDE = "references/layer-by-layer-debugging.md#reading-the-output"
NOT_COMPARED_GUIDE = "references/layer-by-layer-debugging.md#not-compared-stages"

# Where to read for a first divergence in each part of the forward pass
# (anchors of references/divergences.md).
CAUSES_BY_PART = {
    "embedding": ("e1-embedding-scale", "w1-weight-names-or-shapes"),
    "attention": ("a1-attention-projections-and-heads", "r1-rope", "a3-attention-scale-and-softcap"),
    "mlp": ("m1-mlp-shape-or-activation",),
    "block": ("b1-residual-and-block-wiring", "n1-norm-kind-eps-offset"),
    "final_norm": ("n1-norm-kind-eps-offset",),
    "logits": ("h1-head-tying-scaling-softcap", "w2-zero-filled-weights"),
}
LATER_BLOCK_CAUSES = ("a2-mask-and-sliding-window", "w1-weight-names-or-shapes")
LATER_POSITION_CAUSES = ("r1-rope", "a2-mask-and-sliding-window")


class Verdict(str, enum.Enum):
    """The outcome of one layer-diff run."""

    MATCH = "MATCH"  # every stage was compared and is within tolerance
    DIVERGED = "DIVERGED"  # a compared stage is beyond tolerance (the first one is named)
    NOT_COMPARED = "NOT COMPARED"  # nothing diverged, but some stage was not captured on one side


class StageStatus(str, enum.Enum):
    """The outcome of one stage."""

    OK = "ok"
    DIVERGED = "diverged"
    NOT_COMPARED = "not compared"  # not captured on one side: never counted as within tolerance


@dataclass
class StageDiff:
    """How far MAX is from HF at one stage."""

    name: str
    block: int | None
    part: str
    max_abs_diff: float | None
    rel_error: float | None
    cosine: float | None
    first_position: int | None  # first token whose relative error exceeds the tolerance
    within_tolerance: bool
    note: str = ""
    status: StageStatus | None = None

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = StageStatus.OK if self.within_tolerance else StageStatus.DIVERGED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser, trust_remote_code=True)
    parser.add_argument("--port-dir", required=True, help="the port package folder DIR/<slug> (as for --custom-architectures)")
    parser.add_argument("--reference", default=None,
                        help="HF checkpoint for the HF side (default: MODEL), e.g. the original of a converted MODEL")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to run, without chat template (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--token-ids", default=None, help="comma-separated token ids to run instead of --prompt")
    parser.add_argument("--dtype", default="float32", help="dtype of both sides; sets the tolerance (default: float32)")
    parser.add_argument("--sublayer", action="store_true", help="also compare each block's attention and MLP output")
    hf_reference.add_attn_argument(parser)
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    try:
        dtype = tolerances.canonical_dtype(args.dtype)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None
    tolerance = tolerances.hidden_rtol(dtype)
    source = model_source.resolve(args.model, args.revision)
    config = model_source.read_config(source)
    reference = args.reference or args.model
    if args.reference is not None:
        model_source.read_config(model_source.resolve(reference, args.revision))
    explicit_ids = parse_token_ids(args.token_ids) if args.token_ids is not None else None
    if explicit_ids is not None:
        check_token_ids(explicit_ids, model_source.text_config(config), args.model)
    elif not args.prompt.strip():
        raise ScriptError("--prompt is empty")
    check_port_dir_path(args.port_dir)
    import max_hidden_states

    max_hidden_states.normalized_port_dir(args.port_dir)

    import hf_hidden_states

    token_ids = explicit_ids or encode(args, args.prompt)
    start = time.perf_counter()
    hf = hf_reference.load_model(reference, args.revision, dtype, "cpu", args.trust_remote_code,
                                 args.attn_implementation)
    hf_capture = hf_hidden_states.capture_reference(hf, token_ids, args.sublayer)
    hf_seconds = time.perf_counter() - start
    del hf
    spread = hf_reference.check_not_flat(hf_capture.logits)  # before the capture graph is built
    port = max_hidden_states.capture_port(str(source.local_dir or source.repo_id), args.port_dir, token_ids, encoding=dtype,
                                          revision=args.revision, trust_remote_code=args.trust_remote_code)
    if port.num_blocks != hf_capture.num_blocks:
        raise ScriptError(f"the port has {port.num_blocks} blocks but HF has {hf_capture.num_blocks}; "
                          "check num_hidden_layers wiring (references/divergences.md#c1-config-key-not-wired)")
    stages = stage_order(port.num_blocks, args.sublayer)
    max_values = dict(port.stages, logits=port.logits)
    hf_values = dict(hf_capture.stages, logits=hf_capture.logits)
    diffs = [compare_stage(stage, max_values.get(stage.name), hf_values.get(stage.name), tolerance,
                           hf_capture.missing.get(stage.name))
             for stage in stages]
    verdict = verdict_of(diffs)
    first = first_divergence(diffs)
    document = {
        "verdict": verdict.value,
        "model": args.model,
        "reference": reference,
        "port_dir": str(max_hidden_states.normalized_port_dir(args.port_dir)),
        "dtype": dtype,
        "attn_implementation": args.attn_implementation,
        "reference_spread": spread,
        "tolerance": tolerance,
        "token_ids": token_ids,
        "sublayer": args.sublayer,
        "stages": [{**asdict(d), "status": d.status.value} for d in diffs],
        "first_divergence": describe_divergence(first, diffs) if first else None,
        "untapped": [d.name for d in diffs if d.status is StageStatus.NOT_COMPARED],
        "timings": {"max_build_seconds": round(port.build_seconds, 2), "max_run_seconds": round(port.run_seconds, 3),
                    "hf_seconds": round(hf_seconds, 2)},
    }
    if args.json:
        cli_support.print_json(document)
    else:
        print(format_report(document))
    return cli_support.EXIT_OK if verdict is Verdict.MATCH else cli_support.EXIT_FINDINGS


def first_divergence(diffs: list[StageDiff]) -> StageDiff | None:
    """The first compared stage beyond tolerance."""
    return next((d for d in diffs if d.status is StageStatus.DIVERGED), None)


def verdict_of(diffs: list[StageDiff]) -> Verdict:
    """DIVERGED when a compared stage diverges, else NOT COMPARED when a stage was not compared, else MATCH."""
    if first_divergence(diffs):
        return Verdict.DIVERGED
    if any(d.status is StageStatus.NOT_COMPARED for d in diffs):
        return Verdict.NOT_COMPARED
    return Verdict.MATCH


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ScriptError(f"--token-ids must be comma-separated integers, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise ScriptError("--token-ids needs at least one non-negative token id")
    return ids


def check_token_ids(ids: list[int], text_config: dict[str, Any], model: str) -> None:
    """Refuse ids beyond the config's vocabulary and sequences longer than its positions."""
    vocab = text_config.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        beyond = [i for i in ids if i >= vocab]
        if beyond:
            raise ScriptError(f"--token-ids {beyond[0]} is beyond the vocab_size {vocab} of {model}")
    positions = text_config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0 and len(ids) > positions:
        raise ScriptError(f"--token-ids holds {len(ids)} ids, more than max_position_embeddings {positions} "
                          f"of {model}")


def check_port_dir_path(port_dir: str) -> None:
    """Refuse a --port-dir that is empty, a file, a dangling link or a link loop, naming it."""
    if not str(port_dir).strip():
        raise ScriptError("--port-dir is empty; give the port package folder DIR/<slug>")
    problem = input_files.describe_path_problem(Path(port_dir).expanduser())
    if problem == "is a folder, not a file":
        return
    raise ScriptError(f"--port-dir {port_dir} is not a folder (it {problem or 'is a file'}); give the port "
                      "package folder DIR/<slug>")


def encode(args: argparse.Namespace, prompt: str) -> list[int]:
    """The prompt's token ids, by the model's tokenizer (no chat template)."""
    if not prompt.strip():
        raise ScriptError("--prompt is empty")
    tokenizer = hf_reference.load_tokenizer(args.model, args.revision, args.trust_remote_code)
    ids = hf_reference.encode_prompt(tokenizer, prompt, chat_template=False)
    if not ids:
        raise ScriptError(f"the tokenizer of {args.model} encodes {prompt!r} to no tokens")
    return ids


def compare_stage(stage: Stage, got: Any, want: Any, tolerance: float, hf_missing: str | None = None) -> StageDiff:
    """Max |diff|, relative error, cosine and first divergent position of MAX (got) against HF (want).

    A stage missing on either side is NOT COMPARED (never within tolerance); ``hf_missing`` says why
    the HF side has no module for it.
    """
    import numpy as np

    if got is None or want is None:
        sides = [side for side, value in (("MAX", got), ("HF", want)) if value is None]
        note = f"not compared: not captured on the {' and '.join(sides)} side" + ("s" if len(sides) > 1 else "")
        if want is None and hf_missing:
            note += f" ({hf_missing})"
        return StageDiff(stage.name, stage.block, stage.part, None, None, None, None, False, note,
                         StageStatus.NOT_COMPARED)
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return StageDiff(stage.name, stage.block, stage.part, float("inf"), float("inf"), None, 0, False,
                         f"shape MAX {list(got.shape)} != HF {list(want.shape)}")
    rows_got = got.reshape(got.shape[0], -1)
    rows_want = want.reshape(want.shape[0], -1)
    delta = rows_got - rows_want
    if not np.all(np.isfinite(rows_got)):
        bad = int(np.argmax(~np.all(np.isfinite(rows_got), axis=1)))
        return StageDiff(stage.name, stage.block, stage.part, float("inf"), float("inf"), None, bad, False,
                         "MAX produced NaN or Inf")
    tiny = np.finfo(np.float64).tiny
    rel = float(np.linalg.norm(delta) / max(np.linalg.norm(rows_want), tiny))
    norms = np.linalg.norm(rows_got) * np.linalg.norm(rows_want)
    cosine = float(np.sum(rows_got * rows_want) / norms) if norms > 0 else None
    per_position = np.linalg.norm(delta, axis=1) / np.maximum(np.linalg.norm(rows_want, axis=1), tiny)
    over = np.nonzero(per_position > tolerance)[0]
    return StageDiff(stage.name, stage.block, stage.part, float(np.max(np.abs(delta))), rel, cosine,
                     int(over[0]) if over.size else None, rel <= tolerance and not over.size)


def describe_divergence(first: StageDiff, diffs: list[StageDiff]) -> dict[str, Any]:
    """The first divergent stage, its block and position, and the references to read for it."""
    causes = list(CAUSES_BY_PART.get(first.part, ()))
    if first.block and first.part in ("block", "attention", "mlp"):
        causes += LATER_BLOCK_CAUSES
    if first.first_position:
        causes += LATER_POSITION_CAUSES
    if first.part == "block":
        split = [d for d in diffs if d.block == first.block and d.part in ("attention", "mlp")]
        hint = ("attention and MLP outputs match: look at the norms and residual wiring around them" if split
                else "re-run with --sublayer to split the block into attention and MLP")
    else:
        hint = ""
    unique = list(dict.fromkeys(causes))
    return {
        "stage": first.name,
        "block": first.block,
        "part": first.part,
        "position": first.first_position,
        "rel_error": first.rel_error,
        "hint": hint,
        "read_next": [f"{DIVERGENCES}#{anchor}" for anchor in unique] + [READING_GUIDE],
    }


def format_report(document: dict[str, Any]) -> str:
    """The per-stage table and the verdict, as text."""
    lines = [f"layer-diff {document['model']} (port {document['port_dir']}, {document['dtype']}, "
             f"{len(document['token_ids'])} tokens, tolerance rel {document['tolerance']:g})",
             f"HF reference: {document['reference']} ({document['dtype']}, attention {document['attn_implementation']}, "
             f"spread {document['reference_spread']:.3g})",
             f"{'stage':<22} {'max|diff|':>11} {'rel err':>11} {'cosine':>10}  status"]
    for stage in document["stages"]:
        if stage["status"] == StageStatus.NOT_COMPARED:
            lines.append(f"{stage['name']:<22} {'-':>11} {'-':>11} {'-':>10}  NOT COMPARED: {stage['note']}")
            continue
        cosine = "-" if stage["cosine"] is None else f"{stage['cosine']:.6f}"
        status = "ok" if stage["within_tolerance"] else f"DIVERGED (from position {stage['first_position']})"
        if stage["note"]:
            status += f"; {stage['note']}"
        lines.append(f"{stage['name']:<22} {stage['max_abs_diff']:>11.3e} {stage['rel_error']:>11.3e} "
                     f"{cosine:>10}  {status}")
    first = document["first_divergence"]
    skipped = [stage["name"] for stage in document["stages"] if stage["status"] == StageStatus.NOT_COMPARED]
    if first is None and skipped:
        lines.append(f"NOT COMPARED: {len(skipped)} stage(s) could not be compared ({', '.join(skipped)}); the "
                     "compared stages are within tolerance, but this is not a MATCH "
                     f"(see {NOT_COMPARED_GUIDE})")
    elif first is None:
        lines.append("MATCH: every stage is within tolerance; run compare for the logit-level verdict")
    else:
        where = f"block {first['block']}" if first["block"] is not None else first["stage"]
        part = f" ({first['part']})" if first["part"] in ("attention", "mlp") else ""
        lines.append(f"DIVERGED: first divergence at {where}{part}, stage {first['stage']}, "
                     f"token position {first['position']}")
        if first["hint"]:
            lines.append(f"  {first['hint']}")
        lines.append("  read next: " + ", ".join(first["read_next"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
