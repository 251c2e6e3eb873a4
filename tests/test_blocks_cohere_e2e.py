"""The composed Cohere port (tests/composed_ports/cohere_blocks, built from templates/blocks) against transformers, on the CPU.

The port is generated at fixture time: ``scaffold --start-from
templates/ports/stablelm --with <blocks>``, then the one overlay file (the
graph module) and the edits of tests/composed_ports/cohere_blocks/compose.json
(model_config.py and weight_adapters.py stay the worked port's, edited in
place). The generated graph keeps the name ``cohere_blocks`` and the same ops,
so MAX's compile cache serves it warm.

One strong-init replica is built by make_tiny_model from transformers' default
CohereConfig (2 layers, 4 heads, tied embeddings, ``logit_scale`` 0.0625, no
biases, no q/k norm). One server (one compile) serves the port; it must MATCH
transformers, and two prompts of different lengths sent together must get the
answers they get alone.

Blocks and the options this port covers:
- attention.py ``BiasedAttention`` / ``build_rope``: ``RopeLayout.INTERLEAVED``
  over the whole head (``rotary_dim == head_dim``), no biases
  (``qkv_bias=False``, ``o_bias=False``), default scale;
- residual.py ``ParallelResidualBlock``: one shared input norm (no
  ``mlp_norm``);
- norms.py ``LayerNormF32``: weight, no bias (``bias=False``), float32;
- head.py ``logits_scaling_divisor``: Cohere's ``logit_scale`` multiplier
  given to MAX's dividing ``logits_scaling``; the head is tied to the
  embedding (``set_shared_weight``).
The gated SiLU MLP is MAX's ``MLP`` (no block).

Planted bugs reuse the compiled graph: the HF reference is a copy of the
replica edited (weights or config) so that it computes what the port would
compute with the bug; for the two bugs no weight or config edit of Cohere
expresses (sequential residual, RMSNorm for LayerNorm) the reference's module
is patched in this process while it runs. Not expressible here: "two norms
instead of one shared" (Cohere has one norm weight per layer; two norms with
that same weight on the same input equal the shared one, so the sequential
residual stands in for the residual block) and a norm bias (the checkpoint has
none to load; the ``(1 + w)`` offset stands in for a wrong norm affine).
Each mutation names the block it exercises.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from composed_ports import harness
from composed_ports.compose import compose_port

PORT_NAME = "cohere_blocks"  # tests/composed_ports/<name>: compose.json and the overlay file
ARCHITECTURE = "CohereForCausalLM"
GRAPH_CLASS = "CohereBlocks"
PROMPTS = ["The capital of France is Paris.", "Once upon a time there was a little robot"]
OTHER_ROPE_THETA = 10000.0  # the common default; Cohere's is 500000 (a port that ignores rope_parameters)


def head_dim(config: dict) -> int:
    """Per-head width of a Cohere config (``head_dim`` when set, as CohereAttention)."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


# --- mutations: each is what the port would compute with one block's bug ----------


def logit_scale_multiplied(config):
    """head.py: ``logit_scale`` given to MAX's ``logits_scaling`` as is (which divides), not its reciprocal."""
    config["logit_scale"] = 1.0 / float(config["logit_scale"])
    return config


