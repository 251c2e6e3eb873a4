"""Compare a served MAX model with the Hugging Face reference token by token; report the first divergence.

Sends MAX the exact token ids HF uses (echo + logprobs + greedy continuation
at temperature 0), runs HF once per prompt in a single forward pass over the
prompt and MAX's continuation, and compares by token id: the logprob of the
actual token at every position, top-1 agreement, top-k overlap, and the greedy
continuation with the tie-tolerant rule. Verdict MATCH or DIVERGED, the first
divergent position, max |Δ logprob| and a per-position table.

Positions: position p is the p-th token of the prompt (0-based), then MAX's
generated tokens. Position 0 has no logprob, so scored positions start at 1;
the score at p is log P(token p | tokens 0..p-1). The tolerance is absolute
and per dtype (scripts/tolerances.py).

The HF side is loaded by scripts/hf_reference.py: eager attention unless
--attn-implementation says otherwise (sdpa drops attention soft-capping), and
no verdict on a flat reference (exit 3 before the comparison).

Before loading any HF weights the server is checked: it answers /v1/models
and serves the expected name (--slug); every answer must echo the exact ids
sent, and every id and top-k text MAX returns must exist in the HF
tokenizer's vocabulary. (An id beyond the served model's vocabulary crashes
MAX 26.7's model worker, so the vocab size is never probed with one.)

The comparison itself is ``port_compare`` (a library: ``gates --phase verify`` uses it too).
"""

from __future__ import annotations

import argparse
import sys

import cli_support
import hf_reference
import logprob_compare
import model_source
import openai_server
import tolerances
from port_compare import format_report, read_prompts, run_compare

EXIT_CODES = {1: "DIVERGED: MAX and HF disagree beyond the tolerance", 2: "not used"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser, trust_remote_code=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=cli_support.port_number, help="port of a MAX server on 127.0.0.1")
    where.add_argument("--base-url", help="base URL of a MAX server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--slug", default=None,
                        help="served model name to query (the port's slug); default: the only model served")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="file with one prompt per line (# starts a comment)")
    parser.add_argument("--reference", default=None,
                        help="use this checkpoint as the HF side instead of MODEL (tokenizer still from MODEL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="HF dtype; also picks the tolerance (default: float32)")
    hf_reference.add_attn_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device for HF: cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--top-k", type=int, default=tolerances.TOP_K,
                        help=f"top-k size for the overlap and tie checks, at most {openai_server.MAX_TOP_K} "
                        f"(default: {tolerances.TOP_K})")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens MAX generates (default: 8)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="encode prompts as plain text even when the tokenizer has a chat template")
    parser.add_argument("--layer-stats", action="store_true",
                        help="also report HF per-layer hidden-state stats (norms, NaN/Inf counts)")
    parser.add_argument("--timeout", type=cli_support.positive_seconds, default=openai_server.REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help=f"seconds to wait for each MAX completion (default: {openai_server.REQUEST_TIMEOUT:g})")
    cli_support.add_json_flag(parser)


def main(args: argparse.Namespace) -> int:
    base_url = (openai_server.check_base_url(args.base_url) if args.base_url is not None
                else f"http://{openai_server.HOST}:{args.port}")
    # No --prompt/--prompts-file: None, so that run_compare adds the replica's window probe to the battery.
    prompts = read_prompts(args.prompt, args.prompts_file) if args.prompt or args.prompts_file else None
    model_source.read_config(model_source.resolve(args.model, args.revision))  # MODEL is named before the server
    hint = openai_server.serve_hint(args.model, None, args.port) + (" --port-dir <port folder>" if args.slug else "")
    report = run_compare(args.model, base_url, args.slug, prompts, dtype=args.dtype, device=args.device,
                         reference=args.reference, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                         chat_template=not args.no_chat_template, trust_remote_code=args.trust_remote_code,
                         layer_stats=args.layer_stats, revision=args.revision, hint=hint,
                         request_timeout=args.timeout, attn_implementation=args.attn_implementation)
    if args.json:
        cli_support.print_json(report.to_dict())
    else:
        print(format_report(report))
    return cli_support.EXIT_OK if report.verdict == logprob_compare.MATCH else cli_support.EXIT_FINDINGS


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
