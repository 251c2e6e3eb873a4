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

Public API::

    import compare_layers
    report = compare_layers.run_compare(model, base_url, served_name, prompts=None,
                                        dtype="float32", device="cpu", reference=None,
                                        top_k=5, max_new_tokens=8, chat_template=True,
                                        trust_remote_code=False, layer_stats=False,
                                        attn_implementation="eager")
    report.verdict, report.first_divergence, report.max_abs_diff, report.to_dict()
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

import cli_support
import hf_reference
import input_files
import logprob_compare
import model_source
import serve_port
import tolerances
from cli_support import ScriptError

EXIT_CODES = {1: "DIVERGED: MAX and HF disagree beyond the tolerance", 2: "not used"}

MAX_TOP_K = 7  # MAX 26.7 caps logprobs at 7
REQUEST_TIMEOUT = 600.0  # seconds per completion request (a cold CPU request can take minutes)
MODELS_TIMEOUT = 5.0  # seconds for /v1/models, which a running MAX server answers at once
# Larger answers than these are not a MAX server's: /v1/models is a short list, and an echo
# completion with top-7 logprobs is about 1 KB per token.
MAX_MODELS_RESPONSE_BYTES = 1024 * 1024
MAX_COMPLETION_RESPONSE_BYTES = 256 * 1024 * 1024

# A small coherence battery: short, varied prompts (facts, counting, code, story).
COHERENCE_BATTERY = (
    "The capital of France is",
    "One two three four five six",
    "def add(a, b):",
    "Once upon a time there was a little robot who",
    "The quick brown fox jumps over the",
)


@dataclass
class ServerCheck:
    """What the pre-flight check learned about the server."""

    base_url: str
    served_name: str
    served_models: list[str]
    max_model_len: int | None


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
            "total_seconds": round(self.total_seconds, 2),
        }


# --- HTTP ---------------------------------------------------------------------------


