"""The demo (README's first command) runs every phase and ends with MATCH.

One MAX compile: the demo's scaffolded identity port, served on the CPU.
"""

from __future__ import annotations

import pytest

from conftest import run_script

pytestmark = pytest.mark.e2e

EXPECTED_STEPS = ["tiny", "list-archs", "inspect", "check-walls", "list-keys", "scaffold", "audit", "gates",
                  "gates", "serve", "compare"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("demo")
    result = run_script("import_model", "demo", "--json", "--workdir", str(workdir), timeout=3000)
    return result, workdir


def test_demo_ends_with_match(demo_run) -> None:
    result, _ = demo_run
    assert result.returncode == 0, result.stderr[-2000:]
    document = result.json()
    assert document["verdict"] == "MATCH"
    assert document["exit_code"] == 0


def test_demo_runs_every_phase_in_order(demo_run) -> None:
    result, _ = demo_run
    steps = result.json()["steps"]
    assert [step["name"] for step in steps] == EXPECTED_STEPS
    codes = {step["name"]: step["exit_code"] for step in steps}
    # The demo architecture is unknown to MAX (list-archs exit 1) and not shipped by
    # transformers under that name (check-walls and inspect warn, exit 1); nothing else fails.
    assert codes["list-archs"] == 1
    assert codes["check-walls"] == 1
    assert codes["inspect"] == 1  # inspect runs the wall scan first: the same warning, the same exit 1
    assert codes["audit"] == 1  # a fresh scaffold still has donor mentions to review
    for name in ("tiny", "list-keys", "scaffold", "gates", "serve", "compare"):
        assert codes[name] == 0, (name, steps)


def test_demo_compare_is_within_fp32_tolerance(demo_run) -> None:
    from tolerances import logprob_atol

    result, workdir = demo_run
    compare = [step for step in result.json()["steps"] if step["name"] == "compare"][0]
    assert compare["details"]["verdict"] == "MATCH"
    assert compare["details"]["max_abs_diff"] < logprob_atol("float32")
    assert (workdir / "port" / "demo_llama" / "demo_llama.py").is_file()
