"""Bad inputs for the metadata scripts (inspect, list-keys, check-walls, list-archs) and for compare's
and layer-diff's own inputs: each ends in one ``<prog>: error:`` line naming the file or field, exit 3
(or 2 where the script defines it), one JSON document under --json, and an unchanged model folder.

Each case is built at run time from a tiny checkpoint (``checkpoint_factory``) copied and then broken.
compare's server cases talk to a stand-in HTTP server on 127.0.0.1 with an OS-chosen port; each
scenario lives under its own URL prefix, and the server stops itself after ``STANDIN_LIFETIME``.
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

import model_source
from bad_inputs import BadCase, check_bad_case
from cli_support import ScriptError

SERVED = "served_slug"
STANDIN_LIFETIME = 900.0  # seconds: longer than this module runs, so a stuck test cannot leave it behind
SLOW_ANSWER = 3.0  # seconds the "slow" scenario waits; the case's --timeout is shorter
DEEP = 100_000  # nesting that Python's JSON parser cannot follow (recursion limit)
SHALLOW_BUT_TOO_DEEP = 200  # parses, but deeper than model_source.MAX_JSON_DEPTH


@dataclass
class Ctx:
    """What a case builder gets: a scratch folder, the checkpoints and the stand-in server."""

    tmp: Path
    base: Path  # single-file safetensors llama, no tokenizer
    with_tokenizer: Path  # llama with a tokenizer (compare)
    bin_only: Path
    server: str  # http://127.0.0.1:<port>

    def copy(self, source: Path | None = None) -> Path:
        folder = self.tmp / "model"
        shutil.copytree(source or self.base, folder, symlinks=True)
        return folder

    def with_config(self, edits: dict | None = None, raw: str | bytes | None = None, remove: tuple = ()) -> Path:
        folder = self.copy()
        path = folder / "config.json"
        if raw is not None:
            path.write_bytes(raw.encode() if isinstance(raw, str) else raw)
        else:
            config = json.loads(path.read_text())
            config.update(edits or {})
            for key in remove:
                config.pop(key, None)
            path.write_text(json.dumps(config))  # json.dumps writes NaN as the literal Python reads back
        return folder

    def with_header(self, header: dict | bytes, data: bytes = b"", length: int | None = None,
                    tail: bytes | None = None) -> Path:
        """A copy whose model.safetensors is replaced by ``header`` (+ ``data``)."""
        folder = self.copy()
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        body = struct.pack("<Q", len(raw) if length is None else length) + raw + data
        (folder / "model.safetensors").write_bytes(body if tail is None else tail)
        return folder

    def with_index(self, index: object) -> Path:
        """A copy with a model.safetensors.index.json (the single file stays as the one real shard)."""
        folder = self.copy()
        (folder / model_source.SAFETENSORS_INDEX).write_text(json.dumps(index))
        return folder


def non_native(folder: Path) -> Path:
    """Rename the architecture so that inspect goes past its native-architecture stop and reads tensors."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["AcmeForCausalLM"]
    path.write_text(json.dumps(config))
    return folder


