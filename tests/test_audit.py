"""Tests for audit_docstrings.py: scope, hits against cleared mentions, planted lies, the marker, --approve."""

from __future__ import annotations

import ast
import json
import shutil
import textwrap
from pathlib import Path

import pytest

import scaffold
from conftest import run_script

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKED_PORT = next((p for p in (REPO_ROOT / "templates" / "ports" / "stablelm", REPO_ROOT / "tests" / "ports" / "stablelm")
                    if p.is_dir()), None)

ARCH_PY = ('from max.pipelines.lib import SupportedArchitecture\n\n'
           'arch = SupportedArchitecture(name="{arch}", multi_gpu_supported={multi})\n')


def make_port(root: Path, files: dict[str, str], slug: str = "xllama", donor: str = "llama3",
              arch: str = "XLlamaForCausalLM", multi: bool = False, manifest: dict | None = None) -> Path:
    port = root / slug
    port.mkdir(parents=True)
    (port / "__init__.py").write_text("ARCHITECTURES = []\n")
    (port / "arch.py").write_text(ARCH_PY.format(arch=arch, multi=multi))
    (port / "scaffold_manifest.json").write_text(json.dumps({"donor": donor, "arch_name": arch, **(manifest or {})}))
    for name, text in files.items():
        (port / name).write_text(textwrap.dedent(text))
    return port


def audit(port: Path, *extra: str):
    result = run_script("audit_docstrings", port, "--json", *extra)
    return result, (result.json() if result.stdout.strip() else None)


def by_line(doc: dict, key: str = "hits") -> dict[tuple[str, int, str], dict]:
    return {(h["file"], h["line"], h["term"]): h for h in doc[key]}


def test_only_docstrings_and_comments_are_scanned(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Graph module."""
        from max.pipelines.architectures.llama3 import llama3 as llama_graph
        from max.nn.norm import RMSNorm

        qwen_thing = "llama olmo2 RMSNorm single-GPU"   # plain string literal: not scanned
        def build(llama_config):
            return llama_graph.Llama3(llama_config)
        '''})
    result, doc = audit(port)
    assert result.returncode == 0, result.stderr
    assert doc["hits"] == [] and doc["unmarked"] == 0 and doc["cleared"] == []


def test_hits_need_review_and_the_rest_is_cleared_with_why(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Derived from max/pipelines/architectures/llama3/llama3.py.

        Llama 3 decoder with RMSNorm, single-GPU only.
        """
        from max.nn.norm import LayerNorm

        # XLlamaForCausalLM graph: the port's own name is not a hit
        x = LayerNorm(8)  # QK-norm applied per head
        '''})
    result, doc = audit(port)
    assert result.returncode == 1
    hits = by_line(doc)
    assert hits[("graph.py", 4, "llama")]["hint"] == "Stale"
    assert hits[("graph.py", 4, "RMSNorm")]["hint"] == "Lie"  # no file uses RMSNorm
    assert hits[("graph.py", 9, "QK-norm")]["hint"] == "Lie" and hits[("graph.py", 9, "QK-norm")]["kind"] == "comment"
    assert set(hits) == {("graph.py", 4, "llama"), ("graph.py", 4, "RMSNorm"), ("graph.py", 9, "QK-norm")}
    cleared = by_line(doc, "cleared")
    assert cleared[("graph.py", 2, "llama")]["cleared_by"] == "lineage"
    assert cleared[("graph.py", 4, "single-GPU")]["cleared_by"] == "backed"
    assert "arch.py sets multi_gpu_supported=False" in cleared[("graph.py", 4, "single-GPU")]["why"]
    assert all(h["context"] and h["why"] for h in doc["hits"]) and doc["unmarked"] == len(doc["hits"])


def test_a_claim_is_backed_by_any_file_and_the_file_is_named(tmp_path):
    port = make_port(tmp_path, {
        "model_config.py": '''
            from max.nn.norm import RMSNorm
            def norm(dim):
                return RMSNorm(dim)
            ''',
        "graph.py": '''
            """Decoder: RMSNorm before attention and MLP."""
            ''',
    })
    result, doc = audit(port)
    assert result.returncode == 0 and doc["hits"] == []
    (entry,) = doc["cleared"]
    assert (entry["file"], entry["term"], entry["cleared_by"]) == ("graph.py", "RMSNorm", "backed")
    assert "model_config.py" in entry["why"]


def test_multi_gpu_supported_in_arch_decides_device_claims(tmp_path):
    files = {"model.py": '''
        """Runs on a single device only."""
        # Supports multi-GPU tensor-parallel inference.
        def devices(config):
            return config.devices
        '''}
    _, single = audit(make_port(tmp_path / "a", files, multi=False))
    assert [(h["line"], h["term"], h["hint"]) for h in single["hits"]] == [(3, "multi-GPU", "Lie")]
    assert "arch.py sets multi_gpu_supported=False" in single["hits"][0]["why"]
    _, multi = audit(make_port(tmp_path / "b", files, multi=True))
    assert [(h["line"], h["term"], h["hint"]) for h in multi["hits"]] == [(2, "single-GPU", "Lie")]


def test_target_family_names_are_never_donor_mentions(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """GPT-NeoX decoder, the gpt_neox attention of the GPT NeoX family."""
        # Llama 3 style RoPE kept from the donor code path
        # Qwen2 block
        '''}, slug="neox", arch="GPTNeoXForCausalLM", manifest={"model_type": "gpt_neox"})
    _, doc = audit(port)
    assert {(h["line"], h["term"]) for h in doc["hits"]} == {(4, "qwen")}
    assert "gpt_neox" in doc["own_names"] and "GPTNeoX" in doc["own_names"]


