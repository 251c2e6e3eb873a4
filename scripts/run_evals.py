"""Run lm-eval tasks on the served port and on the transformers reference, side by side (the eval tier).

Each task runs twice through EleutherAI's lm-eval: once against the running MAX
server through lm-eval's OpenAI-compatible completions backend
(``local-completions``; loglikelihood needs the server's echo, which `serve`
turns on), and once against the HF reference loaded by scripts/hf_reference.py
(eager attention, float32 unless --dtype), which scores the very same token ids
(the same tokenizer and lm-eval's own request encoding on both sides). The
table shows every metric per side with lm-eval's standard error, the
difference and the paired standard error; the per-sample loglikelihood
differences and generated token ids are compared too.

Verdict rule: on a replica (MODEL's folder holds tiny_replica.json) MISMATCH
when any per-sample loglikelihood differs by more than
``tolerances.LOGPROB_ATOL[dtype]``, or any chosen answer or generated token id
differs; on a real checkpoint MISMATCH when a metric differs by more than k
times its paired standard error (--k, default 2). --control adds a second
server (a native MAX model with the same serve flags) and its own HF
reference: when the control fails the same way, suspect MAX, not the port
(references/eval-isolation.md).

Tasks are names lm-eval knows, the shipped offline tasks in
scripts/eval_tasks/ (``import_model_mc``, ``import_model_gen``), or paths to
task YAML files. Task data comes from the datasets cache under the usual
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE rules; a task whose data cannot be read
offline is exit 3.
"""

from __future__ import annotations

import argparse
import enum
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cli_support
import hf_reference
import model_source
import openai_server
import tolerances
from cli_support import ScriptError

EXIT_CODES = {1: "MISMATCH: the port and transformers disagree (replica: per sample; real checkpoint: beyond k "
                 "paired standard errors)", 2: "not used"}

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
SHIPPED_TASKS = ("import_model_mc", "import_model_gen")
REPLICA_MANIFEST = "tiny_replica.json"
ISOLATION_DOC = "references/eval-isolation.md"

DEFAULT_K = 2.0  # two paired standard errors: about a 95% two-sided band for a mean difference
# lm-eval bootstraps the stderr of metrics that are not means (its default, 100000 resamples, takes
# minutes); the shipped and common tasks use means, whose stderr is closed-form.
BOOTSTRAP_ITERS = 1000
# lm-eval's API model sends one request at a time and retries a failed one; a MAX server that failed
# once is not going to answer the same request differently, so one retry is enough.
MAX_RETRIES = 2
# Context window when the server does not report max_model_len (lm-eval's own default).
DEFAULT_MAX_LENGTH = 2048
PROBE_TEXT = "The capital of France is Paris."  # echo probe: a short text every tokenizer splits into tokens
SEED = 0  # lm-eval's python, numpy, torch and few-shot seeds: both sides draw the same few-shot examples
WORST_SAMPLES_SHOWN = 5  # per task in the text report; --json holds every sample


class Verdict(str, enum.Enum):
    MATCH = "MATCH"
    MISMATCH = "MISMATCH"


class Rule(str, enum.Enum):
    """Which exit rule applies: per sample on a replica, k paired standard errors on a real checkpoint."""

    REPLICA_PER_SAMPLE = "replica-per-sample"
    PAIRED_STDERR = "paired-stderr"


class Isolation(str, enum.Enum):
    """What the control says about a mismatch (references/eval-isolation.md)."""

    NO_CONTROL = "no-control"
    PORT_MATCHES = "port-matches"
    PORT_SIDE = "port-side"  # the port mismatches, the control matches its reference
    MAX_SIDE = "max-side"  # the control fails the same way: suspect MAX


# --- inputs (checked before any heavy import) ----------------------------------------------------


def parse_task_specs(values: Sequence[str] | None) -> list[str]:
    """Task names or YAML paths from repeated or comma-separated --tasks (default: the shipped tasks)."""
    specs = [part.strip() for value in (values or []) for part in value.split(",")]
    if values and not all(specs):
        raise ScriptError("--tasks holds an empty task name")
    specs = specs or list(SHIPPED_TASKS)
    for spec in specs:
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise ScriptError(f"--tasks {spec}: no such task YAML file")
    return list(dict.fromkeys(specs))


def is_replica(model: str) -> bool:
    """True when MODEL is a local folder made by `tiny` (it holds tiny_replica.json)."""
    return (Path(model).expanduser() / REPLICA_MANIFEST).is_file()


def check_model(model: str, revision: str | None, flag: str = "MODEL") -> str:
    """The local folder transformers loads MODEL from; ScriptError (exit 3) when it has no config."""
    source = model_source.resolve(model, revision)
    model_source.read_config(source)
    if Path(str(model)).expanduser().is_file():
        raise ScriptError(f"{flag} {model} is a file; name the model folder")
    return source.location