def tensor(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


Builder = Callable[[Ctx], BadCase]
CASES: dict[str, Builder] = {}


def case(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        assert name not in CASES, name
        CASES[name] = builder
        return builder
    return register


def meta(script: str, model: Path | str, *extra: str, message: tuple[str, ...] = (), exit_code: int = 3,
         env: dict | None = None, protect: list[Path] | None = None) -> BadCase:
    protect = protect if protect is not None else ([Path(model)] if Path(model).exists() else [])
    return BadCase(id="", script=script, args=[str(model), *extra], exit_code=exit_code, message=message,
                   protect=protect, env=env)


# ------------------------------------------------------------------ index (item 1)

@case("index-weight_map-is-a-list")
def _(c):
    return meta("list_checkpoint_keys", c.with_index({"weight_map": ["model.safetensors"]}),
                message=("weight_map", "JSON array"))


@case("index-weight_map-non-string-value")
def _(c):
    return meta("inspect_hf", non_native(c.with_index({"weight_map": {"lm_head.weight": 3}})),
                message=("weight_map['lm_head.weight']",))


@case("index-weight_map-object-value")
def _(c):
    return meta("check_walls", c.with_index({"weight_map": {"lm_head.weight": {"file": "x"}}}),
                message=("weight_map['lm_head.weight']",))


@case("index-shard-dot-dot")
def _(c):
    folder = c.with_index({"weight_map": {"lm_head.weight": "../outside.safetensors"}})
    shutil.copy(folder / "model.safetensors", c.tmp / "outside.safetensors")  # readable, but must not be read
    return meta("list_checkpoint_keys", folder, message=("'../outside.safetensors'", "outside the model folder"),
                protect=[folder, c.tmp / "outside.safetensors"])


@case("index-shard-absolute")
def _(c):
    outside = c.tmp / "abs.safetensors"
    folder = c.with_index({"weight_map": {"lm_head.weight": str(outside)}})
    shutil.copy(folder / "model.safetensors", outside)
    return meta("inspect_hf", non_native(folder), message=("absolute path",))


@case("index-empty-weight_map")
def _(c):
    return meta("list_checkpoint_keys", c.with_index({"weight_map": {}}), message=("empty weight_map",))


@case("index-without-weight_map")
def _(c):
    return meta("check_walls", c.with_index({"metadata": {}}), message=("no weight_map",))


@case("index-shard-not-safetensors")
def _(c):
    return meta("list_checkpoint_keys", c.with_index({"weight_map": {"w": "pytorch_model.bin"}}),
                message=("not a .safetensors file",))


@case("index-is-a-list")
def _(c):
    return meta("list_checkpoint_keys", c.with_index([1, 2]), message=(model_source.SAFETENSORS_INDEX,
                                                                        "not a JSON object"))


@case("index-shard-missing")
def _(c):
    return meta("list_checkpoint_keys", c.with_index({"weight_map": {"w": "model-2.safetensors"}}),
                message=("model-2.safetensors not found",))


# ------------------------------------------------------------------ deep nesting (item 2)

@case("config-nested-past-recursion-limit")
def _(c):
    return meta("inspect_hf", c.with_config(raw='{"architectures": ["LlamaForCausalLM"], "x": '
                                                 + nested(DEEP) + "}"),
                message=("config.json", "nested too deeply"))


@case("config-nested-200-levels")
def _(c):
    return meta("check_walls", c.with_config(raw='{"architectures": ["LlamaForCausalLM"], "x": '
                                                  + nested(SHALLOW_BUT_TOO_DEEP) + "}"),
                message=("config.json", "levels deep"))


@case("header-nested-past-recursion-limit")
def _(c):
    return meta("list_checkpoint_keys", c.with_header(('{"w": ' + nested(DEEP) + "}").encode()),
                message=("model.safetensors", "nested too deeply"))


@case("index-nested-too-deep")
def _(c):
    folder = c.copy()
    (folder / model_source.SAFETENSORS_INDEX).write_text('{"weight_map": ' + nested(DEEP) + "}")
    return meta("list_checkpoint_keys", folder, message=(model_source.SAFETENSORS_INDEX, "nested too deeply"))


# ------------------------------------------------------------------ config field types (item 3)

CONFIG_FIELD_CASES = {
    "rope_theta-string": ({"rope_theta": "ten thousand"}, "rope_theta"),
    "rope_theta-bool": ({"rope_theta": True}, "rope_theta"),
    "rope_theta-list": ({"rope_theta": [10000]}, "rope_theta"),
    "rope_theta-nan": ({"rope_theta": float("nan")}, "rope_theta"),
    "rope_theta-negative": ({"rope_theta": -5}, "rope_theta"),
    "partial_rotary_factor-string": ({"partial_rotary_factor": "half"}, "partial_rotary_factor"),
    "partial_rotary_factor-above-1": ({"partial_rotary_factor": 2.5}, "partial_rotary_factor"),
    "partial_rotary_factor-nan": ({"partial_rotary_factor": float("nan")}, "partial_rotary_factor"),
    "model_type-number": ({"model_type": 7}, "model_type"),
    "model_type-list": ({"model_type": ["llama"]}, "model_type"),
    "num_hidden_layers-string": ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    "hidden_size-fraction": ({"hidden_size": 64.5}, "hidden_size"),
    "num_attention_heads-negative": ({"num_attention_heads": -4}, "num_attention_heads"),
    "vocab_size-bool": ({"vocab_size": True}, "vocab_size"),
    "text_config-string": ({"text_config": "llama"}, "text_config"),
    "text_config-rope_theta-string": ({"text_config": {"rope_theta": "x"}}, "text_config.rope_theta"),
    "rope_scaling-list": ({"rope_scaling": [1, 2]}, "rope_scaling"),
    "rope_scaling-factor-string": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor"),
    "rope_scaling-type-number": ({"rope_scaling": {"type": 3, "factor": 2.0}}, "rope_scaling.type"),
    "rope_parameters-layer-theta-string": (
        {"rope_parameters": {"full_attention": {"rope_theta": "x"}, "sliding_attention": {"rope_theta": 1e4}}},
        "rope_parameters.full_attention.rope_theta"),
    "dtype-object": ({"dtype": {"name": "float32"}}, "dtype"),
    "architectures-second-not-string": ({"architectures": ["LlamaForCausalLM", 5]}, "architectures[1]"),
    "rms_norm_eps-string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
}
for _name, (_edits, _field) in CONFIG_FIELD_CASES.items():
    def _build(c, edits=_edits, field=_field, name=_name):
        script = ("inspect_hf", "check_walls")[len(name) % 2]  # spread the cases over both scripts
        return meta(script, c.with_config(edits), message=("config.json", field))
    case(f"config-{_name}")(_build)


# ------------------------------------------------------------------ safetensors headers (item 4)

@case("header-offsets-past-end")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("F32", [4], [0, 16])}, data=b"\0" * 8),
                "--summary", message=("'w'", "past the end"))