def test_model_type_flag_and_versions_keep_a_same_family_donor_visible(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        # Qwen3 attention with per-head norms
        # Qwen2 attention, as the donor wrote it
        # Qwen attention
        '''}, slug="myport", donor="qwen2", arch="MyForCausalLM")
    _, without = audit(port)
    assert {h["line"] for h in without["hits"]} == {2, 4}  # line 3 is lineage ("donor")
    _, doc = audit(port, "--model-type", "qwen3")
    assert {h["line"] for h in doc["hits"]} == set()  # Qwen3 and bare Qwen are the target's; Qwen2 line is lineage
    (port / "graph.py").write_text("# Qwen2 attention\n")
    _, doc = audit(port, "--model-type", "qwen3")
    assert [(h["line"], h["term"], h["hint"]) for h in doc["hits"]] == [(1, "qwen", "Stale")]


NEGATED = [
    "no QK-norm in this model",
    "LayerNorm instead of RMSNorm",
    "unlike Llama, the norm has a bias",
    "full attention without sliding window",
    "a separate LM head rather than tied embeddings",
    "LayerNorm with bias, not the donor's RMSNorm",
    "no QK-norm, GQA or sliding window",
    "QK-norm is not applied",
    "the data-parallel paths of the donor were removed",
    "grouped-query attention is unsupported",
]


def test_negations_and_comparisons_are_not_claims(tmp_path):
    lines = "\n".join(f"# {text}" for text in NEGATED) + "\nfrom max.nn.norm import LayerNorm\nx = LayerNorm(8)\n"
    port = make_port(tmp_path, {"graph.py": lines})
    result, doc = audit(port)
    assert doc["hits"] == [], doc["hits"]
    assert result.returncode == 0
    negated_lines = {c["line"] for c in doc["cleared"] if c["cleared_by"] == "negated or compared"}
    assert negated_lines == set(range(1, len(NEGATED) + 1))


STILL_CLAIMS = [
    ("Unlike the donor, applies QK-norm to queries and keys", "QK-norm"),
    ("Without a bias, uses sliding-window attention", "sliding-window"),
    ("QK-norm, which is not optional here", "QK-norm"),
    ("Not only single device: multi-GPU too", "multi-GPU"),
    ("no bias, but the LM head is tied to the token embeddings", "tied-embeddings"),
    ("does not need a cache and applies QK-norm", "QK-norm"),
]


@pytest.mark.parametrize("text, term", STILL_CLAIMS)
def test_a_nearby_negation_does_not_hide_a_claim(tmp_path, text, term):
    port = make_port(tmp_path, {"graph.py": f"# {text}\n"})
    result, doc = audit(port)
    assert result.returncode == 1
    assert (1, term, "Lie") in {(h["line"], h["term"], h["hint"]) for h in doc["hits"]}


def test_a_term_inside_an_identifier_is_not_a_mention(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        # weights: input_layernorm, post_attention_layernorm, ``qk_layernorm``
        # the class PerHeadLayerNorm and max.nn.norm.LayerNorm
        # a layernorm here
        '''})
    _, doc = audit(port)
    assert [(h["line"], h["term"]) for h in doc["hits"]] == [(4, "LayerNorm")]