@dataclass
class Endpoint:
    """One MAX server: its base URL and the served name to query."""

    base_url: str
    served_name: str | None
    max_model_len: int | None = None


def endpoint_from(port: int | None, base_url: str | None, slug: str | None) -> Endpoint:
    url = openai_server.check_base_url(base_url) if base_url is not None else f"http://{openai_server.HOST}:{port}"
    return Endpoint(url, slug)


# --- lm-eval --------------------------------------------------------------------------------------


def quiet_lm_eval() -> None:
    """Keep lm-eval's and datasets' INFO logging and progress bars off stderr (errors still show)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request progress bars
    for name in ("lm_eval", "lm-eval", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lm_eval")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def task_manager(specs: Sequence[str]) -> Any:
    """An lm-eval TaskManager that knows the shipped tasks; lm-eval's own index only when a name needs it."""
    from lm_eval.tasks import TaskManager

    needs_index = any(spec not in SHIPPED_TASKS and not spec.endswith((".yaml", ".yml")) for spec in specs)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_index)


def load_tasks(manager: Any, specs: Sequence[str]) -> dict[str, Any]:
    """task name -> lm-eval Task, with their data read; ScriptError (exit 3) for unknown tasks or missing data."""
    tasks: dict[str, Any] = {}
    for spec in specs:
        try:
            loaded = manager.load([spec])["tasks"]
        except KeyError:
            raise ScriptError(f"unknown task {spec!r}: lm-eval has no task, group or tag of that name (the shipped "
                              f"tasks are {', '.join(SHIPPED_TASKS)})") from None
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            raise ScriptError(f"task {spec!r}: its data is not available offline ({first_line(exc)}); fetch it "
                              "once with network access into the datasets cache, or unset HF_HUB_OFFLINE") from None
        except Exception as exc:  # noqa: BLE001 - a task config lm-eval cannot build is a one-line exit 3
            raise ScriptError(f"task {spec!r} cannot be loaded: {type(exc).__name__}: {first_line(exc)}") from None
        tasks.update(loaded)
    if not tasks:
        raise ScriptError(f"--tasks {','.join(specs)} names no task")
    return tasks


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(exc).__name__


def output_types(tasks: dict[str, Any]) -> dict[str, str]:
    return {name: task.OUTPUT_TYPE for name, task in tasks.items()}


LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