@case("header-offsets-overlap")
def _(c):
    header = {"a": tensor("F32", [2], [0, 8]), "b": tensor("F32", [2], [4, 12])}
    return meta("check_walls", c.with_header(header, data=b"\0" * 12), message=("overlap",))


@case("header-size-inconsistent")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("F32", [4], [0, 8])}, data=b"\0" * 8),
                message=("'w'", "needs 16 bytes"))


@case("header-negative-dimension")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("BF16", [-1, 32768], [0, 0])}), "--summary",
                message=("'w'", "shape"))


@case("header-unknown-dtype")
def _(c):
    return meta("inspect_hf", non_native(c.with_header({"w": tensor("F17", [1], [0, 4])}, data=b"\0" * 4)),
                message=("'w'", "F17"))


@case("header-dtype-number")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor(4, [1], [0, 4])}, data=b"\0" * 4),
                message=("'w'", "dtype"))


@case("header-offsets-reversed")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("F32", [1], [4, 0])}, data=b"\0" * 4),
                message=("data_offsets",))


@case("header-offsets-strings")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("F32", [1], ["0", "4"])}, data=b"\0" * 4),
                message=("data_offsets",))


@case("header-shape-not-a-list")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": tensor("F32", 4, [0, 16])}, data=b"\0" * 16),
                message=("shape",))


@case("header-metadata-list")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"__metadata__": ["pt"], "w": tensor("F32", [1], [0, 4])},
                                                      data=b"\0" * 4), message=("__metadata__",))