def rotate_half_rope(tensors, config):
    """attention.py: RoPE in the rotate-half layout (pairs j, j + d/2) where Cohere pairs neighbours (2j, 2j+1).

    Interleaved RoPE on q/k rows reordered so that new row 2j is old row j and
    new row 2j+1 is old row j + d/2 gives the scores of rotate-half RoPE on the
    original rows (same reordering of q and k, v untouched), so the reference
    gets that reordering of its q/k weights.
    """
    import torch

    width = head_dim(config)
    half = torch.arange(width // 2)
    order = torch.stack([half, half + width // 2], dim=-1).flatten()
    for name in list(tensors):
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            t = tensors[name]
            tensors[name] = t.reshape(-1, width, *t.shape[1:])[:, order].reshape(t.shape).clone()


def offset_norm_weight(tensors, config):
    """norms.py: a ``(1 + w)`` scale where CohereLayerNorm scales by ``w`` (a wrong norm affine)."""
    for name in list(tensors):
        if name.endswith("input_layernorm.weight") or name == "model.norm.weight":
            tensors[name] = tensors[name] + 1.0


def ignored_rope_theta(config):
    """model_config.py edits: a port that misses ``rope_parameters`` and falls back to theta 10000."""
    config["rope_parameters"] = dict(config["rope_parameters"], rope_theta=OTHER_ROPE_THETA)
    return config


def swapped_gate_up(tensors, config):
    """The gated MLP (MAX ``MLP``): gate and up projections exchanged."""
    for name in list(tensors):
        if name.endswith("mlp.gate_proj.weight"):
            up = name.replace("gate_proj", "up_proj")
            tensors[name], tensors[up] = tensors[up].clone(), tensors[name].clone()


@contextlib.contextmanager
def sequential_residual():
    """While active, transformers' Cohere layer is sequential: ``h = x + attn(ln(x))``, ``h + mlp(ln(h))``.

    What the port would compute with residual.py's ``SequentialResidualBlock``
    given the one Cohere norm twice, instead of the parallel block.
    """
    from transformers.models.cohere import modeling_cohere

    layer = modeling_cohere.CohereDecoderLayer
    original = layer.forward

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        h = hidden_states + attn
        return h + self.mlp(self.input_layernorm(h))

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


@contextlib.contextmanager
def rms_for_layer_norm():
    """While active, CohereLayerNorm skips the mean subtraction: norms.py ``RMSNormF32`` where Cohere needs
    ``LayerNormF32(bias=False)``."""
    import torch
    from transformers.models.cohere import modeling_cohere

    norm = modeling_cohere.CohereLayerNorm
    original = norm.forward

    def forward(self, hidden_states):
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.to(torch.float32) * x).to(hidden_states.dtype)

    norm.forward = forward
    try:
        yield
    finally:
        norm.forward = original


REFERENCE_MUTATIONS = {
    "logit_scale_multiplied": (None, logit_scale_multiplied),
    "rotate_half_rope": (rotate_half_rope, None),
    "offset_norm_weight": (offset_norm_weight, None),
    "ignored_rope_theta": (None, ignored_rope_theta),
    "swapped_gate_up": (swapped_gate_up, None),
}
PATCHED_REFERENCES = {"sequential_residual": sequential_residual, "rms_for_layer_norm": rms_for_layer_norm}


@pytest.fixture(scope="module")
def module_clock():
    return time.monotonic()


@pytest.fixture(scope="module")
def replica(tmp_path_factory, module_clock):
    root = tmp_path_factory.mktemp(PORT_NAME)
    from transformers import CohereConfig

    source = harness.default_source(root / "source", CohereConfig, ARCHITECTURE)
    return harness.make_replica(source, root / "replica")


@pytest.fixture(scope="module")
def port_dir(replica, tmp_path_factory):
    """The composed port, scaffolded from the worked port with its blocks, overlaid and edited (no compile)."""
    return compose_port(PORT_NAME, replica, tmp_path_factory.mktemp("composed"))


@pytest.fixture(scope="module")
def mutants(replica, tmp_path_factory):
    root = tmp_path_factory.mktemp("mutants")
    return harness.mutant_copies(replica, root, REFERENCE_MUTATIONS, patched=PATCHED_REFERENCES)


# --- fast checks (no compile) ------------------------------------------------------


def test_replica_exercises_every_option(replica):
    from safetensors import safe_open

    config = json.loads((replica / "config.json").read_text())
    assert config["tie_word_embeddings"] and float(config["logit_scale"]) != 1.0
    assert not config["attention_bias"] and not config["use_qk_norm"] and config["hidden_act"] == "silu"
    assert config["rope_parameters"]["rope_theta"] != OTHER_ROPE_THETA
    assert "partial_rotary_factor" not in config["rope_parameters"], "Cohere rotates the whole head"
    with safe_open(str(replica / harness.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
        norm = handle.get_tensor("model.layers.0.input_layernorm.weight")
    assert "lm_head.weight" not in keys, "the head must be tied"
    assert not any(k.endswith(".bias") for k in keys)
    assert not any("post_attention_layernorm" in k for k in keys), "one shared norm per layer"
    assert float((norm - 1.0).abs().max()) > 0, "a unit norm weight would hide a dropped norm weight"


def test_port_blocks_are_the_library_copies(port_dir):
    harness.check_port_blocks(port_dir, PORT_NAME)


def test_generated_port_keeps_the_compiled_names(port_dir):
    harness.check_compiled_names(port_dir, PORT_NAME, ARCHITECTURE, GRAPH_CLASS)


def test_port_dry_builds_and_keys_match(replica, port_dir):
    harness.check_dry_build(replica, port_dir)


def test_port_refuses_qk_norm(port_dir, tmp_path):
    """A replica with ``use_qk_norm`` (per-head q/k LayerNorm, no block) fails the dry-build naming the key."""
    import functools

    from conftest import run_script
    from transformers import CohereConfig

    with_qk_norm = functools.partial(CohereConfig, use_qk_norm=True)
    replica = harness.make_replica(harness.default_source(tmp_path / "source", with_qk_norm, ARCHITECTURE),
                                   tmp_path / "replica")
    result = run_script("port_probe", replica, "--port-dir", port_dir, "--check", "dry-build", "--fork", "--json",
                        timeout=harness.DRY_BUILD_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    (build,) = result.json()["results"]
    assert not build["document"]["passed"] and "use_qk_norm" in build["document"]["summary"], build


def test_each_mutation_moves_hf_logits(replica, mutants):
    """The edits are real: transformers itself gives different next-token logits on every mutant."""
    moved = harness.check_mutations_move_hf(replica, mutants, patched=PATCHED_REFERENCES)
    print("cohere_blocks HF moves per mutation:", {k: round(v, 3) for k, v in moved.items()})


# --- e2e: one compile, one server for every mutation ------------------------------


@pytest.fixture(scope="module")
def served(replica, port_dir, mutants, module_clock):
    """Reports: "port" (MATCH expected), "alone_and_together", one per mutation (DIVERGED expected)."""
    timings: dict[str, float] = {}
    reports = harness.serve_and_compare(replica, port_dir, PROMPTS, mutants, timings,
                                        patched=PATCHED_REFERENCES)
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
@pytest.mark.parametrize("name", [*REFERENCE_MUTATIONS, *PATCHED_REFERENCES])
def test_planted_bug_diverges(served, name):
    harness.check_diverged(served[name], name)
