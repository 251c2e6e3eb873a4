"""The comparison behind compare: a served MAX model against the HF reference, token by token.

Sends MAX the exact token ids HF uses (echo + logprobs + greedy continuation
at temperature 0), runs HF once per prompt in a single forward pass over the
prompt and MAX's continuation, and compares by token id with
``logprob_compare``. The HF side is ``hf_reference`` (eager float32 unless
asked otherwise; no verdict on a flat reference); the server side is
``openai_server``. Used by the compare script and by ``gates --phase verify``.

Public API::

    import port_compare
    report = port_compare.run_compare(model, base_url, served_name, prompts=None,
                                      dtype="float32", device="cpu", reference=None,
                                      top_k=5, max_new_tokens=8, chat_template=True,
                                      trust_remote_code=False, layer_stats=False,
                                      attn_implementation="eager")
    report.verdict, report.first_divergence, report.max_abs_diff, report.to_dict()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import hf_reference
import input_files
import logprob_compare
import model_source
import openai_server
import reference_cache
import tolerances
from cli_support import ScriptError


REPLICA_MANIFEST = "tiny_replica.json"
# A small coherence battery: short, varied prompts (facts, counting, code, story).
COHERENCE_BATTERY = (
    "The capital of France is",
    "One two three four five six",
    "def add(a, b):",
    "Once upon a time there was a little robot who",
    "The quick brown fox jumps over the",
)


@dataclass
class PromptRun:
    """One prompt: its text, token ids, MAX's continuation and the comparison."""

    prompt: str
    prompt_ids: list[int]
    max_generated_ids: list[int]
    comparison: logprob_compare.SequenceComparison
    layer_stats: list[dict] | None = None


@dataclass
class CompareReport:
    """The result of a comparison over every prompt."""

    model: str
    reference: str
    base_url: str
    served_name: str
    dtype: str
    atol: float
    top_k: int
    runs: list[PromptRun] = field(default_factory=list)
    hf_load_seconds: float = 0.0
    reference_cached: bool = False
    attn_implementation: str = hf_reference.DEFAULT_ATTN_IMPLEMENTATION
    reference_spread: float | None = None  # mean (top - mean) logprob of the reference at the scored positions
    total_seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return logprob_compare.summarize([r.comparison for r in self.runs])[0]

    @property
    def max_abs_diff(self) -> float:
        return logprob_compare.summarize([r.comparison for r in self.runs])[2]

    @property
    def tie_count(self) -> int:
        return logprob_compare.tie_count([r.comparison for r in self.runs])

    @property
    def first_divergence(self) -> dict | None:
        """The first divergent position (prompt index, position, token, both logprobs), or None."""
        for index, run in enumerate(self.runs):
            first = run.comparison.first_divergence
            if first is not None:
                tokens = run.prompt_ids + run.max_generated_ids
                return {"prompt_index": index, "prompt": run.prompt, **first.__dict__,
                        "context_ids": tokens[max(0, first.position - 8):first.position]}
        return None

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "dtype": self.dtype,
            "first_divergence": self.first_divergence,
            "model": self.model,
            "reference": self.reference,
            "base_url": self.base_url,
            "served_name": self.served_name,
            "top_k": self.top_k,
            "attn_implementation": self.attn_implementation,
            "reference_spread": self.reference_spread,
            "flat_reference_threshold": tolerances.FLAT_REFERENCE_SPREAD,
            "tie_count": self.tie_count,
            "position_indexing": "position p is the p-th token (0-based) of prompt then MAX's greedy tokens; "
                                 "position 0 has no logprob; the score at p is log P(token p | tokens < p)",
            "prompts": [
                {"prompt": r.prompt, "prompt_ids": r.prompt_ids, "max_generated_ids": r.max_generated_ids,
                 **r.comparison.to_dict(), **({"layer_stats": r.layer_stats} if r.layer_stats is not None else {})}
                for r in self.runs
            ],
            "hf_load_seconds": round(self.hf_load_seconds, 2),
            "reference_cached": self.reference_cached,
            "total_seconds": round(self.total_seconds, 2),
        }


# --- pre-flight ---------------------------------------------------------------------