@case("header-metadata-non-string-value")
def _(c):
    return meta("check_walls", c.with_header({"__metadata__": {"format": 1}, "w": tensor("F32", [1], [0, 4])},
                                             data=b"\0" * 4), message=("__metadata__",))


@case("header-entry-not-an-object")
def _(c):
    return meta("list_checkpoint_keys", c.with_header({"w": 5}), message=("malformed", "'w'"))


@case("header-truncated")
def _(c):
    return meta("list_checkpoint_keys", c.with_header(b'{"w": {"dtype": "F32"', length=1000),
                message=("truncated safetensors header",))


@case("header-length-huge")
def _(c):
    return meta("inspect_hf", non_native(c.with_header(b"{}", length=2**63)), message=("header length",))


@case("safetensors-empty-file")
def _(c):
    return meta("list_checkpoint_keys", c.with_header(b"", tail=b""), message=("no header length",))


@case("header-not-json")
def _(c):
    return meta("check_walls", c.with_header(b"\xff\xfe not json"), message=("not valid JSON",))


# ------------------------------------------------------------------ files and MODEL (item 6)

@case("config-is-a-list")
def _(c):
    return meta("inspect_hf", c.with_config(raw="[1, 2]"), message=("config.json", "not a JSON object"))


@case("config-is-a-folder")
def _(c):
    folder = c.copy()
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    return meta("check_walls", folder, message=("config.json", "is a folder"))


@case("config-dangling-link")
def _(c):
    folder = c.copy()
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(c.tmp / "gone.json")
    return meta("inspect_hf", folder, message=("config.json", "dangling"))


@case("config-link-loop")
def _(c):
    folder = c.copy()
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("config.json")
    return meta("check_walls", folder, message=("config.json", "loop"))


@case("config-not-utf8")
def _(c):
    return meta("inspect_hf", c.with_config(raw=b'{"architectures": ["\xff\xfe"]}'), message=("config.json", "UTF-8"))


@case("config-empty-file")
def _(c):
    return meta("check_walls", c.with_config(raw=""), message=("config.json", "not valid JSON"))


@case("bin-only-for-list-keys")
def _(c):
    return meta("list_checkpoint_keys", c.bin_only, exit_code=2, message=("no safetensors weights",))


@case("model-dangling-link")
def _(c):
    link = c.tmp / "linked-model"
    link.symlink_to(c.tmp / "nowhere")
    return meta("inspect_hf", link, message=("dangling",), protect=[c.tmp])


@case("model-is-a-plain-file")
def _(c):
    path = c.tmp / "weights.txt"
    path.write_text("x")
    return meta("list_checkpoint_keys", path, message=("not a config.json",), protect=[c.tmp])


@case("model-empty")
def _(c):
    return meta("check_walls", "", message=("MODEL is empty",), protect=[])


@case("revision-on-local-path")
def _(c):
    return meta("inspect_hf", c.base, "--revision", "main", message=("--revision",))


@case("hub-id-offline-not-cached")
def _(c):
    home = c.tmp / "hf_home"
    home.mkdir()
    return meta("list_checkpoint_keys", "acme/not-cached", message=("acme/not-cached", "HF_HUB_OFFLINE"),
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}, protect=[home])


@case("list-keys-limit-zero")
def _(c):
    return meta("list_checkpoint_keys", c.base, "--limit", "0", message=("--limit",))


@case("list-keys-limit-not-a-number")
def _(c):
    return meta("list_checkpoint_keys", c.base, "--limit", "ten", message=("--limit",))


@case("inspect-unknown-donor")
def _(c):
    return meta("inspect_hf", c.with_config({"architectures": ["AcmeForCausalLM"]}), "--donor", "nosuch",
                message=("--donor nosuch",))


# ------------------------------------------------------------------ list-archs

