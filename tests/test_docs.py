"""Keep the skill's markdown true to the code.

An agent follows SKILL.md, references/ and templates/ literally, so these
tests check what the docs promise against what the scripts and the installed
MAX actually do: relative links resolve, every script and dispatcher
subcommand shown exists, every ``--flag`` shown with a command appears in
that command's ``--help``, every script has its SKILL.md subsection, the
exit-code table matches each script's ``EXIT_CODES``, the MAX API names
shown import, and the port test template is never collected from templates/.

Scripts' ``--help`` runs in a subprocess (cached per session); ``EXIT_CODES``
and other tables are read with ``ast`` or regexes, so no script is imported
here except the metadata-only ``audit_docstrings`` (for its marker regex). The
MAX facts (API names, ``max <sub> --help``) come from one subprocess per session.
"""

from __future__ import annotations

import ast
import functools
import html
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SCRIPTS_DIR, run_script

SKILL_MD = REPO_ROOT / "SKILL.md"
TEMPLATE_TEST = REPO_ROOT / "templates" / "test_port_template.py"
SKIPPED_DIRS = {".git", ".pixi", ".pytest_cache", "__pycache__", "out", "demo-output", "node_modules"}
NOT_USED = "not used"


# ---------------------------------------------------------------- collection


def markdown_files() -> list[Path]:
    """Every markdown file of the skill (not in hidden or generated folders)."""
    found = []
    for path in sorted(REPO_ROOT.rglob("*.md")):
        parts = path.relative_to(REPO_ROOT).parts[:-1]
        if not any(part in SKIPPED_DIRS or part.startswith(".") for part in parts):
            found.append(path)
    return found


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def dispatcher_subcommands() -> dict[str, str]:
    """The dispatcher's full SUBCOMMANDS table (subcommand -> module), read without importing it."""
    return literal_assignment(SCRIPTS_DIR / "import_model.py", "SUBCOMMANDS")


def literal_assignment(path: Path, name: str):
    """The literal value assigned to a module-level ``name`` in ``path``, or None."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    return None


def cli_scripts() -> list[str]:
    """Module names of every runnable script: it declares EXIT_CODES and a main()."""
    names = []
    for path in sorted(SCRIPTS_DIR.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^EXIT_CODES\s*[:=]", text, re.M) and re.search(r"^def main\(", text, re.M):
            names.append(path.stem)
    return names


def pixi_tasks() -> dict[str, str]:
    """pixi task name -> its command string."""
    data = tomllib.loads((REPO_ROOT / "pixi.toml").read_text(encoding="utf-8"))
    tasks = {}
    for name, task in data.get("tasks", {}).items():
        tasks[name] = task["cmd"] if isinstance(task, dict) else task
    return tasks


FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)


def strip_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code removed (for link scanning)."""
    text = FENCE.sub("", text)
    return INLINE_CODE.sub("", text)


def code_snippets(text: str) -> list[str]:
    """Command-like text of a markdown file: fenced-block lines (continuations joined) and inline code."""
    snippets = []
    for match in FENCE.finditer(text):
        snippets.extend(match.group(2).replace("\\\n", " ").splitlines())
    snippets.extend(m.group(2) for m in INLINE_CODE.finditer(FENCE.sub("", text)))
    return [s for s in snippets if s.strip()]


# ---------------------------------------------------------------- commands


@dataclass
class ShownCommand:
    """One command shown in the docs: which program it runs and the flags shown with it."""

    source: str  # markdown file
    program: str  # "script:<module>", "dispatch:<subcommand>", "max:<subcommand>" or "pixi:<task>"
    flags: list[str]
    text: str


COMMAND_BREAKS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
SCRIPT_TOKEN = re.compile(r"(?:^|/)scripts/(\w+)\.py$")


def split_tokens(snippet: str) -> list[str]:
    try:
        return shlex.split(snippet, comments=True)
    except ValueError:
        return snippet.split()


def parse_commands(source: str, snippet: str) -> list[ShownCommand]:
    """Find script, dispatcher, pixi-task and ``max`` invocations in one snippet."""
    tokens = split_tokens(snippet)
    commands: list[ShownCommand] = []
    current: ShownCommand | None = None
    index = 0
    while index < len(tokens):
        token = tokens[index]
        started = start_command(tokens, index)
        if started is not None:
            program, consumed = started
            current = ShownCommand(source, program, [], snippet)
            commands.append(current)
            index += consumed
            continue
        if token in COMMAND_BREAKS or token.startswith(">"):
            current = None
        elif current is not None and token.startswith("--") and len(token) > 2:
            current.flags.append(token.split("=", 1)[0])
        index += 1
    return commands


