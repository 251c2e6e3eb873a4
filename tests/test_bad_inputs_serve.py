"""Bad inputs to `serve`: each is one `serve_port.py: error:` line with exit 3, before `max serve` starts.

Every case runs with IMPORT_MODEL_MAX pointing at a stub that only leaves a marker file (so a
case that slipped past the checks would show, and no real MAX can start), the record folder
(IMPORT_MODEL_SERVER_DIR) in a temp folder, and HF_HUB_OFFLINE=1. The harness checks the exit
code, the one error line and the JSON document, and that the model folder, the record folder
and the port folder are unchanged (hashed before and after).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from bad_inputs import BadCase, check_bad_case

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


class Layout:
    """The folders one case runs against, and the environment that points serve at them."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text(json.dumps(CONFIG))
        self.records = root / "records"
        self.records.mkdir()
        self.ports = root / "ports"
        self.port = self.make_port("tiny_port")
        self.marker = root / "max-was-started"
        stub = root / "max"
        stub.write_text(f"#!/bin/sh\ntouch '{self.marker}'\nexit 97\n")
        stub.chmod(0o755)
        # No .pyc writes: the harness hashes scripts/, and a recompiled stale .pyc would read as a change.
        self.env: dict[str, str | None] = {"IMPORT_MODEL_MAX": str(stub), "IMPORT_MODEL_SERVER_DIR": str(self.records),
                                           "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def make_port(self, slug: str, body: str | bytes = "ARCHITECTURES = []\n") -> Path:
        folder = self.ports / slug
        folder.mkdir(parents=True)
        init = folder / "__init__.py"
        init.write_bytes(body if isinstance(body, bytes) else body.encode())
        return folder

    def file(self, name: str, text: str | bytes = "x") -> Path:
        path = self.root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def loop(self, name: str) -> Path:
        path = self.root / name
        path.symlink_to(path)
        return path

    def dangling(self, name: str) -> Path:
        path = self.root / name
        path.symlink_to(self.root / "nowhere")
        return path

    def record(self, name: str, content: str | bytes | dict | list) -> Path:
        path = self.records / name
        if isinstance(content, (dict, list)):
            content = json.dumps(content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def case(self, case_id: str, args: list, *message: str, env: dict | None = None) -> BadCase:
        return BadCase(case_id, "serve_port", [str(a) for a in args], message=message,
                       protect=[self.model, self.records, self.ports], env={**self.env, **(env or {})})


GOOD_RECORD = {"format": 2, "port": 8123, "pid": 4000000, "pgid": 4000000, "start_time": 1}


def _record_case(case_id: str, content, *message: str, name: str = "8123-4000000.json") -> Callable:
    def build(lay: Layout) -> BadCase:
        path = lay.record(name, content)
        return lay.case(case_id, ["--stop", "--port", "8123"], path.name, *message)
    return build


def _port_case(case_id: str, slug: str, *message: str, body: str | bytes = "ARCHITECTURES = []\n") -> Callable:
    def build(lay: Layout) -> BadCase:
        return lay.case(case_id, [lay.model, "--port-dir", lay.make_port(slug, body)], *message)
    return build


def _init_kind_case(case_id: str, make: Callable[[Path], None], *message: str) -> Callable:
    def build(lay: Layout) -> BadCase:
        folder = lay.ports / "odd_port"
        folder.mkdir(parents=True)
        make(folder / "__init__.py")
        return lay.case(case_id, [lay.model, "--port-dir", folder], "__init__.py", *message)
    return build


CASES: dict[str, Callable[[Layout], BadCase]] = {
    # --timeout
    "timeout-nan": lambda lay: lay.case("timeout-nan", [lay.model, "--timeout", "nan"], "--timeout nan"),
    "timeout-negative": lambda lay: lay.case("timeout-negative", [lay.model, "--timeout", "-5"], "--timeout -5"),
    "timeout-inf": lambda lay: lay.case("timeout-inf", [lay.model, "--timeout", "inf"], "--timeout inf"),
    "timeout-zero": lambda lay: lay.case("timeout-zero", [lay.model, "--timeout", "0"], "--timeout 0"),
    "timeout-huge": lambda lay: lay.case("timeout-huge", [lay.model, "--timeout", "1e12"], "a week"),
    "timeout-text": lambda lay: lay.case("timeout-text", [lay.model, "--timeout", "soon"], "--timeout"),
    # --log-file
    "log-file-folder": lambda lay: lay.case("log-file-folder", [lay.model, "--log-file", lay.model],
                                            "--log-file", "is a folder"),
    "log-file-below-file": lambda lay: lay.case("log-file-below-file",
                                                [lay.model, "--log-file", lay.file("plain") / "serve.log"],
                                                "plain", "is a file"),
    "log-file-loop": lambda lay: lay.case("log-file-loop", [lay.model, "--log-file", lay.loop("loop.log")],
                                          "loop.log", "symbolic link loop"),
    "log-file-dangling": lambda lay: lay.case("log-file-dangling", [lay.model, "--log-file", lay.dangling("d.log")],
                                              "d.log", "dangling"),
    "log-file-in-loop-folder": lambda lay: lay.case("log-file-in-loop-folder",
                                                    [lay.model, "--log-file", lay.loop("loopdir") / "s.log"],
                                                    "loopdir", "symbolic link loop"),
    "log-file-empty": lambda lay: lay.case("log-file-empty", [lay.model, "--log-file", ""], "--log-file is empty"),
    # --port
    "port-zero": lambda lay: lay.case("port-zero", [lay.model, "--port", "0"], "--port 0", "1-65535"),
    "port-too-big": lambda lay: lay.case("port-too-big", [lay.model, "--port", "65536"], "--port 65536"),
    "port-negative": lambda lay: lay.case("port-negative", [lay.model, "--port", "-1"], "--port -1"),
    "port-text": lambda lay: lay.case("port-text", [lay.model, "--port", "eighty"], "--port"),
    # --port-dir: not a port, and the slug rule (port_layout)
    "port-dir-not-a-port": _port_case("port-dir-not-a-port", "no_arch", "ARCHITECTURES", body="X = 1\n"),
    "port-dir-parent": lambda lay: lay.case("port-dir-parent", [lay.model, "--port-dir", lay.ports],
                                            "did you mean", "tiny_port"),
    "port-dir-file": lambda lay: lay.case("port-dir-file", [lay.model, "--port-dir", lay.file("p.py")],
                                          "p.py", "is not a folder"),
    "port-dir-missing": lambda lay: lay.case("port-dir-missing", [lay.model, "--port-dir", lay.root / "nope"],
                                             "nope", "does not exist"),
    "port-dir-loop": lambda lay: lay.case("port-dir-loop", [lay.model, "--port-dir", lay.loop("portloop")],
                                          "portloop", "symbolic link loop"),
    "port-dir-empty": lambda lay: lay.case("port-dir-empty", [lay.model, "--port-dir", ""], "--port-dir is empty"),
    "port-dir-non-ascii": _port_case("port-dir-non-ascii", "modèle", "not ASCII"),
    "port-dir-dunder": _port_case("port-dir-dunder", "__main__", "dunder"),
    "port-dir-hyphen": _port_case("port-dir-hyphen", "my-port", "not a valid Python identifier"),
    "port-dir-keyword": _port_case("port-dir-keyword", "class", "keyword"),
    "port-dir-shadowed": _port_case("port-dir-shadowed", "json", "already importable"),
    "port-dir-module-name": _port_case("port-dir-module-name", "arch", "clashes"),
    "port-dir-init-folder": _init_kind_case("port-dir-init-folder", lambda p: p.mkdir(), "is a folder"),
    "port-dir-init-dangling": _init_kind_case("port-dir-init-dangling", lambda p: p.symlink_to(p.parent / "gone"),
                                              "dangling"),
    "port-dir-init-loop": _init_kind_case("port-dir-init-loop", lambda p: p.symlink_to(p), "link loop"),
    "port-dir-init-not-utf8": _port_case("port-dir-init-not-utf8", "latin_port", "not UTF-8",
                                         body=b"# caf\xe9\nARCHITECTURES = []\n"),
    # MODEL
    "model-missing-local": lambda lay: lay.case("model-missing-local", [lay.root / "no-model"], "no-model"),
    "model-bad-hub-id-offline": lambda lay: lay.case("model-bad-hub-id-offline", ["nobody-xq7/no-such-model"],
                                                     "nobody-xq7/no-such-model", "HF_HUB_OFFLINE"),
    "model-empty": lambda lay: lay.case("model-empty", [""], "MODEL is empty"),
    "model-absent": lambda lay: lay.case("model-absent", [], "MODEL is required"),
    "model-is-config-file": lambda lay: lay.case("model-is-config-file", [lay.model / "config.json"], "is a file"),
    "model-without-config": lambda lay: lay.case("model-without-config", [lay.ports], "config.json not found"),
    "model-config-not-json": lambda lay: lay.case("model-config-not-json", [_model_with(lay, "bad", "{oops")],
                                                  "config.json", "not valid JSON"),
    "model-config-list": lambda lay: lay.case("model-config-list", [_model_with(lay, "listy", "[1, 2]")],
                                              "config.json", "not a JSON object"),
    "model-dangling-link": lambda lay: lay.case("model-dangling-link", [lay.dangling("model-link")],
                                                "model-link", "dangling"),
    # other options
    "devices-empty": lambda lay: lay.case("devices-empty", [lay.model, "--devices", ""], "--devices"),
    "encoding-with-space": lambda lay: lay.case("encoding-with-space", [lay.model, "--encoding", "float 32"],
                                                "--encoding"),
    "all-without-stop": lambda lay: lay.case("all-without-stop", [lay.model, "--all"], "--all goes with --stop"),
    "max-override-missing": lambda lay: lay.case("max-override-missing", [lay.model], "IMPORT_MODEL_MAX",
                                                 "does not exist", env={"IMPORT_MODEL_MAX": str(lay.root / "nomax")}),
    "max-override-folder": lambda lay: lay.case("max-override-folder", [lay.model], "IMPORT_MODEL_MAX", "folder",
                                                env={"IMPORT_MODEL_MAX": str(lay.ports)}),
    "max-override-not-executable": lambda lay: lay.case("max-override-not-executable", [lay.model],
                                                        "not executable",
                                                        env={"IMPORT_MODEL_MAX": str(lay.file("max.txt"))}),
    "record-folder-is-file": lambda lay: lay.case("record-folder-is-file", [lay.model], "server record folder",
                                                  env={"IMPORT_MODEL_SERVER_DIR": str(lay.model / "config.json")}),
    # --stop: the command line
    "stop-with-model": lambda lay: lay.case("stop-with-model", ["--stop", lay.model], "--stop takes only"),
    "stop-with-port-dir": lambda lay: lay.case("stop-with-port-dir", ["--stop", "--port", "8123", "--port-dir",
                                                                      lay.port], "--port-dir"),
    "stop-without-port": lambda lay: lay.case("stop-without-port", ["--stop"], "--stop needs --port", "--all"),
    "stop-port-and-all": lambda lay: lay.case("stop-port-and-all", ["--stop", "--all", "--port", "8123"],
                                              "not both"),
    "stop-port-out-of-range": lambda lay: lay.case("stop-port-out-of-range", ["--stop", "--port", "70000"],
                                                   "--port 70000"),
    "stop-record-folder-is-file": lambda lay: lay.case(
        "stop-record-folder-is-file", ["--stop", "--all"], "server record folder", "is a file",
        env={"IMPORT_MODEL_SERVER_DIR": str(lay.model / "config.json")}),
    # --stop: malformed records (each names the file and is left in place)
    "record-not-json": _record_case("record-not-json", "not json at all", "not valid JSON"),
    "record-truncated": _record_case("record-truncated", '{"port": 8123, "pid": 40', "not valid JSON"),
    "record-list": _record_case("record-list", [GOOD_RECORD], "a JSON array"),
    "record-pid-string": _record_case("record-pid-string", {**GOOD_RECORD, "pid": "4000000"}, "'pid'", "a string"),
    "record-pid-bool": _record_case("record-pid-bool", {**GOOD_RECORD, "pid": True}, "'pid'", "true/false"),
    "record-pid-negative": _record_case("record-pid-negative", {**GOOD_RECORD, "pid": -4}, "'pid'"),
    "record-port-float": _record_case("record-port-float", {**GOOD_RECORD, "port": 8123.5}, "'port'", "a number"),
    "record-start-time-null": _record_case("record-start-time-null", {**GOOD_RECORD, "start_time": None},
                                           "'start_time'", "null"),
    "record-legacy-no-start-time": _record_case("record-legacy-no-start-time",
                                                {"port": 8123, "pid": 4000000, "log_path": "x"}, "older serve",
                                                name="8123.json"),
    "record-name-contradicts": _record_case("record-name-contradicts", {**GOOD_RECORD, "port": 9000},
                                            "contradicts"),
    "record-boot-id-number": _record_case("record-boot-id-number", {**GOOD_RECORD, "boot_id": 7}, "'boot_id'"),
    "record-not-utf8": _record_case("record-not-utf8", b'{"port": "\xff"}', "not UTF-8"),
    "record-nested-deeply": _record_case("record-nested-deeply", "[" * 100_000, "nested too deeply"),
    "record-under-stop-all": lambda lay: lay.case("record-under-stop-all", ["--stop", "--all"],
                                                  lay.record("8124-5.json", "{").name, "not valid JSON"),
}


def _model_with(lay: Layout, name: str, config_text: str) -> Path:
    folder = lay.root / name
    folder.mkdir()
    (folder / "config.json").write_text(config_text)
    return folder


def _record_kind_case(case_id: str, make: Callable[[Path, Path], None], *message: str) -> Callable:
    def build(lay: Layout) -> BadCase:
        path = lay.records / "8123-4000000.json"
        make(path, lay.root)
        return lay.case(case_id, ["--stop", "--port", "8123"], path.name, *message)
    return build


CASES.update({
    "record-is-folder": _record_kind_case("record-is-folder", lambda p, _r: p.mkdir(), "is a folder"),
    "record-dangling-link": _record_kind_case("record-dangling-link", lambda p, r: p.symlink_to(r / "gone"),
                                              "dangling"),
    "record-link-loop": _record_kind_case("record-link-loop", lambda p, _r: p.symlink_to(p), "link loop"),
})


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_serve_bad_input(case_id, tmp_path):
    lay = Layout(tmp_path)
    case = CASES[case_id](lay)
    check_bad_case(case)
    assert not lay.marker.exists(), f"{case_id}: max serve was started before the input was refused"
    assert not any(p.name.endswith(".tmp") for p in lay.records.iterdir()), "a staging record was left behind"


def test_every_case_id_matches_its_key(tmp_path):
    """A copy-pasted builder would run one input twice and another never."""
    for case_id, build in CASES.items():
        root = tmp_path / case_id
        root.mkdir()
        assert build(Layout(root)).id == case_id