def fake_max(c: Ctx, init: bytes | None) -> dict:
    """PYTHONPATH with a stand-in ``max`` package whose architecture table is ``init`` (None: missing)."""
    table = c.tmp / "fakemax" / "max" / "pipelines" / "architectures"
    table.mkdir(parents=True)
    (table.parent.parent / "__init__.py").write_text("")
    (table.parent / "__init__.py").write_text("")
    if init is not None:
        (table / "__init__.py").write_bytes(init)
    return {"PYTHONPATH": str(c.tmp / "fakemax")}


def archs(c: Ctx, *args: str, message: tuple[str, ...], env: dict | None = None) -> BadCase:
    return BadCase(id="", script="list_native_archs", args=list(args), message=message, env=env, protect=[c.tmp])


@case("list-archs-module-v3-without-donors")
def _(c):
    return archs(c, "--include-module-v3", message=("--include-module-v3",))


@case("list-archs-match-and-donors")
def _(c):
    return archs(c, "--match", "LlamaForCausalLM", "--donors", message=("not allowed with",))


@case("list-archs-table-missing")
def _(c):
    return archs(c, message=("__init__.py is missing",), env=fake_max(c, None))


@case("list-archs-table-not-utf8")
def _(c):
    return archs(c, "--donors", message=("cannot parse",), env=fake_max(c, b"\xff\xfe = 1\n"))


@case("list-archs-table-nul-bytes")
def _(c):
    return archs(c, message=("cannot parse",), env=fake_max(c, b"x = 1\0\n"))


@case("list-archs-table-without-entries")
def _(c):
    return archs(c, "--match", "LlamaForCausalLM", message=("no architecture table",),
                 env=fake_max(c, b"ARCHITECTURES = []\n"))


# ------------------------------------------------------------------ compare: inputs (item 5)

def compare(c: Ctx, *extra: str, scenario: str = "good", message: tuple[str, ...] = (),
            model: Path | None = None, url: bool = True) -> BadCase:
    model = model or c.with_tokenizer
    where = ["--base-url", f"{c.server}/{scenario}"] if url else []
    return BadCase(id="", script="compare_layers", args=[str(model), *where, *extra], message=message,
                   protect=[model, c.tmp], timeout=180)


@case("compare-prompts-file-not-utf8")
def _(c):
    path = c.tmp / "prompts.txt"
    path.write_bytes(b"caf\xe9 au lait\n")
    return compare(c, "--prompts-file", str(path), message=("--prompts-file", "not UTF-8"))


@case("compare-prompts-file-folder")
def _(c):
    return compare(c, "--prompts-file", str(c.tmp), message=("--prompts-file", "is a folder"))


@case("compare-prompts-file-dangling-link")
def _(c):
    link = c.tmp / "prompts.txt"
    link.symlink_to(c.tmp / "gone.txt")
    return compare(c, "--prompts-file", str(link), message=("--prompts-file", "dangling"))


@case("compare-prompts-file-empty")
def _(c):
    path = c.tmp / "prompts.txt"
    path.write_text("")
    return compare(c, "--prompts-file", str(path), message=("holds no prompts",))


@case("compare-prompts-file-only-comments-with-prompt")
def _(c):
    path = c.tmp / "prompts.txt"
    path.write_text("# nothing\n")
    return compare(c, "--prompt", "hi there", "--prompts-file", str(path), message=("holds no prompts",))


@case("compare-prompts-file-missing")
def _(c):
    return compare(c, "--prompts-file", str(c.tmp / "absent.txt"), message=("--prompts-file", "does not exist"))


@case("compare-prompts-file-binary")
def _(c):
    path = c.tmp / "prompts.bin"
    path.write_bytes(b"abc\0def\n")
    return compare(c, "--prompts-file", str(path), message=("NUL",))


@case("compare-empty-prompt")
def _(c):
    return compare(c, "--prompt", "  ", message=("--prompt is empty",))


@case("compare-timeout-nan")
def _(c):
    return compare(c, "--timeout", "nan", message=("--timeout",))