def start_command(tokens: list[str], index: int) -> tuple[str, int] | None:
    """If a shown command starts at ``tokens[index]``, return (program, tokens consumed)."""
    token = tokens[index]
    following = tokens[index + 1] if index + 1 < len(tokens) else None
    match = SCRIPT_TOKEN.search(token)
    if match:
        module = match.group(1)
        if module == "import_model" and following and not following.startswith("-"):
            if following.startswith("<"):  # a placeholder such as <sub>
                return "dispatch:<any>", 2
            return f"dispatch:{following}", 2
        return f"script:{module}", 1
    if token == "pixi" and following == "run" and index + 2 < len(tokens):
        task = tokens[index + 2]
        if task not in ("python", "max", "pytest") and not task.startswith("<"):
            return f"pixi:{task}", 3
        return None
    if token == "max" and following and re.fullmatch(r"[a-z][a-z-]+", following):
        return f"max:{following}", 2
    return None


def shown_commands() -> list[ShownCommand]:
    commands = []
    for path in markdown_files():
        for snippet in code_snippets(path.read_text(encoding="utf-8")):
            commands.extend(parse_commands(relative(path), snippet))
    return commands


@functools.lru_cache(maxsize=None)
def script_help(module: str) -> str:
    """``--help`` text of ``scripts/<module>.py``."""
    result = run_script(module, "--help", timeout=120)
    assert result.returncode == 0, f"scripts/{module}.py --help exited {result.returncode}: {result.stderr.strip()}"
    return result.stdout


def help_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", help_text)) | {"--help"}


MAX_NAME = re.compile(r"\bmax(?:\.[A-Za-z_]\w*)+")
MISSING_MAX_NAME = "max.nn.NoSuchLayerForTheProbe"  # sent along to prove the probe can say "no"

MAX_PROBE = """
import contextlib, importlib, io, json, re, sys

def resolves(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False

def cli_help(args):
    from max._entrypoints.pipelines import main
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            main([*args, "--help"], prog_name="max", standalone_mode=True)
        except SystemExit:
            pass
    return buffer.getvalue()

request = json.loads(sys.argv[1])
answer = {"unresolved": [n for n in request["names"] if not resolves(n)], "help": {}}
if request["subcommands"]:
    answer["help"][""] = cli_help([])
    commands = set(re.findall(r"^  ([a-z][a-z-]+) ", answer["help"][""], re.M))
    for sub in request["subcommands"]:
        if sub in commands:
            answer["help"][sub] = cli_help([sub])
print(json.dumps(answer))
"""


def shown_max_names() -> list[str]:
    """Dotted ``max.*`` API names shown in the docs' code."""
    names = set()
    for path in markdown_files():
        for snippet in code_snippets(path.read_text(encoding="utf-8")):
            names |= {name for name in MAX_NAME.findall(snippet) if not name.endswith((".py", ".md"))}
    return sorted(names)


