"""The composed Qwen2-MoE port (tests/composed_ports/qwen2moe_blocks, built from templates/blocks) against transformers, on the CPU.

The port is generated at fixture time: ``scaffold --start-from
templates/ports/stablelm --with <blocks>`` and then the overlay files (the
graph module, weight_adapters.py) and the edits of
tests/composed_ports/qwen2moe_blocks/compose.json (model_config.py stays the worked
port's, edited in place). The generated graph keeps the name
``qwen2moe_blocks`` and the same ops, so MAX's compile cache serves it warm.

One strong-init replica is built by make_tiny_model from transformers' default
Qwen2MoeConfig (2 layers, both sparse as ``decoder_sparse_step=1`` and an empty
``mlp_only_layers`` make every layer; 4 experts, top 2, ``norm_topk_prob``
false, a gated shared expert; biased q/k/v, unbiased o, full RoPE, RMSNorm,
sequential residual). One server (one compile) serves the port; it must MATCH
transformers, and two prompts of different lengths sent together must get the
answers they get alone.

Blocks and the options this port covers:
- moe.py ``DenseMoE``: softmax router, top-k < experts, ``renormalize=False``
  (the config's ``norm_topk_prob``), shared expert with its sigmoid gate; the
  weight adapter stacks the per-expert checkpoint tensors;
- attention.py ``BiasedAttention``: ``qkv_bias=True``, ``o_bias=False``, full
  rotate-half RoPE (``rotary_dim == head_dim``), default scale;
- norms.py ``RMSNormF32``: no offset, Llama-style cast before the weight;
- residual.py ``SequentialResidualBlock``: pre-norms only;
- qkv_split.py: ``as_array`` / ``like`` (dtype-safe re-assembly in the adapter).
The dense-MLP layers the config can ask for (``decoder_sparse_step``,
``mlp_only_layers``) are MAX's ``MLP``; a replica with such a layer is checked
by the dry-build and key-diff only (no compile).

Planted bugs reuse the compiled graph:
- reference-side: the HF reference is a copy of the replica edited (weights or
  config) so that it computes what the port would compute with the bug; for
  the sigmoid router, which no weight or config edit of Qwen2-MoE expresses,
  the reference's router is patched in this process while it runs;
- served-side: a second server (same config, so MAX's compile cache is hit)
  serves a copy with the q/k/v biases zeroed, against the unedited replica.
Each mutation names the block it exercises.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from composed_ports import harness
from composed_ports.compose import compose_port

PORT_NAME = "qwen2moe_blocks"  # tests/composed_ports/<name>: compose.json and the overlay files
ARCHITECTURE = "Qwen2MoeForCausalLM"
GRAPH_CLASS = "Qwen2MoeBlocks"
PROMPTS = ["The capital of France is Paris.", "Once upon a time there was a little robot"]
ROUTER_GAP_MIN = 1e-4  # k-th vs (k+1)-th router probability: 100x the float32 logprob tolerance order, no flips


def head_layout(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a Qwen2-MoE config."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return heads, int(config["num_key_value_heads"]), head_dim


# --- mutations: each is what the port would compute with one block's bug ----------


def renormalized_router(config):
    """moe.py: the top-k weights renormalized where the config says ``norm_topk_prob: false``."""
    config["norm_topk_prob"] = not config["norm_topk_prob"]
    return config


def changed_top_k(config):
    """moe.py: one more expert per token than the config's ``num_experts_per_tok``."""
    config["num_experts_per_tok"] = int(config["num_experts_per_tok"]) + 1
    return config


def ungated_shared_expert(tensors, config):
    """moe.py: the shared expert added without its sigmoid gate.

    With the gate weight zero the reference scales the shared expert by
    sigmoid(0) = 1/2; doubling its down projection makes that exactly the
    ungated shared expert.
    """
    for name in list(tensors):
        if name.endswith("mlp.shared_expert_gate.weight"):
            tensors[name].zero_()
        elif name.endswith("mlp.shared_expert.down_proj.weight"):
            tensors[name] = tensors[name] * 2.0


def swapped_gate_up(tensors, config):
    """moe.py / the adapter's expert stacking: gate and up rows in the wrong order in ``gate_up_proj``."""
    for name in list(tensors):
        if ".mlp.experts." in name and name.endswith("gate_proj.weight"):
            up = name.replace("gate_proj", "up_proj")
            tensors[name], tensors[up] = tensors[up].clone(), tensors[name].clone()