@case("compare-timeout-negative")
def _(c):
    return compare(c, "--timeout", "-5", message=("--timeout",))


@case("compare-timeout-not-a-number")
def _(c):
    return compare(c, "--timeout", "soon", message=("--timeout",))


@case("compare-port-out-of-range")
def _(c):
    return compare(c, "--port", "70000", message=("--port", "outside"), url=False)


@case("compare-port-zero")
def _(c):
    return compare(c, "--port", "0", message=("--port",), url=False)


@case("compare-base-url-not-http")
def _(c):
    return compare(c, "--base-url", "ftp://127.0.0.1:21", message=("--base-url", "http(s)"), url=False)


@case("compare-base-url-bad-port")
def _(c):
    return compare(c, "--base-url", "http://127.0.0.1:99999", message=("--base-url",), url=False)


@case("compare-model-missing")
def _(c):
    return compare(c, message=("model not found",), model=c.tmp / "absent-model")


@case("compare-model-config-bad-field")
def _(c):
    return compare(c, message=("rope_theta",), model=c.with_config({"rope_theta": "x"}))


# ------------------------------------------------------------------ compare: server answers (item 5)

# /<scenario>/v1/models and /<scenario>/v1/completions answers: (status, content type, body).
MODELS_OK = json.dumps({"object": "list", "data": [{"id": SERVED, "object": "model"}]})
SCENARIOS: dict[str, dict[str, tuple[int, str, bytes | str]]] = {
    "good": {"models": (200, "application/json", MODELS_OK)},
    "models-list": {"models": (200, "application/json", json.dumps([{"id": SERVED}]))},
    "models-no-data": {"models": (200, "application/json", json.dumps({"object": "list"}))},
    "models-data-object": {"models": (200, "application/json", json.dumps({"data": {"id": SERVED}}))},
    "models-entry-without-id": {"models": (200, "application/json", json.dumps({"data": [{"name": SERVED}]}))},
    "models-not-json": {"models": (200, "text/plain", "ok")},
    "models-html": {"models": (200, "text/html", "<!doctype html><html><body>Welcome</body></html>")},
    "models-empty-body": {"models": (200, "application/json", "")},
    "models-http-500": {"models": (500, "text/plain", "boom")},
    "models-too-large": {"models": (200, "application/json", b" " * (1024 * 1024 + 10))},
    "completion-list": {"completions": (200, "application/json", "[]")},
    "completion-no-choices": {"completions": (200, "application/json", json.dumps({"id": "x"}))},
    "completion-choice-string": {"completions": (200, "application/json", json.dumps({"choices": ["text"]}))},
    "completion-token-ids-strings": {"completions": (200, "application/json", json.dumps(
        {"choices": [{"token_ids": ["a", "b"], "logprobs": {}}]}))},
    "completion-logprobs-strings": {"completions": (200, "application/json", json.dumps(
        {"choices": [{"logprobs": {"token_logprobs": "nope", "top_logprobs": []}}]}))},
    "completion-html": {"completions": (200, "text/html", "<html>502 Bad Gateway</html>")},
    "completion-slow": {"completions": (200, "application/json", "SLOW")},
}