def completion_classes() -> tuple[type, type]:
    """(ServedLM, ReferenceLM): lm-eval model classes built on its completions backend.

    Both share lm-eval's tokenization and request encoding; ServedLM sends the
    requests to MAX and ReferenceLM scores the same token ids with the HF model.
    Both record the generated token ids of each generation request by context.
    """
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class RecordingLM(LocalCompletionsAPI):
        """Records the generated token ids of every generation request, by its context string."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.generated_ids: dict[str, list[int] | None] = {}
            self.aligned = 0  # echo answers that needed the position-0 null (ServedLM)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood(requests, disable_tqdm=True)  # no progress bar on stderr

        def parse_generations(self, outputs: Any, contexts: Sequence[str] | None = None, **kwargs: Any) -> list:
            texts = LocalCompletionsAPI.parse_generations(outputs)
            answers = outputs if isinstance(outputs, list) else [outputs]
            choices = [c for out in answers for c in sorted(out["choices"], key=lambda c: c["index"])]
            for context, choice in zip(contexts or [], choices):
                ids = choice.get("token_ids")
                self.generated_ids[context] = [int(i) for i in ids] if isinstance(ids, list) else None
            return texts

    class ServedLM(RecordingLM):
        """lm-eval's local-completions model, also asking MAX for the generated token ids.

        MAX 26.7 echoes one logprob per prompt token after the first, without the OpenAI null for
        position 0; lm-eval would then read every continuation shifted by one token. Such answers get
        the null inserted before lm-eval parses them.
        """

        def parse_logprobs(self, outputs: Any, tokens: list[list[int]] | None = None,
                           ctxlens: list[int] | None = None, **kwargs: Any) -> list:
            answers = outputs if isinstance(outputs, list) else [outputs]
            choices = [c for out in answers for c in sorted(out["choices"], key=lambda c: c["index"])]
            for choice, sent in zip(choices, tokens or []):
                logprobs = choice.get("logprobs") or {}
                values = logprobs.get("token_logprobs")
                if isinstance(values, list) and len(values) == len(sent) and (not values or values[0] is not None):
                    logprobs["token_logprobs"] = [None] + values
                    logprobs["top_logprobs"] = [None] + list(logprobs.get("top_logprobs") or [])
                    self.aligned += 1
            return LocalCompletionsAPI.parse_logprobs(outputs=outputs, tokens=tokens, ctxlens=ctxlens, **kwargs)

        def _create_payload(self, messages: Any, generate: bool = False, gen_kwargs: dict | None = None,
                            seed: int = 1234, eos: Any = None, **kwargs: Any) -> dict:
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed,
                                              eos=eos, **kwargs)
            if generate:
                payload["return_token_ids"] = True
            return payload

    class ReferenceLM(RecordingLM):
        """The HF reference behind lm-eval's completions request encoding (no HTTP)."""

        def __init__(self, hf_model: Any, device: str, **kwargs: Any):
            super().__init__(**kwargs)
            self.hf_model = hf_model
            self.torch_device = device
            self.spreads: list[float] = []

        def _loglikelihood_tokens(self, requests: list, **kwargs: Any) -> list[tuple[float, bool]]:
            inputs, ctxlens, _keys = self.batch_loglikelihood_requests([requests])
            return [self.score(tokens, ctxlen) for tokens, ctxlen in zip(inputs, ctxlens)]

        def score(self, tokens: list[int], ctxlen: int) -> tuple[float, bool]:
            """Sum of the continuation's token logprobs given the context, and whether each was the argmax."""
            import hf_reference

            rows = hf_reference.logprob_rows(self.hf_model, tokens, self.torch_device)
            self.spreads.append(hf_reference.reference_spread(rows[:-1]) if len(tokens) > 1 else 0.0)
            total, greedy = 0.0, True
            for position in range(max(ctxlen, 1), len(tokens)):
                row = rows[position - 1]
                total += float(row[tokens[position]])
                greedy = greedy and int(row.argmax()) == tokens[position]
            return total, greedy

        def model_call(self, messages: Any, *, generate: bool = True, gen_kwargs: dict | None = None,
                       **kwargs: Any) -> dict:
            """Answer a generation request the way a completions server would: greedy, cut at a stop string."""
            if not generate:
                raise NotImplementedError("the reference scores loglikelihood requests in _loglikelihood_tokens")
            payload = self._create_payload(self.create_message(messages), generate=True,
                                           gen_kwargs=dict(gen_kwargs or {}), seed=self._seed, eos=self.eos_string)
            prompts = payload["prompt"] if payload["prompt"] and isinstance(payload["prompt"][0], list) \
                else [payload["prompt"]]
            choices = []
            for index, prompt in enumerate(prompts):
                ids, text = self.greedy(list(prompt), int(payload["max_tokens"]), payload.get("stop") or [])
                choices.append({"index": index, "text": text, "token_ids": ids})
            return {"choices": choices}

        def greedy(self, prompt: list[int], max_tokens: int, stops: Sequence[str]) -> tuple[list[int], str]:
            """Greedy ids up to max_tokens, EOS or the first token whose text completes a stop string."""
            import torch

            eos = self.tokenizer.eos_token_id
            ids: list[int] = []
            with torch.no_grad():
                for _ in range(max_tokens):
                    logits = self.hf_model(input_ids=torch.tensor([prompt + ids], device=self.torch_device)).logits
                    token = int(logits[0, -1].double().argmax())
                    ids.append(token)
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
                    if cut >= 0:
                        return ids, text[:cut]
                    if token == eos:
                        break
            return ids, self.tokenizer.decode(ids, skip_special_tokens=True)

    return ServedLM, ReferenceLM


def lm_arguments(served_name: str, tokenizer: str, max_length: int, timeout: float,
                 trust_remote_code: bool) -> dict:
    """The completions-backend arguments both sides share (tokenizer, encoding, lengths)."""
    return {"model": served_name, "tokenizer": tokenizer, "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "max_length": max_length, "num_concurrent": 1, "batch_size": 1,
            "max_retries": MAX_RETRIES, "timeout": int(math.ceil(timeout)), "trust_remote_code": trust_remote_code}