@functools.lru_cache(maxsize=None)
def max_facts() -> dict:
    """Ask the installed MAX, in one process: which shown API names resolve, and the CLI help texts.

    Importing MAX's CLI and pipelines costs tens of seconds, so this runs once per session.
    """
    if importlib.util.find_spec("max") is None:
        pytest.skip("MAX is not installed")
    subcommands = sorted({c.program.partition(":")[2] for c in shown_commands() if c.program.startswith("max:")})
    request = json.dumps({"names": shown_max_names() + [MISSING_MAX_NAME], "subcommands": subcommands})
    done = subprocess.run([sys.executable, "-c", MAX_PROBE, request], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MAX_SERVE_DISABLE_TELEMETRY": "1"})
    assert done.returncode == 0, done.stderr[-800:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve_program(program: str) -> str | None:
    """Map a shown program to the script module it runs (None for ``max`` commands)."""
    kind, _, name = program.partition(":")
    if kind == "script":
        return name
    if kind == "dispatch":
        return dispatcher_subcommands().get(name)
    if kind == "pixi":
        command = pixi_tasks().get(name)
        if command is None:
            return None
        tokens = command.split()
        for position, token in enumerate(tokens):
            match = SCRIPT_TOKEN.search(token)
            if match and match.group(1) == "import_model" and position + 1 < len(tokens):
                return dispatcher_subcommands().get(tokens[position + 1], "import_model")
            if match:
                return match.group(1)
    return None


# ---------------------------------------------------------------- SKILL.md sections


def skill_sections(level: int) -> dict[str, str]:
    """Heading text -> body for the headings of one level in SKILL.md (code fences respected)."""
    text = SKILL_MD.read_text(encoding="utf-8")
    lines = text.splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    in_fence = False
    for line in lines:
        if line.startswith(("```", "~~~")):
            in_fence = not in_fence
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*$", line) if not in_fence else None
        if heading and len(heading.group(1)) <= level:
            current = heading.group(2) if len(heading.group(1)) == level else None
            if current is not None:
                sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    return {name: "\n".join(body) for name, body in sections.items()}


def script_subsections() -> dict[str, str]:
    """``### <subcommand>`` subsections under ``## Scripts`` of SKILL.md: subcommand -> body."""
    scripts_body = skill_sections(2).get("Scripts")
    assert scripts_body is not None, "SKILL.md has no '## Scripts' section"
    found: dict[str, str] = {}
    current = None
    in_fence = False
    for line in scripts_body.splitlines():
        if line.startswith(("```", "~~~")):
            in_fence = not in_fence
        heading = re.match(r"^###\s+`?([\w-]+)`?\s*$", line) if not in_fence else None
        if heading:
            current = heading.group(1)
            found[current] = ""
        elif current is not None:
            found[current] += line + "\n"
    return found


def exit_code_table() -> dict[str, tuple[str, str]]:
    """Rows of SKILL.md's exit-code table: subcommand -> (meaning of 1, meaning of 2), HTML entities decoded."""
    body = skill_sections(2).get("Exit codes")
    assert body is not None, "SKILL.md has no '## Exit codes' section"
    rows = {}
    for line in body.splitlines():
        cells = [html.unescape(cell.strip()) for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and line.lstrip().startswith("|") and not set(cells[0]) <= set("-: "):
            name = cells[0].strip("`")
            if name != "subcommand":
                rows[name] = (cells[1], cells[2])
    return rows


def script_exit_codes(module: str) -> dict[int, str]:
    codes = literal_assignment(SCRIPTS_DIR / f"{module}.py", "EXIT_CODES") or {}
    return {code: codes.get(code, NOT_USED) for code in (1, 2)}


# ================================================================ tests: links


def heading_anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = counts.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        counts[slug] = count + 1
    return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{relative(path)}: link to missing {target}")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
            problems.append(f"{relative(path)}: no heading #{anchor} in {file_part or relative(path)}")
    return problems


def test_markdown_files_exist():
    names = {relative(path) for path in markdown_files()}
    assert {"SKILL.md", "README.md", "templates/port-worksheet.md", "references/pitfalls.md"} <= names


def test_every_relative_link_resolves():
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_references_named_by_scripts_exist():
    """Scripts point users at references (``references/x.md#anchor``); each file and heading must exist."""
    problems = []
    for script in sorted(SCRIPTS_DIR.glob("*.py")):
        for name, anchor in re.findall(r"([\w-]+\.md)(?:#([\w-]+))?", script.read_text(encoding="utf-8")):
            target = REPO_ROOT / "references" / name
            if not target.is_file():
                target = REPO_ROOT / name
            if not target.is_file():
                problems.append(f"scripts/{script.name}: no {name}")
            elif anchor and anchor not in heading_anchors(target):
                problems.append(f"scripts/{script.name}: no heading #{anchor} in {name}")
    assert not problems, "\n".join(problems)


def bare_placeholders(text: str) -> list[str]:
    """``<word>`` outside code: markdown renderers drop it as an unknown HTML tag."""
    if text.startswith("---"):
        text = text.split("---", 2)[2]  # YAML front matter is not rendered as markdown
    prose = re.sub(r"<!--.*?-->", "", strip_code(text), flags=re.S)
    return re.findall(r"<[A-Za-z_/][^>\n]*>", prose)


def test_placeholders_are_inside_code():
    problems = [f"{relative(path)}: {tag}" for path in markdown_files()
                for tag in bare_placeholders(path.read_text(encoding="utf-8"))]
    assert not problems, "write placeholders in `code`: " + "\n".join(problems)
    assert bare_placeholders("run `tiny <MODEL>` on <MODEL>") == ["<MODEL>"]


def test_link_checker_catches_a_dead_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A Heading `x`\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading-x) [web](https://example.com) `[code](nope.md)`\n"
                    "[dead](missing.md) [bad anchor](there.md#nope)\n")
    found = []
    for target in LINK.findall(strip_code(page.read_text())):
        if target.startswith("https:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = tmp_path / file_part
        if not dest.exists() or (anchor and anchor not in heading_anchors(dest)):
            found.append(target)
    assert found == ["missing.md", "there.md#nope"]


def test_skill_links_every_reference_and_template():
    """Each reference and template is reachable from SKILL.md or from the pitfalls index."""
    linked: set[Path] = set()
    for source in (SKILL_MD, REPO_ROOT / "references" / "pitfalls.md"):
        for target in LINK.findall(strip_code(source.read_text(encoding="utf-8"))):
            linked.add((source.parent / target.partition("#")[0]).resolve())
    files = sorted((REPO_ROOT / "references").glob("*.md")) + sorted((REPO_ROOT / "templates").iterdir())
    unlinked = [relative(path) for path in files if path.is_file() and path.name != "conftest.py"
                and path.resolve() not in linked]
    assert not unlinked, "\n".join(unlinked)


# ================================================================ tests: scripts and flags


def test_command_parser_reads_flags_per_command():
    commands = parse_commands("x", "python scripts/import_model.py gates M --port-dir d/ --json | "
                                   "max serve --devices cpu && pixi run list-keys M --summary")
    assert [(c.program, c.flags) for c in commands] == [
        ("dispatch:gates", ["--port-dir", "--json"]),
        ("max:serve", ["--devices"]),
        ("pixi:list-keys", ["--summary"]),
    ]


def test_every_script_named_in_the_docs_exists():
    named = set()
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        named |= {(relative(path), name) for name in re.findall(r"\bscripts/(\w+)\.py\b", text)}
    missing = sorted(f"{source}: scripts/{name}.py" for source, name in named
                     if not (SCRIPTS_DIR / f"{name}.py").is_file())
    assert not missing, "\n".join(missing)


def test_every_dispatcher_subcommand_shown_exists():
    table = dispatcher_subcommands()
    problems = []
    for command in shown_commands():
        kind, _, name = command.program.partition(":")
        if kind == "dispatch" and name != "<any>":
            if name not in table:
                problems.append(f"{command.source}: unknown subcommand {name!r} in `{command.text.strip()}`")
            elif not (SCRIPTS_DIR / f"{table[name]}.py").is_file():
                problems.append(f"{command.source}: subcommand {name!r} has no script yet (scripts/{table[name]}.py)")
        if kind == "pixi" and name not in pixi_tasks():
            problems.append(f"{command.source}: no pixi task {name!r}")
    assert not problems, "\n".join(problems)


def script_exists(module: str | None) -> bool:
    """True when ``scripts/<module>.py`` exists (missing ones are reported by the existence tests)."""
    return module is not None and (SCRIPTS_DIR / f"{module}.py").is_file()


def subsections_with_scripts():
    """(subcommand, subsection text, script module) for each SKILL.md subsection whose script exists."""
    table = dispatcher_subcommands()
    for name, body in script_subsections().items():
        module = table.get(name)
        if script_exists(module):
            yield name, body, module


def test_every_flag_shown_with_a_script_is_in_its_help():
    problems = []
    for command in shown_commands():
        if command.program.startswith("max:") or not command.flags:
            continue
        module = resolve_program(command.program)
        if not script_exists(module):
            continue  # reported by the existence tests
        unknown = [flag for flag in command.flags if flag not in help_flags(script_help(module))]
        if unknown:
            problems.append(f"{command.source}: {unknown} not in scripts/{module}.py --help: `{command.text.strip()}`")
    assert not problems, "\n".join(problems)


def test_flags_listed_in_each_script_subsection_are_in_its_help():
    """Inline ``--flag`` mentions in SKILL.md's ``### <subcommand>`` subsections are real flags."""
    problems = []
    for name, body, module in subsections_with_scripts():
        known = help_flags(script_help(module))
        for span in INLINE_CODE.finditer(FENCE.sub("", body)):
            code = span.group(2).strip()
            if re.match(r"^(max|pixi|python|pytest)\b", code) or "scripts/" in code:
                continue  # full commands are checked against their own program
            for flag in re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", code):
                if flag not in known:
                    problems.append(f"### {name}: {flag} is not in scripts/{module}.py --help")
    assert not problems, "\n".join(problems)


def test_max_subcommands_and_flags_shown_exist_in_installed_max():
    """`max <sub>` commands shown exist, and their flags are in `max <sub> --help` of the installed MAX."""
    shown = [c for c in shown_commands() if c.program.startswith("max:")]
    if not shown:
        pytest.skip("the docs show no max command")
    helps = max_facts()["help"]
    if "serve" in helps:  # the help text really was read: a known flag is there, an invented one is not
        assert "--custom-architectures" in help_flags(helps["serve"])
        assert "--no-such-flag" not in help_flags(helps["serve"])
    problems = []
    for command in shown:
        sub = command.program.partition(":")[2]
        if sub not in helps:
            problems.append(f"{command.source}: `max {sub}` is not a max subcommand")
            continue
        unknown = [flag for flag in command.flags if flag not in help_flags(helps[sub])]
        if unknown:
            problems.append(f"{command.source}: {unknown} not in `max {sub} --help`: `{command.text.strip()}`")
    assert not problems, "\n".join(problems)


def test_every_script_is_described_in_skill_md():
    table = dispatcher_subcommands()
    subsections = script_subsections()
    skill_text = SKILL_MD.read_text(encoding="utf-8")
    problems = []
    for module in cli_scripts():
        if module == "import_model":
            continue
        subcommand = next((sub for sub, mod in table.items() if mod == module), None)
        if subcommand is None:
            if f"scripts/{module}.py" not in skill_text:
                problems.append(f"scripts/{module}.py is not mentioned in SKILL.md")
            continue
        body = subsections.get(subcommand)
        if body is None:
            problems.append(f"no '### {subcommand}' subsection under '## Scripts' for scripts/{module}.py")
            continue
        if f"scripts/import_model.py {subcommand}" not in body:
            problems.append(f"### {subcommand}: dispatcher form `python scripts/import_model.py {subcommand}` missing")
        if f"scripts/{module}.py" not in body:
            problems.append(f"### {subcommand}: standalone form `python scripts/{module}.py` missing")
    assert not problems, "\n".join(problems)


def test_script_subsections_name_real_subcommands():
    table = dispatcher_subcommands()
    unknown = [name for name in script_subsections() if name not in table]
    assert not unknown, "\n".join(unknown)


# ================================================================ tests: exit codes


def test_exit_code_table_matches_each_scripts_exit_codes():
    table = dispatcher_subcommands()
    rows = exit_code_table()
    problems = []
    for subcommand, module in table.items():
        if not (SCRIPTS_DIR / f"{module}.py").is_file():
            continue
        if subcommand not in rows:
            problems.append(f"exit-code table has no row for {subcommand}")
            continue
        expected = script_exit_codes(module)
        for code, shown in zip((1, 2), rows[subcommand]):
            if shown != expected[code]:
                problems.append(f"{subcommand} exit {code}: table says {shown!r}, EXIT_CODES says {expected[code]!r}")
    for subcommand in rows:
        if subcommand not in table or not (SCRIPTS_DIR / f"{table[subcommand]}.py").is_file():
            problems.append(f"exit-code table row {subcommand!r} has no script")
    assert not problems, "\n".join(problems)


def test_subsections_mention_every_exit_code_the_script_uses():
    problems = []
    for name, body, module in subsections_with_scripts():
        for code, meaning in script_exit_codes(module).items():
            if meaning != NOT_USED and not re.search(rf"\b[Ee]xit(?: code)?s? {code}\b|\b{code}\s*[:=—-]", body):
                problems.append(f"### {name}: exit {code} ({meaning}) is not explained")
    assert not problems, "\n".join(problems)


EXIT_CLAIM = re.compile(
    r"`(?:python )?(?:scripts/import_model\.py )?([\w-]+)(?:\.py)?[^`]*`"  # a script or subcommand in code
    r"[^.\n]{0,60}?\bexits? (?:with )?(?:code )?([12])\b"  # ... "exits 2" later in the same sentence
)


def false_exit_claims(text: str, source: str) -> list[str]:
    """Claims like "`audit` exits 2" in ``text`` that name a code the script marks "not used"."""
    table = dispatcher_subcommands()
    by_module = {module: sub for sub, module in table.items()}
    problems = []
    for name, code in EXIT_CLAIM.findall(FENCE.sub("", text)):
        module = table.get(name) or (name if name in by_module else None)
        if not script_exists(module):
            continue
        if script_exit_codes(module)[int(code)] == NOT_USED:
            problems.append(f"{source}: {name} never exits {code}")
    return problems


def test_exit_claims_in_prose_use_codes_the_script_uses():
    """A sentence like "`audit` exits 2" must name a code the script really uses."""
    problems = []
    for path in markdown_files():
        problems += false_exit_claims(path.read_text(encoding="utf-8"), relative(path))
    assert not problems, "\n".join(problems)


def test_exit_claim_check_catches_a_false_claim():
    text = ("Run `audit` and it exits 2 on a bad port. `check-walls` exits 2 on a blocker. "
            "`serve` exits 1 when native.")
    assert false_exit_claims(text, "x") == ["x: audit never exits 2", "x: serve never exits 1"]


# ================================================================ tests: MAX facts and templates



def test_max_api_names_shown_resolve_in_installed_max():
    """Dotted ``max.*`` names in the docs import (or are attributes) in the installed MAX."""
    assert shown_max_names(), "the docs name no max.* API (the check would prove nothing)"
    unresolved = max_facts()["unresolved"]
    assert MISSING_MAX_NAME in unresolved, "the probe failed to flag a name that does not exist"
    assert [name for name in unresolved if name != MISSING_MAX_NAME] == []


def test_references_that_state_max_facts_name_the_checked_version():
    """A reference that shows max CLI flags or max.* APIs says which MAX release it was checked on."""
    problems = []
    for path in sorted((REPO_ROOT / "references").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        states_max_facts = any(c.program.startswith("max:") for s in code_snippets(text)
                               for c in parse_commands(relative(path), s)) or MAX_NAME.search(FENCE.sub("", text))
        if states_max_facts and "MAX 26.7" not in text:
            problems.append(relative(path))
    assert not problems, "\n".join(problems)


def test_every_wall_code_is_explained_in_recognize_walls():
    """Every finding code the wall catalogue (wall_scan.py) emits has a row with the same level, none invented."""
    source = (SCRIPTS_DIR / "wall_scan.py").read_text(encoding="utf-8")
    emitted = set(re.findall(r'_finding\(\s*"(\w+)",\s*([A-Z]+)', source))
    assert emitted, "no finding codes found in scripts/wall_scan.py"
    walls_doc = (REPO_ROOT / "references" / "recognize-walls.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \| (\w+) \|", walls_doc, re.M))
    documented = {(code, level.upper()) for code, level in documented}
    assert sorted(emitted - documented) == [], "wall codes or levels missing from references/recognize-walls.md"
    assert sorted(documented - emitted) == [], "recognize-walls.md documents codes wall_scan.py never emits"


def test_every_delta_signal_code_is_in_the_delta_signal_table():
    emitted = set(re.findall(r'\.add\(\s*"(\w+)"', (SCRIPTS_DIR / "delta_signals.py").read_text(encoding="utf-8")))
    assert emitted, "no signal codes found in scripts/delta_signals.py"
    text = (REPO_ROOT / "references" / "read-config-json.md").read_text(encoding="utf-8")
    table = text.split("## The delta-signal table", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert sorted(emitted - documented) == [], "delta-signal codes missing from references/read-config-json.md"
    assert sorted(documented - emitted) == [], "read-config-json.md documents codes inspect never reports"


def test_audit_marker_in_the_docs_is_the_one_audit_accepts():
    syntax = literal_assignment(SCRIPTS_DIR / "audit_docstrings.py", "MARKER_SYNTAX")
    assert syntax, "scripts/audit_docstrings.py declares no MARKER_SYNTAX"
    for path in (SKILL_MD, REPO_ROOT / "references" / "honest-docstrings.md"):
        assert syntax in path.read_text(encoding="utf-8"), f"{relative(path)} does not show {syntax}"
    import audit_docstrings  # metadata-only: imports neither torch nor max

    examples = re.findall(r"\[audit-ok: [^\]<]+\]", (REPO_ROOT / "references" / "honest-docstrings.md").read_text())
    assert examples, "honest-docstrings.md shows no filled-in marker example"
    assert all(audit_docstrings.MARKER.search(example) for example in examples)


def test_port_test_template_is_valid_and_compiles_once_per_module():
    tree = ast.parse(TEMPLATE_TEST.read_text(encoding="utf-8"))
    source = TEMPLATE_TEST.read_text(encoding="utf-8")
    module_fixtures = [
        node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(d) and "module" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert module_fixtures, "the template has no module-scoped fixture"
    assert "pytest.mark.parametrize" in source
    assert "pytest.mark.e2e" in source


def test_pytest_does_not_collect_the_template_outside_tests(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "templates"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert "test_port_template" not in done.stdout
    assert done.returncode == 5, done.stdout + done.stderr  # 5: no tests collected


# ================================================================ tests: the worked port, ports and verdicts

SHIPPED_PORTS = REPO_ROOT / "templates" / "ports"
# A fixed server port in a shown command (`--port 8000`, `--control-port=8001`): serve picks a free one.
FIXED_PORT = re.compile(r"--(?:control-)?port[ =]\d+")


def test_the_worked_port_lives_where_users_copy_from():
    manifest = json.loads((SHIPPED_PORTS / "stablelm" / "scaffold_manifest.json").read_text(encoding="utf-8"))
    assert manifest["verified"]["by"] == "tests/test_stablelm_port_e2e.py"
    assert (REPO_ROOT / manifest["verified"]["by"]).is_file()
    for key in ("port_dir", "custom_architectures"):
        assert manifest[key] == "templates/ports/stablelm", key  # relative: the checkout may live anywhere
    listed = {entry["path"] for entry in manifest["files"]}
    present = {p.relative_to(SHIPPED_PORTS / "stablelm").as_posix()
               for p in (SHIPPED_PORTS / "stablelm").rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == present, "the manifest's files list must match the shipped files"
    worked = (REPO_ROOT / "references" / "worked-example-stablelm.md").read_text(encoding="utf-8")
    assert "(../templates/ports/stablelm)" in worked
    stale = [relative(p) for p in [*markdown_files(), *sorted(SCRIPTS_DIR.glob("*.py"))]
             if "tests/ports" in p.read_text(encoding="utf-8")]
    assert not stale, "still naming the old tests/ports location: " + ", ".join(stale)


def test_no_shown_command_fixes_a_server_port():
    found = [f"{relative(path)}: {match}" for path in markdown_files()
             for snippet in code_snippets(path.read_text(encoding="utf-8"))
             for match in FIXED_PORT.findall(snippet)]
    assert not found, "\n".join(found)
    assert FIXED_PORT.findall("serve M --port 8000 && eval M --control-port=8001") == ["--port 8000",
                                                                                        "--control-port=8001"]
    assert not FIXED_PORT.findall("compare M --port <port> --port-dir d")


def test_the_verdict_rule_names_the_users_model():
    rule = "verdict that counts is on the model the user named"
    for path in (SKILL_MD, REPO_ROOT / "references" / "serve-and-iterate.md"):
        text = " ".join(path.read_text(encoding="utf-8").split())
        assert rule in text.lower() or rule in text, relative(path)
        assert "compile-cache hit" in text, relative(path)


def test_port_donors_are_documented_where_donors_are_chosen():
    for path in (SKILL_MD, REPO_ROOT / "references" / "map-to-max.md"):
        text = path.read_text(encoding="utf-8")
        assert "--start-from templates/ports/stablelm" in text and "verified_ports" in text, relative(path)


# ================================================================ tests: the building blocks in implement-graph

IMPLEMENT_GRAPH = REPO_ROOT / "references" / "implement-graph.md"
BLOCKS_CATALOG = REPO_ROOT / "templates" / "blocks" / "__init__.py"
DOCS_BLOCK_CATALOG_MODULE = "_docs_block_catalog"  # sys.modules name; the catalog's dataclass needs its module
BLOCKS_TABLE = "The blocks"  # the ### headings of implement-graph.md that hold the three tables
CODES_TO_BLOCKS_TABLE = "From delta codes to blocks"
UNCOVERED_TABLE = "Codes no block covers yet"


def block_catalog_entries() -> dict[str, tuple[str, ...]]:
    """Block name -> the names it provides, from templates/blocks/__init__.py (metadata only: no block, no max)."""
    module = sys.modules.get(DOCS_BLOCK_CATALOG_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(DOCS_BLOCK_CATALOG_MODULE, BLOCKS_CATALOG)
        module = importlib.util.module_from_spec(spec)
        sys.modules[DOCS_BLOCK_CATALOG_MODULE] = module
        spec.loader.exec_module(module)
    return {block.name: tuple(block.provides) for block in module.BLOCKS}


def table_under(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the markdown table in the ``### heading`` section of ``text``; [] if none."""
    match = re.search(rf"^###\s+{re.escape(heading)}\s*$(.*?)(?=^#{{1,3}}\s|\Z)", text, re.M | re.S)
    if match is None:
        return []
    rows = []
    for line in match.group(1).splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(set(cell) <= set("-: ") for cell in cells):
            continue  # the separator row
        rows.append(cells)
    return rows[1:]  # rows[0] is the header


def first_code(cell: str) -> str:
    """The first `code` span of a table cell (the cell itself when it has none)."""
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else cell


def block_doc_problems(text: str, catalog: dict[str, tuple[str, ...]], codes: set[str]) -> list[str]:
    """What ``text`` (implement-graph.md) gets wrong about the block catalog and the delta codes."""
    problems = []
    documented = {first_code(row[0]) for row in table_under(text, BLOCKS_TABLE)}
    problems += [f"block {name!r} is not in the '{BLOCKS_TABLE}' table" for name in sorted(set(catalog) - documented)]
    problems += [f"the '{BLOCKS_TABLE}' table names {name!r}, which the catalog does not have"
                 for name in sorted(documented - set(catalog))]
    problems += [f"{name!r} (block {block}) is not named in the doc"
                 for block, names in sorted(catalog.items()) for name in names if f"`{name}`" not in text]
    mapped = [(first_code(row[0]), first_code(row[1])) for row in table_under(text, CODES_TO_BLOCKS_TABLE)]
    uncovered = {first_code(row[0]) for row in table_under(text, UNCOVERED_TABLE)}
    problems += [f"delta code {code!r} in '{CODES_TO_BLOCKS_TABLE}' is not in scripts/delta_codes.py"
                 for code in sorted({code for code, _ in mapped} - codes)]
    problems += [f"delta code {code!r} in '{UNCOVERED_TABLE}' is not in scripts/delta_codes.py"
                 for code in sorted(uncovered - codes)]
    problems += [f"delta code {code!r} is mapped to {block!r}, which is not a catalog block"
                 for code, block in mapped if block not in catalog]
    mapped_codes = {code for code, _ in mapped}
    problems += [f"delta code {code!r} is both mapped to a block and listed as uncovered"
                 for code in sorted(mapped_codes & uncovered)]
    problems += [f"delta code {code!r} is neither mapped to a block nor listed as uncovered"
                 for code in sorted(codes - mapped_codes - uncovered)]
    problems += [f"block {name!r} implements no delta code in '{CODES_TO_BLOCKS_TABLE}'"
                 for name in sorted(set(catalog) - {block for _, block in mapped})]
    return problems


def test_implement_graph_documents_every_block_and_maps_real_delta_codes():
    import delta_codes  # metadata-only: imports nothing heavy

    catalog = block_catalog_entries()
    assert catalog, "templates/blocks/__init__.py lists no block"
    codes = {code.value for code in delta_codes.DeltaCode}
    text = IMPLEMENT_GRAPH.read_text(encoding="utf-8")
    assert table_under(text, CODES_TO_BLOCKS_TABLE), "implement-graph.md maps no delta code to a block"
    problems = block_doc_problems(text, catalog, codes)
    assert not problems, "\n".join(problems)


def test_block_doc_check_catches_an_undocumented_block_and_a_made_up_code():
    text = ("### The blocks\n\n| name | provides |\n|---|---|\n| `norms` (`norms.py`) | `LayerNormF32` |\n\n"
            "### From delta codes to blocks\n\n| code | block | setting |\n|---|---|---|\n"
            "| `layernorm` | `norms` | x |\n| `made_up` | `norms` | x |\n| `moe` | `nope` | x |\n\n"
            "### Codes no block covers yet\n\n| code | instead |\n|---|---|\n| `layernorm` | x |\n\n## Next\n")
    catalog = {"norms": ("LayerNormF32", "RMSNormF32"), "moe": ("DenseMoE",)}
    problems = block_doc_problems(text, catalog, {"layernorm", "moe", "ssm"})
    assert problems == [
        "block 'moe' is not in the 'The blocks' table",
        "'DenseMoE' (block moe) is not named in the doc",
        "'RMSNormF32' (block norms) is not named in the doc",
        "delta code 'made_up' in 'From delta codes to blocks' is not in scripts/delta_codes.py",
        "delta code 'moe' is mapped to 'nope', which is not a catalog block",
        "delta code 'layernorm' is both mapped to a block and listed as uncovered",
        "delta code 'ssm' is neither mapped to a block nor listed as uncovered",
        "block 'moe' implements no delta code in 'From delta codes to blocks'",
    ]