def test_phrase_spelling_a_port_name_is_not_a_claim(tmp_path):
    port = make_port(tmp_path, {"model.py": '''
        class Inputs:
            data_parallel_splits: list
            """Tensor containing the data parallel splits."""
        # data parallel inference on 8 GPUs
        '''})
    _, doc = audit(port)
    assert [(h["line"], h["term"]) for h in doc["hits"]] == [(5, "multi-GPU")]
    assert by_line(doc, "cleared")[("model.py", 4, "multi-GPU")]["cleared_by"] == "names port code"


# One planted lie of each kind the issue names, in a docstring and in a comment.
PLANTED = {
    "QK-norm": "Applies QK-norm to every query and key head.",
    "GQA": "Grouped-query attention: several query heads share one KV head.",
    "sliding-window": "Layers alternate full and sliding-window attention.",
    "tied-embeddings": "The LM head is tied to the token embeddings.",
    "multi-GPU": "Supports multi-GPU tensor-parallel inference.",
}
PLAIN_CODE = '''
class Attention:
    def __init__(self, config):
        self.heads = config.num_attention_heads
        self.lm_head = config.vocab_size
'''
FEATURE_CODE = '''
class Attention:
    def __init__(self, config):
        self.q_norm = config.q_norm
        self.kv = config.num_key_value_heads
        self.window = config.sliding_window
        self.tied = config.tie_word_embeddings

class DistributedAttention(Attention):
    pass
'''


def planted_module(code: str) -> str:
    docstring = "\n".join(PLANTED.values())
    comments = "\n".join(f"# {text}" for text in PLANTED.values())
    return f'"""Graph of the port.\n\n{docstring}\n"""\n{comments}\n{code}'


def planted_lines(source: str) -> dict[str, set[int]]:
    lines = source.splitlines()
    return {term: {n for n, line in enumerate(lines, 1) if text in line} for term, text in PLANTED.items()}


def test_every_planted_lie_is_flagged_in_a_port_without_the_feature(tmp_path):
    source = planted_module(PLAIN_CODE)
    port = make_port(tmp_path, {"graph.py": source}, multi=None)
    result, doc = audit(port)
    assert result.returncode == 1
    flagged = {(h["line"], h["term"]) for h in doc["hits"] if h["hint"] == "Lie"}
    for term, lines in planted_lines(source).items():
        assert len(lines) == 2 and {(n, term) for n in lines} <= flagged, term
    kinds = {h["kind"] for h in doc["hits"]}
    assert kinds == {"docstring", "comment"}


def test_the_same_sentences_are_cleared_when_another_file_implements_them(tmp_path):
    port = make_port(tmp_path, {"graph.py": planted_module(PLAIN_CODE), "layers.py": FEATURE_CODE}, multi=None)
    _, doc = audit(port)
    assert doc["hits"] == []
    backed = [c for c in doc["cleared"] if c["file"] == "graph.py"]
    assert {c["term"] for c in backed} == set(PLANTED) and all("layers.py" in c["why"] for c in backed)


def _plant(port: Path, module: str) -> dict[str, set[int]]:
    """Append the planted lies to ``module`` of ``port`` (as comments after its code); return their lines."""
    path = port / module
    source = path.read_text() + "\n" + "\n".join(f"# {text}" for text in PLANTED.values()) + "\n"
    path.write_text(source)
    return planted_lines(source)