def evaluate(lm: Any, tasks: dict[str, Any], limit: int | None) -> dict:
    """One lm-eval run with per-sample logging; ScriptError naming the cause when it fails."""
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, log_samples=True,
                                  bootstrap_iters=BOOTSTRAP_ITERS, random_seed=SEED, numpy_random_seed=SEED,
                                  torch_random_seed=SEED, fewshot_random_seed=SEED)
    except ScriptError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request or a task error is a one-line exit 3
        raise ScriptError(f"lm-eval failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not results:
        raise ScriptError("lm-eval returned no results")
    return results


# --- the server ------------------------------------------------------------------------------------


def check_server(endpoint: Endpoint, hint: str) -> Endpoint:
    """The server answers /v1/models and serves the name asked for (exit 3 otherwise, within seconds)."""
    check = openai_server.check_server(endpoint.base_url, endpoint.served_name, hint)
    return Endpoint(endpoint.base_url, check.served_name, check.max_model_len)


class EchoLayout(str, enum.Enum):
    """How a server lays out echoed prompt logprobs for T prompt tokens and 1 generated token."""

    OPENAI = "openai"  # T + 1 entries, the first null: the layout lm-eval's completions backend reads
    NO_PLACEHOLDER = "no-placeholder"  # T entries, no null for position 0 (MAX 26.7); eval inserts the null


def echo_layout(endpoint: Endpoint, prompt_ids: list[int], timeout: float) -> tuple[EchoLayout | None, str]:
    """The server's echo layout, or (None, why it does not echo)."""
    url = f"{endpoint.base_url}/v1/completions"
    body = {"model": endpoint.served_name, "prompt": prompt_ids, "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}
    try:
        answer = openai_server.post_json(url, body, timeout)
    except ScriptError as exc:
        return None, f"it refused an echo request ({exc})"
    try:
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None, "its answer to an echo request has no choices[0].logprobs.token_logprobs"
    if not isinstance(values, list) or len(values) <= 1:
        return None, "it returned logprobs for the generated token only, not for the prompt"
    if len(values) == len(prompt_ids) + 1 and values[0] is None:
        return EchoLayout.OPENAI, ""
    if len(values) == len(prompt_ids) and values[0] is not None:
        return EchoLayout.NO_PLACEHOLDER, ""
    return None, (f"its echo returns {len(values)} logprobs for {len(prompt_ids)} prompt tokens and 1 generated "
                  "token, a layout eval cannot align")


# --- comparison ------------------------------------------------------------------------------------


@dataclass
class SampleDiff:
    """One document of one task, served vs reference."""

    task: str
    doc_id: int
    kind: str  # "loglikelihood" or "generation"
    served: Any
    reference: Any
    abs_diff: float = 0.0  # largest |Δ loglikelihood| over the document's requests
    changed_choice: bool = False
    changed_ids: bool = False
    first_changed_token: int | None = None
    detail: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.changed_choice or self.changed_ids) and self.abs_diff <= self.detail.get("atol", math.inf)

    def to_dict(self) -> dict:
        return {"task": self.task, "doc_id": self.doc_id, "kind": self.kind, "served": self.served,
                "reference": self.reference, "abs_diff": self.abs_diff, "changed_choice": self.changed_choice,
                "changed_ids": self.changed_ids, "first_changed_token": self.first_changed_token, "ok": self.ok,
                **self.detail}


@dataclass
class MetricRow:
    """One metric of one task on both sides, with the paired standard error and its verdict."""

    task: str
    metric: str
    served: float | None
    served_stderr: float | None
    reference: float | None
    reference_stderr: float | None
    n: int
    paired_stderr: float | None
    k: float
    rule: Rule = Rule.PAIRED_STDERR
    control: float | None = None
    control_stderr: float | None = None
    control_reference: float | None = None

    @property
    def diff(self) -> float | None:
        if self.served is None or self.reference is None:
            return None
        return self.served - self.reference

    @property
    def verdict(self) -> Verdict:
        """On a replica the metric must be identical on both sides; on a real checkpoint within k paired SE."""
        if self.rule is Rule.REPLICA_PER_SAMPLE:
            return Verdict.MATCH if self.diff == 0 else Verdict.MISMATCH
        return Verdict.MATCH if within_k_stderr(self.diff, self.paired_stderr, self.k) else Verdict.MISMATCH

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "served": self.served, "served_stderr": self.served_stderr,
                "reference": self.reference, "reference_stderr": self.reference_stderr, "diff": self.diff,
                "n": self.n, "paired_stderr": self.paired_stderr, "k": self.k, "verdict": self.verdict.value,
                "control": self.control, "control_stderr": self.control_stderr,
                "control_reference": self.control_reference}


def within_k_stderr(diff: float | None, paired_stderr: float | None, k: float) -> bool:
    """The real-checkpoint rule: |diff| <= k * paired stderr; an exact 0 always passes, a missing side never."""
    if diff is None or not math.isfinite(diff):
        return False
    if diff == 0:
        return True
    return paired_stderr is not None and math.isfinite(paired_stderr) and abs(diff) <= k * paired_stderr


def paired_stderr(served: Sequence[float], reference: Sequence[float]) -> float | None:
    """Standard error of the mean per-sample difference (None with fewer than 2 samples)."""
    diffs = [float(a) - float(b) for a, b in zip(served, reference)]
    if len(diffs) < 2:
        return None
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def samples_by_doc(results: dict, task: str) -> dict[int, dict]:
    return {int(s["doc_id"]): s for s in (results.get("samples") or {}).get(task, [])}