def interleaved_rope(tensors, config):
    """attention.py: RoPE in the interleaved layout (GPT-J pairs) where Qwen2-MoE rotates halves.

    Rotating neighbour pairs (2j, 2j+1) of q and k gives the same scores as
    rotating half pairs (j, j + d/2) of q and k with their rows reordered to
    [0, 2, 4, ..., 1, 3, 5, ...] within each head, so the reference gets that
    reordering of its q/k weights and biases.
    """
    import torch

    _, _, head_dim = head_layout(config)
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    for name in list(tensors):
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            t = tensors[name]
            view = t.reshape(-1, head_dim, *t.shape[1:])
            tensors[name] = view[:, order].reshape(t.shape).clone()


def offset_rms_weight(tensors, config):
    """norms.py: the ``(1 + w)`` RMSNorm (``weight_offset=1.0``) where Qwen2-MoE scales by ``w``."""
    for name in list(tensors):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensors[name] = tensors[name] + 1.0


def swapped_block_norms(tensors, config):
    """residual.py: the sequential block's two norms swapped (the pre-MLP norm used before attention)."""
    for name in list(tensors):
        if name.endswith("input_layernorm.weight"):
            other = name.replace("input_layernorm", "post_attention_layernorm")
            tensors[name], tensors[other] = tensors[other].clone(), tensors[name].clone()


def zero_qkv_bias(tensors, config):
    """attention.py: the q/k/v biases dropped (served-side: the served copy has them zeroed)."""
    for name in tensors:
        if any(name.endswith(f"self_attn.{p}_proj.bias") for p in "qkv"):
            tensors[name].zero_()


@contextlib.contextmanager
def sigmoid_router():
    """While active, transformers' Qwen2-MoE router scores experts with a sigmoid instead of a softmax.

    What the port would compute with ``RouterScore.SIGMOID``: the same top-k
    (the sigmoid is monotonic), weighted by sigmoid(logit), renormalized only
    when ``norm_topk_prob``.
    """
    import torch
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    router = modeling_qwen2_moe.Qwen2MoeTopKRouter
    original = router.forward

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(flat, self.weight)
        top, indices = torch.topk(torch.sigmoid(logits.float()), self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), indices

    router.forward = forward
    try:
        yield
    finally:
        router.forward = original


REFERENCE_MUTATIONS = {
    "renormalized_router": (None, renormalized_router),
    "changed_top_k": (None, changed_top_k),
    "ungated_shared_expert": (ungated_shared_expert, None),
    "swapped_gate_up": (swapped_gate_up, None),
    "interleaved_rope": (interleaved_rope, None),
    "offset_rms_weight": (offset_rms_weight, None),
    "swapped_block_norms": (swapped_block_norms, None),
}
PATCHED_REFERENCES = {"sigmoid_router": sigmoid_router}  # an unedited copy, compared under the patch
SERVED_MUTATION = "served_missing_qkv_bias"


@pytest.fixture(scope="module")
def module_clock():
    return time.monotonic()


@pytest.fixture(scope="module")
def replica(tmp_path_factory, module_clock):
    root = tmp_path_factory.mktemp(PORT_NAME)
    from transformers import Qwen2MoeConfig

    source = harness.default_source(root / "source", Qwen2MoeConfig, ARCHITECTURE)
    return harness.make_replica(source, root / "replica")


@pytest.fixture(scope="module")
def port_dir(replica, tmp_path_factory):
    """The composed port, scaffolded from the worked port with its blocks and overlaid (no compile)."""
    return compose_port(PORT_NAME, replica, tmp_path_factory.mktemp("composed"))


@pytest.fixture(scope="module")
def mutants(replica, tmp_path_factory):
    root = tmp_path_factory.mktemp("mutants")
    return harness.mutant_copies(replica, root, REFERENCE_MUTATIONS, patched=PATCHED_REFERENCES)


# --- fast checks (no compile) ------------------------------------------------------


