"""A loopback stand-in for an OpenAI-compatible ``max serve``, for tests of compare's reference handling.

It is NOT MAX. It answers the two endpoints compare uses, in the shape MAX
26.7 answers them (see ``openai_server.parse_completion``):

- ``GET /v1/models``: ``{"data": [{"id": <served name>, "max_model_len": N}]}``;
- ``POST /v1/completions`` with token ids, ``echo``, ``logprobs: k`` (at most
  7), ``max_tokens`` and temperature 0: ``prompt_token_ids``, ``token_ids``
  (the greedy continuation) and ``logprobs`` with ``token_logprobs`` and
  ``top_logprobs`` (position 0 is ``None``), top entries keyed by each id's
  decoded text (ids that decode alike share one key).

The logprobs come from a caller-supplied ``score(token_ids) -> rows``
(float log-softmax rows, one per token), i.e. a second implementation of the
model: the tests use transformers' eager path on the same weights, with the
config edited for the "wrong port" variants. Exact ties are broken towards
the highest id, unlike HF's lowest-id argmax, so tie handling is exercised.

The server binds 127.0.0.1 on a free port the OS picks, answers at most
``max_requests`` requests, and shuts itself down after ``lifetime`` seconds
even if the test forgets to stop it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

import numpy as np

MAX_TOP_ENTRIES = 7  # MAX 26.7 caps logprobs at 7
DEFAULT_LIFETIME = 900.0  # seconds; a module's tests finish well within this
DEFAULT_MAX_REQUESTS = 200
MAX_BODY_BYTES = 1 << 20


def _top_entries(row: np.ndarray, k: int, decoded: Sequence[str]) -> dict[str, float]:
    order = sorted(range(row.shape[0]), key=lambda i: (-row[i], -i))[:k]
    top: dict[str, float] = {}
    for token in order:  # a text shared by several ids keeps the last one's value
        top[decoded[token]] = float(row[token])
    return top


def _greedy(row: np.ndarray) -> int:
    best = row.max()
    return int(np.nonzero(row == best)[0][-1])  # highest id among exact ties


def completion(score: Callable[[list[int]], np.ndarray], decoded: Sequence[str], prompt: list[int], k: int,
               max_tokens: int) -> dict[str, Any]:
    """The completion document for ``prompt``: greedy tokens, echoed logprobs and text-keyed top-k."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(_greedy(np.asarray(score(tokens))[-1]))
    rows = np.asarray(score(tokens))
    values: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    for position in range(1, len(tokens)):
        row = rows[position - 1]
        values.append(float(row[tokens[position]]))
        tops.append(_top_entries(row, k, decoded))
    return {"object": "text_completion", "choices": [{
        "index": 0, "text": "", "finish_reason": "length",
        "prompt_token_ids": list(prompt), "token_ids": tokens[len(prompt):],
        "logprobs": {"token_logprobs": values, "top_logprobs": tops},
    }]}


class OpenAIStandin:
    """One stand-in server; use as a context manager. ``base_url`` and ``served_name`` are what compare needs."""

    def __init__(self, score: Callable[[list[int]], np.ndarray], decoded: Sequence[str], served_name: str,
                 max_model_len: int = 2048, lifetime: float = DEFAULT_LIFETIME,
                 max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        self.score, self.decoded, self.served_name = score, list(decoded), served_name
        self.max_model_len, self.max_requests = max_model_len, max_requests
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "OpenAIStandin":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "OpenAIStandin":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _count(self) -> bool:
                with standin._lock:
                    standin.requests += 1
                    return standin.requests <= standin.max_requests

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._count():
                    return self._send(429, {"error": "request budget spent"})
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, {"error": "not found"})
                self._send(200, {"object": "list", "data": [
                    {"id": standin.served_name, "object": "model", "max_model_len": standin.max_model_len}]})

            def do_POST(self) -> None:  # noqa: N802
                if not self._count():
                    return self._send(429, {"error": "request budget spent"})
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    return self._send(413, {"error": "request too large"})
                body = json.loads(self.rfile.read(length) or b"{}")
                if body.get("model") != standin.served_name:
                    return self._send(404, {"error": f"model {body.get('model')!r} is not served"})
                k = int(body.get("logprobs") or 0)
                if not body.get("echo") or not 1 <= k <= MAX_TOP_ENTRIES:
                    return self._send(400, {"error": "this stand-in answers echo requests with 1..7 logprobs"})
                prompt = [int(i) for i in body["prompt"]]
                self._send(200, completion(standin.score, standin.decoded, prompt, k,
                                           int(body.get("max_tokens") or 1)))

        return Handler