def test_planted_lies_in_a_fresh_scaffold_are_flagged(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama")
    assert run_script("scaffold", model, "--start-from", "llama3", "--output-dir", tmp_path,
                      "--slug", "zz_plant").returncode == 0
    port = tmp_path / "zz_plant"
    lines = _plant(port, "model.py")
    _, doc = audit(port)
    flagged = {(h["line"], h["term"]) for h in doc["hits"] if h["file"] == "model.py" and h["hint"] == "Lie"}
    # llama3 has no QK-norm and only declares a sliding_window field it never reads.
    for term in ("QK-norm", "sliding-window"):
        assert {(n, term) for n in lines[term]} <= flagged, term


@pytest.mark.skipif(WORKED_PORT is None, reason="the worked StableLM port is not in this checkout")
def test_worked_port_has_no_open_hit_and_planted_lies_are_flagged(tmp_path):
    result, doc = audit(WORKED_PORT)
    assert result.returncode == 0 and doc["unmarked"] == 0 and doc["cleared"]
    copy = tmp_path / "stablelm"
    shutil.copytree(WORKED_PORT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    lines = _plant(copy, "stablelm.py")
    _, doc = audit(copy)
    flagged = {(h["line"], h["term"]) for h in doc["hits"] if h["hint"] == "Lie"}
    # StableLM is single-device (arch.py) and has no sliding window; its QK-norm, GQA and tied head are real.
    for term in ("multi-GPU", "sliding-window"):
        assert {(n, term) for n in lines[term]} <= flagged, term


def test_fresh_scaffold_has_unmarked_hits(tmp_path, checkpoint_factory):
    model = checkpoint_factory("llama")
    assert run_script("scaffold", model, "--start-from", "olmo2", "--output-dir", tmp_path,
                      "--slug", "zz_audit").returncode == 0
    result, doc = audit(tmp_path / "zz_audit")
    assert result.returncode == 1 and doc["donor"] == "olmo2" and doc["unmarked"] > 0
    text = run_script("audit_docstrings", tmp_path / "zz_audit")
    assert "--approve FILE:LINE" in text.stdout and "unmarked" in text.stdout
    # The scaffold's lineage lines are cleared as lineage, never hits.
    assert all("Derived from" not in h["context"] for h in doc["hits"])
    assert any(c["cleared_by"] == "lineage" and "Derived from" in c["context"] for c in doc["cleared"])


def test_unmodified_library_blocks_are_not_audited_and_an_edited_block_is(tmp_path, checkpoint_factory):
    """A verbatim copy of templates/blocks (hash = the manifest's) names the transformers code it mirrors; those
    names are the library's reviewed text, not claims of the port (Exaone 4 dogfood: 5 hits in blocks/attention.py,
    and approving them changed the block's hash)."""
    model = checkpoint_factory("llama")
    assert run_script("scaffold", model, "--start-from", "olmo2", "--output-dir", tmp_path, "--slug", "zz_blocks",
                      "--with", "attention").returncode == 0
    port = tmp_path / "zz_blocks"
    result, doc = audit(port)
    version = scaffold.block_catalog().block_version(scaffold.BLOCKS_DIR / "attention.py")
    assert doc["library_blocks"] == [{"file": "blocks/attention.py", "name": "attention", "version": version}]
    assert not any(h["file"].startswith("blocks/") for h in doc["hits"] + doc["cleared"])
    block = port / "blocks" / "attention.py"
    block.write_text(block.read_text() + "\n# Matches GPT-NeoX exactly.\n")
    _, edited = audit(port)
    assert edited["library_blocks"] == []
    assert any(h["file"] == "blocks/attention.py" for h in edited["hits"] + edited["cleared"])


def test_marker_in_the_docstring_or_in_a_comment_on_the_same_line(tmp_path):
    port = make_port(tmp_path, {"graph.py": '''
        """Llama 3 decoder. [audit-ok: the graph is still llama3's, checked]"""
        def f():
            """Llama block."""  # [audit-ok: checked in a comment]
        # stale olmo note [audit-ok:   ]
        '''})
    result, doc = audit(port)
    assert result.returncode == 1
    marked = {h["line"]: h["reason"] for h in doc["hits"] if h["marked"]}
    assert marked == {2: "the graph is still llama3's, checked", 4: "checked in a comment"}
    assert [h["line"] for h in doc["hits"] if not h["marked"]] == [5]  # empty reason does not count
    graph = port / "graph.py"
    graph.write_text(graph.read_text().replace("[audit-ok:   ]", "[audit-ok: kept on purpose]"))
    result, doc = audit(port)
    assert result.returncode == 0 and doc["unmarked"] == 0 and doc["marked"] == 3


# --- --approve -------------------------------------------------------------------------------

APPROVE_SOURCE = '''"""Llama 3 graph, one line."""


def f():
    """Llama block, first line,
    Llama block, middle line,
    last Llama line."""


def g():
    \'\'\'Llama single-quoted.\'\'\'
    return 1  # Llama comment


def h():
    "Llama short string"
'''


def approve(port: Path, *targets: str, reason: str | None = "checked against HF", json_out: bool = True):
    args = [a for t in targets for a in ("--approve", t)]
    if reason is not None:
        args += ["--reason", reason]
    result = run_script("audit_docstrings", port, *args, *(["--json"] if json_out else []))
    return result


def test_approve_writes_each_kind_of_line_and_keeps_the_file_valid(tmp_path):
    port = make_port(tmp_path, {"graph.py": APPROVE_SOURCE})
    graph = port / "graph.py"
    _, before = audit(port)
    lines = sorted({h["line"] for h in before["hits"]})
    assert lines == [1, 5, 6, 7, 11, 12, 16]
    result = approve(port, *(f"graph.py:{n}" for n in lines))
    assert result.returncode == 0, result.stderr
    where = {a["line"]: a["where"] for a in result.json()["approved"]}
    assert where == {1: "docstring", 5: "docstring", 6: "docstring", 7: "docstring", 11: "docstring",
                     12: "comment", 16: "docstring"}
    text = graph.read_text()
    ast.parse(text)
    assert text.splitlines()[0] == '"""Llama 3 graph, one line. [audit-ok: checked against HF]"""'
    assert text.splitlines()[6] == '    last Llama line. [audit-ok: checked against HF]"""'
    assert text.splitlines()[11] == "    return 1  # Llama comment [audit-ok: checked against HF]"
    result, after = audit(port)
    assert result.returncode == 0 and after["unmarked"] == 0 and after["marked"] == len(before["hits"])
    old, new = APPROVE_SOURCE.splitlines(), text.splitlines()
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new)) == len(lines)


