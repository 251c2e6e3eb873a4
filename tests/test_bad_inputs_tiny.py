"""Bad inputs for ``tiny`` (make_tiny_model.py): each fails with one line and exit 3, and loses nothing.

Every case gets a fresh layout: ``P/model`` (a small checkpoint), an unrelated
``P/notes.txt``, and ``P/replica`` as the default output. ``P`` is protected in
every case, so a case that deletes or writes anything there fails; data-loss
cases also protect the folders their ``--output`` names. The last tests are the
good runs that must keep what they did not make (``--force`` backups, a
foreign ``<output>.partial``, staging cleanup).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from bad_inputs import BadCase, check_bad_case, tree_hash
from checkpoints import edit_config
from conftest import run_script

import tiny_config
from make_tiny_model import MANIFEST, MAX_SEED, MAX_STD, STAGING_PREFIX

SCRIPT = "make_tiny_model"
# A folder root cannot write into even as root (procfs refuses new entries).
UNWRITABLE_PARENT = Path("/proc/import-model-tiny-test")
# Size cases must fail fast: before the fix, num_hidden_layers 1e9 ran for minutes.
FAST_TIMEOUT = 60


@dataclass
class Layout:
    """The folders one case works in."""

    root: Path
    parent: Path  # P: holds the model and an unrelated file
    model: Path  # P/model
    notes: Path  # P/notes.txt
    output: Path  # P/replica (not created)


@pytest.fixture
def layout(tmp_path, checkpoint_factory) -> Layout:
    parent = tmp_path / "P"
    model = parent / "model"
    shutil.copytree(checkpoint_factory("llama"), model)
    notes = parent / "notes.txt"
    notes.write_text("unrelated notes\n")
    return Layout(tmp_path, parent, model, notes, parent / "replica")


def _case(case_id: str, layout: Layout, args: list[Any], *message: str, protect: tuple[Path, ...] = (),
          timeout: float = FAST_TIMEOUT) -> BadCase:
    return BadCase(case_id, SCRIPT, [str(a) for a in args], message=message,
                   protect=[layout.parent, layout.model, *protect], timeout=timeout)


def _run(layout: Layout, *flags: Any) -> list[Any]:
    return [layout.model, "--output", layout.output, *flags]


# --- data loss: the output is, contains or lies inside the source; --force on a foreign folder ---


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


DATA_LOSS: dict[str, Callable[[Layout], BadCase]] = {
    "output-is-source": lambda L: _case("output-is-source", L, [L.model, "--output", L.model, "--force"],
                                        "source model folder itself", str(L.model)),
    "output-is-source-parent": lambda L: _case(
        "output-is-source-parent", L, [L.model, "--output", L.parent, "--force"], "contains", str(L.parent)),
    "output-is-source-grandparent": lambda L: _case(
        "output-is-source-grandparent", L, [L.model, "--output", L.root, "--force"], "contains"),
    "output-inside-source": lambda L: _case(
        "output-inside-source", L, [L.model, "--output", L.model / "sub", "--force"], "lies inside"),
    "output-parent-via-dotdot": lambda L: _case(
        "output-parent-via-dotdot", L, [L.model, "--output", f"{L.model}/..", "--force"], "contains"),
    "config-path-output-is-its-folder": lambda L: _case(
        "config-path-output-is-its-folder", L, [L.model / "config.json", "--output", L.model, "--force"],
        "itself"),
    "config-path-output-is-parent": lambda L: _case(
        "config-path-output-is-parent", L, [L.model / "config.json", "--output", L.parent, "--force"], "contains"),
    "output-link-to-source": lambda L: _case(
        "output-link-to-source", L, [L.model, "--output", _link(L.root / "lnk", L.model), "--force"], "itself"),
    "source-link-output-target": lambda L: _case(
        "source-link-output-target", L, [_link(L.root / "src", L.model), "--output", L.model, "--force"],
        "itself"),
    "source-link-output-parent": lambda L: _case(
        "source-link-output-parent", L, [_link(L.root / "src", L.model), "--output", L.parent, "--force"],
        "contains"),
}


def _foreign_folder(L: Layout, with_manifest: bool = False) -> Path:
    folder = L.parent / "other"
    folder.mkdir()
    (folder / "work.txt").write_text("someone's work\n")
    if with_manifest:
        (folder / MANIFEST).write_text("{}\n")
    return folder


DATA_LOSS.update({
    "force-on-folder-without-manifest": lambda L: _case(
        "force-on-folder-without-manifest", L, [L.model, "--output", _foreign_folder(L), "--force"],
        MANIFEST, "other"),
    "existing-replica-without-force": lambda L: _case(
        "existing-replica-without-force", L, [L.model, "--output", _foreign_folder(L, True)], "--force"),
})

# --- --output of the wrong kind ------------------------------------------------------------------


def _loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


OUTPUT_KINDS: dict[str, Callable[[Layout], BadCase]] = {
    "output-below-file": lambda L: _case("output-below-file", L, _run(L)[:2] + [L.notes / "sub"],
                                         "below", "notes.txt"),
    "output-below-file-deep": lambda L: _case("output-below-file-deep", L, [L.model, "--output", L.notes / "a/b"],
                                              "below"),
    "output-is-file": lambda L: _case("output-is-file", L, [L.model, "--output", L.notes, "--force"],
                                      "is a file", "notes.txt"),
    "output-is-config-json": lambda L: _case(
        "output-is-config-json", L, [L.model, "--output", L.model / "config.json", "--force"], "is a file"),
    "output-link-loop": lambda L: _case("output-link-loop", L, [L.model, "--output", _loop(L.parent / "loop")],
                                        "link loop", "loop"),
    "output-below-link-loop": lambda L: _case(
        "output-below-link-loop", L, [L.model, "--output", _loop(L.parent / "loop") / "sub"], "loop"),
    "output-dangling-link": lambda L: _case(
        "output-dangling-link", L, [L.model, "--output", _link(L.parent / "dangling", L.parent / "gone")],
        "dangling", "dangling"),
    "output-below-dangling-link": lambda L: _case(
        "output-below-dangling-link", L,
        [L.model, "--output", _link(L.parent / "dangling", L.parent / "gone") / "sub"], "dangling"),
    "output-empty": lambda L: _case("output-empty", L, [L.model, "--output", ""], "--output is empty"),
    "output-blank": lambda L: _case("output-blank", L, [L.model, "--output", "   "], "--output is empty"),
    "output-parent-unwritable": lambda L: _case(
        "output-parent-unwritable", L, [L.model, "--output", UNWRITABLE_PARENT / "replica"], "cannot create",
        str(UNWRITABLE_PARENT)),
    "output-in-unwritable-folder": lambda L: _case(
        "output-in-unwritable-folder", L, [L.model, "--output", Path("/proc") / "replica"], "cannot write", "/proc"),
}

# --- source config: sizes, numbers and types tiny reads ------------------------------------------


def _config_case(case_id: str, edits: dict[str, Any], *message: str) -> Callable[[Layout], BadCase]:
    def build(L: Layout) -> BadCase:
        edit_config(L.model, edits)
        return _case(case_id, L, _run(L), "config.json", *message)
    return build


CONFIG_FIELDS: dict[str, Callable[[Layout], BadCase]] = {
    case_id: _config_case(case_id, edits, *message) for case_id, edits, message in [
        ("layers-1e9-float", {"num_hidden_layers": 1e9}, ("num_hidden_layers",)),
        ("layers-huge-int", {"num_hidden_layers": 10**9}, ("num_hidden_layers", str(tiny_config.MAX_SOURCE_LAYERS))),
        ("layers-zero", {"num_hidden_layers": 0}, ("num_hidden_layers",)),
        ("layers-negative", {"num_hidden_layers": -2}, ("num_hidden_layers",)),
        ("layers-bool", {"num_hidden_layers": True}, ("num_hidden_layers",)),
        ("layers-string", {"num_hidden_layers": "2"}, ("num_hidden_layers",)),
        ("heads-string", {"num_attention_heads": "4"}, ("num_attention_heads",)),
        ("heads-zero", {"num_attention_heads": 0}, ("num_attention_heads",)),
        ("kv-heads-negative", {"num_key_value_heads": -1}, ("num_key_value_heads",)),
        ("gqa-ratio-huge", {"num_attention_heads": 4096, "num_key_value_heads": 2}, ("num_key_value_heads",)),
        ("hidden-fraction", {"hidden_size": 64.5}, ("hidden_size",)),
        ("hidden-huge", {"hidden_size": 10**12}, ("hidden_size",)),
        ("intermediate-negative", {"intermediate_size": -1}, ("intermediate_size",)),
        ("vocab-zero", {"vocab_size": 0}, ("vocab_size",)),
        ("vocab-huge", {"vocab_size": 10**12}, ("vocab_size",)),
        ("head-dim-string", {"head_dim": "16"}, ("head_dim",)),
        ("max-positions-infinite", {"max_position_embeddings": float("inf")}, ("max_position_embeddings",)),
        ("sliding-window-string", {"sliding_window": "4096"}, ("sliding_window",)),
        ("num-experts-string", {"num_experts": "8"}, ("num_experts",)),
        ("decoder-sparse-step-negative", {"decoder_sparse_step": -1}, ("decoder_sparse_step",)),
        ("mlp-only-layers-strings", {"mlp_only_layers": ["a"]}, ("mlp_only_layers",)),
        ("rope-theta-string", {"rope_theta": "10000"}, ("rope_theta",)),
        ("rope-theta-nan", {"rope_theta": float("nan")}, ("rope_theta",)),
        ("rope-theta-negative", {"rope_theta": -1.0}, ("rope_theta",)),
        ("partial-rotary-string", {"partial_rotary_factor": "half"}, ("partial_rotary_factor",)),
        ("partial-rotary-above-one", {"partial_rotary_factor": 2.0}, ("partial_rotary_factor",)),
        ("partial-rotary-zero", {"partial_rotary_factor": 0}, ("partial_rotary_factor",)),
        ("model-type-int", {"model_type": 7}, ("model_type",)),
        ("model-type-list", {"model_type": ["llama"]}, ("model_type",)),
        ("rope-scaling-string", {"rope_scaling": "linear"}, ("rope_scaling",)),
        ("rope-scaling-factor-string", {"rope_scaling": {"rope_type": "linear", "factor": "2"}}, ("factor",)),
        ("rope-scaling-type-int", {"rope_scaling": {"rope_type": 3, "factor": 2.0}}, ("rope_type",)),
        ("rope-long-factor-strings", {"rope_scaling": {"rope_type": "longrope", "long_factor": ["x"],
                                                       "short_factor": [1.0]}}, ("long_factor",)),
        ("text-config-list", {"text_config": [1, 2]}, ("text_config",)),
        ("architectures-string", {"architectures": "LlamaForCausalLM"}, ("architectures",)),
        ("architectures-number", {"architectures": [5]}, ("architectures",)),
        ("eos-token-string", {"eos_token_id": "</s>"}, ("eos_token_id",)),
        ("hidden-act-int", {"hidden_act": 5}, ("hidden_act",)),
        ("rms-eps-string", {"rms_norm_eps": "1e-5"}, ("rms_norm_eps",)),
        ("layer-types-string", {"layer_types": "full_attention"}, ("layer_types",)),
        ("query-pre-attn-scalar-string", {"query_pre_attn_scalar": "x"}, ("query_pre_attn_scalar",)),
    ]
}


def _replica_case(case_id: str, edits: dict[str, Any], flags: list[str], *message: str) -> Callable[[Layout], BadCase]:
    """A source whose fields are fine but whose replica would not be tiny (named by size, not by field)."""
    def build(L: Layout) -> BadCase:
        edit_config(L.model, edits, remove=("head_dim",))
        return _case(case_id, L, _run(L, *flags), *message)
    return build


CONFIG_FIELDS.update({
    # GQA ratio 64 (allowed) keeps 128 query heads; at --head-dim 128 the replica would be 16384 wide.
    "replica-too-wide": _replica_case(
        "replica-too-wide", {"num_attention_heads": 128, "num_key_value_heads": 2, "hidden_size": 128 * 128},
        ["--head-dim", "128"], "hidden_size", str(tiny_config.MAX_REPLICA_HIDDEN)),
    # Every layer differs in a per-layer list, so every layer is a distinct type that must be kept.
    "replica-too-many-layers": _replica_case(
        "replica-too-many-layers", {"num_hidden_layers": 100, "per_layer_scale": list(range(100))}, [],
        "100 layers", str(tiny_config.MAX_REPLICA_LAYERS)),
})


# --- source files and folders of the wrong kind ------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.unlink()
    path.write_bytes(data)
    return path


def _config_file_case(case_id: str, make: Callable[[Path], Any], *message: str) -> Callable[[Layout], BadCase]:
    def build(L: Layout) -> BadCase:
        make(L.model / "config.json")
        return _case(case_id, L, _run(L), "config.json", *message)
    return build


def _replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_with_link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


SOURCE_FILES: dict[str, Callable[[Layout], BadCase]] = {
    "config-json-list": _config_file_case("config-json-list", lambda p: _write(p, b"[1, 2]"), "JSON array"),
    "config-json-string": _config_file_case("config-json-string", lambda p: _write(p, b'"llama"'), "string"),
    "config-nested-too-deep-to-parse": _config_file_case(
        "config-nested-too-deep-to-parse", lambda p: _write(p, b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        "nested too deep"),
    "config-nested-deep": _config_file_case(
        "config-nested-deep", lambda p: _write(p, b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama", '
                                               b'"x": ' + b"[" * 200 + b"]" * 200 + b"}"), "deep"),
    "config-not-utf8": _config_file_case("config-not-utf8", lambda p: _write(p, b'{"model_type": "\xff\xfe"}'),
                                         "UTF-8"),
    "config-invalid-json": _config_file_case("config-invalid-json", lambda p: _write(p, b'{"model_type": '),
                                             "not valid JSON"),
    "config-empty-file": _config_file_case("config-empty-file", lambda p: _write(p, b""), "not valid JSON"),
    "config-is-folder": _config_file_case("config-is-folder", _replace_with_folder, "folder"),
    "config-dangling-link": _config_file_case("config-dangling-link", lambda p: _replace_with_link(p, "gone.json"),
                                              "dangling"),
    "config-link-loop": _config_file_case("config-link-loop", lambda p: _replace_with_link(p, "config.json"),
                                          "loop"),
    "source-is-unrelated-file": lambda L: _case(
        "source-is-unrelated-file", L, [L.notes, "--output", L.output], "not a config.json", "notes.txt"),
    "source-link-loop": lambda L: _case(
        "source-link-loop", L, [_loop(L.parent / "srcloop"), "--output", L.output], "loop", "srcloop"),
    "source-dangling-link": lambda L: _case(
        "source-dangling-link", L, [_link(L.parent / "srclink", L.parent / "gone"), "--output", L.output],
        "dangling", "srclink"),
    "source-missing": lambda L: _case(
        "source-missing", L, [L.parent / "nope", "--output", L.output], "not found", "nope"),
    "source-folder-without-config": lambda L: _case(
        "source-folder-without-config", L, [_empty_folder(L.parent / "empty"), "--output", L.output],
        "config.json not found"),
    "source-empty": lambda L: _case("source-empty", L, ["", "--output", L.output], "MODEL is empty"),
    "revision-on-local-folder": lambda L: _case(
        "revision-on-local-folder", L, _run(L, "--revision", "main"), "--revision applies to Hub IDs only"),
    "remote-code-without-trust": lambda L: _remote_code_case(L),
}


def _empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


def _remote_code_case(L: Layout) -> BadCase:
    edit_config(L.model, {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    return _case("remote-code-without-trust", L, _run(L), "--trust-remote-code")


# --- flags ----------------------------------------------------------------------------------------------

FLAGS: dict[str, Callable[[Layout], BadCase]] = {
    case_id: (lambda L, case_id=case_id, flags=flags, message=message: _case(case_id, L, _run(L, *flags), *message))
    for case_id, flags, message in [
        ("init-std-nan", ["--init-std", "nan"], ("--init-std", "nan")),
        ("init-std-inf", ["--init-std", "inf"], ("--init-std",)),
        ("init-std-negative", ["--init-std", "-1"], ("--init-std",)),
        ("init-std-zero", ["--init-std", "0"], ("--init-std", "above 0")),
        ("init-std-huge", ["--init-std", "1e6"], ("--init-std", f"{MAX_STD:g}")),
        ("norm-std-nan", ["--norm-std", "nan"], ("--norm-std",)),
        ("bias-std-minus-inf", ["--bias-std=-inf"], ("--bias-std", "-inf")),
        ("init-std-text", ["--init-std", "big"], ("--init-std",)),
        ("seed-negative", ["--seed", "-1"], ("--seed",)),
        ("seed-huge", ["--seed", str(2**70)], ("--seed", str(MAX_SEED))),
        ("seed-fraction", ["--seed", "1.5"], ("--seed",)),
        ("layers-flag-zero", ["--layers", "0"], ("--layers",)),
        ("layers-flag-huge", ["--layers", "1000000000"], ("--layers", str(tiny_config.MAX_REPLICA_LAYERS))),
        ("layers-flag-exponent", ["--layers", "1e9"], ("--layers",)),
        ("head-dim-odd", ["--head-dim", "15"], ("--head-dim", "even")),
        ("head-dim-zero", ["--head-dim", "0"], ("--head-dim",)),
        ("head-dim-huge", ["--head-dim", "100000"], ("--head-dim",)),
        ("hidden-size-flag-huge", ["--hidden-size", str(10**9)], ("--hidden-size",)),
        ("hidden-size-flag-negative", ["--hidden-size", "-64"], ("--hidden-size",)),
        ("sliding-window-zero", ["--sliding-window", "0"], ("--sliding-window",)),
        ("sliding-window-huge", ["--sliding-window", str(10**12)], ("--sliding-window",)),
        ("dtype-unknown", ["--dtype", "int8"], ("--dtype",)),
        ("init-mode-unknown", ["--init", "zeros"], ("--init",)),
    ]
}

ALL_CASES = {**DATA_LOSS, **OUTPUT_KINDS, **CONFIG_FIELDS, **SOURCE_FILES, **FLAGS}


@pytest.mark.parametrize("case_id", list(ALL_CASES))
def test_bad_input(case_id, layout):
    case = ALL_CASES[case_id](layout)
    check_bad_case(case)
    assert not [p for p in layout.parent.rglob("*") if p.name.startswith(STAGING_PREFIX)]


def test_enough_cases():
    """Issue 12 asks for the named cases and at least 12 more of tiny's own."""
    assert len(ALL_CASES) >= 60