def loglikelihoods(sample: dict) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) of every request of one loglikelihood sample, in request order."""
    pairs = []
    for response in sample.get("resps") or []:
        value = response[0] if isinstance(response, (list, tuple)) and response else response
        if isinstance(value, (list, tuple)):
            pairs.append((float(value[0]), bool(value[1]) if len(value) > 1 else False))
        else:
            pairs.append((float(value), False))
    return pairs


def argmax(values: Sequence[float]) -> int | None:
    return max(range(len(values)), key=lambda i: values[i]) if values else None


def generated_text(sample: dict) -> str | None:
    responses = sample.get("filtered_resps") or []
    value = responses[0] if responses else None
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def sample_context(sample: dict) -> str | None:
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else None
    if isinstance(first, dict):  # lm-eval may log arguments as {"gen_args_0": {"arg_0": ...}}
        first = list(first.values())[0] if first else None
        if isinstance(first, dict):
            first = list(first.values())
    return first[0] if isinstance(first, (list, tuple)) and first and isinstance(first[0], str) else None


def compare_samples(task: str, kind: str, served: dict, reference: dict, served_ids: dict, reference_ids: dict,
                    atol: float) -> list[SampleDiff]:
    """Per-document comparison of one task's logged samples."""
    diffs = []
    for doc_id in sorted(set(served) | set(reference)):
        s, r = served.get(doc_id), reference.get(doc_id)
        if s is None or r is None:
            diffs.append(SampleDiff(task, doc_id, kind, None if s is None else "present",
                                    None if r is None else "present", math.inf, True, True,
                                    detail={"atol": atol, "missing": "served" if s is None else "reference"}))
            continue
        if kind == "loglikelihood":
            ls, lr = loglikelihoods(s), loglikelihoods(r)
            values_s, values_r = [v for v, _ in ls], [v for v, _ in lr]
            deltas = [abs(a - b) for a, b in zip(values_s, values_r)]
            worst = max(deltas, default=0.0) if len(values_s) == len(values_r) else math.inf
            diffs.append(SampleDiff(
                task, doc_id, kind, values_s, values_r, worst if all(map(math.isfinite, deltas)) else math.inf,
                changed_choice=argmax(values_s) != argmax(values_r),
                detail={"atol": atol, "served_choice": argmax(values_s), "reference_choice": argmax(values_r),
                        "served_greedy": [g for _, g in ls], "reference_greedy": [g for _, g in lr],
                        "deltas": deltas}))
        else:
            context = sample_context(s)
            ids_s, ids_r = served_ids.get(context), reference_ids.get(context)
            text_s, text_r = generated_text(s), generated_text(r)
            first = next((i for i, (a, b) in enumerate(zip(ids_s or [], ids_r or [])) if a != b), None)
            if first is None and ids_s is not None and ids_r is not None and len(ids_s) != len(ids_r):
                first = min(len(ids_s), len(ids_r))
            # The ids decide: MAX's streaming detokenizer holds back a trailing partial UTF-8 character
            # that transformers' decode shows as U+FFFD, so equal ids can give texts that differ at the end.
            changed = ids_s is None or ids_r is None or first is not None
            diffs.append(SampleDiff(task, doc_id, kind, ids_s, ids_r, 0.0, changed_choice=False, changed_ids=changed,
                                    first_changed_token=first,
                                    detail={"atol": atol, "served_text": text_s, "reference_text": text_r,
                                            "text_differs": text_s != text_r, "ids_returned": ids_s is not None}))
    return diffs


def metric_value(results: dict, task: str, metric: str) -> tuple[float | None, float | None]:
    """lm-eval's aggregate value and stderr of ``metric`` (filter "none" first) for ``task``."""
    table = (results.get("results") or {}).get(task, {})
    for key, value in table.items():
        name, _, filter_name = key.partition(",")
        if name == metric and not name.endswith("_stderr"):
            stderr = table.get(f"{metric}_stderr,{filter_name}")
            return as_float(value), as_float(stderr)
    return None, None


def as_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_rows(task: str, served: dict, reference: dict, served_results: dict, reference_results: dict,
                k: float, rule: Rule = Rule.PAIRED_STDERR) -> list[MetricRow]:
    """One row per per-sample metric of ``task`` (acc, acc_norm, exact_match ...)."""
    docs = sorted(set(served) & set(reference))
    metrics = []
    for sample in list(served.values())[:1]:
        metrics = [m for m in sample.get("metrics") or [] if isinstance(sample.get(m), (int, float, bool))]
    rows = []
    for metric in metrics:
        per_s = [float(served[d][metric]) for d in docs]
        per_r = [float(reference[d][metric]) for d in docs]
        value_s, err_s = metric_value(served_results, task, metric)
        value_r, err_r = metric_value(reference_results, task, metric)
        rows.append(MetricRow(task, metric, value_s, err_s, value_r, err_r, len(docs), paired_stderr(per_s, per_r), k,
                              rule))
    return rows