def test_approve_keeps_crlf_and_byte_order_mark(tmp_path):
    port = make_port(tmp_path, {})
    graph = port / "graph.py"
    graph.write_bytes(b'\xef\xbb\xbf"""Llama graph."""\r\nx = 1\r\n')
    assert approve(port, "graph.py:1").returncode == 0
    assert graph.read_bytes() == b'\xef\xbb\xbf"""Llama graph. [audit-ok: checked against HF]"""\r\nx = 1\r\n'


@pytest.mark.parametrize("targets, reason, message", [
    (("graph.py:1",), None, "needs --reason"),
    (("graph.py:1",), "   ", "needs --reason"),
    (("graph.py:1",), "ok] [x", "must not contain"),
    (("graph.py:1",), "a\\b", "must not contain"),
    (("graph.py:1",), "x" * 300, "characters"),
    (("graph.py",), "ok", "not FILE:LINE"),
    (("graph.py:0",), "ok", "not FILE:LINE"),
    (("nope.py:1",), "ok", "not a .py file of the port"),
    (("graph.py:999",), "ok", "has 16 lines"),
    (("graph.py:3",), "ok", "has no hit"),
    (("graph.py:1", "graph.py:1"), "ok", "twice"),
    (("graph.py:1", "graph.py:3"), "ok", "has no hit"),  # one bad target: nothing at all is written
    (("graph.py:11",), "it's fine'''", "break the file's syntax"),
    (("graph.py:16",), 'a "quote', "break the file's syntax"),
])
def test_approve_refuses_bad_input_and_writes_nothing(tmp_path, targets, reason, message):
    port = make_port(tmp_path, {"graph.py": APPROVE_SOURCE})
    result = approve(port, *targets, reason=reason)
    assert result.returncode == 3 and message in result.json()["error"], result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert (port / "graph.py").read_text() == APPROVE_SOURCE
    assert sorted(p.name for p in port.iterdir()) == sorted(["__init__.py", "arch.py", "graph.py",
                                                               "scaffold_manifest.json"])


def test_approve_refuses_a_marked_or_cleared_line_and_reason_without_approve(tmp_path):
    port = make_port(tmp_path, {"graph.py": '# Llama note [audit-ok: done]\n# Derived from llama3\n'})
    marked = approve(port, "graph.py:1")
    assert marked.returncode == 3 and "already carries a marker" in marked.json()["error"]
    cleared = approve(port, "graph.py:2")
    assert cleared.returncode == 3 and "lineage" in cleared.json()["error"]
    alone = run_script("audit_docstrings", port, "--reason", "x", "--json")
    assert alone.returncode == 3 and "only used with --approve" in alone.json()["error"]