# --- good runs that must keep what they did not make ---------------------------------------------------


def test_force_moves_the_old_replica_to_a_backup_and_keeps_a_foreign_partial(layout):
    partial = layout.parent / "replica.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("not tiny's\n")
    partial_hash, model_hash, notes = tree_hash(partial), tree_hash(layout.model), layout.notes.read_text()

    first = run_script(SCRIPT, *map(str, _run(layout)), "--json")
    assert first.returncode == 0, first.stderr
    assert first.json()["backup"] is None
    first_manifest = (layout.output / MANIFEST).read_text()

    second = run_script(SCRIPT, *map(str, _run(layout, "--force")))
    assert second.returncode == 0, second.stderr
    backups = sorted(layout.parent.glob("replica.bak-*"))
    assert len(backups) == 1 and (backups[0] / MANIFEST).read_text() == first_manifest
    assert f"previous replica moved to {backups[0]}" in second.stdout
    assert (layout.output / MANIFEST).is_file()
    assert tree_hash(partial) == partial_hash and tree_hash(layout.model) == model_hash
    assert layout.notes.read_text() == notes
    names = sorted(p.name for p in layout.parent.iterdir())
    assert names == sorted(["model", "notes.txt", "replica", "replica.partial", backups[0].name])
    assert oct(os.stat(layout.output).st_mode & 0o777) != oct(0o700)  # not left private like a temp folder


