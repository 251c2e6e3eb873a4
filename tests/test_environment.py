"""The environment files and the dispatcher agree with the scripts that exist.

pixi.toml and requirements.txt pin the same PyPI versions; every pixi task
points at a script (and dispatcher subcommand) that exists; the dispatcher
offers exactly the subcommands whose scripts are present, with the same
``--help`` (flags and exit codes) as the standalone script; usage errors and
unknown subcommands exit 3 with one stderr line and no traceback.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cli_support
import import_model
from conftest import REPO_ROOT, SCRIPTS_DIR, ScriptResult, run_script

PIXI = tomllib.loads((REPO_ROOT / "pixi.toml").read_text())
AVAILABLE = import_model.available_subcommands()


def canonical(name: str) -> str:
    """PyPI project names compare case-insensitively with -, _ and . alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"requirements.txt line is not an exact pin: {line!r}"
            pins[canonical(name.strip())] = version.strip()
    return pins


def task_command(task) -> str:
    return task if isinstance(task, str) else task["cmd"]


@functools.cache
def help_text(subcommand: str, standalone: bool) -> ScriptResult:
    if standalone:
        return run_script(AVAILABLE[subcommand], "--help")
    return run_script("import_model", subcommand, "--help")


def exit_codes_of(module: str) -> dict[int, str]:
    """A script's EXIT_CODES, read with ast (the script is not imported)."""
    tree = ast.parse((SCRIPTS_DIR / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXIT_CODES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"scripts/{module}.py has no EXIT_CODES")


def assert_one_line_usage_error(result: ScriptResult) -> None:
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


# --- pins and tasks ----------------------------------------------------------------


def test_pixi_and_requirements_pin_the_same_versions() -> None:
    pixi_pins = {}
    for name, spec in PIXI["pypi-dependencies"].items():
        version = spec if isinstance(spec, str) else spec.get("version", "")
        assert version.startswith("=="), f"pixi.toml pypi dependency {name} is not an exact pin: {spec!r}"
        pixi_pins[canonical(name)] = version[2:]
    assert pixi_pins == requirement_pins()
    assert pixi_pins["modular"] == "26.7.0"


def test_pins_match_the_running_environment() -> None:
    from importlib import metadata

    for name, version in requirement_pins().items():
        installed = metadata.version(name).split("+", 1)[0]  # torch reports e.g. 2.13.0+cpu
        assert installed == version, name


def test_pixi_has_cpu_and_gpu_environments() -> None:
    assert PIXI["environments"]["default"]["features"] == ["cpu"]
    assert PIXI["environments"]["gpu"]["features"] == ["gpu"]
    assert "cuda" in PIXI["feature"]["gpu"]["system-requirements"]
    assert set(PIXI["workspace"]["platforms"]) == {"linux-64", "osx-arm64"}


def test_pixi_tasks_point_at_existing_scripts_and_subcommands() -> None:
    missing = []
    for name, task in PIXI["tasks"].items():
        words = shlex.split(task_command(task))
        scripts = [w for w in words if w.startswith("scripts/") and w.endswith(".py")]
        for script in scripts:
            if not (REPO_ROOT / script).is_file():
                missing.append(f"{name}: {script}")
        if scripts == ["scripts/import_model.py"] and len(words) > words.index(scripts[0]) + 1:
            subcommand = words[words.index(scripts[0]) + 1]
            if subcommand not in AVAILABLE:
                missing.append(f"{name}: import_model.py {subcommand}")
    assert missing == []


def test_every_subcommand_and_the_test_jobs_have_a_pixi_task() -> None:
    tasks = PIXI["tasks"]
    for subcommand, module in import_model.SUBCOMMANDS.items():
        assert subcommand in tasks, subcommand
        assert f"scripts/{module}.py" in task_command(tasks[subcommand]) or subcommand == "demo"
    assert task_command(tasks["demo"]) == "python scripts/import_model.py demo"
    for name in ("test", "test-scripts"):
        assert task_command(tasks[name]).startswith("python -m pytest tests")
        assert tasks[name]["env"]["HF_HUB_OFFLINE"] == "1"


# --- the dispatcher ---------------------------------------------------------------------


def test_dispatcher_lists_exactly_the_scripts_present() -> None:
    assert AVAILABLE == {name: module for name, module in import_model.SUBCOMMANDS.items()
                         if (SCRIPTS_DIR / f"{module}.py").is_file()}
    result = run_script("import_model", "--help")
    assert result.returncode == 0 and result.stderr == ""
    listed = re.findall(r"^  (\S+)\s+scripts/(\w+)\.py$", result.stdout, flags=re.MULTILINE)
    assert dict(listed) == AVAILABLE


def test_dispatcher_without_arguments_is_one_error_line_exit_3() -> None:
    result = run_script("import_model")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("import_model.py: error: no subcommand given; choose from: list-archs")
    assert len(result.stderr.strip().splitlines()) == 1
    as_json = run_script("import_model", "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["exit_code"] == 3


def test_unknown_subcommand_is_one_line_exit_3() -> None:
    result = run_script("import_model", "frobnicate", "--json")
    assert_one_line_usage_error(result)
    assert result.stderr.startswith("import_model.py: error: unknown subcommand 'frobnicate'; choose from: ")
    assert result.stderr.strip().endswith(", ".join(AVAILABLE))
    assert json.loads(result.stdout)["error"].startswith("unknown subcommand 'frobnicate'")


@pytest.mark.parametrize("subcommand", sorted(AVAILABLE))
def test_subcommand_help_matches_the_standalone_script(subcommand: str) -> None:
    module = AVAILABLE[subcommand]
    via_dispatcher, alone = help_text(subcommand, False), help_text(subcommand, True)
    assert via_dispatcher.returncode == 0, via_dispatcher.stderr
    assert alone.returncode == 0, alone.stderr
    prog = f"import_model.py {subcommand}"
    # argparse wraps usage lines by prog length; compare the text with whitespace collapsed.
    assert " ".join(via_dispatcher.stdout.replace(prog, f"{module}.py").split()) == " ".join(alone.stdout.split())
    epilog = cli_support.exit_code_epilog(exit_codes_of(module))
    assert alone.stdout.rstrip().endswith(epilog)
    assert set(exit_codes_of(module)) == {1, 2}


@pytest.mark.parametrize("subcommand", sorted(AVAILABLE))
def test_usage_errors_exit_3_with_one_line(subcommand: str) -> None:
    for runner in (lambda *a: run_script("import_model", subcommand, *a),
                   lambda *a: run_script(AVAILABLE[subcommand], *a)):
        plain = runner("--no-such-flag")
        assert_one_line_usage_error(plain)
        assert "unrecognized arguments: --no-such-flag" in plain.stderr or "required" in plain.stderr
        assert plain.stdout == ""
        as_json = runner("--no-such-flag", "--json")
        assert_one_line_usage_error(as_json)
        document = json.loads(as_json.stdout)
        assert set(document) == {"error", "exit_code"} and document["exit_code"] == 3
        assert document["error"].startswith("usage: ")


def test_scripts_run_from_any_working_directory(tmp_path: Path) -> None:
    for module in sorted(set(AVAILABLE.values())):
        result = run_script(module, "--help", cwd=tmp_path)
        assert result.returncode == 0, (module, result.stderr)
    assert run_script("import_model", "--help", cwd=tmp_path).returncode == 0


# --- dispatcher mechanics on a scratch scripts folder ----------------------------------

FAKE_SCRIPT = '''"""Echo the parsed arguments.

Second paragraph, not in --help.
"""
import argparse
import sys

import cli_support

EXIT_CODES = {1: "the count was odd", 2: "not used"}


def add_arguments(parser):
    parser.add_argument("count", type=int)
    cli_support.add_json_flag(parser)


def main(args):
    if args.count < 0:
        raise cli_support.ScriptError("count must not be negative\\nsecond line folded")
    if args.count == 7:
        raise TypeError("unsupported operand\\nspread over lines")
    if args.count == 9:
        raise RecursionError("maximum recursion depth exceeded")
    print("loaded:", sorted(m for m in sys.modules if m in ("inspect_hf", "list_native_archs")))
    return args.count % 2


if __name__ == "__main__":
    sys.exit(cli_support.standalone(globals()))
'''


@pytest.fixture(scope="module")
def scratch_scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """import_model.py and cli_support.py next to two fake scripts, one of which cannot be imported."""
    folder = tmp_path_factory.mktemp("scratch") / "scripts"
    folder.mkdir()
    for name in ("import_model.py", "cli_support.py", "max_compat.py"):  # cli_support imports max_compat
        shutil.copy(SCRIPTS_DIR / name, folder / name)
    (folder / "inspect_hf.py").write_text(FAKE_SCRIPT)
    (folder / "list_native_archs.py").write_text("raise RuntimeError('must not be imported')\n")
    return folder


def run_scratch(folder: Path, *args: str, script: str = "import_model.py") -> ScriptResult:
    done = subprocess.run([sys.executable, str(folder / script), *args], capture_output=True, text=True,
                          cwd=folder.parent, timeout=60)
    return ScriptResult(done.returncode, done.stdout, done.stderr)


def test_dispatcher_offers_only_present_scripts_and_imports_only_the_chosen_one(scratch_scripts: Path) -> None:
    listing = run_scratch(scratch_scripts, "--help")
    assert re.findall(r"^  (\S+)\s+scripts/", listing.stdout, flags=re.MULTILINE) == ["list-archs", "inspect"]
    result = run_scratch(scratch_scripts, "inspect", "3")
    assert (result.returncode, result.stdout, result.stderr) == (1, "loaded: ['inspect_hf']\n", "")
    assert run_scratch(scratch_scripts, "inspect", "4").returncode == 0
    assert_one_line_usage_error(run_scratch(scratch_scripts, "scaffold"))


def test_dispatcher_help_shows_description_and_exit_codes(scratch_scripts: Path) -> None:
    result = run_scratch(scratch_scripts, "inspect", "--help")
    assert result.returncode == 0
    assert "Echo the parsed arguments." in result.stdout and "Second paragraph" not in result.stdout
    assert result.stdout.rstrip().endswith(
        "exit codes:\n  0  ok\n  1  the count was odd\n  2  not used\n"
        "  3  could not run (bad input, missing model, network, or MAX missing)")


def test_script_errors_and_usage_errors_through_both_entry_points(scratch_scripts: Path) -> None:
    for prog, runner in (("import_model.py inspect", lambda *a: run_scratch(scratch_scripts, "inspect", *a)),
                         ("inspect_hf.py", lambda *a: run_scratch(scratch_scripts, *a, script="inspect_hf.py"))):
        failed = runner("-1")
        assert (failed.returncode, failed.stdout) == (3, "")
        assert failed.stderr == f"{prog}: error: count must not be negative second line folded\n"
        as_json = runner("-1", "--json")
        assert json.loads(as_json.stdout) == {"error": "count must not be negative second line folded",
                                              "exit_code": 3}
        crash = runner("7", "--json")
        assert crash.returncode == 3, crash
        assert crash.stderr == (f"{prog}: error: unexpected error (a bug in import-model; please report it): "
                                "TypeError: unsupported operand spread over lines\n")
        assert json.loads(crash.stdout)["exit_code"] == 3
        deep = runner("9")
        assert (deep.returncode, deep.stderr) == (
            3, f"{prog}: error: input nested too deeply to process: RecursionError: maximum recursion depth exceeded\n")
        usage = runner("notanumber")
        assert_one_line_usage_error(usage)
        assert usage.stderr == (f"{prog}: error: argument count: invalid int value: 'notanumber' (see --help)\n")
        usage_json = runner("--json")
        assert_one_line_usage_error(usage_json)
        assert json.loads(usage_json.stdout) == {
            "error": "usage: the following arguments are required: count", "exit_code": 3}