def test_approve_text_output_names_the_line(tmp_path):
    port = make_port(tmp_path, {"graph.py": "# Llama note\n"})
    result = approve(port, "graph.py:1", json_out=False)
    assert result.returncode == 0 and "graph.py:1: wrote [audit-ok: checked against HF] in the comment" in result.stdout


# --- ports and manifests ---------------------------------------------------------------------


@pytest.mark.parametrize("which, message", [("parent", "pass the port folder"), ("missing", "not found")])
def test_bad_port_dir_exits_3(tmp_path, which, message):
    port = make_port(tmp_path, {})
    arg = tmp_path if which == "parent" else tmp_path / "nope"
    result, doc = audit(arg)
    assert result.returncode == 3 and message in doc["error"]
    if which == "parent":
        assert str(port) in doc["error"]


def test_trailing_slash_is_accepted(tmp_path):
    port = make_port(tmp_path, {})
    result, doc = audit(Path(str(port) + "/"))
    assert result.returncode == 0 and doc["port_dir"] == str(port.resolve())


def test_ordinary_words_and_tool_names_are_not_family_hits(tmp_path):
    port = make_port(tmp_path, {"helpers.py": '''
        # one step further: a unified pass, like a diffusion of ideas; GPTQ weights stay as they are
        # GPT-Q scales, and the rope_freqs that llama.cpp expects
        x = 1
        '''})
    result, doc = audit(port)
    assert result.returncode == 0 and doc["hits"] == []


def test_mention_of_a_name_the_port_defines_is_cleared_and_prose_is_not(tmp_path):
    """A kept donor class name (defined in one file, named in another's docstring) is honest, not stale."""
    port = make_port(tmp_path, {
        "inputs.py": '''
            class Llama3Inputs:
                pass
            ''',
        "batching.py": '''
            """Batches :class:`Llama3Inputs` for the port.

            Same batching as the Llama 3 pipeline.
            See ``Llama3Config.initialize`` for the fields.
            """
            from .inputs import Llama3Inputs
            ''',
    })
    result, doc = audit(port)
    assert result.returncode == 1
    assert by_line(doc, "cleared")[("batching.py", 2, "llama")]["cleared_by"] == "names port code"
    hits = by_line(doc)
    assert hits[("batching.py", 4, "llama")]["hint"] == "Stale"
    assert "Llama3Config" in hits[("batching.py", 5, "llama")]["why"]  # names code the port does not have
    assert not any(h["marked"] for h in doc["hits"])


def test_the_marker_examples_in_the_docs_approve_their_hits(tmp_path):
    """The docs show the marker inside a docstring and in a comment on the same line; both must work."""
    text = (REPO_ROOT / "references" / "honest-docstrings.md").read_text()
    block = next(b for b in text.split("```python\n")[1:] if "[audit-ok:" in b).split("```")[0]
    port = make_port(tmp_path, {"example.py": block})
    result, doc = audit(port)
    kinds = {h["kind"] for h in doc["hits"]}
    assert result.returncode == 0 and doc["hits"] and all(h["marked"] for h in doc["hits"]), doc["hits"]
    assert kinds == {"docstring", "comment"}
    assert "docstring" in {h["kind"] for h in doc["hits"] if h["line"] == 4}  # docstring hit, comment marker


def test_ports_in_the_lineage_are_donors_and_the_target_model_type_is_not(tmp_path):
    lineage = [{"kind": "native", "slug": "llama3", "path": "x"},
               {"kind": "port", "slug": "stablelm", "arch_name": "StableLmForCausalLM", "path": "templates/ports/stablelm"}]
    port = make_port(tmp_path, {"graph.py": '''
        # StableLM block with a parallel residual
        # NewArch block
        # Llama 3 RoPE
        '''}, slug="newarch", arch="NewArchForCausalLM", manifest={"lineage": lineage, "model_type": "newarch"})
    _, doc = audit(port)
    assert {(h["line"], h["term"], h["hint"]) for h in doc["hits"]} == {(2, "stablelm", "Stale"), (4, "llama", "Stale")}
    assert all("names the donor" in h["why"] for h in doc["hits"])


@pytest.mark.parametrize("lineage", ["llama3", [1], [{"slug": 3}]])
def test_a_bad_lineage_in_the_manifest_exits_3(tmp_path, lineage):
    port = make_port(tmp_path, {}, manifest={"lineage": lineage})
    result, doc = audit(port)
    assert result.returncode == 3 and "lineage" in doc["error"]