def test_a_failed_build_removes_its_staging_folder_and_the_parents_it_made(layout):
    edit_config(layout.model, {"model_type": "no_such_family", "architectures": ["NoSuchForCausalLM"]})
    before = tree_hash(layout.parent)
    result = run_script(SCRIPT, str(layout.model), "--output", str(layout.parent / "a" / "b" / "replica"), "--json")
    assert result.returncode == 3 and json.loads(result.stdout)["exit_code"] == 3
    assert "Traceback" not in result.stderr
    assert not (layout.parent / "a").exists()
    assert tree_hash(layout.parent) == before


@pytest.mark.parametrize("widths,named", [
    ([16384, "wide"], "intermediate_size"),  # a list entry that is not a number
    ([16384, 1.5], "intermediate_size"),  # a fraction inside a per-layer list
    ([16384, 0], "intermediate_size[1]"),  # a zero-width layer
])
def test_a_bad_per_layer_width_list_is_refused_naming_the_entry(widths, named):
    """Per-layer FFN widths (Gemma 3n) are a list; a bad entry is one ScriptError naming the field."""
    config = {"architectures": ["Gemma3nForCausalLM"], "model_type": "gemma3n_text", "num_hidden_layers": 2,
              "hidden_size": 64, "intermediate_size": widths}
    with pytest.raises(tiny_config.ScriptError, match=named.replace("[", r"\[")):
        tiny_config.check_source_config(config)
    tiny_config.check_source_config(config | {"intermediate_size": [16384, 8192]})  # a good list passes