class _StandIn(BaseHTTPRequestHandler):
    def _answer(self, kind: str) -> None:
        parts = self.path.strip("/").split("/")
        scenario = SCENARIOS.get(parts[0], {})
        status, content_type, body = scenario.get(kind, SCENARIOS["good"].get(kind, (404, "text/plain", "no")))
        if body == "SLOW":
            time.sleep(SLOW_ANSWER)
            body = "{}"
        raw = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        try:
            self.wfile.write(raw)
        except OSError:
            pass  # the client gave up (a size limit or a timeout)

    def do_GET(self):  # noqa: N802
        self._answer("models" if self.path.endswith("/v1/models") else "other")

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer("completions" if self.path.endswith("/v1/completions") else "other")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def standin_server():
    """The stand-in server on an OS-chosen free port; it stops at module end or after STANDIN_LIFETIME."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(STANDIN_LIFETIME, server.shutdown)
    stopper.daemon = True
    stopper.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stopper.cancel()
    server.shutdown()
    server.server_close()


SERVER_MESSAGES = {
    "models-list": ("/v1/models", "JSON array"),
    "models-no-data": ("/v1/models", "no 'data' list"),
    "models-data-object": ("/v1/models", "no 'data' list"),
    "models-entry-without-id": ("/v1/models", "data[0]"),
    "models-not-json": ("/v1/models", "not JSON"),
    "models-html": ("/v1/models", "not JSON"),
    "models-empty-body": ("/v1/models", "not JSON"),
    "models-http-500": ("/v1/models", "HTTP 500"),
    "models-too-large": ("/v1/models", "larger than"),
    "completion-list": ("/v1/completions", "JSON array"),
    "completion-no-choices": ("choices",),
    "completion-choice-string": ("choices[0]",),
    "completion-token-ids-strings": ("token_ids",),
    "completion-logprobs-strings": ("token_logprobs",),
    "completion-html": ("/v1/completions", "not JSON"),
    "completion-slow": ("/v1/completions", "within 1 s"),
}
for _scenario, _message in SERVER_MESSAGES.items():
    def _build(c, scenario=_scenario, message=_message):
        extra = ["--slug", SERVED, "--prompt", "hello world", "--no-chat-template"]
        if scenario == "completion-slow":
            extra += ["--timeout", "1"]
        return compare(c, *extra, scenario=scenario, message=message)
    case(f"compare-server-{_scenario}")(_build)


# ------------------------------------------------------------------ layer-diff inputs

def layer_diff(c: Ctx, *extra: str, model: Path | None = None, port_dir: str | None = None,
               message: tuple[str, ...] = ()) -> BadCase:
    model = model or c.base
    if port_dir is None:
        port = c.tmp / "acme_port"
        port.mkdir(exist_ok=True)
        (port / "__init__.py").write_text("")
        port_dir = str(port)
    return BadCase(id="", script="layer_diff", args=[str(model), "--port-dir", port_dir, *extra],
                   message=message, protect=[model, c.tmp])


@case("layer-diff-token-ids-not-integers")
def _(c):
    return layer_diff(c, "--token-ids", "1,two,3", message=("--token-ids",))


@case("layer-diff-token-ids-empty")
def _(c):
    return layer_diff(c, "--token-ids", ",", message=("--token-ids",))


@case("layer-diff-token-ids-negative")
def _(c):
    return layer_diff(c, "--token-ids", "1,-2", message=("--token-ids",))


@case("layer-diff-token-ids-beyond-vocab")
def _(c):
    return layer_diff(c, "--token-ids", "1,99999", message=("--token-ids", "vocab_size"))


@case("layer-diff-token-ids-too-many")
def _(c):
    return layer_diff(c, "--token-ids", ",".join(["1"] * 300), message=("max_position_embeddings",))


@case("layer-diff-token-ids-huge-number")
def _(c):
    return layer_diff(c, "--token-ids", "9" * 5000, message=("--token-ids",))


@case("layer-diff-empty-prompt")
def _(c):
    return layer_diff(c, "--prompt", " \t", message=("--prompt is empty",))


@case("layer-diff-port-dir-missing")
def _(c):
    return layer_diff(c, port_dir=str(c.tmp / "absent"), message=("--port-dir", "does not exist"))


@case("layer-diff-port-dir-file")
def _(c):
    path = c.tmp / "port.py"
    path.write_text("")
    return layer_diff(c, port_dir=str(path), message=("--port-dir", "is a file"))


@case("layer-diff-port-dir-link-loop")
def _(c):
    loop = c.tmp / "loop"
    loop.symlink_to(loop)
    return layer_diff(c, port_dir=str(loop), message=("--port-dir", "loop"))


@case("layer-diff-port-dir-dangling")
def _(c):
    link = c.tmp / "dangling"
    link.symlink_to(c.tmp / "nowhere")
    return layer_diff(c, port_dir=str(link), message=("--port-dir", "dangling"))


@case("layer-diff-port-dir-empty")
def _(c):
    return layer_diff(c, port_dir="", message=("--port-dir",))


@case("layer-diff-unknown-dtype")
def _(c):
    return layer_diff(c, "--dtype", "float8", message=("float8",))


@case("layer-diff-reference-missing")
def _(c):
    return layer_diff(c, "--reference", str(c.tmp / "absent-ref"), message=("model not found",))


@case("layer-diff-config-bad-field")
def _(c):
    return layer_diff(c, model=c.with_config({"num_hidden_layers": "two"}), message=("num_hidden_layers",))


# ------------------------------------------------------------------ the test

@pytest.fixture(scope="module")
def checkpoints(checkpoint_factory):
    return {
        "base": checkpoint_factory("llama", tokenizer=False),
        "with_tokenizer": checkpoint_factory("llama"),
        "bin_only": checkpoint_factory("llama", weights="bin", tokenizer=False),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, checkpoints, standin_server, tmp_path):
    ctx = Ctx(tmp=tmp_path, server=standin_server, **checkpoints)
    bad = CASES[name](ctx)
    bad.id = name
    bad.protect = [*bad.protect, *checkpoints.values()]
    # No .pyc files appear under scripts/ (a protected folder) because of these runs.
    bad.env = {"PYTHONDONTWRITEBYTECODE": "1", **(bad.env or {})}
    check_bad_case(bad)


def test_case_count():
    """The sweep keeps its size: the named cases plus at least 15 more of this module's own."""
    assert len(CASES) >= 100