@dataclass
class SideBySide:
    """Everything one served model vs its reference produced."""

    rule: Rule
    atol: float
    samples: list[SampleDiff]
    metrics: list[MetricRow]

    @property
    def max_abs_diff(self) -> float:
        return max((s.abs_diff for s in self.samples if s.kind == "loglikelihood"), default=0.0)

    @property
    def verdict(self) -> Verdict:
        rows_match = all(row.verdict is Verdict.MATCH for row in self.metrics)
        if self.rule is Rule.REPLICA_PER_SAMPLE:
            return Verdict.MATCH if rows_match and all(s.ok for s in self.samples) else Verdict.MISMATCH
        return Verdict.MATCH if rows_match else Verdict.MISMATCH


def side_by_side(types: dict[str, str], served_results: dict, reference_results: dict, served_ids: dict,
                 reference_ids: dict, rule: Rule, atol: float, k: float) -> SideBySide:
    samples, metrics = [], []
    for task, output_type in types.items():
        kind = "loglikelihood" if output_type in LOGLIKELIHOOD_TYPES else "generation"
        s, r = samples_by_doc(served_results, task), samples_by_doc(reference_results, task)
        samples += compare_samples(task, kind, s, r, served_ids, reference_ids, atol)
        metrics += metric_rows(task, s, r, served_results, reference_results, k, rule)
    return SideBySide(rule, atol, samples, metrics)


def isolation(port: Verdict, control: Verdict | None) -> Isolation:
    if control is None:
        return Isolation.NO_CONTROL
    if port is Verdict.MATCH:
        return Isolation.PORT_MATCHES
    return Isolation.MAX_SIDE if control is Verdict.MISMATCH else Isolation.PORT_SIDE


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Side:
    """One model to run: where it is served and where its HF reference is."""

    model: str
    location: str
    reference: str
    reference_location: str
    endpoint: Endpoint
    hint: str
    echo_layout: EchoLayout | None = None


