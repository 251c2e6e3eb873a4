"""The building-blocks library (templates/blocks) without a MAX compile.

- every block file is listed in the catalog, has a BLOCK_VERSION and a
  docstring naming the transformers code and MAX APIs, and imports only max,
  numpy and the standard library (a copied block must be self-contained);
- every block builds into a ``max.graph.Graph`` (traced, not compiled) with
  the output shape and dtype it claims, and rejects bad settings;
- the numpy parts (fused-QKV splits, Conv1D transpose, token positions,
  MoE routing and the dense expert sum) match transformers' own modules on
  small shapes.
The attention module's full call needs a paged KV cache; it is traced inside
the composed port's dry-build (tests/test_blocks_e2e.py).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

BLOCKS_DIR = REPO_ROOT / "templates" / "blocks"
ALLOWED_TOP_LEVEL = {"max", "numpy", "__future__"} | set(sys.stdlib_module_names)
HIDDEN, HEADS, HEAD_DIM, VOCAB = 32, 4, 8, 50


def load(name: str):
    """Import templates/blocks/<name>.py as a standalone module (as a port's copy would be)."""
    return load_path(f"blocks_under_test_{name}", BLOCKS_DIR / f"{name}.py")


def load_path(module_name: str, path: Path):
    """Import one file as ``module_name`` (registered first: dataclasses look their module up)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_catalog():
    return load_path("blocks_catalog_under_test", BLOCKS_DIR / "__init__.py")


CATALOG = load_catalog()
BLOCK_NAMES = [block.name for block in CATALOG.BLOCKS]


# --- catalog and self-containment ---------------------------------------------------


def test_catalog_covers_every_block_file():
    files = {p.name for p in BLOCKS_DIR.glob("*.py") if p.name != "__init__.py"}
    assert files == {block.file for block in CATALOG.BLOCKS}
    rows = CATALOG.catalog()
    assert [row["name"] for row in rows] == BLOCK_NAMES
    for row in rows:
        assert row["version"] and len(row["sha256"]) == 64
    with pytest.raises(KeyError, match="known: norms"):
        CATALOG.find("no_such_block")


def test_catalog_imports_nothing_heavy():
    tree = ast.parse((BLOCKS_DIR / "__init__.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_is_self_contained(name):
    block = CATALOG.find(name)
    tree = ast.parse((BLOCKS_DIR / block.file).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{block.file}: relative import (a copied block cannot import its neighbours)"
            assert node.module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{block.file}: imports {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{block.file}: imports {alias.name}"
    top_names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    top_names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    top_names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert set(block.provides) <= top_names, f"{block.file} lacks {set(block.provides) - top_names}"
    doc = ast.get_docstring(tree)
    assert doc and "modeling_" in doc and "MAX 26.7 APIs" in doc, f"{block.file}: docstring must name both sides"


def test_catalog_reads_version_without_importing(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("VERSION = 1\n")
    with pytest.raises(ValueError, match="BLOCK_VERSION"):
        CATALOG.block_version(bad)


# --- graph builds (traced, not compiled) --------------------------------------------


def build(inputs, forward):
    """Trace ``forward`` over ``inputs`` (``(dtype, shape)`` pairs on the CPU); return the output types."""
    from max.graph import DeviceRef, Graph, TensorType

    types = [TensorType(dtype, shape, device=DeviceRef.CPU()) for dtype, shape in inputs]
    graph = Graph("block_under_test", forward, input_types=types)
    return [(out.dtype, [str(d) for d in out.shape]) for out in graph.output_types]


def cpu():
    from max.graph import DeviceRef

    return DeviceRef.CPU()


@pytest.mark.parametrize("variant", [dict(), dict(bias=False), dict(weight=False, bias=False)])
def test_layer_norm_builds(variant):
    from max.dtype import DType

    norms = load("norms")
    norm = norms.LayerNormF32(HIDDEN, DType.bfloat16, cpu(), eps=1e-5, **variant)
    assert set(norm.state_dict()) == {"weight", "bias"} - ({"bias"} if "bias" in variant else set()) - (
        {"weight"} if "weight" in variant else set())
    assert build([(DType.bfloat16, ["tokens", HIDDEN])], lambda x: norm(x.tensor)) == [
        (DType.bfloat16, ["tokens", str(HIDDEN)])]


def test_layer_norm_rejects_bias_without_weight():
    from max.dtype import DType

    with pytest.raises(ValueError, match="bias but no weight"):
        load("norms").LayerNormF32(HIDDEN, DType.float32, cpu(), weight=False, bias=True)


@pytest.mark.parametrize("offset,in_f32", [(0.0, False), (1.0, True)])
def test_rms_norm_builds(offset, in_f32):
    from max.dtype import DType

    norm = load("norms").RMSNormF32(HIDDEN, DType.float32, cpu(), weight_offset=offset, scale_in_float32=in_f32)
    assert set(norm.state_dict()) == {"weight"}
    assert build([(DType.float32, ["tokens", HIDDEN])], lambda x: norm(x.tensor)) == [
        (DType.float32, ["tokens", str(HIDDEN)])]


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "relu2", "silu", "quick_gelu"])
def test_ungated_mlp_builds(act):
    from max.dtype import DType

    mlp = load("mlp").UngatedMLP(HIDDEN, 2 * HIDDEN, DType.float32, cpu(), act)
    assert set(mlp.state_dict()) == {"up_proj.weight", "up_proj.bias", "down_proj.weight", "down_proj.bias"}
    assert build([(DType.float32, ["tokens", HIDDEN])], lambda x: mlp(x.tensor)) == [
        (DType.float32, ["tokens", str(HIDDEN)])]


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="not in the block's table"):
        load("mlp").activation("gelu_10")


@pytest.mark.parametrize("rotary_dim,layout", [(HEAD_DIM, "rotate_half"), (HEAD_DIM // 2, "rotate_half"),
                                               (HEAD_DIM // 2, "interleaved")])
def test_rope_leading_builds(rotary_dim, layout):
    from max.dtype import DType

    attention = load("attention")
    rope_layout = attention.RopeLayout(layout)
    rope = attention.build_rope(hidden_size=HIDDEN, num_heads=HEADS, theta=10000.0, max_seq_len=16,
                                rotary_dim=rotary_dim, layout=rope_layout)

    def forward(x, offsets, cache_lengths):
        return attention.rope_leading(x.tensor, rope.freqs_cis, offsets.tensor, cache_lengths.tensor, rotary_dim,
                                      rope_layout)

    out = build([(DType.float32, ["tokens", HEADS, HEAD_DIM]), (DType.uint32, ["rows"]), (DType.uint32, ["batch"])],
                forward)
    assert out == [(DType.float32, ["tokens", str(HEADS), str(HEAD_DIM)])]


def test_rope_leading_rejects_a_table_of_the_wrong_width():
    from max.dtype import DType

    attention = load("attention")
    rope = attention.build_rope(hidden_size=HIDDEN, num_heads=HEADS, theta=10000.0, max_seq_len=16,
                                rotary_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="RoPE table is 8 wide, rotary_dim is 4"):
        build([(DType.float32, ["tokens", HEADS, HEAD_DIM]), (DType.uint32, ["rows"]), (DType.uint32, ["batch"])],
              lambda x, o, c: attention.rope_leading(x.tensor, rope.freqs_cis, o.tensor, c.tensor, HEAD_DIM // 2,
                                                     attention.RopeLayout.ROTATE_HALF))


def attention_kwargs(**overrides):
    from max.dtype import DType

    kwargs = dict(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=2, head_dim=HEAD_DIM, kv_params=None,
                  dtype=DType.float32, device=cpu(), rotary_dim=HEAD_DIM // 2)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("qkv_bias,o_bias", [(True, True), (False, True), (True, False)])
def test_biased_attention_declares_its_biases(qkv_bias, o_bias):
    attention = load("attention").BiasedAttention(**attention_kwargs(qkv_bias=qkv_bias, o_bias=o_bias))
    names = set(attention.state_dict())
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} <= names
    assert ("q_proj.bias" in names) is qkv_bias and ("v_proj.bias" in names) is qkv_bias
    assert ("o_proj.bias" in names) is o_bias
    assert attention.state_dict()["k_proj.weight"].shape == (2 * HEAD_DIM, HIDDEN)
    assert attention.scale == HEAD_DIM**-0.5


@pytest.mark.parametrize("bad", [dict(rotary_dim=3), dict(rotary_dim=HEAD_DIM + 2), dict(num_kv_heads=3)])
def test_biased_attention_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        load("attention").BiasedAttention(**attention_kwargs(**bad))


class _StubAttention:
    """Stands in for an attention module in the residual blocks: returns 2 * x."""

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets):
        return x * 2.0


@pytest.mark.parametrize("kind", ["parallel_one_norm", "parallel_two_norms", "sequential", "sequential_post_norms"])
def test_residual_blocks_build(kind):
    from max.dtype import DType
    from max.nn.layer import Module

    norms, mlp_mod, residual = load("norms"), load("mlp"), load("residual")

    class Stub(Module):
        def __call__(self, *args, **kwargs):
            return _StubAttention()(*args, **kwargs)

    def norm():
        return norms.LayerNormF32(HIDDEN, DType.float32, cpu())

    mlp = mlp_mod.UngatedMLP(HIDDEN, 2 * HIDDEN, DType.float32, cpu(), "gelu")
    if kind == "parallel_one_norm":
        block = residual.ParallelResidualBlock(Stub(), mlp, norm())
        expected = {"input_layernorm"}
    elif kind == "parallel_two_norms":
        block = residual.ParallelResidualBlock(Stub(), mlp, norm(), norm())
        expected = {"input_layernorm", "post_attention_layernorm"}
    elif kind == "sequential":
        block = residual.SequentialResidualBlock(Stub(), mlp, norm(), norm())
        expected = {"input_layernorm", "post_attention_layernorm"}
    else:
        block = residual.SequentialResidualBlock(Stub(), mlp, norm(), norm(), post_attention_norm=norm(),
                                                 post_mlp_norm=norm())
        expected = {"input_layernorm", "post_attention_layernorm", "post_attention_norm", "post_mlp_norm"}
    prefixes = {name.split(".")[0] for name in block.state_dict() if not name.startswith("mlp.")}
    assert prefixes == expected

    def forward(x, offsets):
        return block(None, x.tensor, None, freqs_cis=None, input_row_offsets=offsets.tensor)

    assert build([(DType.float32, ["tokens", HIDDEN]), (DType.uint32, ["rows"])], forward) == [
        (DType.float32, ["tokens", str(HIDDEN)])]


@pytest.mark.parametrize("multiplier,cap", [(1.0, None), (0.0625, None), (1.0, 30.0), (2.0, 50.0)])
def test_scaled_head_builds(multiplier, cap):
    from max.dtype import DType

    head = load("head").ScaledLMHead(HIDDEN, VOCAB, DType.bfloat16, cpu(), logit_multiplier=multiplier,
                                     final_softcap=cap)
    assert set(head.state_dict()) == {"weight"}
    assert build([(DType.bfloat16, ["tokens", HIDDEN])], lambda x: head(x.tensor)) == [
        (DType.float32, ["tokens", str(VOCAB)])]


def test_head_divisor_and_bad_settings():
    from max.dtype import DType

    head = load("head")
    assert head.logits_scaling_divisor(0.0625) == 16.0
    with pytest.raises(ValueError, match="zero logit multiplier"):
        head.logits_scaling_divisor(0.0)
    with pytest.raises(ValueError, match="final_softcap must be positive"):
        head.ScaledLMHead(HIDDEN, VOCAB, DType.float32, cpu(), final_softcap=0.0)


@pytest.mark.parametrize("offset", [0, 2])
def test_learned_positions_build(offset):
    from max.dtype import DType

    positions = load("positions")
    embed = positions.LearnedPositionEmbedding(64, HIDDEN, DType.float32, cpu(), offset=offset)
    assert embed.state_dict()["weight"].shape == (64 + offset, HIDDEN)

    def forward(tokens, offsets, cache_lengths):
        return embed(offsets.tensor, cache_lengths.tensor, tokens.tensor.shape[0])

    out = build([(DType.int64, ["tokens"]), (DType.uint32, ["rows"]), (DType.uint32, ["batch"])], forward)
    assert out == [(DType.float32, ["tokens", str(HIDDEN)])]


@pytest.mark.parametrize("score,shared", [("softmax", True), ("sigmoid", False)])
def test_dense_moe_builds(score, shared):
    from max.dtype import DType

    moe = load("moe")
    block = moe.DenseMoE(hidden_size=HIDDEN, moe_intermediate_size=16, num_experts=4, top_k=2, dtype=DType.float32,
                         device=cpu(), score=moe.RouterScore(score), renormalize=True,
                         selection_bias=score == "sigmoid", shared_intermediate_size=24 if shared else None,
                         shared_expert_gate=shared)
    names = set(block.state_dict())
    assert {"gate.weight", "experts.gate_up_proj", "experts.down_proj"} <= names
    assert ("shared_expert_gate.weight" in names) is shared and ("gate.e_score_correction_bias" in names) is (
        score == "sigmoid")
    assert block.state_dict()["experts.gate_up_proj"].shape == (4, 32, HIDDEN)
    assert build([(DType.float32, ["tokens", HIDDEN])], lambda x: block(x.tensor)) == [
        (DType.float32, ["tokens", str(HIDDEN)])]


def test_dense_moe_rejects_bad_top_k():
    from max.dtype import DType

    moe = load("moe")
    with pytest.raises(ValueError, match="top_k 5"):
        moe.DenseMoE(hidden_size=HIDDEN, moe_intermediate_size=16, num_experts=4, top_k=5, dtype=DType.float32,
                     device=cpu())


# --- numpy helpers against transformers' own modules -----------------------------------


def falcon_attention(num_heads, num_kv_heads, new_arch, multi_query):
    from transformers import FalconConfig
    from transformers.models.falcon.modeling_falcon import FalconAttention

    config = FalconConfig(hidden_size=num_heads * HEAD_DIM, num_attention_heads=num_heads,
                          num_kv_heads=num_kv_heads, new_decoder_architecture=new_arch, multi_query=multi_query,
                          bias=True)
    return FalconAttention(config, layer_idx=0)


def project(x, weight, bias):
    return x @ weight.T + bias


@pytest.mark.parametrize("layout", ["per_head", "grouped", "multi_query"])
def test_qkv_splits_match_falcon_split_heads(layout):
    """Falcon's _split_heads covers all three fused layouts; q/k/v from the split weights must agree with it."""
    import torch

    qkv = load("qkv_split")
    heads, kv = {"per_head": (4, 4), "grouped": (4, 2), "multi_query": (4, 1)}[layout]
    attn = falcon_attention(heads, kv, new_arch=layout != "multi_query", multi_query=layout == "multi_query")
    rows = attn.query_key_value.weight.shape[0]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((rows, heads * HEAD_DIM)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    x = rng.standard_normal((1, 3, heads * HEAD_DIM)).astype(np.float32)
    fused = torch.from_numpy(project(x, weight, bias))
    hq, hk, hv = (t.numpy() for t in attn._split_heads(fused))
    if layout == "multi_query":
        parts_w = qkv.split_concatenated(weight, heads * HEAD_DIM, HEAD_DIM)
        parts_b = qkv.split_concatenated(bias, heads * HEAD_DIM, HEAD_DIM)
    elif layout == "per_head":
        parts_w = qkv.split_per_head_interleaved(weight, heads, HEAD_DIM)
        parts_b = qkv.split_per_head_interleaved(bias, heads, HEAD_DIM)
    else:
        parts_w = qkv.split_grouped(weight, heads, kv, HEAD_DIM)
        parts_b = qkv.split_grouped(bias, heads, kv, HEAD_DIM)
    q, k, v = (project(x, w, b) for w, b in zip(parts_w, parts_b))
    np.testing.assert_allclose(q.reshape(hq.shape), hq, rtol=1e-5, atol=1e-5)
    per_group = heads // kv
    for ours, theirs in ((k, hk), (v, hv)):
        ours = ours.reshape(1, 3, kv, HEAD_DIM)
        theirs = theirs.reshape(1, 3, -1, HEAD_DIM)
        if theirs.shape[2] == heads and kv != heads:  # Falcon broadcasts each KV head over its group
            theirs = theirs[:, :, ::per_group]
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_per_head_split_matches_gpt_neox_attention():
    """GPT-NeoX's own attention (RoPE made the identity) equals attention over the split q/k/v and dense."""
    import torch
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

    qkv = load("qkv_split")
    config = GPTNeoXConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=64, num_hidden_layers=1,
                           vocab_size=VOCAB, attention_bias=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = GPTNeoXAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        attn.query_key_value.bias.normal_()
    tokens = 5
    x = torch.randn(1, tokens, HIDDEN)
    rotary = int(HEAD_DIM * config.rope_parameters["partial_rotary_factor"])
    cos, sin = torch.ones(1, tokens, rotary), torch.zeros(1, tokens, rotary)
    with torch.no_grad():
        theirs = attn(x, attention_mask=None, position_embeddings=(cos, sin))[0].numpy()
    w = attn.query_key_value.weight.detach().numpy()
    b = attn.query_key_value.bias.detach().numpy()
    xs = x.numpy()[0]
    q, k, v = (project(xs, pw, pb).reshape(tokens, HEADS, HEAD_DIM).transpose(1, 0, 2)
               for pw, pb in zip(qkv.split_per_head_interleaved(w, HEADS, HEAD_DIM),
                                 qkv.split_per_head_interleaved(b, HEADS, HEAD_DIM)))
    scores = q @ k.transpose(0, 2, 1) * HEAD_DIM**-0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(tokens, HIDDEN)
    ours = project(out, attn.dense.weight.detach().numpy(), attn.dense.bias.detach().numpy())
    np.testing.assert_allclose(ours, theirs[0], rtol=1e-4, atol=1e-5)


def test_splits_reject_wrong_row_counts():
    qkv = load("qkv_split")
    with pytest.raises(ValueError, match="expected 8 \\+ 2 \\* 4"):
        qkv.split_concatenated(np.zeros((15, 2)), 8, 4)
    with pytest.raises(ValueError, match="do not group"):
        qkv.split_grouped(np.zeros((24, 2)), 4, 3, 2)


def test_conv1d_transpose_matches_transformers_conv1d():
    import torch
    from max.dtype import DType
    from max.graph.weights import WeightData
    from transformers.pytorch_utils import Conv1D

    qkv = load("qkv_split")
    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=HIDDEN)
    x = torch.randn(3, HIDDEN)
    data = WeightData.from_numpy(conv.weight.detach().numpy(), "c_fc.weight")
    transposed = qkv.conv1d_transposed(data)
    assert transposed.dtype == DType.float32 and tuple(int(d) for d in transposed.shape) == (12, HIDDEN)
    ours = x.numpy() @ qkv.as_array(transposed).T + conv.bias.detach().numpy()
    np.testing.assert_allclose(ours, conv(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_conv1d_transpose_keeps_dtype_of_a_header_only_stand_in():
    """The dry-build's uint8 stand-in: from_numpy(arr.T) reports uint8, the helper keeps float32."""
    from max.dtype import DType
    from max.graph.weights import WeightData

    qkv = load("qkv_split")
    stand_in = np.lib.stride_tricks.as_strided(np.zeros((), np.uint8), shape=(HIDDEN, 12), strides=(0, 0))
    data = WeightData(stand_in, "c_fc.weight", DType.float32, [HIDDEN, 12])
    assert WeightData.from_numpy(qkv.as_array(data).T, "x").dtype == DType.uint8  # the trap
    fixed = qkv.conv1d_transposed(data)
    assert fixed.dtype == DType.float32 and [int(d) for d in fixed.shape] == [12, HIDDEN]
    named = qkv.split_fused(data, ("q", "k", "v"), qkv.split_concatenated(qkv.as_array(data), 16, 8))
    assert {n: d.dtype for n, d in named.items()} == {"q": DType.float32, "k": DType.float32, "v": DType.float32}


def test_token_positions_reference_for_two_ragged_prompts():
    """Two prompts of 3 and 5 tokens in one batch, the second with 4 tokens already cached."""
    positions = load("positions")
    got = positions.token_positions_reference(np.array([0, 3, 8]), np.array([0, 4]))
    np.testing.assert_array_equal(got, [0, 1, 2, 4, 5, 6, 7, 8])
    decode = positions.token_positions_reference(np.array([0, 1, 2]), np.array([7, 2]))
    np.testing.assert_array_equal(decode, [7, 2])


def qwen2_moe_config(renormalize: bool):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                          num_experts=6, num_experts_per_tok=2, norm_topk_prob=renormalize, hidden_act="silu",
                          num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                          vocab_size=VOCAB)


def dense_routing(router, hidden):
    """The dense [tokens, experts] weights transformers' router gives (its top-k scattered into zeros)."""
    import torch

    _, scores, indices = router(hidden)
    dense = torch.zeros(hidden.shape[0], router.num_experts)
    return dense.scatter(1, indices, scores.float()).detach().numpy()


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_routing_matches_qwen2_moe_router(renormalize):
    import torch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    moe = load("moe")
    torch.manual_seed(0)
    router = Qwen2MoeTopKRouter(qwen2_moe_config(renormalize))
    with torch.no_grad():
        router.weight.normal_()
    hidden = torch.randn(7, HIDDEN)
    logits = (hidden @ router.weight.T).detach().numpy()
    ours = moe.routing_weights_reference(logits, 2, moe.RouterScore.SOFTMAX, renormalize)
    np.testing.assert_allclose(ours, dense_routing(router, hidden), rtol=1e-5, atol=1e-6)
    assert ((ours > 0).sum(-1) == 2).all()


def test_sigmoid_routing_with_selection_bias():
    """DeepSeek-V3 style: chosen by score + bias, weighted by the raw score, renormalized, then scaled."""
    moe = load("moe")
    logits = np.array([[0.0, 2.0, -1.0, 1.0]])
    bias = np.array([0.0, 0.0, 5.0, 0.0])
    got = moe.routing_weights_reference(logits, 2, moe.RouterScore.SIGMOID, True, bias, routed_scaling=2.5)
    s = 1 / (1 + np.exp(-logits[0]))
    expected = np.zeros(4)
    expected[[1, 2]] = s[[1, 2]] / (s[1] + s[2]) * 2.5
    np.testing.assert_allclose(got[0], expected)


def test_dense_expert_sum_matches_qwen2_moe_block():
    """All experts on every token, weighted by the dense routing, plus the gated shared expert, equals HF's sparse block."""
    import torch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    moe = load("moe")
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(qwen2_moe_config(True)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)
    hidden = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        theirs = block(hidden).reshape(5, HIDDEN).numpy()
    x = hidden.reshape(5, HIDDEN).numpy().astype(np.float64)
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in block.state_dict().items()}
    weights = moe.routing_weights_reference(x @ sd["gate.weight"].T, 2, moe.RouterScore.SOFTMAX, True)

    def silu(a):
        return a / (1 + np.exp(-a))

    inter = sd["experts.down_proj"].shape[-1]
    gate_up = np.einsum("th,eoh->eto", x, sd["experts.gate_up_proj"])
    act = silu(gate_up[..., :inter]) * gate_up[..., inter:]
    experts = np.einsum("eti,ehi->eth", act, sd["experts.down_proj"])
    routed = (experts * weights.T[:, :, None]).sum(0)
    shared = (silu(x @ sd["shared_expert.gate_proj.weight"].T) * (x @ sd["shared_expert.up_proj.weight"].T)
              ) @ sd["shared_expert.down_proj.weight"].T
    gate = 1 / (1 + np.exp(-(x @ sd["shared_expert_gate.weight"].T)))
    np.testing.assert_allclose(routed + gate * shared, theirs, rtol=1e-4, atol=1e-5)
