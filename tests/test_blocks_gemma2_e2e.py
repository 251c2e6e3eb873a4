"""The composed Gemma 2 port (tests/composed_ports/gemma2_blocks, built from templates/blocks) against transformers, on the CPU.

The port is generated at fixture time: ``scaffold --start-from
templates/ports/stablelm --with <blocks>``, then the one overlay file (the
graph module) and the edits of tests/composed_ports/gemma2_blocks/compose.json
(model_config.py and weight_adapters.py stay the worked port's, edited in
place). The generated graph keeps the name ``gemma2_blocks`` and the same ops,
so MAX's compile cache serves it warm.

One strong-init replica is built by make_tiny_model from transformers' default
Gemma2Config with one change: ``query_pre_attn_scalar`` is ``hidden_size //
num_attention_heads`` (Gemma 2 27B's convention) instead of ``head_dim``, so
the score scale differs from ``head_dim ** -0.5`` (tiny keeps that relation:
18 against a head_dim of 16). The replica has 2 layers (one sliding, one
global, window 128 from max_compat's floor), 4 query heads on 2 KV heads,
``attn_logit_softcapping`` 50, ``final_logit_softcapping`` 30, tied
embeddings. Both prompts are longer than the window, so the sliding layer
differs from the global one at the later positions. One server (one compile)
serves the port; it must MATCH transformers, and the two prompts (of different
lengths) sent together must get the answers they get alone.

Blocks and the options this port covers:
- softcap_attention.py ``SoftcapAttention`` / ``packed_kv_cache_shape``:
  soft-capped scores, the ``query_pre_attn_scalar`` scale, a sliding window on
  one layer and the causal mask on the other, grouped KV heads packed into one
  cache slot, full-head rotate-half RoPE, no biases;
- attention.py ``build_rope``: the RoPE table sized from ``head_dim``;
- norms.py ``RMSNormF32(weight_offset=1.0)``: Gemma's ``(1 + w)`` in float32;
- residual.py ``SequentialResidualBlock``: pre and post norms (four per layer);
- head.py ``ScaledLMHead``: the final softcap, tied to the embedding.
The embedding multiplier is ``Transformer(embedding_multiplier=...)`` and the
gated tanh-GELU MLP is MAX's ``MLP`` (no block).

Planted bugs reuse the compiled graph: the HF reference is a copy of the
replica edited (weights or config) so that it computes what the port would
compute with the bug; for the two bugs no edit expresses (post-norms dropped,
embedding multiplier missing) the reference's module is patched in this
process while it runs. Each mutation names the block it exercises.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time

import pytest

from composed_ports import harness
from composed_ports.compose import compose_port

PORT_NAME = "gemma2_blocks"  # tests/composed_ports/<name>: compose.json and the overlay file
ARCHITECTURE = "Gemma2ForCausalLM"
GRAPH_CLASS = "Gemma2Blocks"
UNCAPPED_WINDOW = 4096  # Gemma2Config's default window: wider than any prompt here, so HF attends globally
PROMPT_MANIFEST = "tiny_replica.json"  # make_tiny_model's probe prompt, at least twice the window
SHORTER_PROMPT_SHARE = 0.7  # the second prompt: this share of the probe prompt's characters (still past the window)


def gemma2_27b_scalar_config(**kwargs):
    """Gemma2Config's defaults with ``query_pre_attn_scalar = hidden_size // num_attention_heads`` (as 27B)."""
    from transformers import Gemma2Config

    defaults = Gemma2Config()
    return Gemma2Config(query_pre_attn_scalar=defaults.hidden_size // defaults.num_attention_heads, **kwargs)


def probe_prompts(replica) -> list[str]:
    """The replica's probe prompt and a shorter cut of it (both longer than the window, different lengths)."""
    prompt = json.loads((replica / PROMPT_MANIFEST).read_text())["prompt"]
    return [prompt, prompt[: int(len(prompt) * SHORTER_PROMPT_SHARE)].rstrip()]


def prompt_ids(replica):
    """The probe prompt's token ids as a [1, n] tensor (no chat template, as compare sends it)."""
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(replica)(probe_prompts(replica)[0]).input_ids
    return torch.tensor([ids])


def is_norm(name: str) -> bool:
    return name.endswith("layernorm.weight") or name == "model.norm.weight"


# --- mutations: each is what the port would compute with one block's bug ----------


def no_attention_softcap(config):
    """softcap_attention.py: scores not capped (``softcap=None``)."""
    config["attn_logit_softcapping"] = None
    return config


def no_final_softcap(config):
    """head.py: ``ScaledLMHead`` without ``final_softcap``."""
    config["final_logit_softcapping"] = None
    return config


def ignored_sliding_window(config):
    """softcap_attention.py: the sliding layer attends to the whole prefix (window ignored)."""
    config["sliding_window"] = UNCAPPED_WINDOW
    return config


def head_dim_scale(config):
    """softcap_attention.py / model_config.py: scale ``head_dim ** -0.5`` instead of ``query_pre_attn_scalar``."""
    config["query_pre_attn_scalar"] = int(config["head_dim"])
    return config


def swapped_layer_pattern(config):
    """model_config.py ``layer_windows``: the sliding and global layers exchanged."""
    config["layer_types"] = list(reversed(config["layer_types"]))
    return config


def dropped_norm_offset(tensors, config):
    """norms.py: ``RMSNormF32`` without ``weight_offset=1.0`` scales by ``w``; HF scales by ``1 + (w - 1)``."""
    for name in list(tensors):
        if is_norm(name):
            tensors[name] = tensors[name] - 1.0


@contextlib.contextmanager
def dropped_post_norms():
    """While active, Gemma2DecoderLayer skips its two post-norms: residual.py ``SequentialResidualBlock``
    built without ``post_attention_norm`` / ``post_mlp_norm``."""
    from transformers.models.gemma2 import modeling_gemma2

    layer = modeling_gemma2.Gemma2DecoderLayer
    original = layer.forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                 position_embeddings=position_embeddings, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        h = hidden_states + attn
        return h + self.mlp(self.pre_feedforward_layernorm(h))

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


@contextlib.contextmanager
def missing_embedding_multiplier():
    """While active, Gemma 2's embedding is not multiplied by ``sqrt(hidden_size)``: a port that leaves out
    ``Transformer(embedding_multiplier=...)``."""
    import torch
    from transformers.models.gemma2 import modeling_gemma2

    embedding = modeling_gemma2.Gemma2TextScaledWordEmbedding
    original = embedding.forward

    def forward(self, input_ids):
        return torch.nn.Embedding.forward(self, input_ids)

    embedding.forward = forward
    try:
        yield
    finally:
        embedding.forward = original


REFERENCE_MUTATIONS = {
    "no_attention_softcap": (None, no_attention_softcap),
    "no_final_softcap": (None, no_final_softcap),
    "ignored_sliding_window": (None, ignored_sliding_window),
    "head_dim_scale": (None, head_dim_scale),
    "swapped_layer_pattern": (None, swapped_layer_pattern),
    "dropped_norm_offset": (dropped_norm_offset, None),
}
PATCHED_REFERENCES = {"dropped_post_norms": dropped_post_norms,
                      "missing_embedding_multiplier": missing_embedding_multiplier}


@pytest.fixture(scope="module")
def module_clock():
    return time.monotonic()


@pytest.fixture(scope="module")
def replica(tmp_path_factory, module_clock):
    root = tmp_path_factory.mktemp(PORT_NAME)
    source = harness.default_source(root / "source", gemma2_27b_scalar_config, ARCHITECTURE)
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
    from transformers import AutoTokenizer

    config = json.loads((replica / "config.json").read_text())
    assert config["tie_word_embeddings"] and not config["attention_bias"]
    assert config["hidden_activation"] == "gelu_pytorch_tanh"
    assert config["attn_logit_softcapping"] and config["final_logit_softcapping"]
    assert config["query_pre_attn_scalar"] != config["head_dim"], "the scale must differ from head_dim ** -0.5"
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert config["num_key_value_heads"] < config["num_attention_heads"], "grouped KV heads in one packed slot"
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["layer_types"] != list(reversed(config["layer_types"]))
    tokenizer = AutoTokenizer.from_pretrained(replica)
    lengths = [len(tokenizer(p).input_ids) for p in probe_prompts(replica)]
    assert min(lengths) > config["sliding_window"] and len(set(lengths)) == len(lengths), lengths
    with safe_open(str(replica / harness.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
        norm = handle.get_tensor("model.layers.0.post_attention_layernorm.weight")
    assert "lm_head.weight" not in keys, "the head must be tied"
    assert not any(k.endswith(".bias") for k in keys)
    assert sum("layers.0." in k and k.endswith("layernorm.weight") for k in keys) == 4, "four norms per layer"
    assert float(norm.abs().max()) > 0, "a zero norm weight would hide a dropped (1 + w) offset"


def test_port_blocks_are_the_library_copies(port_dir):
    harness.check_port_blocks(port_dir, PORT_NAME)


def test_generated_port_keeps_the_compiled_names(port_dir):
    harness.check_compiled_names(port_dir, PORT_NAME, ARCHITECTURE, GRAPH_CLASS)


def test_port_dry_builds_and_keys_match(replica, port_dir):
    harness.check_dry_build(replica, port_dir)


def test_port_refuses_bidirectional_attention(port_dir, tmp_path):
    """A replica with ``use_bidirectional_attention`` (Gemma 2's encoder mode) fails the dry-build naming it."""
    from conftest import run_script

    bidirectional = functools.partial(gemma2_27b_scalar_config, use_bidirectional_attention=True)
    replica = harness.make_replica(harness.default_source(tmp_path / "source", bidirectional, ARCHITECTURE),
                                   tmp_path / "replica")
    result = run_script("port_probe", replica, "--port-dir", port_dir, "--check", "dry-build", "--fork", "--json",
                        timeout=harness.DRY_BUILD_TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    (build,) = result.json()["results"]
    assert not build["document"]["passed"] and "use_bidirectional_attention" in build["document"]["summary"], build


def test_each_mutation_moves_hf_logits(replica, mutants):
    """The edits are real: transformers itself gives different logits on every mutant, over the probe prompt
    (longer than the window, so the window mutations reach positions past it)."""
    moved = harness.check_mutations_move_hf(replica, mutants, ids=prompt_ids(replica), patched=PATCHED_REFERENCES)
    print("gemma2_blocks HF moves per mutation:", {k: round(v, 3) for k, v in moved.items()})


def test_window_mutation_moves_only_past_the_window(replica, mutants):
    """HF itself: ignoring the window changes nothing up to the window and something past it."""
    from tolerances import sensitivity_threshold

    ids = prompt_ids(replica)
    window = json.loads((replica / "config.json").read_text())["sliding_window"]
    ignored = harness.reference_logprobs(mutants["ignored_sliding_window"], ids)
    delta = (ignored - harness.reference_logprobs(replica, ids)).abs().amax(-1)[0]
    assert float(delta[:window].max()) < sensitivity_threshold("float32")
    assert float(delta[window:].max()) > sensitivity_threshold("float32")


# --- e2e: one compile, one server for every mutation ------------------------------


@pytest.fixture(scope="module")
def served(replica, port_dir, mutants, module_clock):
    """Reports: "port" (MATCH expected), "alone_and_together", one per mutation (DIVERGED expected)."""
    timings: dict[str, float] = {}
    reports = harness.serve_and_compare(replica, port_dir, probe_prompts(replica), mutants, timings,
                                        patched=PATCHED_REFERENCES)
    timings["module_total"] = time.monotonic() - module_clock
    harness.print_summary(PORT_NAME, timings, reports)
    return reports


@pytest.mark.e2e
def test_composed_port_matches_hf(served):
    report = served["port"]
    assert report.verdict == "MATCH", report.first_divergence
    assert len(report.runs) == 2


@pytest.mark.e2e
def test_concurrent_prompts_of_different_lengths_match_alone(served):
    harness.check_alone_and_together(*served["alone_and_together"])


@pytest.mark.e2e
@pytest.mark.parametrize("name", [*REFERENCE_MUTATIONS, *PATCHED_REFERENCES])
def test_planted_bug_diverges(served, name):
    harness.check_diverged(served[name], name)
