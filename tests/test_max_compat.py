"""max_compat is the one place the tools reach MAX internals: every entry resolves, and nothing else imports them."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO_ROOT

import max_compat

SCRIPTS = REPO_ROOT / "scripts"


def test_every_internal_resolves_in_the_installed_max():
    """A fresh process (the suite may have imported MAX already): each INTERNALS entry imports."""
    code = ("import sys; sys.path.insert(0, %r); import max_compat\n"
            "print(sorted(n for n in max_compat.INTERNALS if max_compat.internal(n) is None))" % str(SCRIPTS))
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_no_script_imports_an_internal_module_directly():
    """The internal modules named in INTERNALS appear in no script's import lines outside max_compat."""
    modules = {module for module, _attr, _why in max_compat.INTERNALS.values()}
    modules |= {f"{module}.{attr}" for module, attr, _why in max_compat.INTERNALS.values() if attr}
    offenders = []
    for path in sorted(SCRIPTS.glob("*.py")):
        if path.name == "max_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = re.match(r"\s*(?:from\s+(\S+)\s+import\s+(\w+)|import\s+(\S+))", line)
            if not found:
                continue
            names = {found.group(1) or found.group(3)}
            if found.group(1):
                names.add(f"{found.group(1)}.{found.group(2)}")
            if names & modules:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_the_release_is_the_version_everyone_names():
    import cli_support
    import max_cache
    import max_registry

    assert max_compat.CHECKED_MAX_VERSION.startswith(max_compat.CHECKED_MAX_RELEASE + ".")
    assert cli_support.TESTED_MAX_VERSIONS == (max_compat.CHECKED_MAX_RELEASE,)
    assert max_cache.CHECKED_MAX_VERSION == max_registry.MEASURED_MAX_VERSION == max_compat.CHECKED_MAX_RELEASE
