"""Bad inputs for scaffold, audit, gates and the smoke probe: one-line exit 3, nothing written or lost.

Each case builds its bad input in its own temporary folder (a copy of one
scaffolded port, a broken file, a link loop) and is checked with
``bad_inputs.check_bad_case``: exit code, exactly one ``<prog>: error:`` line
naming the file or flag, one JSON document under ``--json``, and unchanged
trees for the model folder, the output's parent or the port folder and the
skill root. No case imports MAX or compiles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import port_layout
import scaffold
from bad_inputs import BadCase, check_bad_case, tree_hash
from conftest import REPO_ROOT, run_script

SLUG = "zz_case"  # the slug every scaffold case asks for (nothing else may be importable under it)

# Deeper than Python's default recursion limit (1000) and the json module's nesting, so parsing must refuse it.
TOO_DEEP = 100_000
# Deeper than the audit's manifest limit but shallow enough to parse: the depth check, not the parser, refuses it.
DEEP_BUT_PARSEABLE = 40
NOT_UTF8 = b"\xff\xfe not utf-8 \x80\n"
# The sweep's floor: the named cases of issue 12 for these scripts plus at least as many found beyond them.
MIN_CASES = 60


@dataclass
class Ctx:
    """What a case builder gets: the tiny model, a pristine scaffolded port, and a folder of its own."""

    model: Path
    base_port: Path
    tmp: Path

    def port(self, name: str = "zz_port_case") -> Path:
        """A fresh copy of the scaffolded port under ``tmp/ports/<name>``."""
        target = self.tmp / "ports" / name
        shutil.copytree(self.base_port, target, symlinks=True)
        return target


@pytest.fixture(scope="module")
def model(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def base_port(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_port_base")
    result = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", out, "--slug", "zz_base")
    assert result.returncode == 0, result.stderr
    return out / "zz_base"


# --- scaffold ----------------------------------------------------------------------------


def scaffold_case(ctx: Ctx, case_id: str, message: tuple[str, ...], *, out: Path | str | None = None,
                  slug: str | None = SLUG, start_from: str = "llama3", extra: tuple[str, ...] = (),
                  protect: tuple[Path, ...] = (), script: str = "scaffold") -> BadCase:
    out = ctx.tmp / "out" / "ports" if out is None else out
    args = [str(ctx.model), "--start-from", start_from, "--output-dir", str(out)]
    if slug is not None:
        args += ["--slug", slug]
    if script == "import_model":
        args = ["scaffold", *args]
    guard = [ctx.model, ctx.tmp / "out", REPO_ROOT / SLUG, *protect]
    if str(out) and ctx.tmp in Path(out).parents:
        guard.append(Path(out).parent)  # the skill's own folders are protected by the harness itself
    elif str(out):
        guard.append(Path(out) / SLUG)
    return BadCase(case_id, script, [*args, *extra], message=message, protect=guard)


def loop(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.name)
    return path


def regular_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder\n")
    return path


def existing_port(ctx: Ctx, case_id: str) -> BadCase:
    out = ctx.tmp / "out" / "ports"
    (out / SLUG).mkdir(parents=True)
    (out / SLUG / "mine.py").write_text("# my edits\n")
    return scaffold_case(ctx, case_id, ("already exists", "--force"), out=out, protect=(out / SLUG,))


def dangling_port_link(ctx: Ctx, case_id: str) -> BadCase:
    out = ctx.tmp / "out" / "ports"
    out.mkdir(parents=True)
    (out / SLUG).symlink_to(ctx.tmp / "nowhere")
    return scaffold_case(ctx, case_id, ("already exists",), out=out)


def port_is_model_folder(ctx: Ctx, case_id: str) -> BadCase:
    """--force must not move the model away when the port path is the model folder."""
    model = ctx.tmp / "models" / SLUG
    shutil.copytree(ctx.model, model)
    case = scaffold_case(ctx, case_id, ("model folder",), out=model.parent, extra=("--force",), protect=(model,))
    case.args[0] = str(model)
    return case


def output_inside_model(ctx: Ctx, case_id: str) -> BadCase:
    model = ctx.tmp / "models" / "m"
    shutil.copytree(ctx.model, model)
    case = scaffold_case(ctx, case_id, ("model folder",), out=model / "ports", protect=(model,))
    case.args[0] = str(model)
    return case


def missing_model(ctx: Ctx, case_id: str) -> BadCase:
    case = scaffold_case(ctx, case_id, ("model not found",))
    case.args[0] = str(ctx.tmp / "no_model")
    return case


def dangling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.parent / "no_such_target")
    return path


Builder = Callable[[Ctx, str], BadCase]

SCAFFOLD_CASES: list[tuple[str, Builder]] = [
    ("scaffold-output-dir-link-loop", lambda c, i: scaffold_case(
        c, i, ("--output-dir", "symbolic link loop"), out=loop(c.tmp / "out" / "loop"))),
    ("scaffold-output-dir-is-file", lambda c, i: scaffold_case(
        c, i, ("--output-dir", "is a file"), out=regular_file(c.tmp / "out" / "file"))),
    ("scaffold-output-dir-below-file", lambda c, i: scaffold_case(
        c, i, ("--output-dir", "below"), out=regular_file(c.tmp / "out" / "file") / "sub")),
    ("scaffold-output-dir-dangling-link", lambda c, i: scaffold_case(
        c, i, ("--output-dir", "dangling"), out=dangling(c.tmp / "out" / "gone"))),
    ("scaffold-output-dir-empty", lambda c, i: scaffold_case(c, i, ("--output-dir is empty",), out="")),
    ("scaffold-output-dir-in-skill-scripts", lambda c, i: scaffold_case(
        c, i, ("scripts folder",), out=REPO_ROOT / "scripts")),
    ("scaffold-output-dir-is-skill-root", lambda c, i: scaffold_case(c, i, ("skill's own root",), out=REPO_ROOT)),
    ("scaffold-slug-not-ascii", lambda c, i: scaffold_case(c, i, ("modèle", "ascii"), slug="modèle")),
    ("scaffold-slug-dunder", lambda c, i: scaffold_case(c, i, ("__main__", "dunder"), slug="__main__")),
    ("scaffold-slug-with-dash", lambda c, i: scaffold_case(c, i, ("my-port", "identifier"), slug="my-port")),
    ("scaffold-slug-empty", lambda c, i: scaffold_case(c, i, ("--slug is empty",), slug="")),
    ("scaffold-slug-blank", lambda c, i: scaffold_case(c, i, ("--slug is empty",), slug="   ")),
    ("scaffold-slug-keyword", lambda c, i: scaffold_case(c, i, ("keyword",), slug="class")),
    ("scaffold-slug-importable", lambda c, i: scaffold_case(c, i, ("json", "importable"), slug="json")),
    ("scaffold-slug-is-port-module", lambda c, i: scaffold_case(c, i, ("clashes",), slug="model")),
    ("scaffold-slug-is-allowlist-module", lambda c, i: scaffold_case(c, i, ("clashes",), slug="computed_buffers")),
    ("scaffold-slug-is-donor-helper", lambda c, i: scaffold_case(c, i, ("clashes",), slug="distributed_llama")),
    ("scaffold-slug-is-borrowed-graph", lambda c, i: scaffold_case(c, i, ("clashes",), slug="llama3_graph",
                                                                   start_from="olmo2")),
    ("scaffold-slug-is-subpackage", lambda c, i: scaffold_case(c, i, ("clashes",), slug="layers",
                                                               start_from="olmo2")),
    ("scaffold-donor-empty", lambda c, i: scaffold_case(c, i, ("--start-from",), start_from="")),
    ("scaffold-donor-unknown", lambda c, i: scaffold_case(c, i, ("no_such_family",), start_from="no_such_family")),
    ("scaffold-donor-path-escape", lambda c, i: scaffold_case(c, i, ("../llama3",), start_from="../llama3")),
    ("scaffold-donor-is-a-module", lambda c, i: scaffold_case(c, i, ("llama3.model",), start_from="llama3.model")),
    ("scaffold-arch-name-empty", lambda c, i: scaffold_case(c, i, ("--arch-name is empty",),
                                                            extra=("--arch-name", ""))),
    ("scaffold-arch-name-not-ascii", lambda c, i: scaffold_case(c, i, ("Modèle",),
                                                                extra=("--arch-name", "ModèleForCausalLM"))),
    ("scaffold-model-missing", missing_model),
    ("scaffold-existing-port-without-force", existing_port),
    ("scaffold-port-path-is-dangling-link", dangling_port_link),
    ("scaffold-port-would-replace-model", port_is_model_folder),
    ("scaffold-output-inside-model", output_inside_model),
    ("dispatcher-scaffold-slug-dunder", lambda c, i: scaffold_case(c, i, ("dunder",), slug="__init__",
                                                                   script="import_model")),
]


# --- audit and gates: a broken port --------------------------------------------------------


def port_case(ctx: Ctx, case_id: str, script: str, message: tuple[str, ...], port: Path | str,
              extra: tuple[str, ...] = ()) -> BadCase:
    if script == "audit_docstrings":
        args = [str(port), *extra]
    elif script == "port_probe":
        args = [str(ctx.model), "--port-dir", str(port), "--check", "import", *extra]
    else:
        args = [str(ctx.model), "--port-dir", str(port), "--phase", "preflight", *extra]
    guard = [ctx.model, ctx.tmp / "ports"]
    return BadCase(case_id, script, args, message=message, protect=guard)


def broken(edit: Callable[[Path], object], name: str = "zz_port_case") -> Callable[[Ctx], Path]:
    """A builder of a port copy changed by ``edit(port)``."""
    def build(ctx: Ctx) -> Path:
        port = ctx.port(name)
        edit(port)
        return port
    return build


def _write(relative: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(port: Path) -> None:
        target = port / relative
        if target.is_symlink() or target.is_file():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return edit


def _replace(relative: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    def edit(port: Path) -> None:
        target = port / relative
        if target.is_symlink() or target.is_file():
            target.unlink()
        make(target)
    return edit


def _dangling_at(target: Path) -> None:
    target.symlink_to(target.parent / "no_such_file.py")


def _fifo_at(target: Path) -> None:
    os.mkfifo(target)  # reading it would block forever: it must be refused before any read


def _loop_at(target: Path) -> None:
    target.symlink_to(target.name)


def _folder_loop(ctx: Ctx) -> Path:
    return loop(ctx.tmp / "ports" / "looped")


def _folder_file(ctx: Ctx) -> Path:
    return regular_file(ctx.tmp / "ports" / "zz_file")


def _two_ports(ctx: Ctx) -> Path:
    ctx.port("zz_one")
    ctx.port("zz_two")
    return ctx.tmp / "ports"


DEEP_PYTHON = "x = " + "+".join(["1"] * TOO_DEEP) + "\n"
DEEP_MANIFEST = '{"a": ' * TOO_DEEP + "1" + "}" * TOO_DEEP
SHALLOW_DEEP_MANIFEST = '{"a": ' * DEEP_BUT_PARSEABLE + "1" + "}" * DEEP_BUT_PARSEABLE

# (case id, script, port builder, substrings of the error line, extra flags)
PORT_CASES: list[tuple[str, str, Callable[[Ctx], Path], tuple[str, ...], tuple[str, ...]]] = [
    ("audit-arch-not-utf8", "audit_docstrings", broken(_write("arch.py", NOT_UTF8)), ("arch.py", "UTF-8"), ()),
    ("audit-helper-not-utf8", "audit_docstrings", broken(_write("model.py", NOT_UTF8)), ("model.py", "UTF-8"), ()),
    ("audit-py-dangling-link", "audit_docstrings", broken(_replace("extra.py", _dangling_at)),
     ("extra.py", "dangling"), ()),
    ("audit-py-link-loop", "audit_docstrings", broken(_replace("extra.py", _loop_at)), ("extra.py", "loop"), ()),
    ("audit-py-is-folder", "audit_docstrings", broken(_replace("extra.py", Path.mkdir)), ("extra.py", "folder"), ()),
    ("audit-py-syntax-error", "audit_docstrings", broken(_write("extra.py", "def (:\n")),
     ("extra.py", "cannot parse"), ()),
    ("audit-py-null-byte", "audit_docstrings", broken(_write("extra.py", "x = 1\0\n")), ("extra.py",), ()),
    ("audit-py-nested-too-deep", "audit_docstrings", broken(_write("extra.py", DEEP_PYTHON)),
     ("extra.py", "nested too deeply"), ()),
    ("audit-manifest-array", "audit_docstrings", broken(_write(port_layout.MANIFEST_NAME, "[1, 2]")),
     ("scaffold_manifest.json", "JSON array"), ()),
    ("audit-manifest-not-json", "audit_docstrings", broken(_write(port_layout.MANIFEST_NAME, "{donor: llama3")),
     ("scaffold_manifest.json", "not valid JSON"), ()),
    ("audit-manifest-too-deep", "audit_docstrings", broken(_write(port_layout.MANIFEST_NAME, DEEP_MANIFEST)),
     ("scaffold_manifest.json", "deep"), ()),
    ("audit-manifest-deep-parseable", "audit_docstrings",
     broken(_write(port_layout.MANIFEST_NAME, SHALLOW_DEEP_MANIFEST)), ("scaffold_manifest.json", "levels deep"), ()),
    ("audit-manifest-donor-number", "audit_docstrings",
     broken(_write(port_layout.MANIFEST_NAME, json.dumps({"donor": 3}))), ("scaffold_manifest.json", "donor"), ()),
    ("audit-manifest-arch-name-list", "audit_docstrings",
     broken(_write(port_layout.MANIFEST_NAME, json.dumps({"arch_name": ["X"]}))), ("arch_name",), ()),
    ("audit-manifest-is-folder", "audit_docstrings", broken(_replace(port_layout.MANIFEST_NAME, Path.mkdir)),
     ("scaffold_manifest.json", "folder"), ()),
    ("audit-manifest-not-utf8", "audit_docstrings", broken(_write(port_layout.MANIFEST_NAME, NOT_UTF8)),
     ("scaffold_manifest.json", "UTF-8"), ()),
    ("audit-py-is-fifo", "audit_docstrings", broken(_replace("extra.py", _fifo_at)),
     ("extra.py", "not a regular file"), ()),
    ("audit-manifest-is-fifo", "audit_docstrings", broken(_replace(port_layout.MANIFEST_NAME, _fifo_at)),
     ("scaffold_manifest.json", "not a regular file"), ()),
    ("audit-port-link-loop", "audit_docstrings", _folder_loop, ("looped", "loop"), ()),
    ("audit-port-is-file", "audit_docstrings", _folder_file, ("zz_file", "file"), ()),
    ("audit-port-name-dash", "audit_docstrings", broken(lambda p: None, "my-port"), ("my-port", "identifier"), ()),
    ("audit-port-name-not-ascii", "audit_docstrings", broken(lambda p: None, "modèle"), ("modèle", "ascii"), ()),
    ("audit-port-name-dunder", "audit_docstrings", broken(lambda p: None, "__main__"), ("__main__", "dunder"), ()),
    ("audit-port-name-keyword", "audit_docstrings", broken(lambda p: None, "import"), ("keyword",), ()),
    ("audit-port-name-importable", "audit_docstrings", broken(lambda p: None, "json"), ("importable",), ()),
    ("audit-arch-dangling", "audit_docstrings", broken(_replace("arch.py", _dangling_at)), ("arch.py", "dangling"), ()),
    ("audit-donor-empty", "audit_docstrings", broken(lambda p: None), ("--donor is empty",), ("--donor", "")),
    ("audit-port-dir-empty", "audit_docstrings", lambda c: "", ("empty",), ()),
    ("gates-arch-not-utf8", "run_oss_gates", broken(_write("arch.py", NOT_UTF8)), ("arch.py", "UTF-8"), ()),
    ("gates-helper-not-utf8", "run_oss_gates", broken(_write("weight_adapters.py", NOT_UTF8)),
     ("weight_adapters.py", "UTF-8"), ()),
    ("gates-py-dangling-link", "run_oss_gates", broken(_replace("extra.py", _dangling_at)),
     ("extra.py", "dangling"), ()),
    ("gates-py-link-loop", "run_oss_gates", broken(_replace("extra.py", _loop_at)), ("extra.py", "loop"), ()),
    ("gates-py-is-folder", "run_oss_gates", broken(_replace("extra.py", Path.mkdir)), ("extra.py", "folder"), ()),
    ("gates-arch-is-folder", "run_oss_gates", broken(_replace("arch.py", Path.mkdir)), ("arch.py", "folder"), ()),
    ("gates-arch-syntax-error", "run_oss_gates", broken(_write("arch.py", "arch = SupportedArchitecture(\n")),
     ("arch.py", "cannot parse"), ()),
    ("gates-arch-no-declaration", "run_oss_gates", broken(_write("arch.py", "x = 1\n")),
     ("arch.py", "SupportedArchitecture"), ()),
    ("gates-arch-nested-too-deep", "run_oss_gates", broken(_write("arch.py", DEEP_PYTHON)),
     ("arch.py", "nested too deeply"), ()),
    ("gates-arch-bom-and-bad-bytes", "run_oss_gates", broken(_write("arch.py", b"\xef\xbb\xbfx = '\xff'\n")),
     ("arch.py", "UTF-8"), ()),
    ("gates-init-dangling", "run_oss_gates", broken(_replace("__init__.py", _dangling_at)),
     ("__init__.py", "dangling"), ()),
    ("gates-arch-is-fifo", "run_oss_gates", broken(_replace("arch.py", _fifo_at)), ("arch.py", "regular file"), ()),
    ("gates-port-link-loop", "run_oss_gates", _folder_loop, ("--port-dir", "loop"), ()),
    ("gates-port-is-file", "run_oss_gates", _folder_file, ("--port-dir", "file"), ()),
    ("gates-port-dir-empty", "run_oss_gates", lambda c: "", ("--port-dir", "empty"), ()),
    ("gates-port-name-dash", "run_oss_gates", broken(lambda p: None, "my-port"), ("my-port", "identifier"), ()),
    ("gates-port-name-not-ascii", "run_oss_gates", broken(lambda p: None, "modèle"), ("modèle", "ascii"), ()),
    ("gates-port-name-module-clash", "run_oss_gates", broken(lambda p: None, "model"), ("clashes",), ()),
    ("gates-parent-of-two-ports", "run_oss_gates", _two_ports, ("several ports",), ()),
    ("gates-phase-unknown", "run_oss_gates", broken(lambda p: None), ("--phase",), ("--phase", "deploy")),
    ("gates-phase-empty", "run_oss_gates", broken(lambda p: None), ("--phase",), ("--phase", "")),
    ("gates-timeout-nan", "run_oss_gates", broken(lambda p: None), ("--timeout",), ("--timeout", "nan")),
    ("gates-timeout-zero", "run_oss_gates", broken(lambda p: None), ("--timeout",), ("--timeout", "0")),
    ("gates-timeout-text", "run_oss_gates", broken(lambda p: None), ("--timeout",), ("--timeout", "soon")),
    ("gates-encoding-empty", "run_oss_gates", broken(lambda p: None), ("--encoding",), ("--encoding", "")),
    ("gates-base-url-no-scheme", "run_oss_gates", broken(lambda p: None), ("--base-url",),
     ("--base-url", "localhost:8000")),
    ("gates-base-url-bad-port", "run_oss_gates", broken(lambda p: None), ("--base-url", "port"),
     ("--base-url", "http://127.0.0.1:99999")),
    ("gates-base-url-empty", "run_oss_gates", broken(lambda p: None), ("--base-url",), ("--base-url", "")),
    ("gates-served-name-empty", "run_oss_gates", broken(lambda p: None), ("--served-name",), ("--served-name", "")),
    ("probe-port-link-loop", "port_probe", _folder_loop, ("--port-dir", "loop"), ()),
    ("probe-port-name-dash", "port_probe", broken(lambda p: None, "my-port"), ("my-port",), ()),
]


def gates_missing_model(ctx: Ctx, case_id: str) -> BadCase:
    case = port_case(ctx, case_id, "run_oss_gates", ("model not found",), ctx.port())
    case.args[0] = str(ctx.tmp / "no_model")
    return case


def gates_model_is_the_port(ctx: Ctx, case_id: str) -> BadCase:
    """MODEL given as the port folder by mistake: it has no config.json."""
    port = ctx.port()
    case = port_case(ctx, case_id, "run_oss_gates", ("config.json",), port)
    case.args[0] = str(port)
    return case


def _port_builder(build: Callable[[Ctx], Path], script: str, message: tuple[str, ...],
                  extra: tuple[str, ...]) -> Builder:
    return lambda ctx, case_id: port_case(ctx, case_id, script, message, build(ctx), extra)


ALL_CASES: list[tuple[str, Builder]] = [
    *SCAFFOLD_CASES,
    *[(case_id, _port_builder(build, script, message, extra)) for case_id, script, build, message, extra in PORT_CASES],
    ("gates-model-missing", gates_missing_model),
    ("gates-model-is-the-port", gates_model_is_the_port),
]


def test_case_ids_are_unique_and_plenty():
    ids = [case_id for case_id, _ in ALL_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= MIN_CASES


@pytest.mark.parametrize("build", [build for _, build in ALL_CASES], ids=[case_id for case_id, _ in ALL_CASES])
def test_bad_input(build, request, model, base_port, tmp_path):
    case_id = request.node.callspec.id
    check_bad_case(build(Ctx(model, base_port, tmp_path), case_id))


# --- the staging folder: never delete what this run did not create --------------------------


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_existing_staging_name_is_left_alone(kind, model, tmp_path):
    """A ``.<slug>.scaffold-tmp`` the run did not make (folder with a file, or a file) survives unchanged."""
    out = tmp_path / "ports"
    out.mkdir()
    staging = out / f".{SLUG}.scaffold-tmp"
    if kind == "folder":
        staging.mkdir()
        (staging / "notes.txt").write_text("someone else's work\n")
    else:
        staging.write_text("a file that happens to have this name\n")
    before = tree_hash(staging)
    result = run_script("scaffold", model, "--start-from", "llama3", "--output-dir", out, "--slug", SLUG)
    assert result.returncode == 0, result.stderr
    assert tree_hash(staging) == before
    assert (out / SLUG / f"{SLUG}.py").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([staging.name, SLUG])  # no staging folder left behind
    mode = (out / SLUG).stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask(), oct(mode)  # the port folder is not left owner-only like a temp folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_removes_only_its_own_staging_and_new_folders(tmp_path):
    """A write that fails half-way removes this run's staging folder and the output folders it created."""
    parent = tmp_path / "keep"
    parent.mkdir()
    (parent / f".{SLUG}.scaffold-tmp").mkdir()
    (parent / f".{SLUG}.scaffold-tmp" / "notes.txt").write_text("mine\n")
    before = tree_hash(parent)
    plan = scaffold.PortPlan(SLUG, "ZzForCausalLM", "llama3", "float32", ["float32"], "", [],
                             {"a.py": "x = 1\n", "a.py/b.py": "y = 2\n"}, [])  # a.py is a file: b.py cannot be written
    with pytest.raises(scaffold.ScriptError, match="cannot write the port"):
        scaffold.write_port(plan, parent / "new" / "deeper" / SLUG)
    assert tree_hash(parent) == before