def prepare(side: Side, timeout: float, trust_remote_code: bool, echo_needed: bool, label: str) -> None:
    """Check that the tokenizer loads and, for loglikelihood tasks, that the server echoes (exit 3 otherwise)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(side.location, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ScriptError(f"cannot load the tokenizer of {side.model}: {first_line(exc)}") from None
    if echo_needed:
        probe = [int(i) for i in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]]
        layout, problem = echo_layout(side.endpoint, probe, timeout)
        side.echo_layout = layout
        if layout is None:
            raise ScriptError(f"{label} server at {side.endpoint.base_url} does not echo prompt logprobs ({problem}); "
                              f"loglikelihood tasks need echo: start it with {side.hint}")


def run_side(side: Side, tasks_for: Any, limit: int | None, dtype: str, device: str, timeout: float,
             trust_remote_code: bool) -> tuple[dict, dict, dict, dict, dict]:
    """The served run, then the reference run, of one model; timings (and the reference spread) last."""
    ServedLM, ReferenceLM = completion_classes()
    max_length = side.endpoint.max_model_len or DEFAULT_MAX_LENGTH
    shared = lm_arguments(side.endpoint.served_name, side.location, max_length, timeout, trust_remote_code)
    timings = {}
    started = time.monotonic()
    served_lm = ServedLM(base_url=f"{side.endpoint.base_url}/v1/completions", **shared)
    served_results = evaluate(served_lm, tasks_for(), limit)
    timings["served_seconds"] = round(time.monotonic() - started, 2)
    timings["echo_answers_aligned"] = served_lm.aligned
    started = time.monotonic()
    hf_model = load_reference(side.reference, dtype, device, trust_remote_code)
    timings["hf_load_seconds"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    reference_lm = ReferenceLM(hf_model=hf_model, device=device, **shared)
    reference_results = evaluate(reference_lm, tasks_for(), limit)
    timings["reference_seconds"] = round(time.monotonic() - started, 2)
    if reference_lm.spreads:
        import hf_reference

        spread = statistics.fmean(reference_lm.spreads)
        if hf_reference.is_flat(spread):
            raise ScriptError(f"{side.reference}: " + hf_reference.flat_reason(spread, len(reference_lm.spreads)))
        timings["reference_spread"] = round(spread, 4)
    return served_results, reference_results, served_lm.generated_ids, reference_lm.generated_ids, timings


def load_reference(model: str, dtype: str, device: str, trust_remote_code: bool) -> Any:
    """The HF reference through scripts/hf_reference.py (eager attention, float32 unless --dtype)."""
    return hf_reference.load_model(model, None, dtype, device, trust_remote_code)


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.limit is not None and args.limit < 1:
        raise ScriptError(f"--limit {args.limit} is not 1 or more")
    k = args.k
    if not (isinstance(k, float) and math.isfinite(k) and k > 0):
        raise ScriptError(f"--k {k} is not a finite number above 0")
    dtype = tolerances.canonical_dtype(args.dtype)
    atol = tolerances.logprob_atol(dtype)
    specs = parse_task_specs(args.tasks)
    location = check_model(args.model, args.revision)
    reference = args.reference or args.model
    reference_location = check_model(reference, None, "--reference") if args.reference else location
    port = Side(args.model, location, reference, reference_location,
                endpoint_from(args.port, args.base_url, args.slug),
                openai_server.serve_hint(args.model, None, args.port) + (" --port-dir <port folder>" if args.slug else ""))
    control = None
    if args.control is not None:
        if args.control_port is None and args.control_base_url is None:
            raise ScriptError("--control needs --control-port or --control-base-url (the native model's server)")
        control_location = check_model(args.control, None, "--control")
        control = Side(args.control, control_location, args.control, control_location,
                       endpoint_from(args.control_port, args.control_base_url, args.control_slug),
                       openai_server.serve_hint(args.control, None, args.control_port))
    elif args.control_port is not None or args.control_base_url is not None or args.control_slug is not None:
        raise ScriptError("--control-port, --control-base-url and --control-slug need --control MODEL")

    quiet_lm_eval()
    manager = task_manager(specs)
    types = output_types(load_tasks(manager, specs))
    port.endpoint = check_server(port.endpoint, port.hint)
    if control is not None:
        control.endpoint = check_server(control.endpoint, control.hint)
    echo_needed = any(t in LOGLIKELIHOOD_TYPES for t in types.values())
    rule = Rule.REPLICA_PER_SAMPLE if is_replica(args.model) else Rule.PAIRED_STDERR

    def tasks_for() -> dict[str, Any]:
        return load_tasks(manager, specs)

    for side, label in ((port, "the port's"), (control, "the control's")):
        if side is not None:  # every server is checked before the first long run
            prepare(side, args.timeout, args.trust_remote_code, echo_needed, label)
    common = dict(limit=args.limit, dtype=dtype, device=args.device, timeout=args.timeout,
                  trust_remote_code=args.trust_remote_code)
    served, ref, served_ids, ref_ids, timings = run_side(port, tasks_for, **common)
    result = side_by_side(types, served, ref, served_ids, ref_ids, rule, atol, k)
    control_result, control_timings = None, None
    if control is not None:
        c_served, c_ref, c_ids, c_ref_ids, control_timings = run_side(control, tasks_for, **common)
        control_rule = Rule.REPLICA_PER_SAMPLE if is_replica(args.control) else Rule.PAIRED_STDERR
        control_result = side_by_side(types, c_served, c_ref, c_ids, c_ref_ids, control_rule, atol, k)
        by_key = {(row.task, row.metric): row for row in control_result.metrics}
        for row in result.metrics:
            other = by_key.get((row.task, row.metric))
            if other is not None:
                row.control, row.control_stderr, row.control_reference = \
                    other.served, other.served_stderr, other.reference
    report = {
        "verdict": result.verdict.value,
        "rule": rule.value,
        "k": k,
        "atol": atol,
        "dtype": dtype,
        "max_abs_diff": result.max_abs_diff,
        "model": args.model,
        "reference": reference,
        "base_url": port.endpoint.base_url,
        "served_name": port.endpoint.served_name,
        "echo_layout": port.echo_layout.value if port.echo_layout else None,
        "tasks": types,
        "limit": args.limit,
        "metrics": [row.to_dict() for row in result.metrics],
        "samples": [s.to_dict() for s in result.samples],
        "mismatched_samples": sum(not s.ok for s in result.samples),
        "control": None if control is None else {
            "model": control.model, "base_url": control.endpoint.base_url,
            "served_name": control.endpoint.served_name, "verdict": control_result.verdict.value,
            "rule": control_result.rule.value, "max_abs_diff": control_result.max_abs_diff,
            "mismatched_samples": sum(not s.ok for s in control_result.samples),
            "samples": [s.to_dict() for s in control_result.samples], "timings": control_timings},
        "isolation": isolation(result.verdict, control_result.verdict if control_result else None).value,
        "isolation_doc": ISOLATION_DOC,
        "timings": {**timings, "total_seconds": round(time.monotonic() - started, 2)},
    }
    if args.json:
        cli_support.print_json(report)
    else:
        print(format_report(report))
    return cli_support.EXIT_OK if result.verdict is Verdict.MATCH else cli_support.EXIT_FINDINGS


# --- output --------------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(metrics: Sequence[dict], with_control: bool) -> list[str]:
    """The side-by-side metric table (one row per task and metric)."""
    header = f"{'task':<20} {'metric':<12} {'MAX':>8} {'±stderr':>8} {'HF':>8} {'±stderr':>8} {'Δ':>8} " \
             f"{'paired se':>9} {'verdict':<8}"
    if with_control:
        header += f" {'control':>8} {'ctl HF':>8}"
    lines = [header]
    for row in metrics:
        line = (f"{row['task']:<20} {row['metric']:<12} {_num(row['served']):>8} {_num(row['served_stderr']):>8} "
                f"{_num(row['reference']):>8} {_num(row['reference_stderr']):>8} {_num(row['diff'], '+.4f'):>8} "
                f"{_num(row['paired_stderr']):>9} {row['verdict']:<8}")
        if with_control:
            line += f" {_num(row['control']):>8} {_num(row['control_reference']):>8}"
        lines.append(line)
    return lines


def format_report(report: dict) -> str:
    rule = ("replica: every per-sample loglikelihood within the tolerance, same choices and generated ids"
            if report["rule"] == Rule.REPLICA_PER_SAMPLE.value
            else f"real checkpoint: every metric within {report['k']:g} paired standard errors")
    lines = [f"verdict: {report['verdict']}   ({rule})",
             f"served: {report['served_name']} at {report['base_url']}; HF reference: {report['reference']} "
             f"({report['dtype']}); per-sample max |Δ loglikelihood| {report['max_abs_diff']:.3g} (tolerance "
             f"{report['atol']:g}); {report['mismatched_samples']} sample(s) differ", ""]
    lines += format_table(report["metrics"], report["control"] is not None)
    for task in report["tasks"]:
        samples = [s for s in report["samples"] if s["task"] == task]
        worst = sorted(samples, key=lambda s: (s["ok"], -s["abs_diff"]))[:WORST_SAMPLES_SHOWN]
        lines += ["", f"{task}: {len(samples)} sample(s), worst first"]
        for s in worst:
            mark = "ok" if s["ok"] else "DIFFERS"
            if s["kind"] == "loglikelihood":
                lines.append(f"  doc {s['doc_id']:4d}  max |Δ| {s['abs_diff']:.3g}  choice MAX {s.get('served_choice')} "
                             f"HF {s.get('reference_choice')}  {mark}")
            else:
                lines.append(f"  doc {s['doc_id']:4d}  ids MAX {s['served']} HF {s['reference']}"
                             + (f" (first differs at {s['first_changed_token']})"
                                if s["first_changed_token"] is not None else "") + f"  {mark}")
    control = report["control"]
    if control is not None:
        lines += ["", f"control: {control['model']} at {control['base_url']}: {control['verdict']} against its own HF "
                      f"reference (max |Δ| {control['max_abs_diff']:.3g}, {control['mismatched_samples']} sample(s) "
                      f"differ); isolation: {report['isolation']} (see {report['isolation_doc']})"]
    lines.append(f"timings: {report['timings']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_support.add_model_arguments(parser, trust_remote_code=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=cli_support.port_number, help="port of the port's MAX server on 127.0.0.1")
    where.add_argument("--base-url", help="base URL of the port's MAX server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--slug", default=None, help="served model name (the port's slug); default: the only one")
    parser.add_argument("--tasks", action="append", default=None, metavar="TASK[,TASK]",
                        help="lm-eval task names or task YAML paths, comma-separated or repeated (default: the "
                             f"shipped offline tasks {','.join(SHIPPED_TASKS)})")
    parser.add_argument("--limit", type=cli_support.positive_int, default=None, metavar="N",
                        help="run only the first N documents of each task")
    parser.add_argument("--k", type=cli_support.positive_float, default=DEFAULT_K,
                        help=f"real checkpoints: a metric may differ by k paired standard errors (default: {DEFAULT_K:g})")
    parser.add_argument("--reference", default=None,
                        help="use this checkpoint as the HF side instead of MODEL (tokenizer still from MODEL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="HF dtype; also picks the per-sample tolerance (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device for HF (default: cpu)")
    parser.add_argument("--control", default=None, metavar="MODEL",
                        help="a native MAX model served with the same flags, run the same way (adds a column)")
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--control-port", type=cli_support.port_number, help="port of the control's MAX server")
    control.add_argument("--control-base-url", help="base URL of the control's MAX server")
    parser.add_argument("--control-slug", default=None, help="served name of the control (default: the only one)")
    parser.add_argument("--timeout", type=cli_support.positive_seconds, default=openai_server.REQUEST_TIMEOUT,
                        metavar="SECONDS", help=f"seconds per request (default: {openai_server.REQUEST_TIMEOUT:g})")
    cli_support.add_json_flag(parser)


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
