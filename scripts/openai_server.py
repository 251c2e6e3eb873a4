"""Talking to a running MAX server's OpenAI-compatible API: find it, check what it serves, ask for logprobs.

compare, eval and the gates' verify phase all query a server the same way:
``check_server`` (GET /v1/models: the server answers and serves the expected
name), ``completion`` (POST /v1/completions with token ids, echo and top-k
logprobs, greedy) and ``parse_completion`` (MAX's answer aligned to scored
positions). Every answer is type-checked; anything that is not a MAX
server's answer is a one-line ScriptError naming the URL or field.

Imports neither torch nor max.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import input_files
from cli_support import ScriptError

HOST = "127.0.0.1"  # every server the skill starts listens on loopback only


def serve_hint(model: str, port_dir: str | os.PathLike | None = None, port: int | None = None) -> str:
    """The serve command to suggest to a user (dispatcher form)."""
    parts = ["python scripts/import_model.py serve", str(model)]
    if port_dir is not None:
        parts += ["--port-dir", str(port_dir).rstrip("/")]
    if port is not None:
        parts += ["--port", str(port)]
    return " ".join(parts)


MAX_TOP_K = 7  # MAX 26.7 caps logprobs at 7


REQUEST_TIMEOUT = 600.0  # seconds per completion request (a cold CPU request can take minutes)


MODELS_TIMEOUT = 5.0  # seconds for /v1/models, which a running MAX server answers at once


# Larger answers than these are not a MAX server's: /v1/models is a short list, and an echo
# completion with top-7 logprobs is about 1 KB per token.
MAX_MODELS_RESPONSE_BYTES = 1024 * 1024


MAX_COMPLETION_RESPONSE_BYTES = 256 * 1024 * 1024


@dataclass
class ServerCheck:
    """What the pre-flight check learned about the server."""

    base_url: str
    served_name: str
    served_models: list[str]
    max_model_len: int | None


def read_json_answer(url: str, request: urllib.request.Request | str, timeout: float, limit: int,
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


def post_json(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    document = read_json_answer(url, request, timeout, MAX_COMPLETION_RESPONSE_BYTES)
    if not isinstance(document, dict):
        raise ScriptError(f"the server answered {url} with {input_files.json_type_name(document)}, "
                          "expected a JSON object")
    return document


def completion(base_url: str, served_name: str, prompt_ids: list[int], top_k: int, max_new_tokens: int,
               timeout: float = REQUEST_TIMEOUT) -> dict:
    """POST /v1/completions with token ids, echo, logprobs, token ids returned and greedy decoding."""
    return post_json(f"{base_url}/v1/completions", {
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
            "is the server started with --enable-echo and --no-enable-prefix-caching (use the serve command; "
            "with prefix caching a repeated long prompt is echoed only past its cached pages)?"
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


def served_models(base_url: str, hint: str, timeout: float = MODELS_TIMEOUT) -> list[dict[str, Any]]:
    """The ``data`` entries of GET /v1/models, each with a string ``id``; ScriptError for any other answer."""
    url = f"{base_url}/v1/models"
    document = read_json_answer(url, url, timeout, MAX_MODELS_RESPONSE_BYTES,
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


def check_base_url(url: str) -> str:
    """An http(s) URL with a host, without its trailing slash; ScriptError naming --base-url otherwise."""
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