def test_failed_write_keeps_the_previous_port(tmp_path, monkeypatch):
    """When moving the new port into place fails, the previous port is put back, not lost in a backup."""
    out = tmp_path / "ports"
    (out / SLUG).mkdir(parents=True)
    (out / SLUG / "mine.py").write_text("# my edits\n")
    before = tree_hash(out)
    plan = scaffold.PortPlan(SLUG, "ZzForCausalLM", "llama3", "float32", ["float32"], "", [], {"a.py": "x\n"}, [])
    real_rename = Path.rename

    def refuse_staging(self, target):
        if self.name.startswith(f".{SLUG}.scaffold-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_staging)
    with pytest.raises(scaffold.ScriptError, match="No space left"):
        scaffold.write_port(plan, out / SLUG)
    assert tree_hash(out) == before


# --- inputs that are not errors --------------------------------------------------------------


def test_audit_and_gates_read_a_port_file_with_a_byte_order_mark(model, base_port, tmp_path):
    port = tmp_path / "zz_bom"
    shutil.copytree(base_port, port)
    arch = port / "arch.py"
    arch.write_bytes(b"\xef\xbb\xbf" + arch.read_bytes())
    assert run_script("audit_docstrings", port, "--json").returncode in (0, 1)
    result = run_script("run_oss_gates", model, "--port-dir", port, "--phase", "preflight", "--json")
    assert result.returncode in (0, 1), result.stderr  # other preflight checks judge the model, not arch.py
    statuses = {c["name"]: c["status"] for c in result.json()["checks"]}
    assert statuses["arch-name"] == statuses["dtype"] == statuses["encoding"] == "pass", statuses


@pytest.mark.parametrize("field, value, check, words", [
    ("name", "NAME", "arch-name", "not a string literal"),
    ("default_encoding", "ENCODING", "dtype", "not a string literal"),
])
def test_non_literal_arch_fields_fail_the_gate_with_a_reason(model, base_port, tmp_path, field, value, check, words):
    """A field the gates cannot read with ast is a failed gate (exit 1) that says how to fix it, not a crash."""
    port = tmp_path / "zz_literal"
    shutil.copytree(base_port, port)
    arch = port / "arch.py"
    text = arch.read_text()
    declared = port_layout.read_arch_declaration(arch)
    literal = json.dumps(getattr(declared, field))
    assert f"{field}={literal}" in text
    arch.write_text(text.replace(f"{field}={literal}", f"{field}={value}"))
    result = run_script("run_oss_gates", model, "--port-dir", port, "--phase", "preflight", "--json")
    assert result.returncode == 1, result.stderr
    failed = {c["name"]: c["summary"] for c in result.json()["checks"] if c["status"] == "fail"}
    assert words in failed[check]