# ------------------------------------------------------------------ in-process checks

def test_listing_stops_in_a_folder_with_too_many_files(tmp_path, monkeypatch):
    monkeypatch.setattr(model_source, "MAX_LISTED_FILES", 5)
    for index in range(8):
        (tmp_path / f"f{index}.txt").write_text("")
    with pytest.raises(ScriptError, match="not a model folder"):
        model_source.resolve(str(tmp_path)).list_files()


def test_listing_skips_link_loops_and_dangling_links(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert model_source.resolve(str(tmp_path)).list_files() == ["config.json"]


def test_fetch_refuses_names_outside_the_model(tmp_path):
    source = model_source.resolve(str(tmp_path))
    for name in ("../x.json", "/etc/hostname", "a/../../x", "", "bad\0name"):
        with pytest.raises(ScriptError, match="refusing to read"):
            source.fetch(name)


def test_valid_headers_still_pass(tmp_path):
    """Zero-size tensors, F4 packing and __metadata__ are valid; the checks refuse only corrupt headers."""
    header = {"__metadata__": {"format": "pt"}, "empty": tensor("F32", [0, 4], [0, 0]),
              "packed": tensor("F4", [3, 2], [0, 3]), "w": tensor("BF16", [2], [3, 7])}
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 7)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    tensors = model_source.read_tensor_infos(model_source.resolve(str(tmp_path)))
    assert {name: info.shape for name, info in tensors.items()} == {"empty": (0, 4), "packed": (3, 2), "w": (2,)}


def test_normalize_config_accepts_nulls_and_integral_numbers():
    normalized = model_source.normalize_config({"rope_theta": None, "partial_rotary_factor": None, "head_dim": None,
                                                "num_hidden_layers": 2.0, "rope_scaling": None, "model_type": None})
    assert normalized.rope is None and normalized.model_type is None
    with pytest.raises(ScriptError, match="^config: rope_theta is a string"):
        model_source.normalize_config({"rope_theta": "1e4"})
    with pytest.raises(ScriptError, match="expected a JSON object"):
        model_source.normalize_config(["not", "a", "config"])