def _read_json_answer(url: str, request: urllib.request.Request | str, timeout: float, limit: int,
                      unreachable: str | None = None) -> Any:
    """Send one request and parse its JSON answer; ScriptError naming the URL for every other outcome.

    ``unreachable`` is the message when nothing listens there (connection refused, unknown host).
    """
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", errors="replace")
        raise ScriptError(f"the server answered HTTP {exc.code} to {url}: {' '.join(detail.split())}") from None
    except TimeoutError:
        raise ScriptError(f"the server did not answer {url} within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise ScriptError(f"the server did not answer {url} within {timeout:g} s") from None
        if unreachable and isinstance(exc.reason, OSError):
            raise ScriptError(unreachable) from None
        raise ScriptError(f"request to {url} failed: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        if unreachable and isinstance(exc, ConnectionRefusedError):
            raise ScriptError(unreachable) from None
        raise ScriptError(f"request to {url} failed: {type(exc).__name__} {exc}".strip()) from None
    except ValueError as exc:  # e.g. an out-of-range port in --base-url
        raise ScriptError(f"cannot send a request to {url}: {exc}") from None
    if len(raw) > limit:
        raise ScriptError(f"the server's answer to {url} is larger than {limit} bytes; it is not a MAX server")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        start = " ".join(raw[:40].decode("utf-8", errors="replace").split())
        raise ScriptError(f"the server answered {url} with something that is not JSON (starts {start!r}); "
                          "is it a MAX server?") from None


def _post_json(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    document = _read_json_answer(url, request, timeout, MAX_COMPLETION_RESPONSE_BYTES)
    if not isinstance(document, dict):
        raise ScriptError(f"the server answered {url} with {input_files.json_type_name(document)}, "
                          "expected a JSON object")
    return document


def completion(base_url: str, served_name: str, prompt_ids: list[int], top_k: int, max_new_tokens: int,
               timeout: float = REQUEST_TIMEOUT) -> dict:
    """POST /v1/completions with token ids, echo, logprobs, token ids returned and greedy decoding."""
    return _post_json(f"{base_url}/v1/completions", {
        "model": served_name,
        "prompt": prompt_ids,
        "echo": True,
        "logprobs": top_k,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }, timeout)


@dataclass
class MaxScores:
    """MAX's answer for one sequence, aligned to scored positions 1..T-1."""

    prompt_ids: list[int]
    generated_ids: list[int]
    logprobs: list[float]
    top: list[dict[str, float]]


def _answer_field(value: Any, name: str, kind: type, default: Any = None) -> Any:
    """One field of a completion answer, refused (naming it) when it has the wrong JSON type."""
    if value is None and default is not None:
        return default
    if not isinstance(value, kind):
        raise ScriptError(f"unexpected completion response from MAX: {name} is {input_files.json_type_name(value)}, "
                          f"expected {input_files.json_type_name(kind())}")
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    ids = _answer_field(value, name, list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ScriptError(f"unexpected completion response from MAX: {name} holds something other than "
                          "token ids (whole numbers >= 0)")
    return ids


def _is_logprob(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value <= 0


def parse_completion(response: dict, prompt_ids: list[int]) -> MaxScores:
    """Pull ids and per-position logprobs out of an echo completion (prompt position 0 has none)."""
    response = _answer_field(response, "the answer", dict)
    choices = _answer_field(response.get("choices"), "choices", list)
    if not choices:
        raise ScriptError("unexpected completion response from MAX: choices is empty")
    choice = _answer_field(choices[0], "choices[0]", dict)
    echoed = _token_ids(choice.get("prompt_token_ids"), "prompt_token_ids") or list(prompt_ids)
    generated = _token_ids(choice.get("token_ids"), "token_ids")
    if "logprobs" not in choice:
        raise ScriptError("unexpected completion response from MAX: choices[0] has no logprobs")
    logprobs = _answer_field(choice["logprobs"], "logprobs", dict, {})
    values = list(_answer_field(logprobs.get("token_logprobs"), "token_logprobs", list, []))
    tops = list(_answer_field(logprobs.get("top_logprobs"), "top_logprobs", list, []))
    if echoed != list(prompt_ids):
        raise ScriptError("MAX echoed different prompt token ids than it was sent; is --enable-echo on?")
    total = len(prompt_ids) + len(generated)
    # Echo may or may not include a placeholder for position 0; keep the last T-1 entries.
    if values and values[0] is None:
        values, tops = values[1:], tops[1:] if len(tops) == len(values) + 1 or len(tops) == total else tops
    if len(values) == total:
        values, tops = values[1:], tops[1:]
    if len(tops) == total:
        tops = tops[1:]
    if len(values) != total - 1 or len(tops) != total - 1:
        raise ScriptError(
            f"MAX returned {len(values)} logprobs and {len(tops)} top-k maps for {total} tokens; "
            "is the server started with --enable-echo (use the serve command)?"
        )
    bad = next((i for i, v in enumerate(values) if not _is_logprob(v)), None)
    if bad is not None:
        raise ScriptError(f"unexpected completion response from MAX: token_logprobs[{bad + 1}] is "
                          f"{values[bad]!r}, expected a log probability (a number <= 0)")
    for position, top in enumerate(tops, 1):
        if top is not None and not (isinstance(top, dict)
                                    and all(isinstance(k, str) and _is_logprob(v) for k, v in top.items())):
            raise ScriptError(f"unexpected completion response from MAX: top_logprobs[{position}] is not an object "
                              "of token text -> log probability")
    return MaxScores(list(prompt_ids), generated, [float(v) for v in values], [dict(t or {}) for t in tops])


# --- pre-flight ---------------------------------------------------------------------


def served_models(base_url: str, hint: str, timeout: float = MODELS_TIMEOUT) -> list[dict[str, Any]]:
    """The ``data`` entries of GET /v1/models, each with a string ``id``; ScriptError for any other answer."""
    url = f"{base_url}/v1/models"
    document = _read_json_answer(url, url, timeout, MAX_MODELS_RESPONSE_BYTES,
                                 unreachable=f"no MAX server answers at {base_url}; start one with: {hint}")
    if not isinstance(document, dict):
        raise ScriptError(f"the server answered {url} with {input_files.json_type_name(document)}, expected an "
                          "object with a 'data' list; is it a MAX server?")
    data = document.get("data")
    if not isinstance(data, list):
        raise ScriptError(f"the server's answer to {url} has no 'data' list (data is "
                          f"{input_files.json_type_name(data)}); is it a MAX server?")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ScriptError(f"the server's answer to {url}: data[{index}] has no string 'id'; is it a MAX server?")
    return data


def check_server(base_url: str, served_name: str | None, hint: str, timeout: float = MODELS_TIMEOUT) -> ServerCheck:
    """Fail fast (exit 3) unless the server answers /v1/models and serves ``served_name``."""
    models = served_models(base_url, hint, timeout)
    names = [m["id"] for m in models]
    if served_name is None:
        if len(names) != 1:
            raise ScriptError(f"the server at {base_url} serves {names}; name one with --slug")
        served_name = names[0]
    elif served_name not in names:
        raise ScriptError(
            f"the server at {base_url} serves {names}, not {served_name!r}; pass the right --slug or restart it "
            f"with: {hint}"
        )
    lengths = [m.get("max_model_len") for m in models if m["id"] == served_name]
    max_model_len = (int(lengths[0]) if lengths and isinstance(lengths[0], int) and not isinstance(lengths[0], bool)
                     and lengths[0] > 0 else None)
    return ServerCheck(base_url, served_name, names, max_model_len)


def check_answer(answer: MaxScores, index: dict[str, list[int]], vocab_size: int, hint: str) -> None:
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


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """Token ids for one prompt, through the chat template when the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        if isinstance(encoded, dict) or hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return [int(i) for i in encoded]
    return [int(i) for i in tokenizer.encode(prompt)]


# --- HF side ------------------------------------------------------------------------


def load_tokenizer(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    location = model_source.resolve(model, revision).location
    try:
        return AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a one-line exit 3
        raise ScriptError(f"cannot load the tokenizer of {model}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def load_hf_model(model: str, revision: str | None, dtype: str, device: str, trust_remote_code: bool,
                  attn_implementation: str = hf_reference.DEFAULT_ATTN_IMPLEMENTATION) -> Any:
    """The HF reference for ``model``, through hf_reference (eager attention unless asked otherwise)."""
    location = model_source.resolve(model, revision).location
    return hf_reference.load(location, dtype=dtype, device=device, attn_implementation=attn_implementation,
                             revision=revision, trust_remote_code=trust_remote_code, label=model)


def hf_forward(hf: Any, token_ids: list[int], device: str, layer_stats: bool) -> tuple[Any, list[dict] | None]:
    """HF log-softmax rows for positions 1..T-1 from one forward pass (and per-layer stats on request)."""
    import torch

    with torch.no_grad():
        inputs = torch.tensor([token_ids], device=device)
        output = hf(input_ids=inputs, output_hidden_states=layer_stats)
        logits = output.logits[0, :-1].float()
        rows = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
    stats = hidden_state_stats(output.hidden_states) if layer_stats else None
    return rows, stats


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
    request_timeout: float = REQUEST_TIMEOUT,
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
    if not 1 <= top_k <= MAX_TOP_K:
        raise ScriptError(f"--top-k must be between 1 and {MAX_TOP_K} (MAX caps logprobs at {MAX_TOP_K})")
    if max_new_tokens < 1:
        raise ScriptError("--max-new-tokens must be 1 or more")
    hf_reference.check_attn_implementation(attn_implementation)
    base_url = base_url.rstrip("/")
    hint = hint or serve_port.serve_hint(model)
    check = check_server(base_url, served_name, hint)
    source = model_source.resolve(model, revision)
    tokenizer = load_tokenizer(model, revision, trust_remote_code)
    vocab_size = max(int(model_source.text_config(model_source.read_config(source)).get("vocab_size") or 0),
                     len(tokenizer))
    decoded = _decode_each(tokenizer, vocab_size)
    index = logprob_compare.text_index(decoded)

    texts = read_prompts(prompts, None) if prompts is None else list(prompts)
    encoded = [encode_prompt(tokenizer, text, chat_template) for text in texts]
    for text, ids in zip(texts, encoded):
        if len(ids) < 2:
            raise ScriptError(f"prompt {text!r} is {len(ids)} token(s); need at least 2 to score a position")
        if check.max_model_len and len(ids) + max_new_tokens > check.max_model_len:
            raise ScriptError(f"prompt {text[:40]!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it "
                              f"exceeds the server's max_model_len {check.max_model_len}")
    answers = []
    for ids in encoded:  # every MAX request happens before any HF weights load
        answer = parse_completion(completion(base_url, check.served_name, ids, top_k, max_new_tokens,
                                             request_timeout), ids)
        check_answer(answer, index, vocab_size, hint)
        answers.append(answer)

    report = CompareReport(model=model, reference=reference or model, base_url=base_url,
                           served_name=check.served_name, dtype=dtype, atol=tolerances.logprob_atol(dtype),
                           top_k=top_k, attn_implementation=attn_implementation)
    hf_started = time.monotonic()
    hf = load_hf_model(reference or model, revision if reference is None else None, dtype, device, trust_remote_code,
                       attn_implementation)
    report.hf_load_seconds = time.monotonic() - hf_started
    decoded += [""] * (hf_vocab_rows(hf, tokenizer) - len(decoded))  # padded output rows decode to nothing
    forwards = [hf_forward(hf, answer.prompt_ids + answer.generated_ids, device, layer_stats) for answer in answers]
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


def hf_vocab_rows(hf: Any, tokenizer: Any) -> int:
    """Number of rows in HF's output distribution (the ids the text index must cover)."""
    return int(hf.get_output_embeddings().weight.shape[0]) if hf.get_output_embeddings() is not None else len(tokenizer)


def _decode_each(tokenizer: Any, count: int) -> list[str]:
    # MAX decodes each top-k id on its own (skipping special tokens); mirror that.
    return tokenizer.batch_decode([[i] for i in range(count)], skip_special_tokens=True)


# --- output ---------------------------------------------------------------------------


def format_report(report: CompareReport, tokenizer_decode: Any = None, all_positions: bool = False) -> str:
    """Human-readable summary and per-position table."""
    lines = [f"verdict: {report.verdict}   max |Δ logprob| {report.max_abs_diff:.3g} (tolerance {report.atol:g}, "
             f"{report.dtype})", f"served: {report.served_name} at {report.base_url}; HF reference: {report.reference} "
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
    return "\n".join(lines)


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
                        help=f"top-k size for the overlap and tie checks, at most {MAX_TOP_K} (default: {tolerances.TOP_K})")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens MAX generates (default: 8)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="encode prompts as plain text even when the tokenizer has a chat template")
    parser.add_argument("--layer-stats", action="store_true",
                        help="also report HF per-layer hidden-state stats (norms, NaN/Inf counts)")
    parser.add_argument("--timeout", type=cli_support.positive_seconds, default=REQUEST_TIMEOUT, metavar="SECONDS",
                        help=f"seconds to wait for each MAX completion (default: {REQUEST_TIMEOUT:g})")
    cli_support.add_json_flag(parser)


def check_base_url(url: str) -> str:
    """An http(s) URL with a host, without its trailing slash; ScriptError naming --base-url otherwise."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ScriptError(f"--base-url {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ScriptError(f"--base-url {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    if port == 0:
        raise ScriptError(f"--base-url {url!r}: port 0 is not a server port")
    if parts.query or parts.fragment:
        raise ScriptError(f"--base-url {url!r}: give the server's base URL without a query or fragment")
    return url.strip().rstrip("/")


def main(args: argparse.Namespace) -> int:
    base_url = check_base_url(args.base_url) if args.base_url is not None else f"http://{serve_port.HOST}:{args.port}"
    prompts = read_prompts(args.prompt, args.prompts_file)
    model_source.read_config(model_source.resolve(args.model, args.revision))  # MODEL is named before the server
    hint = serve_port.serve_hint(args.model, None, args.port) + (" --port-dir <port folder>" if args.slug else "")
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