def check_answer(answer: openai_server.MaxScores, index: dict[str, list[int]], vocab_size: int, hint: str) -> None:
    """The token-id round trip: MAX echoed our ids (checked in parse_completion), and every id it
    generated and every top-k text it returned exists in the HF tokenizer's vocabulary.

    An id beyond the served model's vocabulary crashes MAX 26.7's model worker, so the vocab
    size is checked this way rather than by sending the highest id.
    """
    beyond = [i for i in answer.generated_ids if i >= vocab_size]
    if beyond:
        raise ScriptError(f"MAX generated token ids {beyond[:3]} beyond the HF vocab size {vocab_size}; "
                          f"the server serves another model (start the right one with: {hint})")
    unknown = sorted({text for top in answer.top for text in top if text not in index})
    if unknown:
        raise ScriptError(f"MAX's top-k holds texts the HF tokenizer never decodes to (e.g. {unknown[0]!r}); "
                          f"the server uses another tokenizer (start the right one with: {hint})")


# --- prompts ------------------------------------------------------------------------


def window_prompts(source: model_source.ModelSource, config: dict[str, Any] | None = None) -> list[str]:
    """The replica's probe prompt when the model has a sliding window (the battery is shorter than any window).

    ``tiny`` writes a prompt of at least twice the window into ``tiny_replica.json``; without it, positions
    past the window are never scored and a port that ignores the window matches.
    """
    import model_anatomy

    config = model_source.read_config(source) if config is None else config
    if not model_anatomy.config_view(config).sliding_window or not source.local_dir:
        return []
    manifest = Path(source.local_dir) / REPLICA_MANIFEST
    if not manifest.is_file():
        return []
    document = input_files.load_json(manifest, REPLICA_MANIFEST)
    prompt = document.get("prompt") if isinstance(document, dict) else None
    return [prompt] if isinstance(prompt, str) and prompt.strip() else []


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt, --prompts-file (one per non-empty line, # comments), or the battery."""
    collected = list(prompts or [])
    if any(not prompt.strip() for prompt in collected):
        raise ScriptError("--prompt is empty; give some text")
    if prompts_file is not None:
        text = input_files.read_text(prompts_file, "--prompts-file")
        if "\0" in text:
            raise ScriptError(f"--prompts-file {prompts_file} holds NUL bytes; it is not a text file")
        from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ScriptError(f"--prompts-file {prompts_file} holds no prompts")
        collected += from_file
    return collected or list(COHERENCE_BATTERY)


# --- HF side ------------------------------------------------------------------------


def hf_forward(hf: Any, token_ids: list[int], device: str, layer_stats: bool) -> tuple[Any, list[dict] | None]:
    """HF log-softmax rows for positions 1..T-1 from one forward pass (and per-layer stats on request)."""
    rows, hidden_states = hf_reference.forward(hf, token_ids, device, hidden_states=layer_stats)
    return rows[:-1], (hidden_state_stats(hidden_states) if layer_stats else None)


def hidden_state_stats(hidden_states: Sequence[Any]) -> list[dict]:
    """Per layer output (index 0 = embeddings): mean token L2 norm, max |x|, NaN and Inf counts."""
    stats = []
    for index, state in enumerate(hidden_states):
        values = state[0].float()
        finite = values[values.isfinite()]
        stats.append({
            "layer": index,
            "mean_token_norm": float(values.norm(dim=-1).mean()),
            "max_abs": float(finite.abs().max()) if finite.numel() else float("nan"),
            "nan": int(values.isnan().sum()),
            "inf": int(values.isinf().sum()),
        })
    return stats


# --- the comparison ------------------------------------------------------------------


def run_compare(
    model: str,
    base_url: str,
    served_name: str | None,
    prompts: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    reference: str | None = None,
    top_k: int = tolerances.TOP_K,
    max_new_tokens: int = 8,
    chat_template: bool = True,
    trust_remote_code: bool = False,
    layer_stats: bool = False,
    revision: str | None = None,
    hint: str | None = None,
    request_timeout: float = openai_server.REQUEST_TIMEOUT,
    attn_implementation: str = hf_reference.DEFAULT_ATTN_IMPLEMENTATION,
) -> CompareReport:
    """Check the server, query MAX for every prompt, run HF once per prompt, and compare.

    Raises ScriptError before any HF weights load when the server is not
    running, serves another name, or disagrees on the token ids; and before
    any verdict when the reference is flat (hf_reference.check_not_flat).
    """
    started = time.monotonic()
    try:
        dtype = tolerances.canonical_dtype(dtype)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None
    if not 1 <= top_k <= openai_server.MAX_TOP_K:
        top = openai_server.MAX_TOP_K
        raise ScriptError(f"--top-k must be between 1 and {top} (MAX caps logprobs at {top})")
    if max_new_tokens < 1:
        raise ScriptError("--max-new-tokens must be 1 or more")
    hf_reference.check_attn_implementation(attn_implementation)
    base_url = base_url.rstrip("/")
    hint = hint or openai_server.serve_hint(model)
    check = openai_server.check_server(base_url, served_name, hint)
    source = model_source.resolve(model, revision)
    tokenizer = hf_reference.load_tokenizer(model, revision, trust_remote_code)
    config = model_source.read_config(source)
    vocab_size = max(int(model_source.text_config(config).get("vocab_size") or 0),
                     len(tokenizer))
    decoded = _decode_each(tokenizer, vocab_size)
    index = logprob_compare.text_index(decoded)

    texts = read_prompts(prompts, None) if prompts is None else list(prompts)
    if prompts is None:
        texts += window_prompts(source, config)
    encoded = [hf_reference.encode_prompt(tokenizer, text, chat_template) for text in texts]
    for text, ids in zip(texts, encoded):
        if len(ids) < 2:
            raise ScriptError(f"prompt {text!r} is {len(ids)} token(s); need at least 2 to score a position")
        if check.max_model_len and len(ids) + max_new_tokens > check.max_model_len:
            raise ScriptError(f"prompt {text[:40]!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it "
                              f"exceeds the server's max_model_len {check.max_model_len}")
    answers = []
    for ids in encoded:  # every MAX request happens before any HF weights load
        reply = openai_server.completion(base_url, check.served_name, ids, top_k, max_new_tokens, request_timeout)
        answer = openai_server.parse_completion(reply, ids)
        check_answer(answer, index, vocab_size, hint)
        answers.append(answer)

    report = CompareReport(model=model, reference=reference or model, base_url=base_url,
                           served_name=check.served_name, dtype=dtype, atol=tolerances.logprob_atol(dtype),
                           top_k=top_k, attn_implementation=attn_implementation)
    sequences = [answer.prompt_ids + answer.generated_ids for answer in answers]
    cache_key = _cache_key(reference or model, revision if reference is None else None, dtype=dtype, device=device,
                           attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                           layer_stats=layer_stats)
    forwards, vocab_rows = _cached_forwards(cache_key, sequences)
    if forwards is not None:
        report.reference_cached = True
    else:
        hf_started = time.monotonic()
        hf = hf_reference.load_model(reference or model, revision if reference is None else None, dtype, device,
                                     trust_remote_code, attn_implementation)
        report.hf_load_seconds = time.monotonic() - hf_started
        vocab_rows = hf_vocab_rows(hf, tokenizer)
        forwards = [hf_forward(hf, ids, device, layer_stats) for ids in sequences]
        _store_forwards(cache_key, sequences, forwards, vocab_rows)
    decoded += [""] * (vocab_rows - len(decoded))  # padded output rows decode to nothing
    import numpy as np

    # No verdict on a flat reference: every port would match it.
    report.reference_spread = hf_reference.check_not_flat(np.concatenate([rows for rows, _ in forwards]))
    for text, answer, (rows, stats) in zip(texts, answers, forwards):
        sequence = answer.prompt_ids + answer.generated_ids
        tops = [logprob_compare.resolve_top(top, index) for top in answer.top]
        comparison = logprob_compare.compare_sequence(sequence, len(answer.prompt_ids), rows, answer.logprobs, tops,
                                                      report.atol, top_k, decoded)
        report.runs.append(PromptRun(text, answer.prompt_ids, answer.generated_ids, comparison, stats))
    report.total_seconds = time.monotonic() - started
    return report


def _cache_key(model: str, revision: str | None, *, trust_remote_code: bool, layer_stats: bool,
               **settings: Any) -> str | None:
    """The reference cache key, or None when this run must load HF (remote code, layer stats, not a folder)."""
    if trust_remote_code or layer_stats:
        return None
    try:
        location = model_source.resolve(model, revision).location
    except ScriptError:
        return None
    return reference_cache.model_fingerprint(location, **settings)


def _cached_forwards(key: str | None, sequences: list[list[int]]) -> tuple[list[tuple[Any, None]] | None, int]:
    """Every sequence's HF rows from the reference cache, or (None, 0) when any one is missing."""
    found = [reference_cache.load_rows(key, ids) for ids in sequences]
    if key is None or any(entry is None for entry in found):
        return None, 0
    return [(rows, None) for rows, _ in found], max(vocab for _, vocab in found)


def _store_forwards(key: str | None, sequences: list[list[int]], forwards: list[tuple[Any, Any]],
                    vocab_rows: int) -> None:
    for ids, (rows, _stats) in zip(sequences, forwards):
        reference_cache.store_rows(key, ids, rows, vocab_rows)


def hf_vocab_rows(hf: Any, tokenizer: Any) -> int:
    """Number of rows in HF's output distribution (the ids the text index must cover)."""
    return int(hf.get_output_embeddings().weight.shape[0]) if hf.get_output_embeddings() is not None else len(tokenizer)


def _decode_each(tokenizer: Any, count: int) -> list[str]:
    # MAX decodes each top-k id on its own (skipping special tokens); mirror that.
    return tokenizer.batch_decode([[i] for i in range(count)], skip_special_tokens=True)


# --- output ---------------------------------------------------------------------------


def headline(report: CompareReport) -> str:
    """The verdict in one line: MATCH or DIVERGED, with the first divergence, max |Δ| and the tolerance."""
    first = report.first_divergence
    where = (f" at prompt {first['prompt_index']} position {first['position']} ({first['phase']}, "
             f"{first['reason']}; token {first['token_id']} HF {first['hf_logprob']:.5f} MAX "
             f"{first['max_logprob']:.5f})" if first else "")
    return (f"verdict: {report.verdict}{where}   max |Δ logprob| {report.max_abs_diff:.3g} "
            f"(tolerance {report.atol:g}, {report.dtype})")


def format_report(report: CompareReport, tokenizer_decode: Any = None, all_positions: bool = False) -> str:
    """Human-readable summary and per-position table, opened and closed by the :func:`headline`
    (a long table must not hide the verdict, dogfood)."""
    lines = [headline(report), f"served: {report.served_name} at {report.base_url}; HF reference: {report.reference} "
             f"({report.dtype}, attention {report.attn_implementation}, spread "
             f"{'-' if report.reference_spread is None else format(report.reference_spread, '.3g')})",
             f"ties: {report.tie_count} position(s) accepted as ties (top-1 or greedy token differs, every logprob "
             "within tolerance)",
             "positions: p-th token (0-based) of prompt then greedy; position 0 has no logprob; "
             "top1 mark =: same, !: differs, ?: HF's top-1 may hide under a text key several ids share"]
    first = report.first_divergence
    if first:
        lines.append(
            f"first divergence: prompt {first['prompt_index']} position {first['position']} ({first['phase']}, "
            f"{first['reason']}): token {first['token_id']} HF {first['hf_logprob']:.5f} MAX {first['max_logprob']:.5f} "
            f"|Δ| {first['abs_diff']:.3g}; HF top-1 {first['hf_top1']} MAX top-1 {first['max_top1']}")
    for index, run in enumerate(report.runs):
        comparison = run.comparison
        lines.append("")
        lines.append(f"prompt {index}: {run.prompt!r} ({len(run.prompt_ids)} tokens, {len(run.max_generated_ids)} "
                     f"generated) {comparison.verdict} max |Δ| {comparison.max_abs_diff:.3g}"
                     + (f"; ties at positions {comparison.ties}" if comparison.ties else ""))
        lines.append("   pos  phase   token   HF logprob  MAX logprob      |Δ|  top1 HF/MAX   overlap  ok")
        for p in comparison.positions:
            mark = ("ok (tie)" if p.tie else "ok") if p.ok else f"NO ({p.reason})"
            agree = {True: "=", False: "!", None: "?"}[p.top1_agree]
            lines.append(f"  {p.position:4d}  {p.phase:6s} {p.token_id:6d}  {p.hf_logprob:11.5f}  {p.max_logprob:11.5f}"
                         f"  {p.abs_diff:7.1e}  {p.hf_top1:>5}/{str(p.max_top1):<5}{agree}  {p.topk_overlap:7d}  {mark}")
        for stat in run.layer_stats or []:
            lines.append(f"    layer {stat['layer']:3d}: mean norm {stat['mean_token_norm']:.4g}  max|x| "
                         f"{stat['max_abs']:.4g}  NaN {stat['nan']}  Inf {stat['inf']}")
    lines += ["", headline(report)]
    return "\n".join(lines)