def test_replica_exercises_every_option(replica):
    import json

    from safetensors import safe_open

    config = json.loads((replica / "config.json").read_text())
    assert config["num_experts_per_tok"] < config["num_experts"], "top-k must leave experts out"
    assert config["qkv_bias"] and not config["norm_topk_prob"] and config["hidden_act"] == "silu"
    assert config["decoder_sparse_step"] == 1 and not config["mlp_only_layers"], "every layer is sparse"
    with safe_open(str(replica / harness.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
        gate = handle.get_tensor("model.layers.0.mlp.shared_expert_gate.weight")
        q_bias = handle.get_tensor("model.layers.0.self_attn.q_proj.bias")
    for layer in range(config["num_hidden_layers"]):
        assert f"model.layers.{layer}.mlp.gate.weight" in keys, f"layer {layer} is not sparse"
    assert "model.layers.0.self_attn.o_proj.bias" not in keys and "lm_head.weight" in keys
    assert float(gate.abs().max()) > 0 and float(q_bias.abs().max()) > 0, "zero weights would hide a dropped part"


def test_router_choices_are_decisive(replica):
    """On the prompts, the k-th and (k+1)-th router probabilities are far apart, so float noise cannot flip the
    top-k choice between MAX and transformers (a flip would be a replica problem, not a port bug)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(replica).eval()
    tokenizer = AutoTokenizer.from_pretrained(replica)
    gaps = []

    def record(module, inputs, output):
        probs = torch.softmax(output[0].float(), dim=-1)
        top = torch.topk(probs, module.top_k + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    hooks = [layer.mlp.gate.register_forward_hook(record) for layer in model.model.layers]
    with torch.no_grad():
        for prompt in PROMPTS:
            model(torch.tensor([tokenizer(prompt)["input_ids"]]))
    for hook in hooks:
        hook.remove()
    assert gaps and min(gaps) > ROUTER_GAP_MIN, gaps


def test_port_blocks_are_the_library_copies(port_dir):
    harness.check_port_blocks(port_dir, PORT_NAME)


def test_generated_port_keeps_the_compiled_names(port_dir):
    harness.check_compiled_names(port_dir, PORT_NAME, ARCHITECTURE, GRAPH_CLASS)


def test_port_dry_builds_and_keys_match(replica, port_dir):
    harness.check_dry_build(replica, port_dir)


@pytest.mark.parametrize("dense_layers", [{"decoder_sparse_step": 2}, {"mlp_only_layers": [0]}],
                         ids=["decoder_sparse_step", "mlp_only_layers"])
def test_port_honours_dense_layers(port_dir, tmp_path, dense_layers):
    """A replica whose config makes layer 0 dense and layer 1 sparse dry-builds with matching keys."""
    import functools

    from safetensors import safe_open
    from transformers import Qwen2MoeConfig

    with_dense = functools.partial(Qwen2MoeConfig, **dense_layers)
    replica = harness.make_replica(harness.default_source(tmp_path / "source", with_dense, ARCHITECTURE),
                                   tmp_path / "replica")
    with safe_open(str(replica / harness.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.0.mlp.gate.weight" not in keys
    assert "model.layers.1.mlp.gate.weight" in keys
    harness.check_dry_build(replica, port_dir)


def test_each_mutation_moves_hf_logits(replica, mutants):
    """The edits are real: transformers itself gives different next-token logits on every mutant."""
    moved = harness.check_mutations_move_hf(replica, mutants, patched=PATCHED_REFERENCES)
    print("qwen2moe_blocks HF moves per mutation:", {k: round(v, 3) for k, v in moved.items()})


# --- e2e: one compile, one server for the reference-side mutations ----------------


@pytest.fixture(scope="module")
def served(replica, port_dir, mutants, tmp_path_factory, module_clock):
    """Reports: "port" (MATCH expected), "alone_and_together", one per reference mutation, and the served bug."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    reports = harness.serve_and_compare(replica, port_dir, PROMPTS, mutants, timings,
                                        patched=PATCHED_REFERENCES)
    bugged = harness.edited_copy(replica, tmp_path_factory.mktemp("served") / "replica", zero_qkv_bias)
    second = harness.serve_and_compare(replica, port_dir, PROMPTS, {}, timings, label="second", served_copy=bugged)
    reports[SERVED_MUTATION] = second["port"]
    timings["fixture_total"] = time.monotonic() - started
    timings["module_total"] = time.monotonic() - module_clock
    harness.print_summary(PORT_NAME, timings, reports)
    return reports


@pytest.mark.e2e
def test_composed_port_matches_hf(served):
    report = served["port"]
    assert report.verdict == "MATCH", report.first_divergence
    assert len(report.runs) == len(PROMPTS)


@pytest.mark.e2e
def test_concurrent_prompts_of_different_lengths_match_alone(served):
    harness.check_alone_and_together(*served["alone_and_together"])


@pytest.mark.e2e
@pytest.mark.parametrize("name", [*REFERENCE_MUTATIONS, *PATCHED_REFERENCES, SERVED_MUTATION])
def test_planted_bug_diverges(served, name):
    harness.check_diverged(served[name], name)
